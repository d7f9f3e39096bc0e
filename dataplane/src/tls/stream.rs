//! rustls over any `futures_io` stream: the handshake driver and [`TlsStream`], which is itself
//! `AsyncRead + AsyncWrite`, so the proxy stage copies through it like through a plain socket.
//!
//! Generic over the transport (`rt::TcpStream` in the pipeline, an in-memory pipe in tests);
//! no runtime, no socket, no clock here. Bytes the caller already read (the ClientHello peeked
//! by [`peek_client_hello`]) are handed to [`accept`] so nothing is read twice or lost.

use std::io::{self, Read, Write};
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_io::{AsyncRead, AsyncWrite};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, ConnectionCommon, ServerConfig, ServerConnection};

use super::clienthello::{self, ClientHelloInfo, MAX_PEEK_LEN, ParseError};

/// Why a handshake did not complete.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The transport failed or closed mid-handshake.
    #[error("transport: {0}")]
    Io(#[from] io::Error),
    /// TLS refused (by us: the alert was sent; or by the peer: its alert is in the error).
    #[error("tls: {0}")]
    Tls(#[from] rustls::Error),
}

impl HandshakeError {
    /// The rustls error, when TLS (not the transport) ended the handshake.
    pub fn tls(&self) -> Option<&rustls::Error> {
        match self {
            HandshakeError::Tls(err) => Some(err),
            HandshakeError::Io(_) => None,
        }
    }
}

/// Why the ClientHello peek ended without a hello.
#[derive(Debug, thiserror::Error)]
pub enum PeekError {
    #[error("transport: {0}")]
    Io(#[from] io::Error),
    /// The client closed before sending a whole ClientHello.
    #[error("client closed after {0} bytes, before a complete ClientHello")]
    Eof(usize),
    #[error("{0}")]
    Invalid(clienthello::Invalid),
}

/// Reads from `io` into `buf` until `buf` starts with a complete ClientHello, and returns what
/// it offers. `buf` keeps every byte read (the hello and anything after it): forward it
/// untouched (passthrough) or hand it to [`accept`] (termination). Reads at most
/// [`MAX_PEEK_LEN`] bytes before giving an answer.
pub async fn peek_client_hello<IO: AsyncRead + Unpin>(
    io: &mut IO,
    buf: &mut Vec<u8>,
) -> Result<ClientHelloInfo<'static>, PeekError> {
    loop {
        let need = match clienthello::parse(buf) {
            Ok(info) => return Ok(info.into_owned()),
            Err(ParseError::Invalid(invalid)) => return Err(PeekError::Invalid(invalid)),
            Err(ParseError::Incomplete { need }) => need.unwrap_or(1).max(1),
        };
        // Read what is known to be needed, at least a typical hello's worth, within the cap.
        let want = need
            .max(1024)
            .min(MAX_PEEK_LEN.saturating_sub(buf.len()).max(need));
        let start = buf.len();
        buf.resize(start + want, 0);
        let read =
            std::future::poll_fn(|cx| Pin::new(&mut *io).poll_read(cx, &mut buf[start..])).await;
        match read {
            Ok(0) => {
                buf.truncate(start);
                return Err(PeekError::Eof(start));
            }
            Ok(n) => buf.truncate(start + n),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => buf.truncate(start),
            Err(err) => {
                buf.truncate(start);
                return Err(err.into());
            }
        }
    }
}

/// A TLS session over `IO`; `AsyncRead`/`AsyncWrite` of the plaintext.
#[derive(Debug)]
pub struct TlsStream<IO, C> {
    io: IO,
    conn: C,
    /// The transport reported end of stream.
    eof: bool,
    /// A TLS 1.3 server's session tickets, queued at the end of the handshake, are held back
    /// until the first write, flush or close, so they share a send (and a TCP segment) with
    /// the first response instead of costing one of their own. Safe because no TLS 1.3 client
    /// waits for tickets before sending; a read that has to wait does not send them.
    hold_tickets: bool,
}

impl<IO, C> TlsStream<IO, C> {
    pub fn get_ref(&self) -> (&IO, &C) {
        (&self.io, &self.conn)
    }

    pub fn get_mut(&mut self) -> (&mut IO, &mut C) {
        (&mut self.io, &mut self.conn)
    }

    pub fn into_inner(self) -> (IO, C) {
        (self.io, self.conn)
    }
}

/// Server side of a downstream connection.
pub type ServerTlsStream<IO> = TlsStream<IO, ServerConnection>;
/// Client side of an upstream connection.
pub type ClientTlsStream<IO> = TlsStream<IO, ClientConnection>;

/// Runs the server handshake over `io`, starting with `prefix` (bytes already read from `io`,
/// e.g. by [`peek_client_hello`]). On a TLS error the alert is sent before returning.
pub async fn accept<IO: AsyncRead + AsyncWrite + Unpin>(
    io: IO,
    config: Arc<ServerConfig>,
    prefix: &[u8],
) -> Result<ServerTlsStream<IO>, HandshakeError> {
    accept_versioned(io, config, prefix)
        .await
        .map_err(|(error, _)| error)
}

/// [`accept`], reporting on failure the TLS version negotiated before it (`None`: the
/// handshake failed before the server chose one), for the handshake metrics.
pub async fn accept_versioned<IO: AsyncRead + AsyncWrite + Unpin>(
    io: IO,
    config: Arc<ServerConfig>,
    prefix: &[u8],
) -> Result<ServerTlsStream<IO>, (HandshakeError, Option<rustls::ProtocolVersion>)> {
    let conn = ServerConnection::new(config).map_err(|e| (e.into(), None))?;
    let mut stream = TlsStream {
        io,
        conn,
        eof: false,
        hold_tickets: false,
    };
    let mut rest = prefix;
    while !rest.is_empty() {
        let n = stream
            .conn
            .read_tls(&mut rest)
            .map_err(|e| (e.into(), None))?;
        if let Err(err) = stream.conn.process_new_packets() {
            stream.send_alert().await;
            return Err((err.into(), stream.conn.protocol_version()));
        }
        if n == 0 {
            break;
        }
    }
    stream.hold_tickets = true;
    if let Err(err) = stream.handshake().await {
        return Err((err, stream.conn.protocol_version()));
    }
    Ok(stream)
}

/// Runs the client handshake to an upstream over `io`, sending `server_name` as SNI (an IP
/// address sends none).
pub async fn connect<IO: AsyncRead + AsyncWrite + Unpin>(
    io: IO,
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
) -> Result<ClientTlsStream<IO>, HandshakeError> {
    let conn = ClientConnection::new(config, server_name)?;
    let mut stream = TlsStream {
        io,
        conn,
        eof: false,
        hold_tickets: false,
    };
    stream.handshake().await?;
    Ok(stream)
}

/// `Read` over an `AsyncRead` for rustls: `Pending` becomes `WouldBlock`.
struct SyncReader<'a, 'b, IO> {
    io: &'a mut IO,
    cx: &'a mut Context<'b>,
}

impl<IO: AsyncRead + Unpin> Read for SyncReader<'_, '_, IO> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match Pin::new(&mut *self.io).poll_read(self.cx, buf) {
            Poll::Ready(result) => result,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

/// `Write` over an `AsyncWrite` for rustls: `Pending` becomes `WouldBlock`.
struct SyncWriter<'a, 'b, IO> {
    io: &'a mut IO,
    cx: &'a mut Context<'b>,
}

impl<IO: AsyncWrite + Unpin> Write for SyncWriter<'_, '_, IO> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match Pin::new(&mut *self.io).poll_write(self.cx, buf) {
            Poll::Ready(result) => result,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match Pin::new(&mut *self.io).poll_write_vectored(self.cx, bufs) {
            Poll::Ready(result) => result,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match Pin::new(&mut *self.io).poll_flush(self.cx) {
            Poll::Ready(result) => result,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

fn pending_on_would_block<T>(result: io::Result<T>) -> Poll<io::Result<T>> {
    match result {
        Err(err) if err.kind() == io::ErrorKind::WouldBlock => Poll::Pending,
        other => Poll::Ready(other),
    }
}

impl<IO, C, D> TlsStream<IO, C>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    C: DerefMut + Deref<Target = ConnectionCommon<D>>,
    D: rustls::SideData,
{
    /// Reads TLS records from the transport and processes them. `Ok(0)`: end of stream.
    fn poll_read_tls(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let mut reader = SyncReader {
            io: &mut self.io,
            cx,
        };
        let n = match pending_on_would_block(self.conn.read_tls(&mut reader)) {
            Poll::Ready(Ok(n)) => n,
            other => return other,
        };
        if n == 0 {
            self.eof = true;
        }
        if let Err(err) = self.conn.process_new_packets() {
            // Best effort: tell the peer why (the alert rustls queued), then fail.
            let mut writer = SyncWriter {
                io: &mut self.io,
                cx,
            };
            let _ = self.conn.write_tls(&mut writer);
            let _ = Pin::new(&mut self.io).poll_flush(cx);
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, err)));
        }
        Poll::Ready(Ok(n))
    }

    /// Writes queued TLS records to the transport until none are left or it would block.
    fn poll_write_tls(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.conn.wants_write() {
            let mut writer = SyncWriter {
                io: &mut self.io,
                cx,
            };
            match pending_on_would_block(self.conn.write_tls(&mut writer)) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }

    async fn handshake(&mut self) -> Result<(), HandshakeError> {
        std::future::poll_fn(|cx| self.poll_handshake(cx)).await
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandshakeError>> {
        loop {
            let mut progressed = false;
            // Done, and what is queued comes after the handshake (a TLS 1.3 server's tickets):
            // it goes out with the first write (see `hold_tickets`). Everything of the
            // handshake itself (a TLS 1.2 server's Finished, a client's Finished) is flushed.
            if self.hold_tickets && !self.conn.is_handshaking() {
                if self.conn.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3) {
                    return Poll::Ready(Ok(()));
                }
                self.hold_tickets = false;
            }
            match self.poll_write_tls(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err.into())),
                Poll::Pending => return Poll::Pending,
            }
            // The transport may buffer writes (rt's AsyncWrite does): our flight must be on the
            // wire before we wait for the peer's answer.
            match Pin::new(&mut self.io).poll_flush(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err.into())),
                Poll::Pending => return Poll::Pending,
            }
            if !self.conn.is_handshaking() {
                return match Pin::new(&mut self.io).poll_flush(cx) {
                    Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
                    Poll::Ready(Err(err)) => Poll::Ready(Err(err.into())),
                    Poll::Pending => Poll::Pending,
                };
            }
            if self.conn.wants_read() {
                match self.poll_read_tls(cx) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "peer closed during the TLS handshake",
                        )
                        .into()));
                    }
                    Poll::Ready(Ok(_)) => progressed = true,
                    Poll::Ready(Err(err)) => return Poll::Ready(Err(unwrap_tls(err))),
                    Poll::Pending => {
                        // Queued records (e.g. our alert) still need to go out.
                        if self.conn.wants_write() {
                            continue;
                        }
                        return Poll::Pending;
                    }
                }
            }
            if !progressed && !self.conn.wants_write() {
                return Poll::Pending;
            }
        }
    }

    /// Sends whatever rustls has queued (an alert after a failed `process_new_packets`).
    async fn send_alert(&mut self) {
        let _ = std::future::poll_fn(|cx| self.poll_write_tls(cx)).await;
        let _ = std::future::poll_fn(|cx| Pin::new(&mut self.io).poll_flush(cx)).await;
    }
}

