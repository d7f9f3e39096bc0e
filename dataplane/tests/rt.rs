//! Tests of the io_uring runtime (`meshgate_dataplane::rt`) over real sockets on 127.0.0.1.

use std::cell::Cell;
use std::future::Future;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

use meshgate_dataplane::rt::{self, IoBuf, ListenOptions, ShardConfig, TcpListener, TcpStream};

fn run<F>(fut: F) -> F::Output
where
    F: Future + 'static,
    F::Output: 'static,
{
    rt::block_on(256, fut).expect("runtime starts")
}

fn opts() -> ListenOptions {
    ListenOptions {
        reuseport: false,
        backlog: 1024,
    }
}

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().expect("valid address")
}

/// Deterministic test payload.
fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Echo every connection (zero-copy: recv_buf -> write_all_owned), half-closing at EOF.
async fn echo_server(listener: TcpListener) {
    loop {
        let Ok((mut s, _peer)) = listener.accept().await else {
            continue;
        };
        rt::spawn(async move {
            loop {
                match s.recv_buf().await {
                    Ok(Some(buf)) => {
                        let (res, _buf) = s.write_all_owned(buf).await;
                        if res.is_err() {
                            return;
                        }
                    }
                    Ok(None) => {
                        let _ = s.shutdown_write().await;
                        return;
                    }
                    Err(_) => return,
                }
            }
        });
    }
}

/// Start an echo server shard; returns its address and a stop sender.
fn start_echo_shard(id: usize) -> (SocketAddr, rt::Sender<()>, rt::ShardHandle) {
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = rt::channel::<()>();
    let handle = rt::spawn_shard(
        ShardConfig {
            id,
            cpu: None,
            ring_entries: 256,
        },
        move || async move {
            let l = TcpListener::bind(localhost(), &opts()).expect("bind");
            addr_tx
                .send(l.local_addr().expect("addr"))
                .expect("test alive");
            let server = rt::spawn(echo_server(l));
            let _ = stop_rx.recv().await;
            server.cancel();
        },
    )
    .expect("shard starts");
    let addr = addr_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("server address");
    (addr, stop_tx, handle)
}

#[test]
fn check_reports_features() {
    let f = rt::check().expect("io_uring usable on the test host");
    let line = f.to_string();
    assert!(!line.is_empty());
    assert!(line.contains("accept"), "{line}");
    eprintln!("ring features: {line}");
}

#[test]
fn echo_many_concurrent_clients_with_checksums() {
    let (addr, stop, handle) = start_echo_shard(1);
    let clients = 500usize;
    let ok = run(async move {
        let mut tasks = Vec::new();
        for i in 0..clients {
            tasks.push(rt::spawn(async move {
                let len = 1 + (i * 7919) % 48_000;
                let data = payload(i as u64, len);
                let want = fnv(&data);
                let s = TcpStream::connect(addr).await.expect("connect");
                let (mut rd, mut wr) = s.into_split();
                let writer = rt::spawn(async move {
                    let (res, _) = wr.write_all_owned(data).await;
                    res.expect("write");
                    wr.shutdown_write().await.expect("shutdown");
                    wr
                });
                let mut got = Vec::with_capacity(len);
                while let Some(b) = rd.recv_buf().await.expect("recv") {
                    got.extend_from_slice(&b);
                }
                let _wr = writer.await;
                assert_eq!(got.len(), len, "client {i}");
                fnv(&got) == want
            }));
        }
        let mut ok = 0;
        for t in tasks {
            if t.await {
                ok += 1;
            }
        }
        ok
    });
    assert_eq!(ok, clients);
    stop.send(()).expect("server alive");
    handle.join().expect("server shard exits cleanly");
}

