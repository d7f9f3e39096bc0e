//! The shard's provided-buffer ring (`IORING_REGISTER_PBUF_RING`) and [`RecvBuf`].
//!
//! Receives carry no buffer: the kernel picks one from this ring only when data is there, so an
//! idle connection pins nothing. The CQE names the buffer id; the buffer then belongs to a
//! [`RecvBuf`] until it is dropped, which puts it back at the ring's tail. When the ring runs
//! dry a receive fails with `ENOBUFS`; the stream then waits (no retry loop) until any buffer
//! comes back, which the executor signals once per loop turn.
//!
//! **Hot reuse.** A ring is FIFO: a buffer given back goes to the tail and is handed out again
//! only after every other published buffer. With the whole pool published, each receive would
//! write into the coldest buffer of the pool (16-64 MiB per shard), and the copy out of the
//! socket paid cache misses on every byte. So only a small *window* of buffers is published;
//! the rest wait in a LIFO stack (`spare`) and the most recently returned buffer is the next one
//! published. The window starts at [`HOT_WINDOW`] buffers and doubles (up to the whole pool)
//! whenever a receive finds the ring dry while spare buffers exist, so a shard with many
//! receives completing per loop turn ends up publishing what it needs. The executor tops the
//! ring up to the window once per loop turn, before its `io_uring_enter`.
//!
//! **Trim.** Pages of the pool stay resident once a receive wrote them. Every 10 s
//! (only while there is something to release) the spare buffers that were not used for a whole
//! period (the bottom of the LIFO) are released with `MADV_DONTNEED`, and a window that a burst
//! grew shrinks back to twice what the period used. Buffers still published to the kernel are
//! never released (the kernel may write into them); they move to `spare` as receives use them.
//! So the resident pool is bounded by the pool size (`count * size`, see [`Tuning`]) during a
//! burst and returns to about the hot window once traffic is light again; a shard that goes
//! completely quiet right after a burst keeps the pages of the buffers it still publishes.

use std::alloc::{self, Layout};
use std::cell::{Cell, RefCell};
use std::ops::Deref;
use std::ptr::NonNull;
use std::rc::Rc;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::task::Waker;
use std::time::{Duration, Instant};

use io_uring::IoUring;
use io_uring::types::BufRingEntry;
use slab::Slab;

use super::IoBuf;

/// Buffer group id of the shard's receive buffers.
pub(crate) const BGID: u16 = 0;
/// Size of a receive buffer when buffer rings are not available (one TLS record fits).
pub(crate) const FALLBACK_BUF_SIZE: u32 = 16 * 1024;
/// Size of one provided receive buffer. 256 KiB: a busy relay moves up to 256 KiB per receive
/// and per send (8 ring operations per MB instead of ~130 with 16 KiB), 1.3-1.7x haproxy's
/// bytes per CPU-second on tcp-bulk (ADR 0001). Small receives touch only the pages they fill,
/// an idle connection holds no buffer, and the pool is bounded by [`POOL_MAX`] and trimmed when
/// cold (see "Trim" above).
pub(crate) const BUF_SIZE: u32 = 256 * 1024;
/// Most buffers in a shard's pool.
const MAX_BUFS: u32 = 1024;
/// Largest default pool per shard (virtual size; resident only where receives wrote): caps the
/// buffer count at 256 for 256 KiB buffers.
const POOL_MAX: u64 = 64 * 1024 * 1024;
/// Buffers published to the kernel at first (see "Hot reuse" above).
pub(crate) const HOT_WINDOW: u16 = 8;
const PAGE: usize = 4096;

