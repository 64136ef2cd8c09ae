// Package metrics exports what a kleidi KMS plugin does as OpenTelemetry instruments, served for Prometheus.
//
// The root package kleidi does not import OpenTelemetry: a [Metrics] hooks in from outside, by wrapping the
// provider ([Metrics.Provider]), intercepting gRPC calls ([Metrics.UnaryServerInterceptor]) and reading the
// Envelope's counters when Prometheus scrapes ([Metrics.Observe]).
//
// Every name starts with kleidi_, and every label takes values from a small fixed set: never an error message,
// a uid or a request id. The metrics:
//
//	kleidi_kms_requests_total{method,code}                      KMS v2 calls by method and gRPC code
//	kleidi_kms_request_duration_seconds{method,code}            their latency (histogram)
//	kleidi_provider_operations_total{provider,operation,outcome}  wrap, unwrap, health, prove and verify calls
//	kleidi_provider_operation_duration_seconds{provider,operation,outcome}  their latency (histogram)
//	kleidi_kek_cache_hits_total                                  decryptions whose KEK was in memory
//	kleidi_kek_cache_misses_total                                decryptions that needed the provider
//	kleidi_keyring_reloads_total{outcome}                        reads of the keyring file for a rotation
//	kleidi_key_rotations_total                                   changes of the active key seen by this process
//	kleidi_active_key_info{key_id}                               1 for the active key ID
//	kleidi_healthy                                               1 while the root of trust is healthy, else 0
//	kleidi_audit_write_errors_total                              failed writes to the audit log
//	kleidi_audit_lost_records_total                              audit records dropped, never written
//	kleidi_build_info{version,go_version}                        1
//
// plus the Go runtime (go_*) and process (process_*) collectors. outcome is one of the values of [kleidi.ErrorKind]
// ("ok", "unavailable", "unwrap_refused", "unauthenticated", ...); operation is wrap, unwrap, health, or, for a
// provider that is a [kleidi.Authenticator], prove and verify.
package metrics

import (
	"context"
	"errors"
	"net/http"
	"runtime"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/prometheus/otlptranslator"
	"go.opentelemetry.io/otel/attribute"
	otelprom "go.opentelemetry.io/otel/exporters/prometheus"
	"go.opentelemetry.io/otel/metric"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/exemplar"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/audit"
)

// latencyBuckets spans a cached decryption (tens of microseconds) to the apiserver's default timeout (3 s).
var latencyBuckets = []float64{0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5}

// Metrics holds the instruments of one plugin process. It is safe for concurrent use.
type Metrics struct {
	registry *prometheus.Registry
	meters   *sdkmetric.MeterProvider
	meter    metric.Meter

	rpcAttrs sync.Map // rpcKey -> metric.MeasurementOption, built once per method and code

	requests         metric.Int64Counter
	requestDuration  metric.Float64Histogram
	providerOps      metric.Int64Counter
	providerDuration metric.Float64Histogram
	reloads          metric.Int64Counter
	rotations        metric.Int64Counter
}

// New creates the instruments and a Prometheus registry for them.
func New() (*Metrics, error) {
	registry := prometheus.NewRegistry()
	registry.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	exporter, err := otelprom.New(
		otelprom.WithRegisterer(registry),
		otelprom.WithTranslationStrategy(otlptranslator.UnderscoreEscapingWithSuffixes),
		otelprom.WithoutScopeInfo(),
		otelprom.WithoutTargetInfo(),
	)
	if err != nil {
		return nil, err
	}
	// Exemplars link measurements to traces; there are none here, and the filter costs on every call.
	m := &Metrics{registry: registry, meters: sdkmetric.NewMeterProvider(sdkmetric.WithReader(exporter),
		sdkmetric.WithExemplarFilter(exemplar.AlwaysOffFilter))}
	m.meter = m.meters.Meter("github.com/kleidi-kms/kleidi")
	buckets := metric.WithExplicitBucketBoundaries(latencyBuckets...)
	var errs []error
	add := func(err error) { errs = append(errs, err) }
	m.requests, err = m.meter.Int64Counter("kleidi.kms.requests", metric.WithDescription("KMS v2 calls by method and gRPC code."))
	add(err)
	m.requestDuration, err = m.meter.Float64Histogram("kleidi.kms.request.duration", metric.WithUnit("s"), buckets,
		metric.WithDescription("Latency of KMS v2 calls."))
	add(err)
	m.providerOps, err = m.meter.Int64Counter("kleidi.provider.operations",
		metric.WithDescription("Calls to the root of trust by operation and outcome."))
	add(err)
	m.providerDuration, err = m.meter.Float64Histogram("kleidi.provider.operation.duration", metric.WithUnit("s"), buckets,
		metric.WithDescription("Latency of calls to the root of trust."))
	add(err)
	m.reloads, err = m.meter.Int64Counter("kleidi.keyring.reloads", metric.WithDescription("Reads of the keyring file by outcome."))
	add(err)
	m.rotations, err = m.meter.Int64Counter("kleidi.key.rotations", metric.WithDescription("Changes of the active key seen by this process."))
	add(err)
	_, err = m.meter.Int64ObservableGauge("kleidi.build.info", metric.WithDescription("Build information; always 1."),
		metric.WithInt64Callback(func(_ context.Context, o metric.Int64Observer) error {
			o.Observe(1, metric.WithAttributes(attribute.String("version", kleidi.Version), attribute.String("go_version", runtime.Version())))
			return nil
		}))
	add(err)
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return m, nil
}