#[test]
fn half_close_then_read_the_rest() {
    run(async {
        let l = TcpListener::bind(localhost(), &opts()).expect("bind");
        let addr = l.local_addr().expect("addr");
        let server = rt::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            // Read everything until the client's FIN, then answer.
            let mut got = Vec::new();
            let mut buf = [0u8; 1000];
            loop {
                let n = s.read(&mut buf).await.expect("read");
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            let reply = format!("got {} bytes", got.len());
            s.write_all(reply.as_bytes()).await.expect("reply");
            s.shutdown_write().await.expect("fin");
            got
        });
        let mut c = TcpStream::connect(addr).await.expect("connect");
        let data = payload(7, 100_000);
        c.write_all(&data).await.expect("write");
        c.shutdown_write().await.expect("shutdown");
        let mut reply = Vec::new();
        let mut buf = [0u8; 7]; // small reads: exercises the kept remainder
        loop {
            let n = c.read(&mut buf).await.expect("read reply");
            if n == 0 {
                break;
            }
            reply.extend_from_slice(&buf[..n]);
        }
        assert_eq!(reply, b"got 100000 bytes");
        assert_eq!(server.await, data);
    });
}

#[test]
fn timeouts_and_sleeps_fire() {
    run(async {
        let t0 = Instant::now();
        let r = rt::timeout(Duration::from_millis(50), std::future::pending::<()>()).await;
        assert_eq!(r, Err(rt::Elapsed));
        let took = t0.elapsed();
        assert!(took >= Duration::from_millis(50), "{took:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");

        let r = rt::timeout(Duration::from_secs(5), async { 42 }).await;
        assert_eq!(r, Ok(42));

        // Sleeps in different tasks finish in deadline order.
        let order = Rc::new(std::cell::RefCell::new(Vec::new()));
        let mut hs = Vec::new();
        for ms in [60u64, 20, 40] {
            let order = order.clone();
            hs.push(rt::spawn(async move {
                rt::sleep(Duration::from_millis(ms)).await;
                order.borrow_mut().push(ms);
            }));
        }
        for h in hs {
            h.await;
        }
        assert_eq!(*order.borrow(), vec![20, 40, 60]);
        // A timer dropped early never fires anything.
        drop(rt::timeout(
            Duration::from_millis(1),
            std::future::pending::<()>(),
        ));
        rt::sleep(Duration::from_millis(5)).await;
    });
}

/// The loop parks with one ring timeout armed for the nearest deadline: a nearer timer added
/// while a far one is armed must replace it, and a timer that goes away early must not stop a
/// later one from firing (the armed timeout fires early, the loop re-arms).
#[test]
fn parked_shard_wakes_for_the_nearest_timer() {
    let (tx, rx) = rt::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let handle = rt::spawn_shard(
        ShardConfig {
            id: 11,
            cpu: None,
            ring_entries: 64,
        },
        move || async move {
            // Only a 30 s timer pending: the shard parks with a timeout armed for it.
            let far = rt::spawn(rt::sleep(Duration::from_secs(30)));
            ready_tx.send(rt::idle_counter()).expect("test alive");
            rx.recv().await.expect("test alive");
            // Woken by the channel; a 40 ms sleep must not wait for the 30 s timeout.
            let t0 = Instant::now();
            rt::sleep(Duration::from_millis(40)).await;
            let nearer = t0.elapsed();
            // Park with a 20 ms timeout armed, then drop that timer: a 60 ms sleep still ends
            // on time.
            let early = rt::spawn(rt::sleep(Duration::from_millis(20)));
            ready_tx.send(rt::idle_counter()).expect("test alive");
            rx.recv().await.expect("test alive");
            early.cancel();
            let t1 = Instant::now();
            rt::sleep(Duration::from_millis(60)).await;
            let later = t1.elapsed();
            far.cancel();
            done_tx
                .send((nearer, later, rt::shard_stats().ops_in_flight))
                .expect("test alive");
        },
    )
    .expect("shard");
    for _ in 0..2 {
        let idle = ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("shard ready");
        // Parked: its idle time grows (nothing but the message or a timer can wake it).
        let before = idle.idle();
        assert!(
            meshgate_testkit::wait_until(Duration::from_secs(5), || {
                idle.idle() > before + Duration::from_millis(2)
            }),
            "the shard parks"
        );
        tx.send(()).expect("shard alive");
    }
    let (nearer, later, ops) = done_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the shard woke for its timers");
    assert!(nearer >= Duration::from_millis(40), "{nearer:?}");
    assert!(nearer < Duration::from_secs(2), "{nearer:?}");
    assert!(later >= Duration::from_millis(60), "{later:?}");
    assert!(later < Duration::from_secs(2), "{later:?}");
    assert_eq!(ops, 0, "the wake-up timer is not an op in flight");
    drop(tx);
    handle.join().expect("shard exits");
}

