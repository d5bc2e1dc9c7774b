#!/usr/bin/env bash
# Builds the tiny Linux test guest the VM runtime tests boot under QEMU.
#
# Usage: scripts/build-test-guest.sh OUTDIR [AUTHORIZED_PUBKEY_FILE]
#
# Produces in OUTDIR:
#   vmlinuz          Debian's kernel (from linux-image-amd64, downloaded, not installed)
#   initramfs.gz     busybox-static + dropbear, dropbearkey (+ libraries) + virtio/9p/ACPI modules + init
#   disk.raw         a small raw disk (16 MiB, no filesystem) for virtio-blk tests
#   id_ed25519       the root login key (dropbear format; unless a public key was given)
#   id_ed25519.pub   its OpenSSH public key (what the guest's authorized_keys holds)
#   cmdline          the recommended kernel command line
#   stamp            the cache key of this build
#
# The guest's boot script (guest/rc, run by busybox init) loads the virtio modules, reads a cloud-init NoCloud
# seed disk if one is attached (its host name, and its SSH keys added to root's; a stand-in for cloud-init in
# this busybox guest), runs udhcpc on eth0 and on any NIC plugged in later (guest/net-hotplug), starts dropbear on port 22 and powers off on the ACPI power button. Kernel command line flags:
#   vzk.ignore_acpi=1   ignore the power button (for force-stop tests)
# It prints "VZK-SSHD-START uptime=<secs>" to the console when sshd starts.
#
# Cached: when OUTDIR/stamp matches the hash of the inputs (this script, guest/*, the
# kernel/busybox/dropbear package versions, the given key), nothing is rebuilt.
# Concurrent callers serialise on OUTDIR/.lock. Needs: apt-get (network to Debian's
# mirror on the first build), dpkg-deb, busybox-static, dropbear-bin, cpio, gzip.
set -euo pipefail

out=${1:?usage: build-test-guest.sh OUTDIR [AUTHORIZED_PUBKEY_FILE]}
pubkey_in=${2:-}
here=$(cd "$(dirname "$0")" && pwd)
guest_dir="$here/../guest"
mkdir -p "$out"
out=$(cd "$out" && pwd)

exec 9>"$out/.lock"
flock 9

