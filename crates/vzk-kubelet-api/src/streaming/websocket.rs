//! The WebSocket forms of exec/attach and port-forward (what a 1.36+ API server sends
//! a node declaring `ExtendWebSocketsToKubelet`, and what direct clients use).
//!
//! * remotecommand: sub-protocols `v5.channel.k8s.io`, `v4.channel.k8s.io`,
//!   `v4.base64.channel.k8s.io`, `channel.k8s.io`, `base64.channel.k8s.io` (none offered
//!   = binary v1). Each message is `[channel][payload]` (0 stdin, 1 stdout, 2 stderr,
//!   3 error, 4 resize); base64 variants send text `'0'+channel` then base64. An empty
//!   message on the first writable channel signals readiness. v5 adds the close signal
//!   `[255, channel]` (the client half-closes stdin with `[255, 0]`; we do not send it
//!   for stdout/stderr, which kubectl 1.37 would log as an unknown stream). v4+ end with
//!   the Status JSON on channel 3.
//! * port-forward: `SPDY/3.1+portforward.k8s.io` carries a SPDY session in binary
//!   messages (boundaries arbitrary), served by [`super::portforward`]; otherwise the
//!   channel protocol: `?port=` list, data channel `2i`, error channel `2i+1`, each first
//!   carrying the port as u16 little-endian.
//!
//! Bytes travel without intermediate pipes: a process's output is a [`ChannelWriter`]
//! whose every write becomes one message (one copy), a client's input reaches the
//! process through a [`ChannelReader`] of the received payloads (no copy until the
//! process reads it), and the writer task batches messages into the transport, flushing
//! only when its queue runs dry.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_util::sync::PollSender;
use tracing::{Instrument, debug, info_span};
use vzk_core::PodKey;
use vzk_core::streams::{AttachIo, BoxReader, BoxWriter, TermSize};

use super::negotiate::Refusal;
use super::status;
use super::{ExecRequest, remotecommand};
use crate::metrics::{StreamKind, Transport};
use crate::query;
use crate::server::AppState;
use crate::spdy::session::read_from;
use crate::spdy::{BatchWriter, Session, SessionConfig};

/// remotecommand sub-protocols we speak, newest first.
pub(crate) const REMOTECOMMAND_WS_PROTOCOLS: [&str; 5] = [
    "v5.channel.k8s.io",
    "v4.channel.k8s.io",
    "v4.base64.channel.k8s.io",
    "channel.k8s.io",
    "base64.channel.k8s.io",
];
/// The SPDY-in-WebSocket port-forward tunnel.
pub(crate) const PORTFORWARD_TUNNEL: &str = "SPDY/3.1+portforward.k8s.io";
/// Channel-protocol port-forward sub-protocols.
const PORTFORWARD_WS_PROTOCOLS: [&str; 4] = [
    PORTFORWARD_TUNNEL,
    "v4.channel.k8s.io",
    "v4.base64.channel.k8s.io",
    "portforward.k8s.io",
];
/// Largest payload of one message we send.
const MAX_MESSAGE: usize = 1 << 20;
/// Received messages queued for a process's input before the reader stops reading
/// (few: a client's message may be large).
const INPUT_QUEUE: usize = 4;
/// How much tungstenite reads from the connection at a time. It zero-fills that much of
/// its buffer before each read: its default (128 KiB) costs a 128 KiB `memset` per read
/// that returns one TLS record (at most 16 KiB) or two, about a tenth of the agent's CPU
/// on a stream (profiled). 32 KiB is a Go client's whole write (kubectl's `io.Copy`).
const READ_BUFFER: usize = 32 * 1024;

