//! `listen::accept`: the first stage of a connection.
//!
//! One accept loop per listener per shard. It enforces the listener's `max_connections` (counted
//! across shards), counts, and hands each admitted connection to its protocol's pipeline as a
//! task of this shard. A connection's bookkeeping is undone by [`ConnGuard`] whatever way the
//! task ends (normal close, error, drain deadline).

use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use meshgate_config::Protocol;

use crate::proxy;
use crate::rt;
use crate::shard::Shard;

/// Accept connections on `sock` (listener `idx` of the config) until cancelled.
pub async fn accept_loop(shard: Rc<Shard>, idx: usize, sock: rt::TcpListener) {
    let listener = &shard.config.listeners[idx];
    let stats = &shard.stats.listeners[idx];
    loop {
        let (stream, peer) = match sock.accept().await {
            Ok(x) => x,
            Err(e) => {
                stats.accept_errors.inc();
                tracing::warn!(listener = %listener.name, error = %e, "accept failed");
                // Out of descriptors or memory: back off instead of spinning.
                rt::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        stats.accepted.inc();
        let Some(guard) = ConnGuard::admit(&shard, idx) else {
            stats.limit_rejected.inc();
            stats.closed.inc();
            tracing::debug!(listener = %listener.name, %peer, "connection limit reached; closing");
            drop(stream);
            continue;
        };
        match listener.protocol {
            Protocol::Tcp => {
                rt::spawn(proxy::tcp::serve(guard, stream, peer));
            }
        }
    }
}

/// Holds a connection's slot in its listener's limit and in the shard's counts.
#[derive(Debug)]
pub struct ConnGuard {
    pub shard: Rc<Shard>,
    pub listener: usize,
}

impl ConnGuard {
    fn admit(shard: &Rc<Shard>, listener: usize) -> Option<ConnGuard> {
        let max = shard.config.listeners[listener].max_connections;
        let count = &shard.shared.listener_conns[listener];
        // A relaxed CAS loop: touched once per connection, never per byte.
        let mut cur = count.load(Ordering::Relaxed);
        loop {
            if cur >= max {
                return None;
            }
            match count.compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => break,
                Err(actual) => cur = actual,
            }
        }
        shard.stats.listeners[listener].active.inc();
        shard.open.set(shard.open.get() + 1);
        Some(ConnGuard {
            shard: shard.clone(),
            listener,
        })
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.shard.shared.listener_conns[self.listener].fetch_sub(1, Ordering::AcqRel);
        let stats = &self.shard.stats.listeners[self.listener];
        stats.active.dec();
        stats.closed.inc();
        self.shard.open.set(self.shard.open.get().saturating_sub(1));
    }
}
