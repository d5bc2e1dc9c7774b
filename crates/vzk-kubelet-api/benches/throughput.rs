//! Throughput benchmark (not a test). Prints two tables, each next to a plain loopback
//! TCP echo of the same bytes measured in the same run (the baseline):
//!
//! * **agent alone**: our own SPDY/3.1 and WebSocket clients straight to the kubelet
//!   port (TLS, no API server, no kubectl): `exec -i cat` (stdin echoed on stdout) and
//!   port-forward to a loopback TCP echo server, over SPDY, over WebSocket
//!   (`v5.channel.k8s.io` exec; port-forward both as the `SPDY/3.1+portforward.k8s.io`
//!   tunnel kubectl uses and as the `v4.channel.k8s.io` channel protocol);
//! * **through kubectl**: `kubectl exec -i -- cat` and `kubectl port-forward` through the
//!   real kube-apiserver, over the SPDY path (the API server translates) and the WebSocket
//!   path (the Node declares `ExtendWebSocketsToKubelet`).
//!
//! The agent's server runs in this process on a runtime of its own (threads named
//! `vzk-agent`), the bench's clients on another (`bench-client`), the echo servers on a
//! third (`bench-echo`); CPU seconds per GiB moved are read per thread from
//! `/proc/self/task/*/stat` (utime + stime), `cat` (a child of the fake runtime) from
//! `/proc/self/stat` (the children's times), kubectl and kube-apiserver from `/proc/<pid>/stat`
//! before and after. Every byte is checked.
//!
//! Run: `KUBEBUILDER_ASSETS=… cargo bench -p vzk-kubelet-api --bench throughput`
//! (size in MiB from `VZK_BENCH_MIB`, default 256; `VZK_BENCH_PATHS=agent` or `kubectl`
//! for one table only, default both).

#![allow(unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/it/load_client.rs"]
#[allow(dead_code)]
mod load_client;
#[path = "../tests/it/runtime.rs"]
#[allow(dead_code)]
mod runtime;
#[path = "../tests/it/support.rs"]
#[allow(dead_code)]
mod support;

use std::process::Stdio;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::runtime::Runtime;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_util::codec::{FramedRead, FramedWrite};
use vzk_kubelet_api::spdy::{Frame, FrameDecoder, FrameEncoder, Headers};

use load_client as lc;

/// What a Go client (kubectl's `io.Copy`) writes at a time.
const CLIENT_CHUNK: usize = 32 * 1024;
const AGENT_THREAD: &str = "vzk-agent";
const CLIENT_THREAD: &str = "bench-client";
const ECHO_THREAD: &str = "bench-echo";

fn pattern(size: usize) -> Bytes {
    (0..size as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect::<Vec<u8>>()
        .into()
}

// ---------------------------------------------------------------------------------
// CPU accounting

/// USER_HZ: the unit of the times in `/proc/*/stat` (100 on every Linux ABI we run on).
const CLK_TCK: f64 = 100.0;

/// (comm, ppid, utime + stime, cutime + cstime in seconds) of a `/proc/.../stat` file.
fn parse_stat_full(text: &str) -> Option<(String, i32, f64, f64)> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_owned();
    let rest: Vec<&str> = text.get(close + 2..)?.split_whitespace().collect();
    // Fields from 3 (state): ppid is field 4, utime 14, stime 15.
    let ppid = rest.get(1)?.parse().ok()?;
    let ut: f64 = rest.get(11)?.parse().ok()?;
    let st: f64 = rest.get(12)?.parse().ok()?;
    let cut: f64 = rest.get(13)?.parse().ok()?;
    let cst: f64 = rest.get(14)?.parse().ok()?;
    Some((comm, ppid, (ut + st) / CLK_TCK, (cut + cst) / CLK_TCK))
}

/// (comm, ppid, utime + stime in seconds) of a `/proc/.../stat` file.
fn parse_stat(text: &str) -> Option<(String, i32, f64)> {
    parse_stat_full(text).map(|(c, p, s, _)| (c, p, s))
}