// Handler serves the metrics in the Prometheus text format.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.registry, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError})
}

// Shutdown stops the instruments.
func (m *Metrics) Shutdown(ctx context.Context) error { return m.meters.Shutdown(ctx) }

// Observe reports the state of e (its KEK cache counters and active key) and healthy (the cached health of the
// root of trust) at every scrape.
func (m *Metrics) Observe(e *kleidi.Envelope, healthy func() bool) error {
	hits, err := m.meter.Int64ObservableCounter("kleidi.kek.cache.hits", metric.WithDescription("Decryptions whose KEK was in memory."))
	if err != nil {
		return err
	}
	misses, err := m.meter.Int64ObservableCounter("kleidi.kek.cache.misses", metric.WithDescription("Decryptions whose KEK was not in memory."))
	if err != nil {
		return err
	}
	active, err := m.meter.Int64ObservableGauge("kleidi.active.key.info", metric.WithDescription("1 for the active key ID."))
	if err != nil {
		return err
	}
	health, err := m.meter.Int64ObservableGauge("kleidi.healthy", metric.WithDescription("1 while the root of trust is healthy, else 0."))
	if err != nil {
		return err
	}
	_, err = m.meter.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		s := e.Stats()
		o.ObserveInt64(hits, int64(s.CacheHits))
		o.ObserveInt64(misses, int64(s.CacheMisses))
		o.ObserveInt64(active, 1, metric.WithAttributes(attribute.String("key_id", e.KeyID())))
		h := int64(0)
		if healthy() {
			h = 1
		}
		o.ObserveInt64(health, h)
		return nil
	}, hits, misses, active, health)
	return err
}

// ObserveAudit reports the audit log's failed writes and lost records at every scrape.
func (m *Metrics) ObserveAudit(l *audit.Logger) error {
	writeErrors, err := m.meter.Int64ObservableCounter("kleidi.audit.write.errors",
		metric.WithDescription("Writes to the audit log that failed."))
	if err != nil {
		return err
	}
	lost, err := m.meter.Int64ObservableCounter("kleidi.audit.lost.records",
		metric.WithDescription("Audit records dropped because they could not be written."))
	if err != nil {
		return err
	}
	_, err = m.meter.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		o.ObserveInt64(writeErrors, int64(l.WriteErrors()))
		o.ObserveInt64(lost, int64(l.LostRecords()))
		return nil
	}, writeErrors, lost)
	return err
}

// KeyringReloaded records a read of the keyring file: its error, and whether the active key changed.
func (m *Metrics) KeyringReloaded(err error, rotated bool) {
	ctx := context.Background()
	m.reloads.Add(ctx, 1, metric.WithAttributes(attribute.String("outcome", kleidi.ErrorKind(err))))
	if rotated {
		m.rotations.Add(ctx, 1)
	}
}

// kmsMethods are the method label values; anything else is "other".
var kmsMethods = map[string]bool{"Status": true, "Encrypt": true, "Decrypt": true}

