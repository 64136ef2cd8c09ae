package server

import (
	"context"
	"errors"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/kleidi-kms/kleidi"
)

// Code returns the gRPC code the server answers err with:
//
//	malformed request, ErrInvalidCiphertext, ErrDecrypt, ErrKeyMismatch, ErrTooLarge,
//	ErrUnauthenticated (an attached key without a valid proof: forged, or another root's)  InvalidArgument
//	ErrUnknownKey                                                                       NotFound
//	ErrKeyExhausted (the active KEK reached its usage limit; the server rotates before)  ResourceExhausted
//	ErrUnwrap (the root of trust refuses the KEK)                                       FailedPrecondition
//	ErrUnavailable, ErrClosed (the root of trust is down)                               Unavailable
//	context.DeadlineExceeded, context.Canceled                                          DeadlineExceeded, Canceled
//	anything else (a bug, never a client's input)                                       Internal
func Code(err error) codes.Code {
	var inv invalid
	switch {
	case err == nil:
		return codes.OK
	case errors.As(err, &inv),
		errors.Is(err, kleidi.ErrInvalidCiphertext),
		errors.Is(err, kleidi.ErrDecrypt),
		errors.Is(err, kleidi.ErrKeyMismatch),
		errors.Is(err, kleidi.ErrUnauthenticated),
		errors.Is(err, kleidi.ErrTooLarge):
		return codes.InvalidArgument
	case errors.Is(err, kleidi.ErrUnknownKey):
		return codes.NotFound
	case errors.Is(err, kleidi.ErrKeyExhausted):
		return codes.ResourceExhausted
	// Unavailable before Unwrap: a joined error from several wrapped copies may hold both, and a root that is
	// down may well unwrap once it is back.
	case errors.Is(err, kleidi.ErrUnavailable), errors.Is(err, kleidi.ErrClosed):
		return codes.Unavailable
	case errors.Is(err, kleidi.ErrUnwrap):
		return codes.FailedPrecondition
	case errors.Is(err, context.DeadlineExceeded):
		return codes.DeadlineExceeded
	case errors.Is(err, context.Canceled):
		return codes.Canceled
	}
	if s, ok := status.FromError(err); ok {
		return s.Code()
	}
	return codes.Internal
}

// statusError turns err into the gRPC status the client sees. Its message is fixed for kleidi errors, so no
// detail of a key or a provider reaches the caller; the server logs the full error.
func statusError(err error) error {
	var inv invalid
	if errors.As(err, &inv) {
		return status.Error(codes.InvalidArgument, inv.Error())
	}
	for _, e := range []error{
		kleidi.ErrInvalidCiphertext, kleidi.ErrDecrypt, kleidi.ErrKeyMismatch, kleidi.ErrUnauthenticated, kleidi.ErrTooLarge,
		kleidi.ErrUnknownKey, kleidi.ErrKeyExhausted, kleidi.ErrUnavailable, kleidi.ErrClosed, kleidi.ErrUnwrap,
		context.DeadlineExceeded, context.Canceled,
	} {
		if errors.Is(err, e) {
			return status.Error(Code(err), e.Error())
		}
	}
	if s, ok := status.FromError(err); ok {
		return s.Err()
	}
	return status.Error(codes.Internal, "internal error (see the plugin's log)")
}