fn proc_cpu(pid: i32) -> Option<f64> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?).map(|s| s.2)
}

#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    agent: f64,
    client: f64,
    echo: f64,
    process: f64,
    children: f64,
}

impl std::ops::Sub for Cpu {
    type Output = Cpu;
    fn sub(self, o: Cpu) -> Cpu {
        Cpu {
            agent: self.agent - o.agent,
            client: self.client - o.client,
            echo: self.echo - o.echo,
            process: self.process - o.process,
            children: self.children - o.children,
        }
    }
}

fn cpu_now() -> Cpu {
    let mut c = Cpu::default();
    if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
        for t in dir.flatten() {
            let Ok(text) = std::fs::read_to_string(t.path().join("stat")) else {
                continue;
            };
            let Some((comm, _, s)) = parse_stat(&text) else {
                continue;
            };
            match comm.as_str() {
                AGENT_THREAD => c.agent += s,
                CLIENT_THREAD => c.client += s,
                ECHO_THREAD => c.echo += s,
                _ => {}
            }
        }
    }
    // cutime + cstime: the children this process reaped (`cat`, kubectl).
    if let Some((_, _, own, children)) = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|t| parse_stat_full(&t))
    {
        c.process = own;
        c.children = children;
    }
    c
}

/// The kube-apiserver this process started (a child or grandchild of ours).
fn apiserver_pid() -> Option<i32> {
    let me = std::process::id() as i32;
    let mut found = None;
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Some((comm, mut ppid, _)) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|t| parse_stat(&t))
        else {
            continue;
        };
        if comm != "kube-apiserver" {
            continue;
        }
        for _ in 0..4 {
            if ppid == me {
                found = Some(pid);
                break;
            }
            ppid = match std::fs::read_to_string(format!("/proc/{ppid}/stat"))
                .ok()
                .and_then(|t| parse_stat(&t))
            {
                Some((_, p, _)) if p > 1 => p,
                _ => break,
            };
        }
    }
    found
}

/// Waits until `pid` has exited without reaping it (its `/proc/<pid>/stat` stays
/// readable, with the CPU time of the whole process). Linux only, as `/proc` is; the
/// bench is built, not run, for other targets.
#[cfg(not(target_os = "linux"))]
async fn wait_exited_unreaped(_pid: u32) {}

/// See the other target's.
#[cfg(target_os = "linux")]
async fn wait_exited_unreaped(pid: u32) {
    use nix::sys::wait::{Id, WaitPidFlag, waitid};
    tokio::task::spawn_blocking(move || {
        let _ = waitid(
            Id::Pid(nix::unistd::Pid::from_raw(pid as i32)),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT,
        );
    })
    .await
    .unwrap();
}

// ---------------------------------------------------------------------------------
// Echo servers and the loopback baseline

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

/// Writes `data` to `port` and reads it back.
async fn tcp_round_trip(port: u16, data: &[u8]) {
    let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
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
}

/// Checks each arriving chunk against the expected bytes (no copy of the whole).
struct Expect<'a> {
    data: &'a [u8],
    at: usize,
}

impl Expect<'_> {
    fn take(&mut self, chunk: &[u8]) {
        let end = self.at + chunk.len();
        assert!(
            end <= self.data.len() && self.data[self.at..end] == *chunk,
            "echo differs at byte {}",
            self.at
        );
        self.at = end;
    }
    fn done(&self) -> bool {
        self.at == self.data.len()
    }
}

// ---------------------------------------------------------------------------------
// Agent alone: SPDY

/// The bench's TLS client: rustls reads its transport ~4 KiB at a time, so it reads
/// from a 64 KiB buffer (as Go's crypto/tls in kubectl reads whole records).
type Tls = tokio_rustls::client::TlsStream<BufReader<tokio::net::TcpStream>>;

async fn tls(port: u16, cfg: &Arc<rustls::ClientConfig>) -> Tls {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    tcp.set_nodelay(true).unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    tokio_rustls::TlsConnector::from(cfg.clone())
        .connect(name, BufReader::with_capacity(64 * 1024, tcp))
        .await
        .unwrap()
}

