//! Entry points for the fuzz targets in the repository's `fuzz/` crate: the parsers of
//! what a client sends that are not public API (query strings, WebSocket channel
//! messages, the SPDY resize stream). Hidden; not for other uses.

use std::collections::HashMap;
use std::io::{Cursor, Read, Write};

use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocket};
use vzk_core::streams::TermSize;

use crate::streaming::websocket::Framing;
use crate::streaming::{Op, parse_exec};

/// Parses an exec and an attach query string (`?command=…&stdin=1…`) as the routes do;
/// how many of the two were accepted.
pub fn exec_query(raw: &str) -> usize {
    let path: HashMap<String, String> = [("ns", "default"), ("pod", "p"), ("container", "c")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    [Op::Exec, Op::Attach]
        .into_iter()
        .filter(|&op| parse_exec(op, &path, Some(raw)).is_ok())
        .count()
}

/// Parses a container-logs query string (`?follow&tailLines=…&sinceTime=…`).
pub fn log_query(raw: &str) -> bool {
    crate::routes::logs::log_options(Some(raw)).is_ok()
}

/// Parses a port-forward query string (`?port=80,443&port=22`): the ports.
pub fn port_forward_query(raw: &str) -> Option<Vec<u16>> {
    crate::streaming::websocket::parse_ports(Some(raw)).ok()
}

/// The SPDY remotecommand `resize` stream (newline-separated `{"Width","Height"}`):
/// how many sizes it yields.
pub fn resize_stream(bytes: &[u8]) -> usize {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().build() else {
        return 0;
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    rt.block_on(async {
        let drain = async {
            let mut n = 0;
            while rx.recv().await.is_some() {
                n += 1;
            }
            n
        };
        let (_, n) = tokio::join!(
            crate::streaming::remotecommand::pump_resize(bytes, tx),
            drain
        );
        n
    })
}

/// A byte stream read and discarded, for a server-side WebSocket over fixed input.
struct Input(Cursor<Vec<u8>>);

impl Read for Input {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Input {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Raw client WebSocket frames as the server reads them after the upgrade (the
/// tungstenite configuration the API uses), each message split into `(channel, payload)`
/// by the channel protocol (`base64` for the `base64.channel.k8s.io` variants) and resize
/// messages parsed as the exec reader does. How many channel messages came out.
pub fn websocket_stream(bytes: &[u8], base64: bool) -> usize {
    let f = Framing { base64 };
    let mut ws = WebSocket::from_raw_socket(Input(Cursor::new(bytes.to_vec())), Role::Server, None);
    let mut n = 0;
    while let Ok(msg) = ws.read() {
        if matches!(msg, Message::Close(_)) {
            break;
        }
        let Some((ch, payload)) = f.decode(msg) else {
            continue;
        };
        n += 1;
        if ch == 4 {
            let sizes: Vec<TermSize> = serde_json::Deserializer::from_slice(&payload)
                .into_iter()
                .flatten()
                .collect();
            n += sizes.len();
        }
    }
    n
}
