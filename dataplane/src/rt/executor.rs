//! The per-shard executor: local tasks (async-task), a FIFO run queue, the loop turn, and the
//! cross-thread wake path (remote queue + eventfd written only while the shard is parked).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use async_task::Runnable;
use slab::Slab;

use super::RtError;
use super::driver::{Driver, Wait};

/// Tasks polled per turn before the ring gets its turn (so I/O is not starved).
const BUDGET: usize = 256;
/// How long shutdown waits for cancelled ops to come back from the kernel.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

static NEXT_TOKEN: AtomicU64 = AtomicU64::new(1);

/// The part of a shard that other threads may touch: its remote run queue and its eventfd.
pub(crate) struct Remote {
    token: u64,
    tx: crossbeam_channel::Sender<Runnable>,
    parked: AtomicBool,
    eventfd: OwnedFd,
    /// Time spent parked in `io_uring_enter` waiting for work (utilisation metrics; written by
    /// the shard only).
    pub(crate) idle: Arc<IdleClock>,
}

/// A shard's idle time, readable from any thread: the parks that ended plus the one in
/// progress, so a shard that has been waiting for minutes reads as idle, not busy.
#[derive(Debug)]
pub struct IdleClock {
    base: Instant,
    /// Nanoseconds of finished parks.
    done_ns: AtomicU64,
    /// Start of the park in progress (nanoseconds since `base`, plus one); 0 while running.
    parked_at: AtomicU64,
    /// The highest value handed out: readers never see the clock go back while a park ends.
    reported_ns: AtomicU64,
}

impl IdleClock {
    fn new() -> IdleClock {
        IdleClock {
            base: Instant::now(),
            done_ns: AtomicU64::new(0),
            parked_at: AtomicU64::new(0),
            reported_ns: AtomicU64::new(0),
        }
    }

    fn now_ns(&self) -> u64 {
        self.ns_at(Instant::now())
    }

    fn ns_at(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX)
    }

    /// The shard is about to block (`now`: the clock just read); returns the start to pass to
    /// [`IdleClock::end_park`].
    fn begin_park(&self, now: Instant) -> u64 {
        let t = self.ns_at(now);
        self.parked_at.store(t.saturating_add(1), Ordering::Release);
        t
    }

    fn end_park(&self, started: u64, now: Instant) {
        // Clear first, then add: a reader in between undercounts (and is held up by
        // `reported_ns`), never counts the park twice.
        self.parked_at.store(0, Ordering::Release);
        let ns = self.ns_at(now).saturating_sub(started);
        self.done_ns.store(
            self.done_ns.load(Ordering::Relaxed).wrapping_add(ns),
            Ordering::Release,
        );
    }

    /// Idle time so far, including the park in progress; never decreases.
    pub fn idle(&self) -> Duration {
        let parked = self.parked_at.load(Ordering::Acquire);
        let mut ns = self.done_ns.load(Ordering::Acquire);
        if parked != 0 {
            ns = ns.saturating_add(self.now_ns().saturating_sub(parked - 1));
        }
        let before = self.reported_ns.fetch_max(ns, Ordering::AcqRel);
        Duration::from_nanos(before.max(ns))
    }
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("token", &self.token)
            .field("parked", &self.parked.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Remote {
    fn schedule(&self, r: Runnable) {
        match self.tx.send(r) {
            Ok(()) => self.notify(),
            // The shard is gone. Its tasks were all closed at shutdown, so this cannot happen;
            // if it did, dropping a local task here would panic on this foreign thread: leak it.
            Err(e) => std::mem::forget(e.into_inner()),
        }
    }

    /// Wake the shard if it is parked (or about to park) in `io_uring_enter`.
    pub(crate) fn notify(&self) {
        if self.parked.swap(false, Ordering::SeqCst) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a local u64 to the eventfd we own (open as long as
            // this Remote lives).
            let rc = unsafe {
                libc::write(
                    self.eventfd.as_raw_fd(),
                    (&raw const one).cast(),
                    size_of::<u64>(),
                )
            };
            if rc != 8 {
                tracing::error!(error = %std::io::Error::last_os_error(), "rt: eventfd write failed");
            }
        }
    }
}

struct Local {
    token: Cell<u64>,
    queue: RefCell<VecDeque<Runnable>>,
    /// One waker per live task, so shutdown can find and drop every task.
    tasks: RefCell<Slab<Waker>>,
    driver: RefCell<Option<Rc<Driver>>>,
}

thread_local! {
    static LOCAL: Local = const {
        Local {
            token: Cell::new(0),
            queue: RefCell::new(VecDeque::new()),
            tasks: RefCell::new(Slab::new()),
            driver: RefCell::new(None),
        }
    };
}

/// The current shard's driver. Panics outside a shard: that is a programming error.
pub(crate) fn current() -> Rc<Driver> {
    try_current().expect("rt: used outside a meshgate shard (spawn_shard / block_on)")
}

pub(crate) fn try_current() -> Option<Rc<Driver>> {
    LOCAL.try_with(|l| l.driver.borrow().clone()).ok().flatten()
}

fn schedule(remote: &Arc<Remote>, r: Runnable) {
    let mut r = Some(r);
    let _ = LOCAL.try_with(|l| {
        if l.token.get() == remote.token
            && let Some(r) = r.take()
        {
            l.queue.borrow_mut().push_back(r);
        }
    });
    if let Some(r) = r {
        remote.schedule(r);
    }
}

/// Removes the task's registry entry when its future is dropped (completed or cancelled).
struct TaskGuard(usize);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        let _ = LOCAL.try_with(|l| {
            let w = l.tasks.borrow_mut().try_remove(self.0);
            drop(w);
        });
    }
}

