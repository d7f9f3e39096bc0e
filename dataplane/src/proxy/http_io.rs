//! The byte streams the HTTP proxy reads and writes, behind two small traits so one proxy
//! pipeline serves plain and TLS connections (downstream and upstream).
//!
//! Where it sits: `proxy::http` is generic over [`HttpRead`] / [`HttpWrite`]; the plain path
//! instantiates it with the runtime's socket halves (`rt::ReadHalf` / `rt::WriteHalf`: the
//! provided-buffer receives and owned sends go straight through, no boxing and no extra copy,
//! the same code as before the traits existed), the `https` path with [`TlsRead`] /
//! [`TlsWrite`] over one rustls session.
//!
//! TLS halves share the session through an `Rc<RefCell<_>>`; a borrow lasts one synchronous
//! poll, never an `.await`. Both halves are polled by the connection's one task (the proxy
//! joins the two directions of an exchange with `poll_fn`), so the session sees one waker.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::ops::Deref;
use std::pin::Pin;
use std::rc::Rc;

use futures_io::{AsyncRead, AsyncWrite};

use crate::rt::{self, IoBuf};
use crate::tls::stream::TlsStream;

/// Receiving side of a connection.
pub(crate) trait HttpRead {
    /// A received chunk: handed on as is when it is all body.
    type Buf: Deref<Target = [u8]> + IoBuf;
    /// The next bytes; `Ok(None)` at end of stream.
    async fn recv_buf(&mut self) -> io::Result<Option<Self::Buf>>;
    /// Trailer fields that ended the body (an HTTP/2 client's), once it ended.
    fn take_trailers(&mut self) -> Option<http::HeaderMap> {
        None
    }
}

/// Sending side of a connection. Every call returns once the bytes are on their way (nothing
/// stays buffered in user space that a later flush would have to push).
pub(crate) trait HttpWrite {
    async fn write_all_owned<B: IoBuf>(&mut self, buf: B) -> (io::Result<()>, B);
    async fn write_all(&mut self, buf: &[u8]) -> io::Result<()>;
    /// End the sending direction (TLS: close_notify first).
    async fn shutdown_write(&mut self) -> io::Result<()>;
}

impl<T: HttpRead> HttpRead for &mut T {
    type Buf = T::Buf;
    #[inline]
    async fn recv_buf(&mut self) -> io::Result<Option<T::Buf>> {
        T::recv_buf(self).await
    }
}

impl<T: HttpWrite> HttpWrite for &mut T {
    #[inline]
    async fn write_all_owned<B: IoBuf>(&mut self, buf: B) -> (io::Result<()>, B) {
        T::write_all_owned(self, buf).await
    }
    #[inline]
    async fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        T::write_all(self, buf).await
    }
    #[inline]
    async fn shutdown_write(&mut self) -> io::Result<()> {
        T::shutdown_write(self).await
    }
}

impl HttpRead for rt::ReadHalf {
    type Buf = rt::RecvBuf;
    #[inline]
    async fn recv_buf(&mut self) -> io::Result<Option<rt::RecvBuf>> {
        rt::ReadHalf::recv_buf(self).await
    }
}

impl HttpWrite for rt::WriteHalf {
    #[inline]
    async fn write_all_owned<B: IoBuf>(&mut self, buf: B) -> (io::Result<()>, B) {
        rt::WriteHalf::write_all_owned(self, buf).await
    }
    #[inline]
    async fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        rt::WriteHalf::write_all(self, buf).await
    }
    #[inline]
    async fn shutdown_write(&mut self) -> io::Result<()> {
        rt::WriteHalf::shutdown_write(self).await
    }
}

/// Largest plaintext chunk one TLS receive returns (one TLS record's worth).
const TLS_READ_CHUNK: usize = 16 * 1024;

thread_local! {
    /// Per shard: where TLS plaintext is read before being copied out at its exact size, so
    /// a connection holds no receive buffer between reads.
    static TLS_SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; TLS_READ_CHUNK].into_boxed_slice());
}

/// Receiving half of a TLS session (see [`tls_split`]).
#[derive(Debug)]
pub(crate) struct TlsRead<S> {
    inner: Rc<RefCell<S>>,
}

/// Sending half of a TLS session (see [`tls_split`]).
#[derive(Debug)]
pub(crate) struct TlsWrite<S> {
    inner: Rc<RefCell<S>>,
}

/// The two halves of one TLS session.
pub(crate) type TlsHalves<S> = (TlsRead<S>, TlsWrite<S>);

/// Split a TLS stream (server or client side) into halves for full-duplex use in one task.
pub(crate) fn tls_split<IO, C>(stream: TlsStream<IO, C>) -> TlsHalves<TlsStream<IO, C>> {
    let inner = Rc::new(RefCell::new(stream));
    (
        TlsRead {
            inner: inner.clone(),
        },
        TlsWrite { inner },
    )
}

impl<S> TlsRead<S> {
    /// The session, for what the handshake learnt.
    #[allow(dead_code)] // used by callers that inspect the session after the split
    pub(crate) fn with<T>(&self, f: impl FnOnce(&S) -> T) -> T {
        f(&self.inner.borrow())
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> HttpRead for TlsRead<S> {
    type Buf = Vec<u8>;
    async fn recv_buf(&mut self) -> io::Result<Option<Vec<u8>>> {
        let inner = &self.inner;
        poll_fn(|cx| {
            TLS_SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                let mut stream = inner.borrow_mut();
                match Pin::new(&mut *stream).poll_read(cx, &mut scratch[..]) {
                    std::task::Poll::Ready(Ok(0)) => std::task::Poll::Ready(Ok(None)),
                    std::task::Poll::Ready(Ok(n)) => {
                        std::task::Poll::Ready(Ok(Some(scratch[..n].to_vec())))
                    }
                    std::task::Poll::Ready(Err(e)) => std::task::Poll::Ready(Err(e)),
                    std::task::Poll::Pending => std::task::Poll::Pending,
                }
            })
        })
        .await
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsWrite<S> {
    async fn write_slice(&mut self, buf: &[u8]) -> io::Result<()> {
        let mut off = 0;
        while off < buf.len() {
            let n =
                poll_fn(|cx| Pin::new(&mut *self.inner.borrow_mut()).poll_write(cx, &buf[off..]))
                    .await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            off += n;
        }
        poll_fn(|cx| Pin::new(&mut *self.inner.borrow_mut()).poll_flush(cx)).await
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> HttpWrite for TlsWrite<S> {
    async fn write_all_owned<B: IoBuf>(&mut self, buf: B) -> (io::Result<()>, B) {
        let res = self.write_slice(buf.as_slice()).await;
        (res, buf)
    }
    async fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.write_slice(buf).await
    }
    async fn shutdown_write(&mut self) -> io::Result<()> {
        poll_fn(|cx| Pin::new(&mut *self.inner.borrow_mut()).poll_close(cx)).await
    }
}
