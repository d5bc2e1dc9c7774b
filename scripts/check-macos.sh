#!/usr/bin/env bash
# Type-checks (and lints) vzk-vz's macOS layer (crates/vzk-vz/src/macos) on a non-Apple
# host, so the Virtualization.framework backend never rots on Linux CI.
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
# Second, where the aarch64-apple-darwin standard library is installed (or `rustup target
# add` can install it), the real macOS build is type-checked too: `cargo clippy -p vzk-vm
# -p vzk-vz --target aarch64-apple-darwin` (vzk-vm's Linux-only QEMU/network modules are
# cfg-gated out; vzk-vz compiles its macOS layer natively). `cargo check` links nothing,
# so no Apple SDK is needed. Without the target this step is skipped with a message.
set -euo pipefail
cd "$(dirname "$0")/.."
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
if ! rustup target list --installed 2>/dev/null | grep -qx "$mac_target"; then
  log "installing the $mac_target standard library (rustup target add)"
  timeout 300 rustup target add "$mac_target" >/dev/null 2>&1 || true
fi
if rustup target list --installed 2>/dev/null | grep -qx "$mac_target"; then
  log "cargo clippy -p vzk-vm -p vzk-vz --target $mac_target"
  CARGO_TARGET_DIR="$target_dir" cargo clippy -p vzk-vm -p vzk-vz --all-targets --locked \
    --target "$mac_target" -- -D warnings
  log "ok: vzk-vm and vzk-vz type-check for $mac_target"
else
  log "skipped: the $mac_target standard library is not installed and rustup cannot add it"
fi
