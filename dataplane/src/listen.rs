//! `listen::accept`: the first stage of a connection.
//!
//! One accept loop per listener per shard. For each connection it takes the shard's current
//! config generation (the connection keeps that generation until it ends), enforces the
//! listener's `max_connections` (counted across shards), counts, and hands the connection to its
//! protocol's pipeline as a task of this shard. A connection's bookkeeping is undone by
//! [`ConnGuard`] whatever way the task ends (normal close, error, drain deadline).

use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use meshgate_config::Protocol;

use crate::proxy;
use crate::rt;
use crate::shard::{Shard, ShardGen};

/// Accept connections on `sock` (the listener called `name`) until cancelled.
pub async fn accept_loop(shard: Rc<Shard>, name: String, sock: rt::TcpListener) {
    loop {
        let accepted = sock.accept().await;
        let Some(snap) = shard.current() else {
            continue;
        };
        let Some(idx) = snap.listener_index(&name) else {
            // Removed by a reload that this loop has not been cancelled for yet.
            continue;
        };
        let stats = &snap.listeners[idx].stats;
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                stats.accept_errors.inc();
                tracing::warn!(listener = %name, error = %e, "accept failed");
                // Out of descriptors or memory: back off instead of spinning.
                rt::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        stats.accepted.inc();
        let Some(guard) = ConnGuard::admit(&shard, &snap, idx) else {
            stats.limit_rejected.inc();
            stats.closed.inc();
            tracing::debug!(listener = %name, %peer, "connection limit reached; closing");
            drop(stream);
            continue;
        };
        match snap.config.listeners[idx].protocol {
            Protocol::Tcp | Protocol::Tls | Protocol::TlsPassthrough => {
                let task = proxy::tcp::serve(guard, stream, peer);
                note_task_size("tcp", size_of_val(&task));
                rt::spawn(task);
            }
            Protocol::Http => {
                let task = proxy::http::serve(guard, stream, peer);
                note_task_size("http", size_of_val(&task));
                rt::spawn(task);
            }
            Protocol::Https => {
                rt::spawn(proxy::http::serve_tls(guard, stream, peer));
            }
        }
    }
}

/// Log once per process how large a connection's task is: every idle connection pins one.
fn note_task_size(kind: &'static str, bytes: usize) {
    static TCP: std::sync::Once = std::sync::Once::new();
    static HTTP: std::sync::Once = std::sync::Once::new();
    let once = if kind == "tcp" { &TCP } else { &HTTP };
    once.call_once(|| tracing::debug!(kind, bytes, "connection task size (future, before boxing)"));
}

/// Holds a connection's slot in its listener's limit and in the shard's counts, and the
/// generation the connection runs on.
#[derive(Debug)]
pub struct ConnGuard {
    pub shard: Rc<Shard>,
    pub snap: Rc<ShardGen>,
    pub listener: usize,
    /// When the connection was accepted (for durations and access logs).
    pub accepted_at: Instant,
    pub start_time: SystemTime,
}

impl ConnGuard {
    fn admit(shard: &Rc<Shard>, snap: &Rc<ShardGen>, listener: usize) -> Option<ConnGuard> {
        let max = snap.config.listeners[listener].max_connections;
        let rt_l = &snap.listeners[listener];
        // A CAS loop: touched once per connection, never per byte.
        let mut cur = rt_l.conns.load(Ordering::Relaxed);
        loop {
            if cur >= max {
                return None;
            }
            match rt_l.conns.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(actual) => cur = actual,
            }
        }
        rt_l.stats.active.inc();
        shard.open.set(shard.open.get() + 1);
        Some(ConnGuard {
            shard: shard.clone(),
            snap: snap.clone(),
            listener,
            accepted_at: Instant::now(),
            start_time: SystemTime::now(),
        })
    }
}

impl ConnGuard {
    /// The generation a new request on this connection uses (HTTP keep-alive and HTTP/2): the
    /// shard's current one when it still has this connection's listener at the same index with
    /// the same name, protocol and address, so route, cluster and policy changes apply to open
    /// connections as they do to new ones; else the generation the connection started on.
    /// One `RefCell` borrow and a pointer compare per request.
    pub fn request_snap(&self) -> Rc<ShardGen> {
        if let Some(current) = self.shard.current()
            && !Rc::ptr_eq(&current, &self.snap)
            && let (Some(now), Some(was)) = (
                current.config.listeners.get(self.listener),
                self.snap.config.listeners.get(self.listener),
            )
            && now.name == was.name
            && now.protocol == was.protocol
            && now.address == was.address
        {
            return current;
        }
        self.snap.clone()
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let l = &self.snap.listeners[self.listener];
        l.conns.fetch_sub(1, Ordering::AcqRel);
        l.stats.active.dec();
        l.stats.closed.inc();
        self.shard.open.set(self.shard.open.get().saturating_sub(1));
    }
}
