#!/usr/bin/env bash
# Builds kleidi's images without a registry: each binary is built here as a static executable
# (CGO_ENABLED=0 -trimpath), then deploy/images/Containerfile copies it FROM scratch with /etc/passwd and
# /etc/group naming uid and gid 65532 nonroot.
#
#   deploy/images/build.sh [IMAGE...]      IMAGE: kleidi, kleidi-operator, kleidi-agent (default: all three)
#
# Environment:
#   REGISTRY   image name prefix (default ghcr.io/kleidi-kms): images are $REGISTRY/<image>:$VERSION
#   VERSION    image tag and org.opencontainers.image.version (default 0.1.0)
#   REVISION   org.opencontainers.image.revision (default: the checkout's commit, or unknown)
#   GOARCH     target architecture of the binaries and the image (default: the build host's)
#   PODMAN     the image builder (default podman; docker and buildah take the same arguments)
#
# Prints each image reference on stdout when it is built; progress goes to stderr.
set -euo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
registry="${REGISTRY:-ghcr.io/kleidi-kms}"
version="${VERSION:-0.1.0}"
revision="${REVISION:-$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)}"
podman="${PODMAN:-podman}"
export PATH="/usr/local/go/bin:$PATH"
goarch="${GOARCH:-$(go env GOARCH)}"

images=("$@")
[[ ${#images[@]} -gt 0 ]] || images=(kleidi kleidi-operator kleidi-agent)

operator_version="-X github.com/kleidi-kms/kleidi/operator/internal/cmdutil.Version=$version"

ctx="$(mktemp -d "${TMPDIR:-/tmp}/kleidi-images.XXXXXX")"
trap 'rm -rf "$ctx"' EXIT
cp -a "$root/deploy/images/rootfs" "$ctx/rootfs"
chmod 0644 "$ctx/rootfs/etc/passwd" "$ctx/rootfs/etc/group"

for image in "${images[@]}"; do
	case "$image" in
	# kleidi-server reports the library's version (kleidi.Version); the operator's commands report $VERSION.
	kleidi) module="examples/kleidi-server" pkg="." binary="kleidi-server" x="" ;;
	kleidi-operator) module="operator" pkg="./cmd/kleidi-operator" binary="kleidi-operator" x="$operator_version" ;;
	kleidi-agent) module="operator" pkg="./cmd/kleidi-agent" binary="kleidi-agent" x="$operator_version" ;;
	*) echo "build.sh: unknown image $image (kleidi, kleidi-operator, kleidi-agent)" >&2; exit 2 ;;
	esac
	echo "build.sh: go build $module/$pkg (CGO_ENABLED=0, GOARCH=$goarch)" >&2
	CGO_ENABLED=0 GOOS=linux GOARCH="$goarch" go -C "$root/$module" build -trimpath -ldflags="-s -w $x" -o "$ctx/$binary" "$pkg"
	ref="$registry/$image:$version"
	echo "build.sh: $podman build $ref" >&2
	"$podman" build --quiet --platform "linux/$goarch" -f "$root/deploy/images/Containerfile" --target "$image" \
		--build-arg "BINARY=$binary" --build-arg "VERSION=$version" --build-arg "REVISION=$revision" \
		-t "$ref" "$ctx" >&2
	printf '%s\n' "$ref"
done
