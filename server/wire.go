package server

import (
	"bytes"
	"errors"
	"slices"
	"unicode/utf8"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	kmsapi "k8s.io/kms/apis/v2"
)

// errMalformed is a request that is not a valid protobuf message of its type.
var errMalformed = errors.New("malformed protobuf message")

// unmarshalRequest decodes the request b into m. Encrypt and Decrypt requests, the calls kube-apiserver makes
// under load, are decoded here without reflection, accepting and refusing exactly what proto.Unmarshal accepts and
// refuses (FuzzUnmarshalRequest holds the two side by side); unknown fields are skipped, not kept. m keeps none of
// b, which gRPC reuses.
func unmarshalRequest(b []byte, m proto.Message) error {
	switch r := m.(type) {
	case *kmsapi.DecryptRequest:
		return decodeDecryptRequest(bytes.Clone(b), r)
	case *kmsapi.EncryptRequest:
		return decodeEncryptRequest(bytes.Clone(b), r)
	}
	return proto.Unmarshal(b, m)
}

// decodeDecryptRequest decodes b into r; r's fields share b.
func decodeDecryptRequest(b []byte, r *kmsapi.DecryptRequest) error {
	return forEachField(b, func(num protowire.Number, typ protowire.Type, v []byte) (int, error) {
		switch num {
		case 1:
			return consumeBytes(typ, v, &r.Ciphertext)
		case 2:
			return consumeString(typ, v, &r.Uid)
		case 3:
			return consumeString(typ, v, &r.KeyId)
		case 4:
			return consumeAnnotation(typ, v, &r.Annotations)
		}
		return -1, nil
	})
}

// decodeEncryptRequest decodes b into r; r's fields share b.
func decodeEncryptRequest(b []byte, r *kmsapi.EncryptRequest) error {
	return forEachField(b, func(num protowire.Number, typ protowire.Type, v []byte) (int, error) {
		switch num {
		case 1:
			return consumeBytes(typ, v, &r.Plaintext)
		case 2:
			return consumeString(typ, v, &r.Uid)
		}
		return -1, nil
	})
}

// forEachField calls field with the number, wire type and the bytes from the value on of each field of the message
// b. field returns how many bytes the value took, or -1 for a field it does not know, or one of a wire type it does
// not expect: such a field is skipped, as proto.Unmarshal skips unknown fields.
func forEachField(b []byte, field func(protowire.Number, protowire.Type, []byte) (int, error)) error {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 || num > protowire.MaxValidNumber {
			return errMalformed
		}
		b = b[n:]
		n, err := field(num, typ, b)
		if err != nil {
			return err
		}
		if n < 0 {
			if n = protowire.ConsumeFieldValue(num, typ, b); n < 0 {
				return errMalformed
			}
		}
		b = b[n:]
	}
	return nil
}

// consumeBytes sets *dst to a length-delimited value, the last one wins; it shares b.
func consumeBytes(typ protowire.Type, b []byte, dst *[]byte) (int, error) {
	if typ != protowire.BytesType {
		return -1, nil
	}
	v, n := protowire.ConsumeBytes(b)
	if n < 0 {
		return 0, errMalformed
	}
	*dst = v[:len(v):len(v)]
	return n, nil
}

// consumeString sets *dst to a length-delimited value that is valid UTF-8, as proto3 requires of a string.
func consumeString(typ protowire.Type, b []byte, dst *string) (int, error) {
	var v []byte
	n, err := consumeBytes(typ, b, &v)
	if n < 0 || err != nil {
		return n, err
	}
	if !utf8.Valid(v) {
		return 0, errMalformed
	}
	*dst = string(v)
	return n, nil
}

// consumeAnnotation adds an entry of a map<string, bytes> to *m: key field 1, value field 2, each absent one
// empty, the last one of each wins, and the last entry of a key wins.
func consumeAnnotation(typ protowire.Type, b []byte, m *map[string][]byte) (int, error) {
	var entry []byte
	n, err := consumeBytes(typ, b, &entry)
	if n < 0 || err != nil {
		return n, err
	}
	var key string
	value := []byte{}
	err = forEachField(entry, func(num protowire.Number, typ protowire.Type, v []byte) (int, error) {
		switch num {
		case 1:
			return consumeString(typ, v, &key)
		case 2:
			return consumeBytes(typ, v, &value)
		}
		return -1, nil
	})
	if err != nil {
		return 0, err
	}
	if *m == nil {
		*m = make(map[string][]byte, 1)
	}
	(*m)[key] = value
	return n, nil
}

// marshalResponse encodes the responses of Encrypt and Decrypt without reflection, as proto.Marshal does (the
// annotations in the order of their keys), and reports whether m is one of them.
func marshalResponse(m any) ([]byte, bool) {
	switch r := m.(type) {
	case *kmsapi.DecryptResponse:
		b := make([]byte, 0, sizeBytes(1, r.Plaintext))
		return appendBytes(b, 1, r.Plaintext), true
	case *kmsapi.EncryptResponse:
		n := sizeBytes(1, r.Ciphertext)
		if r.KeyId != "" {
			n += protowire.SizeTag(2) + protowire.SizeBytes(len(r.KeyId))
		}
		keys := make([]string, 0, len(r.Annotations))
		for k, v := range r.Annotations {
			keys = append(keys, k)
			n += protowire.SizeTag(3) + protowire.SizeBytes(annotationSize(k, v))
		}
		slices.Sort(keys)
		b := appendBytes(make([]byte, 0, n), 1, r.Ciphertext)
		if r.KeyId != "" {
			b = protowire.AppendString(protowire.AppendTag(b, 2, protowire.BytesType), r.KeyId)
		}
		for _, k := range keys {
			v := r.Annotations[k]
			b = protowire.AppendVarint(protowire.AppendTag(b, 3, protowire.BytesType), uint64(annotationSize(k, v)))
			b = protowire.AppendString(protowire.AppendTag(b, 1, protowire.BytesType), k)
			b = protowire.AppendBytes(protowire.AppendTag(b, 2, protowire.BytesType), v)
		}
		return b, true
	}
	return nil, false
}

// annotationSize is the size of a map entry: its key and its value, both written even when empty.
func annotationSize(k string, v []byte) int {
	return protowire.SizeTag(1) + protowire.SizeBytes(len(k)) + protowire.SizeTag(2) + protowire.SizeBytes(len(v))
}

// sizeBytes is the size of a proto3 bytes field: nothing when it is empty.
func sizeBytes(num protowire.Number, v []byte) int {
	if len(v) == 0 {
		return 0
	}
	return protowire.SizeTag(num) + protowire.SizeBytes(len(v))
}

// appendBytes appends a proto3 bytes field, unless it is empty.
func appendBytes(b []byte, num protowire.Number, v []byte) []byte {
	if len(v) == 0 {
		return b
	}
	return protowire.AppendBytes(protowire.AppendTag(b, num, protowire.BytesType), v)
}
