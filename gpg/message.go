package gpg

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// OpenPGP packet tags this package accepts in a wrapped key (RFC 9580, section 5).
const (
	tagPKESK = 1  // Public-Key Encrypted Session Key
	tagSEIPD = 18 // Symmetrically Encrypted and Integrity Protected Data (v1 and v2)
	tagOCBED = 20 // OCB Encrypted Data, as GnuPG 2.3 and later write for LibrePGP keys
)

// maxSessionKeys bounds the Public-Key Encrypted Session Key packets of a wrapped key: one per recipient.
const maxSessionKeys = 64

// parseMessage checks the packet structure of a wrapped key before any cryptography touches it: one or more
// Public-Key Encrypted Session Key packets, then exactly one encrypted data packet that ends where the blob
// ends. Anything else (a passphrase-encrypted session key, an unencrypted or signed-only message, a marker, a
// second message, trailing bytes) is refused. It returns the key IDs the session keys are encrypted to, in
// the form "0x" and upper-case hex, "*" for a hidden recipient.
func parseMessage(b []byte) (recipients []string, err error) {
	sawData := false
	for len(b) > 0 {
		if sawData {
			return nil, errors.New("bytes after the encrypted data packet")
		}
		tag, body, n, err := readPacket(b)
		if err != nil {
			return nil, err
		}
		b = b[n:]
		switch tag {
		case tagPKESK:
			if body == nil {
				return nil, errors.New("session key packet with a partial length")
			}
			if len(recipients) == maxSessionKeys {
				return nil, fmt.Errorf("more than %d session key packets", maxSessionKeys)
			}
			id, err := sessionKeyRecipient(body)
			if err != nil {
				return nil, err
			}
			recipients = append(recipients, id)
		case tagSEIPD, tagOCBED:
			if len(recipients) == 0 {
				return nil, errors.New("encrypted data without a public-key encrypted session key")
			}
			sawData = true
		default:
			return nil, fmt.Errorf("unexpected OpenPGP packet of tag %d", tag)
		}
	}
	if !sawData {
		return nil, errors.New("no encrypted data packet")
	}
	return recipients, nil
}

// readPacket reads the packet at the start of b. It returns its tag, its body (nil if the body is split in
// partial lengths) and the number of bytes the packet takes, header included.
func readPacket(b []byte) (tag byte, body []byte, n int, err error) {
	errTruncated := errors.New("truncated OpenPGP packet")
	h := b[0]
	if h&0x80 == 0 {
		return 0, nil, 0, errors.New("not an OpenPGP packet")
	}
	if h&0x40 == 0 {
		// Legacy format: the tag in bits 5-2, the length type in bits 1-0.
		tag = (h >> 2) & 0x0f
		var length uint64
		off := 1
		switch h & 3 {
		case 0:
			if len(b) < 2 {
				return 0, nil, 0, errTruncated
			}
			length, off = uint64(b[1]), 2
		case 1:
			if len(b) < 3 {
				return 0, nil, 0, errTruncated
			}
			length, off = uint64(binary.BigEndian.Uint16(b[1:])), 3
		case 2:
			if len(b) < 5 {
				return 0, nil, 0, errTruncated
			}
			length, off = uint64(binary.BigEndian.Uint32(b[1:])), 5
		case 3:
			// Indeterminate length: the packet runs to the end of the blob.
			length = uint64(len(b) - 1)
		}
		if length > uint64(len(b)-off) {
			return 0, nil, 0, errTruncated
		}
		end := off + int(length)
		return tag, b[off:end], end, nil
	}
	// OpenPGP format: the tag in bits 5-0, then one or more lengths, all but the last partial.
	tag = h & 0x3f
	off, partial := 1, false
	for {
		if off >= len(b) {
			return 0, nil, 0, errTruncated
		}
		var length uint64
		c := b[off]
		last := true
		switch {
		case c < 192:
			length, off = uint64(c), off+1
		case c < 224:
			if len(b)-off < 2 {
				return 0, nil, 0, errTruncated
			}
			length, off = uint64(c-192)<<8+uint64(b[off+1])+192, off+2
		case c == 255:
			if len(b)-off < 5 {
				return 0, nil, 0, errTruncated
			}
			length, off = uint64(binary.BigEndian.Uint32(b[off+1:])), off+5
		default:
			length, off, last = 1<<(c&0x1f), off+1, false
		}
		if length > uint64(len(b)-off) {
			return 0, nil, 0, errTruncated
		}
		start := off
		off += int(length)
		if last {
			if partial {
				return tag, nil, off, nil
			}
			return tag, b[start:off], off, nil
		}
		partial = true
	}
}

// sessionKeyRecipient returns the key ID a Public-Key Encrypted Session Key packet body names.
func sessionKeyRecipient(body []byte) (string, error) {
	if len(body) == 0 {
		return "", errors.New("empty session key packet")
	}
	switch body[0] {
	case 3:
		if len(body) < 9 {
			return "", errors.New("truncated session key packet")
		}
		id := binary.BigEndian.Uint64(body[1:9])
		if id == 0 {
			return "*", nil
		}
		return fmt.Sprintf("0x%016X", id), nil
	case 6:
		// A length, then the key version and fingerprint, or nothing for a hidden recipient.
		if len(body) < 2 || int(body[1]) > len(body)-2 {
			return "", errors.New("truncated session key packet")
		}
		if body[1] < 2 {
			return "*", nil
		}
		return fmt.Sprintf("0x%X", body[3:2+int(body[1])]), nil
	}
	return "", fmt.Errorf("session key packet of unknown version %d", body[0])
}
