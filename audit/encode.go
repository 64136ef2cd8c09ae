package audit

import (
	"crypto/sha256"
	"encoding/hex"
	"strconv"
	"time"
	"unicode/utf8"
)

// The encoder of audit records: one JSON object per line, "time" and "event" first, then the fields in the order
// of the package documentation, "prev" last. It knows only the flat schema of this package and appends to the
// pending lines directly, with no reflection and no allocation: a record is written on every call. Its output is
// the JSON slog.JSONHandler writes for the same fields, without the level.

// appendHead begins a record: its time and event.
func appendHead(b []byte, t time.Time, event string) []byte {
	b = append(b, `{"time":"`...)
	b = t.AppendFormat(b, time.RFC3339Nano)
	b = append(b, `","event":`...)
	return appendJSONString(b, event)
}

// appendKey appends a field's separator and key; keys are this package's constants, which need no escaping.
func appendKey(b []byte, key string) []byte {
	b = append(b, ',', '"')
	b = append(b, key...)
	return append(b, '"', ':')
}

func appendString(b []byte, key, v string) []byte { return appendJSONString(appendKey(b, key), v) }

func appendUint(b []byte, key string, v uint64) []byte {
	return strconv.AppendUint(appendKey(b, key), v, 10)
}

func appendInt(b []byte, key string, v int64) []byte {
	return strconv.AppendInt(appendKey(b, key), v, 10)
}

func appendBool(b []byte, key string, v bool) []byte { return strconv.AppendBool(appendKey(b, key), v) }

// appendFields appends the fields of r after its head, up to prev.
func appendFields(b []byte, r *Record) []byte {
	if r.RequestUID != "" {
		b = appendString(b, "request_uid", r.RequestUID)
	}
	if c := r.Caller; c != nil {
		b = appendUint(b, "caller_uid", uint64(c.UID))
		b = appendUint(b, "caller_gid", uint64(c.GID))
		b = appendInt(b, "caller_pid", int64(c.PID))
	}
	if r.KeyID != "" {
		b = appendString(b, "key_id", r.KeyID)
	}
	if r.Provider != "" {
		b = appendString(b, "provider", r.Provider)
	}
	if r.ErrorType == "" {
		b = appendString(b, "outcome", "ok")
	} else {
		b = appendString(b, "outcome", "error")
		b = appendString(b, "error_type", r.ErrorType)
	}
	if r.Event == EventReload {
		b = appendBool(b, "changed", r.Changed)
	}
	return appendInt(b, "duration_us", r.Duration.Microseconds())
}

// appendPrev ends a record with prev, the hash of the line before it.
func appendPrev(b []byte, prev *[sha256.Size]byte) []byte {
	b = append(b, `,"prev":"`...)
	b = hex.AppendEncode(b, prev[:])
	return append(b, "\"}\n"...)
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
