//! TCP over ring operations: multishot accept, connect, provided-buffer receive, owned-buffer
//! send, shutdown. No speculative syscalls: every read and write is an SQE.
//!
//! A stream owns at most one receive, one send and one shutdown op at a time, and keeps them in
//! its own state across polls: dropping a `read()` future does not lose data (the receive stays
//! armed and the next read takes its result). Dropping the stream abandons (cancels) its ops and
//! queues an `IORING_OP_CLOSE` behind the cancels, so the socket closes as soon as the kernel
//! lets go of it.

use std::cell::{Cell, RefCell};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, ready};

use io_uring::{opcode, squeue, types};
use socket2::{Domain, Protocol, SockAddr, SockRef, Socket, Type};

use super::bufring::{BGID, FALLBACK_BUF_SIZE, RecvBuf};
use super::driver::{Driver, Keep, OpFuture, OpId, OpKind};
use super::executor::current;
use super::{IoBuf, ListenOptions};

/// Bytes `poll_write` accepts beyond the send in flight before it applies backpressure.
const WRITE_QUEUE_MAX: usize = 64 * 1024;
/// Largest single send handed to the kernel by the borrowed-slice write paths.
const WRITE_CHUNK: usize = 256 * 1024;

fn sockaddr_to_std(a: SockAddr) -> io::Result<SocketAddr> {
    a.as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not an IP socket address"))
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

/// Queue a send of `len` bytes at `ptr`.
///
/// # Safety
/// `ptr..ptr+len` must lie inside a heap allocation owned by `keep` whose address does not
/// change when `keep` moves.
unsafe fn submit_send(drv: &Driver, fd: RawFd, ptr: *const u8, len: usize, keep: Keep) -> OpId {
    let len = u32::try_from(len).unwrap_or(u32::MAX);
    let sqe = opcode::Send::new(types::Fd(fd), ptr, len)
        .flags(libc::MSG_NOSIGNAL)
        .build();
    // SAFETY: forwarded: the op slot owns `keep`, which owns the bytes.
    unsafe { drv.submit(sqe, OpKind::Plain, false, Some(keep)) }
}

/// A listening socket; accepts via a multishot accept armed on the shard's ring.
pub struct TcpListener {
    fd: Option<OwnedFd>,
    drv: RefCell<Option<Rc<Driver>>>,
    op: Cell<Option<OpId>>,
    multishot: Cell<Option<bool>>,
}

impl std::fmt::Debug for TcpListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpListener")
            .field("fd", &self.raw())
            .field("local_addr", &self.local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl TcpListener {
    pub(super) fn bind_inner(addr: SocketAddr, opts: &ListenOptions) -> io::Result<TcpListener> {
        let sock = Socket::new(
            Domain::for_address(addr),
            Type::STREAM.nonblocking(),
            Some(Protocol::TCP),
        )?;
        sock.set_reuse_address(true)?;
        if opts.reuseport {
            sock.set_reuse_port(true)?;
        }
        // Linux copies TCP_NODELAY from the listener to accepted sockets: no setsockopt per
        // connection (see the test `accepted_sockets_are_nodelay`).
        sock.set_nodelay(true)?;
        sock.bind(&addr.into())?;
        sock.listen(opts.backlog)?;
        Ok(Self::from_owned(sock.into()))
    }

    /// Adopt a listener bound elsewhere (e.g. on the main thread before shards start).
    pub fn from_std(l: std::net::TcpListener) -> io::Result<TcpListener> {
        l.set_nonblocking(true)?;
        let fd = OwnedFd::from(l);
        SockRef::from(&fd).set_nodelay(true)?;
        Ok(Self::from_owned(fd))
    }

    fn from_owned(fd: OwnedFd) -> TcpListener {
        TcpListener {
            fd: Some(fd),
            drv: RefCell::new(None),
            op: Cell::new(None),
            multishot: Cell::new(None),
        }
    }

    fn raw(&self) -> RawFd {
        self.fd.as_ref().map_or(-1, |f| f.as_raw_fd())
    }

    fn driver(&self) -> Rc<Driver> {
        self.drv.borrow_mut().get_or_insert_with(current).clone()
    }

    pub(super) async fn accept_inner(&self) -> io::Result<(TcpStream, SocketAddr)> {
        std::future::poll_fn(|cx| self.poll_accept(cx)).await
    }

    fn arm(&self, drv: &Driver) -> OpId {
        let multishot = *self
            .multishot
            .get()
            .get_or_insert(drv.features().multishot_accept);
        self.multishot.set(Some(multishot));
        let fd = types::Fd(self.raw());
        let flags = libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK;
        if multishot {
            let sqe = opcode::AcceptMulti::new(fd).flags(flags).build();
            // SAFETY: no pointers (multishot accept takes no sockaddr).
            unsafe { drv.submit(sqe, OpKind::Accept, true, None) }
        } else {
            let sqe = opcode::Accept::new(fd, std::ptr::null_mut(), std::ptr::null_mut())
                .flags(flags)
                .build();
            // SAFETY: no pointers (null sockaddr; the peer address comes from getpeername).
            unsafe { drv.submit(sqe, OpKind::Accept, false, None) }
        }
    }

    /// Poll for the next connection. Cancel-safe: connections stay queued on the listener.
    pub fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<(TcpStream, SocketAddr)>> {
        let drv = self.driver();
        loop {
            let mut slot = self.op.get();
            if slot.is_none() {
                slot = Some(self.arm(&drv));
            }
            let r = drv.poll_multi(&mut slot, cx);
            self.op.set(slot);
            let cqe = match r {
                Poll::Pending => return Poll::Pending,
                // The multishot ended (error, cancel, or single-shot mode): re-arm.
                Poll::Ready(None) => continue,
                Poll::Ready(Some(cqe)) => cqe,
            };
            match cqe.errno() {
                None => {
                    // SAFETY: the kernel created this descriptor for us; nothing else owns it.
                    let fd = unsafe { OwnedFd::from_raw_fd(cqe.res) };
                    match SockRef::from(&fd).peer_addr().and_then(sockaddr_to_std) {
                        Ok(peer) => return Poll::Ready(Ok((TcpStream::from_owned(drv, fd), peer))),
                        // Reset before we looked at it: skip.
                        Err(_) => continue,
                    }
                }
                Some(libc::EINVAL) if self.multishot.get() == Some(true) => {
                    tracing::warn!(
                        "rt: multishot accept rejected by the kernel; using single-shot"
                    );
                    self.multishot.set(Some(false));
                    drv.disable_multishot_accept();
                }
                Some(
                    libc::ECANCELED
                    | libc::ECONNABORTED
                    | libc::EINTR
                    | libc::EAGAIN
                    | libc::EPROTO
                    | libc::ENETDOWN
                    | libc::ENOPROTOOPT
                    | libc::EHOSTDOWN
                    | libc::ENONET
                    | libc::EHOSTUNREACH
                    | libc::EOPNOTSUPP
                    | libc::ENETUNREACH,
                ) => {}
                Some(e) => return Poll::Ready(Err(errno(e))),
            }
        }
    }

    pub(super) fn local_addr_inner(&self) -> io::Result<SocketAddr> {
        let fd = self.fd.as_ref().ok_or_else(|| errno(libc::EBADF))?;
        sockaddr_to_std(SockRef::from(fd).local_addr()?)
    }
}

impl Drop for TcpListener {
    fn drop(&mut self) {
        if let Some(drv) = self.drv.get_mut().take() {
            if let Some(id) = self.op.take() {
                drv.abandon(id);
            }
            if let Some(fd) = self.fd.take() {
                drv.push_close(fd.into_raw_fd());
            }
        }
        // Never used on a shard: the OwnedFd closes itself.
    }
}

enum ReadState {
    Idle,
    Recv {
        id: OpId,
        epoch: u64,
    },
    /// ENOBUFS: wait until a buffer comes back to the ring (epoch moves on).
    WaitBufs {
        key: Option<usize>,
        epoch: u64,
    },
}

struct InFlightSend {
    id: OpId,
    ptr: *const u8,
    len: usize,
    off: usize,
}

/// A TCP connection driven by the shard's ring.
pub struct TcpStream {
    fd: Option<OwnedFd>,
    drv: Rc<Driver>,
    rd: ReadState,
    /// Unconsumed rest of the last received buffer.
    rem: Option<RecvBuf>,
    /// Bytes accepted by `poll_write`, not yet handed to the kernel.
    wq: Vec<u8>,
    wspare: Vec<u8>,
    wop: Option<InFlightSend>,
    werr: Option<i32>,
    sd: Option<OpId>,
    sd_done: bool,
}

impl std::fmt::Debug for TcpStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpStream")
            .field("fd", &self.raw())
            .field("peer", &self.peer_addr().ok())
            .finish_non_exhaustive()
    }
}

