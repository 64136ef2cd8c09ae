package audit

import (
	"fmt"
	"io"
	"log/slog"
	"os"
	"time"

	"github.com/lmittmann/tint"
)

// NewLogHandler returns the handler of a plugin's operational log (not its audit log). format is "auto" (the
// default: tint-coloured text when w is a terminal, JSON otherwise), "text" (tint, coloured only on a terminal)
// or "json".
func NewLogHandler(w io.Writer, format string, level slog.Leveler) (slog.Handler, error) {
	terminal := isTerminal(w)
	switch format {
	case "", "auto":
		if !terminal {
			return slog.NewJSONHandler(w, &slog.HandlerOptions{Level: level}), nil
		}
	case "text":
	case "json":
		return slog.NewJSONHandler(w, &slog.HandlerOptions{Level: level}), nil
	default:
		return nil, fmt.Errorf("log format %q: want auto, text or json", format)
	}
	return tint.NewTextHandler(w, &tint.Options{Level: level, TimeFormat: time.TimeOnly, NoColor: !terminal}), nil
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}
