//! Moving bytes between a downstream and an upstream connection, both ways, with half-close,
//! one shared idle clock, and byte counting.
//!
//! Two engines, one contract:
//! - plain <-> plain: zero-copy in user space. Each direction receives into a buffer the kernel
//!   picked from the shard's provided-buffer ring and sends that same buffer on. Both directions
//!   and the idle timer are one hand-written state machine ([`PlainRelay`]): an idle connection
//!   holds two streams, two small direction states and one timer entry, and no buffer.
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
///
/// Not an `async fn`: the future lives as long as the connection, and an `async fn` would keep
/// its `Down`/`Up` arguments in its state next to the streams moved out of them. The plain path
/// is one hand-written state machine ([`PlainRelay`]); the TLS paths are boxed (their rustls
/// state and copy buffers are large anyway).
pub fn relay<'a>(down: Down, up: Up, m: &'a Meters<'a>, idle: &'a Idle) -> Relay<'a> {
    match (down, up) {
        (Down::Plain(d), Up::Plain(u)) => Relay::Plain(PlainRelay::new(d, u, m, idle)),
        (Down::Plain(mut d), Up::Tls(mut u)) => Relay::Copy(Box::pin(async move {
            copy_both(&mut d, &mut *u, m, idle).await
        })),
        (Down::Tls(mut d), Up::Plain(mut u)) => Relay::Copy(Box::pin(async move {
            copy_both(&mut *d, &mut u, m, idle).await
        })),
        (Down::Tls(mut d), Up::Tls(mut u)) => Relay::Copy(Box::pin(async move {
            copy_both(&mut *d, &mut *u, m, idle).await
        })),
    }
}

/// The future returned by [`relay`].
#[allow(clippy::large_enum_variant)] // the plain relay lives inline in the connection's task: boxing it would add an allocation, not save memory
pub enum Relay<'a> {
    Plain(PlainRelay<'a>),
    Copy(Pin<Box<dyn Future<Output = Result<(), ProxyError>> + 'a>>),
}

impl std::fmt::Debug for Relay<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Relay::Plain(_) => "Relay::Plain",
            Relay::Copy(_) => "Relay::Copy",
        })
    }
}

impl Future for Relay<'_> {
    type Output = Result<(), ProxyError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Relay::Plain(p) => p.poll_relay(cx),
            Relay::Copy(f) => f.as_mut().poll(cx),
        }
    }
}

/// Run `f` (the directions of one connection) until it ends or neither direction moved data for
/// the idle timeout. One timer per connection, re-armed only when it fires: nothing per chunk.
/// Takes the future pinned by the caller: an `async fn` that pinned its argument itself would
/// store it twice (argument and local), and this state lives as long as the connection.
async fn with_idle_clock<F>(mut f: Pin<&mut F>, idle: &Idle) -> Result<(), ProxyError>
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

/// Plain <-> plain, zero-copy in user space: each direction receives into a buffer the kernel
/// picked from the shard's provided-buffer ring and sends that same buffer on. Both directions
/// and the idle timer are one poll-driven object, so an idle connection costs the two streams,
/// two small direction states and one timer entry; no buffer is held while nothing is in
/// flight (the receives wait in the kernel without one).
pub struct PlainRelay<'a> {
    down: rt::TcpStream,
    up: rt::TcpStream,
    /// Downstream -> upstream.
    to_up: Dir,
    /// Upstream -> downstream.
    to_down: Dir,
    m: &'a Meters<'a>,
    idle: &'a Idle,
    /// The connection's one idle timer (re-armed only when it fires).
    timer: rt::Sleep,
}

/// Where one direction of a [`PlainRelay`] is.
enum Dir {
    /// A receive is armed (or about to be).
    Recv,
    /// Sending a received buffer on (`Some` until the send is started); `u64` = its length.
    Send(Option<rt::RecvBuf>, u64),
    /// The reader hit EOF: half-closing the writer.
    Shutdown,
    Done,
}

impl<'a> PlainRelay<'a> {
    fn new(down: rt::TcpStream, up: rt::TcpStream, m: &'a Meters<'a>, idle: &'a Idle) -> Self {
        PlainRelay {
            down,
            up,
            to_up: Dir::Recv,
            to_down: Dir::Recv,
            m,
            idle,
            timer: rt::sleep(idle.timeout),
        }
    }

    fn poll_relay(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        let m = self.m;
        let up = poll_dir(
            &mut self.to_up,
            &mut self.down,
            &mut self.up,
            cx,
            Blame::Downstream,
            m.up,
            m.received,
            self.idle,
        )?;
        let down = poll_dir(
            &mut self.to_down,
            &mut self.up,
            &mut self.down,
            cx,
            Blame::Upstream,
            m.down,
            m.sent,
            self.idle,
        )?;
        if up.is_ready() && down.is_ready() {
            return Poll::Ready(Ok(()));
        }
        // Neither direction can move: the idle clock decides.
        while Pin::new(&mut self.timer).poll(cx).is_ready() {
            let Some(left) = self.idle.remaining() else {
                return Poll::Ready(Err(ProxyError::idle()));
            };
            self.timer = rt::sleep(left);
        }
        Poll::Pending
    }
}

/// Drive one direction of a [`PlainRelay`] as far as it goes: Ready(Ok) once the reader hit EOF
/// and the writer was half-closed. A send stuck on a peer that stopped reading is covered by the
/// relay's idle timer.
#[allow(clippy::too_many_arguments)] // one direction's streams, blame and meters
fn poll_dir(
    dir: &mut Dir,
    from: &mut rt::TcpStream,
    to: &mut rt::TcpStream,
    cx: &mut Context<'_>,
    reader_blame: Blame,
    [read_counter, write_counter]: [&Counter; 2],
    moved: &Cell<u64>,
    idle: &Idle,
) -> Poll<Result<(), ProxyError>> {
    loop {
        match dir {
            Dir::Recv => match ready!(from.poll_recv_buf(cx)) {
                Err(e) => return Poll::Ready(Err(ProxyError::io(reader_blame, e))),
                Ok(None) => *dir = Dir::Shutdown,
                Ok(Some(buf)) => {
                    let n = buf.len() as u64;
                    read_counter.add(n);
                    idle.touch();
                    *dir = Dir::Send(Some(buf), n);
                }
            },
            Dir::Send(buf, n) => {
                let n = *n;
                ready!(to.poll_send_owned(cx, buf))
                    .map_err(|e| ProxyError::io(other(reader_blame), e))?;
                write_counter.add(n);
                moved.set(moved.get() + n);
                idle.touch();
                *dir = Dir::Recv;
            }
            Dir::Shutdown => {
                // Pass the half-close on; a peer that already went away is not an error.
                let _ = ready!(to.poll_shutdown(cx));
                *dir = Dir::Done;
            }
            Dir::Done => return Poll::Ready(Ok(())),
        }
    }
}

fn other(b: Blame) -> Blame {
    match b {
        Blame::Downstream => Blame::Upstream,
        _ => Blame::Downstream,
    }
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
