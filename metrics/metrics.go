// Package metrics exports what a kleidi KMS plugin does as OpenTelemetry instruments, served for Prometheus.
//
// By default [New] serves them on a Prometheus page of their own ([Metrics.Handler]), with the Go runtime and
// process collectors. A program that already exports metrics (an agent with its own /metrics, an OpenTelemetry
// collector) hands New its OpenTelemetry MeterProvider ([WithMeterProvider]) or its Prometheus registerer
// ([WithRegisterer]) instead, so that kleidi's instruments appear among its own and no second page is served.
//
// The root package kleidi does not import OpenTelemetry: a [Metrics] hooks in from outside, by wrapping the
// provider ([Metrics.Provider]), intercepting gRPC calls ([Metrics.UnaryServerInterceptor]) and reading the
// Envelope's counters when Prometheus scrapes ([Metrics.Observe]).
//
// Every name starts with kleidi_, and every label takes values from a small fixed set: never an error message,
// a uid or a request id. The metrics:
//
//	kleidi_kms_requests_total{method,code}                       KMS v2 calls by method and gRPC code
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
// plus, on the default page, the Go runtime (go_*) and process (process_*) collectors. Every label value is
// lower case: method is encrypt, decrypt, status or other; code is the gRPC code in snake case (ok,
// invalid_argument, not_found, failed_precondition, unavailable, ...); outcome is one of the values of
// [kleidi.ErrorKind] (ok, unavailable, unwrap_refused, unauthenticated, ...); operation is wrap, unwrap,
// health, or, for a provider that is a [kleidi.Authenticator], prove and verify, and sign for a [kleidi.Node].
// Through a MeterProvider the names are OpenTelemetry's (kleidi.kms.requests, unit s for durations); a
// Prometheus exporter turns them into the names above.
package metrics

import (
	"context"
	"errors"
	"fmt"
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
	registry *prometheus.Registry     // the page of Handler, or nil when the program exports the metrics
	meters   *sdkmetric.MeterProvider // the provider New made, or nil for one the program gave
	meter    metric.Meter             // where every instrument is made
	regsMu   sync.Mutex               // guards regs
	regs     []metric.Registration    // the callbacks of Observe and ObserveAudit, unregistered by Shutdown

	rpcAttrs [len(kmsMethods)][codes.Unauthenticated + 2]rpcOptions // by method index and code; last: "other"

	requests         metric.Int64Counter
	requestDuration  metric.Float64Histogram
	providerOps      metric.Int64Counter
	providerDuration metric.Float64Histogram
	reloads          metric.Int64Counter
	rotations        metric.Int64Counter
}

// Option is a setting of [New].
type Option func(*options) error

type options struct {
	meterProvider metric.MeterProvider
	registerer    prometheus.Registerer
}

// WithMeterProvider makes the instruments with mp, the program's own OpenTelemetry MeterProvider, whose
// readers export them as the program chooses. [Metrics.Handler] then serves no page, and [Metrics.Shutdown]
// leaves mp running.
func WithMeterProvider(mp metric.MeterProvider) Option {
	return func(o *options) error {
		if mp == nil {
			return errors.New("metrics: WithMeterProvider(nil)")
		}
		o.meterProvider = mp
		return nil
	}
}

// WithRegisterer registers the instruments, in the Prometheus names listed in the package documentation, with
// r, the program's own Prometheus registry, which the program serves. The Go runtime and process collectors are
// the program's to register; [Metrics.Handler] serves no page.
func WithRegisterer(r prometheus.Registerer) Option {
	return func(o *options) error {
		if r == nil {
			return errors.New("metrics: WithRegisterer(nil)")
		}
		o.registerer = r
		return nil
	}
}

// New creates the instruments. Without options they are served on a Prometheus page of their own
// ([Metrics.Handler]); [WithMeterProvider] and [WithRegisterer] hand them to the program's exporter instead.
// At most one of the two is given.
func New(opts ...Option) (*Metrics, error) {
	var o options
	for _, opt := range opts {
		if err := opt(&o); err != nil {
			return nil, err
		}
	}
	if o.meterProvider != nil && o.registerer != nil {
		return nil, errors.New("metrics: both WithMeterProvider and WithRegisterer given; give one")
	}
	m := &Metrics{}
	if o.meterProvider == nil {
		registerer := o.registerer
		if registerer == nil {
			m.registry = prometheus.NewRegistry()
			m.registry.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
			registerer = m.registry
		}
		exporter, err := otelprom.New(
			otelprom.WithRegisterer(registerer),
			otelprom.WithTranslationStrategy(otlptranslator.UnderscoreEscapingWithSuffixes),
			otelprom.WithoutScopeInfo(),
			otelprom.WithoutTargetInfo(),
		)
		if err != nil {
			return nil, fmt.Errorf("metrics: %w", err)
		}
		// Exemplars link measurements to traces; there are none here, and the filter costs on every call.
		m.meters = sdkmetric.NewMeterProvider(sdkmetric.WithReader(exporter), sdkmetric.WithExemplarFilter(exemplar.AlwaysOffFilter))
		o.meterProvider = m.meters
	}
	m.meter = o.meterProvider.Meter("github.com/kleidi-kms/kleidi")
	for i, method := range kmsMethods {
		for c := range m.rpcAttrs[i] {
			attrs := metric.WithAttributeSet(attribute.NewSet(
				attribute.String("method", method), attribute.String("code", codeLabel(codes.Code(c)))))
			m.rpcAttrs[i][c] = rpcOptions{add: []metric.AddOption{attrs}, record: []metric.RecordOption{attrs}}
		}
	}
	var err error
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
	info, err := m.meter.Int64ObservableGauge("kleidi.build.info", metric.WithDescription("Build information; always 1."))
	add(err)
	if err == nil {
		build := metric.WithAttributes(attribute.String("version", kleidi.Version), attribute.String("go_version", runtime.Version()))
		add(m.register(m.meter.RegisterCallback(func(_ context.Context, o metric.Observer) error {
			o.ObserveInt64(info, 1, build)
			return nil
		}, info)))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return m, nil
}

// Handler serves the metrics in the Prometheus text format. A Metrics made with [WithMeterProvider] or
// [WithRegisterer] has no page of its own: its Handler answers 404 Not Found, since the program serves them.
func (m *Metrics) Handler() http.Handler {
	if m.registry == nil {
		return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
			http.Error(w, "kleidi metrics are exported by the program's own exporter", http.StatusNotFound)
		})
	}
	return promhttp.HandlerFor(m.registry, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError})
}

