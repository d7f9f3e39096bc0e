//! Per-shard pool of idle upstream HTTP/1.1 connections (`upstream::connect` for `http` routes).
//!
//! Where it sits: the HTTP proxy (`proxy::http`) picks a cluster and an endpoint, asks the pool
//! of its shard for an idle connection to that endpoint ([`Pool::take`]), else opens one
//! ([`connect`]); after a response whose framing left the connection clean it gives the
//! connection back ([`Pool::put`]). Anything doubtful (close-delimited body, bytes after the
//! body, an error, a request body not fully sent) drops the connection instead.
//!
//! One pool per shard (`Shard::http_pool`): `RefCell` state touched only by the shard's own
//! tasks, never across an `.await`; no locks. Bounded: at most [`MAX_IDLE_PER_KEY`] idle
//! connections per key (the oldest goes first), each at most [`IDLE_TIMEOUT`] old (checked when
//! the key is used, so a stale connection is never handed out; the upstream's own keep-alive
//! timeout is usually 60 s or more). An idle connection holds its socket and nothing else: no
//! receive is armed, so no buffer is pinned.
//!
//! The key is the endpoint today; [`PoolKey`] is where the upstream SNI and the gateway's own
//! identity go once HTTP routes originate TLS, so a connection is never shared across
//! identities.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::ProxyError;
use crate::metrics::ClusterStats;
use crate::rt;

/// Idle connections kept per key.
pub const MAX_IDLE_PER_KEY: usize = 32;
/// Longest time a connection may sit idle in the pool.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// What makes two upstream connections interchangeable.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub endpoint: SocketAddr,
    // Later: `sni: Option<Arc<str>>` and the client identity used for mTLS origination.
}

impl PoolKey {
    pub fn plain(endpoint: SocketAddr) -> Self {
        PoolKey { endpoint }
    }
}

/// An open upstream connection, split for full-duplex use. Counted in its cluster's active
/// gauge for as long as it lives (in use or idle in the pool).
#[derive(Debug)]
pub struct UpConn {
    pub rd: rt::ReadHalf,
    pub wr: rt::WriteHalf,
    /// Came from the pool (served a request before).
    pub reused: bool,
    stats: Arc<ClusterStats>,
}

impl UpConn {
    /// Count this connection under `stats` from now on (a pooled connection taken for another
    /// cluster with the same endpoint).
    fn rebind(&mut self, stats: &Arc<ClusterStats>) {
        if !Arc::ptr_eq(&self.stats, stats) {
            self.stats.active.dec();
            stats.active.inc();
            self.stats = stats.clone();
        }
    }
}

impl Drop for UpConn {
    fn drop(&mut self) {
        self.stats.active.dec();
    }
}

#[derive(Debug)]
struct Idle {
    conn: UpConn,
    since: Instant,
}

/// A shard's idle upstream connections.
#[derive(Debug, Default)]
pub struct Pool {
    idle: RefCell<HashMap<PoolKey, VecDeque<Idle>>>,
}

impl Pool {
    pub fn new() -> Self {
        Pool::default()
    }

    /// The most recently used idle connection for `key`, counted under `stats`. Connections
    /// idle longer than [`IDLE_TIMEOUT`] are closed on the way.
    pub fn take(&self, key: &PoolKey, stats: &Arc<ClusterStats>) -> Option<UpConn> {
        let mut idle = self.idle.borrow_mut();
        let list = idle.get_mut(key)?;
        let now = Instant::now();
        let found = loop {
            match list.pop_back() {
                None => break None,
                Some(entry) if now.duration_since(entry.since) < IDLE_TIMEOUT => break Some(entry),
                // The newest is too old, so all are: drop them.
                Some(_) => list.clear(),
            }
        };
        if list.is_empty() {
            idle.remove(key);
        }
        drop(idle);
        let mut conn = found?.conn;
        conn.rebind(stats);
        conn.reused = true;
        Some(conn)
    }

    /// Keep `conn` for the next request to `key`.
    pub fn put(&self, key: PoolKey, conn: UpConn) {
        let now = Instant::now();
        let mut idle = self.idle.borrow_mut();
        let list = idle.entry(key).or_default();
        while list
            .front()
            .is_some_and(|e| now.duration_since(e.since) >= IDLE_TIMEOUT)
        {
            list.pop_front();
        }
        if list.len() >= MAX_IDLE_PER_KEY {
            list.pop_front();
        }
        list.push_back(Idle { conn, since: now });
    }

    /// Idle connections held (all keys).
    #[cfg(test)]
    pub fn idle_count(&self) -> usize {
        self.idle.borrow().values().map(VecDeque::len).sum()
    }
}

/// Open a new connection to `endpoint` within `timeout`, counted under `stats`.
pub async fn connect(
    endpoint: SocketAddr,
    timeout: Duration,
    stats: &Arc<ClusterStats>,
) -> Result<UpConn, ProxyError> {
    match rt::timeout(timeout, rt::TcpStream::connect(endpoint)).await {
        Ok(Ok(stream)) => {
            stats.connects.inc();
            stats.active.inc();
            let (rd, wr) = stream.into_split();
            Ok(UpConn {
                rd,
                wr,
                reused: false,
                stats: stats.clone(),
            })
        }
        Ok(Err(e)) => {
            stats.connect_failures.inc();
            tracing::debug!(%endpoint, error = %e, "upstream connect failed");
            Err(ProxyError::upstream_connect(endpoint, e))
        }
        Err(rt::Elapsed) => {
            stats.connect_failures.inc();
            stats.connect_timeouts.inc();
            tracing::debug!(%endpoint, "upstream connect timed out");
            Err(ProxyError::upstream_connect(
                endpoint,
                io::Error::new(io::ErrorKind::TimedOut, "connect timed out"),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pair of connected sockets on a one-off shard; `f` gets the upstream side.
    fn on_shard<F: std::future::Future<Output = ()> + 'static>(f: impl FnOnce(SocketAddr) -> F) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepter = std::thread::spawn(move || {
            let mut kept = Vec::new();
            for _ in 0..2 {
                if let Ok((s, _)) = listener.accept() {
                    kept.push(s);
                }
            }
            kept
        });
        rt::block_on(64, f(addr)).expect("ring");
        drop(accepter.join());
    }

    #[test]
    fn lifo_reuse_bounds_and_gauge() {
        on_shard(|addr| async move {
            let stats = Arc::new(ClusterStats::default());
            let pool = Pool::new();
            let key = PoolKey::plain(addr);
            assert!(pool.take(&key, &stats).is_none());
            let a = connect(addr, Duration::from_secs(2), &stats)
                .await
                .expect("connect a");
            let b = connect(addr, Duration::from_secs(2), &stats)
                .await
                .expect("connect b");
            assert_eq!(stats.active.get(), 2);
            assert!(!a.reused);
            pool.put(key.clone(), a);
            pool.put(key.clone(), b);
            assert_eq!(pool.idle_count(), 2);
            let got = pool.take(&key, &stats).expect("pooled");
            assert!(got.reused);
            assert_eq!(pool.idle_count(), 1);
            // Taken for another cluster sharing the endpoint: the gauge moves with it.
            let other = Arc::new(ClusterStats::default());
            let moved = pool.take(&key, &other).expect("pooled");
            assert_eq!((stats.active.get(), other.active.get()), (1, 1));
            drop((got, moved));
            assert_eq!((stats.active.get(), other.active.get()), (0, 0));
            assert_eq!(pool.idle_count(), 0);
            assert!(pool.idle.borrow().is_empty(), "empty keys are removed");
        });
    }
}