/// A rustls error wrapped in `io::Error` by the read path, back as a rustls error.
fn unwrap_tls(err: io::Error) -> HandshakeError {
    let tls = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .cloned();
    match tls {
        Some(tls) => HandshakeError::Tls(tls),
        None => HandshakeError::Io(err),
    }
}

impl<IO, C, D> AsyncRead for TlsStream<IO, C>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    C: DerefMut + Deref<Target = ConnectionCommon<D>> + Unpin,
    D: rustls::SideData,
{
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            match this.conn.reader().read(buf) {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                // Transport ended without close_notify: report it (truncation is visible).
                Err(err) => return Poll::Ready(Err(err)),
            }
            if this.eof {
                return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
            }
            // Key updates and tickets may need answers while reading; put them on the wire
            // before waiting for more input (held tickets wait for the first write).
            if !this.hold_tickets {
                match this.poll_write_tls(cx) {
                    Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                    Poll::Ready(Ok(())) => {
                        if let Poll::Ready(Err(err)) = Pin::new(&mut this.io).poll_flush(cx) {
                            return Poll::Ready(Err(err));
                        }
                    }
                    Poll::Pending => {}
                }
            }
            match this.poll_read_tls(cx) {
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<IO, C, D> AsyncWrite for TlsStream<IO, C>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    C: DerefMut + Deref<Target = ConnectionCommon<D>> + Unpin,
    D: rustls::SideData,
{
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.hold_tickets = false;
        // Backpressure: do not take more plaintext while earlier records are unsent.
        match this.poll_write_tls(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
            Poll::Pending => return Poll::Pending,
        }
        let n = this.conn.writer().write(buf)?;
        // Start sending now; completion is awaited by the next write or flush.
        if let Poll::Ready(Err(err)) = this.poll_write_tls(cx) {
            return Poll::Ready(Err(err));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.hold_tickets = false;
        match this.poll_write_tls(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.io).poll_flush(cx),
            other => other,
        }
    }

    /// Sends close_notify, flushes, and closes the transport's write side.
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.hold_tickets = false;
        this.conn.send_close_notify();
        match this.poll_write_tls(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.io).poll_close(cx),
            other => other,
        }
    }
}
