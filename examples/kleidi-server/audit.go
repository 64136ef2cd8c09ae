package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/kleidi-kms/kleidi/audit"
)

// openAudit opens the audit log: a file, or standard output for "-".
func openAudit(path string, stdout io.Writer) (*audit.Logger, error) {
	if path == "-" {
		return audit.New(stdout), nil
	}
	l, err := audit.OpenFile(path)
	if err != nil {
		return nil, fmt.Errorf("--audit-log: %w", err)
	}
	return l, nil
}

// reopenOnSIGHUP reopens the audit log file on SIGHUP, for logrotate, until the returned function is called.
func reopenOnSIGHUP(l *audit.Logger, log *slog.Logger) (stop func()) {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	done := make(chan struct{})
	go func() {
		for {
			select {
			case <-hup:
				if err := l.Reopen(); err != nil {
					log.Error("reopening the audit log", "error", err)
				} else {
					log.Info("reopened the audit log")
				}
			case <-done:
				return
			}
		}
	}()
	return func() {
		signal.Stop(hup)
		close(done)
	}
}

func runVerifyAudit(_ context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("verify-audit", stderr)
	live := fs.Bool("live", false, "the last file is still being written by a running plugin: do not require its checkpoint")
	if err := fs.Parse(args); err != nil { // the arguments are files
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return errUsage
	}
	if fs.NArg() == 0 {
		return errors.New("name the audit log files to check, oldest first")
	}
	var files []audit.File
	for _, name := range fs.Args() {
		f, err := os.Open(name)
		if err != nil {
			return err
		}
		defer f.Close()
		files = append(files, audit.File{Name: name, R: f})
	}
	verify := audit.Verify
	if *live {
		verify = audit.VerifyLive
	}
	report, err := verify(files...)
	for _, f := range report.Files {
		end := "ends with a checkpoint"
		if !f.Closed {
			end = "no checkpoint"
		}
		fmt.Fprintf(stdout, "%s: %d records, %s\n", f.Name, f.Records, end)
	}
	for _, n := range report.Notes {
		fmt.Fprintf(stdout, "note: %s\n", n)
	}
	if err != nil {
		return fmt.Errorf("%d records intact, then: %w", report.Records, err)
	}
	fmt.Fprintf(stdout, "%d records in %d files, hash chain intact\n", report.Records, len(report.Files))
	return nil
}
