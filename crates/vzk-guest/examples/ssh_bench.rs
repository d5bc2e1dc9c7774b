//! Benchmark of guest SSH access against a real dropbear on loopback (needs root,
//! dropbear-bin, openssh-client, openssl; see tests/guest/support.rs).
//!
//! `cargo run --release -p vzk-guest --example ssh_bench [-- N]` prints a table:
//! first dial (TCP + handshake + auth), exec round trip on the persistent
//! connection, the same with a fresh connection per exec (what a dial-per-exec
//! client pays), stdin→`cat`→stdout throughput, and port-forward throughput.

#[path = "../tests/guest/support.rs"]
#[allow(dead_code, unreachable_pub)]
mod support;

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vzk_core::streams::AttachIo;

fn stats(mut v: Vec<Duration>) -> (Duration, Duration, Duration) {
    v.sort();
    let p = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    (p(0.5), p(0.9), p(0.99))
}

fn row(name: &str, (p50, p90, p99): (Duration, Duration, Duration)) {
    println!(
        "| {name:<38} | {:>9.2?} | {:>9.2?} | {:>9.2?} |",
        p50, p90, p99
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200);
    let db = support::Dropbear::start();

    // First dial of a session: connect + handshake + auth + one exec.
    let mut dials = Vec::new();
    for _ in 0..n.min(50) {
        let s = db.session();
        let t = Instant::now();
        assert!(s.ready().await, "guest not ready: {}", db.log());
        dials.push(t.elapsed());
        s.close();
    }

    let s = db.session();
    assert!(s.ready().await);
    let mut execs = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let out = s
            .output(&["true"])
            .await
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert!(out.status.success());
        execs.push(t.elapsed());
    }

    // Throughput: 64 MiB through `cat`.
    let size = 64usize << 20;
    let (stdin_w, stdin_r) = tokio::io::duplex(1 << 16);
    let (out_w, mut out_r) = tokio::io::duplex(1 << 16);
    let io = AttachIo {
        stdin: Some(Box::pin(stdin_r)),
        stdout: Some(Box::pin(out_w)),
        stderr: None,
        tty: false,
        resize: None,
    };
    let t = Instant::now();
    let writer = tokio::spawn(async move {
        let mut w = stdin_w;
        let chunk = vec![0x5au8; 1 << 16];
        for _ in 0..(size >> 16) {
            w.write_all(&chunk).await.unwrap_or_else(|e| panic!("{e}"));
        }
    });
    let reader = tokio::spawn(async move {
        let mut total = 0usize;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let k = out_r.read(&mut buf).await.unwrap_or_else(|e| panic!("{e}"));
            if k == 0 {
                break total;
            }
            total += k;
        }
    });
    let st = s
        .exec(&["cat"], io)
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert!(st.success());
    let _ = writer.await;
    let got = reader.await.unwrap_or_else(|e| panic!("{e}"));
    let cat_secs = t.elapsed().as_secs_f64();
    assert_eq!(got, size);

    // Port forward: 64 MiB each way through a loopback echo server.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let port = l.local_addr().unwrap_or_else(|e| panic!("{e}")).port();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = c.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let (client, ours) = tokio::io::duplex(1 << 16);
    let s2 = s.clone();
    let t = Instant::now();
    let fwd = tokio::spawn(async move { s2.forward_tcp(port, Box::pin(ours)).await });
    let (mut rd, mut wr) = tokio::io::split(client);
    let w = tokio::spawn(async move {
        let chunk = vec![0xa5u8; 1 << 16];
        for _ in 0..(size >> 16) {
            wr.write_all(&chunk).await.unwrap_or_else(|e| panic!("{e}"));
        }
        let _ = wr.shutdown().await;
    });
    let mut total = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    while total < size {
        let k = rd.read(&mut buf).await.unwrap_or_else(|e| panic!("{e}"));
        if k == 0 {
            break;
        }
        total += k;
    }
    let fwd_secs = t.elapsed().as_secs_f64();
    let _ = w.await;
    drop(rd);
    let _ = fwd.await;
    assert_eq!(total, size);

    println!("vzk-guest SSH benchmark (dropbear 127.0.0.1, n={n})");
    println!(
        "| {:<38} | {:>9} | {:>9} | {:>9} |",
        "operation", "p50", "p90", "p99"
    );
    println!("|{:-<40}|{:-<11}|{:-<11}|{:-<11}|", "", "", "", "");
    row("fresh dial+auth + `true` per exec", stats(dials));
    row("`true` on the persistent connection", stats(execs));
    let mib = (size >> 20) as f64;
    println!(
        "| {:<38} | {:>9.1} MiB/s           |",
        "stdin -> cat -> stdout (64 MiB)",
        mib / cat_secs
    );
    println!(
        "| {:<38} | {:>9.1} MiB/s           |",
        "port-forward echo (64 MiB each way)",
        mib / fwd_secs
    );
    println!("dials on the persistent session: {}", s.dial_count());
}
