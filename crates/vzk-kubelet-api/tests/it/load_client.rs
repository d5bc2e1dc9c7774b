//! Clients for the load test and the load bench: SPDY exec and port-forward sessions
//! built from our codec (as `direct.rs` does), slowloris connections, and a reader of
//! this process's RSS. Every function returns errors as text instead of panicking, so
//! that hundreds of them can run as tasks and the test reports what failed.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::codec::{FramedRead, FramedWrite};
use vzk_kubelet_api::spdy::{Frame, FrameDecoder, FrameEncoder, Headers};
use vzk_testenv::CertPair;

use crate::support::Harness;

pub(crate) type Tls = TlsStream<TcpStream>;
pub(crate) type Out = FramedWrite<WriteHalf<Tls>, FrameEncoder>;
pub(crate) type In = FramedRead<ReadHalf<Tls>, FrameDecoder>;

/// The exec path every session uses: `cat` with stdin and stdout.
pub(crate) const EXEC_CAT: &str = "/exec/ns/p/c?command=cat&input=1&output=1";

/// A client TLS configuration trusting the harness CA, with `id` as client certificate.
pub(crate) fn client_config(
    h: &Harness,
    id: &CertPair,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(h.cp.ca_cert_pem().as_bytes()) {
        roots
            .add(c.map_err(|e| format!("ca pem: {e}"))?)
            .map_err(|e| format!("add ca: {e}"))?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let chain = CertificateDer::pem_slice_iter(id.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("client cert: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes())
        .map_err(|e| format!("client key: {e}"))?;
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("versions: {e}"))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| format!("client auth: {e}"))?;
    Ok(Arc::new(cfg))
}

/// A TCP connection to the server; `buffers` sets both socket buffer sizes (a client
/// that never reads then holds little in its own kernel buffers).
pub(crate) async fn tcp(port: u16, buffers: Option<u32>) -> Result<TcpStream, String> {
    let sock = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
    if let Some(b) = buffers {
        sock.set_recv_buffer_size(b)
            .map_err(|e| format!("SO_RCVBUF: {e}"))?;
        sock.set_send_buffer_size(b)
            .map_err(|e| format!("SO_SNDBUF: {e}"))?;
    }
    sock.connect(([127, 0, 0, 1], port).into())
        .await
        .map_err(|e| format!("connect: {e}"))
}

/// A TLS connection to the harness server.
pub(crate) async fn tls(
    port: u16,
    cfg: &Arc<rustls::ClientConfig>,
    buffers: Option<u32>,
) -> Result<Tls, String> {
    let tcp = tcp(port, buffers).await?;
    let name = ServerName::try_from("127.0.0.1").map_err(|e| format!("name: {e}"))?;
    TlsConnector::from(cfg.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| format!("tls handshake: {e}"))
}

/// Sends an SPDY upgrade request for `path` and reads the 101; returns the codec halves
/// (bytes read past the response head are already in the decoder's buffer).
#[allow(clippy::type_complexity)]
pub(crate) async fn upgrade<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    path: &str,
    protocol: &str,
) -> Result<
    (
        FramedWrite<WriteHalf<S>, FrameEncoder>,
        FramedRead<ReadHalf<S>, FrameDecoder>,
    ),
    String,
