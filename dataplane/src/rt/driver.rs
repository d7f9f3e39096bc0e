//! The ring and its op slab: submission, completion, cancellation.
//!
//! Every operation gets a slot in the op slab; `user_data` is `generation << 32 | slot`, so a
//! CQE that arrives after its slot was reused can never complete the wrong op. The slot owns
//! whatever the kernel may touch while the op is in flight (the `keep` box: send buffers,
//! sockaddrs, the eventfd counter). The owner of an op (a future or a stream) holds its
//! [`OpId`]; if the owner goes away first it calls [`Driver::abandon`]: the op is cancelled
//! (`AsyncCancel` by user_data) and its slot, with the resources, lives until the final CQE.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use io_uring::{IoUring, cqueue, opcode, squeue, types};
use slab::Slab;

use super::bufring::{self, BufRing, RecvBuf};
use super::executor::Remote;
use super::time::Timers;
use super::{RingFeatures, RtError};

/// Resources an op keeps alive while the kernel may use them. Byte vectors (the HTTP heads,
/// the buffered write queue) and received buffers (the L4 relay sends them on) are held as
/// they are, not boxed: no allocation per send.
pub(crate) enum Keep {
    Bytes(Vec<u8>),
    Recv(RecvBuf),
    Any(Box<dyn Any>),
}

impl Keep {
    /// Hold `buf` (a `Vec<u8>` or a [`RecvBuf`] without boxing it).
    pub(crate) fn new<B: 'static>(buf: B) -> Keep {
        let mut slot = Some(buf);
        let any = &mut slot as &mut dyn Any;
        if let Some(v) = any.downcast_mut::<Option<Vec<u8>>>() {
            return Keep::Bytes(v.take().unwrap_or_default());
        }
        if let Some(b) = any.downcast_mut::<Option<RecvBuf>>()
            && let Some(b) = b.take()
        {
            return Keep::Recv(b);
        }
        Keep::Any(Box::new(slot))
    }

    /// The bytes of the `B` given to [`Keep::new`]; they stay where they are when the `Keep`
    /// moves (a vector's heap buffer, or the box's contents).
    pub(crate) fn slice<B: super::IoBuf>(&self) -> Option<&[u8]> {
        match self {
            Keep::Bytes(v) => Some(v),
            Keep::Recv(b) => Some(b),
            Keep::Any(b) => b
                .downcast_ref::<Option<B>>()?
                .as_ref()
                .map(super::IoBuf::as_slice),
        }
    }

    /// The buffer given to [`Keep::new`], if it was a `B`.
    pub(crate) fn take<B: 'static>(self) -> Option<B> {
        match self {
            Keep::Bytes(v) => {
                let mut out: Option<B> = None;
                let slot = (&mut out as &mut dyn Any).downcast_mut::<Option<Vec<u8>>>()?;
                *slot = Some(v);
                out
            }
            Keep::Recv(b) => {
                let mut out: Option<B> = None;
                let slot = (&mut out as &mut dyn Any).downcast_mut::<Option<RecvBuf>>()?;
                *slot = Some(b);
                out
            }
            Keep::Any(b) => b.downcast::<Option<B>>().ok().and_then(|b| *b),
        }
    }
}

/// user_data of entries whose completion nobody waits for (cancel, close).
const UD_IGNORE: u64 = u64::MAX;
/// A multishot accept with this many unclaimed connections is cancelled until they are taken.
const ACCEPT_BACKLOG_MAX: usize = 256;

/// One completion.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cqe {
    pub(crate) res: i32,
    pub(crate) flags: u32,
}

