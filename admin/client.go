package admin

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"

	"github.com/kleidi-kms/kleidi/internal/socket"
)

// Client calls a plugin's admin API.
type Client struct {
	endpoint string
	hc       *http.Client
}

// Dial returns a client of the admin socket endpoint ("unix:///run/kleidi/admin.sock" or a path). It connects on
// each call: a plugin that restarts is found again.
func Dial(endpoint string) (*Client, error) {
	path, err := socket.ParseEndpoint(endpoint)
	if err != nil {
		return nil, fmt.Errorf("admin: %w", err)
	}
	if len(path) > 0 && path[0] == '@' {
		path = "\x00" + path[1:]
	}
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
		MaxIdleConns:    1,
		IdleConnTimeout: 30 * time.Second,
	}
	return &Client{endpoint: endpoint, hc: &http.Client{Transport: tr, Timeout: 2 * time.Minute}}, nil
}

// Close closes the client's idle connections.
func (c *Client) Close() error {
	c.hc.CloseIdleConnections()
	return nil
}

// State returns the plugin's state.
func (c *Client) State(ctx context.Context) (State, error) {
	var s State
	err := c.call(ctx, http.MethodGet, "/v1/state", nil, &s)
	return s, err
}

// Keyring returns the plugin's keyring file: wrapped keys and public data only.
func (c *Client) Keyring(ctx context.Context) ([]byte, error) {
	var raw json.RawMessage
	if err := c.call(ctx, http.MethodGet, "/v1/keyring", nil, &raw); err != nil {
		return nil, err
	}
	return raw, nil
}

// Stage generates a new KEK, wraps it for every member, and stores it staged. It returns its key ID.
func (c *Client) Stage(ctx context.Context) (string, error) {
	var out keyIDBody
	err := c.call(ctx, http.MethodPost, "/v1/stage", struct{}{}, &out)
	return out.KeyID, err
}

// Activate makes the staged key id the active one. The plugin refuses a key that is not wrapped for every
// member, that it cannot unwrap, or that was retired.
func (c *Client) Activate(ctx context.Context, id string) error {
	return c.call(ctx, http.MethodPost, "/v1/activate", keyIDBody{id}, nil)
}

// Forget removes the retired key id from the node's keyring: data still under it cannot be read after. The
// plugin refuses an active or staged key.
func (c *Client) Forget(ctx context.Context, id string) error {
	return c.call(ctx, http.MethodPost, "/v1/forget", keyIDBody{id}, nil)
}

// Enroll makes the node of identity (kleidi.MarshalIdentity) a member: every KEK is wrapped for it. It returns its
// member ID.
func (c *Client) Enroll(ctx context.Context, identity []byte) (string, error) {
	var out memberBody
	err := c.call(ctx, http.MethodPost, "/v1/enroll", identityBody{identity}, &out)
	return out.MemberID, err
}

// Unenroll removes member id and rotates to a KEK it never held. It returns the new key ID.
func (c *Client) Unenroll(ctx context.Context, id string) (string, error) {
	var out keyIDBody
	err := c.call(ctx, http.MethodPost, "/v1/unenroll", memberBody{id}, &out)
	return out.KeyID, err
}

// Adopt makes keyring, published by another node, this node's keyring (see [Backend.Adopt]). trusted names the
// members a joining node may trust as its endorsers.
func (c *Client) Adopt(ctx context.Context, keyring []byte, trusted []string) error {
	return c.call(ctx, http.MethodPost, "/v1/adopt", adoptBody{Keyring: keyring, Trusted: trusted}, nil)
}

func (c *Client) call(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if r, ok := in.(io.Reader); ok { // a body already encoded
		body = r
	} else if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://kleidi-admin"+path, body)
	if err != nil {
		return err
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return &Error{Code: CodeUnavailable, Message: fmt.Sprintf("%s: %v", c.endpoint, err)}
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxBody))
	if err != nil {
		return &Error{Code: CodeUnavailable, Message: fmt.Sprintf("%s: %v", c.endpoint, err)}
	}
	if resp.StatusCode != http.StatusOK {
		var e Error
		if json.Unmarshal(b, &e) != nil || e.Code == "" {
			return &Error{Code: CodeUnavailable, Message: fmt.Sprintf("%s: HTTP %d", c.endpoint, resp.StatusCode)}
		}
		return &e
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(b, out); err != nil {
		return fmt.Errorf("admin: %s %s: %w", method, path, err)
	}
	return nil
}

// IsCode reports whether err is an [Error] with code.
func IsCode(err error, code string) bool {
	var e *Error
	return errors.As(err, &e) && e.Code == code
}