> {
    s.write_all(format!("POST {path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: {protocol}\r\n\r\n").as_bytes())
        .await
        .map_err(|e| format!("send upgrade: {e}"))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    let end = loop {
        let n = s
            .read(&mut chunk)
            .await
            .map_err(|e| format!("read upgrade: {e}"))?;
        if n == 0 {
            return Err(format!(
                "closed during upgrade: {}",
                String::from_utf8_lossy(&buf)
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
    if !head.starts_with("http/1.1 101") {
        return Err(format!("upgrade refused: {head}"));
    }
    let (rd, wr) = tokio::io::split(s);
    let out = FramedWrite::new(
        wr,
        FrameEncoder::new().map_err(|e| format!("encoder: {e}"))?,
    );
    let mut inp = FramedRead::new(rd, FrameDecoder::new());
    inp.read_buffer_mut().extend_from_slice(&buf[end..]);
    Ok((out, inp))
}

pub(crate) async fn syn(out: &mut Out, stream_id: u32, headers: Headers) -> Result<(), String> {
    out.send(Frame::SynStream {
        stream_id,
        assoc_stream_id: 0,
        priority: 0,
        flags: 0,
        headers,
    })
    .await
    .map_err(|e| format!("send SYN_STREAM {stream_id}: {e}"))
}

async fn send_all(out: &mut Out, stream_id: u32, payload: &[u8]) -> Result<(), String> {
    for chunk in payload.chunks(32 * 1024) {
        out.feed(Frame::Data {
            stream_id,
            fin: false,
            data: Bytes::copy_from_slice(chunk),
        })
        .await
        .map_err(|e| format!("send data: {e}"))?;
    }
    out.flush().await.map_err(|e| format!("flush: {e}"))
}

/// Opens an exec of `cat` with stdin and stdout (v4: error 1, stdin 3, stdout 5).
pub(crate) async fn exec_cat(
    port: u16,
    cfg: &Arc<rustls::ClientConfig>,
) -> Result<(Out, In), String> {
    exec(port, cfg, EXEC_CAT, None).await
}

/// Opens an exec of `path` (stdin and stdout requested) with the three streams.
pub(crate) async fn exec(
    port: u16,
    cfg: &Arc<rustls::ClientConfig>,
    path: &str,
    buffers: Option<u32>,
) -> Result<(Out, In), String> {
    let s = tls(port, cfg, buffers).await?;
    let (mut out, inp) = upgrade(s, path, "v4.channel.k8s.io").await?;
    for (id, kind) in [(1u32, "error"), (3, "stdin"), (5, "stdout")] {
        syn(&mut out, id, Headers::new().with("streamType", kind)).await?;
    }
    Ok((out, inp))
}

/// One exec of `cat`: sends `payload` on stdin (then FIN) while reading stdout; returns
/// stdout once the server finished the session, after checking the v4 status.
pub(crate) async fn exec_echo(
    port: u16,
    cfg: &Arc<rustls::ClientConfig>,
    payload: &[u8],
) -> Result<Vec<u8>, String> {
    let (mut out, mut inp) = exec_cat(port, cfg).await?;
    let write = async {
        send_all(&mut out, 3, payload).await?;
        out.send(Frame::Data {
            stream_id: 3,
            fin: true,
            data: Bytes::new(),
        })
        .await
        .map_err(|e| format!("send stdin FIN: {e}"))
    };
    let read = async {
        let mut stdout = BytesMut::with_capacity(payload.len());
        let mut status = Vec::new();
        let (mut stdout_fin, mut error_fin) = (false, false);
        while !(stdout_fin && error_fin) {
            let Some(frame) = inp.next().await else {
                return Err(format!(
                    "connection closed early ({} bytes of stdout, status {:?})",
                    stdout.len(),
                    String::from_utf8_lossy(&status)
                ));
            };
            match frame.map_err(|e| format!("bad frame from server: {e}"))? {
                Frame::Data {
                    stream_id: 5,
                    fin,
                    data,
                } => {
                    stdout.extend_from_slice(&data);
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
                    return Err(format!("stream {stream_id} reset ({status})"));
                }
                _ => {}
            }
        }
        let text = String::from_utf8_lossy(&status);
        if !text.contains("\"Success\"") {
            return Err(format!("exec status: {text}"));
        }
        Ok(stdout.to_vec())
    };
    let (w, r) = tokio::join!(write, read);
    w?;
    r
}

/// Opens a port-forward session with one stream pair to `target` (`requestID` 0: error
/// stream 1, already half-closed, and data stream 3).
pub(crate) async fn port_forward(
    port: u16,
    cfg: &Arc<rustls::ClientConfig>,
    target: u16,
) -> Result<(Out, In), String> {
    let s = tls(port, cfg, None).await?;
    let (mut out, inp) = upgrade(s, "/portForward/ns/p", "portforward.k8s.io").await?;
    let target = target.to_string();
    for (id, kind) in [(1u32, "error"), (3, "data")] {
        let h = Headers::new()
            .with("streamType", kind)
            .with("port", &target)
            .with("requestID", "0");
        syn(&mut out, id, h).await?;
    }
    out.send(Frame::Data {
        stream_id: 1,
        fin: true,
        data: Bytes::new(),
    })
    .await
    .map_err(|e| format!("send error FIN: {e}"))?;
    Ok((out, inp))
}

/// Sends `payload` on stream `to` while reading until as many bytes came back on stream
/// `from`; returns them.
pub(crate) async fn round_trip(
    out: &mut Out,
    inp: &mut In,
    to: u32,
    from: u32,
    payload: &[u8],
) -> Result<Vec<u8>, String> {
    let write = send_all(out, to, payload);
    let read = async {
        let mut got = BytesMut::with_capacity(payload.len());
        while got.len() < payload.len() {
            let Some(frame) = inp.next().await else {
                return Err(format!("connection closed after {} bytes", got.len()));
            };
            match frame.map_err(|e| format!("bad frame from server: {e}"))? {
                Frame::Data {
                    stream_id, data, ..
                } if stream_id == from => got.extend_from_slice(&data),
                Frame::Data {
                    stream_id: 1, data, ..
                } if !data.is_empty() => {
                    return Err(format!("error stream: {}", String::from_utf8_lossy(&data)));
                }
                Frame::RstStream { stream_id, status } => {
                    return Err(format!("stream {stream_id} reset ({status})"));
                }
                _ => {}
            }
        }
        Ok(got.to_vec())
    };
    let (w, r) = tokio::join!(write, read);
    w?;
    r
}

/// One port-forward session with one stream pair to `target`: sends `payload` on the
/// data stream and returns what comes back once it is all there.
pub(crate) async fn port_forward_echo(
    port: u16,
    cfg: &Arc<rustls::ClientConfig>,
    target: u16,
    payload: &[u8],
) -> Result<Vec<u8>, String> {
    let (mut out, mut inp) = port_forward(port, cfg, target).await?;
    round_trip(&mut out, &mut inp, 3, 3, payload).await
}

/// A TCP echo server on loopback (the port-forward target); returns its port.
pub(crate) async fn echo_server() -> Result<u16, String> {
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("bind echo: {e}"))?;
    let port = echo.local_addr().map_err(|e| format!("addr: {e}"))?.port();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = c.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Ok(port)
}

/// A payload distinct per `seed`.
pub(crate) fn payload(seed: u32, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

/// The first bytes of a TLS ClientHello: a record header announcing 512 bytes, the
/// handshake type and part of its length; the rest never comes.
pub(crate) const PARTIAL_CLIENT_HELLO: [u8; 7] = [0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00];

/// Waits until the server closes `s` (EOF or an error, e.g. a reset); whatever it sends
/// before is read and dropped.
pub(crate) async fn closed_by_server<S: tokio::io::AsyncRead + Unpin>(s: &mut S) {
    let mut buf = [0u8; 1024];
    while let Ok(n) = s.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}

/// Sends `line` one byte every `every`, never finishing the request head; returns when a
/// write fails (the server closed the connection) or the line is used up.
pub(crate) async fn dribble<S: tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    line: &[u8],
    every: Duration,
) {
    for b in line.iter().cycle().take(10_000) {
        if s.write_all(&[*b]).await.is_err() || s.flush().await.is_err() {
            return;
        }
        tokio::time::sleep(every).await;
    }
}

/// This process's resident set size in KiB (`VmRSS` of /proc/self/status).
pub(crate) fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}
