package audit

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
)

// Errors of [Verify] and of writing a log. Each error names the file and the line; test for the kind with
// errors.Is.
var (
	// ErrTampered means a record does not carry the hash of the line before it, or a line is not a record: a
	// record was changed, removed or inserted.
	ErrTampered = errors.New("tampered record")
	// ErrCutStart means a file does not begin with its audit.open record: records were cut from its start.
	ErrCutStart = errors.New("cut start")
	// ErrCutEnd means a file does not end with the record the next file's audit.open record links to: records
	// were cut from its end, or a file between the two is missing.
	ErrCutEnd = errors.New("cut end")
	// ErrNewChain means a file begins a new chain where it should continue the file before it: the plugin
	// started on an empty file while the log it wrote before was elsewhere.
	ErrNewChain = errors.New("new chain")
	// ErrNoCheckpoint means the last file does not end with an audit.checkpoint record: the plugin stopped
	// without closing the log, or records were cut from its end.
	ErrNoCheckpoint = errors.New("ends without a checkpoint")
	// ErrWrite means the audit log could not be written ([Logger.Err]).
	ErrWrite = errors.New("audit log write failed")
)

// File is an audit log file for [Verify]: a name for messages, and its content.
type File struct {
	Name string
	R    io.Reader
}

// Report is what [Verify] found.
type Report struct {
	// Records is the number of records checked, in all files.
	Records int
	// Files describes each file checked, in order.
	Files []FileReport
	// Notes describe what is not a fault of the chain but an operator should know, each a sentence naming the
	// file and line: where a plugin stopped without closing the log (killed, or the machine stopped) and
	// records of its last moments may be missing, a torn record, records lost to write errors, a first file that
	// continues one not given, a last file still being written.
	Notes []string
}

// FileReport describes one file of a [Report].
type FileReport struct {
	Name    string
	Records int
	// Closed is true when the file ends with an audit.checkpoint record.
	Closed bool
}

// maxLine bounds a line: a record is far smaller.
const maxLine = 1 << 20

// Verify checks audit log files, oldest first, as written by a [Logger] and rotated by [Logger.Reopen]:
//
//   - every record's prev is the SHA-256 of the line before it (the first record of a later file: of the last
//     line of the file before), else [ErrTampered] names the line;
//   - every file begins with an audit.open record, else [ErrCutStart];
//   - every file but the last ends with the record the next one's audit.open record links to, else [ErrCutEnd]
//     (or [ErrNewChain] when the next one links to nothing);
//   - the last file ends with an audit.checkpoint record, else [ErrNoCheckpoint];
//   - every audit.open and audit.checkpoint record counts the lines before it in its file, else [ErrTampered].
//
// A file may hold the marks of a plugin that stopped without closing it: its last records carry no checkpoint,
// its last line may be torn (a crash while it was written), and the next plugin to open the file wrote an
// audit.open record that links past them to the last whole record. These are not faults of the chain: each is
// a note of the [Report], as are records lost to write errors, which the audit.open record after them counts.
// The first record of the first file is trusted as it is: it may link to a file that is gone.
//
// Verify returns the report of what was checked, with an error naming the first fault.
func Verify(files ...File) (Report, error) {
	v := &verifier{}
	return v.run(files)
}

// VerifyLive is [Verify] for a log a running plugin still writes: the last file need not end with a checkpoint,
// and a last line without its newline yet is not a fault. It cannot see records cut from the end of that file.
func VerifyLive(files ...File) (Report, error) {
	v := &verifier{live: true}
	return v.run(files)
}

type verifier struct {
	live bool
	rep  Report
	// The end of the file before: the hash of its last whole line, whether it has one, and whether that line
	// is a checkpoint.
	head    [sha256.Size]byte
	hasHead bool
	closed  bool
	name    string // "" before the first file
}

// line is one line of a file as the verifier remembers it.
type line struct {
	hash   [sha256.Size]byte
	size   int // without the newline
	record bool
	event  string
}

// entry is the part of a record the verifier reads.
type entry struct {
	Event   string  `json:"event"`
	Prev    string  `json:"prev"`
	Records *uint64 `json:"records"`
	Torn    int     `json:"torn_bytes"`
	Lost    uint64  `json:"lost"`
}

