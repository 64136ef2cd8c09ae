# One command runs every check: `make test`. CI runs it through .ci/run.
GO ?= go
STATICCHECK ?= $(shell $(GO) env GOPATH)/bin/staticcheck
# Modules of their own (their heavy dependencies never reach library users): the AWS KMS provider, the tests through
# kube-apiserver's KMS client, the end-to-end tests, and the load tool.
TEST_MODULES := $(dir $(wildcard test/*/go.mod examples/*/go.mod awskms/go.mod))

.PHONY: test lint unit e2e bench fuzz

test: lint unit e2e

lint:
	@test -z "$$(gofmt -l . | tee /dev/stderr)" || (echo "gofmt: the files above need formatting" && exit 1)
	$(GO) vet ./...
	$(STATICCHECK) ./...
	set -e; for m in $(TEST_MODULES); do (cd $$m && $(GO) vet ./... && $(STATICCHECK) ./...); done

# Unit, integration and fuzz-seed tests of the library, the providers and the server, with the race detector.
unit:
	$(GO) test -race -count=1 -timeout 15m ./...

# Tests through kube-apiserver's own KMS client (test/kmsclient), end-to-end tests against a real kube-apiserver
# and etcd (test/e2e, -v for each scenario's wall time), and the load tool's tests.
e2e:
	set -e; for m in $(TEST_MODULES); do (cd $$m && $(GO) test -race -count=1 -timeout 30m -v ./...); done

# Benchmarks of the hot path beside the bare AES-GCM floor, as recorded in BENCHMARKS.md.
bench:
	$(GO) test -run '^$$' -bench . -benchmem -count 10 . | tee bench.out

# A short run of each fuzz target of the root package.
fuzz:
	for f in FuzzParseCiphertext FuzzParseKeyring FuzzParseIdentity FuzzDecrypt; do $(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime 30s . || exit 1; done
