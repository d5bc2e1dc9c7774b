//! Larger socket reads under rustls.
//!
//! rustls asks its transport for at most ~4 KiB at a time (`DeframerVecBuffer`), so a
//! bulk stream costs one `recv` per 4 KiB. [`ReadAhead`] reads the socket in
//! [`READ_AHEAD`] pieces once it is readable and serves rustls from that: one syscall
//! per 64 KiB, for one extra copy in user space. The buffer is allocated only when the
//! socket has data and freed once drained, so an idle (or stalled, or slowloris)
//! connection holds none. Writes go straight through (vectored too).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Bytes read from the socket at a time.
pub(crate) const READ_AHEAD: usize = 64 * 1024;

/// A TCP stream read ahead in [`READ_AHEAD`] pieces.
#[derive(Debug)]
pub(crate) struct ReadAhead {
    tcp: TcpStream,
    buf: BytesMut,
}

impl ReadAhead {
    pub(crate) fn new(tcp: TcpStream) -> Self {
        Self {
            tcp,
            buf: BytesMut::new(),
        }
    }
}

impl AsyncRead for ReadAhead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.buf.is_empty() {
                let n = this.buf.len().min(out.remaining());
                out.put_slice(&this.buf[..n]);
                this.buf.advance(n);
                if this.buf.is_empty() {
                    this.buf = BytesMut::new();
                }
                return Poll::Ready(Ok(()));
            }
            if out.remaining() >= READ_AHEAD {
                return Pin::new(&mut this.tcp).poll_read(cx, out);
            }
            ready!(this.tcp.poll_read_ready(cx))?;
            let mut b = BytesMut::with_capacity(READ_AHEAD);
            match this.tcp.try_read_buf(&mut b) {
                Ok(0) => return Poll::Ready(Ok(())),
                Ok(_) => this.buf = b,
                // Readiness was cleared: wait for the next.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for ReadAhead {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn small_reads_see_every_byte_in_order_and_eof() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.expect("connect");
            c.write_all(&sent).await.expect("write");
        });
        let (tcp, _) = l.accept().await.expect("accept");
        let mut r = ReadAhead::new(tcp);
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = r.read(&mut chunk).await.expect("read");
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
        }
        writer.await.expect("writer");
        assert!(got == data, "{} of {} bytes", got.len(), data.len());
        assert_eq!(r.buf.capacity(), 0, "nothing held once drained");
    }
}
