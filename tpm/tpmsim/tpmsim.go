//go:build cgo

// Package tpmsim is the in-process TPM 2.0 reference simulator as a transport for package tpm, for tests and
// demos: tpm.Config{Open: tpmsim.Open}. It is a package of its own so that a program importing package tpm does not
// link the simulator (C code, cgo builds only) unless it asks for it.
//
// The simulator is manufactured afresh at Open and destroyed at Close, so nothing it sealed survives it; a process
// runs one at a time (a second Open fails). Everything is lost at Close: never use it for real keys.
package tpmsim

import (
	"errors"
	"sync"

	"github.com/google/go-tpm-tools/simulator"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpmutil"
)

// mu guards open: the reference simulator is a C library with global state, so a process runs one at a time.
var (
	mu   sync.Mutex
	open bool
)

// TPM is a connection to the in-process simulator.
type TPM struct {
	sim *simulator.Simulator
}

// Open starts a freshly manufactured in-process simulator. Only one may be open per process; a second Open fails
// instead of waiting.
func Open() (transport.TPMCloser, error) {
	mu.Lock()
	defer mu.Unlock()
	if open {
		return nil, errors.New("tpmsim: the in-process simulator is already in use (one per process)")
	}
	sim, err := simulator.Get()
	if err != nil {
		return nil, err
	}
	open = true
	return &TPM{sim: sim}, nil
}

// Send implements transport.TPM.
func (s *TPM) Send(cmd []byte) ([]byte, error) { return tpmutil.RunCommandRaw(s.sim, cmd) }

// Reset restarts the simulator as a reboot does: PCRs and transient objects go, the seeds and NV stay.
func (s *TPM) Reset() error { return s.sim.Reset() }

// ManufactureReset clears the simulator as a new chip: new seeds, so every key sealed before is gone.
func (s *TPM) ManufactureReset() error { return s.sim.ManufactureReset() }

// Close implements transport.TPMCloser. It destroys the simulated TPM and everything sealed by it.
func (s *TPM) Close() error {
	mu.Lock()
	defer mu.Unlock()
	if s.sim.IsClosed() {
		return nil
	}
	open = false
	return s.sim.Close()
}