async fn syn<W: AsyncWrite + Unpin>(
    out: &mut FramedWrite<W, FrameEncoder>,
    stream_id: u32,
    headers: Headers,
) {
    out.feed(Frame::SynStream {
        stream_id,
        assoc_stream_id: 0,
        priority: 0,
        flags: 0,
        headers,
    })
    .await
    .unwrap();
}

async fn spdy_send<W: AsyncWrite + Unpin>(
    out: &mut FramedWrite<W, FrameEncoder>,
    stream_id: u32,
    data: &Bytes,
    fin: bool,
) {
    let mut at = 0;
    while at < data.len() {
        let end = (at + CLIENT_CHUNK).min(data.len());
        out.feed(Frame::Data {
            stream_id,
            fin: false,
            data: data.slice(at..end),
        })
        .await
        .unwrap();
        at = end;
    }
    if fin {
        out.feed(Frame::Data {
            stream_id,
            fin: true,
            data: Bytes::new(),
        })
        .await
        .unwrap();
    }
    out.flush().await.unwrap();
}

async fn spdy_exec(port: u16, cfg: &Arc<rustls::ClientConfig>, data: &Bytes) {
    let (mut out, mut inp) = lc::upgrade(tls(port, cfg).await, lc::EXEC_CAT, "v4.channel.k8s.io")
        .await
        .unwrap();
    out.set_backpressure_boundary(256 * 1024);
    for (id, kind) in [(1u32, "error"), (3, "stdin"), (5, "stdout")] {
        syn(&mut out, id, Headers::new().with("streamType", kind)).await;
    }
    let write = spdy_send(&mut out, 3, data, true);
    let read = async {
        let mut want = Expect { data, at: 0 };
        let mut status = Vec::new();
        let (mut stdout_fin, mut error_fin) = (false, false);
        while !(stdout_fin && error_fin) {
            match inp.next().await.expect("session open").unwrap() {
                Frame::Data {
                    stream_id: 5,
                    fin,
                    data,
                } => {
                    want.take(&data);
                    stdout_fin |= fin;
                }
                Frame::Data {
                    stream_id: 1,
                    fin,
                    data,
                } => {
                    status.extend_from_slice(&data);
                    error_fin |= fin;
                }
                Frame::RstStream { stream_id, status } => {
                    panic!("stream {stream_id} reset ({status})")
                }
                _ => {}
            }
        }
        assert!(want.done(), "stdout short: {} bytes", want.at);
        let text = String::from_utf8_lossy(&status);
        assert!(text.contains("\"Success\""), "status: {text}");
    };
    tokio::join!(write, read);
}

/// Opens the error (half-closed) and data streams of one forwarded connection.
async fn spdy_pf_open<W: AsyncWrite + Unpin>(out: &mut FramedWrite<W, FrameEncoder>, echo: u16) {
    let target = echo.to_string();
    for (id, kind) in [(1u32, "error"), (3, "data")] {
        let h = Headers::new()
            .with("streamType", kind)
            .with("port", &target)
            .with("requestID", "0");
        syn(out, id, h).await;
    }
    out.send(Frame::Data {
        stream_id: 1,
        fin: true,
        data: Bytes::new(),
    })
    .await
    .unwrap();
}

async fn spdy_pf_echo<W, R>(
    out: &mut FramedWrite<W, FrameEncoder>,
    inp: &mut FramedRead<R, FrameDecoder>,
    data: &Bytes,
) where
    W: AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
{
    let write = spdy_send(out, 3, data, false);
    let read = async {
        let mut want = Expect { data, at: 0 };
        while !want.done() {
            match inp.next().await.expect("session open").unwrap() {
                Frame::Data {
                    stream_id: 3, data, ..
                } => want.take(&data),
                Frame::Data {
                    stream_id: 1, data, ..
                } if !data.is_empty() => {
                    panic!("error stream: {}", String::from_utf8_lossy(&data))
                }
                Frame::RstStream { stream_id, status } => {
                    panic!("stream {stream_id} reset ({status})")
                }
                _ => {}
            }
        }
    };
    tokio::join!(write, read);
}

