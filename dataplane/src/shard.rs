//! One shard: the per-core half of the gateway.
//!
//! A shard owns, for its core only: a socket per listener (SO_REUSEPORT), the balancer state of
//! every route and cluster, and its counters. It runs an accept loop per listener and one task
//! per connection, and obeys its control channel.
//!
//! Config reaches a shard as a *generation* in two phases, so that every shard switches or none
//! does: `Prepare` binds the sockets of listeners that are new (or moved) and builds the
//! generation's per-shard state; `Commit` makes it current (new connections use it, open ones
//! keep the generation they started with) and closes the sockets of listeners that went away;
//! `Abort` throws the prepared state away. Start-up is generation 1 going through the same path.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use meshgate_config::{Config, Protocol, RouteAction};

use crate::accesslog::AccessLog;
use crate::balance::{EndpointPicker, SharedLb, WeightedPicker};
use crate::gateway::{Shared, StartError, bind_hint};
use crate::listen;
use crate::metrics::{ClusterStats, ListenerStats, ShardStats, TcpRouteStats};
use crate::rt;
use crate::tls::setup::{ClusterTlsState, ListenerTlsState};

/// A config generation as the control thread hands it to every shard.
#[derive(Debug)]
pub struct Plan {
    pub generation: u64,
    pub config: Arc<Config>,
    /// Bound address per listener of `config` (port 0 resolved), in config order.
    pub addrs: Vec<SocketAddr>,
    /// Cross-shard open-connection count per listener of `config` (for `max_connections`).
    pub conns: Vec<Arc<AtomicU32>>,
    /// Circuit-breaker counts per cluster of `config` (shared by every shard).
    pub breakers: Vec<Arc<crate::retry::Breaker>>,
    /// TLS termination state per listener (`Some` for `tls` listeners), same index as listeners.
    pub listener_tls: Vec<Option<Arc<ListenerTlsState>>>,
    /// TLS origination state per cluster (`Some` for clusters with `[clusters.tls]`).
    pub cluster_tls: Vec<Option<Arc<ClusterTlsState>>>,
    /// Endpoint health and Maglev tables per cluster, shared by the shards.
    pub lb: Vec<SharedLb>,
}

pub type Ack = std::sync::mpsc::Sender<(usize, Result<(), StartError>)>;

/// Messages from the control thread.
#[derive(Debug)]
pub enum ShardMsg {
    /// Phase 1: bind what `plan` adds, build its state, reply on `ack`.
    Prepare { plan: Arc<Plan>, ack: Ack },
    /// Phase 2: make the prepared generation current.
    Commit { generation: u64 },
    /// Drop the prepared generation.
    Abort { generation: u64 },
    /// Close the listening sockets and keep serving open connections (admin `POST /drain`);
    /// later generations are refused by the control thread.
    StopAccepting,
    /// Close listeners, wait for open connections until `deadline`, then stop.
    Drain { deadline: Instant },
    /// Answer with the shard's id (the systemd watchdog checks that every shard turns).
    Heartbeat { ack: std::sync::mpsc::Sender<usize> },
    /// Stop now.
    Stop,
}

/// What a shard thread is started with.
#[derive(Debug)]
pub struct ShardInit {
    pub id: usize,
    pub access_log: Option<AccessLog>,
    pub stats: Arc<ShardStats>,
    pub shared: Arc<Shared>,
    pub rx: rt::Receiver<ShardMsg>,
}

/// A listener's per-shard handles within one generation.
#[derive(Debug)]
pub struct ListenerRt {
    pub stats: Arc<ListenerStats>,
    pub conns: Arc<AtomicU32>,
    /// `[[policies]]` of a `tcp`/`tls`/`tls-passthrough` listener, checked per connection
    /// (`http`/`https` listeners check per request, in [`crate::http_route`]); `None`: none.
    pub policies: Option<Box<crate::authz::ListenerPolicies>>,
}

/// One generation's state on one shard. Connections hold an `Rc` to the generation they
/// started on and use it until they end.
#[derive(Debug)]
pub struct ShardGen {
    pub generation: u64,
    pub config: Arc<Config>,
    /// Same index as `config.listeners`.
    pub listeners: Vec<ListenerRt>,
    /// Same index as `config.clusters`.
    pub clusters: Vec<Arc<ClusterStats>>,
    /// Same index as `config.clusters`: circuit-breaker counts (process-wide).
    pub breakers: Vec<Arc<crate::retry::Breaker>>,
    /// Same index as `config.listeners`; `Some` for `tls` listeners.
    pub listener_tls: Vec<Option<Arc<ListenerTlsState>>>,
    /// Same index as `config.clusters`; `Some` for clusters that originate TLS.
    pub cluster_tls: Vec<Option<Arc<ClusterTlsState>>>,
    /// One weighted picker per route (same index as `config.routes`).
    pub route_pickers: Vec<WeightedPicker>,
    /// Endpoint choice per cluster (same index as `config.clusters`): see
    /// [`EndpointPicker::pick`] / [`EndpointPicker::pick_excluding`].
    pub balancers: Vec<EndpointPicker>,
    /// What the shards share per cluster (health, Maglev table); same index.
    pub lb: Vec<SharedLb>,
    /// Per route (same index as `config.routes`): the request header its clusters hash on.
    pub route_hash_header: Vec<Option<Box<str>>>,
    /// Names as shared strings for access-log records (same indexes as in `config`).
    pub listener_names: Vec<Arc<str>>,
    pub route_names: Vec<Arc<str>>,
    pub cluster_names: Vec<Arc<str>>,
    /// Compiled routes of the `http` listeners.
    pub http: crate::http_route::HttpRoutes,
    /// Per route (same index as `config.routes`, empty for `http` listeners' routes): the TCP
    /// connection hooks of each cluster it forwards to.
    pub route_tcp: Vec<Box<[TcpRouteStats]>>,
    by_name: HashMap<String, usize>,
}

