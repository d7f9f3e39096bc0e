//! The origin every proxy forwards to: one epoll thread on the load core, either echoing what
//! it reads (round-trip scenarios) or discarding it (bulk upload). It counts the bytes it
//! receives, which is the work counter of the bulk scenarios.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

use anyhow::{Context, Result};

use crate::netio::{self, Epoll};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginMode {
    /// Write back everything read.
    Echo,
    /// Read and discard.
    Sink,
    /// Not this epoll origin: nginx serving HTTP ([`crate::http_origin`]).
    Http,
}

#[derive(Debug, Default)]
pub struct OriginCounters {
    pub bytes_in: AtomicU64,
    pub accepted: AtomicU64,
}

#[derive(Debug)]
pub struct Origin {
    pub addr: SocketAddr,
    pub counters: Arc<OriginCounters>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl Origin {
    /// Binds 127.0.0.1:0 and serves on a new thread (which inherits the caller's CPU pinning).
    pub fn start(mode: OriginMode) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the origin")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let counters = Arc::new(OriginCounters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new().name("origin".into()).spawn({
            let (counters, stop) = (counters.clone(), stop.clone());
            move || serve(listener, mode, &counters, &stop)
        })?;
        Ok(Self {
            addr,
            counters,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            match t.join() {
                Ok(Err(e)) => eprintln!("perf: origin stopped with an error: {e}"),
                Err(_) => eprintln!("perf: origin thread panicked"),
                Ok(Ok(())) => {}
            }
        }
    }
}

struct Conn {
    stream: TcpStream,
    /// Echo bytes the socket did not take yet; while non-empty we wait for EPOLLOUT and stop
    /// reading (backpressure).
    pending: Vec<u8>,
}

const LISTENER: u64 = u64::MAX;

fn serve(
    listener: TcpListener,
    mode: OriginMode,
    c: &OriginCounters,
    stop: &AtomicBool,
) -> io::Result<()> {
    let ep = Epoll::new()?;
    ep.add(&listener, LISTENER, netio::IN)?;
    let mut conns: Vec<Option<Conn>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut evbuf = netio::event_buf(256);
    let mut events = Vec::with_capacity(256);
    let mut buf = vec![0u8; 256 * 1024];
    while !stop.load(Ordering::Relaxed) {
        ep.wait(&mut evbuf, &mut events, 100)?;
        for ev in &events {
            if ev.token == LISTENER {
                loop {
                    match listener.accept() {
                        Ok((s, _)) => {
                            s.set_nonblocking(true)?;
                            s.set_nodelay(true)?;
                            let idx = free.pop().unwrap_or_else(|| {
                                conns.push(None);
                                conns.len() - 1
                            });
                            ep.add(&s, idx as u64, netio::IN | netio::RDHUP)?;
                            conns[idx] = Some(Conn {
                                stream: s,
                                pending: Vec::new(),
                            });
                            c.accepted.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
                        Err(e) => return Err(e),
                    }
                }
                continue;
            }
            let idx = ev.token as usize;
            let Some(conn) = conns.get_mut(idx).and_then(Option::as_mut) else {
                continue;
            };
            // An error ends only that connection.
            let keep = handle(conn, idx, ev.events, mode, c, &ep, &mut buf).unwrap_or(false);
            if !keep {
                if let Some(conn) = conns[idx].take() {
                    let _ = ep.delete(&conn.stream);
                }
                free.push(idx);
            }
        }
    }
    Ok(())
}

/// Returns false when the connection is finished.
fn handle(
    conn: &mut Conn,
    idx: usize,
    events: u32,
    mode: OriginMode,
    c: &OriginCounters,
    ep: &Epoll,
    buf: &mut [u8],
) -> io::Result<bool> {
    if !conn.pending.is_empty() {
        if events & netio::OUT != 0 {
            let n = write_some(&mut conn.stream, &conn.pending)?;
            conn.pending.drain(..n);
            if conn.pending.is_empty() {
                ep.modify(&conn.stream, idx as u64, netio::IN | netio::RDHUP)?;
            }
        }
        return Ok(events & netio::ERR == 0);
    }
    if events & (netio::IN | netio::RDHUP | netio::ERR) == 0 {
        return Ok(true);
    }
    let n = match conn.stream.read(buf) {
        Ok(0) => return Ok(false),
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
        Err(e) => return Err(e),
    };
    c.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
    if mode == OriginMode::Echo {
        let w = write_some(&mut conn.stream, &buf[..n])?;
        if w < n {
            conn.pending.extend_from_slice(&buf[w..n]);
            ep.modify(&conn.stream, idx as u64, netio::OUT | netio::RDHUP)?;
        }
    }
    Ok(true)
}

/// Writes as much as the socket takes now; WouldBlock counts as zero.
fn write_some(s: &mut TcpStream, data: &[u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < data.len() {
        match s.write(&data[done..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echoes_and_counts() -> Result<()> {
        let o = Origin::start(OriginMode::Echo)?;
        let mut s = TcpStream::connect(o.addr)?;
        s.write_all(b"hello")?;
        let mut got = [0u8; 5];
        s.read_exact(&mut got)?;
        assert_eq!(&got, b"hello");
        assert_eq!(o.counters.bytes_in.load(Ordering::Relaxed), 5);
        Ok(())
    }
}