async fn spdy_port_forward(port: u16, cfg: &Arc<rustls::ClientConfig>, echo: u16, data: &Bytes) {
    let s = tls(port, cfg).await;
    let (mut out, mut inp) = lc::upgrade(s, "/portForward/ns/p", "portforward.k8s.io")
        .await
        .unwrap();
    out.set_backpressure_boundary(256 * 1024);
    spdy_pf_open(&mut out, echo).await;
    spdy_pf_echo(&mut out, &mut inp, data).await;
}

// ---------------------------------------------------------------------------------
// Agent alone: WebSocket

type Ws = tokio_tungstenite::WebSocketStream<Tls>;

async fn ws_connect(port: u16, cfg: &Arc<rustls::ClientConfig>, path: &str, protocol: &str) -> Ws {
    let tls = tls(port, cfg).await;
    let mut req = format!("wss://127.0.0.1:{port}{path}")
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", protocol.parse().unwrap());
    let (ws, _) = tokio_tungstenite::client_async(req, tls).await.unwrap();
    ws
}

/// Sends `data` as channel `ch` messages of [`CLIENT_CHUNK`] bytes.
async fn ws_send<S>(sink: &mut S, ch: u8, data: &[u8])
where
    S: futures::Sink<Message> + Unpin,
    S::Error: std::fmt::Debug,
{
    for chunk in data.chunks(CLIENT_CHUNK) {
        let mut m = Vec::with_capacity(1 + chunk.len());
        m.push(ch);
        m.extend_from_slice(chunk);
        sink.feed(Message::Binary(m.into())).await.unwrap();
    }
    sink.flush().await.unwrap();
}

async fn ws_exec(port: u16, cfg: &Arc<rustls::ClientConfig>, data: &Bytes) {
    let ws = ws_connect(port, cfg, lc::EXEC_CAT, "v5.channel.k8s.io").await;
    let (mut sink, mut stream) = ws.split();
    let write = async {
        ws_send(&mut sink, 0, data).await;
        sink.send(Message::Binary(vec![255u8, 0].into()))
            .await
            .unwrap();
        sink
    };
    let read = async {
        let mut want = Expect { data, at: 0 };
        let mut status = Vec::new();
        while let Some(m) = stream.next().await {
            match m.unwrap() {
                Message::Binary(b) if b.first() == Some(&1) => want.take(&b[1..]),
                Message::Binary(b) if b.first() == Some(&3) => status.extend_from_slice(&b[1..]),
                Message::Close(_) => break,
                _ => {}
            }
        }
        assert!(want.done(), "stdout short: {} bytes", want.at);
        let text = String::from_utf8_lossy(&status);
        assert!(text.contains("\"Success\""), "status: {text}");
        stream
    };
    let (sink, stream) = tokio::join!(write, read);
    if let Ok(mut ws) = sink.reunite(stream) {
        let _ = ws.close(None).await;
    }
}

async fn ws_port_forward_channels(
    port: u16,
    cfg: &Arc<rustls::ClientConfig>,
    echo: u16,
    data: &Bytes,
) {
    let ws = ws_connect(
        port,
        cfg,
        &format!("/portForward/ns/p?port={echo}"),
        "v4.channel.k8s.io",
    )
    .await;
    let (mut sink, mut stream) = ws.split();
    let mut announced = 0;
    while announced < 2 {
        if let Message::Binary(_) = stream.next().await.unwrap().unwrap() {
            announced += 1;
        }
    }
    let write = ws_send(&mut sink, 0, data);
    let read = async {
        let mut want = Expect { data, at: 0 };
        while !want.done() {
            match stream.next().await.expect("socket open").unwrap() {
                Message::Binary(b) if b.first() == Some(&0) => want.take(&b[1..]),
                Message::Binary(b) if b.first() == Some(&1) => {
                    panic!("error channel: {}", String::from_utf8_lossy(&b[1..]))
                }
                _ => {}
            }
        }
    };
    tokio::join!(write, read);
}

