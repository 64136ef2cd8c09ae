package server

import (
	"bytes"
	"testing"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	kmsapi "k8s.io/kms/apis/v2"
)

// requestSeeds are requests as kube-apiserver sends them, and the wire format's corner cases: unknown fields of
// every wire type, known fields with another wire type, repeated fields, map entries with missing, repeated or
// unknown fields, invalid UTF-8, and truncated, oversized and invalid tags.
func requestSeeds() [][]byte {
	dec, _ := proto.Marshal(&kmsapi.DecryptRequest{Ciphertext: []byte("ct"), Uid: "4f7c", KeyId: "kleidi-x",
		Annotations: map[string][]byte{"kek.kleidi.dev": []byte("wrapped"), "a.example.com": nil}})
	enc, _ := proto.Marshal(&kmsapi.EncryptRequest{Plaintext: make([]byte, 32), Uid: "4f7c"})
	tag := func(b []byte, num protowire.Number, typ protowire.Type) []byte {
		return protowire.AppendTag(b, num, typ)
	}
	str := func(b []byte, num protowire.Number, s string) []byte {
		return protowire.AppendString(tag(b, num, protowire.BytesType), s)
	}
	entry := func(fields []byte) []byte { return protowire.AppendBytes(tag(nil, 4, protowire.BytesType), fields) }
	seeds := [][]byte{
		dec, enc, nil, {},
		append(append([]byte{}, dec...), dec...),                     // every field twice: the last wins
		str(str(nil, 2, "first"), 2, "second"),                       // a repeated string
		str(nil, 2, "bad \xff utf-8"),                                // invalid UTF-8 in a string
		str(nil, 1, "\xff is fine in bytes"),                         // bytes need not be UTF-8
		protowire.AppendVarint(tag(nil, 2, protowire.VarintType), 7), // a known field with another wire type
		protowire.AppendFixed32(tag(nil, 99, protowire.Fixed32Type), 1),
		protowire.AppendFixed64(tag(nil, 99, protowire.Fixed64Type), 1),
		tag(tag(nil, 9, protowire.StartGroupType), 9, protowire.EndGroupType), // an unknown group
		tag(nil, 9, protowire.StartGroupType),                                 // a group never ended
		tag(nil, 9, protowire.EndGroupType),                                   // an end with no start
		tag(nil, protowire.MaxValidNumber+1, protowire.VarintType),
		{0x00}, {0x80}, {0x0a, 0x05, 'a'}, // field 0, a truncated tag, a truncated value
		entry(str(nil, 1, "only.a.key")),
		entry(protowire.AppendBytes(tag(nil, 2, protowire.BytesType), []byte("only a value"))),
		entry(str(str(str(nil, 1, "k.example.com"), 1, "k2.example.com"), 3, "unknown")),
		entry(protowire.AppendVarint(tag(nil, 1, protowire.VarintType), 1)), // a key with another wire type
		entry(str(nil, 1, "\xff")),                                   // a key that is not UTF-8
		entry([]byte{0x0a, 0x09}),                                    // an entry cut short
		protowire.AppendVarint(tag(nil, 4, protowire.VarintType), 1), // a map field with another wire type
		append(entry(str(nil, 1, "k")), entry(str(nil, 1, "k"))...),  // one key twice
	}
	return seeds
}

// FuzzUnmarshalRequest holds the server's decoding of Encrypt and Decrypt requests to proto.Unmarshal: for any
// bytes, both accept or both refuse, and what they decode is equal.
func FuzzUnmarshalRequest(f *testing.F) {
	for _, s := range requestSeeds() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		for _, pair := range [][2]proto.Message{
			{&kmsapi.DecryptRequest{}, &kmsapi.DecryptRequest{}},
			{&kmsapi.EncryptRequest{}, &kmsapi.EncryptRequest{}},
		} {
			got, want := pair[0], pair[1]
			in := bytes.Clone(b)
			gotErr := unmarshalRequest(in, got)
			wantErr := proto.Unmarshal(b, want)
			if (gotErr == nil) != (wantErr == nil) {
				t.Fatalf("%T from %x: err = %v, proto.Unmarshal err = %v", got, b, gotErr, wantErr)
			}
			if gotErr != nil {
				continue
			}
			want.ProtoReflect().SetUnknown(nil) // the server does not keep unknown fields
			if !proto.Equal(got, want) {
				t.Fatalf("%T from %x:\n got %v\nwant %v", got, b, got, want)
			}
			for i := range in { // the request keeps none of the buffer it was decoded from
				in[i] ^= 0xff
			}
			if !proto.Equal(got, want) {
				t.Fatalf("%T from %x changed with the buffer it was decoded from", got, b)
			}
		}
	})
}

