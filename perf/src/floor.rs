//! `uring-floor`: the least a userspace proxy on io_uring can cost here, as a reference column.
//!
//! A byte relay with no protocol work at all: every accepted connection gets one upstream
//! connection, and each direction loops `recv` into its own 16 KiB buffer then `send`s it on, all
//! as ring operations on one ring set up the way meshgate's runtime sets its own up
//! (`SINGLE_ISSUER | DEFER_TASKRUN | COOP_TASKRUN | TASKRUN_FLAG`), submitted in one batch per
//! loop turn. It does not parse, route, time out, log or count anything, so its CPU per request is
//! the kernel's TCP and io_uring work plus about a microsecond: what no proxy doing real work on
//! this kernel and machine can go below. The HTTP/1.1 keep-alive scenario runs it as a plain relay
//! (one upstream connection per client, which is what keep-alive reuse gives the real proxies).
//!
//! Run by the harness as `meshgate-perf __floor-relay LISTEN UPSTREAM`; not a product feature.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};

use anyhow::{Context, Result};
use io_uring::{IoUring, cqueue, opcode, squeue, types};

/// The hidden first argument that runs the relay instead of the harness.
pub const ARG: &str = "__floor-relay";

const BUF: usize = 16 * 1024;
const ACCEPT: u64 = u64::MAX;

/// One direction of a relayed connection: read from `from`, write to `to`.
struct Dir {
    from: RawFd,
    to: RawFd,
    buf: Box<[u8]>,
    /// Bytes received and not yet sent: `buf[sent..len]`.
    len: usize,
    sent: usize,
    in_flight: bool,
}

struct Pair {
    dirs: [Dir; 2],
    closing: bool,
}

/// `user_data`: slot index << 1 | direction.
fn ud(slot: usize, dir: usize) -> u64 {
    ((slot as u64) << 1) | dir as u64
}

pub fn main(listen: &str, upstream: &str) -> Result<()> {
    let listen: SocketAddr = listen.parse().context("listen address")?;
    let upstream: SocketAddr = upstream.parse().context("upstream address")?;
    let listener = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
    serve(&listener, upstream)
}

/// Relays every connection `listener` accepts to `upstream`, until an error.
fn serve(listener: &TcpListener, upstream: SocketAddr) -> Result<()> {
    let mut ring: IoUring = IoUring::builder()
        .setup_coop_taskrun()
        .setup_taskrun_flag()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(4096)
        .context("io_uring_setup with SINGLE_ISSUER | DEFER_TASKRUN")?;
    let mut pairs: Vec<Option<Box<Pair>>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let accept = opcode::AcceptMulti::new(types::Fd(listener.as_raw_fd()))
        .build()
        .user_data(ACCEPT);
    push(&mut ring, &accept)?;
    let mut cqes: Vec<cqueue::Entry> = Vec::with_capacity(1024);
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(e).context("io_uring_enter"),
        }
        cqes.clear();
        cqes.extend(ring.completion());
        for cqe in &cqes {
            if cqe.user_data() == ACCEPT {
                if cqe.result() >= 0 {
                    accepted(&mut ring, &mut pairs, &mut free, cqe.result(), upstream)?;
                }
                if !cqueue::more(cqe.flags()) {
                    push(&mut ring, &accept)?;
                }
                continue;
            }
            let slot = (cqe.user_data() >> 1) as usize;
            let dir = (cqe.user_data() & 1) as usize;
            completed(&mut ring, &mut pairs, &mut free, slot, dir, cqe.result())?;
        }
    }
}

fn push(ring: &mut IoUring, sqe: &squeue::Entry) -> Result<()> {
    // SAFETY: every buffer an SQE points at lives in a boxed `Pair` that is freed only once no
    // operation on it is in flight.
    while unsafe { ring.submission().push(sqe) }.is_err() {
        ring.submit().context("io_uring_enter")?;
    }
    Ok(())
}

fn accepted(
    ring: &mut IoUring,
    pairs: &mut Vec<Option<Box<Pair>>>,
    free: &mut Vec<usize>,
    client: RawFd,
    upstream: SocketAddr,
) -> Result<()> {
    let up = match TcpStream::connect(upstream) {
        Ok(s) => s,
        Err(_) => {
            // SAFETY: `client` is the accepted socket, owned here.
            unsafe { libc::close(client) };
            return Ok(());
        }
    };
    let _ = up.set_nodelay(true);
    set_nodelay(client);
    let up = up.into_raw_fd();
    let dir = |from, to| Dir {
        from,
        to,
        buf: vec![0; BUF].into_boxed_slice(),
        len: 0,
        sent: 0,
        in_flight: false,
    };
    let pair = Box::new(Pair {
        dirs: [dir(client, up), dir(up, client)],
        closing: false,
    });
    let slot = match free.pop() {
        Some(s) => {
            pairs[s] = Some(pair);
            s
        }
        None => {
            pairs.push(Some(pair));
            pairs.len() - 1
        }
    };
    for d in 0..2 {
        arm(ring, pairs, slot, d)?;
    }
    Ok(())
}

