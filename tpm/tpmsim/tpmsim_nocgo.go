//go:build !cgo

package tpm

import (
	"errors"

	"github.com/google/go-tpm/tpm2/transport"
)

func openSimulator() (transport.TPMCloser, error) {
	return nil, errors.New("tpm: the in-process simulator needs a cgo build (this binary was built with CGO_ENABLED=0)")
}
