#!/usr/bin/env bash
# Signs the vz-kubelet binary for a Mac host. Virtualization.framework refuses to create a VM
# in a process without the com.apple.security.virtualization entitlement; an ad-hoc signature
# (identity "-") is enough for it. Bridged networking additionally needs
# com.apple.vm.networking, a restricted entitlement Apple grants on request: pass
# --bridged and a real signing identity with a provisioning profile that carries it.
#
#   scripts/sign-macos.sh [--identity NAME] [--bridged] [BINARY]
#
# BINARY defaults to target/release/vz-kubelet. Prints the entitlements the binary then has.
set -euo pipefail
cd "$(dirname "$0")/.."
identity=-
bridged=0
bin=target/release/vz-kubelet
while [ $# -gt 0 ]; do
  case "$1" in
    --identity) identity=${2:?--identity needs a value}; shift 2 ;;
    --bridged) bridged=1; shift ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) bin=$1; shift ;;
  esac
done
[ "$(uname -s)" = Darwin ] || { echo "sign-macos: codesign runs on macOS only" >&2; exit 1; }
[ -f "$bin" ] || { echo "sign-macos: $bin not found (cargo build --release -p vz-kubelet)" >&2; exit 1; }
ent=crates/vzk-vz/vz-kubelet.entitlements
if [ "$bridged" = 1 ]; then
  [ "$identity" != - ] || { echo "sign-macos: --bridged needs a real --identity (com.apple.vm.networking is restricted)" >&2; exit 1; }
  ent=$(mktemp)
  trap 'rm -f "$ent"' EXIT
  /usr/libexec/PlistBuddy -c 'Add :com.apple.security.virtualization bool true' \
    -c 'Add :com.apple.vm.networking bool true' "$ent" >/dev/null
fi
# A real identity gets the hardened runtime (what notarization asks for); ad-hoc does not need it.
opts=()
[ "$identity" != - ] && opts=(--options runtime)
codesign --force "${opts[@]}" --sign "$identity" --entitlements "$ent" "$bin"
codesign --display --entitlements - "$bin"