kernel_pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
[ -n "$kernel_pkg" ] || { echo "cannot resolve linux-image-amd64 (apt-get update?)" >&2; exit 1; }
kernel_ver=$(apt-cache policy "$kernel_pkg" | awk '/Candidate:/ {print $2}')
versions="$kernel_pkg=$kernel_ver $(dpkg-query -W -f='${Package}=${Version} ' busybox-static dropbear-bin)"
key_input=""
[ -n "$pubkey_in" ] && key_input=$(cat "$pubkey_in")
key=$( { cat "$0" "$guest_dir"/*; echo "$versions"; echo "$key_input"; } | sha256sum | cut -c1-16)

if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$key" ] \
   && [ -f "$out/vmlinuz" ] && [ -f "$out/initramfs.gz" ] && [ -f "$out/disk.raw" ]; then
  echo "test guest up to date in $out ($key)"
  exit 0
fi
start=$(date +%s%N)
rm -f "$out/stamp"

work=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT

# 1. The kernel package: keep the .deb between builds (it is the slow part).
deb=$(ls "$out"/"${kernel_pkg}"_*.deb 2>/dev/null | head -n1 || true)
if [ -z "$deb" ]; then
  rm -f "$out"/linux-image-*.deb
  (cd "$work" && apt-get download -q "$kernel_pkg" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
  mv "$work"/"${kernel_pkg}"_*.deb "$out"/
  deb=$(ls "$out"/"${kernel_pkg}"_*.deb | head -n1)
fi
kver=${kernel_pkg#linux-image-}
modules="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci failover net_failover virtio_net virtio_blk netfs fscache 9pnet 9pnet_virtio 9p button evdev fat vfat nls_cp437 nls_ascii"
globs=("./boot/vmlinuz-$kver")
for m in $modules; do globs+=("./lib/modules/$kver/kernel/*/$m.ko" "./lib/modules/$kver/kernel/*/*/$m.ko"); done
mkdir -p "$work/deb"
dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$work/deb" --wildcards --no-anchored "${globs[@]}" 2>/dev/null || true
cp "$work/deb/boot/vmlinuz-$kver" "$out/vmlinuz.new"

# 2. The root filesystem.
r="$work/root"
mkdir -p "$r"/{bin,sbin,etc/dropbear,proc,sys,dev,tmp,run,root/.ssh,lib/modules,var/log,usr/bin,usr/sbin}
chmod 700 "$r/root" "$r/root/.ssh"
chmod 1777 "$r/tmp"
cp /bin/busybox "$r/bin/busybox"
for m in $modules; do
  f=$(find "$work/deb/lib/modules" -name "$m.ko" | head -n1)
  [ -n "$f" ] || { echo "module $m not found in $deb" >&2; exit 1; }
  cp "$f" "$r/lib/modules/$m.ko"
done
echo "$modules" >"$r/etc/modules.order"
cp /usr/sbin/dropbear "$r/usr/sbin/dropbear"
# dropbearkey: a VM restored from a template makes its new host key at once and prints it.
cp /usr/bin/dropbearkey "$r/usr/bin/dropbearkey"
ldd /usr/sbin/dropbear /usr/bin/dropbearkey | awk '/=>/ {print $3} /ld-linux/ {print $1}' | while read -r lib; do
  [ -f "$lib" ] || continue
  mkdir -p "$r$(dirname "$lib")"
  cp -L "$lib" "$r$lib"
done
# glibc's loader is looked up by its canonical path.
if [ ! -e "$r/lib64/ld-linux-x86-64.so.2" ]; then
  mkdir -p "$r/lib64" && cp -L /lib64/ld-linux-x86-64.so.2 "$r/lib64/"
fi
cp "$guest_dir/init" "$r/init"
cp "$guest_dir/rc" "$r/etc/rc"
cp "$guest_dir/inittab" "$r/etc/inittab"
cp "$guest_dir/udhcpc.script" "$r/etc/udhcpc.script"
cp "$guest_dir/net-hotplug" "$r/etc/net-hotplug"
chmod 755 "$r/init" "$r/etc/rc" "$r/etc/udhcpc.script" "$r/etc/net-hotplug"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$r/etc/passwd"
printf 'root:x:0:\n' >"$r/etc/group"
printf '/bin/sh\n' >"$r/etc/shells"
printf 'vzk-test-guest\n' >"$r/etc/hostname"

# 3. The login key: given, or generated once and kept.
if [ -n "$pubkey_in" ]; then
  cp "$pubkey_in" "$out/id_ed25519.pub.new"
else
  if [ ! -f "$out/id_ed25519" ]; then
    dropbearkey -t ed25519 -f "$out/id_ed25519" >/dev/null 2>&1
  fi
  dropbearkey -y -f "$out/id_ed25519" | grep '^ssh-' >"$out/id_ed25519.pub.new"
fi
cp "$out/id_ed25519.pub.new" "$r/root/.ssh/authorized_keys"
chmod 600 "$r/root/.ssh/authorized_keys"

# 4. Pack.
(cd "$r" && find . -print0 | cpio --null -o -H newc -R 0:0 --quiet) | gzip -1 >"$out/initramfs.gz.new"
truncate -s 16M "$out/disk.raw.new"
printf 'console=ttyS0 panic=-1 quiet loglevel=3 random.trust_cpu=on init_on_free=1\n' >"$out/cmdline"
mv "$out/vmlinuz.new" "$out/vmlinuz"
mv "$out/initramfs.gz.new" "$out/initramfs.gz"
mv "$out/disk.raw.new" "$out/disk.raw"
mv "$out/id_ed25519.pub.new" "$out/id_ed25519.pub"
echo "$key" >"$out/stamp"
echo "test guest built in $out ($key) in $(( ($(date +%s%N) - start) / 1000000 )) ms"
