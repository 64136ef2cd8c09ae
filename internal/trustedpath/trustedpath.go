// Package trustedpath checks that no other user can change what a path names, as sshd's StrictModes does: every
// directory from / down to the path is owned by a trusted user (root, this process's user, or an owner the caller
// names) and is not writable by group or other unless it is sticky (as /tmp is); the last directory must not be
// writable by group or other at all.
package trustedpath

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"syscall"
)

// ErrUntrusted is wrapped by every error that reports a path another user could change.
var ErrUntrusted = errors.New("not safe from other users")

// Dir checks that dir, and every directory above it, can be changed only by root, by this process's effective
// user, or by one of owners. Symbolic links are followed, and the directories of both the path as written and the
// path it resolves to are checked. Above dir, a directory writable by group or other is accepted only if it is
// sticky and owned by root or this user; dir itself must not be writable by group or other.
func Dir(dir string, owners ...uint32) error {
	if !filepath.IsAbs(dir) {
		return fmt.Errorf("directory %s: path must be absolute", dir)
	}
	trusted := append([]uint32{0, uint32(os.Geteuid())}, owners...)
	if err := walk(filepath.Clean(dir), trusted); err != nil {
		return err
	}
	real, err := filepath.EvalSymlinks(dir)
	if err != nil {
		return fmt.Errorf("directory %s: %w", dir, err)
	}
	if real != filepath.Clean(dir) {
		return walk(real, trusted)
	}
	return nil
}

// MkdirAll creates dir, and any directory above it that is missing, with mode 0700 whatever the umask, then
// checks it as [Dir] does. What exists is checked before anything is created in it.
func MkdirAll(dir string, owners ...uint32) error {
	if !filepath.IsAbs(dir) {
		return fmt.Errorf("directory %s: path must be absolute", dir)
	}
	dir = filepath.Clean(dir)
	existing := dir
	for {
		if _, err := os.Lstat(existing); err == nil || existing == filepath.Dir(existing) {
			break
		}
		existing = filepath.Dir(existing)
	}
	if existing != dir {
		if err := Dir(existing, owners...); err != nil {
			return err
		}
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return err
		}
		for d := dir; d != existing; d = filepath.Dir(d) {
			if err := os.Chmod(d, 0o700); err != nil {
				return err
			}
		}
	}
	return Dir(dir, owners...)
}

// walk checks each prefix of the clean absolute path dir, from / down.
func walk(dir string, trusted []uint32) error {
	var prefixes []string
	for p := dir; ; p = filepath.Dir(p) {
		prefixes = append(prefixes, p)
		if p == filepath.Dir(p) {
			break
		}
	}
	slices.Reverse(prefixes)
	for i, p := range prefixes {
		fi, err := os.Stat(p)
		if err != nil {
			return fmt.Errorf("directory %s: %w", p, err)
		}
		st, ok := fi.Sys().(*syscall.Stat_t)
		if !fi.IsDir() || !ok {
			return fmt.Errorf("%s is not a directory: %w", p, ErrUntrusted)
		}
		if !slices.Contains(trusted, st.Uid) {
			return fmt.Errorf("directory %s is owned by uid %d, not by root or uid %d: %w", p, st.Uid, os.Geteuid(), ErrUntrusted)
		}
		if fi.Mode()&0o022 == 0 {
			continue
		}
		last := i == len(prefixes)-1
		sticky := fi.Mode()&fs.ModeSticky != 0 && (st.Uid == 0 || int(st.Uid) == os.Geteuid())
		if last || !sticky {
			return fmt.Errorf("directory %s is writable by group or other users (mode %v): %w", p, fi.Mode().Perm(), ErrUntrusted)
		}
	}
	return nil
}

// Owner returns the owner of path, following symbolic links.
func Owner(path string) (uid, gid uint32, err error) {
	fi, err := os.Stat(path)
	if err != nil {
		return 0, 0, err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return 0, 0, fmt.Errorf("%s: no owner", path)
	}
	return st.Uid, st.Gid, nil
}

// File checks the file fi describes: a regular file owned by root, by this process's effective user or by one of
// owners, and not writable by group or other.
func File(name string, fi fs.FileInfo, owners ...uint32) error {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !fi.Mode().IsRegular() || !ok {
		return fmt.Errorf("%s is not a regular file: %w", name, ErrUntrusted)
	}
	if st.Uid != 0 && int(st.Uid) != os.Geteuid() && !slices.Contains(owners, st.Uid) {
		return fmt.Errorf("%s is owned by uid %d, not by root or uid %d: %w", name, st.Uid, os.Geteuid(), ErrUntrusted)
	}
	if fi.Mode()&0o022 != 0 {
		return fmt.Errorf("%s is writable by group or other users (mode %v): %w", name, fi.Mode().Perm(), ErrUntrusted)
	}
	return nil
}
