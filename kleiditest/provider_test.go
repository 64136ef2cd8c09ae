package kleiditest_test

import (
	"testing"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/kleiditest"
)

func TestInsecureProviderConformance(t *testing.T) {
	kleiditest.TestProvider(t, func(t *testing.T) kleidi.Provider { return kleiditest.NewInsecureProvider() })
}