impl ShardGen {
    fn new(shard_id: usize, plan: &Plan, stats: &ShardStats) -> ShardGen {
        let config = &plan.config;
        ShardGen {
            generation: plan.generation,
            config: config.clone(),
            listeners: config
                .listeners
                .iter()
                .zip(&plan.conns)
                .enumerate()
                .map(|(index, (l, conns))| ListenerRt {
                    stats: stats.listener(&l.name),
                    conns: conns.clone(),
                    policies: if matches!(l.protocol, Protocol::Http | Protocol::Https) {
                        None
                    } else {
                        crate::authz::ListenerPolicies::compile(config, index, false, stats)
                            .map(Box::new)
                    },
                })
                .collect(),
            clusters: config
                .clusters
                .iter()
                .map(|c| stats.cluster(&c.name))
                .collect(),
            breakers: plan.breakers.clone(),
            listener_tls: plan.listener_tls.clone(),
            cluster_tls: plan.cluster_tls.clone(),
            route_pickers: config
                .routes
                .iter()
                .map(|r| match &r.action {
                    RouteAction::Forward { clusters } => {
                        WeightedPicker::new(&clusters.iter().map(|c| c.weight).collect::<Vec<_>>())
                    }
                    // Answered by the gateway itself: nothing to pick.
                    _ => WeightedPicker::new(&[1]),
                })
                .collect(),
            balancers: config
                .clusters
                .iter()
                .zip(&plan.lb)
                .map(|(c, lb)| EndpointPicker::new(c, lb, shard_id))
                .collect(),
            lb: plan.lb.clone(),
            route_hash_header: config
                .routes
                .iter()
                .map(|r| match &r.action {
                    RouteAction::Forward { clusters } => {
                        clusters.iter().find_map(|t| {
                            match config.clusters.get(t.cluster_index)?.hash_on.as_ref()? {
                                meshgate_config::HashOn::Header(h) => Some(h.as_str().into()),
                                _ => None,
                            }
                        })
                    }
                    _ => None,
                })
                .collect(),
            listener_names: config
                .listeners
                .iter()
                .map(|l| Arc::from(l.name.as_str()))
                .collect(),
            route_names: config
                .routes
                .iter()
                .map(|r| Arc::from(r.name.as_str()))
                .collect(),
            cluster_names: config
                .clusters
                .iter()
                .map(|c| Arc::from(c.name.as_str()))
                .collect(),
            http: crate::http_route::HttpRoutes::new(config, stats),
            route_tcp: config
                .routes
                .iter()
                .map(
                    |r| match (&r.action, config.listeners.get(r.listener_index)) {
                        (RouteAction::Forward { clusters }, Some(l))
                            if l.protocol != Protocol::Http =>
                        {
                            clusters.iter().map(|c| stats.tcp(&l.name, c)).collect()
                        }
                        _ => Box::default(),
                    },
                )
                .collect(),
            by_name: config
                .listeners
                .iter()
                .enumerate()
                .map(|(i, l)| (l.name.clone(), i))
                .collect(),
        }
    }

    /// Index of listener `name` in this generation.
    pub fn listener_index(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }
}

/// Per-shard state every task of this shard can see.
#[derive(Debug)]
pub struct Shard {
    /// Shard number (0-based), for logs.
    pub id: usize,
    pub access_log: Option<AccessLog>,
    pub shared: Arc<Shared>,
    current: RefCell<Option<Rc<ShardGen>>>,
    /// Connections open on this shard (all listeners, all generations).
    pub open: Cell<u64>,
    /// Idle upstream HTTP/1.1 connections of this shard (all generations).
    pub http_pool: crate::pool::Pool,
    /// Upstream HTTP/2 connections of this shard (all generations).
    pub h2_pool: crate::proxy::h2_upstream::H2Pool,
}

impl Shard {
    /// The generation new connections use. None only before the first commit.
    pub fn current(&self) -> Option<Rc<ShardGen>> {
        self.current.borrow().clone()
    }
}

/// A listening socket that is serving, keyed by listener name.
struct Serving {
    addr: SocketAddr,
    task: rt::JoinHandle<()>,
}

struct Prepared {
    generation: u64,
    snap: Rc<ShardGen>,
    /// Sockets bound for listeners that are new or moved.
    fresh: Vec<(String, SocketAddr, rt::TcpListener)>,
}