/// The `SPDY/3.1+portforward.k8s.io` tunnel, as kubectl speaks it: a SPDY session whose
/// bytes travel in binary messages (a Go client sends each write as one message).
async fn ws_port_forward_tunnel(
    port: u16,
    cfg: &Arc<rustls::ClientConfig>,
    echo: u16,
    data: &Bytes,
) {
    let ws = ws_connect(
        port,
        cfg,
        "/portForward/ns/p",
        "SPDY/3.1+portforward.k8s.io",
    )
    .await;
    let (mut sink, mut stream) = ws.split();
    let (ours, theirs) = tokio::io::duplex(256 * 1024);
    let (mut tr, mut tw) = tokio::io::split(theirs);
    let up = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match tr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if sink
                        .send(Message::Binary(Bytes::copy_from_slice(&buf[..n])))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    });
    let down = tokio::spawn(async move {
        while let Some(Ok(m)) = stream.next().await {
            match m {
                Message::Binary(b) if tw.write_all(&b).await.is_err() => break,
                Message::Close(_) => break,
                _ => {}
            }
        }
    });
    let (r, w) = tokio::io::split(ours);
    let mut out = FramedWrite::new(w, FrameEncoder::new().unwrap());
    out.set_backpressure_boundary(256 * 1024);
    let mut inp = FramedRead::new(r, FrameDecoder::new());
    spdy_pf_open(&mut out, echo).await;
    spdy_pf_echo(&mut out, &mut inp, data).await;
    up.abort();
    down.abort();
}

// ---------------------------------------------------------------------------------
// Through kubectl

/// kubectl's and kube-apiserver's CPU seconds during one run.
#[derive(Debug, Clone, Copy, Default)]
struct Others {
    kubectl: f64,
    apiserver: f64,
}

async fn kubectl_exec(h: &support::Harness, data: &[u8], file: &std::path::Path) -> Others {
    std::fs::write(file, data).unwrap();
    let mut c = h.kubectl();
    c.args(["exec", "-i", &h.pod, "-c", "vm", "--", "cat"])
        .stdin(std::fs::File::open(file).unwrap())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let api = apiserver_pid();
    let api0 = api.and_then(proc_cpu).unwrap_or(0.0);
    let mut child = c.spawn().unwrap();
    let pid = child.id().unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut got = Vec::with_capacity(data.len());
    out.read_to_end(&mut got).await.unwrap();
    wait_exited_unreaped(pid).await;
    let kubectl = proc_cpu(pid as i32).unwrap_or(f64::NAN);
    let api1 = api.and_then(proc_cpu).unwrap_or(f64::NAN);
    let status = child.wait().await.unwrap();
    assert!(status.success(), "kubectl exec failed");
    assert!(
        got == data,
        "exec output differs ({} of {} bytes)",
        got.len(),
        data.len()
    );
    Others {
        kubectl,
        apiserver: api1 - api0,
    }
}

/// Starts `kubectl port-forward` (not timed), echoes `data` through it (timed by the
/// caller from `ready`'s return).
async fn kubectl_port_forward(
    h: &support::Harness,
    echo: u16,
) -> (tokio::process::Child, u16, Option<i32>) {
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
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let pid = child.id().map(|p| p as i32);
    (child, local, pid)
}

// ---------------------------------------------------------------------------------
// Table

struct Row {
    name: String,
    secs: f64,
    bytes: usize,
    cpu: Cpu,
    others: Option<Others>,
}

impl Row {
    fn mibs(&self) -> f64 {
        self.bytes as f64 / (1 << 20) as f64 / self.secs
    }
}

fn per_gib(s: f64, bytes: usize) -> String {
    if s.is_nan() {
        return "-".into();
    }
    format!("{:.2}", s / (bytes as f64 / (1u64 << 30) as f64))
}

