package server

import (
	"errors"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/kleidi-kms/kleidi"
)

// errorCodes is the one table of what a client gets for each [kleidi.ErrorKind]: the gRPC code, and the fixed
// message that stands for the error, so no detail of a key or a provider reaches the caller (the server logs the
// full error). Every kind ErrorKind returns has exactly one row.
var errorCodes = []struct {
	kind    string
	code    codes.Code
	message string
}{
	{"ok", codes.OK, ""},
	// A client's input: malformed, tampered, or an attached key without a valid proof (forged, or another root's).
	{"invalid_ciphertext", codes.InvalidArgument, "invalid ciphertext"},
	{"decrypt_failed", codes.InvalidArgument, "decryption failed"},
	{"key_mismatch", codes.InvalidArgument, "key does not match its key ID"},
	{"unauthenticated", codes.InvalidArgument, "wrapped key not authenticated"},
	{"too_large", codes.InvalidArgument, "input too large"},
	{"unknown_key", codes.NotFound, "unknown key"},
	// The active KEK reached its usage limit; the server rotates well before.
	{"key_exhausted", codes.ResourceExhausted, "key usage limit reached"},
	// The root of trust refuses the KEK: another root's, or its policy no longer allows it.
	{"unwrap_refused", codes.FailedPrecondition, "unwrap refused"},
	// The root of trust is down, or closed: retrying later may work.
	{"unavailable", codes.Unavailable, "root of trust unavailable"},
	{"closed", codes.Unavailable, "closed"},
	{"canceled", codes.Canceled, "canceled"},
	{"deadline_exceeded", codes.DeadlineExceeded, "deadline exceeded"},
	// Never a client's input: a keyring the plugin cannot read, or a bug.
	{"invalid_keyring", codes.Internal, "internal error (see the plugin's log)"},
	{"error", codes.Internal, "internal error (see the plugin's log)"},
}

// Code returns the gRPC code the server answers err with: InvalidArgument for a malformed request, else the code
// of err's [kleidi.ErrorKind]:
//
//	ok                                                                     OK
//	invalid_ciphertext, decrypt_failed, key_mismatch, unauthenticated,
//	too_large (a client's input, or an attached key without a valid proof)  InvalidArgument
//	unknown_key                                                            NotFound
//	key_exhausted (the active KEK reached its usage limit)                 ResourceExhausted
//	unwrap_refused (the root of trust refuses the KEK)                     FailedPrecondition
//	unavailable, closed (the root of trust is down)                        Unavailable
//	canceled, deadline_exceeded                                            Canceled, DeadlineExceeded
//	invalid_keyring, error (never a client's input)                        Internal
//
// An error that is none of these but carries a gRPC status keeps its code.
func Code(err error) codes.Code {
	code, _ := classify(err)
	return code
}

// classify returns the code and the client's message for err, from errorCodes.
func classify(err error) (codes.Code, string) {
	if err == nil {
		return codes.OK, "" // every call that succeeds: without the allocation errors.As makes
	}
	var inv invalid
	if errors.As(err, &inv) {
		return codes.InvalidArgument, inv.Error()
	}
	kind := kleidi.ErrorKind(err)
	if kind == "error" {
		if s, ok := status.FromError(err); ok {
			return s.Code(), s.Message()
		}
	}
	for _, row := range errorCodes {
		if row.kind == kind {
			return row.code, row.message
		}
	}
	return codes.Internal, "internal error (see the plugin's log)"
}

// statusError turns err into the gRPC status the client sees.
func statusError(err error) error {
	code, message := classify(err)
	return status.Error(code, message)
}
