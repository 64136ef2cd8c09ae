#!/usr/bin/env bash
# See kleidi work in about a minute (plus a one-time kube-apiserver build):
# starts etcd, kube-apiserver and kleidi-server (gpg provider with a development
# key) on loopback in a temporary directory, creates a Secret, and shows the raw
# bytes etcd holds next to the value the API returns. Everything is stopped and
# removed on exit.
#
#   hack/demo.sh                  run the demo and exit
#   KLEIDI_DEMO_WAIT=1 hack/demo.sh   keep the control plane up until Ctrl-C
#   hack/demo.sh ha               the HA demo instead: three control-plane nodes, each on its own TPM (hack/demo-ha.sh)
#
# Needs: go, etcd and etcdctl (Debian etcd-server, etcd-client), openssl, curl;
# kubectl if present (otherwise curl talks to the API).
set -euo pipefail

case "${1:-}" in
"") ;;
ha) exec "$(dirname "${BASH_SOURCE[0]}")/demo-ha.sh" ;;
*) printf 'usage: hack/demo.sh [ha]\n' >&2; exit 2 ;;
esac

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bold() { if [[ -t 1 ]]; then printf '\033[1m%s\033[0m\n' "$*"; else printf '%s\n' "$*"; fi; }
step() { bold "==> $*"; }
die() { printf 'demo.sh: %s\n' "$*" >&2; exit 1; }

for tool in go etcd etcdctl openssl curl; do
	command -v "$tool" >/dev/null || die "$tool not found (Debian: etcd-server for etcd, etcd-client for etcdctl, openssl, curl; Go from go.dev)"
done

