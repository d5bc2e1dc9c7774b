//! An in-memory, size-capped [`AsyncWrite`] used to capture a command's output
//! (probes, stats scripts). Exceeding the cap is a write error, which makes the exec
//! cancel the remote command: a guest cannot make us buffer without bound.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;

/// The writer half: append-only, shared with its [`CaptureBuf`].
pub(crate) struct CaptureWriter {
    buf: Arc<Mutex<Vec<u8>>>,
    limit: usize,
}

/// The reading half: takes what was written.
pub(crate) struct CaptureBuf(Arc<Mutex<Vec<u8>>>);

impl CaptureWriter {
    /// A writer accepting at most `limit` bytes in total.
    pub(crate) fn new(limit: usize) -> (Self, CaptureBuf) {
        let buf = Arc::new(Mutex::new(Vec::new()));
        (
            Self {
                buf: buf.clone(),
                limit,
            },
            CaptureBuf(buf),
        )
    }
}

impl CaptureBuf {
    /// Everything written so far.
    pub(crate) fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl AsyncWrite for CaptureWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let mut buf = self.buf.lock().unwrap_or_else(|p| p.into_inner());
        if buf.len() + data.len() > self.limit {
            return Poll::Ready(Err(std::io::Error::other(format!(
                "captured output exceeds {} bytes",
                self.limit
            ))));
        }
        buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn captures_up_to_the_limit() {
        let (mut w, buf) = CaptureWriter::new(8);
        assert!(w.write_all(b"hello").await.is_ok());
        assert!(w.write_all(b"world").await.is_err());
        assert_eq!(buf.take(), b"hello");
    }
}
