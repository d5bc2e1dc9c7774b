//! Integration tests of vzk-guest against a real dropbear SSH server (see
//! `guest/support.rs`). One binary; each test starts its own server on a free
//! loopback port.

mod support;

mod access;
mod exec;
mod forward;
mod session;

use std::future::Future;
use std::time::Duration;

use tokio::io::{AsyncReadExt, DuplexStream};
use tokio::task::JoinHandle;
use vzk_core::streams::AttachIo;

/// Fails the test instead of hanging when `fut` takes longer than `secs`.
pub(crate) async fn within<T>(secs: u64, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(secs), fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {secs}s"),
    }
}

/// The test's ends of an exec's streams.
pub(crate) struct Ends {
    pub(crate) stdin: Option<DuplexStream>,
    pub(crate) stdout: JoinHandle<Vec<u8>>,
    pub(crate) stderr: JoinHandle<Vec<u8>>,
}

fn drain(mut r: DuplexStream) -> JoinHandle<Vec<u8>> {
    tokio::spawn(async move {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf).await;
        buf
    })
}

/// Builds a non-TTY [`AttachIo`] whose outputs are collected in the background.
pub(crate) fn pipes(with_stdin: bool) -> (AttachIo, Ends) {
    let (out_w, out_r) = tokio::io::duplex(1 << 16);
    let (err_w, err_r) = tokio::io::duplex(1 << 16);
    let (stdin, stdin_end) = if with_stdin {
        let (a, b) = tokio::io::duplex(1 << 16);
        (Some(Box::pin(b) as vzk_core::streams::BoxReader), Some(a))
    } else {
        (None, None)
    };
    let io = AttachIo {
        stdin,
        stdout: Some(Box::pin(out_w)),
        stderr: Some(Box::pin(err_w)),
        tty: false,
        resize: None,
    };
    (
        io,
        Ends {
            stdin: stdin_end,
            stdout: drain(out_r),
            stderr: drain(err_r),
        },
    )
}

pub(crate) async fn collected(h: JoinHandle<Vec<u8>>) -> Vec<u8> {
    h.await.unwrap_or_else(|e| panic!("collector task: {e}"))
}