work="$(mktemp -d "${TMPDIR:-/tmp}/kleidi-demo.XXXXXX")"
pids=()
cleanup() {
	local rc=$?
	for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
		kill "${pids[i]}" 2>/dev/null || true
		for _ in $(seq 50); do kill -0 "${pids[i]}" 2>/dev/null || break; sleep 0.1; done
		kill -9 "${pids[i]}" 2>/dev/null || true
	done
	if [[ $rc -ne 0 && $rc -ne 130 ]]; then
		echo "demo.sh: failed; last lines of the logs:" >&2
		for f in "$work"/*.log; do [[ -f $f ]] && { echo "--- $f" >&2; tail -n 15 "$f" >&2; }; done
	fi
	rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
	local p
	while :; do
		p=$((20000 + RANDOM % 12000)) # below the kernel's ephemeral range (32768 and up)
		(exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; return; }
	done
}

wait_for() { # description, seconds, command...
	local what=$1 secs=$2; shift 2
	for _ in $(seq $((secs * 5))); do
		if "$@" >/dev/null 2>&1; then return 0; fi
		sleep 0.2
	done
	die "$what did not come up within ${secs}s"
}

step "building kleidi-server from $root"
(cd "$root/examples/kleidi-server" && go build -o "$work/kleidi-server" .)

step "getting kube-apiserver (built once and cached; the first build takes 6 to 11 minutes on 2 cores, with progress every 30 s)"
kas="$("$root/hack/kube-apiserver.sh")"
echo "    $kas"

sock="$work/run/kms.sock"
etcd_port=$(free_port); peer_port=$(free_port); api_port=$(free_port); http_port=$(free_port)
etcd_url="http://127.0.0.1:$etcd_port"
api="https://127.0.0.1:$api_port"
token="demo-$(openssl rand -hex 16)"

step "starting kleidi-server (gpg provider; its first start creates a development key and a keyring in $work/state)"
ks=("$work/kleidi-server")
ks_flags=(--state-dir "$work/state" --provider gpg)
"${ks[@]}" serve --listen "unix://$sock" --http-addr "127.0.0.1:$http_port" --audit-log "$work/audit.log" \
	"${ks_flags[@]}" >"$work/kleidi-server.log" 2>&1 &
pids+=($!)
wait_for "kleidi-server" 30 "${ks[@]}" status --listen "unix://$sock"
"${ks[@]}" status --listen "unix://$sock" | sed 's/^/    /'

step "starting etcd on $etcd_url"
etcd --name demo --data-dir "$work/etcd" --listen-client-urls "$etcd_url" --advertise-client-urls "$etcd_url" \
	--listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
	--initial-cluster "demo=http://127.0.0.1:$peer_port" --log-level warn >"$work/etcd.log" 2>&1 &
pids+=($!)
wait_for "etcd" 30 curl -fsS "$etcd_url/health"

step "starting kube-apiserver on $api with kleidi as its KMS v2 provider for Secrets"
cat >"$work/encryption-config.yaml" <<YAML
apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
  - resources: ["secrets"]
    providers:
      - kms:
          apiVersion: v2
          name: kleidi
          endpoint: unix://$sock
          timeout: 3s
      - identity: {}
YAML
sed 's/^/    /' "$work/encryption-config.yaml"
openssl genrsa -out "$work/sa.key" 2048 2>/dev/null
echo "$token,demo-admin,demo-admin,system:masters" >"$work/tokens.csv"
"$kas" --etcd-servers="$etcd_url" --secure-port="$api_port" --bind-address=127.0.0.1 \
	--advertise-address=127.0.0.1 --endpoint-reconciler-type=none --cert-dir="$work/certs" \
	--service-account-issuer=https://kubernetes.default.svc.cluster.local \
	--service-account-key-file="$work/sa.key" --service-account-signing-key-file="$work/sa.key" \
	--token-auth-file="$work/tokens.csv" --authorization-mode=RBAC --service-cluster-ip-range=10.96.0.0/24 \
	--encryption-provider-config="$work/encryption-config.yaml" >"$work/kube-apiserver.log" 2>&1 &
pids+=($!)
wait_for "kube-apiserver" 120 curl -fsSk -H "Authorization: Bearer $token" "$api/readyz"

value="hunter2-$(openssl rand -hex 4)"
if command -v kubectl >/dev/null; then
	kc=(kubectl --server "$api" --token "$token" --insecure-skip-tls-verify)
	step "kubectl create secret generic demo --from-literal=password=$value"
	"${kc[@]}" create secret generic demo --from-literal=password="$value" | sed 's/^/    /'
	from_api="$("${kc[@]}" get secret demo -o jsonpath='{.data.password}' | base64 -d)"
else
	step "creating Secret demo with password=$value (curl; kubectl not found)"
	b64="$(printf '%s' "$value" | base64)"
	curl -fsSk -H "Authorization: Bearer $token" -H 'Content-Type: application/json' -o /dev/null \
		-d "{\"apiVersion\":\"v1\",\"kind\":\"Secret\",\"metadata\":{\"name\":\"demo\"},\"data\":{\"password\":\"$b64\"}}" \
		"$api/api/v1/namespaces/default/secrets"
	from_api="$(curl -fsSk -H "Authorization: Bearer $token" "$api/api/v1/namespaces/default/secrets/demo" |
		sed -n 's/.*"password": *"\([^"]*\)".*/\1/p' | base64 -d)"
fi

etcdctl --endpoints "$etcd_url" get /registry/secrets/default/demo --print-value-only >"$work/raw"
step "what etcd stores under /registry/secrets/default/demo ($(wc -c <"$work/raw") bytes; first lines):"
hexdump -C "$work/raw" | head -n 12 | sed 's/^/    /'
echo "    prefix: $(head -c 22 "$work/raw")"
if grep -q -- "$value" "$work/raw"; then
	die "the plaintext is in etcd: encryption is not working"
fi
echo "    the value \"$value\" does not occur in these bytes"

step "what the API returns for the same Secret:"
echo "    password = $from_api"
[[ "$from_api" == "$value" ]] || die "the API returned $from_api, want $value"

step "kleidi's audit log of the calls the apiserver made (event, caller uid, key, outcome):"
grep '"event":"kms\.' "$work/audit.log" | tail -n 5 |
	sed -E 's/.*"event":"([^"]*)".*"caller_uid":([0-9]+).*"key_id":"([^"]*)".*"outcome":"([^"]*)".*/    \1 uid=\2 \3 \4/'

if [[ "${KLEIDI_DEMO_WAIT:-}" == 1 ]]; then
	step "control plane running; try: kubectl --server $api --token $token --insecure-skip-tls-verify get secrets"
	echo "    etcdctl --endpoints $etcd_url get /registry/secrets/default/demo --print-value-only | hexdump -C"
	echo "    press Ctrl-C to stop"
	while :; do sleep 3600; done
fi
step "done; stopping everything"
