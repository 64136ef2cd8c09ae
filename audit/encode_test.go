package audit

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"log/slog"
	"testing"
	"time"
	"unicode/utf8"
)

// TestEncodingMatchesSlog pins the encoding: a record is what slog.JSONHandler writes for the same fields, less
// the level, whatever the strings hold.
func TestEncodingMatchesSlog(t *testing.T) {
	prev := sha256.Sum256([]byte("the line before"))
	for _, uid := range []string{"plain", "", `quote " backslash \ slash /`, "tab\tnewline\ncr\r", "\x00\x01\x1f\x7f",
		"<html>&amp;", "é ünïcode ✓ 🔑", "\u2028\u2029", "bad \xff utf-8 \xc3"} {
		r := Record{Time: time.Date(2026, 11, 25, 10, 0, 0, 123456789, time.UTC), Event: EventReload, RequestUID: uid,
			Caller: &Caller{UID: 65532, GID: 7, PID: -1}, KeyID: uid + "k", Provider: "tpm", ErrorType: "Unavailable",
			Changed: true, Duration: -7 * time.Microsecond}
		got := appendPrev(appendFields(appendHead(nil, r.Time, r.Event), &r), &prev)

		rec := slog.NewRecord(r.Time, slog.LevelInfo, r.Event, 0)
		if uid != "" {
			rec.AddAttrs(slog.String("request_uid", uid))
		}
		rec.AddAttrs(slog.Uint64("caller_uid", 65532), slog.Uint64("caller_gid", 7), slog.Int64("caller_pid", -1),
			slog.String("key_id", uid+"k"), slog.String("provider", "tpm"), slog.String("outcome", "error"),
			slog.String("error_type", "Unavailable"), slog.Bool("changed", true), slog.Int64("duration_us", -7),
			slog.String("prev", hex.EncodeToString(prev[:])))
		noLevel := func(_ []string, a slog.Attr) slog.Attr {
			if a.Key == slog.LevelKey {
				return slog.Attr{}
			}
			if a.Key == slog.MessageKey {
				a.Key = "event"
			}
			return a
		}
		var want bytes.Buffer
		slog.NewJSONHandler(&want, &slog.HandlerOptions{ReplaceAttr: noLevel}).Handle(context.Background(), rec)
		if string(got) != want.String() {
			t.Errorf("request_uid %q:\n got %s\nwant %s", uid, got, want.String())
		}
	}
}

// TestEncodeAllocates nothing: a record is appended to a buffer that has room.
func TestEncodeAllocates(t *testing.T) {
	r := Record{Time: time.Now(), Event: EventDecrypt, RequestUID: "0f1e4c55-35a4-4a43-9c3c-8b3f1c0f2a9d",
		Caller: &Caller{PID: 1342}, KeyID: "kleidi-tpm-3xq7mzk2c4n5v6b7d8f9g2h3j4k5l6m7", Provider: "tpm"}
	var prev [sha256.Size]byte
	buf := make([]byte, 0, 1024)
	if n := testing.AllocsPerRun(100, func() {
		appendPrev(appendFields(appendHead(buf[:0], r.Time, r.Event), &r), &prev)
	}); n != 0 {
		t.Errorf("encoding a record allocates %v times, want 0", n)
	}
}

// FuzzAppendJSONString: any string encodes to valid JSON that decodes to the string (to its valid UTF-8 form).
func FuzzAppendJSONString(f *testing.F) {
	for _, s := range []string{"", "a", `"\`, "\x00\n", "\xff", "🔑", "\u2028"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		b := appendJSONString(nil, s)
		var got string
		if err := json.Unmarshal(b, &got); err != nil {
			t.Fatalf("appendJSONString(%q) = %s: not JSON: %v", s, b, err)
		}
		if utf8.ValidString(s) && got != s {
			t.Fatalf("appendJSONString(%q) decodes to %q", s, got)
		}
	})
}