func (v *verifier) run(files []File) (Report, error) {
	if len(files) == 0 {
		return v.rep, errors.New("audit: no file to verify")
	}
	for i, f := range files {
		if err := v.file(f, i == len(files)-1); err != nil {
			return v.rep, err
		}
	}
	return v.rep, nil
}

func (v *verifier) note(format string, args ...any) {
	v.rep.Notes = append(v.rep.Notes, fmt.Sprintf(format, args...))
}

func (v *verifier) file(f File, last bool) error {
	fr := FileReport{Name: f.Name}
	defer func() { v.rep.Files = append(v.rep.Files, fr) }()
	br := bufio.NewReader(f.R)
	var long []byte // a line longer than br's buffer
	var (
		lines []line // the last two lines, the newest last
		n     int    // lines read
		torn  int    // length of a last line without a newline
	)
	prevLine := func(back int) *line { // the line back lines before the current one
		if back > len(lines) {
			return nil
		}
		return &lines[len(lines)-back]
	}
	for {
		b, err := br.ReadSlice('\n')
		for errors.Is(err, bufio.ErrBufferFull) {
			if len(long)+len(b) > maxLine {
				return fmt.Errorf("audit: %s line %d: %w: a line longer than %d bytes is not a record", f.Name, n+1, ErrTampered, maxLine)
			}
			long = append(long, b...)
			b, err = br.ReadSlice('\n')
			if !errors.Is(err, bufio.ErrBufferFull) {
				b, long = append(long, b...), long[:0]
			}
		}
		if err != nil && err != io.EOF {
			return fmt.Errorf("audit: read %s: %w", f.Name, err)
		}
		if len(b) == 0 {
			break
		}
		n++
		if b[len(b)-1] != '\n' { // the last line, without its newline: torn, or being written
			torn = len(b)
			break
		}
		var e entry
		content := b[:len(b)-1]
		cur := line{hash: sha256.Sum256(b), size: len(content)}
		if json.Unmarshal(content, &e) == nil && e.Event != "" && len(e.Prev) == 2*sha256.Size {
			cur.record, cur.event = true, e.Event
		}
		if !cur.record {
			if p := prevLine(1); p != nil && !p.record {
				return fmt.Errorf("audit: %s line %d: %w: not a record", f.Name, n-1, ErrTampered)
			}
			lines = append(lines[len(lines)-min(len(lines), 1):], cur)
			continue
		}
		// The line this record links to: the one before, or the one before a torn line it names.
		back := 1
		if e.Event == EventOpen && e.Torn > 0 {
			p := prevLine(1)
			if p == nil || p.size != e.Torn {
				return fmt.Errorf("audit: %s line %d: %w: it names a torn record of %d bytes before it, and line %d is not one",
					f.Name, n, ErrTampered, e.Torn, n-1)
			}
			if p.record { // whole but for its newline: not linked, so not counted
				fr.Records--
				v.rep.Records--
			}
			back = 2
		} else if p := prevLine(1); p != nil && !p.record {
			return fmt.Errorf("audit: %s line %d: %w: not a record", f.Name, n-1, ErrTampered)
		}
		if target := prevLine(back); target == nil { // the first record of the file
			if e.Event != EventOpen {
				return fmt.Errorf("audit: %s: %w: its first record (line %d, %s) is not the %s record every file begins with: records were cut from its start",
					f.Name, ErrCutStart, n, e.Event, EventOpen)
			}
			if err := v.begin(f.Name, e, n); err != nil {
				return err
			}
		} else {
			if e.Prev != hex.EncodeToString(target.hash[:]) {
				return fmt.Errorf("audit: %s line %d: %w: it does not carry the hash of line %d (chain broken): line %d was changed, or records were removed or inserted before line %d",
					f.Name, n, ErrTampered, n-back, n-back, n)
			}
			switch {
			case target.event == EventCheckpoint && e.Event != EventOpen:
				return fmt.Errorf("audit: %s line %d: %w: a %s record follows the checkpoint of line %d without an %s record",
					f.Name, n, ErrTampered, e.Event, n-back, EventOpen)
			case e.Event == EventOpen && target.event != EventCheckpoint:
				v.stopped(f.Name, n, e)
			}
		}
		if e.Event == EventOpen || e.Event == EventCheckpoint {
			if e.Records == nil || *e.Records != uint64(n-1) {
				return fmt.Errorf("audit: %s line %d: %w: its %s record counts %s lines before it, the file has %d",
					f.Name, n, ErrTampered, e.Event, count(e.Records), n-1)
			}
		}
		fr.Records++
		v.rep.Records++
		lines = append(lines[len(lines)-min(len(lines), 1):], cur)
	}
	// The end of the file.
	p := prevLine(1)
	if p != nil && !p.record {
		return fmt.Errorf("audit: %s line %d: %w: not a record", f.Name, n, ErrTampered)
	}
	if fr.Records == 0 && !(last && v.live) {
		return fmt.Errorf("audit: %s: %w: it holds no record, not even the %s record every file begins with", f.Name, ErrCutStart, EventOpen)
	}
	fr.Closed = p != nil && p.event == EventCheckpoint && torn == 0
	v.name, v.closed, v.hasHead = f.Name, fr.Closed, p != nil
	if p != nil {
		v.head = p.hash
	}
	switch {
	case last && v.live:
		if torn > 0 {
			v.note("%s line %d: %d bytes of a record being written, not checked", f.Name, n, torn)
		}
		if !fr.Closed {
			v.note("%s is still being written: records cut from its end would not be seen", f.Name)
		}
	case torn > 0:
		v.note("%s line %d: a torn record of %d bytes: the plugin stopped while writing it", f.Name, n, torn)
		if last {
			return fmt.Errorf("audit: %s %w: the plugin stopped without closing the log, or records were cut", f.Name, ErrNoCheckpoint)
		}
	case last && !fr.Closed:
		return fmt.Errorf("audit: %s %w: the plugin stopped without closing the log, or records were cut", f.Name, ErrNoCheckpoint)
	}
	return nil
}

