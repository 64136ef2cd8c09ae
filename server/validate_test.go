package server

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/kleiditest"
)

func TestIsFQDN(t *testing.T) {
	cases := map[string]bool{
		"kek.kleidi.dev":                true,
		"kek.kleidi.dev.":               true,
		"a.b":                           true,
		"a-1.b2":                        true,
		"0.0":                           true,
		strings.Repeat("a", 63) + ".b":  true,
		strings.Repeat("a.", 126) + "b": true, // 253 characters
		"":                              false,
		".":                             false,
		"kleidi":                        false,
		"Kek.kleidi.dev":                false,
		"kek..dev":                      false,
		".kek.dev":                      false,
		"kek.dev..":                     false,
		"-kek.dev":                      false,
		"kek-.dev":                      false,
		"kek_x.dev":                     false,
		"kek.dev/x":                     false,
		"k\x00.dev":                     false,
		"kék.dev":                       false,
		strings.Repeat("a", 64) + ".b":  false,
		strings.Repeat("a.", 127) + "b": false, // 255 characters
	}
	for name, want := range cases {
		if got := isFQDN(name); got != want {
			t.Errorf("isFQDN(%q) = %v, want %v", name, got, want)
		}
	}
}

// kindErrors are an error of each kind kleidi.ErrorKind names.
var kindErrors = []error{
	nil, kleidi.ErrInvalidCiphertext, kleidi.ErrDecrypt, kleidi.ErrUnknownKey, kleidi.ErrKeyMismatch,
	kleidi.ErrUnauthenticated, kleidi.ErrUnwrap, kleidi.ErrUnavailable, kleidi.ErrInvalidKeyring, kleidi.ErrKeyExhausted,
	kleidi.ErrTooLarge, kleidi.ErrClosed, context.Canceled, context.DeadlineExceeded, errors.New("anything else"),
}

// TestErrorTable: every kind of error has exactly one row of errorCodes, every row is a kind, and Code follows
// the row of the error's kind, also for errors that hold several kinds.
func TestErrorTable(t *testing.T) {
	rows := map[string]int{}
	for _, row := range errorCodes {
		rows[row.kind]++
	}
	kinds := map[string]bool{}
	for _, err := range kindErrors {
		kind := kleidi.ErrorKind(fmt.Errorf("op: %w", err))
		if err == nil {
			kind = kleidi.ErrorKind(nil)
		}
		kinds[kind] = true
		if rows[kind] != 1 {
			t.Errorf("kind %q of %v has %d rows in errorCodes, want 1", kind, err, rows[kind])
		}
	}
	for kind := range rows {
		if !kinds[kind] {
			t.Errorf("errorCodes has a row for %q, which kleidi.ErrorKind never returns", kind)
		}
	}
	for _, a := range kindErrors[1:] {
		for _, b := range kindErrors[1:] {
			joined := errors.Join(a, b)
			kind := kleidi.ErrorKind(joined)
			if got, want := Code(joined), Code(fmt.Errorf("op: %w", firstOfKind(kind))); got != want {
				t.Errorf("Code(errors.Join(%v, %v)) = %v, want %v: the code of its kind %s", a, b, got, want, kind)
			}
		}
	}
}

// firstOfKind returns the error of kindErrors whose kind is kind.
func firstOfKind(kind string) error {
	for _, err := range kindErrors[1:] {
		if kleidi.ErrorKind(err) == kind {
			return err
		}
	}
	return nil
}

func TestCode(t *testing.T) {
	cases := []struct {
		err  error
		want codes.Code
	}{
		{nil, codes.OK},
		{invalid("x"), codes.InvalidArgument},
		{fmt.Errorf("a: %w", kleidi.ErrInvalidCiphertext), codes.InvalidArgument},
		{fmt.Errorf("a: %w", kleidi.ErrDecrypt), codes.InvalidArgument},
		{fmt.Errorf("a: %w", kleidi.ErrKeyMismatch), codes.InvalidArgument},
		{fmt.Errorf("a: %w", kleidi.ErrTooLarge), codes.InvalidArgument},
		{fmt.Errorf("a: %w", kleidi.ErrUnknownKey), codes.NotFound},
		{fmt.Errorf("a: %w", kleidi.ErrUnwrap), codes.FailedPrecondition},
		{fmt.Errorf("a: %w", kleidi.ErrUnavailable), codes.Unavailable},
		{fmt.Errorf("a: %w", kleidi.ErrClosed), codes.Unavailable},
		{fmt.Errorf("a: %w", context.DeadlineExceeded), codes.DeadlineExceeded},
		{fmt.Errorf("a: %w", context.Canceled), codes.Canceled},
		{internalError{errors.New("bug")}, codes.Internal},
		{errors.New("bug"), codes.Internal},
	}
	for _, c := range cases {
		if got := Code(c.err); got != c.want {
			t.Errorf("Code(%v) = %v, want %v", c.err, got, c.want)
		}
		if got := Code(status.Error(c.want, "as it came")); got != c.want {
			t.Errorf("Code(status.Error(%v)) = %v, want the same", c.want, got)
		}
		if got := Code(statusError(c.err)); c.err != nil && got != c.want {
			t.Errorf("Code(statusError(%v)) = %v, want %v", c.err, got, c.want)
		}
	}
}

// FuzzDecryptRequest feeds untrusted bytes through what the server does with a Decrypt request: decode,
// validate, parse, decrypt. Whatever the bytes, it must not panic, and it must answer with a client error, never
// Internal or Unknown.
func FuzzDecryptRequest(f *testing.F) {
	ctx := context.Background()
	p := kleiditest.NewInsecureProvider()
	s, err := New(ctx, p, kleidi.NewMemoryKeyring(), Config{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}, kleidi.WithCreateIfEmpty())
	if err != nil {
		f.Fatal(err)
	}
	enc, err := s.encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: make([]byte, 32)})
	if err != nil {
		f.Fatal(err)
	}
	valid, _ := proto.Marshal(&kmsapi.DecryptRequest{Ciphertext: enc.Ciphertext, KeyId: enc.KeyId, Annotations: enc.Annotations, Uid: "u"})
	f.Add(valid)
	noAnnotation, _ := proto.Marshal(&kmsapi.DecryptRequest{Ciphertext: enc.Ciphertext, KeyId: enc.KeyId})
	f.Add(noAnnotation)
	badKey, _ := proto.Marshal(&kmsapi.DecryptRequest{Ciphertext: enc.Ciphertext, KeyId: enc.KeyId,
		Annotations: map[string][]byte{"Not_A_Domain": {1}, AttachedKeyAnnotation: {1, 2, 3}}})
	f.Add(badKey)
	f.Add([]byte{})
	f.Add([]byte{0x0a, 0x03, 'k', 0x01, 0x05})
	f.Fuzz(func(t *testing.T, b []byte) {
		req := &kmsapi.DecryptRequest{}
		if err := proto.Unmarshal(b, req); err != nil {
			return // the handler answers InvalidArgument before any of this runs
		}
		resp, err := s.decrypt(ctx, req)
		switch code := Code(err); code {
		case codes.OK:
			if resp == nil {
				t.Fatalf("decrypt() = nil, nil")
			}
		case codes.Internal, codes.Unknown:
			t.Fatalf("decrypt() err = %v, code %v; want a client error", err, code)
		}
	})
}
