//! Moving bytes between a downstream and an upstream connection, both ways, with half-close,
//! one shared idle clock, and byte counting.
//!
//! Two engines, one contract:
//! - plain <-> plain: zero-copy in user space. Each direction receives into a buffer the kernel
//!   picked from the shard's provided-buffer ring and sends that same buffer on.
//! - anything with TLS on a side: a poll-driven copy over `futures_io` streams (rustls needs the
//!   plaintext in its own buffers anyway), one 16 KiB buffer per direction.
//!
//! Either way a direction's EOF becomes a half-close on the other side (TLS: close_notify +
//! FIN) while the other direction keeps flowing, and the connection ends when both directions
//! have ended, at the first error, or when neither side moved data for `idle_timeout`.

use std::cell::Cell;
use std::future::{Future, poll_fn};
use std::io;
use std::pin::{Pin, pin};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use futures_io::{AsyncRead, AsyncWrite};

use crate::error::{Blame, ProxyError};
use crate::metrics::Counter;
use crate::proxy::http_io::{HttpRead, HttpWrite};
use crate::rt;
use crate::tls::stream::{ClientTlsStream, ServerTlsStream};

/// The downstream side of a connection.
#[derive(Debug)]
pub enum Down {
    Plain(rt::TcpStream),
    Tls(Box<ServerTlsStream<rt::TcpStream>>),
}

/// The upstream side of a connection.
#[derive(Debug)]
pub enum Up {
    Plain(rt::TcpStream),
    Tls(Box<ClientTlsStream<rt::TcpStream>>),
}

