// Package socket sets up the unix socket a KMS plugin listens on: a safe parent directory, the removal of a
// stale socket left by a crash, the socket's mode, and the peer credentials (SO_PEERCRED) of each connection.
package socket

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/credentials"
)

// ParseEndpoint returns the socket path of an endpoint as an EncryptionConfiguration names it:
// "unix:///run/kleidi/kms.sock" (or a plain absolute path) gives "/run/kleidi/kms.sock"; "unix:///@name" gives the
// abstract socket "@name".
func ParseEndpoint(endpoint string) (string, error) {
	path := endpoint
	if rest, ok := strings.CutPrefix(endpoint, "unix://"); ok {
		path = rest
	} else if strings.Contains(endpoint, "://") {
		return "", fmt.Errorf("endpoint %q: only unix:// is supported", endpoint)
	}
	if abstract, ok := strings.CutPrefix(path, "/@"); ok {
		path = "@" + abstract
	}
	switch {
	case path == "" || path == "@":
		return "", fmt.Errorf("endpoint %q: empty socket path", endpoint)
	case path[0] != '/' && path[0] != '@':
		return "", fmt.Errorf("endpoint %q: want unix:///absolute/path or unix:///@abstract-name", endpoint)
	}
	return path, nil
}

// Listen listens on the unix socket path with file mode mode. For a path in the file system:
//   - the parent directory is created with mode 0700 if missing; an existing one must be owned by this user or
//     root and must not be writable by others unless it is sticky (as /tmp is);
//   - a socket already at path is removed only if nothing answers on it (a crashed server's); if a server
//     answers, Listen fails; anything other than a socket at path is never removed;
//   - the socket is bound under a temporary name, given its mode, then renamed to path, so it never exists at path
//     with a looser mode. Closing the listener removes the socket.
//
// An abstract socket ("@name") has no file, hence no mode and no stale socket.
func Listen(path string, mode fs.FileMode) (net.Listener, error) {
	if strings.HasPrefix(path, "@") {
		return net.Listen("unix", path)
	}
	if !filepath.IsAbs(path) {
		return nil, fmt.Errorf("socket %s: path must be absolute", path)
	}
	if mode&^fs.ModePerm != 0 {
		return nil, fmt.Errorf("socket %s: mode %v has bits other than permissions", path, mode)
	}
	dir := filepath.Dir(path)
	if err := secureDir(dir); err != nil {
		return nil, err
	}
	if err := removeStale(path); err != nil {
		return nil, err
	}
	tmp := filepath.Join(dir, fmt.Sprintf(".%s.%d.tmp", filepath.Base(path), os.Getpid()))
	os.Remove(tmp) // a leftover of this pid's predecessor; our own name in a directory only we may write
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: tmp, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("socket %s: %w", path, err)
	}
	l.SetUnlinkOnClose(false)
	if err := os.Chmod(tmp, mode); err != nil {
		l.Close()
		os.Remove(tmp)
		return nil, fmt.Errorf("socket %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		l.Close()
		os.Remove(tmp)
		return nil, fmt.Errorf("socket %s: %w", path, err)
	}
	return &listener{UnixListener: l, path: path}, nil
}

// listener removes its socket file when closed.
type listener struct {
	*net.UnixListener
	path string
	once sync.Once
}

// Addr returns the socket's path, not the temporary name it was bound under.
func (l *listener) Addr() net.Addr { return &net.UnixAddr{Name: l.path, Net: "unix"} }

func (l *listener) Close() error {
	err := l.UnixListener.Close()
	l.once.Do(func() { os.Remove(l.path) })
	return err
}

// secureDir creates dir with mode 0700 if missing and checks that no other user can replace what is in it.
func secureDir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("socket directory: %w", err)
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("socket directory: %w", err)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !fi.IsDir() || !ok {
		return fmt.Errorf("socket directory %s is not a directory", dir)
	}
	if int(st.Uid) != os.Geteuid() && st.Uid != 0 {
		return fmt.Errorf("socket directory %s is owned by uid %d, not by this user (%d) or root", dir, st.Uid, os.Geteuid())
	}
	if fi.Mode()&0o002 != 0 && fi.Mode()&fs.ModeSticky == 0 {
		return fmt.Errorf("socket directory %s is writable by every user (mode %v)", dir, fi.Mode().Perm())
	}
	return nil
}

// removeStale removes a socket at path that nothing answers on.
func removeStale(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("socket %s: %w", path, err)
	}
	if fi.Mode().Type() != fs.ModeSocket {
		return fmt.Errorf("socket %s: a file that is not a socket is in the way; not removing it", path)
	}
	d := net.Dialer{Timeout: time.Second}
	c, err := d.DialContext(context.Background(), "unix", path)
	if err == nil {
		c.Close()
		return fmt.Errorf("socket %s: another server is listening on it", path)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("socket %s: cannot tell whether it is stale: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("socket %s: remove stale socket: %w", path, err)
	}
	return nil
}

// Cred is the identity of the process at the other end of a unix socket connection, as the kernel recorded it
// when the connection was made (SO_PEERCRED).
type Cred struct {
	UID, GID uint32
	PID      int32
}

// PeerCred reads the peer credentials of a unix socket connection.
func PeerCred(c net.Conn) (Cred, error) {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return Cred{}, fmt.Errorf("peer credentials: %T is not a unix socket connection", c)
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return Cred{}, fmt.Errorf("peer credentials: %w", err)
	}
	var uc *unix.Ucred
	var serr error
	if err := raw.Control(func(fd uintptr) { uc, serr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED) }); err != nil {
		return Cred{}, fmt.Errorf("peer credentials: %w", err)
	}
	if serr != nil {
		return Cred{}, fmt.Errorf("peer credentials: %w", serr)
	}
	return Cred{UID: uc.Uid, GID: uc.Gid, PID: uc.Pid}, nil
}

// AuthInfo is the [credentials.AuthInfo] of a connection accepted with [Credentials]. Cred is nil when the
// connection is not a unix socket.
type AuthInfo struct {
	credentials.CommonAuthInfo
	Cred *Cred
}

// AuthType implements [credentials.AuthInfo].
func (AuthInfo) AuthType() string { return "peercred" }

// Credentials returns gRPC server transport credentials that exchange nothing on the wire (a unix socket needs no
// TLS) and record the peer credentials of each connection in its [AuthInfo], where peer.FromContext finds them.
func Credentials() credentials.TransportCredentials { return peerCreds{} }

type peerCreds struct{}

func (peerCreds) ClientHandshake(_ context.Context, _ string, c net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return c, AuthInfo{CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.NoSecurity}}, nil
}

func (peerCreds) ServerHandshake(c net.Conn) (net.Conn, credentials.AuthInfo, error) {
	info := AuthInfo{CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.NoSecurity}}
	if cred, err := PeerCred(c); err == nil {
		info.Cred = &cred
	}
	return c, info, nil
}

func (peerCreds) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: "peercred"}
}

func (p peerCreds) Clone() credentials.TransportCredentials { return p }

func (peerCreds) OverrideServerName(string) error { return nil }

// String describes the credentials for logs.
func (c Cred) String() string {
	return "uid=" + strconv.FormatUint(uint64(c.UID), 10) + " gid=" + strconv.FormatUint(uint64(c.GID), 10) +
		" pid=" + strconv.FormatInt(int64(c.PID), 10)
}
