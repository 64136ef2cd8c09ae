package server

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"time"

	"github.com/kleidi-kms/kleidi"
)

// healthy is the healthz of a plugin that works.
const healthy = "ok"

// Healthz returns the result of the last health probe: "ok", or a short reason such as
// "root of trust unavailable". It never calls the provider.
func (s *Server) Healthz() string { return *s.health.Load() }

// probe checks that the provider answers and that the active KEK encrypts and decrypts, and caches the result.
func (s *Server) probe(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, min(s.cfg.HealthInterval, s.cfg.CallTimeout))
	defer cancel()
	reason, err := s.check(ctx)
	old := s.health.Swap(&reason)
	switch {
	case old == nil && reason != healthy:
		s.log.Warn("unhealthy", "reason", reason, "error", err)
	case old != nil && *old != reason && reason == healthy:
		s.log.Info("healthy again", "was", *old)
	case old != nil && *old != reason:
		s.log.Warn("unhealthy", "reason", reason, "error", err)
	}
}

func (s *Server) check(ctx context.Context) (string, error) {
	if err := s.provider.Health(ctx); err != nil {
		switch {
		case errors.Is(err, kleidi.ErrClosed):
			return "root of trust closed", err
		case errors.Is(err, kleidi.ErrUnavailable):
			return "root of trust unavailable", err
		case errors.Is(err, context.DeadlineExceeded):
			return "root of trust health check timed out", err
		}
		return "root of trust unhealthy", err
	}
	// The active KEK is in memory; a round trip proves it works, in microseconds and without the provider.
	probe := []byte("kleidi health probe")
	c, err := s.env.Encrypt(ctx, probe, nil)
	if err == nil {
		var got []byte
		if got, err = s.env.Decrypt(ctx, c, nil); err == nil && !bytes.Equal(got, probe) {
			err = errors.New("round trip changed the data")
		}
	}
	if err != nil {
		return "active key unusable", err
	}
	// Like an audited vault, the plugin reports itself unhealthy while it cannot keep its audit trail; it keeps
	// serving, and kube-apiserver keeps writing for 3 minutes after the last healthy Status.
	if s.cfg.Audit != nil {
		if err := s.cfg.Audit.Err(); err != nil {
			return "audit log not written", err
		}
	}
	return healthy, nil
}

// backgroundLoop probes health every HealthInterval and reloads the keyring every ReloadInterval until ctx ends.
func (s *Server) backgroundLoop(ctx context.Context) {
	healthTick := time.NewTicker(s.cfg.HealthInterval)
	defer healthTick.Stop()
	var reload <-chan time.Time
	if s.cfg.ReloadInterval > 0 {
		t := time.NewTicker(s.cfg.ReloadInterval)
		defer t.Stop()
		reload = t.C
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-healthTick.C:
			s.rotateIfWorn(ctx)
			s.probe(ctx)
		case <-reload:
			s.reload(ctx)
		}
	}
}

// rotateIfWorn rotates the active KEK once it has encrypted half the messages its Envelope allows (see
// [kleidi.WithKeyUsageLimit]), well before Encrypt would refuse.
func (s *Server) rotateIfWorn(ctx context.Context) {
	st := s.env.Stats()
	if st.ActiveKeyEncryptions < st.KeyUsageLimit/2 {
		return
	}
	before := s.env.KeyID()
	id, err := s.env.Rotate(ctx)
	if err != nil {
		s.log.Error("rotating a KEK that reached half its usage limit failed", "key_id", before,
			"encryptions", st.ActiveKeyEncryptions, "limit", st.KeyUsageLimit, "error", err)
		return
	}
	s.log.Warn("rotated a KEK that reached half its usage limit", "key_id", id, "previous_key_id", before,
		"encryptions", st.ActiveKeyEncryptions, "limit", st.KeyUsageLimit)
	s.reloaded(nil, true)
}

// reloaded records a keyring reload, or a rotation of this process, in the metrics and calls OnReload.
func (s *Server) reloaded(err error, keyChanged bool) {
	if s.cfg.Metrics != nil {
		s.cfg.Metrics.KeyringReloaded(err, keyChanged)
	}
	if s.cfg.OnReload != nil {
		s.cfg.OnReload(err, keyChanged)
	}
}

// reload picks up a keyring that another process changed. On error the server keeps its current keys, which
// still work, and says so in the log.
func (s *Server) reload(ctx context.Context) {
	before := s.env.KeyID()
	ctx, cancel := context.WithTimeout(ctx, max(s.cfg.ReloadInterval, s.cfg.CallTimeout))
	defer cancel()
	err := s.env.Reload(ctx)
	after := s.env.KeyID()
	if ctx.Err() == nil {
		s.reloaded(err, after != before)
	}
	if err != nil {
		if ctx.Err() == nil {
			s.log.Error("keyring reload failed; still serving the keys loaded before", "key_id", before, "error", err)
		}
		return
	}
	if after != before {
		s.log.Info("active key changed", "key_id", after, "previous_key_id", before)
		s.probe(ctx)
	}
}

// Handler returns the plugin's HTTP endpoints, for a listener on loopback:
//
//	/livez    200 "ok" while the process runs
//	/readyz   200 "ok" when the last health probe passed, else 503 and the reason
//	/healthz  the same as /readyz
//	/metrics  the metrics in the Prometheus text format, with [Config.Metrics]
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	if s.cfg.Metrics != nil {
		mux.Handle("GET /metrics", s.cfg.Metrics.Handler())
	}
	mux.HandleFunc("GET /livez", func(w http.ResponseWriter, _ *http.Request) {
		io.WriteString(w, healthy+"\n")
	})
	ready := func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		h := s.Healthz()
		if h != healthy {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
		io.WriteString(w, h+"\n")
	}
	mux.HandleFunc("GET /readyz", ready)
	mux.HandleFunc("GET /healthz", ready)
	return mux
}