impl TcpStream {
    fn from_owned(drv: Rc<Driver>, fd: OwnedFd) -> TcpStream {
        TcpStream {
            fd: Some(fd),
            drv,
            rd: ReadState::Idle,
            rem: None,
            wq: Vec::new(),
            wspare: Vec::new(),
            wop: None,
            werr: None,
            sd: None,
            sd_done: false,
        }
    }

    /// Adopt a connected std stream (must be called on a shard).
    pub fn from_std(s: std::net::TcpStream) -> io::Result<TcpStream> {
        s.set_nonblocking(true)?;
        Ok(Self::from_owned(current(), OwnedFd::from(s)))
    }

    fn raw(&self) -> RawFd {
        self.fd.as_ref().map_or(-1, |f| f.as_raw_fd())
    }

    fn sock(&self) -> io::Result<SockRef<'_>> {
        self.fd
            .as_ref()
            .map(SockRef::from)
            .ok_or_else(|| errno(libc::EBADF))
    }

    pub(super) async fn connect_inner(addr: SocketAddr) -> io::Result<TcpStream> {
        let drv = current();
        let sock = Socket::new(
            Domain::for_address(addr),
            Type::STREAM.nonblocking(),
            Some(Protocol::TCP),
        )?;
        sock.set_nodelay(true)?;
        // From here on the socket closes through the ring (behind any cancel), never directly.
        let stream = TcpStream::from_owned(drv.clone(), sock.into());
        let sa = Box::new(SockAddr::from(addr));
        let sqe =
            opcode::Connect::new(types::Fd(stream.raw()), sa.as_ptr().cast(), sa.len()).build();
        // SAFETY: the sockaddr is boxed and owned by the op slot until the final CQE.
        let id = unsafe { drv.submit(sqe, OpKind::Plain, false, Some(Keep::Any(sa))) };
        let (cqe, _) = OpFuture::new(drv, id).await;
        match cqe.errno() {
            None => Ok(stream),
            Some(e) => Err(errno(e)),
        }
    }

    // ---- receive ----

    fn start_recv(&mut self) {
        let fd = types::Fd(self.raw());
        let (id, epoch) = match &self.drv.bufs {
            Some(bufs) => {
                let sqe = opcode::Recv::new(fd, std::ptr::null_mut(), bufs.buf_size())
                    .buf_group(BGID)
                    .build()
                    .flags(squeue::Flags::BUFFER_SELECT);
                // SAFETY: no pointer of ours: the kernel picks a buffer from the registered ring,
                // whose memory the driver keeps until the ring is closed.
                let id = unsafe { self.drv.submit(sqe, OpKind::Plain, false, None) };
                (id, bufs.epoch())
            }
            None => {
                let mut v: Vec<u8> = Vec::with_capacity(FALLBACK_BUF_SIZE as usize);
                let sqe = opcode::Recv::new(fd, v.as_mut_ptr(), FALLBACK_BUF_SIZE).build();
                // SAFETY: the kernel writes at most FALLBACK_BUF_SIZE bytes into the Vec's heap buffer,
                // which the op slot owns (moving the Vec into the box does not move its buffer).
                let id = unsafe {
                    self.drv
                        .submit(sqe, OpKind::Plain, false, Some(Keep::Bytes(v)))
                };
                (id, 0)
            }
        };
        self.rd = ReadState::Recv { id, epoch };
    }

    /// Next received bytes: the rest of the previous buffer, or a new one. Ok(None) at EOF.
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<RecvBuf>>> {
        if let Some(b) = self.rem.take() {
            return Poll::Ready(Ok(Some(b)));
        }
        loop {
            match &mut self.rd {
                ReadState::Idle => self.start_recv(),
                ReadState::Recv { id, epoch } => {
                    let epoch = *epoch;
                    let mut slot = Some(*id);
                    let (cqe, keep) = ready!(self.drv.poll_op(&mut slot, cx));
                    self.rd = ReadState::Idle;
                    // Own the buffer first so that every path below returns it.
                    let buf = match (cqe.buffer(), &self.drv.bufs) {
                        (Some(bid), Some(ring)) => {
                            RecvBuf::from_ring(ring, bid, u32::try_from(cqe.res).unwrap_or(0))
                        }
                        _ => keep.and_then(Keep::take::<Vec<u8>>).map(|mut v| {
                            let n = usize::try_from(cqe.res).unwrap_or(0);
                            if n <= v.capacity() {
                                // SAFETY: the kernel initialised the first n bytes (n is
                                // the receive's result, at most the capacity we offered).
                                unsafe { v.set_len(n) };
                            }
                            RecvBuf::from_vec(v)
                        }),
                    };
                    match cqe.errno() {
                        None if cqe.res == 0 => return Poll::Ready(Ok(None)),
                        None => {
                            return Poll::Ready(buf.map(Some).ok_or_else(|| {
                                io::Error::other("rt: receive completed without a usable buffer")
                            }));
                        }
                        Some(libc::ENOBUFS) => {
                            if let Some(b) = &self.drv.bufs {
                                b.ran_dry();
                            }
                            let moved_on =
                                self.drv.bufs.as_ref().is_none_or(|b| b.epoch() != epoch);
                            if !moved_on {
                                self.rd = ReadState::WaitBufs { key: None, epoch };
                            }
                        }
                        Some(libc::EINTR | libc::EAGAIN) => {}
                        Some(e) => return Poll::Ready(Err(errno(e))),
                    }
                }
                ReadState::WaitBufs { key, epoch } => match &self.drv.bufs {
                    Some(bufs) if bufs.epoch() == *epoch => {
                        bufs.wait(key, cx.waker());
                        return Poll::Pending;
                    }
                    _ => self.rd = ReadState::Idle,
                },
            }
        }
    }

    fn poll_read_into(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        match ready!(self.poll_recv(cx)) {
            Err(e) => Poll::Ready(Err(e)),
            Ok(None) => Poll::Ready(Ok(0)),
            Ok(Some(mut b)) => {
                let n = b.len().min(buf.len());
                buf[..n].copy_from_slice(&b[..n]);
                b.advance(n);
                if !b.is_empty() {
                    self.rem = Some(b);
                }
                Poll::Ready(Ok(n))
            }
        }
    }

    pub(super) async fn read_inner(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_read_into(cx, buf)).await
    }

    pub(super) async fn recv_buf_inner(&mut self) -> io::Result<Option<RecvBuf>> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    // ---- send: the buffered path (AsyncWrite) ----

    fn start_send(&mut self) {
        if self.wq.is_empty() || self.wop.is_some() || self.werr.is_some() {
            return;
        }
        let v = std::mem::replace(&mut self.wq, std::mem::take(&mut self.wspare));
        let (ptr, len) = (v.as_ptr(), v.len());
        // SAFETY: ptr..ptr+len is the Vec's heap buffer, owned by the op slot through the box
        // (moving a Vec does not move its buffer).
        let id = unsafe { submit_send(&self.drv, self.raw(), ptr, len, Keep::Bytes(v)) };
        self.wop = Some(InFlightSend {
            id,
            ptr,
            len,
            off: 0,
        });
    }

    /// Drive the send in flight; Ready once none is in flight.
    fn poll_send_step(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let Some(w) = &mut self.wop else {
                return Poll::Ready(Ok(()));
            };
            let mut slot = Some(w.id);
            let (cqe, keep) = ready!(self.drv.poll_op(&mut slot, cx));
            let Some(keep) = keep else {
                self.wop = None;
                return Poll::Ready(Err(errno(libc::ECANCELED)));
            };
            let fd = self.fd.as_ref().map_or(-1, |f| f.as_raw_fd());
            match cqe.errno() {
                None if cqe.res > 0 => {
                    w.off += cqe.res as usize;
                    if w.off < w.len {
                        // SAFETY: still inside the same Vec buffer, which `keep` owns.
                        w.id = unsafe {
                            submit_send(&self.drv, fd, w.ptr.add(w.off), w.len - w.off, keep)
                        };
                        continue;
                    }
                }
                None => self.werr = Some(libc::EPIPE),
                Some(libc::EINTR | libc::EAGAIN) => {
                    // SAFETY: as above.
                    w.id = unsafe {
                        submit_send(&self.drv, fd, w.ptr.add(w.off), w.len - w.off, keep)
                    };
                    continue;
                }
                Some(e) => self.werr = Some(e),
            }
            self.wop = None;
            if let Some(mut v) = keep.take::<Vec<u8>>() {
                v.clear();
                if v.capacity() > self.wspare.capacity() {
                    self.wspare = v;
                }
            }
            return Poll::Ready(match self.werr {
                Some(e) => Err(errno(e)),
                None => Ok(()),
            });
        }
    }

    fn poll_write_buffered(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if let Some(e) = self.werr {
            return Poll::Ready(Err(errno(e)));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if let Poll::Ready(Err(e)) = self.poll_send_step(cx) {
            return Poll::Ready(Err(e));
        }
        if self.wq.len() >= WRITE_QUEUE_MAX {
            if self.wop.is_some() {
                // poll_send_step registered our waker on the send in flight.
                return Poll::Pending;
            }
            self.start_send();
        }
        let n = buf.len().min(WRITE_QUEUE_MAX.saturating_sub(self.wq.len()));
        self.wq.extend_from_slice(&buf[..n]);
        self.start_send();
        Poll::Ready(Ok(n))
    }

    fn poll_flush_inner(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            ready!(self.poll_send_step(cx))?;
            if self.wq.is_empty() {
                return Poll::Ready(Ok(()));
            }
            if let Some(e) = self.werr {
                return Poll::Ready(Err(errno(e)));
            }
            self.start_send();
        }
    }

    fn poll_shutdown_write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_flush_inner(cx))?;
        if self.sd_done {
            return Poll::Ready(Ok(()));
        }
        if self.sd.is_none() {
            let sqe = opcode::Shutdown::new(types::Fd(self.raw()), libc::SHUT_WR).build();
            // SAFETY: no pointers.
            self.sd = Some(unsafe { self.drv.submit(sqe, OpKind::Plain, false, None) });
        }
        let (cqe, _) = ready!(self.drv.poll_op(&mut self.sd, cx));
        self.sd_done = true;
        Poll::Ready(match cqe.errno() {
            None | Some(libc::ENOTCONN) => Ok(()),
            Some(e) => Err(errno(e)),
        })
    }

    async fn flush_pending(&mut self) -> io::Result<()> {
        if self.wop.is_none() && self.wq.is_empty() {
            return Ok(());
        }
        std::future::poll_fn(|cx| self.poll_flush_inner(cx)).await
    }

    // ---- send: owned buffers ----

    /// Send from `buf` (one op if `!all`, else until everything is sent); `buf` comes back.
    async fn send_owned<B: IoBuf>(&mut self, buf: B, all: bool) -> (io::Result<usize>, B) {
        if let Err(e) = self.flush_pending().await {
            return (Err(e), buf);
        }
        if let Some(e) = self.werr {
            return (Err(errno(e)), buf);
        }
        send_owned_raw(self.drv.clone(), self.raw(), buf, all).await
    }

    pub(super) async fn write_all_owned_inner<B: IoBuf>(&mut self, buf: B) -> (io::Result<()>, B) {
        let (res, buf) = self.send_owned(buf, true).await;
        (res.map(drop), buf)
    }

    fn staging(&mut self, data: &[u8]) -> Vec<u8> {
        let mut v = std::mem::take(&mut self.wspare);
        v.clear();
        v.extend_from_slice(data);
        v
    }

    fn restage(&mut self, v: Vec<u8>) {
        if v.capacity() > self.wspare.capacity() {
            self.wspare = v;
        }
    }

    pub(super) async fn write_inner(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let v = self.staging(&buf[..buf.len().min(WRITE_CHUNK)]);
        let (res, v) = self.send_owned(v, false).await;
        self.restage(v);
        res
    }

    pub(super) async fn write_all_inner(&mut self, buf: &[u8]) -> io::Result<()> {
        for chunk in buf.chunks(WRITE_CHUNK) {
            let v = self.staging(chunk);
            let (res, v) = self.send_owned(v, true).await;
            self.restage(v);
            res?;
        }
        Ok(())
    }

    pub(super) async fn shutdown_write_inner(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_shutdown_write(cx)).await
    }

    pub(super) fn peer_addr_inner(&self) -> io::Result<SocketAddr> {
        sockaddr_to_std(self.sock()?.peer_addr()?)
    }

    pub(super) fn local_addr_inner(&self) -> io::Result<SocketAddr> {
        sockaddr_to_std(self.sock()?.local_addr()?)
    }

    pub(super) fn set_nodelay_inner(&self, on: bool) -> io::Result<()> {
        self.sock()?.set_nodelay(on)
    }

    /// Whether TCP_NODELAY is set.
    pub fn nodelay(&self) -> io::Result<bool> {
        self.sock()?.nodelay()
    }

    // ---- poll-level surface for hand-written state machines (the L4 relay) ----

    /// Poll for received bytes (see [`TcpStream::recv_buf`]): Ready(Ok(None)) at EOF. The receive
    /// stays armed across polls; the waker of the latest poll is woken.
    pub fn poll_recv_buf(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<RecvBuf>>> {
        self.poll_recv(cx)
    }

    /// Poll an owned-buffer send to completion. The first poll takes the buffer out of `buf` (after
    /// anything queued by the buffered write path has gone out) and hands it to the op slot, which
    /// keeps it until the kernel is done with it; later polls drive the send (partial sends are
    /// continued). Ready(Ok) once every byte was sent; the buffer is then dropped (a [`RecvBuf`]
    /// goes back to the ring). Cancel-safe in the sense that dropping the stream abandons the
    /// send and the buffer stays owned by the op slot until the final completion.
    pub fn poll_send_owned<B: IoBuf>(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut Option<B>,
    ) -> Poll<io::Result<()>> {
        if buf.is_some() {
            ready!(self.poll_flush_inner(cx))?;
            if let Some(e) = self.werr {
                return Poll::Ready(Err(errno(e)));
            }
            let Some(b) = buf.take() else {
                return Poll::Ready(Ok(()));
            };
            let keep = Keep::new(b);
            let (ptr, len) = {
                let s = keep
                    .slice::<B>()
                    .expect("rt: a send buffer is held as its own type");
                (s.as_ptr(), s.len())
            };
            if len == 0 {
                return Poll::Ready(Ok(()));
            }
            // SAFETY: ptr..ptr+len is the slice of the B held by `keep`, which the op slot owns
            // until the final completion; moving the Keep does not move the bytes.
            let id = unsafe { submit_send(&self.drv, self.raw(), ptr, len, keep) };
            self.wop = Some(InFlightSend {
                id,
                ptr,
                len,
                off: 0,
            });
        }
        self.poll_send_step(cx)
    }

    /// Poll `shutdown(SHUT_WR)` (after flushing anything queued): see
    /// [`TcpStream::shutdown_write`].
    pub fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_shutdown_write(cx)
    }
}

