//go:build !cgo

package pkcs11

import (
	"context"
	"errors"
)

// errNoCgo is what every PKCS#11 operation returns in a binary built without cgo.
var errNoCgo = errors.New("pkcs11: the PKCS#11 provider needs a cgo build (this binary was built with CGO_ENABLED=0)")

// token is the PKCS#11 side of a provider; without cgo there is none.
type token struct{}

func openToken(context.Context, Config, []byte) (*token, error) { return nil, errNoCgo }

func (*token) encrypt(context.Context, []byte, []byte) ([]byte, []byte, error) {
	return nil, nil, errNoCgo
}

func (*token) decrypt(context.Context, []byte, []byte, []byte) ([]byte, error) { return nil, errNoCgo }

func (*token) sign(context.Context, []byte) ([]byte, error) { return nil, errNoCgo }

func (*token) health(context.Context) error { return errNoCgo }

func (*token) close() {}