pub(crate) struct BufRing {
    entries: NonNull<BufRingEntry>,
    entries_layout: Layout,
    /// `count * buf_size` bytes of anonymous memory (its own mapping).
    data: NonNull<u8>,
    data_len: usize,
    count: u16,
    mask: u16,
    buf_size: u32,
    /// Our copy of the tail we last published.
    tail: Cell<u16>,
    /// Bumped on every buffer returned: an `ENOBUFS` from a receive submitted at an older epoch
    /// may be retried at once; at the same epoch the ring is still dry.
    epoch: Cell<u64>,
    returned: Cell<bool>,
    /// Buffers the kernel handed out that have not come back yet.
    in_use: Cell<u32>,
    waiters: RefCell<Slab<Waker>>,
    /// Returned buffers not published to the kernel, most recently returned last (LIFO).
    spare: RefCell<Vec<u16>>,
    /// How many buffers we try to keep published.
    window: Cell<u16>,
    /// Published buffers the kernel has not taken yet (pushed minus completions carrying one).
    published: Cell<u16>,
    /// Buffers that were published since they were last released (their pages may be resident),
    /// one bit per buffer.
    dirty: RefCell<Vec<u64>>,
    /// The lowest depth of `spare` since the last trim: the buffers below it were not used for
    /// a whole trim period (see [`BufRing::maybe_trim`]).
    spare_low: Cell<usize>,
    /// Whether a buffer went onto `spare` since the last trim (else a trim has nothing to do and
    /// the shard need not wake up for it).
    trim_armed: Cell<bool>,
    next_trim: Cell<Instant>,
    /// Most buffers out at once since the last trim (to shrink a window grown by a burst).
    in_use_high: Cell<u32>,
}

/// How long a spare buffer must stay unused before its pages are given back to the kernel
/// (milliseconds; 10 s unless a test shortens it with [`set_trim_period`]).
static TRIM_AFTER_MS: AtomicU64 = AtomicU64::new(10_000);

fn trim_after() -> Duration {
    Duration::from_millis(TRIM_AFTER_MS.load(Ordering::Relaxed))
}

/// Set the trim period of every shard's receive-buffer pool (process-wide; for tests).
pub fn set_trim_period(d: Duration) {
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1);
    TRIM_AFTER_MS.store(ms, Ordering::Relaxed);
}

impl std::fmt::Debug for BufRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufRing")
            .field("count", &self.count)
            .field("buf_size", &self.buf_size)
            .finish_non_exhaustive()
    }
}

