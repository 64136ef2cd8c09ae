// Package e2e holds kleidi's end-to-end tests: a real etcd and kube-apiserver on
// loopback, configured to encrypt Secrets through kleidi-server built from this
// checkout, exercised with client-go and checked byte for byte in etcd.
//
// It is a module of its own so that the Kubernetes test dependencies never reach
// users of the kleidi library. Run it with
//
//	cd test/e2e && go test -race -count=1 -timeout 20m -v ./...
//
// Each provider gets one control plane that its scenarios share, in order:
// TestKleidiGPG (an OpenPGP key made with gpg), TestKleidiTPM (a swtpm process),
// TestKleidiPKCS11 (a SoftHSM 2 token, owned by the plugin's uid) and
// TestKleidiAWSKMS (local-kms, an AWS-KMS-compatible server on loopback, with a
// symmetric key that wraps KEKs and an ECC_NIST_P256 key that signs their
// proofs). The scenarios are: Secrets encrypted at rest in etcd, the plugin
// killed with SIGKILL and restarted, kube-apiserver restarted, rotation and
// re-encryption, the keyring lost with the root of trust kept, the plugin's
// socket closed to other non-root uids, and a tampered etcd value. Each root
// that can go away here then goes away and comes back while the plugin serves:
// swtpm is killed and restarted on its socket and state, the SoftHSM token
// directory is moved away and back, local-kms is killed and restarted on the same
// port and data. Each scenario's wall time and the suite's are logged (shown with
// -v). Every process is started by the tests and stopped at their end, also on
// failure; the kernel kills them if the test binary dies.
//
// The tests need etcd and etcdctl (Debian etcd-server, etcd-client), swtpm
// (swtpm, swtpm-tools), gpg (gnupg), SoftHSM 2 (softhsm2:
// /usr/lib/softhsm/libsofthsm2.so and softhsm2-util), local-kms (go install
// github.com/nsmithuk/local-kms@v0.0.0-20260228092603-2a5e92d09ab6; found on
// PATH or in $(go env GOPATH)/bin), setpriv (util-linux), gcc for the cgo build
// of kleidi-server that the pkcs11 provider needs, and Go, and run as root so
// that the plugin can be started as a non-root uid. They build kube-apiserver
// once with hack/kube-apiserver.sh and cache it outside the clone. A missing
// component fails the test with the package to install.
//
// Environment:
//
//	KLEIDI_CACHE               cache of the kube-apiserver build (default $HOME/.cache/kleidi)
//	KLEIDI_E2E_KUBE_VERSION    Kubernetes version to build (default v1.37.2)
//	KLEIDI_E2E_KUBE_APISERVER  use this kube-apiserver binary instead of building one
//	KLEIDI_E2E_KEEP            if set, keep the temporary directories (logs, etcd data)
package e2e
