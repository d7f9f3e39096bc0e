//! Built-in load generators: one epoll thread each, on the load core. Scenarios that need a
//! protocol we do not speak here (HTTP, TLS) will drive external tools (wrk, h2load) behind the
//! same [`Load`] trait instead.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::netio::{self, Epoll};
use crate::origin::OriginCounters;

/// A running load against one proxy. Work is cumulative from the start; the runner takes
/// differences over its windows.
pub trait Load {
    /// Units of work done so far (round trips, bytes delivered, requests...).
    fn work(&self) -> u64;
    /// Connections or operations that failed so far.
    fn errors(&self) -> u64;
    /// Starts a latency window (drops what was recorded before).
    fn begin_window(&self) {}
    /// Ends the latency window; `None` if this load does not measure latency.
    fn end_window(&self) -> Option<Latency> {
        None
    }
    /// Facts about the run for the report's notes (e.g. handshake kinds).
    fn notes(&self) -> Vec<String> {
        Vec::new()
    }
    /// Stops the load, closes its connections and reports a failure of its thread.
    fn stop(self: Box<Self>) -> Result<()>;
}

/// Latency percentiles of one window, in microseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Latency {
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub count: u64,
}

impl Latency {
    pub fn from_hist(h: &Histogram<u64>) -> Self {
        let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        Self {
            p50_us: us(0.5),
            p99_us: us(0.99),
            p999_us: us(0.999),
            count: h.len(),
        }
    }
}

#[derive(Debug, Default)]
struct Shared {
    stop: AtomicBool,
    work: AtomicU64,
    errors: AtomicU64,
}

enum HistCmd {
    Reset,
    Take(mpsc::Sender<Histogram<u64>>),
}

/// Common handle of a generator thread.
#[derive(Debug)]
struct GenThread {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl GenThread {
    fn stop(mut self) -> Result<()> {
        self.shared.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => bail!("load generator thread panicked"),
            None => Ok(()),
        }
    }
}

