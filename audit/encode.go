package audit

import (
	"context"
	"io"
	"log/slog"
	"strconv"
	"time"
	"unicode/utf8"
)

// recordHandler is the slog.Handler of audit records: one JSON object per line, "time" and "event" (the record's
// message) first, then the attributes in order; no level. It knows only the flat schema of this package, which
// lets it encode a record in a fraction of slog.JSONHandler's time: an audit record is written on every call.
// Its output is the JSON slog.JSONHandler writes for the same record, without the level. It is called under
// Logger.mu, which guards buf.
type recordHandler struct {
	w   io.Writer
	buf []byte
}

func (h *recordHandler) Enabled(context.Context, slog.Level) bool { return true }

// WithAttrs and WithGroup are not used by this package; a record's attributes carry the whole schema.
func (h *recordHandler) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h *recordHandler) WithGroup(string) slog.Handler      { return h }

func (h *recordHandler) Handle(_ context.Context, r slog.Record) error {
	b := append(h.buf[:0], `{"time":"`...)
	b = r.Time.AppendFormat(b, time.RFC3339Nano)
	b = append(b, `","event":`...)
	b = appendJSONString(b, r.Message)
	r.Attrs(func(a slog.Attr) bool {
		b = append(b, ',')
		b = appendJSONString(b, a.Key)
		b = append(b, ':')
		switch v := a.Value; v.Kind() {
		case slog.KindInt64:
			b = strconv.AppendInt(b, v.Int64(), 10)
		case slog.KindUint64:
			b = strconv.AppendUint(b, v.Uint64(), 10)
		case slog.KindBool:
			b = strconv.AppendBool(b, v.Bool())
		default:
			b = appendJSONString(b, v.String())
		}
		return true
	})
	b = append(b, "}\n"...)
	h.buf = b
	_, err := h.w.Write(b)
	return err
}

const hexDigits = "0123456789abcdef"

// appendJSONString appends s as a JSON string, escaped as encoding/json escapes it (without HTML escaping):
// quote, backslash and control characters escaped, invalid UTF-8 replaced by U+FFFD, U+2028 and U+2029 escaped.
func appendJSONString(b []byte, s string) []byte {
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		if c := s[i]; c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' {
				i++
				continue
			}
			b = append(b, s[start:i]...)
			switch c {
			case '"', '\\':
				b = append(b, '\\', c)
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			default:
				b = append(b, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			b = append(b, s[start:i]...)
			b = append(b, `\ufffd`...)
			i += size
			start = i
			continue
		}
		if r == '\u2028' || r == '\u2029' {
			b = append(b, s[start:i]...)
			b = append(b, '\\', 'u', '2', '0', '2', hexDigits[r&0xf])
			i += size
			start = i
			continue
		}
		i += size
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}