/// The owned-buffer send loop. `fd` must stay open while this runs (the caller borrows the
/// stream that owns it).
async fn send_owned_raw<B: IoBuf>(
    drv: Rc<Driver>,
    fd: RawFd,
    buf: B,
    all: bool,
) -> (io::Result<usize>, B) {
    let mut keep = Keep::new(buf);
    let (ptr, len) = {
        let s = keep
            .slice::<B>()
            .expect("rt: a send buffer is held as its own type");
        (s.as_ptr(), s.len())
    };
    let mut off = 0;
    let res = loop {
        if off >= len {
            break Ok(off);
        }
        // SAFETY: ptr..ptr+len is the slice of the B held by `keep` (owned by the op slot while
        // the op is in flight, by `keep` in between); moving the Keep does not move the bytes.
        let id = unsafe { submit_send(&drv, fd, ptr.add(off), len - off, keep) };
        let (cqe, k) = OpFuture::new(drv.clone(), id).await;
        keep = k.expect("rt: a send op always hands its buffer back");
        match cqe.errno() {
            None if cqe.res > 0 => {
                off += cqe.res as usize;
                if !all {
                    break Ok(off);
                }
            }
            None => break Err(io::ErrorKind::WriteZero.into()),
            Some(libc::EINTR | libc::EAGAIN) => {}
            Some(e) => break Err(errno(e)),
        }
    };
    let buf = keep
        .take::<B>()
        .expect("rt: the send buffer comes back with its own type");
    (res, buf)
}

