// Package e2e holds kleidi's end-to-end tests: a real etcd and kube-apiserver on
// loopback, configured to encrypt Secrets through kleidi-server built from this
// checkout, exercised with client-go and checked byte for byte in etcd.
//
// It is a module of its own so that the Kubernetes test dependencies never reach
// users of the kleidi library. Run it with
//
//	cd test/e2e && go test -race -count=1 -timeout 20m -v ./...
//
// Each provider (gpg, and tpm on a swtpm process) gets one control plane that
// its scenarios share, in order; each scenario's wall time and the suite's are
// logged (shown with -v). Every process is started by the tests and stopped at
// their end, also on failure; the kernel kills them if the test binary dies.
//
// The tests need etcd and etcdctl (Debian etcd-server, etcd-client), swtpm
// (swtpm, swtpm-tools), gpg (gnupg), setpriv (util-linux) and Go, and run as
// root so that the plugin can be started as a non-root uid. They build
// kube-apiserver once with hack/kube-apiserver.sh and cache it outside the clone.
// A missing component fails the test with the package to install.
//
// Environment:
//
//	KLEIDI_CACHE               cache of the kube-apiserver build (default $HOME/.cache/kleidi)
//	KLEIDI_E2E_KUBE_VERSION    Kubernetes version to build (default v1.37.2)
//	KLEIDI_E2E_KUBE_APISERVER  use this kube-apiserver binary instead of building one
//	KLEIDI_E2E_KEEP            if set, keep the temporary directories (logs, etcd data)
package e2e
