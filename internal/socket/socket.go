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

	"github.com/kleidi-kms/kleidi/internal/trustedpath"
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
//   - the socket's directory is created with mode 0700 if missing; it and every directory above it must be
//     owned by root or this user, and none may be writable by group or other users, except a sticky directory
//     above the socket's (as /tmp is);
//   - the socket is bound inside a fresh directory of mode 0700, given its mode there, then moved to path, so no
//     other user can connect to it before it has its mode, whatever the umask;
//   - a socket already at path is replaced only if nothing answers on it (a crashed server's); if a server
//     answers, Listen fails; anything other than a socket at path is never removed. The check and the move hold
//     a lock on the directory and the move never replaces what another process put at path meanwhile;
//   - closing the listener removes the socket, unless another socket has replaced it at path.
//
// An abstract socket ("@name") has no file, hence no mode and no stale socket: any process in the network
// namespace may connect to it, so its callers must be checked another way.
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
	path = filepath.Clean(path)
	dir := filepath.Dir(path)
	if err := secureDir(dir); err != nil {
		return nil, err
	}
	unlock, err := lockDir(dir)
	if err != nil {
		return nil, fmt.Errorf("socket %s: %w", path, err)
	}
	defer unlock()
	removeLeftovers(dir, filepath.Base(path))

	// Bound where only this user can reach it: a private directory of mode 0700 beside path.
	private, err := os.MkdirTemp(dir, privatePrefix(filepath.Base(path)))
	if err != nil {
		return nil, fmt.Errorf("socket %s: %w", path, err)
	}
	defer os.RemoveAll(private)
	if err := os.Chmod(private, 0o700); err != nil {
		return nil, fmt.Errorf("socket %s: %w", path, err)
	}
	tmp := filepath.Join(private, "s")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: tmp, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("socket %s: %w", path, err)
	}
	l.SetUnlinkOnClose(false)
	fail := func(err error) (net.Listener, error) {
		l.Close()
		return nil, fmt.Errorf("socket %s: %w", path, err)
	}
	if err := os.Chmod(tmp, mode); err != nil {
		return fail(err)
	}
	if err := removeStale(path); err != nil {
		l.Close()
		return nil, err
	}
	if testHookBeforeRename != nil {
		testHookBeforeRename()
	}
	if err := renameNoReplace(tmp, path); errors.Is(err, fs.ErrExist) {
		// Something came to path since removeStale looked: a server that answers is never replaced.
		if err := removeStale(path); err != nil {
			l.Close()
			return nil, err
		}
		if err := renameNoReplace(tmp, path); err != nil {
			return fail(err)
		}
	} else if err != nil {
		return fail(err)
	}
	fi, err := os.Lstat(path)
	if err != nil {
		return fail(err)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return fail(errors.New("no inode"))
	}
	return &listener{UnixListener: l, path: path, dev: st.Dev, ino: st.Ino}, nil
}

// privatePrefix is the name prefix of the private directories sockets named base are bound in.
func privatePrefix(base string) string { return "." + base + ".bind-" }

// removeLeftovers removes the private directories a crashed Listen left in dir. The caller holds dir's lock, so
// no other Listen is using one.
func removeLeftovers(dir, base string) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, e := range entries {
		if e.IsDir() && strings.HasPrefix(e.Name(), privatePrefix(base)) {
			os.RemoveAll(filepath.Join(dir, e.Name()))
		}
	}
}

// renameNoReplace moves from to to, failing with an error that wraps [fs.ErrExist] if to exists. On a file
// system without RENAME_NOREPLACE it falls back to a plain rename; the caller holds the directory's lock.
func renameNoReplace(from, to string) error {
	err := unix.Renameat2(unix.AT_FDCWD, from, unix.AT_FDCWD, to, unix.RENAME_NOREPLACE)
	if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOSYS) {
		return os.Rename(from, to)
	}
	if err != nil {
		return &os.LinkError{Op: "rename", Old: from, New: to, Err: err}
	}
	return nil
}

// lockDir takes an exclusive advisory lock on dir, which every Listen and Close on a socket in dir takes, so
// that two plugins starting or stopping at once never remove each other's socket.
func lockDir(dir string) (unlock func(), err error) {
	f, err := os.Open(dir)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		f.Close()
		return nil, fmt.Errorf("lock %s: %w", dir, err)
	}
	return func() { f.Close() }, nil
}

// listener removes its socket file when closed, if the file is still its own.
type listener struct {
	*net.UnixListener
	path     string
	dev, ino uint64
	once     sync.Once
}

// Addr returns the socket's path, not the temporary name it was bound under.
func (l *listener) Addr() net.Addr { return &net.UnixAddr{Name: l.path, Net: "unix"} }

func (l *listener) Close() error {
	err := l.UnixListener.Close()
	l.once.Do(func() {
		unlock, lerr := lockDir(filepath.Dir(l.path))
		if lerr != nil {
			return
		}
		defer unlock()
		fi, serr := os.Lstat(l.path)
		if serr != nil {
			return
		}
		if st, ok := fi.Sys().(*syscall.Stat_t); ok && st.Dev == l.dev && st.Ino == l.ino {
			os.Remove(l.path)
		}
	})
	return err
}

// secureDir creates dir with mode 0700 if missing and checks that no other user can replace what is in it.
func secureDir(dir string) error {
	if err := trustedpath.MkdirAll(dir); err != nil {
		return fmt.Errorf("socket directory: %w", err)
	}
	return nil
}

// removeStale removes a socket at path that nothing answers on. The caller holds the directory's lock.
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

// testHookBeforeRename, if not nil, runs in Listen just before the socket is moved to its path.
var testHookBeforeRename func()
