#!/usr/bin/env bash
# Builds a real Debian 12 guest for vz-kubelet (issue 17, item 4; first step): systemd,
# OpenSSH and cloud-init in an ext4 root filesystem on a raw disk, booted by direct
# kernel boot with Debian's own kernel and initrd.
#
# Usage (root): scripts/build-debian-guest.sh OUTDIR [SIZE]
#
# Produces in OUTDIR: disk.img (raw ext4, SIZE, default 3G, sparse), kernel, initrd,
# cmdline, and config.json: an image directory for `vz-kubelet image push`. The guest
# takes the pod's SSH key and host name from vz-kubelet's cloud-init seed (NoCloud);
# it has no password and no key of its own.
#
# Needs: debootstrap and e2fsprogs (mkfs.ext4 -d), network to Debian's mirror.
# Verified by hand (not yet in CI): booted under QEMU TCG with a seed written by
# vzk_vm::cloud_init, cloud-init 22.4.2 set the host name and let root in with the
# pod's key ~40 s after power-on.
set -euo pipefail

out=${1:?usage: build-debian-guest.sh OUTDIR [SIZE]}
size=${2:-3G}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
[ "$(id -u)" = 0 ] || { echo "build-debian-guest: run as root (debootstrap, chroot)" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "build-debian-guest: needs debootstrap (apt-get install debootstrap)" >&2; exit 1; }

mkdir -p "$out"
out=$(cd "$out" && pwd)
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

echo '/dev/vda / ext4 defaults 0 1' >"$root/etc/fstab"
echo 'debian' >"$root/etc/hostname"
# No host keys in the image: every instance makes its own (cloud-init's ssh module).
rm -f "$root"/etc/ssh/ssh_host_*
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*

cp "$root"/boot/vmlinuz-* "$out/kernel.new"
cp "$root"/boot/initrd.img-* "$out/initrd.new"
rm -f "$out/disk.img.new"
mkfs.ext4 -q -F -L root -d "$root" "$out/disk.img.new" "$size"
printf 'root=/dev/vda rw console=ttyS0\n' >"$out/cmdline"
printf '{"mediatype":"application/vnd.vz-kubelet.vm.config.v1+json","os":"linux","arch":"amd64","kernelCmdline":"root=/dev/vda rw console=ttyS0","cpus":2,"memoryBytes":1073741824}\n' >"$out/config.json.new"
for f in kernel initrd disk.img config.json; do mv "$out/$f.new" "$out/$f"; done
echo "Debian guest built in $out: push it with vz-kubelet image push $out REGISTRY/debian:12"
