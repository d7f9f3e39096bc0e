//! Connection churn must not leak file descriptors, ring ops, tasks, buffers or memory.
//! One test in its own binary: /proc/self/fd counts must not see other tests' sockets.

use std::time::{Duration, Instant};

use meshgate_dataplane::rt::{self, ListenOptions, TcpListener, TcpStream};

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").expect("procfs").count()
}

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").expect("procfs");
    let pages: u64 = s
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("statm rss");
    pages * 4
}

/// Heap bytes in use (all arenas) after handing free pages back to the kernel. glibc keeps freed
/// memory in its per-thread arenas: this test's 4 MiB sends (allocated with calloc, so every page
/// is touched) move into an arena once the dynamic mmap threshold has risen, and a run that has
/// ~100 of them alive at once leaves 60-190 MiB of *free* but resident arena memory behind
/// (`mallinfo2`: 187 MiB free, 0.2 MiB in use). `malloc_trim` releases those free pages, so RSS
/// only shows what is really held.
fn heap_in_use_kib_after_trim() -> u64 {
    // SAFETY: plain glibc calls without pointers; mallinfo2 returns a struct by value.
    let m = unsafe {
        libc::malloc_trim(0);
        libc::mallinfo2()
    };
    ((m.uordblks + m.hblkhd) / 1024) as u64
}

/// RSS that is neither free allocator memory (trimmed first) nor the shard's receive-buffer pool:
/// the pool's pages stay resident once a receive wrote them (until the runtime trims cold
/// buffers); that is bounded by the pool size, which the test checks separately.
fn rss_without_pool_kib() -> u64 {
    heap_in_use_kib_after_trim();
    rss_kib().saturating_sub((rt::shard_stats().recv_pool_resident_bytes / 1024) as u64)
}

/// Wait (bounded) until `f` holds; closes and cancels finish a loop turn or two later.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        rt::sleep(Duration::from_millis(2)).await;
    }
}

/// One round: a fresh listener, `n` connections that end in every way we know.
async fn churn(n: usize) {
    let l = TcpListener::bind(
        "127.0.0.1:0".parse().expect("addr"),
        &ListenOptions {
            reuseport: false,
            backlog: 1024,
        },
    )
    .expect("bind");
    let addr = l.local_addr().expect("addr");
    let server = rt::spawn(async move {
        let mut i = 0usize;
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            i += 1;
            let mode = i % 4;
            rt::spawn(async move {
                match mode {
                    // Echo until EOF.
                    0 | 1 => {
                        while let Ok(Some(b)) = s.recv_buf().await {
                            if s.write_all_owned(b).await.0.is_err() {
                                break;
                            }
                        }
                    }
                    // Drop a receive in flight after a while.
                    2 => {
                        let mut buf = [0u8; 3];
                        let _ = rt::timeout(Duration::from_millis(1), s.read(&mut buf)).await;
                    }
                    // Close at once.
                    _ => drop(s),
                }
            });
        }
    });
    let mut clients = Vec::new();
    for i in 0..n {
        clients.push(rt::spawn(async move {
            let Ok(mut c) = TcpStream::connect(addr).await else {
                return;
            };
            match i % 3 {
                0 => {
                    let _ = c.write_all(b"ping").await;
                    let mut b = [0u8; 4];
                    let _ = rt::timeout(Duration::from_millis(50), c.read(&mut b)).await;
                }
                1 => {
                    let (mut rd, mut wr) = c.into_split();
                    let _ = wr.write_all_owned(vec![1u8; 70_000]).await;
                    let _ = wr.shutdown_write().await;
                    let _ = rt::timeout(Duration::from_millis(50), rd.recv_buf()).await;
                }
                _ => {
                    // A large owned send dropped mid-flight, then the stream.
                    let _ = rt::timeout(
                        Duration::from_millis(2),
                        c.write_all_owned(vec![2u8; 4 << 20]),
                    )
                    .await;
                }
            }
        }));
    }
    for c in clients {
        c.await;
    }
    // Cancelling the accept loop drops the listener with its multishot accept in flight.
    server.cancel();
}

#[test]
fn connection_churn_leaks_nothing() {
    // One-off process-wide setup (the multishot-accept probe ring) happens on first use.
    rt::block_on(256, churn(20)).expect("runtime");
    let fds_before_shard = fd_count();
    rt::block_on(256, async {
        let base = rt::shard_stats();
        let fds = fd_count();
        churn(300).await;
        eventually("tasks finish", || rt::shard_stats().tasks == base.tasks).await;
        eventually("fds closed", || fd_count() == fds).await;
        eventually("ops collected", || {
            rt::shard_stats().ops_in_flight == base.ops_in_flight
        })
        .await;
        let s = rt::shard_stats();
        assert_eq!(s.recv_buffers_in_use, 0, "{s:?}");
        assert_eq!(s.timers, 0, "{s:?}");

        // Memory settles: after warm-up rounds (the allocator keeps freed memory for reuse),
        // more rounds must not grow RSS: a leak would grow with every round.
        for _ in 0..2 {
            churn(300).await;
        }
        eventually("warm-up ops collected", || {
            rt::shard_stats().ops_in_flight == base.ops_in_flight
        })
        .await;
        let rss = rss_without_pool_kib();
        let heap = heap_in_use_kib_after_trim();
        for _ in 0..4 {
            churn(300).await;
        }
        eventually("fds closed again", || fd_count() == fds).await;
        eventually("ops collected again", || {
            rt::shard_stats().ops_in_flight == base.ops_in_flight
        })
        .await;
        let grown = rss_without_pool_kib().saturating_sub(rss);
        let heap_grown = heap_in_use_kib_after_trim().saturating_sub(heap);
        let s = rt::shard_stats();
        assert!(
            grown < 16 * 1024 && heap_grown < 1024,
            "over 1200 connections RSS (without the buffer pool) grew by {grown} KiB, heap in use by {heap_grown} KiB; {s:?}"
        );
        let pool = s.recv_buffers_total as usize * s.recv_buffer_bytes as usize;
        assert!(
            s.recv_pool_resident_bytes <= pool,
            "the pool's resident pages are bounded by its size: {s:?}"
        );
        assert_eq!(s.recv_buffers_in_use, 0);
    })
    .expect("runtime");
    // The shard's own ring fd and eventfd are gone too.
    assert_eq!(fd_count(), fds_before_shard);
}
