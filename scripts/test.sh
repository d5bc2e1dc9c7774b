#!/usr/bin/env bash
# The test command (see README): unit and integration tests against the real
# components (kube-apiserver + etcd from KUBEBUILDER_ASSETS, kubectl, dockerd, the
# registry, QEMU). Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${KUBEBUILDER_ASSETS:-}" ] && [ -x ../shared/k8s/kube-apiserver ]; then
  KUBEBUILDER_ASSETS=$(cd ../shared/k8s && pwd)
  export KUBEBUILDER_ASSETS
fi
# kubectl 1.37 from PyPI must win over any older kubectl on PATH.
pybin=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null || true)
[ -n "$pybin" ] && export PATH="$pybin:$PATH"
# Nested KVM on these machines can pass the accelerator probe and then crash real
# guests: pin TCG for the tests (see vzk_vm::qemu::probe::select_accel).
export VZK_ACCEL="${VZK_ACCEL:-tcg}"
exec cargo test --workspace --locked --no-fail-fast "$@"
