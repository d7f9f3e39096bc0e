//! rt: meshgate's thread-per-core io_uring runtime. The ONLY module that talks to io_uring.
//!
//! Everything else in the dataplane goes through this surface, so a change of runtime touches
//! only this module.
//!
//! # Design
//!
//! **One shard = one thread = one ring.** [`spawn_shard`] starts a thread, pins it, and builds
//! its ring with the best flags the kernel takes (`SINGLE_ISSUER|DEFER_TASKRUN|COOP_TASKRUN|
//! TASKRUN_FLAG`, else `COOP_TASKRUN|TASKRUN_FLAG`, else none; see [`RingFeatures`]). Tasks are
//! local (`!Send` futures, `Rc`/`RefCell` state) and run from a FIFO queue (`executor.rs`).
//!
//! **The loop turn** (`executor.rs`, `driver.rs`):
//! 1. move tasks woken from other threads onto the local queue; run up to 256 tasks;
//! 2. wake tasks waiting for receive buffers if any came back this turn;
//! 3. ONE `io_uring_enter`: submit every SQE queued by the tasks and reap completions. It does
//!    not block while tasks are runnable (and is skipped when nothing is queued and the kernel
//!    flags no pending completion work); otherwise it blocks until the first completion, bounded
//!    by the nearest timer deadline (ext-arg timeout). Timers live in a userspace ordered map:
//!    no syscall or SQE per timer;
//! 4. complete the reaped CQEs (wake their tasks), fire due timers.
//!
//! **Op lifecycle** (`driver.rs`). Every ring operation has a slot in the op slab; `user_data`
//! is `generation << 32 | slot`, so a late CQE can never complete a reused slot. The slot owns
//! everything the kernel may touch while the op is in flight (send buffers, the connect
//! sockaddr, the eventfd counter) — never the future. The op's owner (a future, or a stream for
//! its receive/send/shutdown) holds the id; on completion it takes the result and the resources
//! back. If the owner is dropped first, the op is *abandoned*: an `AsyncCancel` is queued and
//! the slot (with its resources) lives until the final CQE, whose results are then released
//! (provided buffers go back to the ring, accepted sockets are closed). Multishot ops (accept)
//! queue their results in the slot; when a CQE lacks `F_MORE` the next poll re-arms.
//!
//! **Buffer ownership** (`bufring.rs`). Receives select a buffer from the shard's
//! provided-buffer ring only when data arrives, so an idle connection pins no memory. A
//! completed receive hands its buffer out as a [`RecvBuf`] (zero copy, `recv_buf`) or copies
//! out of it (`read`, which keeps an unconsumed rest for the next read); dropping the `RecvBuf`
//! puts the buffer back at the ring's tail. `ENOBUFS` parks the stream until a buffer comes
//! back (an epoch counter makes the check race-free); it never spins. `write_all_owned(B)`
//! sends from a caller-owned buffer that the op slot holds until the send completes, so
//! `recv_buf` on one stream + `write_all_owned` on another copies nothing in user space.
//!
//! **Closing.** Dropping a stream or listener abandons its ops and queues `IORING_OP_CLOSE`
//! behind the cancels (never a bare `close(2)` that could let a queued SQE hit a reused fd).
//!
//! **Cross-thread wakes** (`executor.rs`, `chan.rs`). A waker used on another thread pushes
//! the task to the shard's remote queue and writes the shard's eventfd only if the shard is
//! parked (a read of the eventfd is kept armed on the ring); busy shards cost senders no
//! syscall. [`channel`] rides on this.
//!
//! **Shutdown.** When the root task ends, every remaining task is dropped on the shard thread,
//! every op still in flight is cancelled and drained (buffers are leaked rather than freed if
//! the kernel does not let go within 2 s), and the ring is closed.

mod bufring;
mod chan;
mod driver;
mod executor;
mod host;
mod net;
mod time;

use std::future::Future;
use std::io;
use std::net::SocketAddr;

pub use bufring::{RecvBuf, set_trim_period};
pub use chan::{Receiver, Sender, channel};
pub use executor::{IdleClock, JoinHandle, spawn, yield_now};
pub use host::MEMLOCK_NEED;
pub use net::{ReadHalf, TcpListener, TcpStream, WriteHalf};
pub use time::{Elapsed, Sleep, now, sleep, sleep_until, timeout};

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
        let flags: Vec<&str> = [
            (self.defer_taskrun, "defer_taskrun"),
            (self.single_issuer, "single_issuer"),
            (self.coop_taskrun, "coop_taskrun"),
            (self.taskrun_flag, "taskrun_flag"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect();
        if flags.is_empty() {
            f.write_str("plain ring")?;
        } else {
            f.write_str(&flags.join("+"))?;
        }
        f.write_str(if self.provided_buffer_rings {
            ", provided buffers"
        } else {
            ", no provided buffers"
        })?;
        f.write_str(if self.multishot_accept {
            ", multishot accept"
        } else {
            ", single-shot accept"
        })
    }
}

