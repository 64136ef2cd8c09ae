#!/usr/bin/env bash
# compare.sh measures kleidi-server as operators run it (audit log to a file, metrics served, JSON logs; gpg, and
# tpm on a swtpm process), and bare gpg kleidi-server (no audit log, no HTTP), beside the baseline plugin of
# kleidi-bench, end to end: it builds both binaries, starts swtpm, the baseline and the three plugins, measures
# the time from start to healthy, the resident set idle and under load, and Encrypt/Decrypt throughput and
# latency at each concurrency in alternating runs (medians), then stops everything.
#
#   examples/kleidi-bench/compare.sh                    # defaults below; about 12 minutes
#   REPEAT=5 DURATION=20s CONCURRENCY=16 examples/kleidi-bench/compare.sh
#
# BEFORE=<commit> also runs kleidi-server as it was at that commit, as operators run it ("kleidi-gpg-before"), in
# the same alternating runs, so a change is measured against what it changed on one machine at one time.
#
# RECIPIENTS=3,5 also runs gpg kleidi-server as operators run it with every KEK wrapped to 3 and to 5 OpenPGP
# recipients ("kleidi-gpg-3recipients", ...): the attached key of every ciphertext carries one encrypted session
# key per recipient, so each Decrypt request grows with them.
#
# baseline-annotated is the baseline returning ANNOTATED bytes of annotation (default 370, gpg kleidi's attached
# key and its annotation key) with every Encrypt, so every Decrypt carries them back: it shows what self-contained
# ciphertexts cost the client and the transport, apart from anything kleidi does.
#
# Results go to $OUT (default ./kleidi-bench-results-<time>): compare.txt and compare.json (every run), and
# summary.txt (machine, time to healthy, resident set). Needs go and swtpm (installed with apt-get when
# missing and running as root).
set -euo pipefail

REPEAT=${REPEAT:-3}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-1s}
CONCURRENCY=${CONCURRENCY:-1,16,64}
METHODS=${METHODS:-encrypt,decrypt}
RESTARTS=${RESTARTS:-3}   # restarts on an existing keyring, for the time to healthy
IDLE=${IDLE:-5}           # seconds a plugin idles before its idle resident set is read
OUT=${OUT:-$PWD/kleidi-bench-results-$(date -u +%Y%m%dT%H%M%SZ)}
BEFORE=${BEFORE:-}        # a commit whose kleidi-server runs beside the others, as kleidi-gpg-before
RECIPIENTS=${RECIPIENTS:-} # comma-separated recipient counts for more gpg plugins, as kleidi-gpg-<n>recipients
ANNOTATED=${ANNOTATED:-370} # bytes of annotation a second baseline returns with every Encrypt (0: no such baseline)

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
work=$(mktemp -d /tmp/kleidi-bench.XXXXXX)
bin=$work/bin
declare -A pid=()

log() { printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

stop() { # stop NAME: SIGTERM the process and wait for it
	local p=${pid[$1]:-}
	[[ -n $p ]] || return 0
	kill -TERM "$p" 2>/dev/null || true
	wait "$p" 2>/dev/null || true
	unset "pid[$1]"
}

cleanup() {
	local name
	for name in "${!pid[@]}"; do stop "$name"; done
	rm -rf "$work"
}
trap cleanup EXIT

if ! command -v swtpm >/dev/null; then
	if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
		apt-get install -y swtpm swtpm-tools >/dev/null
	else
		echo "compare.sh: swtpm is missing (Debian: apt-get install swtpm swtpm-tools)" >&2
		exit 1
	fi
fi

free_port() { # a TCP port on 127.0.0.1 nothing listens on, whose successor is free too
	local p
	while :; do
		p=$((20000 + RANDOM % 30000))
		if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null && ! (exec 3<>"/dev/tcp/127.0.0.1/$((p + 1))") 2>/dev/null; then
			echo "$p"
			return
		fi
	done
}

now_ms() { echo $(($(date +%s%N) / 1000000)); }

wait_healthy() { # wait_healthy SOCKET: poll Status until healthz is ok (60 s at most)
	local deadline=$(($(now_ms) + 60000))
	until "$bin/kleidi-server" status --listen "unix://$1" >/dev/null 2>&1; do
		if (($(now_ms) > deadline)); then
			echo "compare.sh: nothing healthy on $1 after 60 s" >&2
			return 1
		fi
		sleep 0.01
	done
}

vm() { # vm PID FIELD: a field of /proc/PID/status in KiB
	awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status"
}

log "building into $bin"
(cd "$here" && go build -o "$bin/kleidi-bench" .)
(cd "$root/examples/kleidi-server" && go build -o "$bin/kleidi-server" .)
plugins=(kleidi-gpg kleidi-gpg-bare kleidi-tpm) # every kleidi-server; "-bare" ones run without audit log and HTTP
if [[ -n $BEFORE ]]; then
	log "building kleidi-server at $BEFORE"
	mkdir -p "$work/before"
	git -C "$root" archive "$BEFORE" | tar -x -C "$work/before"
	(cd "$work/before/examples/kleidi-server" && go build -o "$bin/kleidi-server-before" .)
	plugins+=(kleidi-gpg-before)
fi

machine() {
	echo "nproc: $(nproc); CPU: $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo);" \
		"kernel: $(uname -r); $(go version | awk '{ print $3 }'); load average: $(cut -d' ' -f1-3 /proc/loadavg)"
}

summary=$OUT/summary.txt
{
	echo "kleidi-bench compare.sh, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"
	echo "machine at start: $(machine)"
	echo "settings: REPEAT=$REPEAT DURATION=$DURATION WARMUP=$WARMUP CONCURRENCY=$CONCURRENCY METHODS=$METHODS"
} >"$summary"

tpm_port=$(free_port)
mkdir -p "$work/tpmstate"
swtpm socket --tpm2 --tpmstate dir="$work/tpmstate" \
	--server type=tcp,port="$tpm_port",bindaddr=127.0.0.1 --ctrl type=tcp,port=$((tpm_port + 1)),bindaddr=127.0.0.1 \
	--flags not-need-init,startup-clear >"$OUT/swtpm.log" 2>&1 &
pid[swtpm]=$!
until (exec 3<>"/dev/tcp/127.0.0.1/$tpm_port") 2>/dev/null; do sleep 0.05; done
log "swtpm on 127.0.0.1:$tpm_port"

baselines=()
start_baseline() { # start_baseline NAME FLAGS...: start a baseline plugin on $work/NAME.sock
	local name=$1
	shift
	"$bin/kleidi-bench" baseline --listen "unix://$work/$name.sock" "$@" 2>"$OUT/$name.log" &
	pid[$name]=$!
	wait_healthy "$work/$name.sock"
	baselines+=("$name")
}
start_baseline baseline
((ANNOTATED == 0)) || start_baseline baseline-annotated --annotation-bytes "$ANNOTATED"

start_kleidi() { # start_kleidi NAME PROVIDER-FLAGS...: start a plugin; took = ms from start to healthy
	local name=$1
	shift
	local t0 ops=()
	t0=$(now_ms)
	# As operators run it: an audit log to a file, metrics served, JSON logs; a "-bare" name runs without audit log
	# and HTTP, to tell what they cost. --init makes the first start's keyring (a real root needs it).
	if [[ $name == *-bare ]]; then
		ops=(--http-addr off)
	else
		ops=(--http-addr "127.0.0.1:${http_port[$name]}" --audit-log "$work/$name-audit.log")
	fi
	local server=$bin/kleidi-server
	[[ $name != *-before ]] || server=$bin/kleidi-server-before
	"$server" serve --init --listen "unix://$work/$name.sock" --state-dir "$work/state-$name" \
		--log-format json --log-level warn "${ops[@]}" "$@" >>"$OUT/$name.log" 2>&1 &
	pid[$name]=$!
	wait_healthy "$work/$name.sock"
	took=$(($(now_ms) - t0))
}

declare -A http_port=([kleidi-gpg]=$(free_port) [kleidi-tpm]=$(free_port) [kleidi-gpg-before]=$(free_port))
declare -A flags=([kleidi-gpg]="--provider gpg" [kleidi-gpg-bare]="--provider gpg" [kleidi-tpm]="--provider tpm --tpm tcp://127.0.0.1:$tpm_port"
	[kleidi-gpg-before]="--provider gpg")
if [[ -n $RECIPIENTS ]]; then
	# OpenPGP keys for the recipients (each init makes a development key pair in its own state directory): the
	# plugin holds the first private key and wraps every KEK to the first n public keys.
	IFS=, read -ra counts <<<"$RECIPIENTS"
	most=$(printf '%s\n' "${counts[@]}" | sort -n | tail -1)
	for ((i = 1; i <= most; i++)); do
		"$bin/kleidi-server" init --provider gpg --state-dir "$work/recipient-$i" >/dev/null 2>&1
	done
	for n in "${counts[@]}"; do
		name=kleidi-gpg-${n}recipients
		plugins+=("$name")
		http_port[$name]=$(free_port)
		flags[$name]="--provider gpg --gpg-private-key $work/recipient-1/gpg/kleidi-development-key.asc"
		for ((i = 1; i <= n; i++)); do
			flags[$name]+=" --gpg-public-key $work/recipient-$i/gpg/kleidi-development-key.pub.asc"
		done
	done
fi
for name in "${plugins[@]}"; do
	# shellcheck disable=SC2086 # flags are words
	start_kleidi "$name" ${flags[$name]}
	first=$took
	stop "$name"
	restarts=()
	for ((i = 0; i < RESTARTS; i++)); do
		# shellcheck disable=SC2086
		start_kleidi "$name" ${flags[$name]}
		restarts+=("$took")
		((i == RESTARTS - 1)) || stop "$name"
	done
	median=$(printf '%s\n' "${restarts[@]}" | sort -n | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }')
	echo "$name: start to healthy ${first} ms on an empty state directory (generates the root key or KEK);" \
		"${restarts[*]} ms on restarts (median ${median} ms); load average $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$summary" >&2
done

sleep "$IDLE"
for name in "${baselines[@]}" "${plugins[@]}"; do
	echo "$name: idle VmRSS $(vm "${pid[$name]}" VmRSS) KiB after ${IDLE}s idle" | tee -a "$summary" >&2
done

metrics=()
for name in "${plugins[@]}"; do
	[[ $name != *-bare ]] || continue
	url="http://127.0.0.1:${http_port[$name]}/metrics"
	if command -v curl >/dev/null && curl -sf -o /dev/null "$url"; then
		metrics+=(--metrics-url "$name=$url")
	fi
done
# Provider calls during the load: the hot path must make none (health probes run on their own timer).
metrics+=(--metrics-match "${METRICS_MATCH:-kleidi_provider_operations_total}")

log "comparing: $METHODS at concurrency $CONCURRENCY, $REPEAT x $DURATION per endpoint and cell"
targets=()
for name in "${baselines[@]}"; do
	targets+=(--endpoint "$name=unix://$work/$name.sock" --pid "$name=${pid[$name]}")
done
for name in "${plugins[@]}"; do
	targets+=(--endpoint "$name=unix://$work/$name.sock" --pid "$name=${pid[$name]}")
done
"$bin/kleidi-bench" compare "${targets[@]}" "${metrics[@]}" \
	--method "$METHODS" --concurrency "$CONCURRENCY" --duration "$DURATION" --warmup "$WARMUP" --repeat "$REPEAT" \
	--json-out "$OUT/compare.json" | tee "$OUT/compare.txt"

for name in "${baselines[@]}" "${plugins[@]}"; do
	echo "$name: after the load VmRSS $(vm "${pid[$name]}" VmRSS) KiB, VmHWM (peak since start) $(vm "${pid[$name]}" VmHWM) KiB" | tee -a "$summary" >&2
done
echo "machine at end: $(machine)" >>"$summary"
log "results in $OUT"
