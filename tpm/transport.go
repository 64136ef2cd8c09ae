package tpm

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpm2/transport/linuxtpm"
)

// DefaultPath is the TPM a zero [Config] uses: the Linux kernel's resource manager.
const DefaultPath = "/dev/tpmrm0"

const (
	// ioTimeout bounds one command over a socket, so a hung TPM emulator cannot hold the provider forever.
	ioTimeout = 30 * time.Second
	// maxResponseSize bounds a response from a socket; TPM responses are a few KiB at most.
	maxResponseSize = 64 << 10
)

// transportError marks a failure to talk to the TPM (as opposed to a TPM response code): the connection is
// dropped and reopened.
type transportError struct{ err error }

func (e *transportError) Error() string { return e.err.Error() }
func (e *transportError) Unwrap() error { return e.err }

// opener opens a connection to a TPM.
type opener func() (transport.TPMCloser, error)

// newOpener returns the opener for a Config.Path, and whether a provider connects for each operation: a TPM
// emulator on a socket serves one client at a time and has no resource manager, so a provider that stayed
// connected would lock every other process out.
func newOpener(path string) (open opener, perOp bool, err error) {
	switch {
	case path == "simulator":
		return nil, false, errors.New(`tpm: path "simulator": the in-process simulator is package tpm/tpmsim: set Config.Open to tpmsim.Open`)
	case strings.HasPrefix(path, "tcp://"):
		addr := strings.TrimPrefix(path, "tcp://")
		host, port, err := net.SplitHostPort(addr)
		if err != nil {
			return nil, false, fmt.Errorf("tpm: path %q: %v", path, err)
		}
		p, err := strconv.ParseUint(port, 10, 16)
		if err != nil || p == 0 || p == 65535 {
			return nil, false, fmt.Errorf("tpm: path %q: bad port (the platform port is the next one)", path)
		}
		platform := net.JoinHostPort(host, strconv.FormatUint(p+1, 10))
		return func() (transport.TPMCloser, error) { return dialTCP(addr, platform) }, true, nil
	case strings.HasPrefix(path, "unix://"):
		sock := strings.TrimPrefix(path, "unix://")
		if sock == "" {
			return nil, false, fmt.Errorf("tpm: path %q: empty socket path", path)
		}
		return func() (transport.TPMCloser, error) { return dialUnix(sock) }, true, nil
	case strings.HasPrefix(path, "/"):
		return func() (transport.TPMCloser, error) {
			t, err := linuxtpm.Open(path)
			if errors.Is(err, os.ErrPermission) {
				return nil, fmt.Errorf("%w (is this user in the group that owns %s, usually tss?)", err, path)
			}
			return t, err
		}, false, nil
	}
	return nil, false, fmt.Errorf("tpm: path %q: want a device path (/dev/tpmrm0), tcp://host:port or unix:///path", path)
}

// socketTPM speaks to a TPM emulator over a stream socket. Over TCP it uses the TPM simulator protocol that swtpm
// and the TCG reference simulator share: TPM_SEND_COMMAND, locality, length, command; the answer is length,
// response and a 4-byte acknowledgement. Over a unix socket it sends raw commands, as swtpm's unixio server expects.
type socketTPM struct {
	conn     net.Conn
	framed   bool
	platform string // TCP only: host:port of the platform (power) port
}

const (
	simSendCommand   = 8
	platformPowerOn  = 1
	platformNVOn     = 11
	tpmHeaderSize    = 10
	simAckSize       = 4
	simCommandHeader = 4 + 1 + 4
)

func dialTCP(addr, platform string) (*socketTPM, error) {
	c, err := net.DialTimeout("tcp", addr, ioTimeout)
	if err != nil {
		return nil, err
	}
	return &socketTPM{conn: c, framed: true, platform: platform}, nil
}

func dialUnix(path string) (*socketTPM, error) {
	c, err := net.DialTimeout("unix", path, ioTimeout)
	if err != nil {
		return nil, err
	}
	return &socketTPM{conn: c}, nil
}

// Send implements transport.TPM.
func (s *socketTPM) Send(cmd []byte) ([]byte, error) {
	if err := s.conn.SetDeadline(time.Now().Add(ioTimeout)); err != nil {
		return nil, err
	}
	msg := cmd
	if s.framed {
		msg = make([]byte, 0, simCommandHeader+len(cmd))
		msg = binary.BigEndian.AppendUint32(msg, simSendCommand)
		msg = append(msg, 0) // locality 0
		msg = binary.BigEndian.AppendUint32(msg, uint32(len(cmd)))
		msg = append(msg, cmd...)
	}
	if _, err := s.conn.Write(msg); err != nil {
		return nil, err
	}
	if !s.framed {
		hdr := make([]byte, tpmHeaderSize)
		if _, err := io.ReadFull(s.conn, hdr); err != nil {
			return nil, err
		}
		n := binary.BigEndian.Uint32(hdr[2:6])
		if n < tpmHeaderSize || n > maxResponseSize {
			return nil, fmt.Errorf("tpm: response size %d out of range", n)
		}
		rsp := make([]byte, n)
		copy(rsp, hdr)
		if _, err := io.ReadFull(s.conn, rsp[tpmHeaderSize:]); err != nil {
			return nil, err
		}
		return rsp, nil
	}
	var n uint32
	if err := binary.Read(s.conn, binary.BigEndian, &n); err != nil {
		return nil, err
	}
	if n > maxResponseSize {
		return nil, fmt.Errorf("tpm: response size %d out of range", n)
	}
	rsp := make([]byte, n+simAckSize)
	if _, err := io.ReadFull(s.conn, rsp); err != nil {
		return nil, err
	}
	if n == 0 {
		return nil, errPoweredOff
	}
	return rsp[:n], nil
}

// errPoweredOff is the empty answer of a TPM simulator whose power is off.
var errPoweredOff = errors.New("the TPM simulator answered nothing (powered off?)")

// powerOn switches a TCG reference simulator on through its platform port. swtpm never needs it.
func (s *socketTPM) powerOn() error {
	c, err := net.DialTimeout("tcp", s.platform, ioTimeout)
	if err != nil {
		return err
	}
	defer c.Close()
	if err := c.SetDeadline(time.Now().Add(ioTimeout)); err != nil {
		return err
	}
	for _, cmd := range []uint32{platformPowerOn, platformNVOn} {
		if err := binary.Write(c, binary.BigEndian, cmd); err != nil {
			return err
		}
		var rc uint32
		if err := binary.Read(c, binary.BigEndian, &rc); err != nil {
			return err
		}
		if rc != 0 {
			return fmt.Errorf("tpm: platform command %d returned %d", cmd, rc)
		}
	}
	return nil
}

// Close implements transport.TPMCloser.
func (s *socketTPM) Close() error { return s.conn.Close() }
