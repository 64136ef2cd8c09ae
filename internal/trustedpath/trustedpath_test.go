package trustedpath

import (
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// tree returns a fresh directory of mode 0700 and makes the directories of modes under it, in order.
func tree(t *testing.T, modes ...os.FileMode) []string {
	t.Helper()
	dir, err := os.MkdirTemp("", "tp")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	dirs := []string{dir}
	for i, m := range modes {
		d := filepath.Join(dirs[i], "d")
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(d, m); err != nil {
			t.Fatal(err)
		}
		dirs = append(dirs, d)
	}
	return dirs
}

func TestDir(t *testing.T) {
	cases := []struct {
		name  string
		modes []os.FileMode
		ok    bool
	}{
		{"private", []os.FileMode{0o700}, true},
		{"readable", []os.FileMode{0o755, 0o750}, true},
		{"last group-writable", []os.FileMode{0o770}, false},
		{"last world-writable and sticky", []os.FileMode{0o777 | os.ModeSticky}, false},
		{"parent world-writable", []os.FileMode{0o777, 0o700}, false},
		{"parent group-writable", []os.FileMode{0o770, 0o700}, false},
		{"parent sticky, as /tmp", []os.FileMode{0o777 | os.ModeSticky, 0o700}, true},
	}
	for _, c := range cases {
		dirs := tree(t, c.modes...)
		err := Dir(dirs[len(dirs)-1])
		if (err == nil) != c.ok || (err != nil && !errors.Is(err, ErrUntrusted)) {
			t.Errorf("%s: Dir() err = %v, want ok = %v (ErrUntrusted otherwise)", c.name, err, c.ok)
		}
	}
	if err := Dir("relative"); err == nil {
		t.Errorf("Dir(relative) err = nil, want an error")
	}
	if err := Dir("/nonexistent/kleidi"); err == nil || errors.Is(err, ErrUntrusted) {
		t.Errorf("Dir(missing) err = %v, want a not-exist error", err)
	}
}

func TestDirOwners(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to give a directory to another uid")
	}
	dirs := tree(t, 0o755, 0o700)
	if err := os.Chown(dirs[1], 65534, 65534); err != nil {
		t.Fatal(err)
	}
	if err := Dir(dirs[2]); !errors.Is(err, ErrUntrusted) {
		t.Errorf("Dir() under a directory of uid 65534 err = %v, want ErrUntrusted", err)
	}
	if err := Dir(dirs[2], 65534); err != nil {
		t.Errorf("Dir(dir, 65534) err = %v, want nil", err)
	}
}

func TestDirSymlink(t *testing.T) {
	dirs := tree(t, 0o777, 0o700) // dirs[2] sits under a world-writable directory
	safe := tree(t)
	link := filepath.Join(safe[0], "link")
	if err := os.Symlink(dirs[2], link); err != nil {
		t.Fatal(err)
	}
	if err := Dir(link); !errors.Is(err, ErrUntrusted) {
		t.Errorf("Dir(link to a directory under a world-writable one) err = %v, want ErrUntrusted", err)
	}
	// A link in a world-writable directory to a safe one: whoever may write there may point it elsewhere.
	os.Chmod(dirs[1], 0o777)
	link2 := filepath.Join(dirs[1], "link")
	if err := os.Symlink(safe[0], link2); err != nil {
		t.Fatal(err)
	}
	if err := Dir(link2); !errors.Is(err, ErrUntrusted) {
		t.Errorf("Dir(link in a world-writable directory) err = %v, want ErrUntrusted", err)
	}
}

func TestFile(t *testing.T) {
	dir := tree(t)[0]
	for mode, ok := range map[os.FileMode]bool{0o600: true, 0o644: true, 0o664: false, 0o602: false} {
		p := filepath.Join(dir, mode.String())
		os.WriteFile(p, nil, 0o600)
		os.Chmod(p, mode)
		fi, err := os.Lstat(p)
		if err != nil {
			t.Fatal(err)
		}
		if err := File(p, fi); (err == nil) != ok {
			t.Errorf("File(mode %v) err = %v, want ok = %v", mode, err, ok)
		}
	}
	fi, _ := os.Lstat(dir)
	if err := File(dir, fi); !errors.Is(err, ErrUntrusted) {
		t.Errorf("File(a directory) err = %v, want ErrUntrusted", err)
	}
	if os.Geteuid() == 0 {
		p := filepath.Join(dir, "nobody")
		os.WriteFile(p, nil, 0o600)
		os.Chown(p, 65534, 65534)
		fi, _ := os.Lstat(p)
		if err := File(p, fi); !errors.Is(err, ErrUntrusted) {
			t.Errorf("File(owned by 65534) err = %v, want ErrUntrusted", err)
		}
		if err := File(p, fi, 65534); err != nil {
			t.Errorf("File(owned by 65534, 65534) err = %v, want nil", err)
		}
	}
}

func TestMkdirAll(t *testing.T) {
	old := syscall.Umask(0)
	defer syscall.Umask(old)
	base := tree(t)[0]
	dir := filepath.Join(base, "a", "b")
	if err := MkdirAll(dir); err != nil {
		t.Fatalf("MkdirAll() err = %v, want nil", err)
	}
	for _, d := range []string{filepath.Join(base, "a"), dir} {
		if fi, err := os.Stat(d); err != nil || fi.Mode().Perm() != 0o700 {
			t.Errorf("os.Stat(%s) = %v, %v; want mode 0700 under umask 0", d, fi.Mode(), err)
		}
	}
	open := filepath.Join(base, "open")
	os.Mkdir(open, 0o777)
	if err := MkdirAll(filepath.Join(open, "new")); !errors.Is(err, ErrUntrusted) {
		t.Errorf("MkdirAll() under a world-writable directory err = %v, want ErrUntrusted", err)
	}
	if _, err := os.Lstat(filepath.Join(open, "new")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("MkdirAll() created a directory under a world-writable one")
	}
}
