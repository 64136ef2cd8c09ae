package gpg

import (
	"bytes"
	"slices"
	"strings"
	"testing"
)

// Hand-made packets: a Public-Key Encrypted Session Key (v3, key ID 0x0102030405060708, RSA) and an encrypted
// data packet, in the OpenPGP and the legacy header formats.
var (
	pkesk       = []byte{0xc1, 10, 3, 1, 2, 3, 4, 5, 6, 7, 8, 1}
	pkeskLegacy = []byte{0x84, 10, 3, 1, 2, 3, 4, 5, 6, 7, 8, 1}
	pkeskHidden = []byte{0xc1, 10, 3, 0, 0, 0, 0, 0, 0, 0, 0, 1}
	pkeskV6     = []byte{0xc1, 0x0c, 6, 9, 6, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff, 0x11, 0x22, 25}
	seipd       = []byte{0xd2, 3, 1, 0xaa, 0xbb}
	seipdChunks = []byte{0xd2, 0xe1, 1, 0xaa, 0xe0, 0xbb, 2, 0xcc, 0xdd} // partial 2, partial 1, final 2
	seipdLong   = append([]byte{0xd2, 0xff, 0, 0, 0, 2}, 1, 0xaa)        // five-octet length
)

func cat(packets ...[]byte) []byte { return bytes.Join(packets, nil) }

func TestParseMessage(t *testing.T) {
	for _, tc := range []struct {
		name string
		msg  []byte
		want []string
	}{
		{"one recipient", cat(pkesk, seipd), []string{"0x0102030405060708"}},
		{"legacy header", cat(pkeskLegacy, seipd), []string{"0x0102030405060708"}},
		{"hidden recipient", cat(pkeskHidden, seipd), []string{"*"}},
		{"v6 session key", cat(pkeskV6, seipd), []string{"0xAABBCCDDEEFF1122"}},
		{"two recipients", cat(pkesk, pkeskV6, seipd), []string{"0x0102030405060708", "0xAABBCCDDEEFF1122"}},
		{"partial lengths", cat(pkesk, seipdChunks), []string{"0x0102030405060708"}},
		{"five-octet length", cat(pkesk, seipdLong), []string{"0x0102030405060708"}},
		{"OCB encrypted data", cat(pkesk, []byte{0xd4, 1, 1}), []string{"0x0102030405060708"}},
	} {
		got, err := parseMessage(tc.msg)
		if err != nil || !slices.Equal(got, tc.want) {
			t.Errorf("%s: parseMessage(% x) = %q, %v; want %q, nil", tc.name, tc.msg, got, err, tc.want)
		}
	}
}

func TestParseMessageRefuses(t *testing.T) {
	many := [][]byte{}
	for range maxSessionKeys + 1 {
		many = append(many, pkesk)
	}
	for _, tc := range []struct {
		name, msg, want string
	}{
		{"empty", "", "no encrypted data"},
		{"session keys only", string(cat(pkesk, pkesk)), "no encrypted data"},
		{"data only", string(seipd), "without a public-key encrypted session key"},
		{"trailing byte", string(cat(pkesk, seipd, []byte{0})), "after the encrypted data"},
		{"two messages", string(cat(pkesk, seipd, pkesk, seipd)), "after the encrypted data"},
		{"not a packet", "\x00\x01", "not an OpenPGP packet"},
		{"truncated header", "\xc1", "truncated"},
		{"truncated body", string(cat(pkesk[:6])), "truncated"},
		{"truncated chunk", string(cat(pkesk, seipdChunks[:len(seipdChunks)-1])), "truncated"},
		{"truncated five-octet length", string(cat(pkesk, []byte{0xd2, 0xff, 0, 0})), "truncated"},
		{"huge length", string(cat(pkesk, []byte{0xd2, 0xff, 0xff, 0xff, 0xff, 0xff, 1})), "truncated"},
		{"passphrase session key", string(cat([]byte{0xc3, 1, 4}, pkesk, seipd)), "tag 3"},
		{"literal data", string([]byte{0xcb, 2, 'b', 0}), "tag 11"},
		{"compressed", string([]byte{0xc8, 1, 0}), "tag 8"},
		{"marker", string(cat([]byte{0xca, 3, 'P', 'G', 'P'}, pkesk, seipd)), "tag 10"},
		{"partial session key", string(cat([]byte{0xc1, 0xe0, 3}, pkesk[1:], seipd)), "partial"},
		{"session key version", string(cat([]byte{0xc1, 1, 5}, seipd)), "unknown version 5"},
		{"short session key", string(cat([]byte{0xc1, 2, 3, 1}, seipd)), "truncated session key"},
		{"short v6 session key", string(cat([]byte{0xc1, 2, 6, 9}, seipd)), "truncated session key"},
		{"too many session keys", string(cat(append(many, seipd)...)), "more than"},
	} {
		got, err := parseMessage([]byte(tc.msg))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: parseMessage(% x) = %q, %v; want an error saying %q", tc.name, tc.msg, got, err, tc.want)
		}
	}
}

// FuzzParseMessage checks that the packet parser never panics, and that what it accepts has at least one
// recipient and ends with an encrypted data packet.
func FuzzParseMessage(f *testing.F) {
	for _, seed := range [][]byte{
		cat(pkesk, seipd), cat(pkeskLegacy, pkeskV6, seipdChunks), cat(pkeskHidden, seipdLong),
		cat(pkesk, seipd, []byte{0}), {0xc1}, {0x87, 0}, {0xd2, 0xe0},
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, msg []byte) {
		recipients, err := parseMessage(msg)
		if err != nil {
			return
		}
		if len(recipients) == 0 || len(recipients) > maxSessionKeys {
			t.Fatalf("parseMessage(% x) accepted %d recipients", msg, len(recipients))
		}
		if tag := msg[0]; tag&0x80 == 0 {
			t.Fatalf("parseMessage(% x) accepted a message that does not start with a packet", msg)
		}
	})
}
