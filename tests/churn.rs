//! Connection churn through the real gateway (issue 9): 100,000 TCP connections through a `tcp`
//! listener, each closed normally (FIN), reset by the client (SO_LINGER 0 -> RST), or left idle
//! until the gateway's idle timeout closes it. Afterwards the gateway must hold exactly the file
//! descriptors it held before and about the same memory: nothing leaks per connection in the
//! runtime (ops, buffers, timers, tasks), the relay or the listener.
//!
//! The upstream answers one message and then closes first, and clients close only after the
//! gateway's FIN, so the TIME_WAIT sockets of 100,000 connections sit on the two listening ports
//! and not on ephemeral ports that later tests pick with `free_port()` (a tool such as
//! `openssl s_server` binds without SO_REUSEADDR and would fail on such a port for 60 s). Only
//! the idle-timeout connections, which the gateway closes, leave ephemeral TIME_WAITs.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use meshgate_testkit::{
    Meshgate, fd_count, free_port, metric_sum, raise_nofile_limit, rss_bytes, tcp_config,
    wait_until,
};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_meshgate"))
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

const THREADS: usize = 16;
/// Idle connections one client thread keeps open at a time while they wait for the timeout.
const IDLE_PER_THREAD: usize = 24;
const IDLE_TIMEOUT: &str = "1s";

/// An upstream that echoes one 32-byte message, then closes (it sends the first FIN). A
/// connection that sends nothing is held until the gateway closes it.
fn one_shot_echo() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind upstream");
    let a = l.local_addr().expect("addr");
    thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            let _ = thread::Builder::new().stack_size(64 * 1024).spawn(move || {
                let mut b = [0u8; 32];
                if c.read_exact(&mut b).is_ok() {
                    let _ = c.write_all(&b);
                }
            });
        }
    });
    a
}

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    closed: usize,
    reset: usize,
    timed_out: usize,
}

/// Close with RST instead of FIN.
fn reset(s: TcpStream) {
    let lg = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket we own, with a linger struct on our stack.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const lg).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
    drop(s);
}

fn connect(to: SocketAddr) -> TcpStream {
    // The gateway's backlog may overflow for a moment under this churn: retry briefly.
    let mut tries = 0;
    loop {
        match TcpStream::connect_timeout(&to, Duration::from_secs(5)) {
            Ok(s) => return s,
            Err(e) if tries < 50 => {
                tries += 1;
                eprintln!("connect retry: {e}");
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("connect {to}: {e}"),
        }
    }
}

/// The gateway closes an idle connection: the client sees EOF (or a reset), well within 10 s.
fn wait_closed_by_gateway(mut s: TcpStream) {
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let mut b = [0u8; 16];
    match s.read(&mut b) {
        Ok(0) => {}
        Ok(n) => panic!("idle connection got {n} bytes"),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("idle connection was not closed by the gateway: {e}"),
    }
}

/// `n` connections from THREADS client threads: 1 in 25 idles into the timeout, 8 in 25 reset,
/// the rest close normally; every non-idle one first echoes a message through the gateway.
fn churn(to: SocketAddr, n: usize) -> Counts {
    let per = n / THREADS;
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            thread::spawn(move || {
                let mut c = Counts::default();
                let mut idle: VecDeque<TcpStream> = VecDeque::new();
                let msg = [b'a' + (t % 26) as u8; 32];
                for k in 0..per {
                    let mut s = connect(to);
                    match k % 25 {
                        0 => {
                            idle.push_back(s);
                            if idle.len() > IDLE_PER_THREAD {
                                wait_closed_by_gateway(idle.pop_front().expect("non-empty"));
                                c.timed_out += 1;
                            }
                            continue;
                        }
                        kind => {
                            s.write_all(&msg).expect("write");
                            let mut got = [0u8; 32];
                            s.read_exact(&mut got).expect("echo through the gateway");
                            assert_eq!(got, msg);
                            if kind <= 8 {
                                reset(s);
                                c.reset += 1;
                            } else {
                                // The upstream closed after its echo: wait for the gateway's
                                // FIN, then close (FIN) ourselves.
                                s.set_read_timeout(Some(Duration::from_secs(10)))
                                    .expect("read timeout");
                                let mut rest = [0u8; 1];
                                let n = s.read(&mut rest).expect("EOF after the echo");
                                assert_eq!(n, 0, "no bytes after the echo");
                                drop(s);
                                c.closed += 1;
                            }
                        }
                    }
                }
                for s in idle {
                    wait_closed_by_gateway(s);
                    c.timed_out += 1;
                }
                c
            })
        })
        .collect();
    let mut total = Counts::default();
    for h in handles {
        let c = h.join().expect("client thread");
        total.closed += c.closed;
        total.reset += c.reset;
        total.timed_out += c.timed_out;
    }
    total
}

