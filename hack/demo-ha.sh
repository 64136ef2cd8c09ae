#!/usr/bin/env bash
# See kleidi on an HA control plane in about a minute (plus a one-time kube-apiserver build): one etcd, three
# kube-apiservers, and on each of three control-plane nodes a kleidi-server on its own TPM (a swtpm process
# manufactured with an endorsement key and its certificate, as a TPM vendor does), all on loopback in a temporary
# directory. It runs the commands of docs/install.md "HA control plane with TPMs": one keyring shared by
# enrollment, Secrets written through one apiserver and read through the others, a coordinated rotation with
# re-encryption under read traffic, a node whose TPM is cleared joining again, and every TPM cleared and the
# cluster recovered with the offline recovery key. Everything is stopped and removed on exit.
#
#   hack/demo.sh ha                    run the demo and exit (or hack/demo-ha.sh)
#   KLEIDI_DEMO_WAIT=1 hack/demo.sh ha keep the control plane up until Ctrl-C
#   KLEIDI_DEMO_SERVER=PATH            use this kleidi-server binary instead of building one from the checkout
#   KLEIDI_DEMO_KEEP=1                 keep the temporary directory (logs, states) after the demo
#
# Needs: go, etcd and etcdctl (Debian etcd-server, etcd-client), swtpm and swtpm_setup (swtpm, swtpm-tools), gpg
# (gnupg), openssl, curl, and setpriv (util-linux) when run as root: the plugins then run as uid 65532, as on a
# node. kube-apiserver, and kubectl when it is missing, are built once with hack/k8s-binary.sh and cached.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bold() { if [[ -t 1 ]]; then printf '\033[1m%s\033[0m\n' "$*"; else printf '%s\n' "$*"; fi; }
die() { printf 'demo-ha.sh: %s\n' "$*" >&2; exit 1; }
started=$SECONDS
stepno=0
step() { # title: a numbered step with the time since the start
	stepno=$((stepno + 1))
	echo
	bold "==> $stepno. $* [$((SECONDS - started)) s]"
}
say() { printf '    %s\n' "$@"; }
indent() { sed -e "s|${work:-/nonexistent}/||g" -e 's/^/      /'; }

need=(go etcd etcdctl swtpm swtpm_setup swtpm_localca gpg gpgconf openssl curl sha256sum)
[[ $(id -u) -eq 0 ]] && need+=(setpriv)
for tool in "${need[@]}"; do
	command -v "$tool" >/dev/null || die "$tool not found (Debian: etcd-server, etcd-client, swtpm, swtpm-tools, gnupg, openssl, curl, util-linux; Go from go.dev)"
done

work="$(mktemp -d "${TMPDIR:-/tmp}/kleidi-ha.XXXXXX")"
chmod 0711 "$work" # the plugins' uid traverses it to reach their state directories
# rel prints its arguments with the temporary directory left out, so that commands read as they would on a node.
rel() { local s="$*"; printf '%s' "${s//$work\//}"; }

