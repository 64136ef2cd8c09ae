package admin

import (
	"context"
	"net/http"
	"strings"
)

// PostRawForTest posts body, as is, to path through c's transport.
func PostRawForTest(ctx context.Context, c *Client, path, body string) error {
	return c.call(ctx, http.MethodPost, path, strings.NewReader(body), nil)
}