impl Cqe {
    pub(crate) fn buffer(&self) -> Option<u16> {
        cqueue::buffer_select(self.flags)
    }
    pub(crate) fn errno(&self) -> Option<i32> {
        (self.res < 0).then_some(-self.res)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OpId {
    idx: u32,
    generation: u32,
}

impl OpId {
    fn user_data(self) -> u64 {
        (u64::from(self.generation) << 32) | u64::from(self.idx)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpKind {
    /// Results carry at most a provided buffer.
    Plain,
    /// Results are file descriptors (to close if nobody takes them).
    Accept,
}

struct Op {
    generation: u32,
    kind: OpKind,
    multishot: bool,
    /// The final CQE has arrived.
    done: bool,
    /// The owner is gone; results are discarded, the slot is freed on the final CQE.
    abandoned: bool,
    cancel_sent: bool,
    waker: Option<Waker>,
    first: Option<Cqe>,
    /// Only multishot ops (accept) ever need these; boxed so that the slot of every receive and
    /// send (two per idle relayed connection) stays small.
    multi: Option<Box<Multi>>,
    keep: Option<Keep>,
}

#[derive(Default)]
struct Multi {
    /// More tasks waiting on the same multishot op (concurrent accepts on one listener).
    extra: Vec<Waker>,
    rest: VecDeque<Cqe>,
}

impl Op {
    fn push(&mut self, cqe: Cqe) {
        let rest_empty = self.multi.as_ref().is_none_or(|m| m.rest.is_empty());
        if self.first.is_none() && rest_empty {
            self.first = Some(cqe);
        } else {
            self.multi.get_or_insert_default().rest.push_back(cqe);
        }
    }
    fn pop(&mut self) -> Option<Cqe> {
        self.first
            .take()
            .or_else(|| self.multi.as_mut().and_then(|m| m.rest.pop_front()))
    }
    fn queued(&self) -> usize {
        usize::from(self.first.is_some()) + self.multi.as_ref().map_or(0, |m| m.rest.len())
    }
    fn take_results(&mut self) -> Vec<Cqe> {
        let mut v = Vec::new();
        while let Some(c) = self.pop() {
            v.push(c);
        }
        v
    }
}

/// How long one loop turn may block in `io_uring_enter`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Wait {
    /// Submit, run deferred completions, do not block.
    No,
    /// Block until at least one completion.
    Forever,
    /// Block until a completion or the timeout.
    Upto(Duration),
}

pub(crate) struct Driver {
    // Field order matters for Drop: the ring closes before the buffer memory is freed.
    ring: RefCell<IoUring>,
    ops: RefCell<Slab<Op>>,
    next_gen: Cell<u32>,
    scratch: RefCell<Vec<(u64, Cqe)>>,
    features: Cell<RingFeatures>,
    pub(crate) bufs: Option<Rc<BufRing>>,
    pub(crate) timers: Timers,
    pub(crate) remote: Arc<Remote>,
    eventfd_op: Cell<Option<OpId>>,
    /// The ring timeout that wakes a parked loop for the nearest deadline, and when it fires.
    wake_timer: Cell<Option<(OpId, Instant)>>,
    /// Set once shutdown drained every op; only then may resources be freed.
    drained: Cell<bool>,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("features", &self.features.get())
            .field("ops_in_flight", &self.ops.borrow().len())
            .finish_non_exhaustive()
    }
}

impl Driver {
    pub(crate) fn new(entries: u32, remote: Arc<Remote>) -> Result<Driver, RtError> {
        let (ring, mut features) = super::host::build_ring(entries)?;
        features.multishot_accept = super::host::multishot_accept_supported();
        let tune = bufring::Tuning::from_env(entries);
        let bufs = match BufRing::new(&ring, tune.count, tune.size, tune.window) {
            Ok(b) => Some(Rc::new(b)),
            Err(e) => {
                tracing::warn!(error = %e, "rt: provided-buffer rings unavailable; receives use per-op buffers");
                None
            }
        };
        features.provided_buffer_rings = bufs.is_some();
        Ok(Driver {
            ring: RefCell::new(ring),
            ops: RefCell::new(Slab::with_capacity(256)),
            next_gen: Cell::new(0),
            scratch: RefCell::new(Vec::with_capacity(256)),
            features: Cell::new(features),
            bufs,
            timers: Timers::default(),
            remote,
            eventfd_op: Cell::new(None),
            wake_timer: Cell::new(None),
            drained: Cell::new(false),
        })
    }

    pub(crate) fn features(&self) -> RingFeatures {
        self.features.get()
    }

    /// Ops in the slab, not counting the shard's own eventfd read and wake-up timer.
    pub(crate) fn ops_in_flight(&self) -> usize {
        let ops = self.ops.borrow();
        let own = |id: Option<OpId>| {
            id.is_some_and(|id| {
                ops.get(id.idx as usize)
                    .is_some_and(|op| op.generation == id.generation)
            })
        };
        let own = usize::from(own(self.eventfd_op.get()))
            + usize::from(own(self.wake_timer.get().map(|(id, _)| id)));
        ops.len() - own
    }

    pub(crate) fn disable_multishot_accept(&self) {
        let mut f = self.features.get();
        f.multishot_accept = false;
        self.features.set(f);
    }

    /// Queue an operation; it goes to the kernel with the next loop turn's `io_uring_enter`.
    ///
    /// # Safety
    /// Every pointer in `sqe` must stay valid until the op's final CQE: it must point into
    /// `keep` (a heap allocation that the op slot owns and that does not move), or into memory
    /// that outlives the driver (the provided-buffer ring).
    pub(crate) unsafe fn submit(
        &self,
        sqe: squeue::Entry,
        kind: OpKind,
        multishot: bool,
        keep: Option<Keep>,
    ) -> OpId {
        let generation = self.next_gen.get().wrapping_add(1);
        self.next_gen.set(generation);
        let idx = self.ops.borrow_mut().insert(Op {
            generation,
            kind,
            multishot,
            done: false,
            abandoned: false,
            cancel_sent: false,
            waker: None,
            first: None,
            multi: None,
            keep,
        });
        let id = OpId {
            idx: u32::try_from(idx).expect("fewer than 2^32 ops in flight"),
            generation,
        };
        // SAFETY: forwarded from our caller's contract.
        unsafe { self.push(&sqe.user_data(id.user_data())) };
        id
    }

    /// Queue an entry whose completion is ignored and which carries no pointer.
    fn push_untracked(&self, sqe: squeue::Entry) {
        // SAFETY: only cancel and close entries come here; they carry no pointers.
        unsafe { self.push(&sqe.user_data(UD_IGNORE)) }
    }

    pub(crate) fn push_close(&self, fd: RawFd) {
        self.push_untracked(opcode::Close::new(types::Fd(fd)).build());
    }

    fn push_cancel(&self, user_data: u64) {
        self.push_untracked(opcode::AsyncCancel::new(user_data).build());
    }

    /// # Safety
    /// See [`Driver::submit`].
    unsafe fn push(&self, sqe: &squeue::Entry) {
        let mut ring = self.ring.borrow_mut();
        let mut failures = 0u32;
        loop {
            // SAFETY: forwarded from our caller's contract.
            if unsafe { ring.submission().push(sqe) }.is_ok() {
                return;
            }
            // SQ full (more than a ring's worth of ops in one turn): hand them over now.
            match ring.submit() {
                Ok(_) => {}
                Err(e) => match e.raw_os_error() {
                    Some(libc::EINTR) => {}
                    Some(libc::EBUSY | libc::EAGAIN) => self.reap(&mut ring),
                    _ => {
                        failures += 1;
                        tracing::error!(error = %e, "rt: io_uring_enter failed while the SQ is full");
                        assert!(failures < 1000, "rt: io_uring_enter keeps failing: {e}");
                    }
                },
            }
        }
    }

    /// Poll a single-shot op. On Ready the slot is freed and `slot` becomes None; the op's
    /// `keep` comes back with the completion.
    pub(crate) fn poll_op(
        &self,
        slot: &mut Option<OpId>,
        cx: &mut Context<'_>,
    ) -> Poll<(Cqe, Option<Keep>)> {
        let Some(id) = *slot else {
            return Poll::Ready((cancelled(), None));
        };
        let mut ops = self.ops.borrow_mut();
        let Some(op) = ops
            .get_mut(id.idx as usize)
            .filter(|op| op.generation == id.generation)
        else {
            // Only after shutdown reclaimed everything.
            *slot = None;
            return Poll::Ready((cancelled(), None));
        };
        if let Some(cqe) = op.pop() {
            let mut op = ops.remove(id.idx as usize);
            drop(ops);
            *slot = None;
            return Poll::Ready((cqe, op.keep.take()));
        }
        match &mut op.waker {
            Some(w) => w.clone_from(cx.waker()),
            None => op.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// Poll a multishot op: Ready(Some) for each completion, Ready(None) once it ended (then
    /// `slot` is None). Several tasks may wait on it.
    pub(crate) fn poll_multi(
        &self,
        slot: &mut Option<OpId>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Cqe>> {
        let Some(id) = *slot else {
            return Poll::Ready(None);
        };
        let mut ops = self.ops.borrow_mut();
        let Some(op) = ops
            .get_mut(id.idx as usize)
            .filter(|op| op.generation == id.generation)
        else {
            *slot = None;
            return Poll::Ready(None);
        };
        if let Some(cqe) = op.pop() {
            return Poll::Ready(Some(cqe));
        }
        if op.done {
            let op = ops.remove(id.idx as usize);
            drop(ops);
            drop(op);
            *slot = None;
            return Poll::Ready(None);
        }
        let w = cx.waker();
        match &op.waker {
            None => op.waker = Some(w.clone()),
            Some(cur) if cur.will_wake(w) => {}
            Some(_) => {
                let multi = op.multi.get_or_insert_default();
                if !multi.extra.iter().any(|e| e.will_wake(w)) {
                    multi.extra.push(w.clone());
                }
            }
        }
        Poll::Pending
    }

    /// The owner gives up the op: cancel it if still in flight and free the slot (with its
    /// resources) once the kernel is done with it. Unclaimed results are released (buffers back
    /// to the ring, accepted sockets closed).
    pub(crate) fn abandon(&self, id: OpId) {
        let mut ops = self.ops.borrow_mut();
        let Some(op) = ops
            .get_mut(id.idx as usize)
            .filter(|op| op.generation == id.generation)
        else {
            return;
        };
        let kind = op.kind;
        if op.done {
            let mut op = ops.remove(id.idx as usize);
            drop(ops);
            for cqe in op.take_results() {
                self.discard(kind, cqe);
            }
            drop(op);
            return;
        }
        op.abandoned = true;
        op.waker = None;
        if let Some(m) = &mut op.multi {
            m.extra.clear();
        }
        let results = op.take_results();
        let send_cancel = !op.cancel_sent;
        op.cancel_sent = true;
        drop(ops);
        for cqe in results {
            self.discard(kind, cqe);
        }
        if send_cancel {
            self.push_cancel(id.user_data());
        }
    }

    /// Release what a completion nobody will claim holds.
    fn discard(&self, kind: OpKind, cqe: Cqe) {
        if let Some(bid) = cqe.buffer() {
            match &self.bufs {
                Some(b) => b.recycle(bid),
                None => tracing::error!(bid, "rt: buffer completion without a buffer ring"),
            }
        }
        if kind == OpKind::Accept && cqe.res >= 0 {
            self.push_close(cqe.res);
        }
    }

    fn complete(&self, user_data: u64, cqe: Cqe) {
        if user_data == UD_IGNORE {
            return;
        }
        if cqe.buffer().is_some()
            && let Some(b) = &self.bufs
        {
            b.note_taken();
        }
        let idx = (user_data & 0xffff_ffff) as usize;
        let generation = (user_data >> 32) as u32;
        let mut ops = self.ops.borrow_mut();
        let Some(op) = ops.get_mut(idx).filter(|op| op.generation == generation) else {
            drop(ops);
            tracing::warn!(user_data, "rt: completion for an unknown op");
            self.discard(OpKind::Plain, cqe);
            return;
        };
        let last = !(op.multishot && cqueue::more(cqe.flags));
        if op.abandoned {
            let kind = op.kind;
            let slot = last.then(|| ops.remove(idx));
            drop(ops);
            self.discard(kind, cqe);
            drop(slot);
            return;
        }
        op.push(cqe);
        op.done |= last;
        let backlog_full =
            op.multishot && !op.done && !op.cancel_sent && op.queued() >= ACCEPT_BACKLOG_MAX;
        if backlog_full {
            op.cancel_sent = true;
        }
        let waker = op.waker.take();
        let extra = op
            .multi
            .as_mut()
            .map(|m| std::mem::take(&mut m.extra))
            .unwrap_or_default();
        drop(ops);
        if backlog_full {
            self.push_cancel(user_data);
        }
        if let Some(w) = waker {
            w.wake();
        }
        for w in extra {
            w.wake();
        }
    }

    fn reap(&self, ring: &mut IoUring) {
        let mut scratch = self.scratch.borrow_mut();
        for cqe in ring.completion() {
            scratch.push((
                cqe.user_data(),
                Cqe {
                    res: cqe.result(),
                    flags: cqe.flags(),
                },
            ));
        }
    }

    /// One loop turn on the ring: ONE `io_uring_enter` that submits everything queued and
    /// (unless `wait` is No) blocks for the first completion; then complete all reaped CQEs.
    pub(crate) fn turn(&self, wait: Wait) -> io::Result<()> {
        {
            let mut ring = self.ring.borrow_mut();
            let res = match wait {
                Wait::No => {
                    let need = {
                        let sq = ring.submission();
                        !sq.is_empty() || sq.taskrun() || sq.cq_overflow()
                    };
                    if need {
                        ring.submit().map(drop)
                    } else {
                        Ok(())
                    }
                }
                Wait::Forever => ring.submit_and_wait(1).map(drop),
                Wait::Upto(d) => {
                    let ts = types::Timespec::from(d);
                    let args = types::SubmitArgs::new().timespec(&ts);
                    ring.submitter().submit_with_args(1, &args).map(drop)
                }
            };
            if let Err(e) = res {
                match e.raw_os_error() {
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN) => {}
                    _ => return Err(e),
                }
            }
            self.reap(&mut ring);
        }
        let mut batch = std::mem::take(&mut *self.scratch.borrow_mut());
        for (ud, cqe) in batch.drain(..) {
            self.complete(ud, cqe);
        }
        let mut scratch = self.scratch.borrow_mut();
        if scratch.is_empty() {
            *scratch = batch;
        }
        Ok(())
    }

    /// Keep a read of the shard's eventfd armed, so a foreign thread can wake a parked shard.
    pub(crate) fn arm_eventfd(&self, fd: RawFd) {
        if let Some(id) = self.eventfd_op.get() {
            let ops = self.ops.borrow();
            let alive = ops
                .get(id.idx as usize)
                .is_some_and(|op| op.generation == id.generation && !op.done);
            if alive {
                return;
            }
            drop(ops);
            // Completed: collect it (the counter value itself is not needed).
            let mut slot = Some(id);
            let waker = Waker::noop();
            let _ = self.poll_op(&mut slot, &mut Context::from_waker(waker));
        }
        let buf: Box<std::cell::UnsafeCell<[u8; 8]>> = Box::default();
        let ptr = buf.get().cast::<u8>();
        let sqe = opcode::Read::new(types::Fd(fd), ptr, 8).build();
        // SAFETY: the read targets the boxed 8 bytes, owned by the op slot until its final CQE.
        let id = unsafe { self.submit(sqe, OpKind::Plain, false, Some(Keep::Any(buf))) };
        self.eventfd_op.set(Some(id));
    }

    /// Make sure a parked loop wakes by `deadline` (`now` is the turn's clock). The wake-up is a
    /// ring timeout kept armed across turns, not a timeout passed to every `io_uring_enter`: a
    /// timed wait sets up and cancels a kernel timer each time (~1.3 µs per wait measured on
    /// this VM), an armed timeout op costs nothing while it waits. The armed one is kept when it
    /// fires no later than `deadline` (firing early costs one spare turn, after which the next
    /// deadline is armed); otherwise it is cancelled and a new one armed.
    pub(crate) fn arm_wake_timer(&self, deadline: Instant, now: Instant) {
        if let Some((id, at)) = self.wake_timer.get() {
            let pending = {
                let ops = self.ops.borrow();
                ops.get(id.idx as usize)
                    .is_some_and(|op| op.generation == id.generation && !op.done)
            };
            if pending && at <= deadline {
                return;
            }
            // Fired (collect its slot) or too late (cancel it).
            self.abandon(id);
            self.wake_timer.set(None);
        }
        let ts = Box::new(types::Timespec::from(
            deadline.saturating_duration_since(now),
        ));
        let sqe = opcode::Timeout::new(&raw const *ts).build();
        // SAFETY: the kernel reads the boxed timespec when the SQE is submitted; the op slot owns
        // the box until the op's final CQE.
        let id = unsafe { self.submit(sqe, OpKind::Plain, false, Some(Keep::Any(ts))) };
        self.wake_timer.set(Some((id, deadline)));
    }

    /// Cancel every op still in flight and wait (at most `grace`) for the kernel to finish them.
    /// Returns whether the slab is empty, i.e. whether freeing resources is now safe.
    pub(crate) fn drain(&self, grace: Duration) -> bool {
        let ids: Vec<OpId> = self
            .ops
            .borrow()
            .iter()
            .map(|(idx, op)| OpId {
                idx: idx as u32,
                generation: op.generation,
            })
            .collect();
        for id in ids {
            self.abandon(id);
        }
        let deadline = Instant::now() + grace;
        loop {
            if self.ops.borrow().is_empty() {
                // Push out queued closes.
                let _ = self.turn(Wait::No);
                self.drained.set(true);
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            let step = (deadline - now).min(Duration::from_millis(50));
            if let Err(e) = self.turn(Wait::Upto(step)) {
                tracing::error!(error = %e, "rt: io_uring_enter failed during shutdown");
                return false;
            }
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if self.drained.get() || self.ops.get_mut().is_empty() {
            return;
        }
        if !self.drain(Duration::from_secs(1)) {
            // The kernel may still write into these: leak them rather than free them.
            tracing::error!(
                ops = self.ops.get_mut().len(),
                "rt: io_uring ops still in flight at shard exit; leaking their buffers"
            );
            std::mem::forget(std::mem::take(self.ops.get_mut()));
            std::mem::forget(self.bufs.take());
        }
    }
}

fn cancelled() -> Cqe {
    Cqe {
        res: -libc::ECANCELED,
        flags: 0,
    }
}

/// A single-shot op as a future. Dropping it before completion abandons (cancels) the op.
#[derive(Debug)]
pub(crate) struct OpFuture {
    drv: Rc<Driver>,
    id: Option<OpId>,
}

impl OpFuture {
    pub(crate) fn new(drv: Rc<Driver>, id: OpId) -> OpFuture {
        OpFuture { drv, id: Some(id) }
    }
}

impl Future for OpFuture {
    type Output = (Cqe, Option<Keep>);
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        this.drv.poll_op(&mut this.id, cx)
    }
}

impl Drop for OpFuture {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.drv.abandon(id);
        }
    }
}