fn print_table(title: &str, rows: &[Row], base: f64, kubectl: bool) {
    println!("\n{title}\n");
    if kubectl {
        println!(
            "| {:<46} | {:>7} | {:>8} | {:>5} | {:>7} | {:>9} | {:>6} | {:>6} |",
            "path", "seconds", "MiB/s", "ratio", "kubectl", "apiserver", "agent", "cat"
        );
        println!(
            "|{:-<48}|{:-<9}|{:-<10}|{:-<7}|{:-<9}|{:-<11}|{:-<8}|{:-<8}|",
            "", "", "", "", "", "", "", ""
        );
    } else {
        println!(
            "| {:<46} | {:>7} | {:>8} | {:>5} | {:>6} | {:>6} | {:>6} | {:>6} | {:>7} |",
            "path", "seconds", "MiB/s", "ratio", "agent", "client", "echo", "cat", "process"
        );
        println!(
            "|{:-<48}|{:-<9}|{:-<10}|{:-<7}|{:-<8}|{:-<8}|{:-<8}|{:-<8}|{:-<9}|",
            "", "", "", "", "", "", "", "", ""
        );
    }
    for r in rows {
        let g = |s: f64| per_gib(s, r.bytes);
        if kubectl {
            let o = r.others.unwrap_or(Others {
                kubectl: f64::NAN,
                apiserver: f64::NAN,
            });
            println!(
                "| {:<46} | {:>7.2} | {:>8.1} | {:>5.3} | {:>7} | {:>9} | {:>6} | {:>6} |",
                r.name,
                r.secs,
                r.mibs(),
                r.mibs() / base,
                g(o.kubectl),
                g(o.apiserver),
                g(r.cpu.agent),
                g(r.cpu.children),
            );
        } else {
            println!(
                "| {:<46} | {:>7.2} | {:>8.1} | {:>5.3} | {:>6} | {:>6} | {:>6} | {:>6} | {:>7} |",
                r.name,
                r.secs,
                r.mibs(),
                r.mibs() / base,
                g(r.cpu.agent),
                g(r.cpu.client),
                g(r.cpu.echo),
                g(r.cpu.children),
                g(r.cpu.process),
            );
        }
    }
}

/// Runs `f` on the client runtime, timing it and the CPU it took.
fn measure<F: std::future::Future<Output = Option<Others>>>(
    rt: &Runtime,
    name: &str,
    bytes: usize,
    f: F,
) -> Row {
    let c0 = cpu_now();
    let t0 = Instant::now();
    let others = rt.block_on(f);
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_now() - c0;
    Row {
        name: name.to_owned(),
        secs,
        bytes,
        cpu,
        others,
    }
}

fn runtime(name: &str, workers: usize) -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name(name)
        .enable_all()
        .build()
        .unwrap()
}

fn main() {
    // The driver runs on a thread named like the client runtime's workers: what it
    // `block_on`s (the clients) counts as client CPU.
    std::thread::Builder::new()
        .name(CLIENT_THREAD.into())
        .spawn(run)
        .unwrap()
        .join()
        .unwrap();
}

