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
//! for one table only, default both; `VZK_BENCH_ROUNDS`, default 5, rounds of the agent
//! table; `VZK_BENCH_ONLY=tunnel` runs only the agent rows whose name holds it).

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

/// A plain TCP relay to `target` (64 KiB copies each way, no TLS, no framing): the shape
/// of every agent path (client → agent → echo or `cat` → agent → client) at no protocol
/// cost, so its row is the bound the agent's rows can approach on this machine. Runs on
/// the agent's runtime: its CPU shows in the agent column.
async fn relay_server(target: u16) -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            tokio::spawn(async move {
                let Ok(mut t) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else {
                    return;
                };
                let _ = c.set_nodelay(true);
                let _ = t.set_nodelay(true);
                let _ =
                    tokio::io::copy_bidirectional_with_sizes(&mut c, &mut t, 64 * 1024, 64 * 1024)
                        .await;
            });
        }
    });
    port
}

/// The same relay behind TLS, as the kubelet port must be (rustls, the agent's provider,
/// the socket read 64 KiB at a time as the agent reads it): TLS plus the two hops, no
/// framing, the bound for the agent's rows.
async fn tls_relay_server(target: u16, serving: &vzk_testenv::CertPair) -> u16 {
    use rustls::pki_types::pem::PemObject;
    let certs = rustls::pki_types::CertificateDer::pem_slice_iter(serving.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(serving.key_pem.as_bytes()).unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((c, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = c.set_nodelay(true);
                let Ok(mut c) = acceptor
                    .accept(BufReader::with_capacity(64 * 1024, c))
                    .await
                else {
                    return;
                };
                let Ok(mut t) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else {
                    return;
                };
                let _ = t.set_nodelay(true);
                let _ =
                    tokio::io::copy_bidirectional_with_sizes(&mut c, &mut t, 64 * 1024, 64 * 1024)
                        .await;
            });
        }
    });
    port
}

/// Writes `data` over TLS to `port` and reads it back (checked as it arrives).
async fn tls_round_trip(port: u16, cfg: &Arc<rustls::ClientConfig>, data: &[u8]) {
    let (mut r, mut w) = tokio::io::split(tls(port, cfg).await);
    let writer = async {
        for chunk in data.chunks(CLIENT_CHUNK) {
            w.write_all(chunk).await.unwrap();
        }
        w.flush().await.unwrap();
    };
    let reader = async {
        let mut want = Expect { data, at: 0 };
        let mut buf = vec![0u8; 256 * 1024];
        while !want.done() {
            let n = r.read(&mut buf).await.unwrap();
            assert!(n > 0, "TLS relay closed early at byte {}", want.at);
            want.take(&buf[..n]);
        }
    };
    tokio::join!(writer, reader);
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
    // Checked piece by piece as it arrives, like every other path: reading into one
    // buffer of the whole size would charge the baseline its page faults.
    let reader = async {
        let mut want = Expect { data, at: 0 };
        let mut buf = vec![0u8; 256 * 1024];
        while !want.done() {
            let n = r.read(&mut buf).await.unwrap();
            assert!(n > 0, "echo closed early at byte {}", want.at);
            want.take(&buf[..n]);
        }
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

/// A WebSocket's write side as bytes: each write one binary message (a copy, as Go's
/// websocket connection copies each write into its frame).
struct MsgWriter(futures::stream::SplitSink<Ws, Message>);

impl AsyncWrite for MsgWriter {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let sink = std::pin::Pin::new(&mut self.0);
        match futures::Sink::poll_ready(sink, cx) {
            std::task::Poll::Ready(Ok(())) => {}
            std::task::Poll::Ready(Err(e)) => {
                return std::task::Poll::Ready(Err(std::io::Error::other(e)));
            }
            std::task::Poll::Pending => return std::task::Poll::Pending,
        }
        let m = Message::Binary(Bytes::copy_from_slice(data));
        futures::Sink::start_send(std::pin::Pin::new(&mut self.0), m)
            .map_err(std::io::Error::other)?;
        std::task::Poll::Ready(Ok(data.len()))
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        futures::Sink::poll_flush(std::pin::Pin::new(&mut self.0), cx)
            .map_err(std::io::Error::other)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        futures::Sink::poll_close(std::pin::Pin::new(&mut self.0), cx)
            .map_err(std::io::Error::other)
    }
}

/// A WebSocket's read side as bytes: the binary messages' payloads in order.
struct MsgReader {
    stream: futures::stream::SplitStream<Ws>,
    buf: Bytes,
}

impl AsyncRead for MsgReader {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        out: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        while self.buf.is_empty() {
            match std::task::ready!(self.stream.poll_next_unpin(cx)) {
                Some(Ok(Message::Binary(b))) => self.buf = b,
                Some(Ok(Message::Close(_))) | None => return std::task::Poll::Ready(Ok(())),
                Some(Ok(_)) => {}
                Some(Err(e)) => return std::task::Poll::Ready(Err(std::io::Error::other(e))),
            }
        }
        let n = self.buf.len().min(out.remaining());
        out.put_slice(&self.buf.split_to(n));
        std::task::Poll::Ready(Ok(()))
    }
}

