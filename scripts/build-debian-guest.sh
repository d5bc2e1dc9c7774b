#!/usr/bin/env bash
# Builds a real Debian 12 guest for vz-kubelet (issue 17, item 4; first step): systemd,
# OpenSSH and cloud-init in an ext4 root filesystem on a raw disk, booted by direct
# kernel boot with Debian's own kernel and initrd.
#
# Usage (root): scripts/build-debian-guest.sh OUTDIR [SIZE]
#
# Produces in OUTDIR: disk.img (raw ext4 labelled "root", SIZE, default 3G, sparse),
# kernel, initrd, cmdline, config.json (an image directory for `vz-kubelet image
# push`) and stamp. The guest takes the pod's SSH key, host name and user-data from
# vz-kubelet's cloud-init seed (NoCloud) and its address by DHCP (cloud-init's fallback
# network config); it has no password and no key of its own, and powers off on the
# ACPI power button (systemd-logind). It prints "VZK-SSHD-START uptime=<secs>" to the
# kernel log when OpenSSH has started.
#
# Cached: when OUTDIR/stamp matches the hash of this script and SIZE, nothing is
# rebuilt (delete OUTDIR/stamp to take newer packages). Concurrent callers serialise
# on OUTDIR/.lock. Used by the tests (vzk_testenv::debian_guest) and
# `scripts/demo.sh --debian`.
#
# Needs: debootstrap and e2fsprogs (mkfs.ext4 -d), network to Debian's mirror.
set -euo pipefail

out=${1:?usage: build-debian-guest.sh OUTDIR [SIZE]}
size=${2:-3G}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
[ "$(id -u)" = 0 ] || { echo "build-debian-guest: run as root (debootstrap, chroot)" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "build-debian-guest: needs debootstrap (apt-get install debootstrap)" >&2; exit 1; }

mkdir -p "$out"
out=$(cd "$out" && pwd)
exec 9>"$out/.lock"
flock 9
stamp=$( (cat "$0"; echo "$size") | sha256sum | cut -d' ' -f1)
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ] \
  && [ -f "$out/disk.img" ] && [ -f "$out/config.json" ]; then
  echo "Debian guest in $out is current (stamp $stamp)"
  exit 0
fi
rm -f "$out/stamp"
work=$(mktemp -d "$out/.build.XXXXXX")
cleanup() {
  umount "$work/root/proc" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
root="$work/root"

# python3-cffi-backend: debootstrap does not resolve the virtual packages that
# python3-cryptography (under cloud-init) depends on.
pkgs=systemd-sysv,udev,dbus,openssh-server,cloud-init,python3-cffi-backend,ifupdown,isc-dhcp-client,linux-image-amd64,initramfs-tools,iproute2,sudo
debootstrap --variant=minbase --include="$pkgs" bookworm "$root" "$mirror"

echo 'LABEL=root / ext4 defaults 0 1' >"$root/etc/fstab"
echo 'debian' >"$root/etc/hostname"
# No host keys in the image: every instance makes its own (cloud-init's ssh module), of
# the fast kinds only (an RSA key takes most of a minute under emulation). Only NoCloud
# (vz-kubelet's seed) is looked for: no probing of cloud metadata services.
rm -f "$root"/etc/ssh/ssh_host_*
cat >"$root/etc/cloud/cloud.cfg.d/90-vz-kubelet.cfg" <<'CFG'
datasource_list: [NoCloud, None]
ssh_genkeytypes: [ed25519, ecdsa]
CFG
# The kernel log (and so the console and `kubectl logs`) says when OpenSSH has started,
# as the busybox test guest does: systemd stops printing unit status once the serial
# getty owns the console. The pod_startup bench reads it.
mkdir -p "$root/etc/systemd/system/ssh.service.d"
cat >"$root/etc/systemd/system/ssh.service.d/vz-kubelet.conf" <<'UNIT'
[Service]
ExecStartPost=-/bin/sh -c 'echo "VZK-SSHD-START uptime=$$(cut -d" " -f1 /proc/uptime)" >/dev/kmsg'
UNIT
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*

cp "$root"/boot/vmlinuz-* "$out/kernel.new"
cp "$root"/boot/initrd.img-* "$out/initrd.new"
rm -f "$out/disk.img.new"
mkfs.ext4 -q -F -L root -d "$root" "$out/disk.img.new" "$size"
printf 'root=LABEL=root rw console=ttyS0\n' >"$out/cmdline"
printf '{"mediatype":"application/vnd.vz-kubelet.vm.config.v1+json","os":"linux","arch":"amd64","kernelCmdline":"root=LABEL=root rw console=ttyS0","cpus":2,"memoryBytes":1073741824}\n' >"$out/config.json.new"
for f in kernel initrd disk.img config.json; do mv "$out/$f.new" "$out/$f"; done
echo "$stamp" >"$out/stamp"
echo "Debian guest built in $out: push it with vz-kubelet image push $out REGISTRY/debian:12"
