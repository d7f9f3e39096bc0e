//! Moving bytes between a downstream and an upstream connection, both ways, with half-close,
//! one shared idle clock, and byte counting.
//!
//! Two engines, one contract:
//! - plain <-> plain: zero-copy in user space. Each direction receives into a buffer the kernel
//!   picked from the shard's provided-buffer ring and sends that same buffer on. Both directions
//!   and the idle timer are one hand-written state machine ([`PlainRelay`]): an idle connection
//!   holds two streams, two small direction states and one timer entry, and no buffer.
//! - anything with TLS on a side: a poll-driven copy over `futures_io` streams (rustls needs the
//!   plaintext in its own buffers anyway). Each read lands in the shard's one 16 KiB scratch
//!   buffer and goes straight to the writer; a direction keeps bytes of its own only while the
//!   writer pushes back, so an idle TLS connection holds no copy buffer.
//!
//! Either way a direction's EOF becomes a half-close on the other side (TLS: close_notify +
//! FIN) while the other direction keeps flowing, and the connection ends when both directions
//! have ended, at the first error, or when neither side moved data for `idle_timeout`.

use std::cell::{Cell, RefCell};
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
///
/// Plain <-> plain connections do not come here: the caller runs them as a [`PlainRelay`] in a
/// task of their own (see `proxy::tcp`). Boxed: the rustls state and copy buffers are large and
/// must not size the future of every connection.
pub fn relay<'a>(
    down: Down,
    up: Up,
    m: &'a Meters<'a>,
    idle: &'a Idle,
) -> Pin<Box<dyn Future<Output = Result<(), ProxyError>> + 'a>> {
    match (down, up) {
        (Down::Plain(mut d), Up::Plain(mut u)) => {
            Box::pin(async move { copy_both(&mut d, &mut u, m, idle).await })
        }
        (Down::Plain(mut d), Up::Tls(mut u)) => {
            Box::pin(async move { copy_both(&mut d, &mut *u, m, idle).await })
        }
        (Down::Tls(mut d), Up::Plain(mut u)) => {
            Box::pin(async move { copy_both(&mut *d, &mut u, m, idle).await })
        }
        (Down::Tls(mut d), Up::Tls(mut u)) => {
            Box::pin(async move { copy_both(&mut *d, &mut *u, m, idle).await })
        }
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

/// Plain <-> plain, zero-copy in user space: each direction receives into a buffer the kernel
/// picked from the shard's provided-buffer ring and sends that same buffer on. Both directions
/// and the idle timer are one poll-driven object, so an idle connection costs the two streams,
/// two small direction states and one timer entry; no buffer is held while nothing is in
/// flight (the receives wait in the kernel without one). It borrows nothing: the meters and the
/// idle clock come with each poll, so it can live in a small task of its own.
pub struct PlainRelay {
    down: rt::TcpStream,
    up: rt::TcpStream,
    /// Downstream -> upstream.
    to_up: Dir,
    /// Upstream -> downstream.
    to_down: Dir,
    /// The connection's one idle timer (re-armed only when it fires).
    timer: rt::Sleep,
}

impl std::fmt::Debug for PlainRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlainRelay")
            .field("down", &self.down)
            .field("up", &self.up)
            .finish_non_exhaustive()
    }
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

impl PlainRelay {
    pub fn new(down: rt::TcpStream, up: rt::TcpStream, idle: &Idle) -> Self {
        PlainRelay {
            down,
            up,
            to_up: Dir::Recv,
            to_down: Dir::Recv,
            timer: rt::sleep(idle.timeout),
        }
    }