/// The receiving half of [`TcpStream::into_split`].
pub struct ReadHalf {
    inner: Rc<RefCell<TcpStream>>,
}

/// The sending half of [`TcpStream::into_split`].
pub struct WriteHalf {
    inner: Rc<RefCell<TcpStream>>,
}

impl std::fmt::Debug for ReadHalf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ReadHalf")
            .field(&self.inner.as_ptr())
            .finish()
    }
}

impl std::fmt::Debug for WriteHalf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("WriteHalf")
            .field(&self.inner.as_ptr())
            .finish()
    }
}

impl TcpStream {
    /// Split into a receiving and a sending half that can be used at the same time (both
    /// directions of a copy loop, in one task or two tasks of the shard). The socket closes when
    /// both halves are dropped.
    pub fn into_split(self) -> (ReadHalf, WriteHalf) {
        let inner = Rc::new(RefCell::new(self));
        (
            ReadHalf {
                inner: inner.clone(),
            },
            WriteHalf { inner },
        )
    }
}

impl ReadHalf {
    /// See [`TcpStream::recv_buf`].
    pub async fn recv_buf(&mut self) -> io::Result<Option<RecvBuf>> {
        std::future::poll_fn(|cx| self.inner.borrow_mut().poll_recv(cx)).await
    }
    /// See [`TcpStream::read`].
    pub async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.inner.borrow_mut().poll_read_into(cx, buf)).await
    }
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.inner.borrow().peer_addr_inner()
    }
}

