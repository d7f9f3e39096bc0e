//! rt: meshgate's thread-per-core io_uring runtime. The ONLY module that talks to io_uring.
//!
//! STUB: signatures fixed, bodies being written (see issue 9). Everything else in the dataplane
//! goes through this surface, so a later change of runtime touches only this module.
#![allow(clippy::todo, unused_variables, dead_code)] // stub while the runtime is being written

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::ops::Deref;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

/// Which io_uring setup flags and features this host gave us.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct RingFeatures {
    pub coop_taskrun: bool,
    pub taskrun_flag: bool,
    pub single_issuer: bool,
    pub defer_taskrun: bool,
    pub provided_buffer_rings: bool,
    pub multishot_accept: bool,
}

impl std::fmt::Display for RingFeatures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        todo!()
    }
}

/// Why the runtime cannot start on this host, written for operators.
#[derive(Debug, thiserror::Error)]
pub enum RtError {
    #[error("io_uring is disabled by the kernel.io_uring_disabled sysctl (value {value}); run `sysctl -w kernel.io_uring_disabled=0` or use a host that allows io_uring")]
    Disabled { value: u32 },
    #[error("io_uring_setup failed: {source}; io_uring may be blocked by a seccomp profile (containers: allow io_uring_setup/io_uring_enter/io_uring_register)")]
    Unavailable { source: io::Error },
    #[error("the locked-memory limit (RLIMIT_MEMLOCK) is {have_kib} KiB, meshgate needs at least {need_kib} KiB; raise it with `ulimit -l {need_kib}` or LimitMEMLOCK= in the systemd unit")]
    MemlockTooLow { have_kib: u64, need_kib: u64 },
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Probe the host: memlock limit, io_uring availability, setup flags. Used by `meshgate check`
/// and at start-up before any shard is spawned.
pub fn check() -> Result<RingFeatures, RtError> {
    todo!()
}

/// How to build one shard.
#[derive(Debug, Clone)]
pub struct ShardConfig {
    pub id: usize,
    /// CPU to pin the thread to; None = not pinned.
    pub cpu: Option<usize>,
    /// Submission queue entries.
    pub ring_entries: u32,
}

/// Spawn an OS thread ("meshgate-shard-{id}"), pin it, build its ring, and run `f()` as the root
/// task. The thread ends when the root task completes (other tasks still pending are dropped).
pub fn spawn_shard<F, Fut>(cfg: ShardConfig, f: F) -> Result<ShardHandle, RtError>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + 'static,
{
    todo!()
}

#[derive(Debug)]
pub struct ShardHandle {
    thread: std::thread::JoinHandle<()>,
}

impl ShardHandle {
    pub fn join(self) -> std::thread::Result<()> {
        self.thread.join()
    }
}

/// Spawn a task on the current shard. Dropping the handle detaches the task.
pub fn spawn<F>(fut: F) -> JoinHandle<F::Output>
where
    F: Future + 'static,
    F::Output: 'static,
{
    todo!()
}

#[derive(Debug)]
pub struct JoinHandle<T> {
    _t: std::marker::PhantomData<T>,
}

impl<T> JoinHandle<T> {
    /// Stop the task at its next suspension point; its future is dropped.
    pub fn cancel(self) {
        todo!()
    }
}

impl<T> Future for JoinHandle<T> {
    type Output = T;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        todo!()
    }
}

/// Completes after `d`.
pub fn sleep(d: Duration) -> Sleep {
    todo!()
}

#[derive(Debug)]
pub struct Sleep {}

impl Future for Sleep {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        todo!()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("timed out")]
pub struct Elapsed;

/// Run `f` for at most `d`.
pub async fn timeout<F: Future>(d: Duration, f: F) -> Result<F::Output, Elapsed> {
    todo!()
}

/// Cross-thread channel whose receiving end lives on a shard: `send` from any thread wakes it.
pub fn channel<T: Send + 'static>() -> (Sender<T>, Receiver<T>) {
    todo!()
}

#[derive(Debug)]
pub struct Sender<T> {
    _t: std::marker::PhantomData<T>,
}
impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        todo!()
    }
}
impl<T: Send> Sender<T> {
    /// Err(msg) if the receiver is gone.
    pub fn send(&self, msg: T) -> Result<(), T> {
        todo!()
    }
}

#[derive(Debug)]
pub struct Receiver<T> {
    _t: std::marker::PhantomData<T>,
}
impl<T: Send> Receiver<T> {
    /// None once every sender is dropped.
    pub async fn recv(&self) -> Option<T> {
        todo!()
    }
}

/// Listening socket options.
#[derive(Debug, Clone)]
pub struct ListenOptions {
    pub reuseport: bool,
    pub backlog: i32,
}

#[derive(Debug)]
pub struct TcpListener {}

impl TcpListener {
    /// Bind + listen (SO_REUSEADDR, optional SO_REUSEPORT, nonblocking, CLOEXEC).
    pub fn bind(addr: SocketAddr, opts: &ListenOptions) -> io::Result<TcpListener> {
        todo!()
    }
    /// Next accepted connection (multishot accept underneath; accepted sockets are TCP_NODELAY).
    pub async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        todo!()
    }
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        todo!()
    }
}

#[derive(Debug)]
pub struct TcpStream {}

impl TcpStream {
    pub async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
        todo!()
    }
    /// Cancel-safe read: the kernel never writes into `buf` (a provided buffer is copied out).
    /// Ok(0) at EOF.
    pub async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        todo!()
    }
    /// Receive into a buffer the kernel picks from this shard's provided-buffer ring.
    /// Ok(None) at EOF. The buffer returns to the ring when dropped.
    pub async fn recv_buf(&mut self) -> io::Result<Option<RecvBuf>> {
        todo!()
    }
    /// Write all of `buf`, which the runtime owns while the kernel may read it; returned after.
    pub async fn write_all_owned<B: IoBuf>(&mut self, buf: B) -> (io::Result<()>, B) {
        todo!()
    }
    /// Write from a borrowed slice (copied into an owned staging buffer). Returns bytes written.
    pub async fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        todo!()
    }
    pub async fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        todo!()
    }
    /// shutdown(SHUT_WR): send FIN, keep reading.
    pub async fn shutdown_write(&mut self) -> io::Result<()> {
        todo!()
    }
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        todo!()
    }
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        todo!()
    }
    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        todo!()
    }
}

/// A buffer the kernel may read from while an operation is in flight.
pub trait IoBuf: 'static {
    fn as_slice(&self) -> &[u8];
}
impl IoBuf for Vec<u8> {
    fn as_slice(&self) -> &[u8] {
        self
    }
}
impl IoBuf for Box<[u8]> {
    fn as_slice(&self) -> &[u8] {
        self
    }
}
impl IoBuf for &'static [u8] {
    fn as_slice(&self) -> &[u8] {
        self
    }
}

/// A received buffer from the shard's provided-buffer ring.
#[derive(Debug)]
pub struct RecvBuf {}
impl Deref for RecvBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        todo!()
    }
}
impl IoBuf for RecvBuf {
    fn as_slice(&self) -> &[u8] {
        self
    }
}

impl futures_io::AsyncRead for TcpStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        todo!()
    }
}
impl futures_io::AsyncWrite for TcpStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        todo!()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        todo!()
    }
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        todo!()
    }
}
