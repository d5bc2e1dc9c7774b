//! Real kubectl through the real API server to our kubelet API, over both paths: SPDY
//! (the API server translates kubectl's WebSocket to SPDY, or relays the port-forward
//! tunnel's SPDY) and WebSocket (the Node declares `ExtendWebSocketsToKubelet`, so the
//! API server passes kubectl's WebSocket straight through).

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::support::{self, Harness, Opts};

async fn run(h: &Harness, args: &[&str], stdin: Option<&[u8]>) -> (i32, String, String) {
    let mut c = h.kubectl();
    c.args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if stdin.is_some() {
        c.stdin(Stdio::piped());
    }
    let mut child = c.spawn().expect("kubectl runs");
    if let (Some(data), Some(mut w)) = (stdin, child.stdin.take()) {
        w.write_all(data).await.expect("kubectl stdin");
        drop(w);
    }
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("kubectl finishes")
        .expect("kubectl output");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn metrics(h: &Harness) -> String {
    h.request(Some(&h.apiserver_identity()), "GET", "/metrics", &[])
        .await
        .1
}

async fn exec_keeps_streams_apart_and_reports_exit_codes(ws: bool) {
    let h = support::start(
        if ws { "kapi-exec-ws" } else { "kapi-exec" },
        Opts {
            websocket: ws,
            ..Opts::default()
        },
    )
    .await;
    let script = "cat; echo to-stderr >&2; exit 3";
    let (code, out, err) = run(
        &h,
        &["exec", "-i", &h.pod, "-c", "vm", "--", "sh", "-c", script],
        Some(b"from-stdin\n"),
    )
    .await;
    assert_eq!(out, "from-stdin\n", "stdout only has stdout; stderr: {err}");
    assert!(err.contains("to-stderr"), "{err}");
    assert!(!out.contains("to-stderr"));
    assert_eq!(code, 3, "{err}");
    let (code, _, err) = run(
        &h,
        &["exec", &h.pod, "-c", "vm", "--", "sh", "-c", "exit 42"],
        None,
    )
    .await;
    assert_eq!(code, 42, "{err}");
    let (code, out, err) = run(&h, &["exec", &h.pod, "--", "echo", "hello"], None).await;
    assert_eq!((code, out.as_str()), (0, "hello\n"), "{err}");
    let transport = if ws { "websocket" } else { "spdy" };
    let m = metrics(&h).await;
    assert!(
        m.contains(&format!(
            "vzk_kubelet_api_streaming_sessions_total{{kind=\"exec\",transport=\"{transport}\"}} 3"
        )),
        "{m}"
    );
}

#[tokio::test]
async fn kubectl_exec_over_spdy() {
    exec_keeps_streams_apart_and_reports_exit_codes(false).await;
}

#[tokio::test]
async fn kubectl_exec_over_websocket() {
    exec_keeps_streams_apart_and_reports_exit_codes(true).await;
}

async fn exec_tty_with_resize(ws: bool) {
    let h = support::start(
        if ws { "kapi-tty-ws" } else { "kapi-tty" },
        Opts {
            websocket: ws,
            ..Opts::default()
        },
    )
    .await;
    let driver = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/pty_drive.py");
    let kubeconfig = h.cp.admin_kubeconfig().display().to_string();
    let script = "echo READY; read x; stty size; read y; stty size";
    let out = tokio::process::Command::new("python3")
        .args([
            driver,
            "kubectl",
            "--kubeconfig",
            &kubeconfig,
            "-n",
            &h.ns,
            "exec",
            "-it",
            &h.pod,
            "-c",
            "vm",
            "--",
            "sh",
            "-c",
            script,
        ])
        .kill_on_drop(true)
        .output()
        .await
        .expect("python3 runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("30 100"),
        "initial size reached the process: {text}"
    );
    assert!(
        text.contains("40 120"),
        "resize reached the process: {text}"
    );
    assert!(
        out.status.success(),
        "{text} / {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn kubectl_exec_tty_resize_over_spdy() {
    exec_tty_with_resize(false).await;
}

#[tokio::test]
async fn kubectl_exec_tty_resize_over_websocket() {
    exec_tty_with_resize(true).await;
}

async fn attach_reaches_the_main_process(ws: bool) {
    let h = support::start(
        if ws { "kapi-att-ws" } else { "kapi-att" },
        Opts {
            websocket: ws,
            ..Opts::default()
        },
    )
    .await;
    let (code, out, err) = run(&h, &["attach", "-i", &h.pod, "-c", "vm"], Some(b"ping\n")).await;
    assert!(
        out.contains("ping"),
        "stdin reached the process and came back: {out} / {err}"
    );
    assert_eq!(code, 0, "{err}");
}

#[tokio::test]
async fn kubectl_attach_over_spdy() {
    attach_reaches_the_main_process(false).await;
}

#[tokio::test]
async fn kubectl_attach_over_websocket() {
    attach_reaches_the_main_process(true).await;
}

#[tokio::test]
async fn kubectl_logs_tail_since_timestamps_and_follow() {
    let h = support::start("kapi-logs", Opts::default()).await;
    let old = chrono::Utc::now() - chrono::Duration::hours(2);
    h.runtime.log_at("vm", old, "old-1");
    h.runtime.log_at("vm", old, "old-2");
    for i in 1..=3 {
        h.runtime.log("vm", &format!("new-{i}"));
    }
    let (code, out, err) = run(&h, &["logs", &h.pod, "-c", "vm"], None).await;
    assert_eq!(
        (code, out.as_str()),
        (0, "old-1\nold-2\nnew-1\nnew-2\nnew-3\n"),
        "{err}"
    );
    let (_, out, _) = run(&h, &["logs", &h.pod, "-c", "vm", "--tail=2"], None).await;
    assert_eq!(out, "new-2\nnew-3\n");
    let (_, out, _) = run(&h, &["logs", &h.pod, "-c", "vm", "--since=1h"], None).await;
    assert_eq!(out, "new-1\nnew-2\nnew-3\n");
    let (_, out, _) = run(
        &h,
        &["logs", &h.pod, "-c", "vm", "--timestamps", "--tail=1"],
        None,
    )
    .await;
    let (ts, line) = out.trim_end().split_once(' ').expect("timestamp prefix");
    assert_eq!(line, "new-3");
    assert!(chrono::DateTime::parse_from_rfc3339(ts).is_ok(), "{ts}");
    let (_, out, _) = run(&h, &["logs", &h.pod, "-c", "vm", "--limit-bytes=8"], None).await;
    assert_eq!(out, "old-1\nol");

    let mut follow = h.kubectl();
    follow
        .args(["logs", "-f", &h.pod, "-c", "vm", "--tail=1"])
        .stdout(Stdio::piped())
        .kill_on_drop(true);
    let mut child = follow.spawn().expect("kubectl logs -f");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    assert_eq!(next_line(&mut lines).await, "new-3");
    for i in 4..=6 {
        h.runtime.log("vm", &format!("new-{i}"));
        assert_eq!(
            next_line(&mut lines).await,
            format!("new-{i}"),
            "streamed as written"
        );
    }
    let _ = child.kill().await;
}

async fn next_line(l: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>) -> String {
    tokio::time::timeout(Duration::from_secs(30), l.next_line())
        .await
        .expect("line in time")
        .expect("read")
        .expect("open")
}

async fn port_forward_two_connections_and_a_large_transfer(ws: bool) {
    let h = support::start(
        if ws { "kapi-pf-ws" } else { "kapi-pf" },
        Opts {
            websocket: ws,
            ..Opts::default()
        },
    )
    .await;
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind echo");
    let echo_port = echo.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = c.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let mut pf = h.kubectl();
    pf.args([
        "port-forward",
        &format!("pod/{}", h.pod),
        &format!(":{echo_port}"),
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    let mut child = pf.spawn().expect("kubectl port-forward");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let local: u16 = loop {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("forwarding line")
            .expect("read")
            .expect("open");
        if let Some(rest) = line.strip_prefix("Forwarding from 127.0.0.1:") {
            break rest
                .split_whitespace()
                .next()
                .and_then(|p| p.parse().ok())
                .expect("local port");
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let roundtrip = |size: usize, seed: u32| async move {
        let data: Vec<u8> = (0..size as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 13) as u8)
            .collect();
        let mut c = tokio::net::TcpStream::connect(("127.0.0.1", local))
            .await
            .expect("connect forward");
        let (mut r, mut w) = c.split();
        let sent = data.clone();
        let writer = async move {
            w.write_all(&sent).await.expect("write");
        };
        let reader = async move {
            let mut got = vec![0u8; size];
            r.read_exact(&mut got).await.expect("read echo");
            got
        };
        let ((), got) = tokio::join!(writer, reader);
        assert!(got == data, "{size} bytes echoed byte for byte");
    };
    tokio::join!(roundtrip(16 << 20, 1), roundtrip(100_000, 2));
    tokio::join!(roundtrip(1000, 3), roundtrip(1000, 4));
    let transport = if ws { "websocket" } else { "spdy" };
    let m = metrics(&h).await;
    assert!(m.contains(&format!("vzk_kubelet_api_streaming_sessions_total{{kind=\"portforward\",transport=\"{transport}\"}}")), "{m}");
    let _ = child.kill().await;
}

#[tokio::test]
async fn kubectl_port_forward_over_spdy() {
    port_forward_two_connections_and_a_large_transfer(false).await;
}

#[tokio::test]
async fn kubectl_port_forward_over_websocket_tunnel() {
    port_forward_two_connections_and_a_large_transfer(true).await;
}