/// Why the runtime cannot start on this host, written for operators.
#[derive(Debug, thiserror::Error)]
pub enum RtError {
    #[error(
        "io_uring is disabled by the kernel.io_uring_disabled sysctl (value {value}); run `sysctl -w kernel.io_uring_disabled=0` or use a host that allows io_uring"
    )]
    Disabled { value: u32 },
    #[error(
        "io_uring_setup failed: {source}; io_uring may be blocked by a seccomp profile (containers: allow io_uring_setup/io_uring_enter/io_uring_register)"
    )]
    Unavailable { source: io::Error },
    #[error(
        "io_uring_enter failed: {source}; io_uring is probably blocked by a seccomp profile (containers: allow io_uring_setup/io_uring_enter/io_uring_register)"
    )]
    EnterFailed { source: io::Error },
    #[error(
        "the locked-memory limit (RLIMIT_MEMLOCK) is {have_kib} KiB, meshgate needs at least {need_kib} KiB; raise it with `ulimit -l {need_kib}` or LimitMEMLOCK= in the systemd unit"
    )]
    MemlockTooLow { have_kib: u64, need_kib: u64 },
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Probe the host: memlock limit, io_uring availability, setup flags. Used by `meshgate check`
/// and at start-up before any shard is spawned.
pub fn check() -> Result<RingFeatures, RtError> {
    host::check()
}

/// CPUs this process may run on (its `sched_getaffinity` mask), so `taskset -c 0 meshgate run`
/// restricts the shards. Never empty.
pub fn allowed_cpus() -> Vec<usize> {
    let cpus = host::allowed_cpus();
    if cpus.is_empty() { vec![0] } else { cpus }
}

/// Features of the current shard's ring. Panics outside a shard.
pub fn shard_features() -> RingFeatures {
    executor::current().features()
}

/// Counters of the current shard's runtime (for metrics and leak tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ShardStats {
    /// Live tasks (spawned, not finished or dropped).
    pub tasks: usize,
    /// Ring operations whose final completion has not been collected (not counting the shard's
    /// own eventfd read and wake-up timer).
    pub ops_in_flight: usize,
    /// Pending timers.
    pub timers: usize,
    /// Provided receive buffers currently out of the ring (held by `RecvBuf`s or streams).
    pub recv_buffers_in_use: u32,
    /// Size of the provided-buffer pool (0 without buffer rings).
    pub recv_buffers_total: u32,
    /// Bytes of one provided receive buffer (0 without buffer rings).
    pub recv_buffer_bytes: u32,
    /// Resident bytes of the pool's mapping: pages receives wrote and that were not released
    /// yet. Bounded by `recv_buffers_total * recv_buffer_bytes`; cold buffers are released after
    /// a quiet spell (see `bufring.rs`). Computed with `mincore(2)` on every call.
    pub recv_pool_resident_bytes: usize,
}

/// Stats of the current shard. Panics outside a shard.
pub fn shard_stats() -> ShardStats {
    let drv = executor::current();
    ShardStats {
        tasks: executor::task_count(),
        ops_in_flight: drv.ops_in_flight(),
        timers: drv.timers.len(),
        recv_buffers_in_use: drv.bufs.as_ref().map_or(0, |b| b.in_use()),
        recv_buffers_total: drv.bufs.as_ref().map_or(0, |b| u32::from(b.count())),
        recv_buffer_bytes: drv.bufs.as_ref().map_or(0, |b| b.buf_size()),
        recv_pool_resident_bytes: drv.bufs.as_ref().map_or(0, |b| b.resident_bytes()),
    }
}

/// The current shard's idle clock: time spent parked waiting for work (including a park in
/// progress), written by the shard, readable from any thread (busy time = wall time - idle
/// time). Panics outside a shard.
pub fn idle_counter() -> std::sync::Arc<IdleClock> {
    executor::current().remote.idle.clone()
}

/// How to build one shard.
#[derive(Debug, Clone)]
pub struct ShardConfig {
    pub id: usize,
    /// CPU to pin the thread to; None = not pinned.
    pub cpu: Option<usize>,
    /// Submission queue entries. Also sizes the shard's receive-buffer pool: this many 256 KiB
    /// buffers, clamped to 64..=256 (a pool of at most 64 MiB; see `bufring.rs`).
    pub ring_entries: u32,
}

