//! Open-loop HTTP/1.1 load at a fixed rate, for latency: request `i` is due at `start + i /
//! rate` whatever happened to earlier ones, and its latency is measured from that intended send
//! time, not from when a connection became free. A slow response therefore shows up in the
//! latency of every request queued behind it (no coordinated omission, the flaw of closed-loop
//! tools; wrk2 fixes it the same way but is not packaged in Debian).
//!
//! One epoll thread, a fixed set of keep-alive connections with at most one request in flight
//! each, a `timerfd` armed at the next due time (hrtimer precision, no busy loop).

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use hdrhistogram::Histogram;

use crate::httpload::{request, response_len};
use crate::load::Latency;
use crate::netio::{self, Epoll};

/// CLOCK_MONOTONIC in nanoseconds (the clock timerfd uses).
fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the struct we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

struct Timer(OwnedFd);

impl Timer {
    fn new() -> io::Result<Self> {
        // SAFETY: no preconditions; a non-negative result is a new fd we own.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is new and owned by nobody else.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Fires once at absolute CLOCK_MONOTONIC time `at_ns`.
    fn arm(&self, at_ns: u64) -> io::Result<()> {
        let at = at_ns.max(1);
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: (at / 1_000_000_000) as libc::time_t,
                tv_nsec: (at % 1_000_000_000) as libc::c_long,
            },
        };
        // SAFETY: spec outlives the call; old value not requested.
        let r = unsafe {
            libc::timerfd_settime(
                self.0.as_raw_fd(),
                libc::TFD_TIMER_ABSTIME,
                &spec,
                std::ptr::null_mut(),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn drain(&self) {
        let mut b = [0u8; 8];
        // SAFETY: reads at most 8 bytes into b.
        unsafe { libc::read(self.0.as_raw_fd(), b.as_mut_ptr().cast(), 8) };
    }
}

impl AsRawFd for Timer {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

struct Conn {
    s: TcpStream,
    /// Intended send time of the request in flight.
    busy: Option<u64>,
    got: usize,
    buf: Vec<u8>,
}

/// Result of one open-loop run.
#[derive(Debug, Clone, Copy)]
pub struct OpenLoopResult {
    pub latency: Latency,
    /// Requests completed per second (should equal the rate when the target kept up).
    pub achieved: f64,
    /// Requests still queued or in flight at the end (the target fell behind).
    pub backlog: usize,
}

const TIMER: u64 = u64::MAX;

/// Sends `GET /<path>` to `target` at `rate` per second for `secs` over `conns` keep-alive
/// connections and returns latency percentiles from intended send times. `warmup_secs` of the
/// same load run first and are not recorded.
pub fn run(
    target: SocketAddr,
    path: &str,
    conns: usize,
    rate: f64,
    warmup_secs: f64,
    secs: f64,
) -> Result<OpenLoopResult> {
    if rate <= 0.0 {
        bail!("rate must be positive");
    }
    let ep = Epoll::new()?;
    let timer = Timer::new()?;
    ep.add(&timer, TIMER, netio::IN)?;
    let mut cs = Vec::with_capacity(conns);
    for i in 0..conns {
        let s = TcpStream::connect_timeout(&target, Duration::from_secs(5))
            .with_context(|| format!("connection {i} to {target}"))?;
        s.set_nodelay(true)?;
        s.set_nonblocking(true)?;
        ep.add(&s, i as u64, netio::IN | netio::RDHUP)?;
        cs.push(Conn {
            s,
            busy: None,
            got: 0,
            buf: vec![0u8; 64 * 1024],
        });
    }
    let req = request(path);
    let interval = 1e9 / rate;
    let start = now_ns() + 1_000_000;
    let record_from = start + (warmup_secs * 1e9) as u64;
    let end = record_from + (secs * 1e9) as u64;
    let mut hist = Histogram::<u64>::new_with_bounds(1, 100_000_000_000, 3)
        .map_err(|e| anyhow!("histogram: {e}"))?;
    let mut idle: Vec<usize> = (0..conns).rev().collect();
    let mut queue: VecDeque<u64> = VecDeque::new();
    let mut next_i: u64 = 0;
    let mut done_in_window = 0u64;
    let mut evbuf = netio::event_buf(conns + 1);
    let mut events = Vec::with_capacity(conns + 1);
    let send = |c: &mut Conn, due: u64| -> Result<()> {
        // A small request into an empty socket buffer is never short.
        match c.s.write(&req) {
            Ok(n) if n == req.len() => {
                c.busy = Some(due);
                c.got = 0;
                Ok(())
            }
            Ok(n) => bail!("short request write ({n} bytes)"),
            Err(e) => Err(e).context("sending a request"),
        }
    };
    loop {
        let now = now_ns();
        // Everything due by now joins the queue (the schedule never waits for responses).
        loop {
            let due = start + (next_i as f64 * interval) as u64;
            if due > now || due >= end {
                break;
            }
            queue.push_back(due);
            next_i += 1;
        }
        while let (Some(&due), Some(&i)) = (queue.front(), idle.last()) {
            queue.pop_front();
            idle.pop();
            send(&mut cs[i], due)?;
        }
        let next_due = start + (next_i as f64 * interval) as u64;
        if next_due >= end && queue.is_empty() && idle.len() == conns {
            break;
        }
        if now > end + 5_000_000_000 {
            break;
        }
        if next_due < end {
            timer.arm(next_due)?;
        }
        ep.wait(&mut evbuf, &mut events, 1000)?;
        for ev in &events {
            if ev.token == TIMER {
                timer.drain();
                continue;
            }
            let i = ev.token as usize;
            let c = &mut cs[i];
            loop {
                let n = match c.s.read(&mut c.buf[c.got..]) {
                    Ok(0) => bail!("connection {i} closed by the target"),
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e).context("reading a response"),
                };
                c.got += n;
                if let Some(total) = response_len(&c.buf[..c.got])?
                    && c.got >= total
                {
                    let t = now_ns();
                    if let Some(due) = c.busy.take()
                        && due >= record_from
                        && due < end
                    {
                        let _ = hist.record(t.saturating_sub(due).max(1));
                        done_in_window += 1;
                    }
                    c.got = 0;
                    idle.push(i);
                    break;
                }
            }
        }
    }
    let backlog = queue.len() + (conns - idle.len());
    Ok(OpenLoopResult {
        latency: Latency::from_hist(&hist),
        achieved: done_in_window as f64 / secs,
        backlog,
    })
}