#[test]
fn dropped_read_keeps_data_for_the_next_read() {
    run(async {
        let l = TcpListener::bind(localhost(), &opts()).expect("bind");
        let addr = l.local_addr().expect("addr");
        let mut c = TcpStream::connect(addr).await.expect("connect");
        let (mut s, _) = l.accept().await.expect("accept");
        let mut buf = [0u8; 64];
        // Nothing to read: the read future is dropped while its receive is in flight.
        assert!(
            rt::timeout(Duration::from_millis(20), s.read(&mut buf))
                .await
                .is_err()
        );
        c.write_all(b"hello").await.expect("write");
        let n = rt::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("data arrives")
            .expect("read");
        assert_eq!(&buf[..n], b"hello");
    });
}

#[test]
fn dropping_stream_with_read_in_flight_closes_socket() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let peer = std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut buf = [0u8; 16];
        // EOF (0) or a reset both mean the socket really closed; a timeout means it did not.
        match s.read(&mut buf) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    });
    run(async move {
        let mut c = TcpStream::connect(addr).await.expect("connect");
        let mut buf = [0u8; 16];
        {
            let read = c.read(&mut buf);
            let mut read = std::pin::pin!(read);
            // Poll once so the receive is in flight, then drop the future.
            std::future::poll_fn(|cx| {
                assert!(read.as_mut().poll(cx).is_pending());
                Poll::Ready(())
            })
            .await;
        }
        drop(c);
        // The close goes out with the next loop turn.
        rt::sleep(Duration::from_millis(10)).await;
    });
    assert!(peer.join().expect("peer thread"), "peer saw EOF");
}

#[test]
fn channel_from_foreign_thread_wakes_parked_shard() {
    let (tx, rx) = rt::channel::<u32>();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let handle = rt::spawn_shard(
        ShardConfig {
            id: 9,
            cpu: None,
            ring_entries: 64,
        },
        move || async move {
            let mut sum = 0;
            while let Some(v) = rx.recv().await {
                sum += v;
                done_tx.send((v, Instant::now())).expect("test alive");
            }
            done_tx.send((sum, Instant::now())).expect("test alive");
        },
    )
    .expect("shard");
    for v in 1..=3u32 {
        // Let the shard park in io_uring_enter (no timers, nothing runnable).
        std::thread::sleep(Duration::from_millis(50));
        let sent = Instant::now();
        tx.send(v).expect("receiver alive");
        let (got, at) = done_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("parked shard woke up");
        assert_eq!(got, v);
        assert!(at.duration_since(sent) < Duration::from_secs(1));
    }
    let tx2 = tx.clone();
    std::thread::spawn(move || tx2.send(10).expect("alive"))
        .join()
        .expect("sender thread");
    assert_eq!(
        done_rx.recv_timeout(Duration::from_secs(5)).expect("msg").0,
        10
    );
    drop(tx);
    // All senders gone: recv() returns None and the root task finishes.
    assert_eq!(
        done_rx.recv_timeout(Duration::from_secs(5)).expect("sum").0,
        16
    );
    handle.join().expect("shard exits");
}

