//go:build cgo

package tpm

import (
	"errors"
	"sync"

	"github.com/google/go-tpm-tools/simulator"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpmutil"
)

// simMu guards simOpen: the reference simulator is a C library with global state, so a process runs one at a time.
var (
	simMu   sync.Mutex
	simOpen bool
)

// simTPM is a connection to the in-process simulator.
type simTPM struct {
	sim *simulator.Simulator
}

// openSimulator starts a freshly manufactured in-process simulator. Only one may be open per process; a second
// open fails instead of waiting.
func openSimulator() (transport.TPMCloser, error) {
	simMu.Lock()
	defer simMu.Unlock()
	if simOpen {
		return nil, errors.New("tpm: the in-process simulator is already in use (one per process)")
	}
	sim, err := simulator.Get()
	if err != nil {
		return nil, err
	}
	simOpen = true
	return &simTPM{sim: sim}, nil
}

// Send implements transport.TPM.
func (s *simTPM) Send(cmd []byte) ([]byte, error) { return tpmutil.RunCommandRaw(s.sim, cmd) }

// Close implements transport.TPMCloser. It destroys the simulated TPM and everything sealed by it.
func (s *simTPM) Close() error {
	simMu.Lock()
	defer simMu.Unlock()
	if s.sim.IsClosed() {
		return nil
	}
	simOpen = false
	return s.sim.Close()
}