impl BufRing {
    /// Allocate `count` (a power of two) buffers and register them as group [`BGID`]; publish
    /// `window` of them (0 = all).
    pub(crate) fn new(
        ring: &IoUring,
        count: u16,
        buf_size: u32,
        window: u16,
    ) -> std::io::Result<BufRing> {
        assert!(
            count.is_power_of_two(),
            "buffer count must be a power of two"
        );
        let entries_layout =
            Layout::from_size_align(usize::from(count) * size_of::<BufRingEntry>(), PAGE)
                .map_err(std::io::Error::other)?;
        let data_len = usize::from(count) * buf_size as usize;
        // SAFETY: both layouts have non-zero size (count >= 1, buf_size > 0).
        let entries = NonNull::new(unsafe { alloc::alloc_zeroed(entries_layout) })
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::OutOfMemory))?
            .cast::<BufRingEntry>();
        // The buffers get their own anonymous mapping: its pages are zero (so every byte we ever
        // read is initialised even before the kernel writes it) and only become resident when a
        // receive first writes them. The allocator's aligned zeroed allocation would memset, and
        // so fault in, the whole pool at start-up.
        // SAFETY: a fresh private anonymous mapping; no existing memory is touched.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                data_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        let data = if ptr == libc::MAP_FAILED {
            None
        } else {
            NonNull::new(ptr.cast::<u8>())
        };
        let Some(data) = data else {
            let err = std::io::Error::last_os_error();
            // SAFETY: allocated just above with this layout.
            unsafe { alloc::dealloc(entries.as_ptr().cast(), entries_layout) };
            return Err(err);
        };
        let this = BufRing {
            entries,
            entries_layout,
            data,
            data_len,
            count,
            mask: count - 1,
            buf_size,
            tail: Cell::new(0),
            epoch: Cell::new(0),
            returned: Cell::new(false),
            in_use: Cell::new(0),
            waiters: RefCell::new(Slab::new()),
            spare: RefCell::new(Vec::with_capacity(usize::from(count))),
            window: Cell::new(if window == 0 {
                count
            } else {
                window.min(count)
            }),
            published: Cell::new(0),
            dirty: RefCell::new(vec![0; usize::from(count).div_ceil(64)]),
            spare_low: Cell::new(usize::from(count)),
            trim_armed: Cell::new(false),
            next_trim: Cell::new(Instant::now() + trim_after()),
            in_use_high: Cell::new(0),
        };
        // SAFETY: `entries` is a page-aligned allocation of `count` entries that lives until this
        // BufRing is dropped; the driver drops (or leaks) the ring before its BufRing.
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                this.entries.as_ptr() as u64,
                count,
                BGID,
                0,
            )?;
        }
        // Highest ids at the bottom of the stack: buffer 0 is published first.
        this.spare.borrow_mut().extend((0..count).rev());
        this.top_up();
        Ok(this)
    }

    pub(crate) fn buf_size(&self) -> u32 {
        self.buf_size
    }

    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.get()
    }

    /// A completion handed out a buffer.
    pub(crate) fn note_taken(&self) {
        self.in_use.set(self.in_use.get().saturating_add(1));
        if self.in_use.get() > self.in_use_high.get() {
            self.in_use_high.set(self.in_use.get());
        }
        self.published.set(self.published.get().saturating_sub(1));
    }

    /// Publish spare buffers (most recently returned first) until the window is full. Cheap
    /// when nothing is missing; called once per loop turn and after a dry ring.
    pub(crate) fn top_up(&self) {
        let want = self.window.get();
        if self.published.get() >= want {
            return;
        }
        let mut spare = self.spare.borrow_mut();
        let mut pushed = false;
        while self.published.get() < want {
            let Some(bid) = spare.pop() else { break };
            self.push_entry(bid);
            if spare.len() < self.spare_low.get() {
                self.spare_low.set(spare.len());
            }
            self.published.set(self.published.get() + 1);
            pushed = true;
        }
        drop(spare);
        if pushed {
            self.publish();
            self.epoch.set(self.epoch.get().wrapping_add(1));
            self.returned.set(true);
        }
    }

    /// A receive found the ring empty. If spare buffers exist the window was too small for this
    /// load: double it and publish at once (the epoch moves on, so the receive retries).
    pub(crate) fn ran_dry(&self) {
        // `published` is exact (buffers pushed minus completions that carried one), so it is
        // not reset here: the ENOBUFS may be older than buffers published since, and a count
        // reset to zero would leave those buffers in the kernel's ring unaccounted (never moved
        // to `spare`, so never trimmed).
        if !self.spare.borrow().is_empty() {
            self.window
                .set(self.window.get().saturating_mul(2).min(self.count));
        }
        self.top_up();
    }

    pub(crate) fn in_use(&self) -> u32 {
        self.in_use.get()
    }

    pub(crate) fn count(&self) -> u16 {
        self.count
    }

    /// Bytes of the pool that are resident (pages a receive wrote at some point and that were
    /// not released since), from `mincore(2)`. For stats and tests; not for the hot path.
    pub(crate) fn resident_bytes(&self) -> usize {
        let pages = self.data_len.div_ceil(PAGE);
        let mut vec = vec![0u8; pages];
        // SAFETY: `data` is our page-aligned mapping of `data_len` bytes; mincore writes one
        // byte per page into `vec`, which has exactly that many.
        let rc = unsafe {
            libc::mincore(
                self.data.as_ptr().cast(),
                self.data_len,
                vec.as_mut_ptr().cast(),
            )
        };
        if rc != 0 {
            return 0;
        }
        vec.iter().filter(|&&b| b & 1 != 0).count() * PAGE
    }

    fn push_entry(&self, bid: u16) {
        self.dirty.borrow_mut()[usize::from(bid / 64)] |= 1 << (bid % 64);
        let tail = self.tail.get();
        let idx = usize::from(tail & self.mask);
        // SAFETY: idx < count, inside the entries allocation. The slot at our tail is not being
        // read by the kernel: it only reads slots between its head and the published tail, and at
        // most `count - 1` buffers are in the ring while this one is out. set_* do not touch the
        // `resv` field that doubles as the tail in entry 0.
        let entry = unsafe { &mut *self.entries.as_ptr().add(idx) };
        entry.set_addr(self.buf_ptr(bid) as u64);
        entry.set_len(self.buf_size);
        entry.set_bid(bid);
        self.tail.set(tail.wrapping_add(1));
    }

    /// When the shard should wake up to trim, if a trim could release anything.
    pub(crate) fn trim_deadline(&self) -> Option<Instant> {
        self.trim_armed.get().then(|| self.next_trim.get())
    }

    /// Once per loop turn (cheap unless a trim period ended): give the pages of spare buffers
    /// that stayed unused for a whole period back to the kernel (`MADV_DONTNEED`; they read as
    /// zeros and fault in again when next used). The LIFO keeps the hot buffers on top, so the
    /// cold ones are exactly the bottom of `spare` below its lowest depth in the period. After a
    /// burst the pool's resident size so returns to the hot window within two periods.
    pub(crate) fn maybe_trim(&self, now: Instant) {
        if now < self.next_trim.get() {
            return;
        }
        self.next_trim.set(now + trim_after());
        // A window that a burst grew and that the last period did not need shrinks back (to
        // twice what the period used): published buffers beyond it go to `spare` as receives
        // use them up, where they can be released. (Published buffers are never released
        // directly: the kernel may write into them.)
        let high = self.in_use_high.replace(self.in_use.get());
        let window = self.window.get();
        if u32::from(window) > high.saturating_mul(2) && window > HOT_WINDOW {
            let want = u16::try_from(high.saturating_mul(2).next_power_of_two()).unwrap_or(window);
            self.window.set(want.clamp(HOT_WINDOW, window));
            self.trim_armed.set(true);
        }
        let spare = self.spare.borrow();
        let cold = self.spare_low.replace(spare.len()).min(spare.len());
        if cold < spare.len() {
            self.trim_armed.set(true);
        } else if self.window.get() == window {
            self.trim_armed.set(false);
        }
        let mut dirty = self.dirty.borrow_mut();
        for &bid in &spare[..cold] {
            let (word, bit) = (usize::from(bid / 64), 1u64 << (bid % 64));
            if dirty[word] & bit == 0 {
                continue;
            }
            dirty[word] &= !bit;
            // SAFETY: the range is buffer `bid` of our own mapping; the buffer is on `spare`, so
            // neither the kernel (it is not published) nor a `RecvBuf` refers to it.
            let rc = unsafe {
                libc::madvise(
                    self.buf_ptr(bid).cast(),
                    self.buf_size as usize,
                    libc::MADV_DONTNEED,
                )
            };
            if rc != 0 {
                tracing::debug!(error = %std::io::Error::last_os_error(), "rt: madvise of a cold receive buffer failed");
            }
        }
    }

    fn publish(&self) {
        // SAFETY: the tail is a naturally aligned u16 inside entry 0 of our live allocation; the
        // kernel reads it concurrently, so it is only accessed atomically (AtomicU16 has the same
        // layout as u16).
        let tail =
            unsafe { AtomicU16::from_ptr(BufRingEntry::tail(self.entries.as_ptr()).cast_mut()) };
        tail.store(self.tail.get(), Ordering::Release);
    }

    fn buf_ptr(&self, bid: u16) -> *mut u8 {
        // SAFETY: bid < count (callers check), so the offset stays inside the data allocation.
        unsafe {
            self.data
                .as_ptr()
                .add(usize::from(bid) * self.buf_size as usize)
        }
    }

    /// Give buffer `bid` back to the kernel.
    pub(crate) fn recycle(&self, bid: u16) {
        if bid >= self.count {
            tracing::error!(bid, "rt: kernel returned an unknown buffer id; dropped");
            return;
        }
        self.in_use.set(self.in_use.get().saturating_sub(1));
        if self.published.get() < self.window.get() {
            self.push_entry(bid);
            self.published.set(self.published.get() + 1);
            self.publish();
        } else {
            self.spare.borrow_mut().push(bid);
            self.trim_armed.set(true);
        }
        self.epoch.set(self.epoch.get().wrapping_add(1));
        self.returned.set(true);
    }

    /// Register (or refresh) a waiter for buffers; `key` is the waiter's slot.
    pub(crate) fn wait(&self, key: &mut Option<usize>, waker: &Waker) {
        let mut w = self.waiters.borrow_mut();
        match key.and_then(|k| w.get_mut(k)) {
            Some(cur) => {
                if !cur.will_wake(waker) {
                    cur.clone_from(waker);
                }
            }
            None => *key = Some(w.insert(waker.clone())),
        }
    }

    /// Forget a waiter registered at `epoch` (its slot is only still ours if no buffer came back
    /// since, because coming back empties the whole waiter list).
    pub(crate) fn unwait(&self, key: usize, epoch: u64) {
        if epoch == self.epoch.get() {
            let w = self.waiters.borrow_mut().try_remove(key);
            drop(w);
        }
    }

    /// Once per loop turn: if buffers came back, wake everyone who waits for one.
    pub(crate) fn wake_waiters(&self) {
        if !self.returned.replace(false) {
            return;
        }
        let wakers: Vec<Waker> = {
            let mut w = self.waiters.borrow_mut();
            if w.is_empty() {
                return;
            }
            w.drain().collect()
        };
        for w in wakers {
            w.wake();
        }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: allocated (and mapped) in `new` with exactly these sizes. The driver guarantees that the
        // io_uring instance this ring was registered with is closed with no receive in flight
        // (or leaks this BufRing instead of dropping it).
        unsafe {
            alloc::dealloc(self.entries.as_ptr().cast(), self.entries_layout);
            libc::munmap(self.data.as_ptr().cast(), self.data_len);
        }
    }
}

