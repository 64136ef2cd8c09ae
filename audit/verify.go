package audit

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
)

// Verify checks the hash chain of an audit log: every record's prev must be the SHA-256 of the line before it.
// The first record's prev is not checked (it links to a rotated-away file, or is zero for a new log). It returns
// the number of records checked, and an error naming the first line that breaks the chain.
func Verify(r io.Reader) (int, error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	var prev []byte
	n := 0
	for sc.Scan() {
		line := sc.Bytes()
		n++
		var rec struct {
			Prev string `json:"prev"`
		}
		if err := json.Unmarshal(line, &rec); err != nil {
			return n - 1, fmt.Errorf("audit: line %d: not a record: %v", n, err)
		}
		if prev != nil {
			want := sha256.Sum256(append(prev, '\n'))
			if rec.Prev != hex.EncodeToString(want[:]) {
				return n - 1, fmt.Errorf("audit: line %d: chain broken: the line before it was changed, removed or inserted", n)
			}
		}
		prev = bytes.Clone(line)
	}
	if err := sc.Err(); err != nil {
		return n, fmt.Errorf("audit: %w", err)
	}
	return n, nil
}
