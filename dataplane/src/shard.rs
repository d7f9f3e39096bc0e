//! One shard: the per-core half of the gateway.
//!
//! A shard owns, for its core only: a socket per listener (SO_REUSEPORT), the balancer state of
//! every route and cluster, and its counters. It runs an accept loop per listener and one task
//! per connection; it listens on its control channel for drain/stop. Nothing here is shared
//! with other cores except the per-listener connection counts used for `max_connections`.

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use meshgate_config::{Config, RouteAction};

use crate::balance::{RoundRobin, WeightedPicker};
use crate::gateway::{Shared, StartError};
use crate::listen;
use crate::metrics::ShardStats;
use crate::rt;

/// Messages from the control thread.
#[derive(Debug)]
pub enum ShardMsg {
    /// Close listeners, wait for open connections until `deadline`, then stop.
    Drain { deadline: Instant },
    /// Stop now.
    Stop,
}

/// What a shard thread is started with.
#[derive(Debug)]
pub struct ShardInit {
    pub id: usize,
    pub config: Arc<Config>,
    pub stats: Arc<ShardStats>,
    pub shared: Arc<Shared>,
    /// Bound address per listener (port 0 already resolved).
    pub addrs: Vec<SocketAddr>,
    pub rx: rt::Receiver<ShardMsg>,
    pub ready: std::sync::mpsc::Sender<(usize, Result<(), StartError>)>,
}

/// Per-shard state every connection task of this shard can see.
#[derive(Debug)]
pub struct Shard {
    /// Shard number (0-based), for logs.
    pub id: usize,
    pub config: Arc<Config>,
    pub stats: Arc<ShardStats>,
    pub shared: Arc<Shared>,
    /// One weighted picker per route (same index as `config.routes`).
    pub route_pickers: Vec<WeightedPicker>,
    /// One round robin per cluster (same index as `config.clusters`).
    pub endpoint_rr: Vec<RoundRobin>,
    /// Connections open on this shard (all listeners).
    pub open: Cell<u64>,
}

impl Shard {
    fn new(init: &ShardInit) -> Shard {
        let config = &init.config;
        let route_pickers = config
            .routes
            .iter()
            .map(|r| match &r.action {
                RouteAction::Forward { clusters } => {
                    WeightedPicker::new(&clusters.iter().map(|c| c.weight).collect::<Vec<_>>())
                }
            })
            .collect();
        let endpoint_rr = config
            .clusters
            .iter()
            .map(|c| RoundRobin::new(c.endpoints.len(), init.id))
            .collect();
        Shard {
            id: init.id,
            config: config.clone(),
            stats: init.stats.clone(),
            shared: init.shared.clone(),
            route_pickers,
            endpoint_rr,
            open: Cell::new(0),
        }
    }
}

/// The shard's root task.
pub async fn run(init: ShardInit) {
    let shard = Rc::new(Shard::new(&init));
    let opts = |backlog: u32| rt::ListenOptions {
        reuseport: true,
        backlog: backlog.min(i32::MAX as u32) as i32,
    };

    let mut listeners = Vec::with_capacity(init.config.listeners.len());
    for (i, l) in init.config.listeners.iter().enumerate() {
        match rt::TcpListener::bind(init.addrs[i], &opts(l.backlog)) {
            Ok(sock) => listeners.push(sock),
            Err(source) => {
                let hint = crate::gateway::bind_hint(&source);
                let _ = init.ready.send((
                    init.id,
                    Err(StartError::Bind {
                        listener: l.name.clone(),
                        address: init.addrs[i],
                        source,
                        hint,
                    }),
                ));
                return;
            }
        }
    }
    let accept_tasks: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(i, sock)| rt::spawn(listen::accept_loop(shard.clone(), i, sock)))
        .collect();
    shard.shared.shards_ready.fetch_add(1, Ordering::AcqRel);
    let _ = init.ready.send((init.id, Ok(())));
    tracing::debug!(shard = init.id, "shard ready");

    let deadline = match init.rx.recv().await {
        Some(ShardMsg::Drain { deadline }) => Some(deadline),
        Some(ShardMsg::Stop) | None => None,
    };
    // Closing the listening sockets makes new connections to this shard's sockets fail at once.
    for t in accept_tasks {
        t.cancel();
    }
    if let Some(deadline) = deadline {
        while shard.open.get() > 0 {
            let now = Instant::now();
            if now >= deadline {
                shard
                    .shared
                    .drain_left
                    .fetch_add(shard.open.get(), Ordering::AcqRel);
                break;
            }
            rt::sleep((deadline - now).min(Duration::from_millis(20))).await;
        }
    }
    tracing::debug!(shard = shard.id, "shard stopped");
}
