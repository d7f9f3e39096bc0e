//! The gateway as a whole: start the shards, apply config generations, drain, join.
//!
//! The control thread (the caller: `meshgate run`) owns a [`Gateway`]. It starts one shard per
//! core; each shard binds its own SO_REUSEPORT sockets for every listener, so the kernel spreads
//! connections over the cores and no accept lock exists. Every config — the first one and each
//! reload — is applied to all shards in two phases (prepare: bind + build; commit: switch), so a
//! port conflict fails the start-up or the reload as a whole and never leaves shards on
//! different generations.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use meshgate_config::Config;
use serde::Serialize;

use crate::metrics::Stats;
use crate::rt;
use crate::shard::{self, Plan, ShardMsg};
use crate::tls::certs::Resumption;
use crate::tls::setup::{ClusterTlsState, ListenerTlsState};

/// TLS 1.2 sessions kept for session-ID resumption (tickets need no server state).
const SESSION_CACHE_ENTRIES: usize = 65_536;

/// How long a shard may take to acknowledge a prepare.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(10);

/// A config generation as the admin API reports it.
#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    pub id: u64,
    #[serde(skip)]
    pub config: Arc<Config>,
    /// Bound address per listener (port 0 resolved), in config order.
    pub listener_addrs: Vec<SocketAddr>,
    /// Where the config came from (file path or "embedded default").
    pub source: String,
    /// Unix time the generation was applied.
    pub applied_unix: u64,
}

/// State the shards and the control/admin threads share. Touched on accept/close, on reload and
/// by the admin API, never per byte.
#[derive(Debug)]
pub struct Shared {
    /// Shards that have committed their first generation.
    pub shards_ready: AtomicUsize,
    pub shard_count: usize,
    /// Set once a drain begins: listeners are closed, /ready answers 503.
    pub draining: AtomicBool,
    /// Connections still open when a drain deadline hit, summed by the shards as they stop.
    pub drain_left: AtomicU64,
    /// The generation in force.
    current: RwLock<Arc<Generation>>,
    /// Open connections per listener name, across all shards (for `max_connections`).
    listener_conns: Mutex<HashMap<String, Arc<AtomicU32>>>,
    /// Circuit-breaker counts per cluster name, across all shards and reloads.
    breakers: Mutex<HashMap<String, Arc<crate::retry::Breaker>>>,
}

impl Shared {
    pub fn is_ready(&self) -> bool {
        self.shards_ready.load(Ordering::Acquire) == self.shard_count
            && !self.draining.load(Ordering::Acquire)
    }

    /// The generation in force.
    pub fn current(&self) -> Arc<Generation> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn conns(&self, name: &str) -> Arc<AtomicU32> {
        self.listener_conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    /// The circuit-breaker counts of cluster `name`; `shards`: each shard's counters of it.
    fn breaker(
        &self,
        name: &str,
        shards: impl FnOnce() -> Box<[Arc<crate::metrics::ClusterStats>]>,
    ) -> Arc<crate::retry::Breaker> {
        self.breakers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name.to_string())
            .or_insert_with(|| Arc::new(crate::retry::Breaker::new(shards())))
            .clone()
    }
}

/// Why the gateway could not start, or a reload could not be applied.
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
    #[error(
        "the gateway is draining (POST /drain): its listeners are closed; restart it to serve again"
    )]
    Draining,
    #[error("shard {0} did not answer (see the log above)")]
    ShardDied(usize),
    #[error("{what}: {error}")]
    Tls {
        what: String,
        error: crate::tls::certs::TlsSetupError,
    },
}

pub(crate) fn bind_hint(e: &std::io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EADDRINUSE) => "; another process holds this port (find it with `ss -ltnp`)",
        Some(libc::EACCES) => "; ports below 1024 need CAP_NET_BIND_SERVICE",
        Some(libc::EADDRNOTAVAIL) => "; this address is not configured on any interface",
        _ => "",
    }
}

/// What a successful reload changed.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadOutcome {
    pub generation: u64,
    pub listeners_added: Vec<String>,
    pub listeners_removed: Vec<String>,
    /// Settings that only take effect after a restart (e.g. `runtime.cores`).
    pub needs_restart: Vec<String>,
    /// The config-history entry recorded for this generation (None: history disabled).
    pub history_id: Option<u64>,
    /// What changed, in one line.
    pub summary: String,
}

/// A running gateway.
#[derive(Debug)]
pub struct Gateway {
    /// Session ticket keys and cache, shared by every listener, shard and generation, so a
    /// session resumes on any core and across reloads.
    resumption: Resumption,
    stats: Arc<Stats>,
    shared: Arc<Shared>,
    ring: rt::RingFeatures,
    shards: Vec<(rt::ShardHandle, rt::Sender<ShardMsg>)>,
}