/// Spawn an OS thread ("meshgate-shard-{id}"), pin it, build its ring, and run `f()` as the root
/// task. The thread ends when the root task completes (other tasks still pending are dropped).
pub fn spawn_shard<F, Fut>(cfg: ShardConfig, f: F) -> Result<ShardHandle, RtError>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + 'static,
{
    let (tx, rx) = std::sync::mpsc::sync_channel::<Result<(), RtError>>(1);
    let thread = std::thread::Builder::new()
        .name(format!("meshgate-shard-{}", cfg.id))
        .spawn(move || {
            if let Some(cpu) = cfg.cpu
                && let Err(e) = host::pin_current_thread(cpu)
            {
                let _ = tx.send(Err(RtError::Io(e)));
                return;
            }
            let exec = match executor::Executor::new(cfg.ring_entries) {
                Ok(e) => e,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let _ = tx.send(Ok(()));
            drop(tx);
            if let Err(panic) = exec.block_on(f()) {
                std::panic::resume_unwind(panic);
            }
        })?;
    match rx.recv() {
        Ok(Ok(())) => Ok(ShardHandle { thread }),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => {
            let _ = thread.join();
            Err(RtError::Io(io::Error::other(
                "shard thread died during start-up",
            )))
        }
    }
}

/// Run `fut` to completion on the current thread as a one-off shard (tests, CLI tools).
pub fn block_on<F>(ring_entries: u32, fut: F) -> Result<F::Output, RtError>
where
    F: Future + 'static,
    F::Output: 'static,
{
    let exec = executor::Executor::new(ring_entries)?;
    match exec.block_on(fut) {
        Ok(v) => Ok(v),
        Err(panic) => std::panic::resume_unwind(panic),
    }
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

/// Listening socket options.
#[derive(Debug, Clone)]
pub struct ListenOptions {
    pub reuseport: bool,
    pub backlog: i32,
}

impl TcpListener {
    /// Bind + listen (SO_REUSEADDR, optional SO_REUSEPORT, nonblocking, CLOEXEC).
    pub fn bind(addr: SocketAddr, opts: &ListenOptions) -> io::Result<TcpListener> {
        TcpListener::bind_inner(addr, opts)
    }
    /// Next accepted connection (multishot accept underneath; accepted sockets are TCP_NODELAY).
    pub async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        self.accept_inner().await
    }
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.local_addr_inner()
    }
}

impl TcpStream {
    pub async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
        TcpStream::connect_inner(addr).await
    }
    /// Cancel-safe read: the kernel never writes into `buf` (a provided buffer is copied out).
    /// Ok(0) at EOF.
    pub async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_inner(buf).await
    }
    /// Receive into a buffer the kernel picks from this shard's provided-buffer ring.
    /// Ok(None) at EOF. The buffer returns to the ring when dropped.
    pub async fn recv_buf(&mut self) -> io::Result<Option<RecvBuf>> {
        self.recv_buf_inner().await
    }
    /// Write all of `buf`, which the runtime owns while the kernel may read it; returned after.
    pub async fn write_all_owned<B: IoBuf>(&mut self, buf: B) -> (io::Result<()>, B) {
        self.write_all_owned_inner(buf).await
    }
    /// Write from a borrowed slice (copied into an owned staging buffer). Returns bytes written.
    pub async fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_inner(buf).await
    }
    pub async fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.write_all_inner(buf).await
    }
    /// shutdown(SHUT_WR): send FIN, keep reading.
    pub async fn shutdown_write(&mut self) -> io::Result<()> {
        self.shutdown_write_inner().await
    }
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.peer_addr_inner()
    }
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.local_addr_inner()
    }
    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        self.set_nodelay_inner(on)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_features_display_is_one_line() {
        let all = RingFeatures {
            coop_taskrun: true,
            taskrun_flag: true,
            single_issuer: true,
            defer_taskrun: true,
            provided_buffer_rings: true,
            multishot_accept: true,
        };
        assert_eq!(
            all.to_string(),
            "defer_taskrun+single_issuer+coop_taskrun+taskrun_flag, provided buffers, multishot accept"
        );
        let none = RingFeatures {
            coop_taskrun: false,
            taskrun_flag: false,
            single_issuer: false,
            defer_taskrun: false,
            provided_buffer_rings: false,
            multishot_accept: false,
        };
        assert_eq!(
            none.to_string(),
            "plain ring, no provided buffers, single-shot accept"
        );
    }

    #[test]
    fn errors_tell_the_operator_what_to_do() {
        let e = RtError::MemlockTooLow {
            have_kib: 64,
            need_kib: 512,
        };
        assert!(e.to_string().contains("ulimit -l 512"), "{e}");
        assert!(
            RtError::Disabled { value: 2 }
                .to_string()
                .contains("io_uring_disabled")
        );
    }

    #[test]
    fn allowed_cpus_is_never_empty() {
        assert!(!allowed_cpus().is_empty());
    }
}
