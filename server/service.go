package server

import (
	"context"
	"log/slog"
	"runtime"
	"runtime/debug"
	"slices"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/audit"
	"github.com/kleidi-kms/kleidi/internal/socket"
)

func (s *Server) newGRPCServer() *grpc.Server {
	interceptors := append(append([]grpc.UnaryServerInterceptor{s.recoverPanic}, s.cfg.Interceptors...), s.guard)
	gs := grpc.NewServer(
		grpc.Creds(socket.Credentials()),
		grpc.ForceServerCodecV2(rawCodec{}),
		grpc.MaxRecvMsgSize(maxRecvMsgSize),
		grpc.ChainUnaryInterceptor(interceptors...),
		// Calls run on long-lived workers rather than a new goroutine each: a fresh goroutine grows its stack on
		// every call, which cost more CPU than the call's own work. gRPC starts a goroutine for a call that finds
		// every worker busy, so there is one for each call in flight up to streamWorkers.
		grpc.NumStreamWorkers(uint32(max(streamWorkers, runtime.GOMAXPROCS(0)))),
	)
	gs.RegisterService(s.serviceDesc(), s)
	return gs
}

// streamWorkers is how many calls in flight the server runs on long-lived workers: about what kube-apiserver's
// concurrent callers reach under load. Not more: the garbage collector shrinks the stack of an idle worker, which
// grows it again on its next call, so idle workers cost as much as fresh goroutines.
const streamWorkers = 16

// serviceDesc is k8s.io/kms/apis/v2's KeyManagementService with handlers that decode requests themselves: gRPC
// answers a request it cannot decode (bad wire format, invalid UTF-8 in a string) with Internal, which a
// client's bad input must never get. Here it gets InvalidArgument, through the same interceptors as any call.
// The handlers are s's: what every call of a method shares is built here, once.
func (s *Server) serviceDesc() *grpc.ServiceDesc {
	return &grpc.ServiceDesc{
		ServiceName: kmsapi.KeyManagementService_ServiceDesc.ServiceName,
		HandlerType: (*any)(nil),
		Methods: []grpc.MethodDesc{
			{MethodName: "Status", Handler: handler(s, kmsapi.KeyManagementService_Status_FullMethodName, (*Server).status)},
			{MethodName: "Decrypt", Handler: handler(s, kmsapi.KeyManagementService_Decrypt_FullMethodName, (*Server).decrypt)},
			{MethodName: "Encrypt", Handler: handler(s, kmsapi.KeyManagementService_Encrypt_FullMethodName, (*Server).encrypt)},
		},
		Metadata: kmsapi.KeyManagementService_ServiceDesc.Metadata,
	}
}

// handler decodes a request of type Req and runs method of s through the interceptors.
func handler[Req any, PReq interface {
	*Req
	proto.Message
}, Resp proto.Message](s *Server, fullMethod string, method func(*Server, context.Context, PReq) (Resp, error)) grpc.MethodHandler {
	info := &grpc.UnaryServerInfo{Server: s, FullMethod: fullMethod}
	call := func(ctx context.Context, req any) (any, error) {
		resp, err := method(s, ctx, req.(PReq))
		if err != nil {
			return nil, err // not a typed nil in an interface
		}
		return resp, nil
	}
	return func(_ any, ctx context.Context, dec func(any) error, interceptor grpc.UnaryServerInterceptor) (any, error) {
		var raw rawMessage
		if err := dec(&raw); err != nil {
			return nil, err
		}
		defer raw.buf.Free()
		req := PReq(new(Req))
		call := call
		if err := unmarshalRequest(raw.buf.ReadOnlyData(), req); err != nil { // copies what it keeps: buf is reused
			proto.Reset(req)
			call = refuseMalformed
		}
		if interceptor == nil {
			return call(ctx, req)
		}
		return interceptor(ctx, req, info, call)
	}
}

// refuseMalformed is the handler of a request that is not a valid protobuf message.
func refuseMalformed(context.Context, any) (any, error) {
	return nil, status.Error(codes.InvalidArgument, "malformed request: not a valid protobuf message")
}

// rawMessage is a request as received, decoded by the handler.
type rawMessage struct{ buf mem.Buffer }

// rawCodec is gRPC's proto codec, except that it hands a *rawMessage the bytes as they are and encodes Encrypt and
// Decrypt responses itself (marshalResponse).
type rawCodec struct{}

func (rawCodec) Marshal(v any) (mem.BufferSlice, error) {
	if b, ok := marshalResponse(v); ok {
		return mem.BufferSlice{mem.SliceBuffer(b)}, nil
	}
	return protoCodec().Marshal(v)
}

func (rawCodec) Unmarshal(data mem.BufferSlice, v any) error {
	if r, ok := v.(*rawMessage); ok {
		r.buf = data.MaterializeToBuffer(mem.DefaultBufferPool()) // from a pool, as gRPC's codec does; the handler frees it
		return nil
	}
	return protoCodec().Unmarshal(data, v)
}

