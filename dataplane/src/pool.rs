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
//! The key is the endpoint plus, for clusters with `[clusters.tls]`, the TLS client settings
//! (the gateway identity presented, the upstream identities accepted, ALPN) and the SNI: a
//! connection is never shared across identities. TLS connections ([`connect`] with a
//! [`ClusterTlsState`]) are verified before the pool ever sees them.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::io;
use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::ClientConfig;
use rustls::pki_types::ServerName;

use crate::error::ProxyError;
use crate::metrics::ClusterStats;
use crate::proxy::http_io::{HttpRead, HttpWrite, TlsRead, TlsWrite, tls_split};
use crate::rt::{self, IoBuf};
use crate::tls::setup::ClusterTlsState;
use crate::tls::stream::ClientTlsStream;

/// Idle connections kept per key.
pub const MAX_IDLE_PER_KEY: usize = 1024;
/// Longest time a connection may sit idle in the pool.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// What makes two upstream connections interchangeable.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub endpoint: SocketAddr,
    /// TLS origination: the settings (identity presented, peers accepted) and the SNI.
    pub tls: Option<TlsKey>,
}

/// The TLS part of a [`PoolKey`]: the client configuration by identity (the key holds it, so
/// its address cannot be reused by another configuration while a connection is pooled) and
/// the server name sent.
#[derive(Debug, Clone)]
pub struct TlsKey {
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
}

impl PartialEq for TlsKey {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.config, &other.config) && self.server_name == other.server_name
    }
}

impl Eq for TlsKey {}

impl Hash for TlsKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (Arc::as_ptr(&self.config) as usize).hash(state);
        self.server_name.hash(state);
    }
}

impl PoolKey {
    #[cfg(test)]
    pub fn plain(endpoint: SocketAddr) -> Self {
        PoolKey {
            endpoint,
            tls: None,
        }
    }

    /// The key for `endpoint` of a cluster with (or without) TLS origination.
    pub fn new(endpoint: SocketAddr, tls: Option<&ClusterTlsState>) -> Self {
        PoolKey {
            endpoint,
            tls: tls.map(|t| TlsKey {
                config: t.client_config.clone(),
                server_name: t.server_name.clone(),
            }),
        }
    }
}

/// Receiving side of an upstream connection.
#[derive(Debug)]
pub enum UpRead {
    Plain(rt::ReadHalf),
    Tls(TlsRead<ClientTlsStream<rt::TcpStream>>),
}

/// Sending side of an upstream connection.
#[derive(Debug)]
pub enum UpWrite {
    Plain(rt::WriteHalf),
    Tls(TlsWrite<ClientTlsStream<rt::TcpStream>>),
}

/// Bytes received from an upstream.
#[derive(Debug)]
pub enum UpBuf {
    Ring(rt::RecvBuf),
    Owned(Vec<u8>),
}

impl Deref for UpBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            UpBuf::Ring(b) => b,
            UpBuf::Owned(b) => b,
        }
    }
}

impl IoBuf for UpBuf {
    fn as_slice(&self) -> &[u8] {
        self
    }
}

impl HttpRead for UpRead {
    type Buf = UpBuf;
    async fn recv_buf(&mut self) -> io::Result<Option<UpBuf>> {
        match self {
            UpRead::Plain(r) => Ok(r.recv_buf().await?.map(UpBuf::Ring)),
            UpRead::Tls(r) => Ok(r.recv_buf().await?.map(UpBuf::Owned)),
        }
    }
}

impl HttpWrite for UpWrite {
    async fn write_all_owned<B: IoBuf>(&mut self, buf: B) -> (io::Result<()>, B) {
        match self {
            UpWrite::Plain(w) => w.write_all_owned(buf).await,
            UpWrite::Tls(w) => HttpWrite::write_all_owned(w, buf).await,
        }
    }
    async fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            UpWrite::Plain(w) => w.write_all(buf).await,
            UpWrite::Tls(w) => HttpWrite::write_all(w, buf).await,
        }
    }
    async fn shutdown_write(&mut self) -> io::Result<()> {
        match self {
            UpWrite::Plain(w) => w.shutdown_write().await,
            UpWrite::Tls(w) => HttpWrite::shutdown_write(w).await,
        }
    }
}