/// Probe whether this kernel accepts provided-buffer rings (a 1-entry ring, unregistered again).
pub(crate) fn probe(ring: &IoUring) -> bool {
    match BufRing::new(ring, 1, 64, 0) {
        Ok(b) => {
            let ok = ring.submitter().unregister_buf_ring(BGID).is_ok();
            if ok {
                drop(b);
            } else {
                std::mem::forget(b);
            }
            true
        }
        Err(_) => false,
    }
}

/// A received buffer from the shard's provided-buffer ring.
pub struct RecvBuf {
    inner: Inner,
}

enum Inner {
    Ring {
        ring: Rc<BufRing>,
        bid: u16,
        start: u32,
        end: u32,
    },
    /// Fallback for kernels without buffer rings: an ordinary heap buffer.
    Owned { data: Vec<u8>, start: usize },
}

impl RecvBuf {
    /// Wrap buffer `bid` of `ring`, of which the kernel filled `len` bytes. None if the kernel's
    /// answer is out of range (then the buffer is recycled, if it is one of ours).
    pub(crate) fn from_ring(ring: &Rc<BufRing>, bid: u16, len: u32) -> Option<RecvBuf> {
        if bid >= ring.count || len > ring.buf_size {
            ring.recycle(bid);
            return None;
        }
        Some(RecvBuf {
            inner: Inner::Ring {
                ring: ring.clone(),
                bid,
                start: 0,
                end: len,
            },
        })
    }