func (rawCodec) Name() string { return "proto" }

func protoCodec() encoding.CodecV2 { return encoding.GetCodecV2("proto") }

func (s *Server) status(ctx context.Context, _ *kmsapi.StatusRequest) (*kmsapi.StatusResponse, error) {
	id := s.env.KeyID()
	if a := s.adoption.Load(); a == nil || a.KeyID != id {
		s.adoption.Store(&Adoption{KeyID: id, StatusAt: time.Now().UTC()})
	}
	return &kmsapi.StatusResponse{Version: APIVersion, Healthz: s.Healthz(), KeyId: id}, nil
}

// Adoption is what the kube-apiserver calling this plugin has taken up of the active key. kube-apiserver asks
// Status for the key ID about once a minute; on a new key ID it makes a new DEK and has it encrypted.
type Adoption struct {
	// KeyID is the key ID Status last reported; StatusAt is when Status first reported it.
	KeyID    string
	StatusAt time.Time
	// EncryptAt is when the first Encrypt under KeyID after StatusAt was served, or zero: then kube-apiserver
	// encrypts new data under KeyID.
	EncryptAt time.Time
}

// Adoption returns what the kube-apiserver calling this plugin has taken up of the active key; a zero Adoption
// before the first Status call.
func (s *Server) Adoption() Adoption {
	if a := s.adoption.Load(); a != nil {
		return *a
	}
	return Adoption{}
}

// noteEncrypt records the first Encrypt under the key ID Status last reported.
func (s *Server) noteEncrypt(id string) {
	a := s.adoption.Load()
	if a == nil || !a.EncryptAt.IsZero() || a.KeyID != id {
		return
	}
	next := *a
	next.EncryptAt = time.Now().UTC()
	s.adoption.CompareAndSwap(a, &next)
}

func (s *Server) encrypt(ctx context.Context, req *kmsapi.EncryptRequest) (*kmsapi.EncryptResponse, error) {
	if err := checkEncryptRequest(req); err != nil {
		return nil, err
	}
	c, err := s.env.Encrypt(ctx, req.Plaintext, nil)
	if err != nil {
		return nil, err
	}
	annotations, err := s.annotations(c.AttachedKey)
	if err != nil {
		return nil, err
	}
	resp := &kmsapi.EncryptResponse{Ciphertext: c.Bytes(), KeyId: c.KeyID(), Annotations: annotations}
	if err := checkEncryptResponse(resp); err != nil {
		// Not the client's fault: a provider whose wrapped keys break the limits. Internal, and logged.
		return nil, internalError{err}
	}
	s.noteEncrypt(resp.KeyId)
	return resp, nil
}

// encryptAnnotations are the annotations of Encrypt responses under one active key, built and checked once.
type encryptAnnotations struct {
	wrapped     []byte
	annotations map[string][]byte // read only: shared by every response under this key
}

// annotations returns the annotations carrying wrapped, the active key's wrapped form. They change only with the
// active key, so the map is built and checked once per key rather than per call.
func (s *Server) annotations(wrapped []byte) (map[string][]byte, error) {
	if len(wrapped) == 0 {
		return nil, nil
	}
	if a := s.encryptAnnotations.Load(); a != nil && len(a.wrapped) == len(wrapped) && &a.wrapped[0] == &wrapped[0] {
		return a.annotations, nil
	}
	a := &encryptAnnotations{wrapped: wrapped, annotations: map[string][]byte{AttachedKeyAnnotation: wrapped}}
	if err := checkAnnotations(a.annotations); err != nil {
		return nil, internalError{err} // a provider whose wrapped keys break the limits
	}
	s.encryptAnnotations.Store(a)
	return a.annotations, nil
}

func (s *Server) decrypt(ctx context.Context, req *kmsapi.DecryptRequest) (*kmsapi.DecryptResponse, error) {
	wrapped, err := checkDecryptRequest(req)
	if err != nil {
		return nil, err
	}
	c, err := kleidi.ParseCiphertext(req.Ciphertext)
	if err != nil {
		return nil, err
	}
	if c.KeyID() != req.KeyId {
		return nil, invalid("key_id does not match the key that encrypted the ciphertext")
	}
	c.AttachedKey = wrapped
	plaintext, err := s.env.Decrypt(ctx, c, nil)
	if err != nil {
		return nil, err
	}
	return &kmsapi.DecryptResponse{Plaintext: plaintext}, nil
}

// internalError is a failure of the server, not of the request.
type internalError struct{ err error }

func (e internalError) Error() string { return "server: " + e.err.Error() }