#[test]
fn two_shards_with_reuseport_both_accept() {
    let counts: Arc<[AtomicUsize; 2]> = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
    let (port_tx, port_rx) = std::sync::mpsc::channel::<SocketAddr>();
    let mut stops = Vec::new();
    let mut handles = Vec::new();
    let mut addr: Option<SocketAddr> = None;
    for id in 0..2 {
        let (stop_tx, stop_rx) = rt::channel::<()>();
        let counts = counts.clone();
        let port_tx = port_tx.clone();
        let bind_to = addr.unwrap_or_else(localhost);
        let h = rt::spawn_shard(
            ShardConfig {
                id,
                cpu: rt::allowed_cpus().get(id).copied(),
                ring_entries: 128,
            },
            move || async move {
                let l = TcpListener::bind(
                    bind_to,
                    &ListenOptions {
                        reuseport: true,
                        backlog: 512,
                    },
                )
                .expect("bind with SO_REUSEPORT");
                port_tx.send(l.local_addr().expect("addr")).expect("alive");
                let acc = rt::spawn(async move {
                    loop {
                        if let Ok((s, _)) = l.accept().await {
                            counts[id].fetch_add(1, Ordering::SeqCst);
                            drop(s);
                        }
                    }
                });
                let _ = stop_rx.recv().await;
                acc.cancel();
            },
        )
        .expect("shard");
        let a = port_rx.recv_timeout(Duration::from_secs(5)).expect("bound");
        addr = Some(a);
        stops.push(stop_tx);
        handles.push(h);
    }
    let addr = addr.expect("bound");
    let total = 200;
    for _ in 0..total {
        let s = std::net::TcpStream::connect(addr).expect("connect");
        drop(s);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while counts[0].load(Ordering::SeqCst) + counts[1].load(Ordering::SeqCst) < total {
        assert!(Instant::now() < deadline, "not all connections accepted");
        std::thread::sleep(Duration::from_millis(5));
    }
    let (a, b) = (
        counts[0].load(Ordering::SeqCst),
        counts[1].load(Ordering::SeqCst),
    );
    assert!(a > 0 && b > 0, "both shards accept: {a} / {b}");
    for s in stops {
        s.send(()).expect("shard alive");
    }
    for h in handles {
        h.join().expect("shard exits");
    }
}

#[test]
fn accepted_sockets_are_nodelay_and_features_are_reported() {
    run(async {
        let f = rt::shard_features();
        eprintln!("shard ring: {f}");
        let l = TcpListener::bind(localhost(), &opts()).expect("bind");
        let addr = l.local_addr().expect("addr");
        let c = TcpStream::connect(addr).await.expect("connect");
        let (s, peer) = l.accept().await.expect("accept");
        assert_eq!(peer, c.local_addr().expect("local"));
        assert_eq!(s.peer_addr().expect("peer"), peer);
        assert!(
            s.nodelay().expect("getsockopt"),
            "accepted socket has TCP_NODELAY"
        );
        assert!(
            c.nodelay().expect("getsockopt"),
            "connected socket has TCP_NODELAY"
        );
    });
}

#[test]
fn connect_refused_is_an_error() {
    run(async {
        // Bind then drop to get a port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port");
        let e = TcpStream::connect(port).await.expect_err("refused");
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
    });
}

#[test]
fn join_handle_output_and_cancel() {
    struct Flag(Rc<Cell<bool>>);
    impl Drop for Flag {
        fn drop(&mut self) {
            self.0.set(true);
        }
    }
    run(async {
        assert_eq!(rt::spawn(async { 7 }).await, 7);
        let dropped = Rc::new(Cell::new(false));
        let flag = Flag(dropped.clone());
        let h = rt::spawn(async move {
            let _f = flag;
            std::future::pending::<()>().await;
        });
        rt::yield_now().await;
        assert!(!dropped.get());
        h.cancel();
        rt::sleep(Duration::from_millis(1)).await;
        assert!(dropped.get(), "cancel drops the task's future");

        // Detached tasks keep running.
        let ran = Rc::new(Cell::new(false));
        let r2 = ran.clone();
        drop(rt::spawn(async move {
            rt::sleep(Duration::from_millis(5)).await;
            r2.set(true);
        }));
        rt::sleep(Duration::from_millis(30)).await;
        assert!(ran.get());
    });
}

/// An owned buffer that records when the runtime lets go of it.
struct Tracked {
    data: Vec<u8>,
    dropped: Rc<Cell<bool>>,
}
impl IoBuf for Tracked {
    fn as_slice(&self) -> &[u8] {
        &self.data
    }
}
impl Drop for Tracked {
    fn drop(&mut self) {
        self.dropped.set(true);
    }
}

#[test]
fn dropped_write_keeps_buffer_until_the_kernel_is_done() {
    run(async {
        let l = TcpListener::bind(localhost(), &opts()).expect("bind");
        let addr = l.local_addr().expect("addr");
        let mut c = TcpStream::connect(addr).await.expect("connect");
        let (server_side, _) = l.accept().await.expect("accept");
        // The peer never reads: a large send stays in flight.
        let dropped = Rc::new(Cell::new(false));
        let buf = Tracked {
            data: vec![0x5a; 32 << 20],
            dropped: dropped.clone(),
        };
        let r = rt::timeout(Duration::from_millis(50), c.write_all_owned(buf)).await;
        assert!(r.is_err(), "send cannot finish: the peer does not read");
        // Cancelled; the buffer is released once the cancel's completion arrives.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !dropped.get() {
            assert!(Instant::now() < deadline, "buffer never released");
            rt::sleep(Duration::from_millis(1)).await;
        }
        drop(server_side);
        drop(c);
    });
}

