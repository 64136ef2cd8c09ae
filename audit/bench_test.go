package audit_test

import (
	"path/filepath"
	"testing"
	"time"

	"github.com/kleidi-kms/kleidi/audit"
)

// BenchmarkLog is the cost of one record on the RPC path: a Decrypt record as the server logs it, from parallel
// callers, to a file.
func BenchmarkLog(b *testing.B) {
	l, err := audit.OpenFile(filepath.Join(b.TempDir(), "audit.log"))
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	r := audit.Record{Event: audit.EventDecrypt, RequestUID: "0f1e4c55-35a4-4a43-9c3c-8b3f1c0f2a9d",
		Caller: &audit.Caller{UID: 0, GID: 0, PID: 1342}, KeyID: "kleidi-tpm-3xq7mzk2c4n5v6b7d8f9g2h3j4k5l6m7",
		Provider: "tpm", Duration: 87 * time.Microsecond}
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			l.Log(r)
		}
	})
}
