//! The gateway as a whole: start the shards, report bound addresses, drain, join.
//!
//! The control thread (the caller: `meshgate run`) owns a [`Gateway`]. It starts one shard per
//! core; each shard binds its own SO_REUSEPORT sockets for every listener, so the kernel spreads
//! connections over the cores and no accept lock exists. Start-up waits until every shard has
//! bound every listener, so a port conflict is a start-up error, not a half-working gateway.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use meshgate_config::Config;

use crate::metrics::Stats;
use crate::rt;
use crate::shard::{self, ShardMsg};

/// State the shards and the control/admin threads share. Touched on accept/close and by the
/// admin API, never per byte.
#[derive(Debug)]
pub struct Shared {
    /// Shards that have bound all their listeners.
    pub shards_ready: AtomicUsize,
    pub shard_count: usize,
    /// Set once a drain begins: listeners are closed, /ready answers 503.
    pub draining: AtomicBool,
    /// Open connections per listener, across all shards (for `max_connections`).
    pub listener_conns: Vec<AtomicU32>,
    /// Connections still open when a drain deadline hit, summed by the shards as they stop.
    pub drain_left: AtomicU64,
}

impl Shared {
    pub fn is_ready(&self) -> bool {
        self.shards_ready.load(Ordering::Acquire) == self.shard_count
            && !self.draining.load(Ordering::Acquire)
    }
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Runtime(#[from] rt::RtError),
    #[error("listener `{listener}` cannot bind {address}: {source}{hint}")]
    Bind {
        listener: String,
        address: SocketAddr,
        source: std::io::Error,
        hint: &'static str,
    },
    #[error(
        "runtime.cores = {wanted} but this process may only run on {available} CPU(s) ({cpus:?}); lower runtime.cores or widen the CPU affinity"
    )]
    TooManyCores {
        wanted: usize,
        available: usize,
        cpus: Vec<usize>,
    },
    #[error("shard {0} stopped during start-up (see the log above)")]
    ShardDied(usize),
}

pub(crate) fn bind_hint(e: &std::io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EADDRINUSE) => "; another process holds this port (find it with `ss -ltnp`)",
        Some(libc::EACCES) => "; ports below 1024 need CAP_NET_BIND_SERVICE",
        Some(libc::EADDRNOTAVAIL) => "; this address is not configured on any interface",
        _ => "",
    }
}

/// A running gateway.
#[derive(Debug)]
pub struct Gateway {
    config: Arc<Config>,
    stats: Arc<Stats>,
    shared: Arc<Shared>,
    ring: rt::RingFeatures,
    shards: Vec<(rt::ShardHandle, rt::Sender<ShardMsg>)>,
    bound: Vec<SocketAddr>,
}

impl Gateway {
    /// Start every shard and wait until each has bound every listener.
    pub fn start(config: Arc<Config>) -> Result<Gateway, StartError> {
        let ring = rt::check()?;
        let cpus = rt::allowed_cpus();
        let count = match config.runtime.cores {
            Some(n) if n > cpus.len().max(1) => {
                return Err(StartError::TooManyCores {
                    wanted: n,
                    available: cpus.len(),
                    cpus,
                });
            }
            Some(n) => n,
            None => cpus.len().max(1),
        };

        // Port 0 means "pick one": reserve it once so every shard binds the same port.
        let mut reservations = Vec::new();
        let mut bound = Vec::with_capacity(config.listeners.len());
        for l in &config.listeners {
            if l.address.port() == 0 {
                let (sock, addr) = reserve_port(l.address).map_err(|source| StartError::Bind {
                    listener: l.name.clone(),
                    address: l.address,
                    hint: bind_hint(&source),
                    source,
                })?;
                reservations.push(sock);
                bound.push(addr);
            } else {
                bound.push(l.address);
            }
        }

        let stats = Arc::new(Stats::new(&config, count));
        let shared = Arc::new(Shared {
            shards_ready: AtomicUsize::new(0),
            shard_count: count,
            draining: AtomicBool::new(false),
            listener_conns: config.listeners.iter().map(|_| AtomicU32::new(0)).collect(),
            drain_left: AtomicU64::new(0),
        });

        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<(usize, Result<(), StartError>)>();
        let mut shards = Vec::with_capacity(count);
        for id in 0..count {
            let (tx, rx) = rt::channel::<ShardMsg>();
            let ctx = shard::ShardInit {
                id,
                config: config.clone(),
                stats: stats.shards[id].clone(),
                shared: shared.clone(),
                addrs: bound.clone(),
                rx,
                ready: ready_tx.clone(),
            };
            let cfg = rt::ShardConfig {
                id,
                cpu: if config.runtime.pin {
                    cpus.get(id).copied()
                } else {
                    None
                },
                ring_entries: config.runtime.ring_entries,
            };
            let handle = rt::spawn_shard(cfg, move || shard::run(ctx))?;
            shards.push((handle, tx));
        }
        drop(ready_tx);

        let mut first_error = None;
        for _ in 0..count {
            match ready_rx.recv() {
                Ok((_, Ok(()))) => {}
                Ok((_, Err(e))) => {
                    first_error.get_or_insert(e);
                }
                Err(_) => {
                    first_error.get_or_insert(StartError::ShardDied(0));
                    break;
                }
            }
        }
        drop(reservations);
        let gw = Gateway {
            config,
            stats,
            shared,
            ring,
            shards,
            bound,
        };
        if let Some(e) = first_error {
            gw.stop();
            return Err(e);
        }
        tracing::info!(shards = count, ring = %gw.ring, "gateway started");
        Ok(gw)
    }

    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
    pub fn ring_features(&self) -> rt::RingFeatures {
        self.ring
    }
    /// The address each listener is bound to (port 0 resolved), in config order.
    pub fn listener_addrs(&self) -> &[SocketAddr] {
        &self.bound
    }

    /// Stop accepting, let open connections finish until `deadline`, then stop the shards.
    /// Returns the number of connections still open when the deadline hit (0 = clean drain).
    pub fn drain(self, timeout: Duration) -> u64 {
        self.shared.draining.store(true, Ordering::Release);
        let deadline = Instant::now() + timeout;
        for (_, tx) in &self.shards {
            let _ = tx.send(ShardMsg::Drain { deadline });
        }
        let open_at_deadline = self.wait_shards();
        if open_at_deadline > 0 {
            tracing::warn!(
                connections = open_at_deadline,
                "drain deadline reached; closed remaining connections"
            );
        }
        open_at_deadline
    }

    /// Stop at once, closing every connection.
    pub fn stop(self) {
        for (_, tx) in &self.shards {
            let _ = tx.send(ShardMsg::Stop);
        }
        self.wait_shards();
    }

    fn wait_shards(self) -> u64 {
        for (i, (handle, tx)) in self.shards.into_iter().enumerate() {
            drop(tx);
            if handle.join().is_err() {
                tracing::error!(shard = i, "shard panicked");
            }
        }
        self.shared.drain_left.load(Ordering::Acquire)
    }
}

fn reserve_port(addr: SocketAddr) -> std::io::Result<(socket2::Socket, SocketAddr)> {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    sock.bind(&addr.into())?;
    let local = sock
        .local_addr()?
        .as_socket()
        .ok_or_else(|| std::io::Error::other("bound address is not an IP socket address"))?;
    Ok((sock, local))
}
