// Package e2e holds kleidi's end-to-end tests: a real etcd and kube-apiserver on
// loopback, configured to encrypt Secrets through kleidi-server built from this
// checkout, exercised with client-go and checked byte for byte in etcd.
//
// It is a module of its own so that the Kubernetes test dependencies never reach
// users of the kleidi library. Run it with
//
//	cd test/e2e && go test -race -count=1 -timeout 20m -v ./...
//
// The tests need etcd and etcdctl (Debian etcd-server, etcd-client), swtpm
// (swtpm, swtpm-tools), gpg (gnupg), setpriv (util-linux) and Go; they build
// kube-apiserver once with hack/kube-apiserver.sh and cache it outside the clone.
package e2e
