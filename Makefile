# One command runs every check: `make test`. CI runs it through .ci/run.
GO ?= go
STATICCHECK ?= $(shell $(GO) env GOPATH)/bin/staticcheck
E2E_MODULE := test/e2e

.PHONY: test lint unit e2e bench fuzz

test: lint unit e2e

lint:
	@test -z "$$(gofmt -l . | tee /dev/stderr)" || (echo "gofmt: the files above need formatting" && exit 1)
	$(GO) vet ./...
	$(STATICCHECK) ./...

# Unit, integration and fuzz-seed tests of the library, the providers and the server, with the race detector.
unit:
	$(GO) test -race -count=1 -timeout 15m ./...

# End-to-end tests against a real kube-apiserver and etcd (a module of its own).
e2e:
	@if [ -f $(E2E_MODULE)/go.mod ]; then cd $(E2E_MODULE) && $(GO) vet ./... && $(GO) test -race -count=1 -timeout 30m ./...; fi

# Benchmarks of the hot path beside the bare AES-GCM floor, as recorded in BENCHMARKS.md.
bench:
	$(GO) test -run '^$$' -bench . -benchmem -count 10 . | tee bench.out

# A short run of each fuzz target of the root package.
fuzz:
	for f in FuzzParseCiphertext FuzzParseKeyring FuzzDecrypt; do $(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime 30s . || exit 1; done