    pub(crate) fn from_vec(data: Vec<u8>) -> RecvBuf {
        RecvBuf {
            inner: Inner::Owned { data, start: 0 },
        }
    }

    /// Drop the first `n` bytes (all of them if `n` is larger); the buffer goes back to the ring
    /// only when the `RecvBuf` is dropped.
    pub fn advance(&mut self, n: usize) {
        match &mut self.inner {
            Inner::Ring { start, end, .. } => {
                let n = u32::try_from(n).unwrap_or(u32::MAX);
                *start = start.saturating_add(n).min(*end);
            }
            Inner::Owned { data, start } => *start = start.saturating_add(n).min(data.len()),
        }
    }
}

impl Deref for RecvBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.inner {
            Inner::Ring {
                ring,
                bid,
                start,
                end,
            } => {
                // SAFETY: bid < count and start <= end <= buf_size (checked in from_ring and
                // advance). The kernel wrote these bytes before posting the CQE and will not touch
                // the buffer again until we recycle it in Drop; the allocation lives as long as
                // the Rc<BufRing> we hold.
                unsafe {
                    std::slice::from_raw_parts(
                        ring.buf_ptr(*bid).add(*start as usize),
                        (*end - *start) as usize,
                    )
                }
            }
            Inner::Owned { data, start } => &data[*start..],
        }
    }
}