    /// Move what can be moved; Ready once both directions ended, at the first error, or when
    /// `idle` says neither side moved data for its timeout. Pass the same meters and clock to
    /// every poll.
    pub fn poll_relay(
        &mut self,
        cx: &mut Context<'_>,
        m: &Meters<'_>,
        idle: &Idle,
    ) -> Poll<Result<(), ProxyError>> {
        let up = poll_dir(
            &mut self.to_up,
            &mut self.down,
            &mut self.up,
            cx,
            Blame::Downstream,
            m.up,
            m.received,
            idle,
        )?;
        let down = poll_dir(
            &mut self.to_down,
            &mut self.up,
            &mut self.down,
            cx,
            Blame::Upstream,
            m.down,
            m.sent,
            idle,
        )?;
        if up.is_ready() && down.is_ready() {
            return Poll::Ready(Ok(()));
        }
        // Neither direction can move: the idle clock decides.
        while Pin::new(&mut self.timer).poll(cx).is_ready() {
            let Some(left) = idle.remaining() else {
                return Poll::Ready(Err(ProxyError::idle()));
            };
            self.timer = rt::sleep(left);
        }
        Poll::Pending
    }
}

/// Copy `from` -> `to` until EOF (then half-close `to`) or an error, for an HTTP/1.1 connection
/// that switched protocols (WebSocket, `proxy::http`'s upgrade): generic over the HTTP streams,
/// plain or TLS. The idle timeout is applied around both directions by [`with_idle_clock`], so a
/// send stuck on a peer that stopped reading ends the connection too. (Plain TCP listeners use
/// [`PlainRelay`], which holds less per idle connection.)
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

thread_local! {
    /// The read buffer of every [`Half`] on this shard: a read is handed to the writer before
    /// the next read starts, so one buffer serves all connections (idle ones hold none).
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; COPY_BUF].into_boxed_slice());
}

/// What one read into [`SCRATCH`] gave.
enum Step {
    /// Read (and offered to the writer); read again.
    Moved,
    Eof,
    /// Nothing to read now.
    Pending,
}

/// One direction of [`copy_both`].
struct Half {
    /// Bytes read that the writer has not taken yet (empty, without capacity, unless the
    /// writer pushed back).
    held: Vec<u8>,
    pos: usize,
    eof: bool,
    closed: bool,
    unflushed: bool,
    reader: Blame,
}

impl Half {
    fn new(reader: Blame) -> Half {
        Half {
            held: Vec::new(),
            pos: 0,
            eof: false,
            closed: false,
            unflushed: false,
            reader,
        }
    }

