#!/usr/bin/env bash
# secrets-rounds.sh measures the Secret create rate through a real kube-apiserver with kleidi (gpg and tpm, as
# operators run them) beside the identity provider, in ROUNDS rounds of BenchmarkSecrets. Each round starts a fresh
# etcd and kube-apiserver per provider, one provider after the other, and creates N Secrets at 16 callers. The
# machine's drift over minutes is larger than the difference in question, so each round's kleidi rate is divided
# by the identity rate of the same round; the script prints these paired ratios, their mean with a 95% confidence
# interval (Student's t), and how many rounds a confidence interval that excludes the 0.95 target would need at
# the spread measured.
#
#   test/e2e/secrets-rounds.sh                 # ROUNDS=10 N=2000
#   ROUNDS=20 N=4000 test/e2e/secrets-rounds.sh
#
# Raw benchmark output goes to $OUT (default ./secrets-rounds-<time>.txt).
set -euo pipefail

ROUNDS=${ROUNDS:-10}
N=${N:-2000}
PROVIDERS=${PROVIDERS:-identity|kleidi-gpg|kleidi-tpm}
OUT=${OUT:-$PWD/secrets-rounds-$(date -u +%Y%m%dT%H%M%SZ).txt}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

: >"$OUT"
for ((r = 1; r <= ROUNDS; r++)); do
	echo "round $r of $ROUNDS (load average $(cut -d' ' -f1-3 /proc/loadavg))" >&2
	echo "=== round $r" >>"$OUT"
	(cd "$here" && go test -run '^$' -bench "BenchmarkSecrets/^($PROVIDERS)\$/create" -benchtime "${N}x" -count 1 \
		-timeout 30m .) >>"$OUT" 2>&1
done

# A benchmark line: BenchmarkSecrets/kleidi-gpg/create-2  2000  ...  2049 creates/s ...
awk -v target=0.95 '
	/^=== round/ { round = $3 }
	/^BenchmarkSecrets\/[^ ]+\/create/ {
		split($1, part, "/")
		for (i = 3; i <= NF; i++) if ($i ~ /\/s$/) { rate[round, part[2]] = $(i - 1); break }
		names[part[2]] = 1
		rounds = round
	}
	END {
		# Two-sided 95% quantiles of Student t for 1 to 30 degrees of freedom, then the normal one.
		split("12.706 4.303 3.182 2.776 2.571 2.447 2.365 2.306 2.262 2.228 2.201 2.179 2.160 2.145 2.131 " \
			"2.120 2.110 2.101 2.093 2.086 2.080 2.074 2.069 2.064 2.060 2.056 2.052 2.048 2.045 2.042", t, " ")
		for (name in names) {
			if (name == "identity") continue
			n = 0; sum = 0; sq = 0; list = ""
			for (r = 1; r <= rounds; r++) {
				if (!((r, name) in rate) || !((r, "identity") in rate)) continue
				x = rate[r, name] / rate[r, "identity"]
				n++; sum += x; sq += x * x
				list = list sprintf(" %.3f", x)
			}
			if (n < 2) { printf "%s: fewer than 2 paired rounds\n", name; continue }
			mean = sum / n
			sd = sqrt((sq - n * mean * mean) / (n - 1))
			q = (n - 1 <= 30) ? t[n - 1] : 1.96
			half = q * sd / sqrt(n)
			printf "%s / identity, paired by round:%s\n", name, list
			printf "%s: mean %.3f, sd %.3f, 95%% CI %.3f to %.3f over %d rounds", name, mean, sd, mean - half, mean + half, n
			if (mean - half > target) printf "; above %.2f\n", target
			else if (mean + half < target) printf "; below %.2f\n", target
			else {
				d = mean - target; if (d < 0) d = -d
				need = (d > 0) ? int((1.96 * sd / d) ^ 2) + 1 : -1
				if (need < 0) printf "; straddles %.2f, the mean is on it\n", target
				else printf "; straddles %.2f: about %d rounds would settle it at this spread\n", target, need
			}
		}
	}' "$OUT"
echo "raw output: $OUT" >&2
