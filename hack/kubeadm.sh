#!/usr/bin/env bash
# Prints the path of a kubeadm binary of the given version, building it once into a cache outside the clone:
# hack/kubeadm.sh [VERSION] (default v1.37.2). The version is stamped into the binary, since kubeadm compares it
# with kubernetesVersion. See hack/k8s-binary.sh.
exec "$(dirname "$0")/k8s-binary.sh" kubeadm "$@"