// recoverPanic turns a panic into Internal, so no request crashes the server.
func (s *Server) recoverPanic(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (resp any, err error) {
	defer func() {
		if r := recover(); r != nil {
			s.log.Error("panic in a KMS call", "method", info.FullMethod, "panic", r, "stack", string(debug.Stack()))
			resp, err = nil, status.Error(codes.Internal, "internal error (see the plugin's log)")
		}
	}()
	return h(ctx, req)
}

// guard is the server's own interceptor, in one piece because it runs on every call: it refuses callers outside
// AllowedUIDs, bounds the call with CallTimeout, maps errors to gRPC codes, logs failures and writes the audit
// record.
func (s *Server) guard(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	start := time.Now()
	var resp any
	var err error
	if !s.allowed(ctx) {
		err = status.Error(codes.PermissionDenied, "caller's uid is not allowed")
	} else if d, ok := ctx.Deadline(); ok && d.Sub(start) <= s.cfg.CallTimeout {
		resp, err = h(ctx, req) // the client's deadline is already the sooner one
	} else {
		tctx, cancel := context.WithTimeout(ctx, s.cfg.CallTimeout)
		resp, err = h(tctx, req)
		cancel()
	}
	code := Code(err)
	if err != nil {
		attrs := []any{"method", info.FullMethod, "code", code.String(), "error", err}
		attrs = append(attrs, callAttrs(ctx, req, resp)...)
		switch code {
		case codes.Internal, codes.Unknown:
			s.log.Error("KMS call failed", attrs...)
		case codes.Unavailable, codes.FailedPrecondition, codes.DeadlineExceeded:
			s.log.Warn("KMS call failed", attrs...)
		default:
			s.log.Info("KMS call refused", attrs...)
		}
		err = statusError(err)
	}
	if s.cfg.Audit != nil {
		s.cfg.Audit.Log(s.auditRecord(ctx, info, req, resp, code, start))
	}
	return resp, err
}

// auditEvents are the audit events of the KMS methods.
var auditEvents = map[string]string{
	"/v2.KeyManagementService/Status":  audit.EventStatus,
	"/v2.KeyManagementService/Encrypt": audit.EventEncrypt,
	"/v2.KeyManagementService/Decrypt": audit.EventDecrypt,
}

// auditRecord describes a call that began at start for the audit log. Never plaintext or key material.
func (s *Server) auditRecord(ctx context.Context, info *grpc.UnaryServerInfo, req, resp any, code codes.Code, start time.Time) audit.Record {
	end := time.Now() // the record's time: the audit log does not read the clock again
	r := audit.Record{Time: end, Event: auditEvents[info.FullMethod], Provider: s.provider.Name(), Duration: end.Sub(start)}
	if r.Event == "" {
		r.Event = "kms.other"
	}
	switch q := req.(type) {
	case *kmsapi.EncryptRequest:
		r.RequestUID = truncate(q.GetUid())
	case *kmsapi.DecryptRequest:
		r.RequestUID, r.KeyID = truncate(q.GetUid()), truncate(q.GetKeyId())
	}
	switch q := resp.(type) {
	case *kmsapi.EncryptResponse:
		r.KeyID = q.GetKeyId()
	case *kmsapi.StatusResponse:
		r.KeyID = q.GetKeyId()
	}
	if c, ok := CallerFromContext(ctx); ok {
		r.Caller = &c
	}
	if code != codes.OK {
		r.ErrorType = code.String()
	}
	return r
}

// callAttrs describes a call for the log: request uid, caller and key_id. Never plaintext or key material.
func callAttrs(ctx context.Context, req, resp any) []any {
	var attrs []any
	var uid, keyID string
	switch r := req.(type) {
	case *kmsapi.EncryptRequest:
		uid = r.GetUid()
	case *kmsapi.DecryptRequest:
		uid, keyID = r.GetUid(), r.GetKeyId()
	}
	switch r := resp.(type) {
	case *kmsapi.EncryptResponse:
		keyID = r.GetKeyId()
	case *kmsapi.StatusResponse:
		keyID = r.GetKeyId()
	}
	if uid != "" {
		attrs = append(attrs, "request_uid", truncate(uid))
	}
	if c, ok := CallerFromContext(ctx); ok {
		attrs = append(attrs, "caller", c)
	}
	if keyID != "" {
		attrs = append(attrs, "key_id", truncate(keyID))
	}
	return attrs
}

// truncate bounds a client-chosen string in a log record.
func truncate(s string) string {
	const n = 128
	if len(s) > n {
		return s[:n] + "..."
	}
	return s
}

// allowed reports whether the caller of ctx may call: any caller when AllowedUIDs is empty.
func (s *Server) allowed(ctx context.Context) bool {
	if len(s.cfg.AllowedUIDs) == 0 {
		return true
	}
	c, ok := CallerFromContext(ctx)
	return ok && slices.Contains(s.cfg.AllowedUIDs, c.UID)
}

var _ slog.LogValuer = Caller{}
