//! The kubelet API under load (issue 16, item 5): hundreds of concurrent exec and
//! port-forward sessions, slowloris connections, a client that never reads. Every
//! assertion is about behaviour (each session gets its own bytes back, the server
//! closes what hangs, what the server holds for a stuck peer stops growing); timeouts
//! are only hang detectors.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::SinkExt;
use tokio::io::AsyncWriteExt;
use tokio::task::JoinSet;
use vzk_kubelet_api::spdy::Frame;

use crate::load_client::{self as lc, PARTIAL_CLIENT_HELLO};
use crate::support::{self, Opts, PANICS};

const SESSIONS: u32 = 200;

/// Waits for every task; returns the errors (with the task's index).
async fn failures(mut set: JoinSet<(u32, Result<(), String>)>, hang: Duration) -> Vec<String> {
    let mut bad = Vec::new();
    let mut done = std::collections::BTreeSet::new();
    let started = set.len();
    let all = async {
        while let Some(r) = set.join_next().await {
            match r {
                Ok((i, Ok(()))) => {
                    done.insert(i);
                }
                Ok((i, Err(e))) => {
                    done.insert(i);
                    bad.push(format!("#{i}: {e}"));
                }
                Err(e) => bad.push(format!("task: {e}")),
            }
        }
    };
    if tokio::time::timeout(hang, all).await.is_err() {
        // Tasks are numbered from 0 in spawn order: name the ones still running.
        let left: Vec<u32> = (0..u32::try_from(started).unwrap_or(u32::MAX))
            .filter(|i| !done.contains(i))
            .collect();
        bad.push(format!(
            "hang: {} of {started} tasks still running after {hang:?}: {:?}",
            left.len(),
            &left[..left.len().min(40)]
        ));
    }
    bad
}

