package audit

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"testing"
	"time"
	"unicode/utf8"
)

// TestRecordHandlerMatchesSlog pins the encoding: it is what slog.JSONHandler writes for the same record, less the
// level.
func TestRecordHandlerMatchesSlog(t *testing.T) {
	for _, uid := range []string{"plain", "", `quote " backslash \ slash /`, "tab\tnewline\ncr\r", "\x00\x01\x1f\x7f",
		"<html>&amp;", "é ünïcode ✓ 🔑", "\u2028\u2029", "bad \xff utf-8 \xc3"} {
		rec := slog.NewRecord(time.Date(2026, 11, 25, 10, 0, 0, 123456789, time.UTC), slog.LevelInfo, EventDecrypt, 0)
		rec.AddAttrs(slog.String("request_uid", uid), slog.Uint64("caller_uid", 65532), slog.Int64("duration_us", -7),
			slog.Bool("changed", true), slog.String("prev", "00ff"))
		var got, want bytes.Buffer
		if err := (&recordHandler{w: &got}).Handle(context.Background(), rec); err != nil {
			t.Fatal(err)
		}
		noLevel := func(_ []string, a slog.Attr) slog.Attr {
			if a.Key == slog.LevelKey {
				return slog.Attr{}
			}
			if a.Key == slog.MessageKey {
				a.Key = "event"
			}
			return a
		}
		slog.NewJSONHandler(&want, &slog.HandlerOptions{ReplaceAttr: noLevel}).Handle(context.Background(), rec)
		if got.String() != want.String() {
			t.Errorf("request_uid %q:\n got %s\nwant %s", uid, got.String(), want.String())
		}
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