impl Drop for GenThread {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn connect_all(target: SocketAddr, n: usize) -> Result<Vec<TcpStream>> {
    (0..n)
        .map(|i| {
            let s = TcpStream::connect_timeout(&target, Duration::from_secs(5))
                .with_context(|| format!("connection {i} to {target}"))?;
            s.set_nodelay(true)?;
            s.set_nonblocking(true)?;
            Ok(s)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Request/response: N connections, each sends `msg` bytes and waits for `msg` bytes back.

#[derive(Debug)]
pub struct RoundTrips {
    gen_thread: GenThread,
    cmds: mpsc::Sender<HistCmd>,
}

impl RoundTrips {
    /// `conns` connections to `target`, each looping: send `msg` bytes, read `msg` bytes.
    pub fn start(target: SocketAddr, conns: usize, msg: usize) -> Result<Self> {
        let socks = connect_all(target, conns)?;
        let shared = Arc::new(Shared::default());
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new().name("load-rr".into()).spawn({
            let shared = shared.clone();
            move || rr_loop(socks, msg, &shared, &rx)
        })?;
        Ok(Self {
            gen_thread: GenThread {
                shared,
                thread: Some(thread),
            },
            cmds: tx,
        })
    }
}

impl Load for RoundTrips {
    fn work(&self) -> u64 {
        self.gen_thread.shared.work.load(Ordering::Relaxed)
    }
    fn errors(&self) -> u64 {
        self.gen_thread.shared.errors.load(Ordering::Relaxed)
    }
    fn begin_window(&self) {
        let _ = self.cmds.send(HistCmd::Reset);
    }
    fn end_window(&self) -> Option<Latency> {
        let (tx, rx) = mpsc::channel();
        self.cmds.send(HistCmd::Take(tx)).ok()?;
        rx.recv_timeout(Duration::from_secs(2))
            .ok()
            .map(|h| Latency::from_hist(&h))
    }
    fn stop(self: Box<Self>) -> Result<()> {
        self.gen_thread.stop()
    }
}

struct RrConn {
    stream: TcpStream,
    got: usize,
    sent: Instant,
    live: bool,
}

fn rr_loop(
    socks: Vec<TcpStream>,
    msg: usize,
    shared: &Shared,
    cmds: &mpsc::Receiver<HistCmd>,
) -> Result<()> {
    let ep = Epoll::new()?;
    let req = vec![b'q'; msg];
    let mut buf = vec![0u8; msg.max(4096)];
    // 1 ns .. 100 s, 3 significant digits.
    let mut hist = Histogram::<u64>::new_with_bounds(1, 100_000_000_000, 3)
        .map_err(|e| anyhow!("histogram: {e}"))?;
    let mut conns = Vec::with_capacity(socks.len());
    for (i, mut s) in socks.into_iter().enumerate() {
        ep.add(&s, i as u64, netio::IN | netio::RDHUP)?;
        s.write_all(&req).context("first request")?;
        conns.push(RrConn {
            stream: s,
            got: 0,
            sent: Instant::now(),
            live: true,
        });
    }
    let mut live = conns.len();
    let mut evbuf = netio::event_buf(conns.len().max(1));
    let mut events = Vec::with_capacity(conns.len());
    while !shared.stop.load(Ordering::Relaxed) {
        while let Ok(cmd) = cmds.try_recv() {
            match cmd {
                HistCmd::Reset => hist.reset(),
                HistCmd::Take(tx) => {
                    let _ = tx.send(hist.clone());
                }
            }
        }
        ep.wait(&mut evbuf, &mut events, 100)?;
        let mut done = 0u64;
        for ev in &events {
            let c = &mut conns[ev.token as usize];
            if !c.live {
                continue;
            }
            let ok = match c.stream.read(&mut buf) {
                Ok(0) => false,
                Ok(n) => {
                    c.got += n;
                    if c.got >= msg {
                        let now = Instant::now();
                        let _ = hist.record(now.duration_since(c.sent).as_nanos() as u64);
                        done += (c.got / msg) as u64;
                        c.got %= msg;
                        c.sent = now;
                        // `msg` bytes into an empty socket buffer: never short in practice;
                        // a short write counts as an error.
                        matches!(c.stream.write(&req), Ok(n) if n == msg)
                    } else {
                        true
                    }
                }
                Err(e) => e.kind() == io::ErrorKind::WouldBlock,
            };
            if !ok {
                c.live = false;
                let _ = ep.delete(&c.stream);
                shared.errors.fetch_add(1, Ordering::Relaxed);
                live -= 1;
            }
        }
        if done > 0 {
            shared.work.fetch_add(done, Ordering::Relaxed);
        }
        if live == 0 {
            bail!("every connection failed");
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Bulk upload: N connections write as fast as the proxy takes; the origin sinks and counts.

#[derive(Debug)]
pub struct BulkUpload {
    gen_thread: GenThread,
    origin: Arc<OriginCounters>,
}

impl BulkUpload {
    /// `conns` connections to `target`, each writing `chunk`-byte buffers without pause. Work
    /// is what the origin received, i.e. what made it through the proxy.
    pub fn start(
        target: SocketAddr,
        conns: usize,
        chunk: usize,
        origin: Arc<OriginCounters>,
    ) -> Result<Self> {
        Self::start_with(target, conns, &[], vec![b'b'; chunk], origin)
    }

    /// Like [`BulkUpload::start`], but each connection first sends `prefix` (e.g. a TLS
    /// ClientHello) and then `data` over and over (e.g. whole TLS records: partial writes
    /// resume where they stopped, so the stream stays well-formed).
    pub fn start_with(
        target: SocketAddr,
        conns: usize,
        prefix: &[u8],
        data: Vec<u8>,
        origin: Arc<OriginCounters>,
    ) -> Result<Self> {
        let mut socks = connect_all(target, conns)?;
        if !prefix.is_empty() {
            for s in &mut socks {
                s.set_nonblocking(false)?;
                s.write_all(prefix).context("sending the prefix")?;
                s.set_nonblocking(true)?;
            }
        }
        let shared = Arc::new(Shared::default());
        let thread = std::thread::Builder::new()
            .name("load-bulk".into())
            .spawn({
                let shared = shared.clone();
                move || bulk_loop(socks, data, &shared)
            })?;
        Ok(Self {
            gen_thread: GenThread {
                shared,
                thread: Some(thread),
            },
            origin,
        })
    }
}

impl Load for BulkUpload {
    fn work(&self) -> u64 {
        self.origin.bytes_in.load(Ordering::Relaxed)
    }
    fn errors(&self) -> u64 {
        self.gen_thread.shared.errors.load(Ordering::Relaxed)
    }
    fn stop(self: Box<Self>) -> Result<()> {
        self.gen_thread.stop()
    }
}

fn bulk_loop(socks: Vec<TcpStream>, data: Vec<u8>, shared: &Shared) -> Result<()> {
    let ep = Epoll::new()?;
    let mut live: Vec<bool> = vec![true; socks.len()];
    let mut off: Vec<usize> = vec![0; socks.len()];
    let mut socks = socks;
    for (i, s) in socks.iter().enumerate() {
        ep.add(s, i as u64, netio::OUT | netio::ET | netio::RDHUP)?;
    }
    let mut left = socks.len();
    let mut evbuf = netio::event_buf(socks.len().max(1));
    let mut events = Vec::with_capacity(socks.len());
    while !shared.stop.load(Ordering::Relaxed) {
        ep.wait(&mut evbuf, &mut events, 100)?;
        for ev in &events {
            let i = ev.token as usize;
            if !live[i] {
                continue;
            }
            let mut ok = ev.events & (netio::ERR | netio::RDHUP) == 0;
            // Edge-triggered: write until the socket is full.
            while ok {
                match socks[i].write(&data[off[i]..]) {
                    Ok(0) => ok = false,
                    Ok(n) => off[i] = (off[i] + n) % data.len(),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => ok = false,
                }
            }
            if !ok {
                live[i] = false;
                let _ = ep.delete(&socks[i]);
                shared.errors.fetch_add(1, Ordering::Relaxed);
                left -= 1;
            }
        }
        if left == 0 {
            bail!("every connection failed");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::origin::{Origin, OriginMode};

    fn wait_for(mut f: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    #[test]
    fn round_trips_against_echo() -> Result<()> {
        let o = Origin::start(OriginMode::Echo)?;
        let l = Box::new(RoundTrips::start(o.addr, 4, 64)?);
        l.begin_window();
        assert!(wait_for(|| l.work() > 100));
        let lat = l.end_window().expect("rr measures latency");
        assert!(lat.count > 0 && lat.p50_us > 0.0);
        assert_eq!(l.errors(), 0);
        l.stop()
    }

    #[test]
    fn bulk_into_sink() -> Result<()> {
        let o = Origin::start(OriginMode::Sink)?;
        let l = Box::new(BulkUpload::start(o.addr, 2, 64 * 1024, o.counters.clone())?);
        assert!(wait_for(|| l.work() > 10 << 20));
        assert_eq!(l.errors(), 0);
        l.stop()
    }
}