/// The load tests run one at a time: each alone keeps two cores busy, and together (in
/// a debug build, beside the other tests of this binary) their hang detectors measure
/// the machine rather than the server.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A bystander exec of `cat` echoing 1 MiB, hang-detected.
async fn bystander(port: u16, cfg: &Arc<rustls::ClientConfig>, seed: u32) -> Result<(), String> {
    let p = lc::payload(seed, 1 << 20);
    let got = tokio::time::timeout(Duration::from_secs(60), lc::exec_echo(port, cfg, &p))
        .await
        .map_err(|_| "bystander exec hung".to_owned())??;
    if got != p {
        return Err(format!(
            "bystander got {} bytes, not its own 1 MiB",
            got.len()
        ));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_exec_and_two_hundred_port_forward_sessions_each_echo_their_own_bytes() {
    let _one_at_a_time = HEAVY.lock().await;
    let h = support::start("kapi-load", Opts::default()).await;
    let cfg = lc::client_config(&h, &h.apiserver_identity()).expect("client config");
    let echo = lc::echo_server().await.expect("echo server");
    let rss_before = lc::rss_kib();
    let mut set = JoinSet::new();
    for i in 0..SESSIONS {
        let (cfg1, port) = (cfg.clone(), h.port);
        set.spawn(async move {
            let cfg = cfg1;
            let p = lc::payload(i, 64 * 1024 + i as usize);
            let r = match lc::exec_echo(port, &cfg, &p).await {
                Ok(got) if got == p => Ok(()),
                Ok(got) => Err(format!(
                    "exec got {} bytes, not its own {}",
                    got.len(),
                    p.len()
                )),
                Err(e) => Err(format!("exec: {e}")),
            };
            (i, r)
        });
        let cfg = cfg.clone();
        set.spawn(async move {
            let p = lc::payload(10_000 + i, 64 * 1024 + i as usize);
            let r = match lc::port_forward_echo(port, &cfg, echo, &p).await {
                Ok(got) if got == p => Ok(()),
                Ok(got) => Err(format!("port-forward got other bytes ({})", got.len())),
                Err(e) => Err(format!("port-forward: {e}")),
            };
            (SESSIONS + i, r)
        });
    }
    let bad = failures(set, Duration::from_secs(180)).await;
    eprintln!(
        "RSS of the test process (server in-process): {rss_before:?} KiB before, {:?} KiB after 400 sessions",
        lc::rss_kib()
    );
    assert!(
        bad.is_empty(),
        "{} of 400 sessions failed: {bad:#?}",
        bad.len()
    );
    bystander(h.port, &cfg, 7)
        .await
        .expect("a session after the load");
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "no panic anywhere");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_do_not_stall_others_and_are_closed_by_the_server() {
    let _one_at_a_time = HEAVY.lock().await;
    let h = support::start("kapi-loris", Opts::default()).await;
    let cfg = lc::client_config(&h, &h.apiserver_identity()).expect("client config");
    let mut set = JoinSet::new();
    // 150 that send part of a ClientHello, 150 that send nothing, 50 that finish TLS and
    // dribble a request head one byte a second, 20 that finish TLS and send nothing.
    for i in 0..300u32 {
        let port = h.port;
        set.spawn(async move {
            let mut s = match lc::tcp(port, None).await {
                Ok(s) => s,
                Err(e) => return (i, Err(e)),
            };
            if i.is_multiple_of(2)
                && let Err(e) = s.write_all(&PARTIAL_CLIENT_HELLO).await
            {
                return (i, Err(format!("write: {e}")));
            }
            lc::closed_by_server(&mut s).await;
            (i, Ok(()))
        });
    }
    for i in 300..370u32 {
        let (cfg, port) = (cfg.clone(), h.port);
        set.spawn(async move {
            let s = match lc::tls(port, &cfg, None).await {
                Ok(s) => s,
                Err(e) => return (i, Err(e)),
            };
            let (mut rd, mut wr) = tokio::io::split(s);
            let line = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ";
            let dribbling = i < 350;
            tokio::select! {
                () = lc::closed_by_server(&mut rd) => (i, Ok(())),
                () = lc::dribble(&mut wr, line, Duration::from_secs(1)), if dribbling => {
                    lc::closed_by_server(&mut rd).await;
                    (i, Ok(()))
                }
            }
        });
    }
    // While all of them hang (handshake timeout 10 s, header read timeout 30 s), others
    // are served.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(set.len() >= 300, "the slowloris connections are still open");
    bystander(h.port, &cfg, 1)
        .await
        .expect("an exec session during the slowloris");
    let id = h.apiserver_identity();
    let (code, _) = h.request(Some(&id), "GET", "/healthz", &[]).await;
    assert_eq!(code, 200, "healthz during the slowloris");
    // The server closes every one of them (hang detector well past 30 s).
    let bad = failures(set, Duration::from_secs(150)).await;
    assert!(bad.is_empty(), "{bad:#?}");
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "no panic anywhere");
}

/// Percent-encodes a query value.
fn q(v: &str) -> String {
    v.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Samples `now` until it stops changing for `stable` (or the hang detector `hang`
/// fires); returns the last value.
async fn settles(
    mut now: impl FnMut() -> usize,
    stable: Duration,
    hang: Duration,
) -> Result<usize, usize> {
    let start = tokio::time::Instant::now();
    let mut last = now();
    let mut since = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let v = now();
        if v != last {
            (last, since) = (v, tokio::time::Instant::now());
        } else if since.elapsed() >= stable {
            return Ok(v);
        }
        if start.elapsed() > hang {
            return Err(v);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_client_that_never_reads_holds_a_bounded_amount_of_output() {
    let _one_at_a_time = HEAVY.lock().await;
    let h = support::start("kapi-noread", Opts::default()).await;
    let cfg = lc::client_config(&h, &h.apiserver_identity()).expect("client config");
    // The command writes 64 KiB blocks to stdout forever and counts them in a file.
    let count = h.dir.path().join("blocks");
    let script = format!(
        "while head -c 65536 /dev/zero; do echo >> {}; done",
        count.display()
    );
    let path = format!(
        "/exec/ns/p/c?command=sh&command=-c&command={}&input=1&output=1",
        q(&script)
    );
    let (out, inp) = lc::exec(h.port, &cfg, &path, Some(64 * 1024))
        .await
        .expect("exec session");
    let produced = || std::fs::metadata(&count).map_or(0, |m| m.len() as usize) * 65536;
    let held = settles(produced, Duration::from_secs(3), Duration::from_secs(60)).await;
    let held = held.unwrap_or_else(|v| {
        panic!("output kept flowing into a client that never reads: {v} bytes and growing")
    });
    assert!(held > 0, "the command ran");
    // Kernel socket buffers on loopback (a few MiB each way) + the session's 1 MiB queue.
    assert!(
        held < 32 << 20,
        "the server took {held} bytes of output for a client that never reads"
    );
    bystander(h.port, &cfg, 2)
        .await
        .expect("an exec session next to the stuck one");
    // The stuck client leaves: the session ends and the command with it.
    drop((out, inp));
    let ended = settles(produced, Duration::from_secs(3), Duration::from_secs(60)).await;
    assert!(ended.is_ok(), "the command stopped once the client left");
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "no panic anywhere");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_flood_from_a_client_that_never_reads_is_back_pressured() {
    let _one_at_a_time = HEAVY.lock().await;
    let h = support::start("kapi-pingflood", Opts::default()).await;
    let cfg = lc::client_config(&h, &h.apiserver_identity()).expect("client config");
    let s = lc::tls(h.port, &cfg, Some(64 * 1024)).await.expect("tls");
    let (mut out, inp) = lc::upgrade(s, "/portForward/ns/p", "portforward.k8s.io")
        .await
        .expect("upgrade");
    // 32 MiB of PINGs (12 bytes each), never reading the replies; and DATA for a stream
    // that does not exist (each answered with WINDOW_UPDATEs).
    const FLOOD: usize = 32 << 20;
    let written = Arc::new(AtomicUsize::new(0));
    let w = written.clone();
    let flood = tokio::spawn(async move {
        let mut id = 1u32;
        while w.load(Ordering::Relaxed) < FLOOD {
            for _ in 0..1000 {
                let f = if id.is_multiple_of(5) {
                    Frame::Data {
                        stream_id: 99,
                        fin: false,
                        data: Bytes::from_static(b"x"),
                    }
                } else {
                    Frame::Ping { id }
                };
                id = id.wrapping_add(2);
                if out.feed(f).await.is_err() {
                    return out;
                }
            }
            if out.flush().await.is_err() {
                return out;
            }
            w.fetch_add(1000 * 12, Ordering::Relaxed);
        }
        out
    });
    let got = settles(
        || written.load(Ordering::Relaxed),
        Duration::from_secs(3),
        Duration::from_secs(60),
    )
    .await;
    let got = got.unwrap_or_else(|v| panic!("the flood never stalled: {v} bytes"));
    assert!(
        got < FLOOD,
        "the server read all {got} bytes of PINGs without being able to answer: its queue grows without bound"
    );
    bystander(h.port, &cfg, 3)
        .await
        .expect("an exec session next to the flood");
    flood.abort();
    drop(inp);
    let id = h.apiserver_identity();
    let (code, _) = h.request(Some(&id), "GET", "/healthz", &[]).await;
    assert_eq!(code, 200, "server still serves");
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "no panic anywhere");
}
