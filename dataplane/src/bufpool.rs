//! Per-shard spare byte vectors for the HTTP/1 hot path: the head being read, the upstream
//! request head, the response head and the response buffer of an exchange.
//!
//! Where it sits: `proxy::http` takes a vector here instead of allocating one per request and
//! gives it back when the request is done with it (a connection going idle gives its head
//! buffer back, so an idle connection still holds no buffer). Thread-local (one shard per
//! thread), no locks; bounded: at most [`MAX_SPARE`] vectors of at most [`MAX_CAPACITY`] bytes
//! each are kept, anything else is freed as before.

use std::cell::RefCell;

/// Vectors kept per shard: enough for 64 requests in flight with their four vectors each (a
/// profile at 64 connections still showed malloc with 64); at most 4 MiB, typically ~1 KiB each.
const MAX_SPARE: usize = 256;
/// Larger vectors (a huge head, a large response buffer) are freed, not kept.
const MAX_CAPACITY: usize = 16 * 1024;

thread_local! {
    static SPARE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// An empty vector with room for at least `capacity` bytes: a spare one if the shard has one.
#[inline]
pub(crate) fn take(capacity: usize) -> Vec<u8> {
    let mut v = SPARE
        .try_with(|s| s.borrow_mut().pop())
        .ok()
        .flatten()
        .unwrap_or_default();
    v.reserve(capacity);
    v
}

/// Give `v` back for a later [`take`] (its contents are dropped).
#[inline]
pub(crate) fn give(mut v: Vec<u8>) {
    let cap = v.capacity();
    if cap == 0 || cap > MAX_CAPACITY {
        return;
    }
    v.clear();
    let _ = SPARE.try_with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < MAX_SPARE {
            s.push(v);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_come_back_empty_and_bounded() {
        let mut v = take(100);
        assert!(v.capacity() >= 100);
        v.extend_from_slice(b"old bytes");
        let ptr = v.as_ptr();
        give(v);
        let again = take(10);
        assert!(again.is_empty(), "a spare vector is handed out empty");
        assert_eq!(again.as_ptr(), ptr, "the spare vector is reused");
        give(again);
        // Too large to keep.
        give(Vec::with_capacity(MAX_CAPACITY + 1));
        assert!(take(0).capacity() <= MAX_CAPACITY);
        for _ in 0..MAX_SPARE * 2 {
            give(Vec::with_capacity(64));
        }
        assert!(SPARE.with(|s| s.borrow().len()) <= MAX_SPARE);
    }
}
