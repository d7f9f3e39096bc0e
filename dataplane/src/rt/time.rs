//! Timers, kept in userspace: an ordered map of deadlines. A parked loop is woken for the
//! nearest one by a single ring timeout kept armed across turns (`Driver::arm_wake_timer`); no
//! timer of its own ever costs a syscall or an SQE.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use super::driver::Driver;
use super::executor::current;

thread_local! {
    /// The shard's clock as read once per loop turn (after the ring wait); None outside a shard.
    static TURN_NOW: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// The time the current loop turn started (read once per turn, after the ring wait), so the
/// tasks of a turn share one clock read. It lags the clock by at most one turn's work: use it
/// for deadlines and durations, not where a few microseconds matter. Outside a shard, the
/// clock itself.
#[inline]
pub fn now() -> Instant {
    TURN_NOW
        .try_with(Cell::get)
        .ok()
        .flatten()
        .unwrap_or_else(Instant::now)
}

/// Set (or, with None, clear) the current turn's time; the executor calls this once per turn.
pub(crate) fn set_turn_now(t: Option<Instant>) {
    let _ = TURN_NOW.try_with(|n| n.set(t));
}

#[derive(Debug, Default)]
pub(crate) struct Timers {
    map: RefCell<BTreeMap<(Instant, u64), Waker>>,
    seq: Cell<u64>,
}

impl Timers {
    fn insert(&self, deadline: Instant, waker: &Waker) -> u64 {
        let key = self.seq.get().wrapping_add(1);
        self.seq.set(key);
        self.map.borrow_mut().insert((deadline, key), waker.clone());
        key
    }

    /// Refresh the waker; false if the timer already fired.
    fn update(&self, deadline: Instant, key: u64, waker: &Waker) -> bool {
        match self.map.borrow_mut().get_mut(&(deadline, key)) {
            Some(w) => {
                if !w.will_wake(waker) {
                    w.clone_from(waker);
                }
                true
            }
            None => false,
        }
    }

    fn remove(&self, deadline: Instant, key: u64) {
        let w = self.map.borrow_mut().remove(&(deadline, key));
        drop(w);
    }

    pub(crate) fn len(&self) -> usize {
        self.map.borrow().len()
    }

    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.map.borrow().first_key_value().map(|((d, _), _)| *d)
    }

    /// Wake every timer due at `now`.
    pub(crate) fn fire(&self, now: Instant) {
        loop {
            let w = {
                let mut map = self.map.borrow_mut();
                match map.first_entry() {
                    Some(e) if e.key().0 <= now => e.remove(),
                    _ => return,
                }
            };
            w.wake();
        }
    }

    pub(crate) fn clear(&self) {
        let map = std::mem::take(&mut *self.map.borrow_mut());
        drop(map);
    }
}

/// Completes after `d`.
pub fn sleep(d: Duration) -> Sleep {
    sleep_until(deadline_after(Instant::now(), d))
}

/// `start + d`, or 30 years from `start` when that overflows (a "never" duration).
fn deadline_after(start: Instant, d: Duration) -> Instant {
    start
        .checked_add(d)
        .unwrap_or(start + Duration::from_secs(86400 * 365 * 30))
}

/// Completes at `deadline`.
pub fn sleep_until(deadline: Instant) -> Sleep {
    Sleep {
        deadline,
        reg: None,
    }
}

/// Future returned by [`sleep`].
pub struct Sleep {
    deadline: Instant,
    reg: Option<(Rc<Driver>, u64)>,
}

impl std::fmt::Debug for Sleep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sleep")
            .field("deadline", &self.deadline)
            .field("registered", &self.reg.is_some())
            .finish()
    }
}

impl Sleep {
    pub fn deadline(&self) -> Instant {
        self.deadline
    }
}

impl Future for Sleep {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if let Some((drv, key)) = &this.reg {
            if drv.timers.update(this.deadline, *key, cx.waker()) {
                return Poll::Pending;
            }
            this.reg = None;
            return Poll::Ready(());
        }
        // The turn's clock lags, so a due timer may register once more and fire at the end of
        // this turn (the executor fires timers with a fresh clock read): never early.
        if now() >= this.deadline {
            return Poll::Ready(());
        }
        let drv = current();
        let key = drv.timers.insert(this.deadline, cx.waker());
        this.reg = Some((drv, key));
        Poll::Pending
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        if let Some((drv, key)) = self.reg.take() {
            drv.timers.remove(self.deadline, key);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("timed out")]
pub struct Elapsed;

/// Run `f` for at most `d`, counted from the current loop turn's clock ([`now`]: no clock read
/// per call; the limit may end up to one turn's work early, which no I/O timeout notices).
pub async fn timeout<F: Future>(d: Duration, f: F) -> Result<F::Output, Elapsed> {
    let mut f = std::pin::pin!(f);
    let mut s = sleep_until(deadline_after(now(), d));
    std::future::poll_fn(|cx| {
        if let Poll::Ready(v) = f.as_mut().poll(cx) {
            return Poll::Ready(Ok(v));
        }
        if Pin::new(&mut s).poll(cx).is_ready() {
            return Poll::Ready(Err(Elapsed));
        }
        Poll::Pending
    })
    .await
}
