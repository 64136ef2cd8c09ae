package main

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	kmsapi "k8s.io/kms/apis/v2"
	kmsservice "k8s.io/kms/pkg/service"
)

// baselineKeyID is the key_id the baseline plugin reports: it has one key for its whole life.
const baselineKeyID = "kleidi-bench-baseline-aes-gcm"

// baselineService is the least a KMS v2 plugin can do: AES-256-GCM under one random key held in memory, no
// validation, no metrics, no key rotation, no root of trust. It is what kleidi's figures are measured beside.
type baselineService struct {
	aead cipher.AEAD
	// annotations, if not nil, are returned by every Encrypt, so every Decrypt carries them back: what a plugin
	// whose ciphertexts are self-contained costs the client, beside the same least work.
	annotations map[string][]byte
}

// annotationKey is the annotation of a baseline with annotations.
const annotationKey = "annotation.kleidi-bench.dev"

// withAnnotation makes s return one annotation of size bytes in all (its key and a random value).
func (s *baselineService) withAnnotation(size int) error {
	if size < len(annotationKey) {
		return fmt.Errorf("annotation of %d bytes: at least %d, the key's length", size, len(annotationKey))
	}
	v := make([]byte, size-len(annotationKey))
	rand.Read(v)
	s.annotations = map[string][]byte{annotationKey: v}
	return nil
}

var _ kmsservice.Service = (*baselineService)(nil)

func newBaselineService() (*baselineService, error) {
	key := make([]byte, 32)
	rand.Read(key)
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, err
	}
	return &baselineService{aead: aead}, nil
}

// Encrypt returns a random nonce followed by the AES-GCM ciphertext of plaintext.
func (s *baselineService) Encrypt(_ context.Context, _ string, plaintext []byte) (*kmsservice.EncryptResponse, error) {
	nonce := make([]byte, s.aead.NonceSize(), s.aead.NonceSize()+len(plaintext)+s.aead.Overhead())
	rand.Read(nonce)
	return &kmsservice.EncryptResponse{Ciphertext: s.aead.Seal(nonce, nonce, plaintext, nil), KeyID: baselineKeyID,
		Annotations: s.annotations}, nil
}

// Decrypt opens a ciphertext made by Encrypt.
func (s *baselineService) Decrypt(_ context.Context, _ string, req *kmsservice.DecryptRequest) ([]byte, error) {
	if req.KeyID != baselineKeyID {
		return nil, fmt.Errorf("unknown key_id %q", req.KeyID)
	}
	n := s.aead.NonceSize()
	if len(req.Ciphertext) < n {
		return nil, errors.New("ciphertext too short")
	}
	return s.aead.Open(nil, req.Ciphertext[:n], req.Ciphertext[n:], nil)
}

// Status always reports healthy with the one key_id.
func (s *baselineService) Status(context.Context) (*kmsservice.StatusResponse, error) {
	return &kmsservice.StatusResponse{Version: "v2", Healthz: "ok", KeyID: baselineKeyID}, nil
}

// socketPath returns the file path of a "unix:///path" endpoint (or of a plain path).
func socketPath(endpoint string) (string, error) {
	path, ok := strings.CutPrefix(endpoint, "unix://")
	if !ok && strings.Contains(endpoint, "://") {
		return "", fmt.Errorf("endpoint %q: want unix:///path", endpoint)
	}
	if path == "" {
		return "", fmt.Errorf("endpoint %q has no path", endpoint)
	}
	return path, nil
}

// listenUnix listens on path, first removing a socket file left there by an earlier run.
func listenUnix(path string) (net.Listener, error) {
	if fi, err := os.Lstat(path); err == nil && fi.Mode().Type() == fs.ModeSocket {
		if err := os.Remove(path); err != nil {
			return nil, err
		}
	}
	return net.Listen("unix", path)
}

// serveBaseline serves the baseline plugin on l until ctx ends, then stops gracefully. With annotationBytes > 0
// every Encrypt returns an annotation of that many bytes (key and value).
func serveBaseline(ctx context.Context, l net.Listener, timeout time.Duration, annotationBytes int) error {
	svc, err := newBaselineService()
	if err != nil {
		return err
	}
	if annotationBytes > 0 {
		if err := svc.withAnnotation(annotationBytes); err != nil {
			return err
		}
	}
	return serveService(ctx, l, timeout, svc)
}

// serveService serves svc through k8s.io/kms's GRPCService on l until ctx ends, then stops gracefully.
//
// The gRPC server is the one GRPCService.ListenAndServe builds (its only option is ConnectionTimeout); it is
// built here so the listener and the stop are under this function's control.
func serveService(ctx context.Context, l net.Listener, timeout time.Duration, svc kmsservice.Service) error {
	gs := grpc.NewServer(grpc.ConnectionTimeout(timeout))
	kmsapi.RegisterKeyManagementServiceServer(gs, kmsservice.NewGRPCService(l.Addr().String(), timeout, svc))
	errc := make(chan error, 1)
	go func() { errc <- gs.Serve(l) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
		gs.GracefulStop()
		<-errc
		return nil
	}
}
