#!/usr/bin/env bash
# Type-checks (and lints) vzk-vz's macOS layer (crates/vzk-vz/src/macos) on a non-Apple
# host, then the workspace for aarch64-apple-darwin, so the Virtualization.framework
# backend and the macOS build never rot on Linux CI.
#
# How: objc2/block2/objc2-foundation type-check anywhere with their `gnustep-2-1`
# features; objc2-virtualization does too, except for its one unconditional
# `#[link(name = "Virtualization", kind = "framework")]`. This script copies that crate
# from the cargo registry to target/check-macos/, makes the link line Apple-only, and
# runs `cargo clippy -p vzk-vz --features typecheck` with a `[patch]` pointing at the
# copy. Nothing is linked, so no GNUstep or libdispatch is needed.
#
# The patch changes the lock file, so the check runs in a copy of the workspace's
# manifests and sources (target/check-macos/ws); the real Cargo.lock is never touched.
# Build artifacts go to the normal target directory.
#
# Second, the real macOS build is linted: `cargo-zigbuild clippy $mac_crates --all-targets
# --target aarch64-apple-darwin -- -D warnings` (Linux-only code such as QEMU, TAP and
# network namespaces is cfg-gated out; vzk-vz compiles its macOS layer natively). The C
# dependencies (aws-lc-sys, zstd-sys, blake3) are compiled for the target by zig
# (`cargo-zigbuild` sets CC/AR for it); clippy links nothing, so no Apple SDK is needed.
# This step needs the aarch64-apple-darwin standard library (installed with `rustup target
# add` if missing) and zig + cargo-zigbuild (`pip install ziglang cargo-zigbuild`); if
# either cannot be set up the script fails, it never skips.
set -euo pipefail
cd "$(dirname "$0")/.."

# What the aarch64-apple-darwin clippy covers: every crate, the binary, their tests.
mac_crates="--workspace"
root=$(pwd)
target_dir=${CARGO_TARGET_DIR:-$root/target}
work="$target_dir/check-macos"
manifest=crates/vzk-vz/Cargo.toml
log() { echo "[check-macos] $*"; }

# The two declarations of the objc2 stack (macOS: required; elsewhere: optional) must
# agree, or the macOS build would differ from what is checked here.
decl() { awk -v h="$1" '$0 == h {on=1; next} /^\[/ {on=0} on && NF' "$manifest" | sed 's/, optional = true//'; }
if ! diff <(decl "[target.'cfg(target_os = \"macos\")'.dependencies]") \
          <(decl "[target.'cfg(not(target_os = \"macos\"))'.dependencies]") >/dev/null; then
  echo "check-macos: the two objc2 dependency blocks of $manifest differ" >&2
  exit 1
fi

rm -rf "$work"
mkdir -p "$work/ws"
log "copying the workspace"
tar -C "$root" --exclude=./target --exclude='*/target' -cf - Cargo.toml Cargo.lock .cargo crates \
  | tar -C "$work/ws" -xf -
log "fetching crates"
(cd "$work/ws" && cargo fetch --quiet)

# Without the feature, a non-Apple build must not even compile the objc2 stack.
host=$(rustc -vV | sed -n 's/^host: //p')
case "$host" in
  *-apple-*) ;;
  *)
    if (cd "$work/ws" && cargo tree -q -p vzk-vz -e normal --target "$host" --prefix none) | grep -q '^objc2'; then
      echo "check-macos: a plain $host build of vzk-vz pulls in objc2" >&2
      exit 1
    fi
    ;;
esac

version=$(awk '$0 == "name = \"objc2-virtualization\"" {getline; gsub(/version = |"/, ""); print; exit}' "$work/ws/Cargo.lock")
if [ -z "$version" ]; then
  echo "check-macos: objc2-virtualization is not in Cargo.lock" >&2
  exit 1
fi
cargo_home=${CARGO_HOME:-$HOME/.cargo}
src=""
for d in "$cargo_home"/registry/src/*/objc2-virtualization-"$version"; do
  [ -f "$d/Cargo.toml" ] && src=$d && break
done
if [ -z "$src" ]; then
  # Downloaded but not unpacked: unpack the .crate ourselves.
  for f in "$cargo_home"/registry/cache/*/objc2-virtualization-"$version".crate; do
    [ -f "$f" ] || continue
    mkdir -p "$work/unpacked"
    tar -C "$work/unpacked" -xzf "$f"
    src="$work/unpacked/objc2-virtualization-$version"
    break
  done
fi
if [ -z "$src" ]; then
  echo "check-macos: objc2-virtualization $version not found in the cargo registry" >&2
  exit 1
fi

log "patching objc2-virtualization $version (from $src)"
cp -r "$src" "$work/objc2-virtualization"
chmod -R u+w "$work/objc2-virtualization"
modfile="$work/objc2-virtualization/src/generated/mod.rs"
line='#[link(name = "Virtualization", kind = "framework")]'
if [ "$(grep -cxF "$line" "$modfile")" != 1 ]; then
  echo "check-macos: expected exactly one '$line' in $modfile" >&2
  exit 1
fi
sed -i 's|^#\[link(name = "Virtualization", kind = "framework")\]$|#[cfg_attr(target_vendor = "apple", link(name = "Virtualization", kind = "framework"))]|' "$modfile"

log "cargo clippy -p vzk-vz --features typecheck"
cd "$work/ws"
CARGO_TARGET_DIR="$target_dir" cargo clippy -p vzk-vz --features typecheck --all-targets \
  --config "patch.crates-io.objc2-virtualization.path=\"$work/objc2-virtualization\"" \
  -- -D warnings
log "ok: the macOS layer type-checks"

mac_target=aarch64-apple-darwin
cd "$root"
fail() { echo "check-macos: $*" >&2; exit 1; }
if ! rustup target list --installed 2>/dev/null | grep -qx "$mac_target"; then
  log "installing the $mac_target standard library (rustup target add)"
  timeout 300 rustup target add "$mac_target" >&2 \
    || fail "cannot install the $mac_target standard library: 'rustup target add $mac_target' failed"
fi
rustup target list --installed 2>/dev/null | grep -qx "$mac_target" \
  || fail "the $mac_target standard library is not installed (rustup target add $mac_target)"
command -v cargo-zigbuild >/dev/null \
  || fail "cargo-zigbuild is not on PATH; install it and zig with: pip install ziglang cargo-zigbuild"
# cargo-zigbuild uses `zig` from PATH, else the one of the `ziglang` Python package.
if zig_version=$(zig version 2>/dev/null); then
  zig_from=$(command -v zig)
elif zig_version=$(python3 -m ziglang version 2>/dev/null); then
  zig_from="python3 -m ziglang"
else
  fail "zig is not installed (neither 'zig' on PATH nor the ziglang Python package); install it with: pip install ziglang cargo-zigbuild"
fi
log "cargo-zigbuild clippy $mac_crates --target $mac_target (zig $zig_version: $zig_from; $(cargo-zigbuild --version))"
# shellcheck disable=SC2086 # $mac_crates is a list of arguments
CARGO_TARGET_DIR="$target_dir" cargo-zigbuild clippy $mac_crates --all-targets --locked \
  --target "$mac_target" -- -D warnings
log "ok: $mac_crates type-checks and lints for $mac_target"
