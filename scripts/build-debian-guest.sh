#!/usr/bin/env bash
# Builds a real Debian 12 guest for vz-kubelet (issue 17, item 4; first step): systemd,
# OpenSSH and cloud-init in an ext4 root filesystem on a raw disk, booted by direct
# kernel boot with Debian's own kernel and initrd.
#
# Usage (root): scripts/build-debian-guest.sh OUTDIR [SIZE]
#
# Produces two image directories for `vz-kubelet image push` from one root filesystem:
#   OUTDIR      direct kernel boot: disk.img (raw ext4 labelled "root", SIZE, default
#               3G, sparse), kernel, initrd, cmdline, config.json; and stamp
#   OUTDIR/efi  EFI boot (no kernel in the image): disk.img (GPT, SIZE: an EFI system
#               partition with GRUB at EFI/BOOT/BOOTX64.EFI, then the root filesystem),
#               config.json; booted by OVMF on QEMU. The guest takes the pod's SSH key, host name and user-data from
# vz-kubelet's cloud-init seed (NoCloud) and an address by DHCP on every Ethernet NIC,
# including one plugged in later (systemd-networkd; a VM restored from a template gets its
# NIC that way); it has no password and no key of its own, and powers off on the
# ACPI power button (systemd-logind). It prints "VZK-SSHD-START uptime=<secs>" to the
# kernel log when OpenSSH has started.
#
# Cached: when OUTDIR/stamp matches the hash of this script and SIZE, nothing is
# rebuilt (delete OUTDIR/stamp to take newer packages). Concurrent callers serialise
# on OUTDIR/.lock. Used by the tests (vzk_testenv::debian_guest) and
# `scripts/demo.sh --debian`.
#
# Needs: debootstrap, e2fsprogs (mkfs.ext4 -d), dosfstools (mkfs.fat), mtools, fdisk
# (sfdisk), network to Debian's mirror.
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
  && [ -f "$out/disk.img" ] && [ -f "$out/config.json" ] && [ -f "$out/efi/disk.img" ]; then
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
# grub-efi-amd64-bin: to build the EFI image's loader (nothing is installed to a disk).
pkgs=systemd-sysv,udev,dbus,openssh-server,cloud-init,python3-cffi-backend,linux-image-amd64,initramfs-tools,iproute2,sudo,grub-efi-amd64-bin
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
network: {config: disabled}
CFG
# The network: DHCP on every Ethernet NIC, whenever it appears, by systemd-networkd (not
# cloud-init's fallback config, which names the NIC present at first boot). A VM restored
# from a template loses the template's NIC and gets its own, with its own MAC: the client
# identifier is that MAC, so two VMs restored from one template never share a lease (the
# default, a DUID from the machine id, would be the template's for both).
cat >"$root/etc/systemd/network/50-vz-kubelet.network" <<'NET'
[Match]
Type=ether

[Network]
DHCP=ipv4

[DHCPv4]
ClientIdentifier=mac
NET
chroot "$root" systemctl enable systemd-networkd.service
# The kernel log (and so the console and `kubectl logs`) says when OpenSSH has started,
# as the busybox test guest does: systemd stops printing unit status once the serial
# getty owns the console. The pod_startup bench reads it.
mkdir -p "$root/etc/systemd/system/ssh.service.d"
cat >"$root/etc/systemd/system/ssh.service.d/vz-kubelet.conf" <<'UNIT'
[Service]
ExecStartPost=-/bin/sh -c 'echo "VZK-SSHD-START uptime=$$(cut -d" " -f1 /proc/uptime)" >/dev/kmsg'
UNIT
# The EFI image's loader: GRUB, standalone (its config inside), finds the root
# filesystem by label and boots /vmlinuz (Debian's symlink) with the same command line.
cat >"$root/tmp/grub.cfg" <<'GRUB'
set timeout=0
search --no-floppy --label root --set=root
linux /vmlinuz root=LABEL=root rw console=ttyS0
initrd /initrd.img
boot
GRUB
chroot "$root" grub-mkstandalone -O x86_64-efi -o /tmp/BOOTX64.EFI \
  --modules="part_gpt ext2 search_label linux normal" "boot/grub/grub.cfg=/tmp/grub.cfg"
mv "$root/tmp/BOOTX64.EFI" "$work/BOOTX64.EFI"
rm -f "$root/tmp/grub.cfg"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*

cp "$root"/boot/vmlinuz-* "$out/kernel.new"
cp "$root"/boot/initrd.img-* "$out/initrd.new"
rm -f "$out/disk.img.new"
mkfs.ext4 -q -F -L root -d "$root" "$out/disk.img.new" "$size"
printf 'root=LABEL=root rw console=ttyS0\n' >"$out/cmdline"
printf '{"mediatype":"application/vnd.vz-kubelet.vm.config.v1+json","os":"linux","arch":"amd64","kernelCmdline":"root=LABEL=root rw console=ttyS0","cpus":2,"memoryBytes":1073741824}\n' >"$out/config.json.new"

# OUTDIR/efi: the same root filesystem on a GPT disk after an EFI system partition
# holding GRUB as the removable-media loader (EFI/BOOT/BOOTX64.EFI), which firmware boots
# without boot entries: OVMF on QEMU (an image without a kernel boots by EFI).
mib=$(( $(numfmt --from=iec "$size") / 1048576 ))
root_mib=$(( mib - 66 ))   # 1 MiB GPT head, 64 MiB ESP, 1 MiB GPT backup
mkdir -p "$out/efi"
rm -f "$work/esp.img" "$work/root.img" "$out/efi/disk.img.new"
mkfs.fat -C -F 32 -n EFI "$work/esp.img" $(( 64 * 1024 )) >/dev/null
mmd -i "$work/esp.img" ::/EFI ::/EFI/BOOT
mcopy -i "$work/esp.img" "$work/BOOTX64.EFI" ::/EFI/BOOT/BOOTX64.EFI
mkfs.ext4 -q -F -L root -d "$root" "$work/root.img" "${root_mib}M"
truncate -s "${mib}M" "$out/efi/disk.img.new"
sfdisk -q "$out/efi/disk.img.new" <<PART
label: gpt
start=2048, size=131072, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name="EFI system"
start=133120, size=$(( root_mib * 2048 )), type=0FC63DAF-8483-4772-8E79-3D69ED477DE4, name=root
PART
dd if="$work/esp.img" of="$out/efi/disk.img.new" bs=1M seek=1 conv=notrunc status=none
dd if="$work/root.img" of="$out/efi/disk.img.new" bs=1M seek=65 conv=notrunc,sparse status=none
printf '{"mediatype":"application/vnd.vz-kubelet.vm.config.v1+json","os":"linux","arch":"amd64","cpus":2,"memoryBytes":1073741824}\n' >"$out/efi/config.json"
mv "$out/efi/disk.img.new" "$out/efi/disk.img"

for f in kernel initrd disk.img config.json; do mv "$out/$f.new" "$out/$f"; done
echo "$stamp" >"$out/stamp"
echo "Debian guest built in $out (direct kernel boot) and $out/efi (EFI): push with vz-kubelet image push DIR REGISTRY/debian:12"