impl Gateway {
    /// Start every shard and apply `config` as generation 1.
    pub fn start(
        config: Arc<Config>,
        source: &str,
        access_log: Option<crate::accesslog::AccessLog>,
    ) -> Result<Gateway, StartError> {
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
        let resumption = Resumption::new(SESSION_CACHE_ENTRIES).map_err(|e| StartError::Tls {
            what: "session resumption".into(),
            error: crate::tls::certs::TlsSetupError::from(e),
        })?;
        let stats = Arc::new(Stats::with_options(
            count,
            access_log.clone(),
            config.telemetry.istio_compat,
        ));
        let shared = Arc::new(Shared {
            shards_ready: AtomicUsize::new(0),
            shard_count: count,
            draining: AtomicBool::new(false),
            drain_left: AtomicU64::new(0),
            current: RwLock::new(Arc::new(Generation {
                id: 0,
                config: config.clone(),
                listener_addrs: Vec::new(),
                source: source.to_string(),
                applied_unix: 0,
            })),
            listener_conns: Mutex::new(HashMap::new()),
            breakers: Mutex::new(HashMap::new()),
        });
        let mut shards = Vec::with_capacity(count);
        for id in 0..count {
            let (tx, rx) = rt::channel::<ShardMsg>();
            let init = shard::ShardInit {
                id,
                access_log: access_log.clone(),
                stats: stats.shards[id].clone(),
                shared: shared.clone(),
                rx,
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
            let handle = match rt::spawn_shard(cfg, move || shard::run(init)) {
                Ok(h) => h,
                Err(e) => {
                    Gateway {
                        resumption,
                        stats,
                        shared,
                        ring,
                        shards,
                    }
                    .stop();
                    return Err(e.into());
                }
            };
            shards.push((handle, tx));
        }
        let gw = Gateway {
            resumption,
            stats,
            shared,
            ring,
            shards,
        };
        if let Err(e) = gw.apply(config, source, 1) {
            gw.stop();
            return Err(e);
        }
        gw.shared.shards_ready.store(count, Ordering::Release);
        tracing::info!(shards = count, ring = %gw.ring, "gateway started");
        Ok(gw)
    }

    /// Apply a new validated config as the next generation. On error nothing changed.
    pub fn reload(&self, config: Arc<Config>, source: &str) -> Result<ReloadOutcome, StartError> {
        if self.shared.draining.load(Ordering::Acquire) {
            self.stats.reloads_failed.fetch_add(1, Ordering::Relaxed);
            return Err(StartError::Draining);
        }
        let old = self.shared.current();
        let next = old.id + 1;
        let result = self.apply(config.clone(), source, next);
        match &result {
            Ok(()) => {
                self.stats.reloads_ok.fetch_add(1, Ordering::Relaxed);
                self.stats.generation.store(next, Ordering::Relaxed);
            }
            Err(_) => {
                self.stats.reloads_failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        result?;
        let names = |c: &Config| {
            c.listeners
                .iter()
                .map(|l| l.name.clone())
                .collect::<Vec<_>>()
        };
        let (before, after) = (names(&old.config), names(&config));
        let mut needs_restart = Vec::new();
        let (a, b) = (&old.config.runtime, &config.runtime);
        if a.cores != b.cores {
            needs_restart.push("runtime.cores".to_string());
        }
        if a.pin != b.pin {
            needs_restart.push("runtime.pin".to_string());
        }
        if a.ring_entries != b.ring_entries {
            needs_restart.push("runtime.ring_entries".to_string());
        }
        if old.config.access_log != config.access_log {
            needs_restart.push("access_log".to_string());
        }
        if old.config.admin != config.admin {
            needs_restart.push("admin".to_string());
        }
        Ok(ReloadOutcome {
            generation: next,
            listeners_added: after
                .iter()
                .filter(|n| !before.contains(n))
                .cloned()
                .collect(),
            listeners_removed: before
                .iter()
                .filter(|n| !after.contains(n))
                .cloned()
                .collect(),
            needs_restart,
            history_id: None,
            summary: String::new(),
        })
    }

    /// Load certificates, keys and bundles for every TLS listener and cluster of `config`.
    /// Done once per generation on the control thread; the shards share the result.
    #[allow(clippy::type_complexity)] // two parallel per-index vectors, named in `Plan`
    fn build_tls(
        &self,
        config: &Config,
    ) -> Result<
        (
            Vec<Option<Arc<ListenerTlsState>>>,
            Vec<Option<Arc<ClusterTlsState>>>,
        ),
        StartError,
    > {
        let now = SystemTime::now();
        let mut listeners = Vec::with_capacity(config.listeners.len());
        for l in &config.listeners {
            listeners.push(match &l.tls {
                None => None,
                Some(tls) => {
                    let counts = self.stats.verify_counts(&format!("listener:{}", l.name));
                    let state = ListenerTlsState::build(tls, &self.resumption, counts, now)
                        .map_err(|error| StartError::Tls {
                            what: format!("listener `{}`", l.name),
                            error,
                        })?;
                    Some(Arc::new(state))
                }
            });
        }
        let mut clusters = Vec::with_capacity(config.clusters.len());
        for c in &config.clusters {
            clusters.push(match (&c.tls, c.endpoints.first()) {
                (Some(tls), Some(ep)) => {
                    let counts = self.stats.verify_counts(&format!("cluster:{}", c.name));
                    let state =
                        ClusterTlsState::build(tls, ep.ip(), counts, now).map_err(|error| {
                            StartError::Tls {
                                what: format!("cluster `{}`", c.name),
                                error,
                            }
                        })?;
                    Some(Arc::new(state))
                }
                _ => None,
            });
        }
        Ok((listeners, clusters))
    }

    fn apply(&self, config: Arc<Config>, source: &str, generation: u64) -> Result<(), StartError> {
        let old = self.shared.current();
        let (listener_tls, cluster_tls) = self.build_tls(&config)?;
        // Port 0 means "pick one": a listener that keeps its name and configured address keeps
        // its port; otherwise reserve one so every shard binds the same port.
        let mut reservations = Vec::new();
        let mut addrs = Vec::with_capacity(config.listeners.len());
        for l in &config.listeners {
            if l.address.port() != 0 {
                addrs.push(l.address);
                continue;
            }
            let kept = old
                .config
                .listeners
                .iter()
                .position(|o| o.name == l.name && o.address == l.address)
                .and_then(|i| old.listener_addrs.get(i).copied());
            match kept {
                Some(a) => addrs.push(a),
                None => {
                    let (sock, addr) =
                        reserve_port(l.address).map_err(|source| StartError::Bind {
                            listener: l.name.clone(),
                            address: l.address,
                            hint: bind_hint(&source),
                            source,
                        })?;
                    reservations.push(sock);
                    addrs.push(addr);
                }
            }
        }
        let certs = cert_infos(&config, &listener_tls, &cluster_tls);
        let plan = Arc::new(Plan {
            generation,
            config: config.clone(),
            addrs: addrs.clone(),
            conns: config
                .listeners
                .iter()
                .map(|l| self.shared.conns(&l.name))
                .collect(),
            lb: config
                .clusters
                .iter()
                .map(|c| crate::balance::SharedLb::build(c, self.stats.health.cluster(c)))
                .collect(),
            breakers: config
                .clusters
                .iter()
                .map(|c| {
                    self.shared.breaker(&c.name, || {
                        self.stats
                            .shards
                            .iter()
                            .map(|s| s.cluster(&c.name))
                            .collect()
                    })
                })
                .collect(),
            listener_tls,
            cluster_tls,
        });

        let (ack_tx, ack_rx) = std::sync::mpsc::channel();
        for (_, tx) in &self.shards {
            let _ = tx.send(ShardMsg::Prepare {
                plan: plan.clone(),
                ack: ack_tx.clone(),
            });
        }
        drop(ack_tx);
        let mut first_error = None;
        let deadline = Instant::now() + PREPARE_TIMEOUT;
        let mut answered = vec![false; self.shards.len()];
        for _ in 0..self.shards.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            match ack_rx.recv_timeout(left) {
                Ok((id, r)) => {
                    if let Some(a) = answered.get_mut(id) {
                        *a = true;
                    }
                    if let Err(e) = r {
                        first_error.get_or_insert(e);
                    }
                }
                Err(_) => {
                    let silent = answered.iter().position(|a| !a).unwrap_or(0);
                    first_error.get_or_insert(StartError::ShardDied(silent));
                    break;
                }
            }
        }
        drop(reservations);
        if let Some(e) = first_error {
            for (_, tx) in &self.shards {
                let _ = tx.send(ShardMsg::Abort { generation });
            }
            return Err(e);
        }
        for (_, tx) in &self.shards {
            let _ = tx.send(ShardMsg::Commit { generation });
        }
        self.stats.set_certs(certs);
        self.stats.health.set_current(&config.clusters);
        let applied_unix = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        *self
            .shared
            .current
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Arc::new(Generation {
            id: generation,
            config,
            listener_addrs: addrs,
            source: source.to_string(),
            applied_unix,
        });
        Ok(())
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
    /// The address each listener of the current generation is bound to, in config order.
    pub fn listener_addrs(&self) -> Vec<SocketAddr> {
        self.shared.current().listener_addrs.clone()
    }

    /// Stop accepting on every listener and keep running (admin `POST /drain`, as Envoy's
    /// `/drain_listeners`): `/ready` answers 503 so load balancers stop sending, each shard
    /// closes its listening sockets (new connections are refused), open connections continue
    /// (HTTP ones get `connection: close` after their current request). Reloads are refused
    /// from then on; SIGTERM ends the process as usual. Idempotent.
    pub fn drain_listeners(&self) {
        if self.shared.draining.swap(true, Ordering::AcqRel) {
            return;
        }
        for (_, tx) in &self.shards {
            let _ = tx.send(ShardMsg::StopAccepting);
        }
    }

    /// Ask every shard to answer; returns the shards that did not within `timeout` (stuck in
    /// a task that never yields, or dead). The systemd watchdog is fed only when none is.
    pub fn heartbeat(&self, timeout: Duration) -> Vec<usize> {
        let (tx, rx) = std::sync::mpsc::channel();
        for (_, shard) in &self.shards {
            let _ = shard.send(ShardMsg::Heartbeat { ack: tx.clone() });
        }
        drop(tx);
        let deadline = Instant::now() + timeout;
        let mut answered = vec![false; self.shards.len()];
        while answered.iter().any(|a| !a) {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(id) => {
                    if let Some(a) = answered.get_mut(id) {
                        *a = true;
                    }
                }
                Err(_) => break,
            }
        }
        answered
            .iter()
            .enumerate()
            .filter(|(_, a)| !**a)
            .map(|(i, _)| i)
            .collect()
    }

    /// Stop accepting, let open connections finish until `timeout`, then stop the shards.
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

/// Every certificate and bundle root a generation loaded, for `GET /certs` and the expiry
/// gauge.
fn cert_infos(
    config: &Config,
    listener_tls: &[Option<Arc<ListenerTlsState>>],
    cluster_tls: &[Option<Arc<ClusterTlsState>>],
) -> Vec<crate::metrics::CertInfo> {
    use crate::metrics::CertInfo;
    use crate::tls::setup::BundleRoot;
    use meshgate_config::pem::CertSummary;
    fn spiffe_domain(s: &CertSummary) -> Option<String> {
        s.uris.iter().find_map(|u| {
            crate::tls::spiffe::SpiffeId::parse(u)
                .ok()
                .map(|id| id.trust_domain_name().to_owned())
        })
    }
    fn info(
        kind: &'static str,
        owner: (Option<String>, Option<String>),
        trust_domain: Option<String>,
        s: &CertSummary,
        sni: Vec<String>,
        source: &std::path::Path,
    ) -> CertInfo {
        CertInfo {
            kind,
            listener: owner.0,
            cluster: owner.1,
            trust_domain,
            subject: s.subject.clone(),
            serial: s.serial.clone(),
            not_before: s.not_before,
            not_after: s.not_after,
            dns_names: s.dns_names.clone(),
            uris: s.uris.clone(),
            sni,
            source: source.display().to_string(),
        }
    }
    let root = |owner: (Option<String>, Option<String>), r: &BundleRoot| {
        info(
            "bundle_root",
            owner,
            r.trust_domain.as_ref().map(|d| d.as_str().to_owned()),
            &r.summary,
            Vec::new(),
            &r.source,
        )
    };
    let mut out = Vec::new();
    for (l, t) in config.listeners.iter().zip(listener_tls) {
        let Some(t) = t else { continue };
        let owner = || (Some(l.name.clone()), None);
        for c in t.certs.certificates() {
            out.push(info(
                "cert",
                owner(),
                spiffe_domain(&c.summary),
                &c.summary,
                c.sni.clone(),
                &c.source,
            ));
        }
        out.extend(t.bundle_roots.iter().map(|r| root(owner(), r)));
    }
    for (c, t) in config.clusters.iter().zip(cluster_tls) {
        let Some(t) = t else { continue };
        let owner = || (None, Some(c.name.clone()));
        if let Some((summary, source)) = &t.identity {
            out.push(info(
                "cert",
                owner(),
                spiffe_domain(summary),
                summary,
                Vec::new(),
                source,
            ));
        }
        out.extend(t.bundle_roots.iter().map(|r| root(owner(), r)));
    }
    out
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
