//! The soak with leak accounting (a bench binary, not a test): hybrid pods (a VM and a
//! Docker side-car) created and deleted on one node, two at a time, each used through
//! kubectl while it runs (`exec` into both containers, `logs` of both, `port-forward` to
//! the VM's SSH). A census of everything the node could leak is printed before, every
//! `VZK_SOAK_EVERY` pods (default 50) and after the last pod is gone:
//!
//! | column | what |
//! |---|---|
//! | qemu, helpers | QEMU processes; other processes started for the node (dnsmasq, virtiofsd) |
//! | taps, br_ports | TAP devices and bridge ports in the VMs' network namespace |
//! | leases | lines of dnsmasq's lease file |
//! | nft_lines | lines of the namespace's nftables ruleset |
//! | pod_dirs, vm_dirs | pod state dirs, QEMU state dirs |
//! | data_files, data_KiB | files and allocated KiB in the data dir, the image cache left out |
//! | containers, networks | side-car containers of the node (any state), Docker networks |
//! | fds, threads, rss_KiB, anon_KiB | the agent's descriptors, threads, resident and anonymous memory |
//! | events | Events in the namespace (the API server keeps them an hour) |
//!
//! At the end: the counters that must come back to their starting value and did not, and
//! the slope per pod of the agent's memory and descriptors (least squares over the rows).
//! The baseline is the census after one warm-up pod (the image pulled and cached); the
//! same run measures it, so the numbers compare within one run.
//!
//! `cargo bench -p vz-kubelet --bench soak` (root; needs what the tests need).
//! `VZK_SOAK_PODS` (default 300), `VZK_SOAK_EVERY` (default 50), `VZK_SOAK_PARALLEL`
//! (default 2).

use std::time::Instant;

#[path = "../tests/support/mod.rs"]
mod support;

use support::Cluster;
use support::soak::{
    Census, census, header, leaks, line, one_pod, settle, sidecar_image, slope, soak,
};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is understood.
    let total = env_or("VZK_SOAK_PODS", 300);
    let every = env_or("VZK_SOAK_EVERY", 50).max(1);
    let parallel = env_or("VZK_SOAK_PARALLEL", 2).max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("tokio runtime: {e}"));
    let c = rt.block_on(Cluster::start(
        "soak",
        &["--max-vms", &parallel.to_string()],
    ));
    let sidecar = sidecar_image(&c);
    let started = Instant::now();
    let empty = census(&c, 0, started);
    if let Err(e) = one_pod(&c, "soak-warm-up", &sidecar) {
        panic!("the warm-up pod: {e}");
    }
    let baseline = settle(&c, &empty, started);
    println!(
        "soak: {total} hybrid pods (VM + side-car), {parallel} at a time, exec/logs/port-forward in each; \
         the agent built with the bench profile"
    );
    println!("{}", header(&baseline));
    println!("{}  (baseline: after one warm-up pod)", line(&baseline));
    let rows = std::sync::Mutex::new(vec![baseline.clone()]);
    let failures = soak(
        &c,
        &sidecar,
        total,
        parallel,
        every,
        started,
        &|row: Census| {
            println!("{}", line(&row));
            if let Ok(mut r) = rows.lock() {
                r.push(row);
            }
        },
    );
    let mut after = settle(&c, &baseline, started);
    after.pods = total;
    println!("{}  (every pod deleted)", line(&after));
    let mut rows = rows.into_inner().unwrap_or_default();
    rows.push(after.clone());
    println!();
    println!(
        "pods failed: {} of {total}{}",
        failures.len(),
        failures
            .iter()
            .map(|(p, e)| format!("\n  {p}: {}", e.lines().next().unwrap_or_default()))
            .collect::<String>()
    );
    let leaked = leaks(&baseline, &after);
    println!(
        "leaks (counters above their baseline once every pod is gone): {}",
        if leaked.is_empty() {
            "none".to_owned()
        } else {
            leaked.join(", ")
        }
    );
    for k in ["rss_KiB", "anon_KiB", "fds", "threads", "data_KiB"] {
        println!("slope of {k}: {:+.2} per pod", slope(&rows, k));
    }
    let events = after.get("events").saturating_sub(baseline.get("events"));
    println!("events per pod: {:.1}", events as f64 / total.max(1) as f64);
    println!(
        "wall: {:.0} s ({:.1} s per pod)",
        after.secs,
        after.secs / total.max(1) as f64
    );
}