fn offered(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

/// The first protocol the client offers that we support; `Ok(None)` if it offered none.
fn choose(headers: &HeaderMap, ours: &[&'static str]) -> Result<Option<&'static str>, Refusal> {
    let offered = offered(headers);
    if offered.is_empty() {
        return Ok(None);
    }
    match offered
        .iter()
        .find_map(|o| ours.iter().find(|s| **s == o.as_str()))
    {
        Some(p) => Ok(Some(*p)),
        None => Err(Refusal::new(
            StatusCode::FORBIDDEN,
            format!(
                "unable to upgrade: unable to negotiate protocol: client supports {offered:?}, server supports {ours:?}"
            ),
        )),
    }
}

type Socket = WebSocketStream<TokioIo<Upgraded>>;
type Sink = SplitSink<Socket, Message>;
type Source = SplitStream<Socket>;

/// Answers the RFC 6455 opening handshake (101 with the chosen sub-protocol) and
/// returns the pending upgrade.
fn ws_accept(
    req: &mut Request,
    protocol: Option<&'static str>,
) -> Result<(Response, OnUpgrade), Refusal> {
    let bad = |m: &str| Refusal::new(StatusCode::BAD_REQUEST, format!("websocket handshake: {m}"));
    if req.method() != Method::GET {
        return Err(bad("the request must be a GET"));
    }
    if req
        .headers()
        .get(header::SEC_WEBSOCKET_VERSION)
        .and_then(|v| v.to_str().ok())
        != Some("13")
    {
        return Err(bad("Sec-WebSocket-Version must be 13"));
    }
    let key = req
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or_else(|| bad("Sec-WebSocket-Key is missing"))?;
    let accept = derive_accept_key(key.as_bytes());
    let mut resp = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).map_err(|_| bad("accept key"))?,
    );
    if let Some(p) = protocol {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(p));
    }
    Ok((resp, hyper::upgrade::on(req)))
}

/// Spawns `serve` on the upgraded socket once the 101 is sent.
fn spawn_socket<F, Fut>(on: OnUpgrade, span: tracing::Span, serve: F)
where
    F: FnOnce(Socket) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(
        async move {
            match on.await {
                Ok(up) => {
                    serve(
                        WebSocketStream::from_raw_socket(
                            TokioIo::new(up),
                            Role::Server,
                            Some(WebSocketConfig::default().read_buffer_size(READ_BUFFER)),
                        )
                        .await,
                    )
                    .await
                }
                Err(error) => debug!(%error, "websocket: upgrade failed"),
            }
        }
        .instrument(span),
    );
}

/// Ends a socket: the writer has sent our Close; wait (briefly) for the reader to see
/// the client's Close, then shut the transport down (TLS close_notify).
async fn finish(writer: JoinHandle<Sink>, reader: JoinHandle<Source>) {
    let Ok(sink) = writer.await else { return };
    let abort = reader.abort_handle();
    match tokio::time::timeout(std::time::Duration::from_secs(2), reader).await {
        Ok(Ok(stream)) => {
            if let Ok(mut ws) = sink.reunite(stream) {
                let _ = ws.get_mut().shutdown().await;
            }
        }
        _ => abort.abort(),
    }
}

/// Forwards queued messages until a Close has been sent or the queue ends (then
/// sends Close itself); returns the sink for [`finish`].
fn spawn_writer(mut sink: Sink, mut rx: mpsc::Receiver<Message>) -> JoinHandle<Sink> {
    tokio::spawn(async move {
        let mut closed = false;
        while let Some(m) = rx.recv().await {
            closed = matches!(m, Message::Close(_));
            // Batch what is queued into the transport; flush once the queue runs dry.
            let res = if closed || rx.is_empty() {
                sink.send(m).await
            } else {
                sink.feed(m).await
            };
            if res.is_err() || closed {
                break;
            }
        }
        if !closed {
            let _ = sink.send(normal_close()).await;
        }
        let _ = sink.flush().await;
        sink
    })
}

/// Framing of one negotiated channel protocol.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Framing {
    pub(crate) base64: bool,
}

impl Framing {
    fn encode(self, channel: u8, data: &[u8]) -> Message {
        if self.base64 {
            let mut s = String::with_capacity(1 + data.len().div_ceil(3) * 4);
            s.push(char::from(b'0' + channel));
            B64.encode_string(data, &mut s);
            Message::Text(s.into())
        } else {
            let mut v = Vec::with_capacity(1 + data.len());
            v.push(channel);
            v.extend_from_slice(data);
            Message::Binary(v.into())
        }
    }

    /// `(channel, payload)` of a client message; `None` for control or malformed ones.
    pub(crate) fn decode(self, msg: Message) -> Option<(u8, Bytes)> {
        match msg {
            Message::Binary(b) if !b.is_empty() => Some((b[0], b.slice(1..))),
            Message::Text(t) if self.base64 && !t.is_empty() => {
                let s = t.as_str();
                let ch = s.as_bytes().first()?.checked_sub(b'0')?;
                B64.decode(s.get(1..)?).ok().map(|d| (ch, Bytes::from(d)))
            }
            _ => None,
        }
    }
}

