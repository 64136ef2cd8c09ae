package e2e

import (
	"errors"
	"fmt"
	"strings"

	"google.golang.org/protobuf/encoding/protowire"
)

// encryptedObject is the part of k8s.io/apiserver's kmsv2 EncryptedObject the
// tests look at, parsed from the bytes after the k8s:enc:kms:v2:<name>: prefix.
type encryptedObject struct {
	encryptedData      []byte
	keyID              string
	encryptedDEKSource []byte
	annotations        map[string][]byte
	dekSourceType      uint64
	// offsets of the field values in the raw bytes (including the prefix)
	dataOff, dekOff int
}

const kmsPrefix = "k8s:enc:kms:v2:kleidi:"

func parseEncryptedObject(raw []byte) (*encryptedObject, error) {
	if !strings.HasPrefix(string(raw), kmsPrefix) {
		return nil, fmt.Errorf("no %q prefix: %q", kmsPrefix, raw[:min(len(raw), 40)])
	}
	b := raw[len(kmsPrefix):]
	off := len(kmsPrefix)
	o := &encryptedObject{annotations: map[string][]byte{}}
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return nil, protowire.ParseError(n)
		}
		b, off = b[n:], off+n
		switch {
		case typ == protowire.BytesType:
			v, m := protowire.ConsumeBytes(b)
			if m < 0 {
				return nil, protowire.ParseError(m)
			}
			valOff := off + m - len(v)
			switch num {
			case 1:
				o.encryptedData, o.dataOff = v, valOff
			case 2:
				o.keyID = string(v)
			case 3:
				o.encryptedDEKSource, o.dekOff = v, valOff
			case 4:
				k, val, err := parseMapEntry(v)
				if err != nil {
					return nil, err
				}
				o.annotations[k] = val
			}
			b, off = b[m:], off+m
		case typ == protowire.VarintType:
			v, m := protowire.ConsumeVarint(b)
			if m < 0 {
				return nil, protowire.ParseError(m)
			}
			if num == 5 {
				o.dekSourceType = v
			}
			b, off = b[m:], off+m
		default:
			m := protowire.ConsumeFieldValue(num, typ, b)
			if m < 0 {
				return nil, protowire.ParseError(m)
			}
			b, off = b[m:], off+m
		}
	}
	if len(o.encryptedData) == 0 || o.keyID == "" || len(o.encryptedDEKSource) == 0 {
		return nil, errors.New("EncryptedObject misses encryptedData, keyID or encryptedDEKSource")
	}
	return o, nil
}

func parseMapEntry(b []byte) (string, []byte, error) {
	var key string
	var val []byte
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 || typ != protowire.BytesType {
			return "", nil, errors.New("bad annotations entry")
		}
		b = b[n:]
		v, m := protowire.ConsumeBytes(b)
		if m < 0 {
			return "", nil, protowire.ParseError(m)
		}
		if num == 1 {
			key = string(v)
		} else if num == 2 {
			val = v
		}
		b = b[m:]
	}
	return key, val, nil
}
