//! Load benchmark (not a test; issue 16, item 5): a bystander exec session's echo
//! throughput (SPDY, our codec as client, `cat` in the process double) alone, then with
//! 200 exec + 200 port-forward sessions active, then during a slowloris; with the
//! process's RSS at each step. The server runs in this process, so the RSS is the
//! server's plus the bench's own clients. Prints a table.
//!
//! Run: `KUBEBUILDER_ASSETS=… cargo bench -p vzk-kubelet-api --bench load` (bystander
//! payload in MiB from `VZK_BENCH_MIB`, default 64; slowloris connections from
//! `VZK_BENCH_LORIS`, default 1000).

#![allow(unreachable_pub, clippy::unwrap_used)]

#[path = "../tests/it/load_client.rs"]
#[allow(dead_code)]
mod load_client;
#[path = "../tests/it/runtime.rs"]
#[allow(dead_code)]
mod runtime;
#[path = "../tests/it/support.rs"]
#[allow(dead_code)]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use load_client as lc;

const SESSIONS: u32 = 200;
/// Each background session echoes this many bytes, then pauses.
const BG_CHUNK: usize = 4096;
const BG_PAUSE: Duration = Duration::from_millis(50);

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_mib() -> f64 {
    lc::rss_kib().unwrap_or(0) as f64 / 1024.0
}

/// The bystander: one exec of `cat` echoing `data`; MiB/s.
async fn bystander(port: u16, cfg: &Arc<rustls::ClientConfig>, data: &[u8]) -> f64 {
    let start = Instant::now();
    let got = lc::exec_echo(port, cfg, data).await.unwrap();
    let t = start.elapsed();
    assert!(got == data, "bystander echo corrupted");
    data.len() as f64 / (1 << 20) as f64 / t.as_secs_f64()
}

/// Background sessions echoing `BG_CHUNK` every `BG_PAUSE` until `stop`; counts bytes.
fn background(
    set: &mut JoinSet<()>,
    port: u16,
    cfg: &Arc<rustls::ClientConfig>,
    echo: u16,
    stop: &Arc<AtomicBool>,
    moved: &Arc<AtomicU64>,
    ready: &Arc<AtomicU64>,
) {
    for i in 0..2 * SESSIONS {
        let (cfg, stop, moved, ready) = (cfg.clone(), stop.clone(), moved.clone(), ready.clone());
        set.spawn(async move {
            let exec = i < SESSIONS;
            let (mut out, mut inp) = if exec {
                lc::exec_cat(port, &cfg).await.unwrap()
            } else {
                lc::port_forward(port, &cfg, echo).await.unwrap()
            };
            let (to, from) = if exec { (3, 5) } else { (3, 3) };
            let data = lc::payload(i, BG_CHUNK);
            let mut first = true;
            while !stop.load(Ordering::Relaxed) {
                let got = lc::round_trip(&mut out, &mut inp, to, from, &data)
                    .await
                    .unwrap();
                assert!(got == data, "background session {i} got other bytes");
                moved.fetch_add(BG_CHUNK as u64, Ordering::Relaxed);
                if first {
                    ready.fetch_add(1, Ordering::Relaxed);
                    first = false;
                }
                tokio::time::sleep(BG_PAUSE).await;
            }
        });
    }
}

/// `n` slowloris connections: 9 in 10 TCP with part of a ClientHello, 1 in 10 TLS
/// dribbling a request head a byte a second. Each ends when the server closes it.
fn slowloris(set: &mut JoinSet<()>, port: u16, cfg: &Arc<rustls::ClientConfig>, n: usize) {
    for i in 0..n {
        let cfg = cfg.clone();
        set.spawn(async move {
            if i.is_multiple_of(10) {
                let s = lc::tls(port, &cfg, None).await.unwrap();
                let (mut rd, mut wr) = tokio::io::split(s);
                tokio::select! {
                    () = lc::closed_by_server(&mut rd) => {}
                    () = lc::dribble(&mut wr, b"GET /healthz HTTP/1.1\r\nX-Slow: ", Duration::from_secs(1)) => {}
                }
            } else {
                use tokio::io::AsyncWriteExt;
                let mut s = lc::tcp(port, None).await.unwrap();
                s.write_all(&lc::PARTIAL_CLIENT_HELLO).await.unwrap();
                lc::closed_by_server(&mut s).await;
            }
        });
    }
}

