//go:build !cgo

package tpmsim

import (
	"errors"

	"github.com/google/go-tpm/tpm2/transport"
)

// Open fails: the in-process simulator is C code, and this binary was built with CGO_ENABLED=0.
func Open() (transport.TPMCloser, error) {
	return nil, errors.New("tpmsim: the in-process simulator needs a cgo build (this binary was built with CGO_ENABLED=0)")
}
