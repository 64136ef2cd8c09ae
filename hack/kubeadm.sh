#!/usr/bin/env bash
# Prints the path of a kubeadm binary of the given version, building it once
# into a cache outside the clone if it is not there yet.
#
#   hack/kubeadm.sh [VERSION]      (default v1.37.2)
#
# Cache: ${KLEIDI_CACHE:-$HOME/.cache/kleidi}/kubeadm-<VERSION>/kubeadm
# Built as hack/kube-apiserver.sh builds kube-apiserver: a throwaway Go module
# that requires k8s.io/kubernetes at VERSION and replaces each of its staging
# modules with the published module at v0.<minor>.<patch>. The version is
# stamped into the binary, since kubeadm compares it with kubernetesVersion.
# Progress goes to stderr, the path to stdout.
set -euo pipefail

version="${1:-v1.37.2}"
case "$version" in v*) ;; *) version="v$version" ;; esac
staging_version="v0.${version#v1.}"

cache="${KLEIDI_CACHE:-$HOME/.cache/kleidi}"
dir="$cache/kubeadm-$version"
bin="$dir/kubeadm"

log() { printf 'kubeadm.sh: %s\n' "$*" >&2; }

if [[ -x "$bin" ]]; then
	printf '%s\n' "$bin"
	exit 0
fi

command -v go >/dev/null || { log "go is not on PATH"; exit 1; }

mkdir -p "$dir"
work="$(mktemp -d "${TMPDIR:-/tmp}/kubeadm-build.XXXXXX")"
trap 'rm -rf "$work"' EXIT

start=$SECONDS
log "building kubeadm $version into $bin (first time only; about 3 minutes on 2 cores with a warm module cache)"
gomod="$(cd "$work" && GOFLAGS=-mod=mod go mod download -json "k8s.io/kubernetes@$version" |
	sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')"
[[ -n "$gomod" && -f "$gomod" ]] || { log "could not locate go.mod of k8s.io/kubernetes@$version"; exit 1; }

staging=()
while IFS= read -r m; do staging+=("$m"); done < <(
	sed -n 's|^[[:space:]]*\(k8s\.io/[^[:space:]]*\)[[:space:]]*=>[[:space:]]*\./staging/.*$|\1|p' "$gomod" | sort -u)
[[ ${#staging[@]} -gt 0 ]] || { log "no staging replacements found in $gomod"; exit 1; }

goversion="$(go env GOVERSION)"; goversion="${goversion#go}"
{
	echo "module kubeadm-build"
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

import _ "k8s.io/kubernetes/cmd/kubeadm"
GO

log "resolving dependencies (go mod tidy)"
if ! (cd "$work" && go mod tidy >"$work/tidy.log" 2>&1); then
	cat "$work/tidy.log" >&2
	log "go mod tidy failed"
	exit 1
fi

log "compiling"
tmpbin="$dir/.kubeadm.$$"
(cd "$work" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w \
	-X k8s.io/component-base/version.gitVersion=$version \
	-X k8s.io/component-base/version.gitMajor=1 \
	-X k8s.io/component-base/version.gitMinor=$(echo "$version" | cut -d. -f2) \
	-X k8s.io/component-base/version.gitTreeState=clean" \
	-o "$tmpbin" k8s.io/kubernetes/cmd/kubeadm) || { rm -f "$tmpbin"; log "build failed"; exit 1; }
mv -f "$tmpbin" "$bin"
log "done in $((SECONDS - start)) s"
printf '%s\n' "$bin"