/// Queues the direction's next operation: the rest of a send, or a receive.
fn arm(ring: &mut IoUring, pairs: &mut [Option<Box<Pair>>], slot: usize, d: usize) -> Result<()> {
    let Some(pair) = pairs[slot].as_mut() else {
        return Ok(());
    };
    let dir = &mut pair.dirs[d];
    let sqe = if dir.sent < dir.len {
        let rest = &dir.buf[dir.sent..dir.len];
        opcode::Send::new(types::Fd(dir.to), rest.as_ptr(), rest.len() as u32).build()
    } else {
        dir.len = 0;
        dir.sent = 0;
        opcode::Recv::new(types::Fd(dir.from), dir.buf.as_mut_ptr(), BUF as u32).build()
    };
    dir.in_flight = true;
    push(ring, &sqe.user_data(ud(slot, d)))
}

fn completed(
    ring: &mut IoUring,
    pairs: &mut [Option<Box<Pair>>],
    free: &mut Vec<usize>,
    slot: usize,
    d: usize,
    res: i32,
) -> Result<()> {
    let Some(pair) = pairs[slot].as_mut() else {
        return Ok(());
    };
    let dir = &mut pair.dirs[d];
    dir.in_flight = false;
    let was_send = dir.sent < dir.len;
    if res > 0 && !pair.closing {
        let n = res as usize;
        if was_send {
            dir.sent += n;
        } else {
            dir.len = n;
        }
        return arm(ring, pairs, slot, d);
    }
    // EOF or an error on either direction ends the pair: shut both sockets down so the other
    // direction's pending receive completes, then close once nothing is in flight.
    if !pair.closing {
        pair.closing = true;
        for fd in [pair.dirs[0].from, pair.dirs[1].from] {
            // SAFETY: both descriptors are owned by the pair and still open.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
    }
    if pair.dirs.iter().all(|d| !d.in_flight) {
        for fd in [pair.dirs[0].from, pair.dirs[1].from] {
            // SAFETY: as above; nothing refers to them any more.
            unsafe { libc::close(fd) };
        }
        pairs[slot] = None;
        free.push(slot);
    }
    Ok(())
}

fn set_nodelay(fd: RawFd) {
    let one: libc::c_int = 1;
    // SAFETY: a valid socket and a c_int option value of the right size. A failure only makes
    // the reference slower, never wrong.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::time::Duration;

    use super::*;

    /// An upstream that echoes every byte back, one thread per connection.
    fn echo() -> Result<SocketAddr> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let addr = l.local_addr()?;
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let Ok(mut r) = s.try_clone() else { return };
                    let mut w = s;
                    let _ = std::io::copy(&mut r, &mut w);
                    let _ = w.shutdown(Shutdown::Write);
                });
            }
        });
        Ok(addr)
    }

    #[test]
    fn relays_both_ways_and_frees_connections() -> Result<()> {
        let upstream = echo()?;
        // Bound here, so connections queue until the relay's first accept.
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let listen = listener.local_addr()?;
        std::thread::spawn(move || serve(&listener, upstream));
        // Several connections in turn, so closed ones' slots are reused.
        for round in 0..3 {
            let mut c = TcpStream::connect(listen)?;
            c.set_read_timeout(Some(Duration::from_secs(10)))?;
            for i in 0..50 {
                let msg = format!("request {round}/{i}");
                c.write_all(msg.as_bytes())?;
                let mut got = vec![0; msg.len()];
                c.read_exact(&mut got)?;
                assert_eq!(got, msg.as_bytes());
            }
            // More than one buffer's worth in one go: partial sends are resumed.
            let big: Vec<u8> = (0..(5 * BUF)).map(|i| (i % 251) as u8).collect();
            let mut w = c.try_clone()?;
            let sent = big.clone();
            let writer = std::thread::spawn(move || w.write_all(&sent));
            let mut got = vec![0; big.len()];
            c.read_exact(&mut got)?;
            assert!(writer.join().is_ok_and(|r| r.is_ok()), "writing failed");
            assert!(got == big, "bytes changed on the way");
            // The client closing ends the pair: the relay closes the client side too.
            c.shutdown(Shutdown::Write)?;
            let mut rest = Vec::new();
            c.read_to_end(&mut rest)?;
            assert!(rest.is_empty());
        }
        Ok(())
    }
}