# Processes by role, so that single ones can be stopped and started again; cleanup stops them all.
declare -A pid=()
stop() { # role...
	local r p
	for r in "$@"; do
		p="${pid[$r]:-}"
		[[ -n $p ]] || continue
		kill "$p" 2>/dev/null || true
		for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
		kill -9 "$p" 2>/dev/null || true
		wait "$p" 2>/dev/null || true
		unset "pid[$r]"
	done
}
cleanup() {
	local rc=$?
	[[ -f $work/reader.stop ]] || touch "$work/reader.stop" 2>/dev/null || true
	local roles=(reader api1 api2 api3 kleidi1 kleidi2 kleidi3 tpm1 tpm2 tpm3 etcd)
	for r in "${roles[@]}"; do stop "$r"; done
	[[ -d $work/gnupg ]] && GNUPGHOME="$work/gnupg" gpgconf --kill all 2>/dev/null || true
	if [[ $rc -ne 0 && $rc -ne 130 ]]; then
		echo "demo-ha.sh: failed; last lines of the logs:" >&2
		for f in "$work"/etcd.log "$work"/cp*/kleidi-server.log "$work"/cp*/kube-apiserver.log "$work"/cp*/swtpm.log; do
			[[ -f $f ]] && { echo "--- $(rel "$f")" >&2; tail -n 8 "$f" >&2; }
		done
	fi
	if [[ ${KLEIDI_DEMO_KEEP:-} == 1 ]]; then echo "demo-ha.sh: kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# free_port sets PORT to a port below the kernel's ephemeral range (32768 and up), so that no outgoing connection holds it,
# that nothing listens on and that this script has not handed out before.
ports=" "
free_port() {
	local p
	while :; do
		p=$((20000 + RANDOM % 12000))
		[[ $ports != *" $p "* ]] || continue
		(exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null && continue
		ports+="$p "
		PORT=$p
		return
	done
}

wait_for() { # description, seconds, command...
	local what=$1 secs=$2; shift 2
	for _ in $(seq $((secs * 5))); do
		if "$@" >/dev/null 2>&1; then return 0; fi
		sleep 0.2
	done
	die "$what did not happen within ${secs}s"
}

# The plugins run as 65532 (the deploy/ manifests' uid) when the demo runs as root, else as the caller.
if [[ $(id -u) -eq 0 ]]; then
	uid=65532
	asuid=(setpriv --reuid=$uid --regid=$uid --clear-groups --pdeathsig=KILL --)
else
	uid=$(id -u)
	asuid=()
fi
own() { [[ $(id -u) -ne 0 ]] || chown "$uid:$uid" "$@"; }

bold "kleidi on an HA control plane: three nodes, each with its own TPM (temporary directory $work)"
say "Paths below are relative to that directory. Each node cpN has its own flags \$FN; on a real node they are" \
	"F=\"--state-dir /var/lib/kleidi --provider tpm --tpm /dev/tpmrm0 --tpm-pcrs 7 --recovery-key /etc/kleidi/recovery.pub.asc\"" \
	"and every kleidi-server command runs as the plugin's user (uid $uid here)."

step "building kleidi-server and getting kube-apiserver and kubectl"
if [[ -n ${KLEIDI_DEMO_SERVER:-} ]]; then
	install -m 0755 "$KLEIDI_DEMO_SERVER" "$work/kleidi-server"
	say "kleidi-server: $KLEIDI_DEMO_SERVER"
else
	say "\$ go -C examples/kleidi-server build -o kleidi-server ."
	go -C "$root/examples/kleidi-server" build -o "$work/kleidi-server" .
fi
cache="${KLEIDI_CACHE:-$HOME/.cache/kleidi}"
if [[ ! -x $cache/kube-apiserver-v1.37.2/kube-apiserver ]]; then
	say "kube-apiserver is not cached yet: building it once into $cache takes 6 to 11 minutes on 2 cores" \
		"(about 5.5 with the Go modules already downloaded); its progress follows every 30 s"
fi
kas="$("$root/hack/kube-apiserver.sh")"
say "kube-apiserver: $kas"
if command -v kubectl >/dev/null; then
	kubectl="$(command -v kubectl)"
else
	say "kubectl is missing: building it once into $cache (a few minutes once kube-apiserver's modules are downloaded)"
	kubectl="$("$root/hack/k8s-binary.sh" kubectl)"
fi
say "kubectl: $kubectl"

# ks NODE COMMAND [ARG...] runs kleidi-server COMMAND with node NODE's flags as the plugin's uid, prints the
# command, and leaves its standard output in OUT and its standard error in $work/ks.err.
declare -A flags=()
OUT=""
ks() {
	local n=$1 cmd=$2; shift 2
	printf '    cp%s$ kleidi-server %s $F%s%s\n' "$n" "$cmd" "$n" "${*:+ $(rel "$@")}"
	# shellcheck disable=SC2086 # the flags are words
	if ! OUT="$("${asuid[@]}" "$work/kleidi-server" "$cmd" ${flags[$n]} "$@" 2>"$work/ks.err")"; then
		{ printf '%s\n' "$OUT"; cat "$work/ks.err"; } | indent
		die "kleidi-server $cmd on cp$n failed"
	fi
}

step "three nodes, each with a TPM of its own; an offline recovery key"
say "swtpm_setup manufactures each TPM with an RSA and an ECC endorsement key (EK) and their certificates, signed" \
	"by a local CA of the demo's own; swtpm then serves it on a unix socket owned by the plugin's uid."
mkdir "$work/ek-ca"
cat >"$work/ek-ca/swtpm-localca.conf" <<EOF
statedir = $work/ek-ca
signingkey = $work/ek-ca/signkey.pem
issuercert = $work/ek-ca/issuercert.pem
certserial = $work/ek-ca/certserial
EOF
printf -- '--platform-manufacturer kleidi\n--platform-version 2.1\n--platform-model demo\n' >"$work/ek-ca/swtpm-localca.options"
printf 'create_certs_tool = %s\ncreate_certs_tool_config = %s\ncreate_certs_tool_options = %s\nactive_pcr_banks = sha256\n' \
	"$(command -v swtpm_localca)" "$work/ek-ca/swtpm-localca.conf" "$work/ek-ca/swtpm-localca.options" >"$work/ek-ca/swtpm_setup.conf"

manufacture() { # node: a new TPM state, as from the factory (whatever was there is gone: a cleared TPM)
	local n=$1
	printf '    cp%s$ %s\n' "$n" "$(rel swtpm_setup --tpm2 --tpmstate "$work/cp$n/tpm" --createek --create-ek-cert --overwrite --config "$work/ek-ca/swtpm_setup.conf")"
	rm -rf "$work/cp$n/tpm"
	mkdir -m 0700 "$work/cp$n/tpm"
	swtpm_setup --tpm2 --tpmstate "$work/cp$n/tpm" --createek --create-ek-cert --overwrite \
		--config "$work/ek-ca/swtpm_setup.conf" --logfile "$work/cp$n/swtpm_setup.log" >/dev/null
}
start_tpm() { # node
	local n=$1 owner=""
	[[ $(id -u) -ne 0 ]] || owner=",uid=$uid,gid=$uid"
	swtpm socket --tpm2 --tpmstate "dir=$work/cp$n/tpm" --flags not-need-init,startup-clear \
		--server "type=unixio,path=$work/cp$n/tpm.sock,mode=0600$owner" \
		--ctrl "type=unixio,path=$work/cp$n/tpm-ctrl.sock,mode=0600" >"$work/cp$n/swtpm.log" 2>&1 &
	pid[tpm$n]=$!
	wait_for "swtpm of cp$n" 10 test -S "$work/cp$n/tpm.sock"
}
for n in 1 2 3; do
	mkdir -m 0711 "$work/cp$n"
	mkdir -m 0700 "$work/cp$n/state" "$work/cp$n/run" "$work/cp$n/log"
	own "$work/cp$n/state" "$work/cp$n/run" "$work/cp$n/log"
	flags[$n]="--state-dir $work/cp$n/state --provider tpm --tpm unix://$work/cp$n/tpm.sock --tpm-pcrs 7 --recovery-key $work/recovery.pub.asc"
	manufacture "$n"
	start_tpm "$n"
done

say "The recovery key: an OpenPGP key pair made once, offline; every node gets only its public half."
export GNUPGHOME="$work/gnupg"
mkdir -m 0700 "$GNUPGHOME"
openssl rand -base64 24 >"$work/recovery.pass"
gpg=(gpg --batch --quiet --pinentry-mode loopback --passphrase-file "$work/recovery.pass")
say "\$ gpg --batch --pinentry-mode loopback --passphrase-file recovery.pass --quick-generate-key 'kleidi recovery <recovery@cluster.example>' future-default default never"
"${gpg[@]}" --quick-generate-key 'kleidi recovery <recovery@cluster.example>' future-default default never 2>/dev/null
say "\$ gpg --armor --export recovery@cluster.example > recovery.pub.asc      # to every node" \
	"\$ gpg --armor --export-secret-keys recovery@cluster.example > recovery.asc # kept offline"
gpg --armor --export recovery@cluster.example >"$work/recovery.pub.asc"
"${gpg[@]}" --armor --export-secret-keys recovery@cluster.example >"$work/recovery.asc"
chmod 0644 "$work/recovery.pub.asc"
chmod 0600 "$work/recovery.asc" "$work/recovery.pass"
own "$work/recovery.asc" "$work/recovery.pass"
for n in 1 2 3; do say "F$n=\"$(rel "${flags[$n]}")\""; done

# The control plane starts now and becomes ready once each node's plugin serves.
free_port; etcd_port=$PORT
free_port; peer_port=$PORT
etcd_url="http://127.0.0.1:$etcd_port"
etcd --name demo --data-dir "$work/etcd" --listen-client-urls "$etcd_url" --advertise-client-urls "$etcd_url" \
	--listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
	--initial-cluster "demo=http://127.0.0.1:$peer_port" --log-level warn >"$work/etcd.log" 2>&1 &
pid[etcd]=$!
token="demo-$(openssl rand -hex 16)"
echo "$token,demo-admin,demo-admin,system:masters" >"$work/tokens.csv"
openssl genrsa -out "$work/sa.key" 2048 2>/dev/null
declare -A api=()
start_api() { # node
	local n=$1
	"$kas" --etcd-servers="$etcd_url" --secure-port="${api[$n]##*:}" --bind-address=127.0.0.1 \
		--advertise-address=127.0.0.1 --endpoint-reconciler-type=none --cert-dir="$work/cp$n/apiserver-certs" \
		--service-account-issuer=https://kubernetes.default.svc.cluster.local \
		--service-account-key-file="$work/sa.key" --service-account-signing-key-file="$work/sa.key" \
		--token-auth-file="$work/tokens.csv" --authorization-mode=RBAC --service-cluster-ip-range=10.96.0.0/24 \
		--profiling=false --encryption-provider-config="$work/cp$n/encryption-config.yaml" >"$work/cp$n/kube-apiserver.log" 2>&1 &
	pid[api$n]=$!
}
wait_for "etcd" 30 curl -fsS "$etcd_url/health"
for n in 1 2 3; do
	free_port
	api[$n]="https://127.0.0.1:$PORT"
	cat >"$work/cp$n/encryption-config.yaml" <<YAML
apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
  - resources: ["secrets"]
    providers:
      - kms: {apiVersion: v2, name: kleidi, endpoint: unix://$work/cp$n/run/kms.sock, timeout: 3s}
      - identity: {}
YAML
	start_api "$n"
done

step "cp1 makes the keyring; cp2 and cp3 join it by enrollment"
say "Proves: one keyring holds every KEK wrapped for each node's TPM (a copy sealed by cp1, duplicates made to" \
	"the EK of cp2 and cp3 and signed by cp1) and for the recovery key; each node imports its copies at start."
ks 1 init
indent <<<"$OUT"
declare -A member=() endorser=()
identity() { # node: the node's identity file, handed to cp1
	local n=$1
	ks "$n" identity
	printf '%s' "$OUT" >"$work/cp$n.identity"
	chmod 0644 "$work/cp$n.identity"
	member[$n]="$(sed -n 's/^member ID: //p' "$work/ks.err")"
	say "  > cp$n.identity (public keys only; sent to cp1); member ID: ${member[$n]}"
}
enroll() { # node: cp1 enrolls it; the member it prints must be the one the node printed
	local n=$1
	ks 1 enroll "$work/cp$n.identity"
	indent <<<"$OUT"
	[[ $OUT == *"member: ${member[$n]}"* ]] || die "enroll printed another member than cp$n's identity file"
	endorser[$n]="$(sed -n 's/^endorsed_by: //p' <<<"$OUT")"
}
for n in 2 3; do identity "$n"; done
for n in 2 3; do enroll "$n"; done
ks 1 recipients
indent <<<"$OUT"

copy_keyring() { # from to... : the keyring holds wrapped KEKs only; scp between real nodes
	local from=$1 n; shift
	for n in "$@"; do
		printf '    %s\n' "$(rel "\$ install -o $uid -g $uid -m 0600 $work/cp$from/state/keyring.json $work/cp$n/state/.keyring.json && mv $work/cp$n/state/.keyring.json $work/cp$n/state/keyring.json")"
		install -m 0600 "$work/cp$from/state/keyring.json" "$work/cp$n/state/.keyring.json"
		own "$work/cp$n/state/.keyring.json"
		mv -f "$work/cp$n/state/.keyring.json" "$work/cp$n/state/keyring.json"
	done
}
copy_keyring 1 2 3

serve() { # node [flag...]: starts the node's plugin; a joining node pins, at its first start, the member that enrolled it
	local n=$1 extra=()
	shift
	[[ -z ${endorser[$n]:-} ]] || extra=(--trusted-member "${endorser[$n]}")
	printf '    cp%s$ kleidi-server serve $F%s --listen unix://cp%s/run/kms.sock --http-addr off %s&\n' "$n" "$n" "$n" "${extra[*]:+${extra[*]} }"
	# shellcheck disable=SC2086
	"${asuid[@]}" "$work/kleidi-server" serve ${flags[$n]} --listen "unix://$work/cp$n/run/kms.sock" --http-addr off \
		--audit-log "$work/cp$n/log/audit.log" --log-format text "${extra[@]}" >>"$work/cp$n/kleidi-server.log" 2>&1 &
	pid[kleidi$n]=$!
	unset "endorser[$n]"
}
status() { "$work/kleidi-server" status --listen "unix://$work/cp$1/run/kms.sock" "${@:2}"; }
key_id() { status "$1" 2>/dev/null | sed -n 's/^key_id: //p'; }
for n in 1 2 3; do serve "$n"; done
for n in 1 2 3; do wait_for "kleidi-server on cp$n healthy" 30 status "$n"; done

same_key_id() { # [want]: waits until the three plugins are healthy on one key id (want, if given) and prints it
	local want=${1:-} ids
	for _ in $(seq 150); do
		ids="$(for n in 1 2 3; do status "$n" >/dev/null 2>&1 && key_id "$n" || echo unhealthy; done | sort -u)"
		if [[ $ids != *unhealthy* && $(wc -l <<<"$ids") -eq 1 && ( -z $want || $ids == "$want" ) ]]; then
			printf '    $ kleidi-server status --listen unix://cpN/run/kms.sock   # on each node\n'
			for n in 1 2 3; do say "  cp$n: healthz ok, key_id $(key_id "$n")"; done
			say "key ids equal on the three nodes: $ids"
			KEY="$ids"
			return 0
		fi
		sleep 0.2
	done
	for n in 1 2 3; do status "$n" 2>&1 | indent || true; done
	die "the plugins do not report one key id${want:+ ($want)}"
}
same_key_id

step "Secrets written through apiserver 1, read through apiservers 2 and 3"
say "Proves: each kube-apiserver encrypts through its own node's plugin and decrypts what another node wrote;" \
	"etcd holds only ciphertext."
for n in 1 2 3; do wait_for "kube-apiserver $n ready" 120 curl -fsSk -H "Authorization: Bearer $token" "${api[$n]}/readyz"; done
for n in 1 2 3; do say "apiserver $n: ${api[$n]}"; done
kc() { # node args...: kubectl through that node's apiserver
	local n=$1; shift
	"$kubectl" --server "${api[$n]}" --token "$token" --insecure-skip-tls-verify "$@"
}
say "[apiserver 1] \$ kubectl create namespace demo"
kc 1 create namespace demo >/dev/null
declare -A want=()
secrets=()
for s in alpha beta gamma; do
	want[$s]="$s-$(openssl rand -hex 6)"
	secrets+=("$s")
	say "[apiserver 1] \$ kubectl -n demo create secret generic $s --from-literal=v=${want[$s]}"
	kc 1 -n demo create secret generic "$s" --from-literal=v="${want[$s]}" >/dev/null
done
read_all() { # node...: reads every Secret through each node's apiserver; fails on any wrong value
	local n s got
	for n in "$@"; do
		for s in "${secrets[@]}"; do
			got="$(kc "$n" -n demo get secret "$s" -o jsonpath='{.data.v}' | base64 -d)"
			[[ $got == "${want[$s]}" ]] || die "secret $s through apiserver $n: got \"$got\", want \"${want[$s]}\""
		done
	done
}
say "[apiserver 2 and 3] \$ kubectl -n demo get secret NAME -o jsonpath='{.data.v}' | base64 -d"
read_all 2 3
for s in "${secrets[@]}"; do say "  $s = ${want[$s]} through apiserver 2 and through apiserver 3"; done
stored() { # secret: prints the key id etcd's value names, after checking it is a kleidi envelope with no plaintext
	local raw="$work/raw"
	etcdctl --endpoints "$etcd_url" get "/registry/secrets/demo/$1" --print-value-only >"$raw"
	[[ $(head -c 22 "$raw") == "k8s:enc:kms:v2:kleidi:" ]] || die "etcd value of $1 is not a kleidi KMS v2 envelope"
	if grep -qF -- "${want[$1]}" "$raw"; then die "etcd holds the plaintext of $1"; fi
	grep -ao 'kleidi-tpm-[a-z2-7]\{32\}' "$raw" | head -n 1
}
say "\$ etcdctl get /registry/secrets/demo/alpha --print-value-only | head -c 22   # and the key id it names"
say "  $(etcdctl --endpoints "$etcd_url" get /registry/secrets/demo/alpha --print-value-only | head -c 22) ... key id $(stored alpha); no plaintext"
for s in "${secrets[@]}"; do [[ $(stored "$s") == "$KEY" ]] || die "secret $s is not stored under $KEY"; done

step "a coordinated rotation, then re-encryption, while a reader reads every Secret through all three apiservers"
say "Proves: a KEK is active nowhere before every node holds it (rotate --stage, copy, activate on each), so no" \
	"apiserver ever meets data it cannot read; re-encryption moves every Secret to the new KEK."
reader() { # reads every Secret through every apiserver until reader.stop exists; counts reads and errors
	local reads=0 errs=0 n s got
	while [[ ! -e $work/reader.stop ]]; do
		sleep 0.1 # leaves the two cores to the control plane
		for n in 1 2 3; do
			for s in "${secrets[@]}"; do
				got="$(curl -fsSk --max-time 5 -H "Authorization: Bearer $token" "${api[$n]}/api/v1/namespaces/demo/secrets/$s" 2>>"$work/reader.err" |
					sed -n 's/.*"v": *"\([^"]*\)".*/\1/p' | base64 -d 2>/dev/null)" || true
				reads=$((reads + 1))
				if [[ $got != "${want[$s]}" ]]; then
					errs=$((errs + 1))
					echo "$s through apiserver $n: wrong or no value" >>"$work/reader.err"
				fi
			done
		done
	done
	echo "$reads $errs" >"$work/reader.result"
}
reader &
pid[reader]=$!
old=$KEY
ks 1 rotate --stage
indent <<<"$OUT"
staged="$(sed -n 's/^staged_key_id: //p' <<<"$OUT")"
[[ -n $staged && $staged != "$old" ]] || die "rotate --stage staged no new key"
copy_keyring 1 2 3
imported() { # node key: the node's copy of key is its own (imported), not one another member made for it
	local line
	line="$("${asuid[@]}" "$work/kleidi-server" recipients ${flags[$1]} 2>/dev/null | grep "^$2 ")" || return 1
	[[ "$line, " == *" ${member[$1]}, "* || "$line, " == *", ${member[$1]}, "* ]]
}
say "wait until cp2 and cp3 have imported it: \`kleidi-server recipients \$FN\` lists it for their member ID without \"(from ...)\""
for n in 2 3; do wait_for "cp$n imports $staged" 30 imported "$n" "$staged"; done
for n in 1 2 3; do
	ks "$n" activate "$staged"
	indent <<<"$OUT"
done
same_key_id "$staged"
observed() { # node key: the apiserver has taken key from its plugin's Status (its metric names the key's hash)
	local hash
	hash="sha256:$(printf '%s' "$2" | sha256sum | cut -d' ' -f1)"
	curl -fsSk -o /dev/null -H "Authorization: Bearer $token" "${api[$1]}/healthz/kms-providers" || true
	curl -fsSk -H "Authorization: Bearer $token" -o "$work/metrics" "${api[$1]}/metrics" &&
		grep -q "^apiserver_envelope_encryption_key_id_hash_status_last_timestamp_seconds{.*key_id_hash=\"$hash\"" "$work/metrics"
}
say "wait until each kube-apiserver has seen the new key_id in its plugin's Status (it asks every 20 s at most)"
for n in 1 2 3; do wait_for "apiserver $n sees $staged" 60 observed "$n" "$staged"; done
say "[apiserver 1] \$ kubectl get secrets -A -o json | kubectl replace -f -"
kc 1 get secrets -A -o json | kc 1 replace -f - | indent
sleep 1 # the reader goes on a little after the last write
touch "$work/reader.stop"
wait "${pid[reader]}" || true
unset "pid[reader]"
read -r reads errs <"$work/reader.result"
say "reader errors: $errs ($reads reads through the three apiservers during the rotation and re-encryption)"
if [[ $errs -ne 0 ]]; then head -n 5 "$work/reader.err" | indent; die "the reader saw $errs errors"; fi
for s in "${secrets[@]}"; do
	got="$(stored "$s")"
	[[ $got == "$staged" ]] || die "secret $s is stored under $got after re-encryption, want $staged"
done
say "every Secret in etcd is now under $staged"

step "cp2's TPM is cleared; cp2 joins again"
say "Proves: a node whose TPM is cleared (or a new board) reports unhealthy instead of making a key of its own," \
	"and joins again like any new node: identity, enroll on a peer, copy the keyring, start. Nothing is lost."
say "A cleared TPM: swtpm stopped, its state removed and manufactured again (new EK, new storage root key)."
stop tpm2
manufacture 2
start_tpm 2
printf '    $ kleidi-server status --listen unix://cp2/run/kms.sock\n'
# unhealthy: the plugin reports its TPM is not the one it pinned (a moment earlier, while swtpm restarts, it may
# still say the TPM is unavailable).
unhealthy() {
	local out
	out="$(status "$1" 2>/dev/null)" || true # status exits 1 for an unhealthy plugin, which is the point here
	grep -q '^healthz: root of trust unhealthy$' <<<"$out"
}
wait_for "cp2 reports unhealthy" 30 unhealthy 2
status 2 2>&1 | indent || true
say "kube-apiserver 2 learns it at its next Status call (within 20 s) and fails /readyz/kms-providers, so a load" \
	"balancer sends it nothing; the other two nodes serve on."
stop kleidi2
old_member=${member[2]}
printf '    cp2$ rm -rf cp2/state/*\n'
rm -rf "${work:?}/cp2/state/"*
identity 2
say "  (it was $old_member: a new TPM is a new member)"
enroll 2
copy_keyring 1 2 3
serve 2
same_key_id "$staged"
wait_for "kube-apiserver 2 ready" 60 curl -fsSk -H "Authorization: Bearer $token" "${api[2]}/readyz"
read_all 2
say "every Secret reads through apiserver 2 again"
say "The old TPM of cp2 could still unwrap the copies it had: unenroll its member, which rotates; copy the keyring"
say "to every node (and re-encrypt, as in the rotation above)."
ks 1 unenroll "$old_member"
indent <<<"$OUT"
copy_keyring 1 2 3
same_key_id "$(sed -n 's/^key_id: //p' <<<"$OUT")"

step "every TPM is cleared; the cluster is recovered with the offline recovery key"
say "Proves: losing every TPM loses nothing with a recovery key: recover rebuilds the keyring for cp1's new TPM;" \
	"the other nodes join cp1 again; every Secret stays readable, also by an apiserver that holds no cached key."
say "Every TPM cleared: each swtpm stopped, its state removed and manufactured again."
for n in 1 2 3; do stop "tpm$n"; manufacture "$n"; start_tpm "$n"; done
printf '    $ kleidi-server status --listen unix://cpN/run/kms.sock\n'
for n in 1 2 3; do wait_for "cp$n reports unhealthy" 30 unhealthy "$n"; done
for n in 1 2 3; do say "  cp$n: $(status "$n" 2>&1 | sed -n 's/^kleidi-server status: //p' | head -n 1)"; done
stop kleidi1 kleidi2 kleidi3
say "cp1 recovers with the last keyring and its node-state.json (the members it trusted) in its state directory:"
ks 1 recover --recovery-private-key "$work/recovery.asc" --recovery-passphrase-file "$work/recovery.pass"
indent <<<"$OUT"
serve 1
wait_for "kleidi-server on cp1 healthy" 30 status 1
for n in 2 3; do
	printf '    cp%s$ rm -rf cp%s/state/*\n' "$n" "$n"
	rm -rf "${work:?}/cp$n/state/"*
	identity "$n"
	enroll "$n"
done
copy_keyring 1 2 3
for n in 2 3; do serve "$n"; done
same_key_id
say "kube-apiserver 1 restarts, so that it holds no key decrypted before: each Secret it reads needs its plugin" \
	"to decrypt, with the recovered keyring, the key that Secret was written with"
stop api1
start_api 1
for n in 1 2 3; do wait_for "kube-apiserver $n ready" 120 curl -fsSk -H "Authorization: Bearer $token" "${api[$n]}/readyz"; done
want[delta]="delta-$(openssl rand -hex 6)"
secrets+=(delta)
say "[apiserver 3] \$ kubectl -n demo create secret generic delta --from-literal=v=${want[delta]}"
kc 3 -n demo create secret generic delta --from-literal=v="${want[delta]}" >/dev/null
read_all 1 2 3
say "every Secret readable: ${#secrets[@]} Secrets through each of the three apiservers"

if [[ "${KLEIDI_DEMO_WAIT:-}" == 1 ]]; then
	step "control plane running; try: kubectl --server ${api[1]} --token $token --insecure-skip-tls-verify -n demo get secrets"
	say "press Ctrl-C to stop"
	while :; do sleep 3600; done
fi
step "done in $((SECONDS - started)) s; stopping everything"
