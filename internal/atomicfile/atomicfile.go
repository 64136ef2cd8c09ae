// Package atomicfile writes files durably and atomically: a temporary file in the same directory, written, synced
// and given its mode and owner, then moved into place, then the directory synced. A reader sees the old content
// or the new, never a part, and a crash leaves no half-written file in place.
package atomicfile

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
)

// Options say what the file becomes.
type Options struct {
	// Mode is the file's permission bits (0600 when zero).
	Mode fs.FileMode
	// UID and GID are the owner to give the file; -1 (or both zero with Chown false) keeps the process's.
	UID, GID int
	// Chown gives the file UID and GID.
	Chown bool
	// NoReplace leaves an existing file as it is: Write then returns nil without writing (another process won).
	NoReplace bool
}

// Write writes data to path as o says.
func Write(path string, data []byte, o Options) (err error) {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".*.tmp")
	if err != nil {
		return err
	}
	defer func() {
		tmp.Close()
		os.Remove(tmp.Name()) // after a rename or a link, the name is gone or a second link: remove it either way
	}()
	mode := o.Mode
	if mode == 0 {
		mode = 0o600
	}
	if err := tmp.Chmod(mode); err != nil {
		return err
	}
	if o.Chown {
		if err := tmp.Chown(o.UID, o.GID); err != nil {
			return err
		}
	}
	if _, err := tmp.Write(data); err != nil {
		return err
	}
	if err := tmp.Sync(); err != nil {
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if o.NoReplace {
		if err := os.Link(tmp.Name(), path); err != nil && !errors.Is(err, fs.ErrExist) {
			return err
		}
	} else if err := os.Rename(tmp.Name(), path); err != nil {
		return err
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
