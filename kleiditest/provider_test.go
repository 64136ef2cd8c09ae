package kleiditest_test

import (
	"testing"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/kleiditest"
)

func TestInsecureProviderConformance(t *testing.T) {
	kleiditest.TestProvider(t, func(t *testing.T) kleidi.Provider { return kleiditest.NewInsecureProvider() },
		kleiditest.WithOutage(func(t *testing.T, p kleidi.Provider) func() {
			p.(*kleiditest.Provider).SetError(kleiditest.OpUnwrap, kleidi.ErrUnavailable)
			p.(*kleiditest.Provider).SetError(kleiditest.OpHealth, kleidi.ErrUnavailable)
			return func() {
				p.(*kleiditest.Provider).SetError(kleiditest.OpUnwrap, nil)
				p.(*kleiditest.Provider).SetError(kleiditest.OpHealth, nil)
			}
		}))
}

func TestInsecureNodeConformance(t *testing.T) {
	kleiditest.TestNode(t, func(t *testing.T) kleidi.Provider { return kleiditest.NewInsecureNode() }, kleiditest.OpenInsecureRecipient)
}
