package kleidi

import (
	"encoding/binary"
	"fmt"
)

// proofLabel starts every message an [Authenticator] proves for a wrapped KEK, so that a proof made for a wrapped
// key can never pass for a proof of anything else.
const proofLabel = "kleidi wrapped key v2\x00"

// proofMessage is the message whose proof authenticates one wrapped copy of KEK id: the copy's root and blob,
// bound to the key ID they claim. A proof over it says "a legitimate holder of root made blob, and blob wraps
// KEK id".
func proofMessage(id, root string, blob []byte) []byte {
	m := make([]byte, 0, len(proofLabel)+len(id)+1+len(root)+1+len(blob))
	m = append(m, proofLabel...)
	m = append(append(m, id...), 0)
	m = append(append(m, root...), 0)
	return append(m, blob...)
}

// Attached key format, version 2: what [Ciphertext.AttachedKey] holds and the KMS v2 server stores in an
// annotation. All integers are big-endian.
//
//	offset  size  field
//	0       1     magic 'w' (0x77)
//	1       1     version (0x02)
//	2       2     n, length of the proof (1 to MaxProofSize)
//	4       n     proof: Authenticator.Prove over proofMessage(key ID, root, blob)
//	4+n     rest  blob: the KEK wrapped by the root (1 to MaxWrappedKeySize bytes)
//
// The root is the Envelope's own provider name; the key ID is the ciphertext's. Version 1 had no format: the
// annotation held the bare blob, which nothing authenticated (see [Envelope.Decrypt] for what is still accepted).
const (
	attachedMagic   = 'w'
	attachedVersion = 2
	attachedHeader  = 4
	// MaxAttachedKeySize is the size of the largest attached key: the largest proof and wrapped key.
	MaxAttachedKeySize = attachedHeader + MaxProofSize + MaxWrappedKeySize
)

// encodeAttachedKey returns the attached key for blob and its proof.
func encodeAttachedKey(blob, proof []byte) []byte {
	out := make([]byte, 0, attachedHeader+len(proof)+len(blob))
	out = append(out, attachedMagic, attachedVersion)
	out = binary.BigEndian.AppendUint16(out, uint16(len(proof)))
	return append(append(out, proof...), blob...)
}

// parseAttachedKey splits an attached key into its blob and proof, which alias b. Errors wrap
// [ErrUnauthenticated]: bytes that are not an attached key of version 2 carry no proof.
func parseAttachedKey(b []byte) (blob, proof []byte, err error) {
	if len(b) < attachedHeader || b[0] != attachedMagic || b[1] != attachedVersion {
		return nil, nil, fmt.Errorf("%w: the attached key is not of format version %d (it carries no proof)", ErrUnauthenticated, attachedVersion)
	}
	n := int(binary.BigEndian.Uint16(b[2:]))
	if n == 0 || n > MaxProofSize {
		return nil, nil, fmt.Errorf("%w: attached proof of %d bytes, want 1 to %d", ErrUnauthenticated, n, MaxProofSize)
	}
	blob = b[attachedHeader+min(n, len(b)-attachedHeader):]
	if len(b) < attachedHeader+n || len(blob) == 0 || len(blob) > MaxWrappedKeySize {
		return nil, nil, fmt.Errorf("%w: attached key of %d bytes does not hold a proof of %d bytes and a wrapped key of 1 to %d",
			ErrUnauthenticated, len(b), n, MaxWrappedKeySize)
	}
	return blob, b[attachedHeader : attachedHeader+n], nil
}