/// A task's future with its registry entry. Hand-written rather than an `async move` block:
/// a block that awaits a captured future stores it twice (the capture and the awaited local),
/// which doubled every task (and pushed connection tasks over async-task's 2 KiB limit, past
/// which it boxes the future separately).
struct Tracked<F> {
    fut: F,
    // Dropped after `fut`: the entry goes once the future is gone.
    _guard: TaskGuard,
}

impl<F: Future> Future for Tracked<F> {
    type Output = F::Output;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // SAFETY: structural pinning of `fut`: it is never moved out of `self` and `Tracked`
        // has no Drop impl or Unpin impl of its own that could move it.
        unsafe { self.map_unchecked_mut(|t| &mut t.fut) }.poll(cx)
    }
}

/// Spawn a task on the current shard. Dropping the handle detaches the task.
pub fn spawn<F>(fut: F) -> JoinHandle<F::Output>
where
    F: Future + 'static,
    F::Output: 'static,
{
    let remote = current().remote.clone();
    LOCAL.with(|l| {
        let key = l.tasks.borrow().vacant_key();
        let fut = Tracked {
            fut,
            _guard: TaskGuard(key),
        };
        let (runnable, task) = async_task::Builder::new()
            .propagate_panic(true)
            .spawn_local(move |()| fut, move |r| schedule(&remote, r));
        let got = l.tasks.borrow_mut().insert(runnable.waker());
        debug_assert_eq!(got, key);
        runnable.schedule();
        JoinHandle { task: Some(task) }
    })
}

/// Number of live tasks on the current shard.
pub(crate) fn task_count() -> usize {
    LOCAL.with(|l| l.tasks.borrow().len())
}

/// Yield to other tasks (and the ring) once.
pub async fn yield_now() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
    .await
}

/// Handle to a spawned task: await it for the output; drop it to detach the task.
pub struct JoinHandle<T> {
    task: Option<async_task::Task<T>>,
}

impl<T> std::fmt::Debug for JoinHandle<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinHandle")
            .field(
                "finished",
                &self.task.as_ref().is_none_or(|t| t.is_finished()),
            )
            .finish()
    }
}

impl<T> JoinHandle<T> {
    /// Stop the task at its next suspension point; its future is dropped.
    pub fn cancel(mut self) {
        // Dropping an async-task Task cancels it; the future is dropped on the shard.
        drop(self.task.take());
    }

    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(|t| t.is_finished())
    }
}

impl<T> Future for JoinHandle<T> {
    type Output = T;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let this = self.get_mut();
        let task = this
            .task
            .as_mut()
            .expect("rt: JoinHandle polled after it returned its output");
        let out = std::task::ready!(Pin::new(task).poll(cx));
        this.task = None;
        Poll::Ready(out)
    }
}

impl<T> Drop for JoinHandle<T> {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.detach();
        }
    }
}

/// One shard's executor, installed in the current thread's local state while it lives.
pub(crate) struct Executor {
    drv: Rc<Driver>,
    remote: Arc<Remote>,
    rx: crossbeam_channel::Receiver<Runnable>,
}

