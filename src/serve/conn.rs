//! Accepted connections with a handshake deadline: a peer must send its first bytes (the 24-byte HTTP/2
//! preface, or a TLS ClientHello, which is longer) within a time limit. One that connects and stays
//! silent, or trickles a byte now and then, is dropped, so it neither holds a connection forever nor
//! keeps a graceful shutdown waiting.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Bytes a client sends first: the HTTP/2 connection preface.
const FIRST_BYTES: usize = 24;

/// A TCP connection whose first [`FIRST_BYTES`] must arrive before a deadline.
pub(super) struct HandshakeDeadline {
    inner: TcpStream,
    missing: usize,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl HandshakeDeadline {
    /// Starts the clock on `inner`.
    pub fn new(inner: TcpStream, timeout: Duration) -> Self {
        HandshakeDeadline { inner, missing: FIRST_BYTES, deadline: Some(Box::pin(tokio::time::sleep(timeout))) }
    }
}

impl AsyncRead for HandshakeDeadline {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if let Some(d) = self.deadline.as_mut() {
            if d.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "no handshake in time")));
            }
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            self.missing = self.missing.saturating_sub(buf.filled().len() - before);
            if self.missing == 0 {
                self.deadline = None;
            }
        }
        r
    }
}

impl AsyncWrite for HandshakeDeadline {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl Connected for HandshakeDeadline {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> TcpConnectInfo {
        self.inner.connect_info()
    }
}