/// The shard's root task.
pub async fn run(init: ShardInit) {
    let shard = Rc::new(Shard {
        id: init.id,
        access_log: init.access_log.clone(),
        shared: init.shared.clone(),
        current: RefCell::new(None),
        open: Cell::new(0),
        http_pool: crate::pool::Pool::new(),
        h2_pool: crate::proxy::h2_upstream::H2Pool::new(),
    });
    init.stats.set_idle_counter(rt::idle_counter());
    let mut serving: HashMap<String, Serving> = HashMap::new();
    let mut prepared: Option<Prepared> = None;
    // Shard 0 runs the health checks of the generation in force (docs/ARCHITECTURE.md).
    let mut health_tasks: Vec<rt::JoinHandle<()>> = Vec::new();

    let deadline = loop {
        match init.rx.recv().await {
            Some(ShardMsg::Prepare { plan, ack }) => {
                prepared = None;
                match prepare(&shard, &plan, &init.stats, &serving) {
                    Ok(p) => {
                        prepared = Some(p);
                        let _ = ack.send((init.id, Ok(())));
                    }
                    Err(e) => {
                        let _ = ack.send((init.id, Err(e)));
                    }
                }
            }
            Some(ShardMsg::Commit { generation }) => match prepared.take() {
                Some(p) if p.generation == generation => {
                    commit(&shard, p, &mut serving);
                    if init.id == 0 {
                        for t in health_tasks.drain(..) {
                            t.cancel();
                        }
                        if let Some(snap) = shard.current() {
                            health_tasks = crate::health::spawn_tasks(&snap);
                        }
                    }
                }
                other => {
                    tracing::error!(
                        shard = init.id,
                        generation,
                        "commit without a matching prepare"
                    );
                    prepared = other;
                }
            },
            Some(ShardMsg::Abort { generation }) => {
                if prepared
                    .as_ref()
                    .is_some_and(|p| p.generation == generation)
                {
                    prepared = None;
                }
            }
            Some(ShardMsg::Heartbeat { ack }) => {
                let _ = ack.send(init.id);
            }
            Some(ShardMsg::StopAccepting) => {
                prepared = None;
                for (name, s) in serving.drain() {
                    tracing::debug!(shard = init.id, listener = %name, "stopped accepting (drain)");
                    s.task.cancel();
                }
            }
            Some(ShardMsg::Drain { deadline }) => break Some(deadline),
            Some(ShardMsg::Stop) | None => break None,
        }
    };
    // Closing the listening sockets makes new connections to this shard's sockets fail at once.
    drop(prepared);
    for t in health_tasks.drain(..) {
        t.cancel();
    }
    for (_, s) in serving.drain() {
        s.task.cancel();
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

fn prepare(
    shard: &Rc<Shard>,
    plan: &Plan,
    stats: &ShardStats,
    serving: &HashMap<String, Serving>,
) -> Result<Prepared, StartError> {
    let mut fresh = Vec::new();
    for (l, &addr) in plan.config.listeners.iter().zip(&plan.addrs) {
        if serving.get(&l.name).is_some_and(|s| s.addr == addr) {
            continue; // same socket keeps serving; its accept loop picks up the new generation
        }
        let opts = rt::ListenOptions {
            reuseport: true,
            backlog: i32::try_from(l.backlog).unwrap_or(i32::MAX),
        };
        let sock = rt::TcpListener::bind(addr, &opts).map_err(|source| StartError::Bind {
            listener: l.name.clone(),
            address: addr,
            hint: bind_hint(&source),
            source,
        })?;
        fresh.push((l.name.clone(), addr, sock));
    }
    tracing::debug!(
        shard = shard.id,
        generation = plan.generation,
        new_sockets = fresh.len(),
        "prepared"
    );
    Ok(Prepared {
        generation: plan.generation,
        snap: Rc::new(ShardGen::new(shard.id, plan, stats)),
        fresh,
    })
}

fn commit(shard: &Rc<Shard>, p: Prepared, serving: &mut HashMap<String, Serving>) {
    let generation = p.generation;
    let keep: std::collections::HashSet<&str> = p
        .snap
        .config
        .listeners
        .iter()
        .map(|l| l.name.as_str())
        .collect();
    // Listeners that went away stop accepting; their open connections continue.
    let removed: Vec<String> = serving
        .keys()
        .filter(|n| !keep.contains(n.as_str()))
        .cloned()
        .collect();
    for name in removed {
        if let Some(s) = serving.remove(&name) {
            tracing::info!(listener = %name, address = %s.addr, "listener removed");
            s.task.cancel();
        }
    }
    *shard.current.borrow_mut() = Some(p.snap);
    for (name, addr, sock) in p.fresh {
        let task = rt::spawn(listen::accept_loop(shard.clone(), name.clone(), sock));
        if let Some(old) = serving.insert(name, Serving { addr, task }) {
            old.task.cancel(); // the listener moved to another address
        }
    }
    tracing::debug!(shard = shard.id, generation, "generation committed");
}
