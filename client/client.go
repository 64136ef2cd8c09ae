// Package client calls a Kubernetes KMS v2 plugin over its unix socket, as kube-apiserver does: kleidi's, or any
// other.
//
//	c, err := client.Dial("unix:///run/kleidi/kms.sock")
//	defer c.Close()
//	st, err := c.WaitHealthy(ctx) // a plugin that is starting: wait until it answers healthy, or ctx ends
//	resp, err := c.Encrypt(ctx, &kmsapi.EncryptRequest{Uid: uid, Plaintext: seed})
//
// Encrypt and Decrypt pass requests and responses through as they are, and return the plugin's gRPC status
// errors (test them with status.Code). Status and WaitHealthy say why no plugin answers (no socket, permission
// denied) with [ErrNoPlugin], and report an unhealthy plugin with [ErrUnhealthy].
package client

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/kleidi-kms/kleidi/internal/socket"
)

// Errors of Status and WaitHealthy; test for them with errors.Is.
var (
	// ErrNoPlugin means nothing answers on the endpoint: no socket, a socket no process serves, or one this
	// process may not open. The error says which.
	ErrNoPlugin = errors.New("no plugin answers")
	// ErrUnhealthy means the plugin answers, and its healthz is not "ok". The error holds the reason it gave.
	ErrUnhealthy = errors.New("plugin unhealthy")
)

// pollInterval is how often WaitHealthy asks a plugin that answers unhealthy again.
const pollInterval = 100 * time.Millisecond

// Client is a connection to a KMS v2 plugin. It is safe for concurrent use.
type Client struct {
	endpoint string
	path     string
	conn     *grpc.ClientConn
	kms      kmsapi.KeyManagementServiceClient
}

// Status is what a plugin's Status call returns.
type Status struct {
	// Version is the KMS API version, "v2".
	Version string
	// Healthz is "ok" or the reason the plugin is unhealthy.
	Healthz string
	// KeyID is the plugin's active key ID.
	KeyID string
}

// Healthy reports whether the plugin said it is healthy.
func (s Status) Healthy() bool { return s.Healthz == "ok" }

// Dial returns a Client of the plugin on endpoint: "unix:///path/kms.sock", "unix:///@abstract" or a plain path.
// It connects on the first call, and again after the plugin restarts; Dial fails only for an endpoint it cannot
// parse.
func Dial(endpoint string) (*Client, error) {
	path, err := socket.ParseEndpoint(endpoint)
	if err != nil {
		return nil, fmt.Errorf("client: %w", err)
	}
	target := "unix://" + path
	if abstract, ok := strings.CutPrefix(path, "@"); ok {
		target = "unix-abstract:" + abstract
	}
	bo := backoff.DefaultConfig
	bo.BaseDelay, bo.MaxDelay = 50*time.Millisecond, 500*time.Millisecond
	conn, err := grpc.NewClient(target, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: bo, MinConnectTimeout: time.Second}))
	if err != nil {
		return nil, fmt.Errorf("client: %s: %w", endpoint, err)
	}
	return &Client{endpoint: endpoint, path: path, conn: conn, kms: kmsapi.NewKeyManagementServiceClient(conn)}, nil
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// Status calls Status once. An unhealthy plugin is not an error here: see [Status.Healthy].
func (c *Client) Status(ctx context.Context) (Status, error) {
	return c.status(ctx, false)
}

// WaitHealthy calls Status until the plugin answers healthy, and returns that Status; for a plugin that is
// starting. When ctx ends first it returns the last Status the plugin gave, with an error wrapping ErrUnhealthy, or
// an error wrapping ErrNoPlugin if it never answered.
func (c *Client) WaitHealthy(ctx context.Context) (Status, error) {
	var last Status
	var lastErr error
	for {
		st, err := c.status(ctx, true)
		switch {
		case err == nil && st.Healthy():
			return st, nil
		case err == nil:
			last, lastErr = st, fmt.Errorf("%w on %s: %s", ErrUnhealthy, c.endpoint, st.Healthz)
		case ctx.Err() == nil || lastErr == nil:
			lastErr = err
		}
		select {
		case <-ctx.Done():
			return last, lastErr
		case <-time.After(pollInterval):
		}
	}
}

// status calls Status; with wait, it waits for the plugin to answer until ctx ends.
func (c *Client) status(ctx context.Context, wait bool) (Status, error) {
	resp, err := c.kms.Status(ctx, &kmsapi.StatusRequest{}, grpc.WaitForReady(wait))
	if err != nil {
		code := status.Code(err)
		if code == codes.Unavailable || (wait && code == codes.DeadlineExceeded) {
			return Status{}, c.noPlugin()
		}
		return Status{}, fmt.Errorf("status call on %s: %w", c.endpoint, err)
	}
	return Status{Version: resp.Version, Healthz: resp.Healthz, KeyID: resp.KeyId}, nil
}

// noPlugin explains why nothing answers: connecting says it (no such file, permission denied) more plainly than
// gRPC does.
func (c *Client) noPlugin() error {
	conn, err := net.DialTimeout("unix", c.path, time.Second)
	if err != nil {
		var op *net.OpError
		if errors.As(err, &op) {
			err = op.Err
		}
		return fmt.Errorf("%w on %s: %v", ErrNoPlugin, c.endpoint, err)
	}
	conn.Close()
	return fmt.Errorf("%w on %s", ErrNoPlugin, c.endpoint)
}

// Encrypt calls Encrypt with req as it is.
func (c *Client) Encrypt(ctx context.Context, req *kmsapi.EncryptRequest) (*kmsapi.EncryptResponse, error) {
	return c.kms.Encrypt(ctx, req)
}

// Decrypt calls Decrypt with req as it is.
func (c *Client) Decrypt(ctx context.Context, req *kmsapi.DecryptRequest) (*kmsapi.DecryptResponse, error) {
	return c.kms.Decrypt(ctx, req)
}