impl WriteHalf {
    async fn flush_pending(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.inner.borrow_mut().poll_flush_inner(cx)).await
    }

    async fn send_owned<B: IoBuf>(&mut self, buf: B, all: bool) -> (io::Result<usize>, B) {
        if let Err(e) = self.flush_pending().await {
            return (Err(e), buf);
        }
        let (drv, fd, werr) = {
            let s = self.inner.borrow();
            (s.drv.clone(), s.raw(), s.werr)
        };
        if let Some(e) = werr {
            return (Err(errno(e)), buf);
        }
        send_owned_raw(drv, fd, buf, all).await
    }

    /// See [`TcpStream::write_all_owned`].
    pub async fn write_all_owned<B: IoBuf>(&mut self, buf: B) -> (io::Result<()>, B) {
        let (res, buf) = self.send_owned(buf, true).await;
        (res.map(drop), buf)
    }
    /// See [`TcpStream::write`].
    pub async fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let (res, _) = self
            .send_owned(buf[..buf.len().min(WRITE_CHUNK)].to_vec(), false)
            .await;
        res
    }
    /// See [`TcpStream::write_all`].
    pub async fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        for chunk in buf.chunks(WRITE_CHUNK) {
            self.send_owned(chunk.to_vec(), true).await.0?;
        }
        Ok(())
    }
    /// See [`TcpStream::shutdown_write`].
    pub async fn shutdown_write(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.inner.borrow_mut().poll_shutdown_write(cx)).await
    }
}

