//! The soak's CI variant (the bench `benches/soak.rs` runs hundreds): a few hybrid pods (a
//! VM and a Docker side-car) created and deleted two at a time on one node, each used with
//! `kubectl exec` (both containers), `logs` (both) and `port-forward` (the VM's SSH) while
//! it runs. After a warm-up pod (the image pulled and cached), the node's census is taken;
//! once every pod is gone again, everything that could leak is back at that value: QEMU
//! and helper processes (virtiofsd, dnsmasq), TAP devices and bridge ports, DHCP leases,
//! nftables rules, pod and VM state dirs, files in the data dir (clones, consoles, sockets),
//! side-car containers and Docker networks. `VZK_SOAK_PODS` sets the number (default 4).

use std::time::Instant;

mod support;

use support::Cluster;
use support::soak::{census, header, leaks, line, one_pod, settle, sidecar_image, soak};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_come_and_go_and_the_node_keeps_nothing_of_them() {
    let total: usize = std::env::var("VZK_SOAK_PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let c = Cluster::start("soak", &["--max-vms", "2"]).await;
    let sidecar = sidecar_image(&c);
    let started = Instant::now();
    let empty = census(&c, 0, started);
    if let Err(e) = one_pod(&c, "soak-warm-up", &sidecar) {
        panic!("the warm-up pod: {e}");
    }
    let baseline = settle(&c, &empty, started);
    eprintln!(
        "{}\n{} (after the warm-up pod)",
        header(&baseline),
        line(&baseline)
    );
    let failures = tokio::task::block_in_place(|| {
        soak(&c, &sidecar, total, 2, total.max(1), started, &|row| {
            eprintln!("{}", line(&row));
        })
    });
    assert!(failures.is_empty(), "pods that failed: {failures:#?}");
    let mut after = settle(&c, &baseline, started);
    after.pods = total;
    eprintln!("{}", line(&after));
    let leaked = leaks(&baseline, &after);
    assert!(
        leaked.is_empty(),
        "the node kept something of {total} pods: {leaked:?}\n{}\n{}\n{}",
        header(&after),
        line(&baseline),
        line(&after)
    );
    // The warm-up pod's resources came and went too: the census with no pod ever run
    // and the one after the warm-up differ only in what the image cache holds.
    let before_any = leaks(&empty, &baseline);
    assert!(
        before_any.is_empty(),
        "the warm-up pod left: {before_any:?}\n{}\n{}\n{}",
        header(&empty),
        line(&empty),
        line(&baseline)
    );
}