fn broken() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "websocket closed")
}

/// A process's output as `channel` messages: each write is one message (at most
/// [`MAX_MESSAGE`] bytes), queued for the writer task.
pub(crate) struct ChannelWriter {
    tx: PollSender<Message>,
    channel: u8,
    f: Framing,
}

impl ChannelWriter {
    fn new(tx: mpsc::Sender<Message>, channel: u8, f: Framing) -> Self {
        Self {
            tx: PollSender::new(tx),
            channel,
            f,
        }
    }
}

impl AsyncWrite for ChannelWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        ready!(self.tx.poll_reserve(cx)).map_err(|_| broken())?;
        let n = data.len().min(MAX_MESSAGE);
        let m = self.f.encode(self.channel, &data[..n]);
        self.tx.send_item(m).map_err(|_| broken())?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.tx.close();
        Poll::Ready(Ok(()))
    }
}

/// A process's input: the payloads the reader task received, read in place; EOF once
/// the sender is dropped.
pub(crate) struct ChannelReader {
    rx: mpsc::Receiver<Bytes>,
    buf: Bytes,
}

impl ChannelReader {
    fn new() -> (mpsc::Sender<Bytes>, Self) {
        let (tx, rx) = mpsc::channel(INPUT_QUEUE);
        (
            tx,
            Self {
                rx,
                buf: Bytes::new(),
            },
        )
    }
}

impl AsyncRead for ChannelReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        while self.buf.is_empty() {
            match ready!(self.rx.poll_recv(cx)) {
                Some(b) => self.buf = b,
                None => return Poll::Ready(Ok(())),
            }
        }
        read_from(&mut self.buf, out);
        Poll::Ready(Ok(()))
    }
}

/// One forwarded port of the channel protocol: input from the data channel, output to it.
struct ChannelPipe {
    rd: ChannelReader,
    wr: ChannelWriter,
}

impl AsyncRead for ChannelPipe {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.rd).poll_read(cx, out)
    }
}

impl AsyncWrite for ChannelPipe {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.wr).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.wr).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.wr).poll_shutdown(cx)
    }
}

fn normal_close() -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    }))
}

/// Upgrades an exec/attach request to WebSocket.
pub(crate) async fn remote_command(
    st: AppState,
    req_info: ExecRequest,
    mut req: Request,
) -> Response {
    let protocol = match choose(req.headers(), &REMOTECOMMAND_WS_PROTOCOLS) {
        Ok(p) => p,
        Err(refusal) => return refusal.into_response(),
    };
    let (resp, on) = match ws_accept(&mut req, protocol) {
        Ok(r) => r,
        Err(refusal) => return refusal.into_response(),
    };
    let span = info_span!("remotecommand_ws", op = ?req_info.op, pod.ns = %req_info.target.namespace, pod.name = %req_info.target.pod, protocol);
    let protocol = protocol.unwrap_or("channel.k8s.io");
    spawn_socket(on, span, move |socket| {
        serve_remote_command(socket, st, req_info, protocol)
    });
    resp
}

