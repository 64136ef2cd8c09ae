package tpm

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"
	"github.com/kleidi-kms/kleidi"
)

// The wrapped form of a key, version 1. All integers are big-endian.
//
//	magic      4 bytes  "KTPM"
//	version    1 byte   1
//	flags      1 byte   bit 0: the sealed object has an auth value; other bits are zero
//	pcrs       4 bytes  bit i set: bound to SHA-256 PCR i (i < 24)
//	parent     2-byte length + TPM2B_NAME contents: the name of the storage root key it was sealed under
//	public     2-byte length + TPMT_PUBLIC of the sealed object
//	private    2-byte length + TPM2B_PRIVATE contents of the sealed object
//
// Nothing follows. The TPM checks the integrity of public and private against the storage root key; the parent
// name lets Unwrap tell "the TPM was cleared or is another TPM" from a damaged blob.
const (
	blobMagic   = "KTPM"
	blobVersion = 1

	flagAuth = 1 << 0

	// numPCRs is the number of PCRs of the SHA-256 bank a PC client TPM has.
	numPCRs = 24
)

// blob is a parsed wrapped key.
type blob struct {
	auth    bool
	pcrs    uint32 // bit i: PCR i
	parent  []byte // TPM2B_NAME contents
	public  []byte // TPMT_PUBLIC
	private []byte // TPM2B_PRIVATE contents

	policy []byte // the sealed object's authPolicy, from public (not marshalled)
}

var errBlob = errors.New("not a wrapped key of this format")

func (b *blob) marshal() []byte {
	out := make([]byte, 0, 4+1+1+4+2+len(b.parent)+2+len(b.public)+2+len(b.private))
	out = append(out, blobMagic...)
	out = append(out, blobVersion)
	var flags byte
	if b.auth {
		flags |= flagAuth
	}
	out = append(out, flags)
	out = binary.BigEndian.AppendUint32(out, b.pcrs)
	for _, f := range [][]byte{b.parent, b.public, b.private} {
		out = binary.BigEndian.AppendUint16(out, uint16(len(f)))
		out = append(out, f...)
	}
	return out
}

// parseBlob parses a wrapped key strictly: known magic and version, no unknown flag or PCR bit, every length
// within the input, a sealed-object public area of the shape Wrap creates, and no trailing byte. Errors wrap
// errBlob and never hold the input.
func parseBlob(in []byte) (*blob, error) {
	if len(in) > kleidi.MaxWrappedKeySize {
		return nil, fmt.Errorf("%w: %d bytes, more than %d", errBlob, len(in), kleidi.MaxWrappedKeySize)
	}
	if len(in) < 10 || string(in[:4]) != blobMagic {
		return nil, fmt.Errorf("%w: bad magic", errBlob)
	}
	if in[4] != blobVersion {
		return nil, fmt.Errorf("%w: unknown version %d", errBlob, in[4])
	}
	flags := in[5]
	if flags&^flagAuth != 0 {
		return nil, fmt.Errorf("%w: unknown flags %#x", errBlob, flags)
	}
	b := &blob{auth: flags&flagAuth != 0, pcrs: binary.BigEndian.Uint32(in[6:10])}
	if b.pcrs>>numPCRs != 0 {
		return nil, fmt.Errorf("%w: PCR selection %#x names a PCR above %d", errBlob, b.pcrs, numPCRs-1)
	}
	rest := in[10:]
	for _, f := range []*[]byte{&b.parent, &b.public, &b.private} {
		if len(rest) < 2 {
			return nil, fmt.Errorf("%w: truncated", errBlob)
		}
		n := int(binary.BigEndian.Uint16(rest))
		rest = rest[2:]
		if n == 0 || n > len(rest) {
			return nil, fmt.Errorf("%w: field length %d out of range", errBlob, n)
		}
		*f = rest[:n:n]
		rest = rest[n:]
	}
	if len(rest) != 0 {
		return nil, fmt.Errorf("%w: %d trailing bytes", errBlob, len(rest))
	}
	if len(b.parent) != 2+32 || binary.BigEndian.Uint16(b.parent) != uint16(tpm2.TPMAlgSHA256) {
		return nil, fmt.Errorf("%w: parent name is not a SHA-256 name", errBlob)
	}
	pub, err := tpm2.Unmarshal[tpm2.TPMTPublic](b.public)
	if err != nil {
		return nil, fmt.Errorf("%w: public area: %v", errBlob, err)
	}
	if !bytes.Equal(tpm2.Marshal(pub), b.public) {
		return nil, fmt.Errorf("%w: public area is not canonical", errBlob)
	}
	if err := checkSealedPublic(pub, b.auth); err != nil {
		return nil, err
	}
	b.policy = pub.AuthPolicy.Buffer
	return b, nil
}

// sealedTemplate is the public area of a sealed KEK: bound to this TPM and parent, usable only through its
// policy, with dictionary-attack protection when it has an auth value that could be guessed.
func sealedTemplate(policy []byte, auth bool) tpm2.TPMTPublic {
	return tpm2.TPMTPublic{
		Type:    tpm2.TPMAlgKeyedHash,
		NameAlg: tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{
			FixedTPM:        true,
			FixedParent:     true,
			AdminWithPolicy: true,
			NoDA:            !auth,
		},
		AuthPolicy: tpm2.TPM2BDigest{Buffer: policy},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgKeyedHash,
			&tpm2.TPMSKeyedHashParms{Scheme: tpm2.TPMTKeyedHashScheme{Scheme: tpm2.TPMAlgNull}}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgKeyedHash, &tpm2.TPM2BDigest{}),
	}
}

// checkSealedPublic checks that pub has the shape of sealedTemplate, so Unwrap never unseals an object that
// skips the policy.
func checkSealedPublic(pub *tpm2.TPMTPublic, auth bool) error {
	want := sealedTemplate(nil, auth)
	if pub.Type != want.Type || pub.NameAlg != want.NameAlg || pub.ObjectAttributes != want.ObjectAttributes {
		return fmt.Errorf("%w: not a sealed object of the expected type and attributes", errBlob)
	}
	if len(pub.AuthPolicy.Buffer) != 32 {
		return fmt.Errorf("%w: policy digest is not SHA-256", errBlob)
	}
	params, err := pub.Parameters.KeyedHashDetail()
	if err != nil || params.Scheme.Scheme != tpm2.TPMAlgNull {
		return fmt.Errorf("%w: not a sealed data object", errBlob)
	}
	return nil
}