// Shutdown stops the callbacks of [Metrics.Observe] and [Metrics.ObserveAudit], and the MeterProvider that New
// made, if it made one; a MeterProvider given with [WithMeterProvider] keeps running.
func (m *Metrics) Shutdown(ctx context.Context) error {
	m.regsMu.Lock()
	regs := m.regs
	m.regs = nil
	m.regsMu.Unlock()
	var errs []error
	for _, r := range regs {
		errs = append(errs, r.Unregister())
	}
	if m.meters != nil {
		errs = append(errs, m.meters.Shutdown(ctx))
	}
	return errors.Join(errs...)
}

// register keeps a callback registration for Shutdown.
func (m *Metrics) register(r metric.Registration, err error) error {
	if err != nil {
		return err
	}
	m.regsMu.Lock()
	m.regs = append(m.regs, r)
	m.regsMu.Unlock()
	return nil
}

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
	return m.register(m.meter.RegisterCallback(func(_ context.Context, o metric.Observer) error {
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
	}, hits, misses, active, health))
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
	return m.register(m.meter.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		o.ObserveInt64(writeErrors, int64(l.WriteErrors()))
		o.ObserveInt64(lost, int64(l.LostRecords()))
		return nil
	}, writeErrors, lost))
}

// KeyringReloaded records a read of the keyring file: its error, and whether the active key changed.
func (m *Metrics) KeyringReloaded(err error, rotated bool) {
	ctx := context.Background()
	m.reloads.Add(ctx, 1, metric.WithAttributes(attribute.String("outcome", kleidi.ErrorKind(err))))
	if rotated {
		m.rotations.Add(ctx, 1)
	}
}

// kmsMethods are the method label values, by the index methodIndex gives.
var kmsMethods = [...]string{"other", "status", "encrypt", "decrypt"}

// methodIndex returns the index in kmsMethods of a gRPC method: its KMS v2 method, or 0 for anything else.
func methodIndex(fullMethod string) int {
	switch fullMethod[strings.LastIndexByte(fullMethod, '/')+1:] {
	case "Status":
		return 1
	case "Encrypt":
		return 2
	case "Decrypt":
		return 3
	}
	return 0
}

// UnaryServerInterceptor counts and times every unary gRPC call by method and code.
func (m *Metrics) UnaryServerInterceptor() grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		start := time.Now()
		resp, err := handler(ctx, req)
		o := m.rpcAttributes(methodIndex(info.FullMethod), status.Code(err))
		m.requests.Add(ctx, 1, o.add...)
		m.requestDuration.Record(ctx, time.Since(start).Seconds(), o.record...)
		return resp, err
	}
}

// codeNames are the code label values: the gRPC code names in snake case, so that every label value is lower
// case, as outcome's are. A code outside this list is "other".
var codeNames = map[codes.Code]string{
	codes.OK:                 "ok",
	codes.Canceled:           "canceled",
	codes.Unknown:            "unknown",
	codes.InvalidArgument:    "invalid_argument",
	codes.DeadlineExceeded:   "deadline_exceeded",
	codes.NotFound:           "not_found",
	codes.AlreadyExists:      "already_exists",
	codes.PermissionDenied:   "permission_denied",
	codes.ResourceExhausted:  "resource_exhausted",
	codes.FailedPrecondition: "failed_precondition",
	codes.Aborted:            "aborted",
	codes.OutOfRange:         "out_of_range",
	codes.Unimplemented:      "unimplemented",
	codes.Internal:           "internal",
	codes.Unavailable:        "unavailable",
	codes.DataLoss:           "data_loss",
	codes.Unauthenticated:    "unauthenticated",
}

// codeLabel returns the code label value of a gRPC code: its name in snake case, or "other".
func codeLabel(c codes.Code) string {
	if name, ok := codeNames[c]; ok {
		return name
	}
	return "other"
}

// rpcAttributes returns the labels of a call, built once by New for every method and code: the set of both is
// small and fixed.
func (m *Metrics) rpcAttributes(method int, code codes.Code) *rpcOptions {
	row := &m.rpcAttrs[method]
	if int(code) >= len(row)-1 {
		return &row[len(row)-1] // "other"
	}
	return &row[code]
}

// rpcOptions are the labels of a call as the instruments take them, in slices made once: a variadic argument
// made at each call would be allocated at each call.
type rpcOptions struct {
	add    []metric.AddOption
	record []metric.RecordOption
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