impl Executor {
    pub(crate) fn new(ring_entries: u32) -> Result<Executor, RtError> {
        if try_current().is_some() {
            return Err(RtError::Io(std::io::Error::other(
                "a meshgate shard is already running on this thread",
            )));
        }
        // A blocking eventfd: io_uring reads of an O_NONBLOCK file complete with EAGAIN instead
        // of waiting. Writes never block (the counter cannot get near overflow).
        // SAFETY: plain syscall, no pointers.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(RtError::Io(std::io::Error::last_os_error()));
        }
        // SAFETY: eventfd just returned this fd and nothing else owns it.
        let eventfd = unsafe { OwnedFd::from_raw_fd(efd) };
        let (tx, rx) = crossbeam_channel::unbounded();
        let token = NEXT_TOKEN.fetch_add(1, Ordering::Relaxed);
        let remote = Arc::new(Remote {
            token,
            tx,
            parked: AtomicBool::new(false),
            eventfd,
            idle: Arc::new(IdleClock::new()),
        });
        let drv = Rc::new(Driver::new(ring_entries, remote.clone())?);
        LOCAL.with(|l| {
            l.token.set(token);
            *l.driver.borrow_mut() = Some(drv.clone());
        });
        Ok(Executor { drv, remote, rx })
    }

    /// Run `root` as a task until it completes; then drop all other tasks and drain the ring.
    pub(crate) fn block_on<T: 'static>(
        self,
        root: impl Future<Output = T> + 'static,
    ) -> std::thread::Result<T> {
        let mut root = spawn(root);
        self.run_until(&root);
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        // The root finished: this poll returns its output or resumes its panic.
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            match Pin::new(&mut root).poll(&mut cx) {
                Poll::Ready(v) => v,
                Poll::Pending => unreachable!("the root task is finished"),
            }
        }));
        drop(root);
        self.shutdown();
        out
    }

    fn pop(&self) -> Option<Runnable> {
        LOCAL.with(|l| l.queue.borrow_mut().pop_front())
    }

    fn queue_is_empty(&self) -> bool {
        LOCAL.with(|l| l.queue.borrow().is_empty())
    }

    fn pull_remote(&self) {
        if self.rx.is_empty() {
            return;
        }
        LOCAL.with(|l| {
            let mut q = l.queue.borrow_mut();
            while let Ok(r) = self.rx.try_recv() {
                q.push_back(r);
            }
        });
    }

    fn run_until<T>(&self, root: &JoinHandle<T>) {
        let mut enter_failures = 0u32;
        super::time::set_turn_now(Some(Instant::now()));
        loop {
            self.pull_remote();
            for _ in 0..BUDGET {
                let Some(r) = self.pop() else { break };
                r.run();
            }
            if root.is_finished() {
                return;
            }
            if let Some(b) = &self.drv.bufs {
                b.top_up();
                b.wake_waiters();
            }
            // Only a turn that may block is idle time; it reads the clock once before the wait
            // and shares the read after it with the turn's timers.
            let mut parked_at = None;
            let wait = if !self.queue_is_empty() || !self.rx.is_empty() {
                Wait::No
            } else {
                self.drv.arm_eventfd(self.remote.eventfd.as_raw_fd());
                let trim = self.drv.bufs.as_ref().and_then(|b| b.trim_deadline());
                let next = match (self.drv.timers.next_deadline(), trim) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                let now = Instant::now();
                if let Some(d) = next {
                    self.drv.arm_wake_timer(d, now);
                }
                self.remote.parked.store(true, Ordering::SeqCst);
                if self.rx.is_empty() {
                    parked_at = Some(self.remote.idle.begin_park(now));
                    Wait::Forever
                } else {
                    Wait::No
                }
            };
            let res = self.drv.turn(wait);
            let now = Instant::now();
            if let Some(t) = parked_at {
                self.remote.idle.end_park(t, now);
            }
            self.remote.parked.store(false, Ordering::SeqCst);
            match res {
                Ok(()) => enter_failures = 0,
                Err(e) => {
                    enter_failures += 1;
                    tracing::error!(error = %e, "rt: io_uring_enter failed");
                    assert!(
                        enter_failures < 1000,
                        "rt: io_uring_enter keeps failing: {e}"
                    );
                }
            }
            super::time::set_turn_now(Some(now));
            self.drv.timers.fire(now);
            if let Some(b) = &self.drv.bufs {
                b.maybe_trim(now);
            }
        }
    }

    /// Drop every task (on this thread), then cancel and drain all ops still in flight.
    fn shutdown(&self) {
        for _ in 0..1000 {
            let wakers: Vec<Waker> =
                LOCAL.with(|l| l.tasks.borrow().iter().map(|(_, w)| w.clone()).collect());
            for w in wakers {
                w.wake();
            }
            self.pull_remote();
            // Dropping a Runnable closes its task and drops the future here, on the shard.
            while let Some(r) = self.pop() {
                drop(r);
            }
            let done = LOCAL.with(|l| l.tasks.borrow().is_empty()) && self.rx.is_empty();
            if done {
                break;
            }
        }
        self.drv.timers.clear();
        if !self.drv.drain(DRAIN_GRACE) {
            tracing::error!("rt: some io_uring ops did not finish at shard exit");
        }
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        let _ = LOCAL.try_with(|l| {
            let d = l.driver.borrow_mut().take();
            l.token.set(0);
            drop(d);
        });
        super::time::set_turn_now(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: the wrapper that ties a task to its registry entry was an `async move`
    /// block, which stored the task's future twice.
    #[test]
    fn a_spawned_future_is_stored_once() {
        async fn big() -> usize {
            let data = [7u8; 1000];
            yield_now().await;
            std::hint::black_box(&data).len()
        }
        fn tracked<F: Future>(fut: F) -> Tracked<F> {
            Tracked {
                fut,
                _guard: TaskGuard(0),
            }
        }
        let inner = size_of_val(&big());
        let wrapped = size_of_val(&tracked(big()));
        assert!(inner >= 1000);
        assert!(
            wrapped <= inner + 16,
            "{inner}-byte future takes {wrapped} bytes in its task"
        );
    }
}
