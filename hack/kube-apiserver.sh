#!/usr/bin/env bash
# Prints the path of a kube-apiserver binary of the given version, building it once into a cache outside the
# clone: hack/kube-apiserver.sh [VERSION] (default v1.37.2). See hack/k8s-binary.sh.
exec "$(dirname "$0")/k8s-binary.sh" kube-apiserver "$@"