/// Byte counters a relay bumps: shared (per listener / per cluster, for metrics) and this
/// connection's own totals (for its access-log record).
#[derive(Debug)]
pub struct Meters<'a> {
    /// Downstream -> upstream: listener bytes in, cluster bytes sent.
    pub up: [&'a Counter; 2],
    /// Upstream -> downstream: cluster bytes received, listener bytes out.
    pub down: [&'a Counter; 2],
    /// From the client.
    pub received: &'a Cell<u64>,
    /// To the client.
    pub sent: &'a Cell<u64>,
}

/// The idle clock both directions of a connection share.
#[derive(Debug)]
pub struct Idle {
    timeout: Duration,
    last: Cell<Instant>,
}

impl Idle {
    pub fn new(timeout: Duration) -> Self {
        Idle {
            timeout,
            last: Cell::new(Instant::now()),
        }
    }
    fn touch(&self) {
        self.last.set(Instant::now());
    }
    /// Time left before the connection counts as idle; None once it is.
    fn remaining(&self) -> Option<Duration> {
        self.timeout
            .checked_sub(self.last.get().elapsed())
            .filter(|d| !d.is_zero())
    }
}

/// Relay until both directions end, an error, or the idle timeout.
pub async fn relay(down: Down, up: Up, m: &Meters<'_>, idle: &Idle) -> Result<(), ProxyError> {
    match (down, up) {
        (Down::Plain(d), Up::Plain(u)) => {
            let (down_rd, down_wr) = d.into_split();
            let (up_rd, up_wr) = u.into_split();
            let to_upstream = pump(down_rd, up_wr, Blame::Downstream, m.up, m.received, idle);
            let to_downstream = pump(up_rd, down_wr, Blame::Upstream, m.down, m.sent, idle);
            let both = pin!(both_or_first_error(to_upstream, to_downstream));
            with_idle_clock(both, idle).await
        }
        (Down::Plain(mut d), Up::Tls(mut u)) => copy_both(&mut d, &mut *u, m, idle).await,
        (Down::Tls(mut d), Up::Plain(mut u)) => copy_both(&mut *d, &mut u, m, idle).await,
        (Down::Tls(mut d), Up::Tls(mut u)) => copy_both(&mut *d, &mut *u, m, idle).await,
    }
}

/// Run `f` (the directions of one connection) until it ends or neither direction moved data for
/// the idle timeout. One timer per connection, re-armed only when it fires: nothing per chunk.
/// Takes the future pinned by the caller: an `async fn` that pinned its argument itself would
/// store it twice (argument and local), and this state lives as long as the connection.
pub(crate) async fn with_idle_clock<F>(mut f: Pin<&mut F>, idle: &Idle) -> Result<(), ProxyError>
where
    F: Future<Output = Result<(), ProxyError>>,
{
    loop {
        let Some(left) = idle.remaining() else {
            return Err(ProxyError::idle());
        };
        match rt::timeout(left, f.as_mut()).await {
            Ok(r) => return r,
            Err(rt::Elapsed) => continue, // re-check the shared clock
        }
    }
}

/// Copy `from` -> `to` until EOF (then half-close `to`) or an error (zero-copy path). The idle
/// timeout is applied around both directions by [`with_idle_clock`], so a send stuck on a peer
/// that stopped reading ends the connection too.
///
/// Generic over the byte streams so an HTTP/1.1 connection that switched protocols (WebSocket,
/// `proxy::http`'s upgrade) relays through the same loop; the TCP path instantiates it with the
/// runtime's socket halves, as before.
pub(crate) async fn pump<R: HttpRead, W: HttpWrite>(
    mut from: R,
    mut to: W,
    reader_blame: Blame,
    [read_counter, write_counter]: [&Counter; 2],
    moved: &Cell<u64>,
    idle: &Idle,
) -> Result<(), ProxyError> {
    let writer_blame = other(reader_blame);
    loop {
        let buf = match from.recv_buf().await {
            Err(e) => return Err(ProxyError::io(reader_blame, e)),
            Ok(None) => {
                // EOF: pass the half-close on; a peer that already went away is not an error.
                let _ = to.shutdown_write().await;
                return Ok(());
            }
            Ok(Some(buf)) => buf,
        };
        let n = buf.len() as u64;
        read_counter.add(n);
        idle.touch();
        let (res, buf) = to.write_all_owned(buf).await;
        drop(buf); // back to the provided-buffer ring
        res.map_err(|e| ProxyError::io(writer_blame, e))?;
        write_counter.add(n);
        moved.set(moved.get() + n);
        idle.touch();
    }
}

fn other(b: Blame) -> Blame {
    match b {
        Blame::Downstream => Blame::Upstream,
        _ => Blame::Downstream,
    }
}

/// Run both directions; finish when both finished, or at the first error (dropping the other).
pub async fn both_or_first_error<A, B>(a: A, b: B) -> Result<(), ProxyError>
where
    A: Future<Output = Result<(), ProxyError>>,
    B: Future<Output = Result<(), ProxyError>>,
{
    let mut a = pin!(a);
    let mut b = pin!(b);
    let (mut a_done, mut b_done) = (false, false);
    poll_fn(|cx| {
        if !a_done && let Poll::Ready(r) = a.as_mut().poll(cx) {
            r?;
            a_done = true;
        }
        if !b_done && let Poll::Ready(r) = b.as_mut().poll(cx) {
            r?;
            b_done = true;
        }
        if a_done && b_done {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await
}

const COPY_BUF: usize = 16 * 1024;

/// One direction of [`copy_both`].
struct Half {
    buf: Box<[u8]>,
    pos: usize,
    cap: usize,
    eof: bool,
    closed: bool,
    unflushed: bool,
    reader: Blame,
}

impl Half {
    fn new(reader: Blame) -> Half {
        Half {
            buf: vec![0; COPY_BUF].into_boxed_slice(),
            pos: 0,
            cap: 0,
            eof: false,
            closed: false,
            unflushed: false,
            reader,
        }
    }

    /// Drive this direction as far as it goes without blocking. Ready(Ok) once the reader hit
    /// EOF and the writer was flushed and half-closed.
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
        [read_counter, write_counter]: [&Counter; 2],
        moved: &Cell<u64>,
        idle: &Idle,
    ) -> Poll<Result<(), ProxyError>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        let werr = |e: io::Error| ProxyError::io(other(self.reader), e);
        loop {
            if self.closed {
                return Poll::Ready(Ok(()));
            }
            if self.pos < self.cap {
                match Pin::new(&mut *w).poll_write(cx, &self.buf[self.pos..self.cap]) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(werr(io::ErrorKind::WriteZero.into())));
                    }
                    Poll::Ready(Ok(n)) => {
                        self.pos += n;
                        self.unflushed = true;
                        write_counter.add(n as u64);
                        moved.set(moved.get() + n as u64);
                        idle.touch();
                        continue;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(werr(e))),
                    Poll::Pending => return Poll::Pending,
                }
            }
            if self.eof {
                ready!(Pin::new(&mut *w).poll_flush(cx)).map_err(werr)?;
                // A peer that already went away is not an error at this point.
                let _ = ready!(Pin::new(&mut *w).poll_close(cx));
                self.closed = true;
                return Poll::Ready(Ok(()));
            }
            match Pin::new(&mut *r).poll_read(cx, &mut self.buf) {
                Poll::Ready(Ok(0)) => self.eof = true,
                Poll::Ready(Ok(n)) => {
                    self.pos = 0;
                    self.cap = n;
                    read_counter.add(n as u64);
                    idle.touch();
                }
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(ProxyError::io(self.reader, e))),
                Poll::Pending => {
                    // Nothing more to read now: push out what the writer buffered.
                    if self.unflushed {
                        match Pin::new(&mut *w).poll_flush(cx) {
                            Poll::Ready(Ok(())) => self.unflushed = false,
                            Poll::Ready(Err(e)) => return Poll::Ready(Err(werr(e))),
                            Poll::Pending => {}
                        }
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

/// Both directions between two `futures_io` streams, in this task.
async fn copy_both<A, B>(
    a: &mut A,
    b: &mut B,
    m: &Meters<'_>,
    idle: &Idle,
) -> Result<(), ProxyError>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut to_up = Half::new(Blame::Downstream);
    let mut to_down = Half::new(Blame::Upstream);
    let fut = pin!(poll_fn(|cx| {
        let up = to_up.poll(cx, a, b, m.up, m.received, idle)?;
        let down = to_down.poll(cx, b, a, m.down, m.sent, idle)?;
        if up.is_ready() && down.is_ready() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }));
    with_idle_clock(fut, idle).await
}