async fn serve_remote_command(
    socket: Socket,
    st: AppState,
    req: ExecRequest,
    protocol: &'static str,
) {
    let kind = match req.op {
        super::Op::Exec => StreamKind::Exec,
        super::Op::Attach => StreamKind::Attach,
    };
    let _open = st.metrics.session(kind, Transport::WebSocket);
    let f = Framing {
        base64: protocol.contains("base64"),
    };
    let v5 = protocol == "v5.channel.k8s.io";
    let v4plus = v5 || protocol.starts_with("v4.");
    let (sink, mut stream) = socket.split();
    let (out_tx, out_rx) = mpsc::channel::<Message>(32);
    let writer = spawn_writer(sink, out_rx);
    let ready = if req.stdout {
        1
    } else if req.stderr {
        2
    } else {
        3
    };
    let _ = out_tx.send(f.encode(ready, &[])).await;

    let (stdin_w, stdin_r) = if req.stdin {
        let (tx, rx) = ChannelReader::new();
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    let (resize_tx, resize_rx) = mpsc::channel(16);
    let reader = tokio::spawn(async move {
        let mut stdin_w = stdin_w;
        while let Some(Ok(msg)) = stream.next().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
            let Some((ch, payload)) = f.decode(msg) else {
                continue;
            };
            match ch {
                0 => {
                    if let Some(w) = stdin_w.as_mut()
                        && !payload.is_empty()
                        && w.send(payload).await.is_err()
                    {
                        stdin_w = None;
                    }
                }
                4 => {
                    let sizes: Vec<TermSize> = serde_json::Deserializer::from_slice(&payload)
                        .into_iter()
                        .flatten()
                        .collect();
                    for size in sizes {
                        let _ = resize_tx.send(size).await;
                    }
                }
                255 if v5 && payload.first() == Some(&0) => stdin_w = None,
                other => debug!(
                    channel = other,
                    "remotecommand_ws: message on an ignored channel"
                ),
            }
        }
        stream
    });
    // No `[255, channel]` close signal: kubectl 1.37 logs it as an unknown stream; the
    // end of output is implied by the status on channel 3.
    let out_writer = |want: bool, channel: u8| -> Option<BoxWriter> {
        want.then(|| Box::pin(ChannelWriter::new(out_tx.clone(), channel, f)) as BoxWriter)
    };
    let stdout = out_writer(req.stdout, 1);
    let stderr = out_writer(req.stderr && !req.tty, 2);
    let io = AttachIo {
        stdin: stdin_r.map(|r| Box::pin(r) as BoxReader),
        stdout,
        stderr,
        tty: req.tty,
        resize: req.tty.then_some(resize_rx),
    };
    let outcome = remotecommand::run_provider(&st, &req, io).await;
    let msg = if v4plus {
        Some(status::v4_status(&outcome))
    } else {
        status::legacy_status(&outcome)
    };
    if let Some(msg) = msg {
        let _ = out_tx.send(f.encode(3, msg.as_bytes())).await;
    }
    let _ = out_tx.send(normal_close()).await;
    drop(out_tx);
    finish(writer, reader).await;
}

/// Upgrades a port-forward request to WebSocket (tunnel or channel protocol).
pub(crate) async fn port_forward(st: AppState, pod: PodKey, mut req: Request) -> Response {
    let protocol = match choose(req.headers(), &PORTFORWARD_WS_PROTOCOLS) {
        Ok(p) => p,
        Err(refusal) => return refusal.into_response(),
    };
    let tunnel = protocol == Some(PORTFORWARD_TUNNEL);
    let ports = if tunnel {
        Vec::new()
    } else {
        match parse_ports(req.uri().query()) {
            Ok(p) => p,
            Err(refusal) => return refusal.into_response(),
        }
    };
    let (resp, on) = match ws_accept(&mut req, protocol) {
        Ok(r) => r,
        Err(refusal) => return refusal.into_response(),
    };
    let span =
        info_span!("portforward_ws", pod.ns = %pod.namespace, pod.name = %pod.name, protocol);
    spawn_socket(on, span, move |socket| async move {
        if tunnel {
            serve_tunnel(socket, st, pod).await;
        } else {
            let f = Framing {
                base64: protocol.is_some_and(|p| p.contains("base64")),
            };
            serve_port_channels(socket, st, pod, ports, f).await;
        }
    });
    resp
}

pub(crate) fn parse_ports(raw: Option<&str>) -> Result<Vec<u16>, Refusal> {
    let bad = |m: String| Refusal::new(StatusCode::BAD_REQUEST, m);
    let q = query::pairs(raw).map_err(|e| bad(e.to_string()))?;
    let mut ports = Vec::new();
    for v in query::all(&q, "port") {
        for p in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match p.parse::<u16>() {
                Ok(n) if n > 0 => ports.push(n),
                _ => return Err(bad(format!("invalid port {p:?}"))),
            }
        }
    }
    if ports.is_empty() {
        return Err(bad("query parameter \"port\" is required".into()));
    }
    Ok(ports)
}

/// The SPDY session's batches as binary messages: each batch's buffer becomes the
/// message (split at [`MAX_MESSAGE`]), with no copy. The buffers come back once the
/// writer task has written their messages, for the session's next batches: no
/// allocation per batch, and no fresh pages to fault in.
struct MessageBatches {
    tx: mpsc::Sender<Message>,
    spare: Arc<Mutex<Vec<Vec<u8>>>>,
}

