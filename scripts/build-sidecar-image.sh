#!/usr/bin/env bash
# Builds a tiny side-car image without the internet: a root filesystem holding only the
# static busybox of the Debian package busybox-static (/bin/busybox plus one symlink per
# applet), imported into the local dockerd with `docker import`.
#
#   scripts/build-sidecar-image.sh [IMAGE] [REGISTRY]
#
# IMAGE defaults to vzk/busybox:test. With REGISTRY (host:port, e.g. 127.0.0.1:5000; Docker
# treats 127.0.0.0/8 registries as insecure, so plain HTTP works) the image is also tagged
# REGISTRY/IMAGE and pushed there. Prints the final image name on stdout.
set -euo pipefail

image=${1:-vzk/busybox:test}
registry=${2:-}
busybox=${BUSYBOX:-/bin/busybox}

if [[ ! -x $busybox ]]; then
  echo "build-sidecar-image: $busybox not found (apt-get install busybox-static)" >&2
  exit 1
fi
if ! "$busybox" --list >/dev/null 2>&1; then
  echo "build-sidecar-image: $busybox does not look like busybox" >&2
  exit 1
fi

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,tmp,etc,proc,sys,dev}
chmod 1777 "$root/tmp"
cp "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list); do
  [[ $applet == busybox ]] && continue
  ln -sf busybox "$root/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"

tar -C "$root" -c . | docker import \
  --change 'ENV PATH=/bin' \
  --change 'CMD ["/bin/sh"]' \
  - "$image" >/dev/null

final=$image
if [[ -n $registry ]]; then
  final="$registry/$image"
  docker tag "$image" "$final"
  docker push "$final" >/dev/null
fi
echo "$final"