/// An open upstream connection, split for full-duplex use. Counted in its cluster's active
/// gauge for as long as it lives (in use or idle in the pool).
#[derive(Debug)]
pub struct UpConn {
    pub rd: UpRead,
    pub wr: UpWrite,
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
        let now = rt::now();
        let found = loop {
            match list.pop_back() {
                None => break None,
                Some(entry) if now.duration_since(entry.since) < IDLE_TIMEOUT => break Some(entry),
                // The newest is too old, so all are: drop them.
                Some(_) => list.clear(),
            }
        };
        // An emptied plain list stays (its allocation is reused by the next `put`); a TLS key
        // goes, so that it does not keep a replaced client configuration alive.
        if list.is_empty() && key.tls.is_some() {
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
        let now = rt::now();
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

/// Open a new connection to `endpoint` within `timeout` (TCP connect and, with `tls`, the
/// verified TLS handshake), counted under `stats`. A TLS upstream that picks an ALPN
/// protocol other than `http/1.1` is refused: this pool speaks HTTP/1.1.
pub async fn connect(
    endpoint: SocketAddr,
    timeout: Duration,
    stats: &Arc<ClusterStats>,
    tls: Option<&ClusterTlsState>,
) -> Result<UpConn, ProxyError> {
    let (rd, wr) = match connect_io(endpoint, timeout, stats, tls, b"http/1.1").await? {
        UpStream::Plain(stream) => {
            let (rd, wr) = stream.into_split();
            (UpRead::Plain(rd), UpWrite::Plain(wr))
        }
        UpStream::Tls(stream) => {
            let (rd, wr) = tls_split(*stream);
            (UpRead::Tls(rd), UpWrite::Tls(wr))
        }
    };
    stats.connects.inc();
    stats.active.inc();
    Ok(UpConn {
        rd,
        wr,
        reused: false,
        stats: stats.clone(),
    })
}

/// An upstream connection as one byte stream (what the HTTP/2 client runs over).
#[derive(Debug)]
pub enum UpStream {
    Plain(rt::TcpStream),
    /// Boxed: a rustls session is large and plain streams are the common case.
    Tls(Box<ClientTlsStream<rt::TcpStream>>),
}

impl futures_io::AsyncRead for UpStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut [u8],
    ) -> std::task::Poll<io::Result<usize>> {
        match self.get_mut() {
            UpStream::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            UpStream::Tls(s) => std::pin::Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl futures_io::AsyncWrite for UpStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        match self.get_mut() {
            UpStream::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            UpStream::Tls(s) => std::pin::Pin::new(&mut **s).poll_write(cx, buf),
        }
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            UpStream::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            UpStream::Tls(s) => std::pin::Pin::new(&mut **s).poll_flush(cx),
        }
    }
    fn poll_close(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            UpStream::Plain(s) => std::pin::Pin::new(s).poll_close(cx),
            UpStream::Tls(s) => std::pin::Pin::new(&mut **s).poll_close(cx),
        }
    }
}

/// TCP connect and, with `tls`, the verified TLS handshake, within `timeout`. `protocol`: the
/// ALPN ID the connection must speak; a TLS upstream that picks another is refused (an
/// upstream that picks none is taken for HTTP/1.1 only). Failures are counted under `stats`;
/// success is counted by the caller.
pub async fn connect_io(
    endpoint: SocketAddr,
    timeout: Duration,
    stats: &Arc<ClusterStats>,
    tls: Option<&ClusterTlsState>,
    protocol: &[u8],
) -> Result<UpStream, ProxyError> {
    let deadline = Instant::now() + timeout;
    match rt::timeout(timeout, rt::TcpStream::connect(endpoint)).await {
        Ok(Ok(stream)) => match tls {
            None => Ok(UpStream::Plain(stream)),
            Some(tls) => {
                let left = deadline.saturating_duration_since(Instant::now());
                let handshake = crate::tls::stream::connect(
                    stream,
                    tls.client_config.clone(),
                    tls.server_name.clone(),
                );
                let failed = |what: String, timed_out: bool| {
                    stats.connect_failures.inc();
                    if timed_out {
                        stats.connect_timeouts.inc();
                    }
                    tracing::debug!(%endpoint, problem = %what, "upstream TLS failed");
                    let kind = if timed_out {
                        io::ErrorKind::TimedOut
                    } else {
                        io::ErrorKind::ConnectionRefused
                    };
                    ProxyError::upstream_connect(endpoint, io::Error::new(kind, what))
                };
                let stream = match rt::timeout(left, handshake).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => return Err(failed(format!("TLS: {e}"), false)),
                    Err(rt::Elapsed) => {
                        return Err(failed("TLS handshake timed out".to_owned(), true));
                    }
                };
                let alpn = stream.get_ref().1.alpn_protocol();
                let refused = match alpn {
                    Some(p) => p != protocol,
                    None => protocol != b"http/1.1",
                };
                if refused {
                    return Err(failed(
                        format!(
                            "upstream chose ALPN {:?}; this cluster speaks {} upstream",
                            String::from_utf8_lossy(alpn.unwrap_or_default()),
                            String::from_utf8_lossy(protocol),
                        ),
                        false,
                    ));
                }
                Ok(UpStream::Tls(Box::new(stream)))
            }
        },
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
            let a = connect(addr, Duration::from_secs(2), &stats, None)
                .await
                .expect("connect a");
            let b = connect(addr, Duration::from_secs(2), &stats, None)
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
            // A plain key keeps its emptied list (no allocation on the next put); only one.
            assert!(pool.idle.borrow().values().all(VecDeque::is_empty));
            assert_eq!(pool.idle.borrow().len(), 1);
        });
    }
}