impl Drop for RecvBuf {
    fn drop(&mut self) {
        if let Inner::Ring { ring, bid, .. } = &self.inner {
            ring.recycle(*bid);
        }
    }
}

impl std::fmt::Debug for RecvBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBuf").field("len", &self.len()).finish()
    }
}

impl IoBuf for RecvBuf {
    fn as_slice(&self) -> &[u8] {
        self
    }
}

/// Size, number and initial window of a shard's receive buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tuning {
    pub(crate) count: u16,
    pub(crate) size: u32,
    pub(crate) window: u16,
}

impl Tuning {
    /// The defaults for `ring_entries` (as many buffers as SQ entries, at least 64, at most
    /// [`MAX_BUFS`], of [`BUF_SIZE`]; window [`HOT_WINDOW`]), overridable for measurements through
    /// `MESHGATE_RT_RECV_BUF_KIB` (4..=1024), `MESHGATE_RT_RECV_BUFS` (a power of two,
    /// 1..=32768) and `MESHGATE_RT_RECV_WINDOW` (0 = publish every buffer). Out-of-range values
    /// are ignored with a warning.
    pub(crate) fn from_env(ring_entries: u32) -> Tuning {
        let by_pool = u32::try_from(POOL_MAX / u64::from(BUF_SIZE)).unwrap_or(MAX_BUFS);
        let count = ring_entries
            .clamp(64, MAX_BUFS.min(by_pool))
            .next_power_of_two();
        let mut t = Tuning {
            count: u16::try_from(count).expect("clamped to at most MAX_BUFS"),
            size: BUF_SIZE,
            window: HOT_WINDOW,
        };
        let var = |name: &str| -> Option<u32> {
            let v = std::env::var(name).ok()?;
            let parsed = v.trim().parse::<u32>().ok();
            if parsed.is_none() {
                tracing::warn!(name, value = %v, "rt: ignoring a non-numeric tuning variable");
            }
            parsed
        };
        if let Some(k) = var("MESHGATE_RT_RECV_BUF_KIB") {
            if (4..=1024).contains(&k) {
                t.size = k * 1024;
            } else {
                tracing::warn!(k, "rt: MESHGATE_RT_RECV_BUF_KIB must be 4..=1024; ignored");
            }
        }
        if let Some(n) = var("MESHGATE_RT_RECV_BUFS") {
            match u16::try_from(n) {
                Ok(n) if n.is_power_of_two() => t.count = n,
                _ => tracing::warn!(
                    n,
                    "rt: MESHGATE_RT_RECV_BUFS must be a power of two up to 32768; ignored"
                ),
            }
        }
        if let Some(w) = var("MESHGATE_RT_RECV_WINDOW") {
            t.window = u16::try_from(w).unwrap_or(0);
        }
        t
    }
}
