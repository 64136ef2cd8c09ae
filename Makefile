# One command runs every check: `make test`. CI runs it through .ci/run.
GO ?= go
STATICCHECK ?= $(shell $(GO) env GOPATH)/bin/staticcheck
# Modules of their own (their heavy dependencies never reach library users): the AWS KMS provider, the operator, the
# tests through kube-apiserver's KMS client, the end-to-end tests, and the load tool.
TEST_MODULES := $(dir $(wildcard test/*/go.mod examples/*/go.mod awskms/go.mod operator/go.mod))

# Packages of the root module whose tests start real components (swtpm and the TPM simulator, SoftHSM, helm, the
# binaries, systemd units); the rest are unit tests.
INTEGRATION_PKGS := ./tpm/... ./pkcs11/... ./deploy/... ./examples/file-agent/...

.PHONY: test lint unit integration e2e bench fuzz

test: lint unit integration e2e

lint:
	@test -z "$$(gofmt -l . | tee /dev/stderr)" || (echo "gofmt: the files above need formatting" && exit 1)
	$(GO) vet ./...
	$(STATICCHECK) ./...
	set -e; for m in $(TEST_MODULES); do (cd $$m && $(GO) vet ./... && $(STATICCHECK) ./...); done
	$(MAKE) -C operator verify-generate   # the committed CRDs, deepcopy and RBAC are what the API's markers generate

# Unit and fuzz-seed tests of the library, the gpg provider and the server, with the race detector.
unit:
	$(GO) test -race -count=1 -timeout 15m $$($(GO) list ./... | grep -v -e /tpm -e /pkcs11 -e /deploy -e /examples/file-agent)

# Tests of the root module against real components: the TPM providers, PKCS#11, the deployment files, and the
# file agent's binary on 100 MiB files.
integration:
	$(GO) test -race -count=1 -timeout 15m $(INTEGRATION_PKGS)

# Tests through kube-apiserver's own KMS client (test/kmsclient), end-to-end tests against a real kube-apiserver
# and etcd (test/e2e, -v for each scenario's wall time), and the load tool's tests.
e2e:
	set -e; for m in $(TEST_MODULES); do (cd $$m && $(GO) test -race -count=1 -timeout 30m -v ./...); done

# Benchmarks of the hot path beside the bare AES-GCM floor, as recorded in BENCHMARKS.md.
bench:
	$(GO) test -run '^$$' -bench . -benchmem -count 10 . | tee bench.out

# A short run of each fuzz target of the root package.
fuzz:
	for f in FuzzParseCiphertext FuzzParseKeyring FuzzParseIdentity FuzzDecrypt FuzzOpen FuzzDecryptStream FuzzStreamRoundTrip; do $(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime 30s . || exit 1; done
	$(GO) test -run '^$$' -fuzz '^FuzzUnmarshalRequest$$' -fuzztime 30s ./server/
	$(GO) test -run '^$$' -fuzz '^FuzzAppendJSONString$$' -fuzztime 30s ./audit/