fn row(step: &str, mibs: f64, base: f64, rss: f64, note: &str) {
    println!(
        "| {step:<44} | {mibs:>9.1} | {:>6.3} | {rss:>8.1} | {note}",
        mibs / base
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mib = env("VZK_BENCH_MIB", 64);
    let loris = env("VZK_BENCH_LORIS", 1000);
    let data = lc::payload(42, mib << 20);
    let h = support::start("bench-load", support::Opts::default()).await;
    let cfg = lc::client_config(&h, &h.apiserver_identity()).unwrap();
    let echo = lc::echo_server().await.unwrap();
    let rss_start = rss_mib();

    let _ = bystander(h.port, &cfg, &data).await; // warm-up (SAR cache, code paths), not counted
    let base = bystander(h.port, &cfg, &data).await;
    let rss_base = rss_mib();

    let stop = Arc::new(AtomicBool::new(false));
    let (moved, ready) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut bg = JoinSet::new();
    background(&mut bg, h.port, &cfg, echo, &stop, &moved, &ready);
    while ready.load(Ordering::Relaxed) < u64::from(2 * SESSIONS) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (m0, t0) = (moved.load(Ordering::Relaxed), Instant::now());
    let loaded = bystander(h.port, &cfg, &data).await;
    let bg_rate =
        (moved.load(Ordering::Relaxed) - m0) as f64 / (1 << 20) as f64 / t0.elapsed().as_secs_f64();
    let rss_loaded = rss_mib();
    stop.store(true, Ordering::Relaxed);
    while bg.join_next().await.is_some() {}

    let mut lset = JoinSet::new();
    slowloris(&mut lset, h.port, &cfg, loris);
    while lset.len() < loris {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let during = bystander(h.port, &cfg, &data).await;
    let rss_loris = rss_mib();
    let closing = Instant::now();
    while lset.join_next().await.is_some() {}
    let closed_after = closing.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = bystander(h.port, &cfg, &data).await;
    let rss_after = rss_mib();

    println!(
        "\nbystander: one SPDY exec of `cat` echoing {mib} MiB (our codec as client); the baseline \
         (bystander alone) is measured in this same run, first. RSS is this process's VmRSS \
         (/proc/self/status): the in-process server plus the bench's own clients; {rss_start:.1} MiB \
         after the harness started.\n"
    );
    println!(
        "| {:<44} | {:>9} | {:>6} | {:>8} | notes",
        "step", "MiB/s", "ratio", "RSS MiB"
    );
    println!("|{:-<46}|{:-<11}|{:-<8}|{:-<10}|------", "", "", "", "");
    row(
        "bystander alone (baseline, this run)",
        base,
        base,
        rss_base,
        "",
    );
    row(
        "with 200 exec + 200 port-forward active",
        loaded,
        base,
        rss_loaded,
        &format!(
            "each echoes {BG_CHUNK} B every {BG_PAUSE:?}; {bg_rate:.1} MiB/s moved by them meanwhile"
        ),
    );
    row(
        &format!("during a slowloris of {loris} connections"),
        during,
        base,
        rss_loris,
        "9/10 half a ClientHello, 1/10 TLS + a head dribbled 1 B/s",
    );
    row(
        "after the server closed the slowloris",
        after,
        base,
        rss_after,
        &format!(
            "all closed {:.1} s after the bystander ran",
            closed_after.as_secs_f64()
        ),
    );
}
