//! Cross-thread channel into a shard: a crossbeam queue plus the receiving task's waker.
//!
//! A send from the receiver's own shard just queues the task locally. A send from another
//! thread wakes the task through its shard's remote queue, which writes the shard's eventfd
//! only when the shard is parked in `io_uring_enter`: a busy shard costs the sender no syscall.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering, fence};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use crossbeam_channel::TryRecvError;

#[derive(Debug, Default)]
struct Shared {
    waker: Mutex<Option<Waker>>,
    /// The receiver has registered a waker and found the queue empty.
    waiting: AtomicBool,
    senders: AtomicUsize,
}

impl Shared {
    fn wake_receiver(&self) {
        fence(Ordering::SeqCst);
        if self.waiting.load(Ordering::Relaxed) && self.waiting.swap(false, Ordering::AcqRel) {
            let w = match self.waker.lock() {
                Ok(mut g) => g.take(),
                Err(poisoned) => poisoned.into_inner().take(),
            };
            if let Some(w) = w {
                w.wake();
            }
        }
    }
}

/// Cross-thread channel whose receiving end lives on a shard: `send` from any thread wakes it.
pub fn channel<T: Send + 'static>() -> (Sender<T>, Receiver<T>) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let shared = Arc::new(Shared {
        senders: AtomicUsize::new(1),
        ..Shared::default()
    });
    (
        Sender {
            tx,
            shared: shared.clone(),
        },
        Receiver { rx, shared },
    )
}

/// Sending half of [`channel`]; `Send + Sync` for `T: Send`.
#[derive(Debug)]
pub struct Sender<T> {
    tx: crossbeam_channel::Sender<T>,
    shared: Arc<Shared>,
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.shared.senders.fetch_add(1, Ordering::Relaxed);
        Sender {
            tx: self.tx.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<T: Send> Sender<T> {
    /// Err(msg) if the receiver is gone.
    pub fn send(&self, msg: T) -> Result<(), T> {
        self.tx.send(msg).map_err(|e| e.into_inner())?;
        self.shared.wake_receiver();
        Ok(())
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        if self.shared.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.wake_receiver();
        }
    }
}

/// Receiving half of [`channel`]; meant for one task at a time.
#[derive(Debug)]
pub struct Receiver<T> {
    rx: crossbeam_channel::Receiver<T>,
    shared: Arc<Shared>,
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        // Do not keep the receiving task (and its shard's eventfd) alive from the senders' side.
        let w = match self.shared.waker.lock() {
            Ok(mut g) => g.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        drop(w);
        self.shared.waiting.store(false, Ordering::Relaxed);
    }
}

impl<T: Send> Receiver<T> {
    /// None once every sender is dropped (and the queue is empty).
    pub async fn recv(&self) -> Option<T> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// Non-blocking receive.
    pub fn try_recv(&self) -> Option<T> {
        self.rx.try_recv().ok()
    }

    pub fn poll_recv(&self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        if let Poll::Ready(v) = self.take() {
            return Poll::Ready(v);
        }
        {
            let mut g = match self.shared.waker.lock() {
                Ok(g) => g,
                Err(poisoned) => poisoned.into_inner(),
            };
            match &mut *g {
                Some(w) => w.clone_from(cx.waker()),
                None => *g = Some(cx.waker().clone()),
            }
        }
        self.shared.waiting.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        let r = self.take();
        if r.is_ready() {
            self.shared.waiting.store(false, Ordering::Relaxed);
        }
        r
    }

    /// Ready(Some) = a message, Ready(None) = closed, Pending = empty.
    fn take(&self) -> Poll<Option<T>> {
        match self.rx.try_recv() {
            Ok(v) => Poll::Ready(Some(v)),
            Err(TryRecvError::Disconnected) => Poll::Ready(None),
            Err(TryRecvError::Empty) => {
                if self.shared.senders.load(Ordering::Acquire) == 0 {
                    Poll::Ready(self.rx.try_recv().ok())
                } else {
                    Poll::Pending
                }
            }
        }
    }
}