/// The `SPDY/3.1+portforward.k8s.io` tunnel, as kubectl speaks it: a SPDY session whose
/// bytes travel in binary messages (a Go client sends each write as one message and
/// reads the messages' payloads as one byte stream).
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
    let (sink, stream) = ws.split();
    let mut out = FramedWrite::new(MsgWriter(sink), FrameEncoder::new().unwrap());
    out.set_backpressure_boundary(256 * 1024);
    let mut inp = FramedRead::new(
        MsgReader {
            stream,
            buf: Bytes::new(),
        },
        FrameDecoder::new(),
    );
    spdy_pf_open(&mut out, echo).await;
    spdy_pf_echo(&mut out, &mut inp, data).await;
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

#[derive(Default)]
struct Row {
    name: String,
    secs: f64,
    bytes: usize,
    cpu: Cpu,
    others: Option<Others>,
    /// MiB/s over the baseline of the same round.
    ratio: Option<f64>,
    /// The lowest and highest ratio over the rounds.
    spread: Option<(f64, f64)>,
}

impl Row {
    fn mibs(&self) -> f64 {
        self.bytes as f64 / (1 << 20) as f64 / self.secs
    }
    fn take(&mut self) -> Row {
        std::mem::take(self)
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
            "| {:<48} | {:>7} | {:>8} | {:>5} | {:>11} | {:>6} | {:>6} | {:>6} | {:>6} | {:>7} |",
            "path",
            "seconds",
            "MiB/s",
            "ratio",
            "spread",
            "agent",
            "client",
            "echo",
            "cat",
            "process"
        );
        println!(
            "|{:-<50}|{:-<9}|{:-<10}|{:-<7}|{:-<13}|{:-<8}|{:-<8}|{:-<8}|{:-<8}|{:-<9}|",
            "", "", "", "", "", "", "", "", "", ""
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
            let spread = r
                .spread
                .map_or_else(String::new, |(lo, hi)| format!("{lo:.3}-{hi:.3}"));
            println!(
                "| {:<48} | {:>7.2} | {:>8.1} | {:>5.3} | {:>11} | {:>6} | {:>6} | {:>6} | {:>6} | {:>7} |",
                r.name,
                r.secs,
                r.mibs(),
                r.ratio.unwrap_or(r.mibs() / base),
                spread,
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
        ..Row::default()
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

    // Rounds: each measures the baseline and then every agent path once, so each path's
    // ratio is taken against a baseline of the same moment (this machine drifts by more
    // than most changes); the table shows the round with the median ratio per row.
    let rounds: usize = std::env::var("VZK_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
        .max(1);
    // Only the agent rows whose name holds this (for a profile of one path).
    let only = std::env::var("VZK_BENCH_ONLY").unwrap_or_default();
    let tcp_rows = |echo: u16, relay: u16| -> Vec<Row> {
        let base = measure(&client_rt, "loopback TCP echo (baseline)", n, async {
            tcp_round_trip(echo, &data).await;
            None
        });
        let relayed = measure(
            &client_rt,
            "loopback TCP relay to the echo (2 hops, no TLS)",
            n,
            async {
                tcp_round_trip(relay, &data).await;
                None
            },
        );
        vec![base, relayed]
    };
    let relay = agent_rt.block_on(relay_server(echo));

    let mut round_rows: Vec<Vec<Row>> = Vec::new();
    if agent_alone {
        let h = agent_rt.block_on(support::start("bench-agent", support::Opts::default()));
        let cfg = lc::client_config(&h, &h.apiserver_identity()).unwrap();
        let port = h.port;
        // Warm-up (SAR cache, code paths, allocator), not counted.
        client_rt.block_on(spdy_exec(port, &cfg, &data.slice(..n.min(8 << 20))));
        let tls_relay = agent_rt.block_on(tls_relay_server(
            echo,
            &h.cp.issue_serving_cert(&["127.0.0.1"]),
        ));
        let runs: [(&str, u8); 5] = [
            ("agent: SPDY exec -i cat", 0),
            ("agent: SPDY port-forward", 1),
            ("agent: WebSocket v5 exec -i cat", 2),
            ("agent: WebSocket port-forward (SPDY tunnel)", 3),
            ("agent: WebSocket port-forward (v4 channels)", 4),
        ];
        for _ in 0..rounds {
            let mut rows = tcp_rows(echo, relay);
            rows.push(measure(
                &client_rt,
                "TLS relay to the echo (2 hops, TLS, no framing)",
                n,
                async {
                    tls_round_trip(tls_relay, &cfg, &data).await;
                    None
                },
            ));
            for (name, which) in runs {
                if !name.contains(&only) {
                    continue;
                }
                let (cfg, data) = (cfg.clone(), data.clone());
                rows.push(measure(&client_rt, name, n, async move {
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
            round_rows.push(rows);
        }
        drop(h);
    } else {
        for _ in 0..rounds {
            round_rows.push(tcp_rows(echo, relay));
        }
    }
    // Each row's ratio against its own round's baseline; then the median round per row.
    for rows in &mut round_rows {
        let base = rows[0].mibs();
        for r in rows.iter_mut() {
            r.ratio = Some(r.mibs() / base);
        }
    }
    let mut rows: Vec<Row> = Vec::new();
    for i in 0..round_rows[0].len() {
        let mut of_row: Vec<Row> = round_rows.iter_mut().map(|r| r[i].take()).collect();
        of_row.sort_by(|a, b| a.ratio.unwrap_or(0.0).total_cmp(&b.ratio.unwrap_or(0.0)));
        let (lo, hi) = (
            of_row[0].ratio.unwrap_or(f64::NAN),
            of_row[of_row.len() - 1].ratio.unwrap_or(f64::NAN),
        );
        let mut mid = of_row.swap_remove(of_row.len() / 2);
        mid.spread = Some((lo, hi));
        rows.push(mid);
    }
    // Base MiB/s for the kubectl table: the median baseline.
    let base = rows[0].mibs();

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

    println!(
        "\n{mib} MiB each way, checked byte for byte. Baseline: a plain loopback TCP echo of the \
         same bytes, measured in each of {rounds} rounds before that round's other rows. \
         ratio = MiB/s over the same round's baseline; the row shown is the round with the \
         median ratio, and `spread` the lowest and highest ratio of all rounds. The relay row is the same two hops every agent path takes \
         (client → agent → echo or `cat` → agent → client) with no TLS and no framing: the \
         most a path of that shape moves here; the TLS relay adds the kubelet port's TLS \
         (our client writing 32 KiB at a time, as the others do): the bound for the agent's \
         rows. CPU columns are CPU seconds (utime + stime) per GiB moved each way: \
         agent = the kubelet API server's threads (TLS, SPDY/WebSocket, the fake runtime's \
         copies), client = the bench's own TLS clients, echo = the loopback echo server, \
         cat = the exec'd `cat` (a child), process = this whole process."
    );
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
