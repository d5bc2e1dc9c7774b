//! Throughput benchmark (not a test): bytes per second through `kubectl exec -i -- cat`
//! and `kubectl port-forward` to a TCP echo server, over the SPDY path (the API server
//! translates) and the WebSocket path (the Node declares `ExtendWebSocketsToKubelet`),
//! next to a plain loopback TCP echo of the same bytes. Prints a table.
//!
//! Run: `KUBEBUILDER_ASSETS=… cargo bench -p vzk-kubelet-api --bench throughput`
//! (size in MiB from `VZK_BENCH_MIB`, default 256).

#![allow(unreachable_pub, clippy::unwrap_used)]

#[path = "../tests/it/runtime.rs"]
#[allow(dead_code)]
mod runtime;
#[path = "../tests/it/support.rs"]
#[allow(dead_code)]
mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

fn pattern(size: usize) -> Vec<u8> {
    (0..size as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

async fn echo_server() -> u16 {
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = echo.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = c.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    port
}

/// Writes `data` to `port` and reads it back; returns elapsed time.
async fn tcp_round_trip(port: u16, data: &[u8]) -> Duration {
    let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let start = Instant::now();
    let (mut r, mut w) = c.split();
    let writer = async {
        w.write_all(data).await.unwrap();
    };
    let reader = async {
        let mut got = vec![0u8; data.len()];
        r.read_exact(&mut got).await.unwrap();
        assert!(got == data, "echo corrupted");
    };
    tokio::join!(writer, reader);
    start.elapsed()
}

async fn exec_cat(h: &support::Harness, data: &[u8], file: &std::path::Path) -> Duration {
    std::fs::write(file, data).unwrap();
    let mut c = h.kubectl();
    c.args(["exec", "-i", &h.pod, "-c", "vm", "--", "cat"])
        .stdin(std::fs::File::open(file).unwrap())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let start = Instant::now();
    let mut child = c.spawn().unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut got = Vec::with_capacity(data.len());
    out.read_to_end(&mut got).await.unwrap();
    let status = child.wait().await.unwrap();
    let t = start.elapsed();
    assert!(status.success(), "kubectl exec failed");
    assert!(
        got == data,
        "exec output differs ({} of {} bytes)",
        got.len(),
        data.len()
    );
    t
}

async fn port_forward(h: &support::Harness, echo: u16, data: &[u8]) -> Duration {
    let mut pf = h.kubectl();
    pf.args([
        "port-forward",
        &format!("pod/{}", h.pod),
        &format!(":{echo}"),
    ])
    .stdout(Stdio::piped())
    .kill_on_drop(true);
    let mut child = pf.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let local: u16 = loop {
        let line = lines.next_line().await.unwrap().unwrap();
        if let Some(rest) = line.strip_prefix("Forwarding from 127.0.0.1:") {
            break rest.split_whitespace().next().unwrap().parse().unwrap();
        }
    };
    let t = tcp_round_trip(local, data).await;
    let _ = child.kill().await;
    t
}

fn row(name: &str, bytes: usize, t: Duration, base: f64) {
    let mibs = bytes as f64 / (1 << 20) as f64 / t.as_secs_f64();
    println!(
        "| {name:<40} | {:>8.2} | {:>10.1} | {:>6.3} |",
        t.as_secs_f64(),
        mibs,
        mibs / base
    );
}

#[tokio::main]
async fn main() {
    let mib: usize = std::env::var("VZK_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let data = pattern(mib << 20);
    let echo = echo_server().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("payload");

    let base_t = tcp_round_trip(echo, &data).await;
    let base = data.len() as f64 / (1 << 20) as f64 / base_t.as_secs_f64();
    println!("\n{mib} MiB each way, checked byte for byte\n");
    println!(
        "| {:<40} | {:>8} | {:>10} | {:>6} |",
        "path", "seconds", "MiB/s", "ratio"
    );
    println!("|{:-<42}|{:-<10}|{:-<12}|{:-<8}|", "", "", "", "");
    row("loopback TCP echo (baseline)", data.len(), base_t, base);
    for ws in [false, true] {
        let h = support::start(
            if ws { "bench-ws" } else { "bench" },
            support::Opts {
                websocket: ws,
                ..Default::default()
            },
        )
        .await;
        let label = if ws { "websocket" } else { "spdy" };
        let t = exec_cat(&h, &data, &file).await;
        row(
            &format!("kubectl exec -i -- cat ({label})"),
            data.len(),
            t,
            base,
        );
        let t = port_forward(&h, echo, &data).await;
        row(
            &format!("kubectl port-forward ({label})"),
            data.len(),
            t,
            base,
        );
    }
}