#[test]
fn async_read_write_traits() {
    use futures_io::{AsyncRead, AsyncWrite};
    run(async {
        let l = TcpListener::bind(localhost(), &opts()).expect("bind");
        let addr = l.local_addr().expect("addr");
        let mut c = TcpStream::connect(addr).await.expect("connect");
        let (mut s, _) = l.accept().await.expect("accept");
        let data = payload(3, 300_000);
        let server = rt::spawn(async move {
            let mut got = Vec::new();
            let mut buf = vec![0u8; 4096];
            loop {
                let n = std::future::poll_fn(|cx| Pin::new(&mut s).poll_read(cx, &mut buf))
                    .await
                    .expect("poll_read");
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            got
        });
        let mut off = 0;
        while off < data.len() {
            let end = (off + 10_000).min(data.len());
            let n = std::future::poll_fn(|cx| Pin::new(&mut c).poll_write(cx, &data[off..end]))
                .await
                .expect("poll_write");
            assert!(n > 0);
            off += n;
        }
        std::future::poll_fn(|cx| Pin::new(&mut c).poll_flush(cx))
            .await
            .expect("flush");
        std::future::poll_fn(|cx| Pin::new(&mut c).poll_close(cx))
            .await
            .expect("close = flush + shutdown(SHUT_WR)");
        assert_eq!(server.await, data);
    });
}

#[test]
fn receive_waits_for_buffers_when_the_ring_is_dry() {
    // ring_entries 64 -> 64 provided buffers; hold them all, then one more receive must wait
    // (ENOBUFS) until a buffer comes back.
    rt::block_on(64, async {
        if !rt::shard_features().provided_buffer_rings {
            return;
        }
        let l = TcpListener::bind(localhost(), &opts()).expect("bind");
        let addr = l.local_addr().expect("addr");
        let mut clients = Vec::new();
        let mut servers = Vec::new();
        for _ in 0..65 {
            let mut c = TcpStream::connect(addr).await.expect("connect");
            c.write_all(b"x").await.expect("write");
            clients.push(c);
            servers.push(l.accept().await.expect("accept").0);
        }
        let mut held = Vec::new();
        for s in servers.iter_mut().take(64) {
            held.push(s.recv_buf().await.expect("recv").expect("data"));
        }
        let last = servers.last_mut().expect("65 servers");
        {
            let mut pending = std::pin::pin!(last.recv_buf());
            let r = rt::timeout(Duration::from_millis(100), pending.as_mut()).await;
            assert!(r.is_err(), "no buffer may be available");
            held.pop();
            let got = rt::timeout(Duration::from_secs(5), pending)
                .await
                .expect("a returned buffer unblocks the receive")
                .expect("recv")
                .expect("data");
            assert_eq!(&got[..], b"x");
        }
        drop(held);
    })
    .expect("runtime");
}

#[test]
fn shard_exit_drops_pending_tasks_and_closes_their_sockets() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let h = rt::spawn_shard(
        ShardConfig {
            id: 3,
            cpu: None,
            ring_entries: 64,
        },
        move || async move {
            let mut c = TcpStream::connect(addr).await.expect("connect");
            // A detached task that would wait forever on the socket.
            drop(rt::spawn(async move {
                let mut b = [0u8; 8];
                let _ = c.read(&mut b).await;
            }));
            rt::yield_now().await;
        },
    )
    .expect("shard");
    let (mut s, _) = l.accept().expect("accept");
    h.join().expect("shard exits");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut b = [0u8; 8];
    assert_eq!(s.read(&mut b).expect("eof"), 0);
    s.write_all(b"late").ok();
}

