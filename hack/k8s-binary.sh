#!/usr/bin/env bash
# Prints the path of a Kubernetes binary (kube-apiserver, kubectl, kubeadm, kube-controller-manager) of the
# given version, building it once into a cache outside the clone if it is not there yet.
#
#   hack/k8s-binary.sh NAME [VERSION]      (default v1.37.2)
#
# Cache: ${KLEIDI_CACHE:-$HOME/.cache/kleidi}/<NAME>-<VERSION>/<NAME>
# The build uses a throwaway Go module that requires k8s.io/kubernetes at
# VERSION and replaces each of its staging modules (k8s.io/api, ...) with the
# published module at v0.<minor>.<patch>, because k8s.io/kubernetes cannot be
# required directly otherwise. Progress goes to stderr, the path to stdout.
set -euo pipefail

name="${1:?usage: hack/k8s-binary.sh NAME [VERSION]}"
case "$name" in kube-apiserver|kubectl|kubeadm|kube-controller-manager) ;; *) echo "k8s-binary.sh: unknown binary $name" >&2; exit 2 ;; esac
version="${2:-v1.37.2}"
case "$version" in v*) ;; *) version="v$version" ;; esac
staging_version="v0.${version#v1.}"

cache="${KLEIDI_CACHE:-$HOME/.cache/kleidi}"
dir="$cache/$name-$version"
bin="$dir/$name"

log() { printf 'k8s-binary.sh: %s\n' "$*" >&2; }

if [[ -x "$bin" ]]; then
	printf '%s\n' "$bin"
	exit 0
fi

command -v go >/dev/null || { log "go is not on PATH"; exit 1; }

mkdir -p "$dir"
work="$(mktemp -d "${TMPDIR:-/tmp}/$name-build.XXXXXX")"
trap 'rm -rf "$work"' EXIT

start=$SECONDS
log "building $name $version into $bin (first time only; kube-apiserver takes about 6 to 11 minutes on 2 cores, the others less once its modules are downloaded)"
log "step 1/4: downloading k8s.io/kubernetes@$version metadata"
gomod="$(cd "$work" && GOFLAGS=-mod=mod go mod download -json "k8s.io/kubernetes@$version" |
	sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')"
[[ -n "$gomod" && -f "$gomod" ]] || { log "could not locate go.mod of k8s.io/kubernetes@$version"; exit 1; }

staging=()
while IFS= read -r m; do staging+=("$m"); done < <(
	sed -n 's|^[[:space:]]*\(k8s\.io/[^[:space:]]*\)[[:space:]]*=>[[:space:]]*\./staging/.*$|\1|p' "$gomod" | sort -u)
[[ ${#staging[@]} -gt 0 ]] || { log "no staging replacements found in $gomod"; exit 1; }
log "step 2/4: writing a build module replacing ${#staging[@]} staging modules with $staging_version"

goversion="$(go env GOVERSION)"; goversion="${goversion#go}"
{
	echo "module k8s-build"
	echo
	echo "go ${goversion%.*}"
	echo
	echo "require k8s.io/kubernetes $version"
	echo
	echo "replace ("
	for m in "${staging[@]}"; do echo "	$m => $m $staging_version"; done
	echo ")"
} > "$work/go.mod"
cat > "$work/tools.go" <<'GO'
//go:build tools

package tools

import _ "k8s.io/kubernetes/cmd/NAME"
GO
sed -i "s|cmd/NAME|cmd/$name|" "$work/tools.go"

# heartbeat prints the elapsed time every 30 s while a long step runs.
heartbeat() {
	local what=$1
	while sleep 30; do log "  ... still $what ($((SECONDS - start)) s so far)"; done
}

log "step 3/4: resolving and downloading dependencies (go mod tidy)"
heartbeat "downloading" >/dev/null & hb=$!
trap 'kill $hb 2>/dev/null || true; rm -rf "$work"' EXIT
if ! (cd "$work" && go mod tidy >"$work/tidy.log" 2>&1); then
	cat "$work/tidy.log" >&2
	log "go mod tidy failed"
	exit 1
fi
kill $hb 2>/dev/null || true

log "step 4/4: compiling (this is the long part)"
heartbeat "compiling" >/dev/null & hb=$!
tmpbin="$dir/.$name.$$"
(cd "$work" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w \
	-X k8s.io/component-base/version.gitVersion=$version \
	-X k8s.io/component-base/version.gitMajor=1 \
	-X k8s.io/component-base/version.gitMinor=$(echo "$version" | cut -d. -f2) \
	-X k8s.io/component-base/version.gitTreeState=clean" \
	-o "$tmpbin" "k8s.io/kubernetes/cmd/$name") || { rm -f "$tmpbin"; log "build failed"; exit 1; }
kill $hb 2>/dev/null || true
mv -f "$tmpbin" "$bin"
log "done in $((SECONDS - start)) s"
printf '%s\n' "$bin"