impl futures_io::AsyncRead for ReadHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        self.inner.borrow_mut().poll_read_into(cx, buf)
    }
}

impl futures_io::AsyncWrite for WriteHalf {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.inner.borrow_mut().poll_write_buffered(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner.borrow_mut().poll_flush_inner(cx)
    }
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner.borrow_mut().poll_shutdown_write(cx)
    }
}

impl Drop for TcpStream {
    fn drop(&mut self) {
        match std::mem::replace(&mut self.rd, ReadState::Idle) {
            ReadState::Recv { id, .. } => self.drv.abandon(id),
            ReadState::WaitBufs {
                key: Some(key),
                epoch,
            } => {
                if let Some(b) = &self.drv.bufs {
                    b.unwait(key, epoch);
                }
            }
            _ => {}
        }
        if let Some(w) = self.wop.take() {
            self.drv.abandon(w.id);
        }
        if let Some(id) = self.sd.take() {
            self.drv.abandon(id);
        }
        self.rem = None;
        if let Some(fd) = self.fd.take() {
            self.drv.push_close(fd.into_raw_fd());
        }
    }
}

impl futures_io::AsyncRead for TcpStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_read_into(cx, buf)
    }
}

/// `poll_write` copies into a per-stream queue (up to 64 KiB beyond the send in flight) and
/// starts a send when none is in flight; queued bytes reach the kernel from later
/// `poll_write`/`poll_flush` calls, so flush (as rustls and h2 do) before waiting for a reply.
/// `poll_close` = flush + `shutdown(SHUT_WR)`.
impl futures_io::AsyncWrite for TcpStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_buffered(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_flush_inner(cx)
    }
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_shutdown_write(cx)
    }
}