// UnaryServerInterceptor counts and times every unary gRPC call by method and code.
func (m *Metrics) UnaryServerInterceptor() grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		start := time.Now()
		resp, err := handler(ctx, req)
		method := info.FullMethod[strings.LastIndexByte(info.FullMethod, '/')+1:]
		if !kmsMethods[method] {
			method = "other"
		}
		attrs := m.rpcAttributes(method, status.Code(err))
		m.requests.Add(ctx, 1, attrs)
		m.requestDuration.Record(ctx, time.Since(start).Seconds(), attrs)
		return resp, err
	}
}

// rpcAttributes returns the labels of a call, built once per method and code: the set of both is small and fixed.
func (m *Metrics) rpcAttributes(method string, code codes.Code) metric.MeasurementOption {
	key := rpcKey{method, code}
	if v, ok := m.rpcAttrs.Load(key); ok {
		return v.(metric.MeasurementOption)
	}
	v, _ := m.rpcAttrs.LoadOrStore(key, metric.WithAttributeSet(attribute.NewSet(
		attribute.String("method", method), attribute.String("code", code.String()))))
	return v.(metric.MeasurementOption)
}

type rpcKey struct {
	method string
	code   codes.Code
}

// Provider returns p with every call counted and timed. If p is a [kleidi.Authenticator], so is the result, and
// its Prove and Verify calls are counted too: a Verify whose outcome is "unauthenticated" is a forged or foreign
// wrapped key that reached the plugin.
//
// If p is a [kleidi.Node] and an Authenticator, so is the result, and its Sign calls are counted too.
func (m *Metrics) Provider(p kleidi.Provider) kleidi.Provider {
	mp := &provider{Provider: p, m: m}
	auth, isAuth := p.(kleidi.Authenticator)
	node, isNode := p.(kleidi.Node)
	switch {
	case isAuth && isNode:
		return &nodeProvider{authProvider: &authProvider{provider: mp, auth: auth}, node: node}
	case isAuth:
		return &authProvider{provider: mp, auth: auth}
	}
	return mp
}

// nodeProvider is an authProvider that is also a [kleidi.Node].
type nodeProvider struct {
	*authProvider
	node kleidi.Node
}

var _ kleidi.Node = (*nodeProvider)(nil)

func (p *nodeProvider) Identity(ctx context.Context) (*kleidi.Identity, error) {
	return p.node.Identity(ctx)
}

func (p *nodeProvider) Sign(ctx context.Context, message []byte) ([]byte, error) {
	start := time.Now()
	b, err := p.node.Sign(ctx, message)
	p.record("sign", start, err)
	return b, err
}

type provider struct {
	kleidi.Provider
	m *Metrics
}

func (p *provider) record(op string, start time.Time, err error) {
	attrs := metric.WithAttributes(attribute.String("provider", p.Name()), attribute.String("operation", op),
		attribute.String("outcome", kleidi.ErrorKind(err)))
	p.m.providerOps.Add(context.Background(), 1, attrs)
	p.m.providerDuration.Record(context.Background(), time.Since(start).Seconds(), attrs)
}

func (p *provider) Wrap(ctx context.Context, key []byte) ([]byte, error) {
	start := time.Now()
	b, err := p.Provider.Wrap(ctx, key)
	p.record("wrap", start, err)
	return b, err
}

func (p *provider) Unwrap(ctx context.Context, wrapped []byte) ([]byte, error) {
	start := time.Now()
	b, err := p.Provider.Unwrap(ctx, wrapped)
	p.record("unwrap", start, err)
	return b, err
}

func (p *provider) Health(ctx context.Context) error {
	start := time.Now()
	err := p.Provider.Health(ctx)
	p.record("health", start, err)
	return err
}

// authProvider is a provider that is also a [kleidi.Authenticator].
type authProvider struct {
	*provider
	auth kleidi.Authenticator
}

var _ kleidi.Authenticator = (*authProvider)(nil)

func (p *authProvider) Prove(ctx context.Context, message []byte) ([]byte, error) {
	start := time.Now()
	b, err := p.auth.Prove(ctx, message)
	p.record("prove", start, err)
	return b, err
}

func (p *authProvider) Verify(ctx context.Context, message, proof []byte) error {
	start := time.Now()
	err := p.auth.Verify(ctx, message, proof)
	p.record("verify", start, err)
	return err
}