fn run() {
    let mib: usize = std::env::var("VZK_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let paths = std::env::var("VZK_BENCH_PATHS").unwrap_or_default();
    let (agent_alone, through_kubectl) = match paths.as_str() {
        "agent" => (true, false),
        "kubectl" => (false, true),
        _ => (true, true),
    };
    let data = pattern(mib << 20);
    let n = data.len();
    let agent_rt = runtime(AGENT_THREAD, 2);
    let client_rt = runtime(CLIENT_THREAD, 2);
    let echo_rt = runtime(ECHO_THREAD, 1);
    let echo = echo_rt.block_on(echo_server());

    // The baseline first, then again last: the table uses the better of the two.
    let mut base_row = measure(&client_rt, "loopback TCP echo (baseline)", n, async {
        tcp_round_trip(echo, &data).await;
        None
    });
    let base_of = |r: &Row| r.mibs();

    let mut agent_rows = Vec::new();
    if agent_alone {
        let h = agent_rt.block_on(support::start("bench-agent", support::Opts::default()));
        let cfg = lc::client_config(&h, &h.apiserver_identity()).unwrap();
        let port = h.port;
        // Warm-up (SAR cache, code paths, allocator), not counted.
        client_rt.block_on(spdy_exec(port, &cfg, &data.slice(..n.min(8 << 20))));
        let runs: [(&str, u8); 5] = [
            ("agent: SPDY exec -i cat", 0),
            ("agent: SPDY port-forward", 1),
            ("agent: WebSocket v5 exec -i cat", 2),
            ("agent: WebSocket port-forward (SPDY tunnel)", 3),
            ("agent: WebSocket port-forward (v4 channels)", 4),
        ];
        for (name, which) in runs {
            let (cfg, data) = (cfg.clone(), data.clone());
            agent_rows.push(measure(&client_rt, name, n, async move {
                match which {
                    0 => spdy_exec(port, &cfg, &data).await,
                    1 => spdy_port_forward(port, &cfg, echo, &data).await,
                    2 => ws_exec(port, &cfg, &data).await,
                    3 => ws_port_forward_tunnel(port, &cfg, echo, &data).await,
                    _ => ws_port_forward_channels(port, &cfg, echo, &data).await,
                }
                None
            }));
        }
        drop(h);
    }

    let mut kubectl_rows = Vec::new();
    if through_kubectl {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("payload");
        for ws in [false, true] {
            let h = agent_rt.block_on(support::start(
                if ws { "bench-ws" } else { "bench" },
                support::Opts {
                    websocket: ws,
                    ..Default::default()
                },
            ));
            let label = if ws { "websocket" } else { "spdy" };
            let mut row = measure(
                &client_rt,
                &format!("kubectl exec -i -- cat ({label})"),
                n,
                async { Some(kubectl_exec(&h, &data, &file).await) },
            );
            // kubectl was reaped too: the children's time less kubectl's is cat's.
            row.cpu.children -= row.others.map_or(0.0, |o| o.kubectl);
            kubectl_rows.push(row);
            let (mut child, local, pid) = client_rt.block_on(kubectl_port_forward(&h, echo));
            let api = apiserver_pid();
            let k0 = pid.and_then(proc_cpu).unwrap_or(f64::NAN);
            let a0 = api.and_then(proc_cpu).unwrap_or(f64::NAN);
            let mut row = measure(
                &client_rt,
                &format!("kubectl port-forward ({label})"),
                n,
                async {
                    tcp_round_trip(local, &data).await;
                    None
                },
            );
            row.others = Some(Others {
                kubectl: pid.and_then(proc_cpu).unwrap_or(f64::NAN) - k0,
                apiserver: api.and_then(proc_cpu).unwrap_or(f64::NAN) - a0,
            });
            kubectl_rows.push(row);
            client_rt.block_on(async { child.kill().await.ok() });
            drop(h);
        }
    }

    let again = measure(&client_rt, "loopback TCP echo (baseline)", n, async {
        tcp_round_trip(echo, &data).await;
        None
    });
    if base_of(&again) > base_of(&base_row) {
        base_row = again;
    }
    let base = base_of(&base_row);
    println!(
        "\n{mib} MiB each way, checked byte for byte. Baseline: a plain loopback TCP echo of the \
         same bytes in this same run (the better of one run first and one last). ratio = MiB/s \
         over the baseline's. CPU columns are CPU seconds (utime + stime) per GiB moved each way: \
         agent = the kubelet API server's threads (TLS, SPDY/WebSocket, the fake runtime's \
         copies), client = the bench's own TLS clients, echo = the loopback echo server, \
         cat = the exec'd `cat` (a child), process = this whole process."
    );
    let mut rows = vec![base_row];
    rows.extend(agent_rows);
    if agent_alone {
        print_table(
            "Agent alone (our clients straight to the kubelet port, TLS):",
            &rows,
            base,
            false,
        );
    } else {
        print_table("Baseline:", &rows, base, false);
    }
    if through_kubectl {
        print_table(
            "Through kube-apiserver + kubectl (kubectl, apiserver: /proc/<pid>/stat):",
            &kubectl_rows,
            base,
            true,
        );
    }
}