// TestUnmarshalRequestAllocations: a Decrypt request as kube-apiserver sends it is decoded with one allocation per
// string, one for the map and one for its bytes, fewer than proto.Unmarshal makes.
func TestUnmarshalRequestAllocations(t *testing.T) {
	b, _ := proto.Marshal(&kmsapi.DecryptRequest{Ciphertext: make([]byte, 120), Uid: "0f1e4c55-35a4-4a43-9c3c-8b3f1c0f2a9d",
		KeyId: "kleidi-gpg-x", Annotations: map[string][]byte{"kek.kleidi.dev": make([]byte, 400)}})
	got := testing.AllocsPerRun(100, func() { unmarshalRequest(b, &kmsapi.DecryptRequest{}) })
	want := testing.AllocsPerRun(100, func() { proto.Unmarshal(b, &kmsapi.DecryptRequest{}) })
	if got >= want {
		t.Errorf("decoding a Decrypt request allocates %v times, proto.Unmarshal %v", got, want)
	}
}

func BenchmarkUnmarshalDecryptRequest(b *testing.B) {
	req, _ := proto.Marshal(&kmsapi.DecryptRequest{Ciphertext: make([]byte, 120), Uid: "0f1e4c55-35a4-4a43-9c3c-8b3f1c0f2a9d",
		KeyId: "kleidi-gpg-x", Annotations: map[string][]byte{"kek.kleidi.dev": make([]byte, 400)}})
	for _, v := range []struct {
		name      string
		unmarshal func([]byte, proto.Message) error
	}{{"server", unmarshalRequest}, {"proto", proto.Unmarshal}} {
		b.Run(v.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if err := v.unmarshal(req, &kmsapi.DecryptRequest{}); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// TestMarshalResponse: the server's encoding of Encrypt and Decrypt responses is what proto.Marshal writes,
// byte for byte with the annotations in the order of their keys, for empty fields, several annotations and
// empty values too.
func TestMarshalResponse(t *testing.T) {
	for _, m := range []proto.Message{
		&kmsapi.DecryptResponse{Plaintext: make([]byte, 32)},
		&kmsapi.DecryptResponse{},
		&kmsapi.EncryptResponse{Ciphertext: []byte("ct"), KeyId: "kleidi-gpg-x",
			Annotations: map[string][]byte{"kek.kleidi.dev": make([]byte, 300)}},
		&kmsapi.EncryptResponse{Ciphertext: make([]byte, 200), KeyId: "k",
			Annotations: map[string][]byte{"z.example.com": []byte("z"), "a.example.com": nil, "m.example.com": {}}},
		&kmsapi.EncryptResponse{},
		&kmsapi.EncryptResponse{KeyId: "only a key id"},
	} {
		got, ok := marshalResponse(m)
		if !ok {
			t.Fatalf("marshalResponse(%T) did not encode it", m)
		}
		want, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("marshalResponse(%v) = %x, want %x", m, got, want)
		}
	}
	if _, ok := marshalResponse(&kmsapi.StatusResponse{}); ok {
		t.Error("marshalResponse(StatusResponse) encoded it, want it left to proto.Marshal")
	}
}

func BenchmarkMarshalEncryptResponse(b *testing.B) {
	resp := &kmsapi.EncryptResponse{Ciphertext: make([]byte, 120), KeyId: "kleidi-gpg-x",
		Annotations: map[string][]byte{"kek.kleidi.dev": make([]byte, 400)}}
	b.Run("server", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			marshalResponse(resp)
		}
	})
	b.Run("proto", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			protoCodec().Marshal(resp)
		}
	})
}
