package kleiditest_test

import (
	"testing"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/kleiditest"
)

func TestInsecureProviderConformance(t *testing.T) {
	kleiditest.TestProvider(t, func(t *testing.T) kleidi.Provider { return kleiditest.NewInsecureProvider() })
}

func TestInsecureNodeConformance(t *testing.T) {
	kleiditest.TestNode(t, func(t *testing.T) kleidi.Provider { return kleiditest.NewInsecureNode() }, kleiditest.OpenInsecureRecipient)
}