fn settled(mg: &Meshgate) -> bool {
    let m = mg.metrics();
    metric_sum(
        &m,
        "meshgate_listener_connections_active",
        &[("listener", "in")],
    ) == 0.0
        && metric_sum(&m, "meshgate_cluster_upstream_connections_active", &[]) == 0.0
}

#[test]
fn hundred_thousand_connections_close_reset_and_time_out_without_leaks() {
    let nofile = raise_nofile_limit();
    let need = (THREADS * (IDLE_PER_THREAD + 2) * 3 + 200) as u64;
    assert!(
        nofile >= need,
        "RLIMIT_NOFILE hard limit {nofile} < {need}; raise it to run this test"
    );
    let upstream = one_shot_echo();
    let admin = addr(free_port());
    let listen = addr(free_port());
    let cfg = tcp_config(
        admin,
        listen,
        &[upstream],
        &format!("idle_timeout = \"{IDLE_TIMEOUT}\""),
    );
    let mg = Meshgate::start(bin(), &cfg, admin).expect("gateway starts");
    let pid = mg.pid();
    let started = Instant::now();

    // Warm-up with the same mix: allocator arenas, slabs and buffer pools reach their
    // steady-state size here, so what is measured below is growth per connection.
    let warm = churn(listen, 5_000);
    assert!(wait_until(Duration::from_secs(15), || settled(&mg)));
    let fds_before = fd_count(pid);
    let rss_before = rss_bytes(pid);
    assert!(fds_before > 0 && rss_before > 0, "cannot read /proc/{pid}");

    let total = 100_000;
    let c = churn(listen, total);
    assert_eq!(c.closed + c.reset + c.timed_out, total);
    assert!(
        wait_until(Duration::from_secs(15), || settled(&mg)),
        "connections still open after the churn:\n{}",
        mg.metrics()
    );
    // Sockets close through the ring (behind cancels): give the last closes a moment.
    let fds_ok = wait_until(Duration::from_secs(5), || fd_count(pid) == fds_before);
    let fds_after = fd_count(pid);
    let rss_after = rss_bytes(pid);
    let m = mg.metrics();
    let timeouts = metric_sum(
        &m,
        "meshgate_listener_idle_timeouts_total",
        &[("listener", "in")],
    );
    eprintln!(
        "churn: {total} connections ({} closed, {} reset, {} idle-timed-out) in {:.1} s \
         (incl. {} warm-up); gateway fds {fds_before} -> {fds_after}, RSS {} -> {} KiB",
        c.closed,
        c.reset,
        c.timed_out,
        started.elapsed().as_secs_f64(),
        warm.closed + warm.reset + warm.timed_out,
        rss_before / 1024,
        rss_after / 1024,
    );
    assert!(fds_ok, "fd leak: {fds_before} before, {fds_after} after");
    assert!(
        timeouts >= (c.timed_out + warm.timed_out) as f64,
        "{timeouts} idle timeouts counted, {} expected",
        c.timed_out + warm.timed_out
    );
    // 100,000 connections: even 64 bytes leaked per connection would be 6 MiB.
    let growth = rss_after.saturating_sub(rss_before);
    assert!(
        growth < 4 * 1024 * 1024,
        "RSS grew by {} KiB over {total} connections",
        growth / 1024
    );
}