/// Buffers kept for reuse at most (the one a message just gave back, and one more).
const SPARE_BATCHES: usize = 2;

/// A batch in a message: its buffer goes back to the spares when the message is dropped.
struct Lent {
    buf: Vec<u8>,
    spare: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        if let Ok(mut spare) = self.spare.lock()
            && spare.len() < SPARE_BATCHES
        {
            spare.push(buf);
        }
    }
}

impl BatchWriter for MessageBatches {
    async fn write_batch(&mut self, batch: &mut Vec<u8>) -> io::Result<()> {
        let next = self
            .spare
            .lock()
            .ok()
            .and_then(|mut s| s.pop())
            .unwrap_or_default();
        let lent = Lent {
            buf: std::mem::replace(batch, next),
            spare: self.spare.clone(),
        };
        let mut bytes = Bytes::from_owner(lent);
        while !bytes.is_empty() {
            let part = bytes.split_to(bytes.len().min(MAX_MESSAGE));
            self.tx
                .send(Message::Binary(part))
                .await
                .map_err(|_| broken())?;
        }
        Ok(())
    }

    fn idle(&mut self) {
        if let Ok(mut s) = self.spare.lock() {
            s.clear();
        }
    }

    async fn close(&mut self) {
        // The writer task sends Close once every sender is gone: the session's ends with it.
    }
}

/// The client's binary messages as one byte stream, read by the SPDY session straight
/// off the socket (no task or queue between); EOF at the client's Close. When dropped
/// (the session ended) it hands the socket's read side back through `back`, with whether
/// the client's Close was seen, for [`finish_tunnel`].
struct MessageReader {
    stream: Option<Source>,
    buf: Bytes,
    closed: bool,
    back: Option<oneshot::Sender<(Source, bool)>>,
}

impl AsyncRead for MessageReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        while self.buf.is_empty() {
            if self.closed {
                return Poll::Ready(Ok(()));
            }
            let Some(stream) = self.stream.as_mut() else {
                return Poll::Ready(Ok(()));
            };
            match ready!(stream.poll_next_unpin(cx)) {
                Some(Ok(Message::Binary(b))) => self.buf = b,
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => self.closed = true,
                Some(Ok(_)) => {}
            }
        }
        read_from(&mut self.buf, out);
        Poll::Ready(Ok(()))
    }
}

impl Drop for MessageReader {
    fn drop(&mut self) {
        if let (Some(stream), Some(back)) = (self.stream.take(), self.back.take()) {
            let _ = back.send((stream, self.closed));
        }
    }
}

/// [`finish`] for the tunnel: the read side comes back from the session's reader; if the
/// client's Close was not seen yet, wait (briefly) for it.
async fn finish_tunnel(writer: JoinHandle<Sink>, back: oneshot::Receiver<(Source, bool)>) {
    let Ok(sink) = writer.await else { return };
    let closed = async {
        let (mut stream, mut closed) = back.await.ok()?;
        while !closed {
            match stream.next().await {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => closed = true,
                Some(Ok(_)) => {}
            }
        }
        Some(stream)
    };
    if let Ok(Some(stream)) = tokio::time::timeout(std::time::Duration::from_secs(2), closed).await
        && let Ok(mut ws) = sink.reunite(stream)
    {
        let _ = ws.get_mut().shutdown().await;
    }
}

/// The SPDY-in-WebSocket tunnel: the SPDY session reads the received binary payloads
/// straight off the socket (no copy until it reads them, no task between) and each batch
/// of frames it writes becomes a binary message as it is (no copy).
async fn serve_tunnel(socket: Socket, st: AppState, pod: PodKey) {
    let (sink, stream) = socket.split();
    let (out_tx, out_rx) = mpsc::channel::<Message>(8);
    let writer = spawn_writer(sink, out_rx);
    let (back, came_back) = oneshot::channel();
    let rd = MessageReader {
        stream: Some(stream),
        buf: Bytes::new(),
        closed: false,
        back: Some(back),
    };
    let batches = MessageBatches {
        tx: out_tx,
        spare: Arc::default(),
    };
    let session = Session::start_with(rd, batches, SessionConfig::default());
    super::portforward::serve_session(session, st, pod, Transport::WebSocket).await;
    finish_tunnel(writer, came_back).await;
}