// begin checks the first record of a file, its audit.open record at line n, against the end of the file before.
func (v *verifier) begin(name string, e entry, n int) error {
	zero := e.Prev == strings.Repeat("0", 2*sha256.Size)
	if v.name == "" {
		if !zero {
			v.note("%s line %d: the log continues an earlier file, not given", name, n)
		}
		if e.Lost > 0 {
			v.note("%s line %d: %d records could not be written (write errors) and are missing before it", name, n, e.Lost)
		}
		return nil
	}
	if !v.hasHead || e.Prev != hex.EncodeToString(v.head[:]) {
		if zero {
			return fmt.Errorf("audit: %s: %w: its %s record links to no earlier record, so it does not continue %s: the plugin started on an empty file while its log was elsewhere, or records were cut",
				name, ErrNewChain, EventOpen, v.name)
		}
		return fmt.Errorf("audit: %s: %w: it does not end with the record the %s record of %s links to: records were cut from its end, or a file between them is missing",
			v.name, ErrCutEnd, EventOpen, name)
	}
	if !v.closed {
		v.note("%s ends without a checkpoint, and %s continues from its last record: the plugin could not close it", v.name, name)
	}
	if e.Lost > 0 {
		v.note("%s line %d: %d records could not be written (write errors) and are missing before it", name, n, e.Lost)
	}
	return nil
}

// stopped notes an audit.open record at line n that does not follow a checkpoint: the plugin before stopped
// without closing the log, or could not write it.
func (v *verifier) stopped(name string, n int, e entry) {
	var b bytes.Buffer
	fmt.Fprintf(&b, "%s line %d: ", name, n)
	if e.Lost > 0 {
		fmt.Fprintf(&b, "%d records could not be written (write errors) and are missing before it", e.Lost)
	} else {
		b.WriteString("the plugin stopped without closing the log (it was killed, or the machine stopped): records of its last moments may be missing")
	}
	if e.Torn > 0 {
		fmt.Fprintf(&b, "; line %d is a torn record of %d bytes", n-1, e.Torn)
	}
	v.rep.Notes = append(v.rep.Notes, b.String())
}

func count(p *uint64) string {
	if p == nil {
		return "no"
	}
	return fmt.Sprint(*p)
}