#[test]
fn busy_tasks_do_not_starve_io() {
    run(async {
        let l = TcpListener::bind(localhost(), &opts()).expect("bind");
        let addr = l.local_addr().expect("addr");
        let mut c = TcpStream::connect(addr).await.expect("connect");
        let (mut s, _) = l.accept().await.expect("accept");
        let stop = Rc::new(Cell::new(false));
        // A task that is always runnable: the loop never parks, so completions must still be
        // reaped (with DEFER_TASKRUN only an enter with GETEVENTS posts them).
        let spin = {
            let stop = stop.clone();
            rt::spawn(async move {
                while !stop.get() {
                    rt::yield_now().await;
                }
            })
        };
        let reader = rt::spawn(async move {
            let mut b = [0u8; 4];
            let n = s.read(&mut b).await.expect("read");
            b[..n].to_vec()
        });
        rt::yield_now().await;
        c.write_all(b"ping").await.expect("write");
        let got = rt::timeout(Duration::from_secs(5), reader)
            .await
            .expect("read completes while another task spins");
        assert_eq!(got, b"ping");
        stop.set(true);
        spin.await;
    });
}

/// Not a check: run under `strace -f -c` to count the server shard's syscalls per request
/// (`cargo test --release --test rt -- --ignored syscall_profile`). MESHGATE_PROFILE_CONNS sets
/// the number of concurrent ping-pong connections (default 1).
#[test]
#[ignore = "profiling aid, run by hand under strace"]
fn syscall_profile_echo_round_trips() {
    let (addr, stop, handle) = start_echo_shard(5);
    let conns: usize = std::env::var("MESHGATE_PROFILE_CONNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let per_conn = 20_000 / conns;
    let t0 = Instant::now();
    let threads: Vec<_> = (0..conns)
        .map(|_| {
            std::thread::spawn(move || {
                let mut c = std::net::TcpStream::connect(addr).expect("connect");
                c.set_nodelay(true).expect("nodelay");
                let mut b = [0u8; 64];
                for i in 0..per_conn {
                    let msg = [i as u8; 64];
                    c.write_all(&msg).expect("write");
                    c.read_exact(&mut b).expect("read");
                    assert_eq!(b, msg);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client");
    }
    eprintln!(
        "{} round trips on {conns} connections in {:?}",
        per_conn * conns,
        t0.elapsed()
    );
    stop.send(()).expect("server alive");
    handle.join().expect("server exits");
}

#[test]
fn concurrent_accepts_on_one_listener_and_drop_closes_it() {
    run(async {
        let std_l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = std_l.local_addr().expect("addr");
        let l = Rc::new(TcpListener::from_std(std_l).expect("adopt"));
        let accepted = Rc::new(Cell::new(0usize));
        let tasks: Vec<_> = (0..2)
            .map(|_| {
                let (l, accepted) = (l.clone(), accepted.clone());
                rt::spawn(async move {
                    loop {
                        let (s, _) = l.accept().await.expect("accept");
                        accepted.set(accepted.get() + 1);
                        drop(s);
                    }
                })
            })
            .collect();
        rt::yield_now().await;
        let mut clients = Vec::new();
        for _ in 0..20 {
            clients.push(TcpStream::connect(addr).await.expect("connect"));
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while accepted.get() < 20 {
            assert!(Instant::now() < deadline, "accepted {}", accepted.get());
            rt::sleep(Duration::from_millis(1)).await;
        }
        for t in tasks {
            t.cancel();
        }
        drop(l);
        // The listening socket really closes (after its multishot accept is cancelled).
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match TcpStream::connect(addr).await {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
                _ => {
                    assert!(Instant::now() < deadline, "listener still open");
                    rt::sleep(Duration::from_millis(2)).await;
                }
            }
        }
    });
}

/// After a burst that wrote many receive buffers, the cold ones are given back to the kernel:
/// with light traffic after it, the pool's resident size falls back to about the hot window
/// within a few trim periods (shortened to 1 s here; 10 s by default).
#[test]
fn cold_receive_buffers_are_released_after_a_burst() {
    rt::set_trim_period(Duration::from_secs(1));
    run(async {
        let l = TcpListener::bind(localhost(), &opts()).expect("bind");
        let addr = l.local_addr().expect("addr");
        let server = rt::spawn(echo_server(l));
        // 64 connections each push 1 MiB through the echo at once: the window grows and many
        // buffers get written.
        let mut clients = Vec::new();
        for i in 0..64u64 {
            clients.push(rt::spawn(async move {
                let s = TcpStream::connect(addr).await.expect("connect");
                let (mut rd, mut wr) = s.into_split();
                let data = payload(i, 1 << 20);
                let sum = fnv(&data);
                let writer = rt::spawn(async move {
                    let (res, _) = wr.write_all_owned(data).await;
                    res.expect("send");
                    wr.shutdown_write().await.expect("shutdown");
                });
                let mut got = Vec::with_capacity(1 << 20);
                while let Some(b) = rd.recv_buf().await.expect("recv") {
                    got.extend_from_slice(&b);
                }
                writer.await;
                assert_eq!(fnv(&got), sum, "echo of connection {i} intact");
            }));
        }
        for c in clients {
            c.await;
        }
        let s = rt::shard_stats();
        let buf = s.recv_buffer_bytes as usize;
        let burst = s.recv_pool_resident_bytes;
        assert!(
            burst > 16 * buf,
            "the burst wrote more than the hot window: {s:?}"
        );
        // Light traffic: one small echo every 20 ms.
        let mut c = TcpStream::connect(addr).await.expect("connect");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            c.write_all(b"ping").await.expect("ping");
            let mut b = [0u8; 4];
            let mut n = 0;
            while n < 4 {
                n += c.read(&mut b[n..]).await.expect("pong");
            }
            let s = rt::shard_stats();
            // The hot window (8 buffers, plus the few used within the last period) may stay;
            // everything else goes.
            if s.recv_pool_resident_bytes <= 16 * buf {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "resident pool still {} KiB (after the burst {} KiB): {s:?}",
                s.recv_pool_resident_bytes / 1024,
                burst / 1024
            );
            rt::sleep(Duration::from_millis(20)).await;
        }
        server.cancel();
    });
}