async fn serve_port_channels(
    socket: Socket,
    st: AppState,
    pod: PodKey,
    ports: Vec<u16>,
    f: Framing,
) {
    let _open = st
        .metrics
        .session(StreamKind::PortForward, Transport::WebSocket);
    let (sink, mut stream) = socket.split();
    let (out_tx, out_rx) = mpsc::channel::<Message>(32);
    let writer = spawn_writer(sink, out_rx);
    let mut inputs = Vec::new();
    let mut forwards = Vec::new();
    for (i, port) in ports.iter().copied().enumerate() {
        let Ok(i) = u8::try_from(i) else { break };
        let (data_ch, err_ch) = (i.saturating_mul(2), i.saturating_mul(2).saturating_add(1));
        for ch in [data_ch, err_ch] {
            let _ = out_tx.send(f.encode(ch, &port.to_le_bytes())).await;
        }
        let (input, rd) = ChannelReader::new();
        inputs.push(Some(input));
        let pipe = ChannelPipe {
            rd,
            wr: ChannelWriter::new(out_tx.clone(), data_ch, f),
        };
        let (st, pod, tx) = (st.clone(), pod.clone(), out_tx.clone());
        forwards.push(tokio::spawn(async move {
            if let Err(e) = st.runtime.port_forward(&pod, port, Box::pin(pipe)).await {
                let msg = super::portforward::error_message(&pod, port, &e);
                let _ = tx.send(f.encode(err_ch, msg.as_bytes())).await;
            }
        }));
    }
    drop(out_tx);
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let reader = tokio::spawn(async move {
        while let Some(Ok(msg)) = stream.next().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
            let Some((ch, payload)) = f.decode(msg) else {
                continue;
            };
            if ch % 2 == 1 {
                continue;
            }
            if let Some(slot) = inputs.get_mut(usize::from(ch / 2))
                && let Some(w) = slot.as_mut()
                && !payload.is_empty()
                && w.send(payload).await.is_err()
            {
                *slot = None;
            }
        }
        // Dropping the senders is EOF for the forwards' input.
        inputs.clear();
        let _ = done_tx.send(());
        stream
    });
    let aborts: Vec<_> = forwards.iter().map(JoinHandle::abort_handle).collect();
    let all_done = futures::future::join_all(forwards);
    tokio::pin!(all_done);
    tokio::select! {
        _ = done_rx => {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), &mut all_done).await;
        }
        _ = &mut all_done => {}
        () = st.shutdown.cancelled() => {}
    }
    aborts.iter().for_each(tokio::task::AbortHandle::abort);
    finish(writer, reader).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(m: Message) -> Bytes {
        match m {
            Message::Binary(b) => b,
            other => panic!("not binary: {other:?}"),
        }
    }

    #[tokio::test]
    async fn batches_become_messages_and_their_buffers_come_back() {
        let (tx, mut rx) = mpsc::channel(8);
        let mut w = MessageBatches {
            tx,
            spare: Arc::default(),
        };
        let mut batch = b"first batch".to_vec();
        w.write_batch(&mut batch).await.expect("written");
        assert!(batch.is_empty(), "the batch was taken");
        assert_eq!(payload(rx.recv().await.expect("a message")), "first batch");
        // The message is gone: its buffer is a spare now, and the next batch gets it.
        assert_eq!(w.spare.lock().expect("lock").len(), 1);
        let mut batch = vec![7u8; MAX_MESSAGE + 10];
        w.write_batch(&mut batch).await.expect("written");
        assert!(batch.capacity() >= 11, "a returned buffer, not a new one");
        // A batch larger than a message is split without a copy, in order.
        let a = payload(rx.recv().await.expect("first part"));
        let b = payload(rx.recv().await.expect("second part"));
        assert_eq!((a.len(), b.len()), (MAX_MESSAGE, 10));
        assert!(a.iter().chain(b.iter()).all(|&x| x == 7));
        drop((a, b));
        let kept = w.spare.lock().expect("lock").len();
        assert!((1..=SPARE_BATCHES).contains(&kept), "kept {kept}");
        w.idle();
        assert!(
            w.spare.lock().expect("lock").is_empty(),
            "idle frees spares"
        );
        // A writer task that is gone fails the write.
        drop(rx);
        let mut batch = b"late".to_vec();
        assert!(w.write_batch(&mut batch).await.is_err());
    }
}