    /// Offers `data` to `w`; returns how much it took before it pushed back (or all).
    fn write_some<W: AsyncWrite + Unpin + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        w: &mut W,
        data: &[u8],
        write_counter: &Counter,
        moved: &Cell<u64>,
        idle: &Idle,
    ) -> Result<usize, ProxyError> {
        let mut off = 0;
        while off < data.len() {
            match Pin::new(&mut *w).poll_write(cx, &data[off..]) {
                Poll::Ready(Ok(0)) => {
                    return Err(ProxyError::io(
                        other(self.reader),
                        io::ErrorKind::WriteZero.into(),
                    ));
                }
                Poll::Ready(Ok(n)) => {
                    off += n;
                    self.unflushed = true;
                    write_counter.add(n as u64);
                    moved.set(moved.get() + n as u64);
                    idle.touch();
                }
                Poll::Ready(Err(e)) => return Err(ProxyError::io(other(self.reader), e)),
                Poll::Pending => break,
            }
        }
        Ok(off)
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
        let writer = other(self.reader);
        let werr = |e: io::Error| ProxyError::io(writer, e);
        loop {
            if self.closed {
                return Poll::Ready(Ok(()));
            }
            if self.pos < self.held.len() {
                let held = std::mem::take(&mut self.held);
                let n = self.write_some(cx, w, &held[self.pos..], write_counter, moved, idle);
                self.held = held;
                self.pos += n?;
                if self.pos < self.held.len() {
                    return Poll::Pending;
                }
                self.held.clear();
                self.pos = 0;
            }
            if self.eof {
                ready!(Pin::new(&mut *w).poll_flush(cx)).map_err(werr)?;
                // A peer that already went away is not an error at this point.
                let _ = ready!(Pin::new(&mut *w).poll_close(cx));
                self.closed = true;
                return Poll::Ready(Ok(()));
            }
            let step = SCRATCH.with_borrow_mut(|buf| -> Result<Step, ProxyError> {
                match Pin::new(&mut *r).poll_read(cx, buf) {
                    Poll::Ready(Ok(0)) => Ok(Step::Eof),
                    Poll::Ready(Ok(n)) => {
                        read_counter.add(n as u64);
                        idle.touch();
                        let taken =
                            self.write_some(cx, w, &buf[..n], write_counter, moved, idle)?;
                        if taken < n {
                            self.held.extend_from_slice(&buf[taken..n]);
                        }
                        Ok(Step::Moved)
                    }
                    Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {
                        Ok(Step::Moved)
                    }
                    Poll::Ready(Err(e)) => Err(ProxyError::io(self.reader, e)),
                    Poll::Pending => Ok(Step::Pending),
                }
            })?;
            match step {
                Step::Moved => {}
                Step::Eof => self.eof = true,
                Step::Pending => {
                    // Nothing more to read now: push out what the writer buffered, and let go
                    // of the memory a push-back made us keep.
                    if self.unflushed {
                        match Pin::new(&mut *w).poll_flush(cx) {
                            Poll::Ready(Ok(())) => self.unflushed = false,
                            Poll::Ready(Err(e)) => return Poll::Ready(Err(werr(e))),
                            Poll::Pending => {}
                        }
                    }
                    if self.held.is_empty() && self.held.capacity() > 0 {
                        self.held = Vec::new();
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

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::task::Waker;

    use super::*;

    /// Gives its chunks one per read, `Pending` between them, then EOF.
    struct Source {
        chunks: VecDeque<Vec<u8>>,
        ready: bool,
    }

    impl AsyncRead for Source {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            self.ready = !self.ready;
            if self.ready {
                return Poll::Pending;
            }
            let Some(mut chunk) = self.chunks.pop_front() else {
                return Poll::Ready(Ok(0));
            };
            let n = chunk.len().min(buf.len());
            buf[..n].copy_from_slice(&chunk[..n]);
            if n < chunk.len() {
                self.chunks.push_front(chunk.split_off(n));
            }
            Poll::Ready(Ok(n))
        }
    }

    /// Takes at most `step` bytes per write and pushes back (`Pending`) every other call.
    #[derive(Default)]
    struct Sink {
        got: Vec<u8>,
        step: usize,
        block: bool,
        closed: bool,
    }

    impl AsyncWrite for Sink {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.block = !self.block;
            if !self.block {
                return Poll::Pending;
            }
            let n = buf.len().min(self.step);
            self.got.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_close(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.closed = true;
            Poll::Ready(Ok(()))
        }
    }

    /// A copy direction keeps bytes only while the writer pushes back: everything arrives in
    /// order, and a direction waiting for input holds no buffer.
    #[test]
    fn copy_keeps_bytes_only_while_the_writer_pushes_back() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let mut source = Source {
            chunks: data.chunks(20_000).map(<[u8]>::to_vec).collect(),
            ready: false,
        };
        let mut sink = Sink {
            step: 3_000,
            ..Sink::default()
        };
        let counters = [Counter::default(), Counter::default()];
        let moved = Cell::new(0);
        let idle = Idle::new(Duration::from_secs(60));
        let mut half = Half::new(Blame::Downstream);
        let mut cx = Context::from_waker(Waker::noop());
        let (mut held_while_busy, mut held_while_waiting) = (0, 0);
        let mut done = false;
        for _ in 0..10_000 {
            let polled = half.poll(
                &mut cx,
                &mut source,
                &mut sink,
                [&counters[0], &counters[1]],
                &moved,
                &idle,
            );
            if polled.is_ready() {
                assert!(matches!(polled, Poll::Ready(Ok(()))));
                done = true;
                break;
            }
            if half.pos < half.held.len() {
                held_while_busy = held_while_busy.max(half.held.capacity());
            } else {
                held_while_waiting = held_while_waiting.max(half.held.capacity());
            }
        }
        assert!(done, "the copy finished");
        assert!(sink.closed, "EOF was passed on");
        assert!(sink.got == data, "every byte, in order");
        assert_eq!(counters[0].get(), data.len() as u64);
        assert_eq!(counters[1].get(), data.len() as u64);
        assert_eq!(moved.get(), data.len() as u64);
        assert!(held_while_busy > 0, "push-back kept the rest of a read");
        assert_eq!(held_while_waiting, 0, "waiting for input holds no buffer");
    }
}
