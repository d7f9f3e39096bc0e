//! Counters the shards bump and the admin thread reads.
//!
//! Each shard owns its own block of counters (one writer, so `Relaxed` atomics cost what a plain
//! add does and never bounce a cache line between cores); the admin API sums or labels them per
//! shard at scrape time. Names follow Prometheus conventions: `meshgate_*`, base units, `_total`
//! added to counters by the encoder.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};

use crate::tls::spiffe::{Rejection, VerifyCounts};
use std::time::{Instant, SystemTime};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

/// A counter written by one shard only.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }
    #[inline]
    pub fn add(&self, n: u64) {
        // Single writer: load + store is an ordinary add, no locked instruction.
        self.0.store(self.0.load(Relaxed).wrapping_add(n), Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// A gauge written by one shard only.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    #[inline]
    pub fn inc(&self) {
        self.0.store(self.0.load(Relaxed) + 1, Relaxed);
    }
    #[inline]
    pub fn dec(&self) {
        self.0.store(self.0.load(Relaxed) - 1, Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Relaxed)
    }
}

/// Per listener, per shard.
#[derive(Debug, Default)]
pub struct ListenerStats {
    pub accepted: Counter,
    pub active: Gauge,
    pub closed: Counter,
    /// Bytes read from downstream clients.
    pub bytes_in: Counter,
    /// Bytes written to downstream clients.
    pub bytes_out: Counter,
    /// Connections refused because the listener was at `max_connections`.
    pub limit_rejected: Counter,
    /// Connections closed because no data moved for `idle_timeout`.
    pub idle_timeouts: Counter,
    /// accept(2) errors (EMFILE, ENFILE, ...).
    pub accept_errors: Counter,
    /// TLS handshakes by result, version, peer trust domain and failure reason.
    pub tls: TlsHandshakeStats,
    /// Connections closed because no route took them (tls/passthrough listeners).
    pub no_route: Counter,
}

/// TLS handshakes of one listener on one shard. Touched once per handshake (a read lock that
/// only a scrape or a new label contends with, then a single-writer add), never per byte.
/// Labels are bounded: versions and reasons are fixed sets, peer trust domains are the
/// listener's configured ones plus `other` and `none` (see [`crate::tls::peer_domain_label`]).
#[derive(Debug, Default)]
pub struct TlsHandshakeStats {
    /// Completed handshakes per peer trust domain label; index [`Self::slot`].
    done: RwLock<BTreeMap<String, Arc<[Counter; 4]>>>,
    /// Failed handshakes per (reason, version label).
    failed: RwLock<BTreeMap<(&'static str, &'static str), Arc<Counter>>>,
}

impl TlsHandshakeStats {
    const VERSIONS: [&'static str; 2] = ["TLSv1.3", "TLSv1.2"];

    fn slot(version: &str, resumed: bool) -> usize {
        usize::from(version != "TLSv1.3") * 2 + usize::from(resumed)
    }

    /// Count a completed handshake. `version`: [`crate::tls::version_label`];
    /// `peer_domain`: [`crate::tls::peer_domain_label`].
    pub fn completed(&self, version: &'static str, resumed: bool, peer_domain: &str) {
        let slot = Self::slot(version, resumed);
        if let Some(c) = self
            .done
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(peer_domain)
        {
            c[slot].inc();
            return;
        }
        self.done
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(peer_domain.to_owned())
            .or_default()[slot]
            .inc();
    }

    /// Count a failed handshake: `reason` one of [`crate::tls::FAILURE_REASONS`].
    pub fn failed(&self, reason: &'static str, version: &'static str) {
        let key = (reason, version);
        if let Some(c) = self
            .failed
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            c.inc();
            return;
        }
        self.failed
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_default()
            .inc();
    }

    /// Completed handshakes, resumed or not, over all versions and domains.
    pub fn completed_total(&self, resumed: bool) -> u64 {
        self.done
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|c| {
                Self::VERSIONS
                    .iter()
                    .map(|v| c[Self::slot(v, resumed)].get())
                    .sum::<u64>()
            })
            .sum()
    }

    /// Completed handshakes (full and resumed) of `version` (`TLSv1.3` or `TLSv1.2`).
    pub fn version_total(&self, version: &str) -> u64 {
        self.done
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|c| c[Self::slot(version, false)].get() + c[Self::slot(version, true)].get())
            .sum()
    }

    /// Failed handshakes, every reason.
    pub fn failed_total(&self) -> u64 {
        self.failed
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|c| c.get())
            .sum()
    }

    /// `(result, version, peer_trust_domain, reason, count)` of every non-zero series.
    fn series(&self) -> Vec<(&'static str, &'static str, String, &'static str, u64)> {
        let mut out = Vec::new();
        for (domain, c) in self.done.read().unwrap_or_else(|p| p.into_inner()).iter() {
            for version in Self::VERSIONS {
                for (resumed, result) in [(false, "full"), (true, "resumed")] {
                    let n = c[Self::slot(version, resumed)].get();
                    if n > 0 {
                        out.push((result, version, domain.clone(), "none", n));
                    }
                }
            }
        }
        for ((reason, version), c) in self.failed.read().unwrap_or_else(|p| p.into_inner()).iter() {
            out.push(("failed", *version, "none".to_owned(), *reason, c.get()));
        }
        out
    }
}

/// Per cluster, per shard.
#[derive(Debug, Default)]
pub struct ClusterStats {
    pub connects: Counter,
    pub connect_failures: Counter,
    pub connect_timeouts: Counter,
    pub active: Gauge,
    /// Bytes written to upstream endpoints.
    pub bytes_sent: Counter,
    /// Bytes read from upstream endpoints.
    pub bytes_received: Counter,
}

/// One shard's counters, keyed by listener and cluster *name* so they carry over config
/// reloads (a listener that keeps its name keeps its counters). Only the shard that owns this
/// block writes the counters; the maps are locked only when a config generation is applied
/// and when the admin API reads them, never per connection.
#[derive(Debug, Default)]
pub struct ShardStats {
    listeners: RwLock<BTreeMap<String, Arc<ListenerStats>>>,
    clusters: RwLock<BTreeMap<String, Arc<ClusterStats>>>,
    /// HTTP requests per (listener, route): bounded by the config's names.
    http: RwLock<BTreeMap<(String, String), Arc<HttpRouteStats>>>,
}

/// One shard's HTTP request counters keyed by (listener, route).
type HttpSnapshot = Vec<((String, String), Arc<HttpRouteStats>)>;

/// HTTP requests of one route of one listener (per shard), by response class. The route
/// label of requests no route took (404, or refused before routing) is [`HttpRouteStats::NO_ROUTE`].
#[derive(Debug, Default)]
pub struct HttpRouteStats {
    /// 1xx .. 5xx.
    by_class: [Counter; 5],
}

impl HttpRouteStats {
    /// Route label of requests that no route took; not a valid route name, so no clash.
    pub const NO_ROUTE: &'static str = "(none)";
    const CLASSES: [&'static str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

    /// Count one response with `status`.
    #[inline]
    pub fn count(&self, status: u16) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.by_class[class].inc();
    }
}

impl ShardStats {
    /// The counters of listener `name`, created on first use.
    pub fn listener(&self, name: &str) -> Arc<ListenerStats> {
        get_or_insert(&self.listeners, name)
    }

    /// The counters of cluster `name`, created on first use.
    pub fn cluster(&self, name: &str) -> Arc<ClusterStats> {
        get_or_insert(&self.clusters, name)
    }

    fn listener_snapshot(&self) -> Vec<(String, Arc<ListenerStats>)> {
        snapshot(&self.listeners)
    }

    fn cluster_snapshot(&self) -> Vec<(String, Arc<ClusterStats>)> {
        snapshot(&self.clusters)
    }

    /// The HTTP request counters of `route` on `listener`, created on first use.
    pub fn http_route(&self, listener: &str, route: &str) -> Arc<HttpRouteStats> {
        let key = (listener.to_owned(), route.to_owned());
        if let Some(v) = self
            .http
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return v.clone();
        }
        self.http
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_default()
            .clone()
    }

    fn http_snapshot(&self) -> HttpSnapshot {
        self.http
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

fn get_or_insert<T: Default>(map: &RwLock<BTreeMap<String, Arc<T>>>, name: &str) -> Arc<T> {
    if let Some(v) = map.read().unwrap_or_else(|p| p.into_inner()).get(name) {
        return v.clone();
    }
    map.write()
        .unwrap_or_else(|p| p.into_inner())
        .entry(name.to_string())
        .or_default()
        .clone()
}

fn snapshot<T>(map: &RwLock<BTreeMap<String, Arc<T>>>) -> Vec<(String, Arc<T>)> {
    map.read()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Everything the admin API reports about the dataplane.
#[derive(Debug)]
pub struct Stats {
    pub shards: Vec<Arc<ShardStats>>,
    pub started: Instant,
    pub started_unix: u64,
    /// Config generation in force (1 = the config the process started with).
    pub generation: AtomicU64,
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
    /// Reloads triggered by changed TLS files (`runtime.watch_files`), applied / refused.
    pub watch_reloads_ok: AtomicU64,
    pub watch_reloads_failed: AtomicU64,
    /// The access log, when one is configured (its dropped/written counts are exported).
    pub access_log: Option<crate::accesslog::AccessLog>,
    /// Peer-certificate verification outcomes, keyed `listener:NAME` / `cluster:NAME`; kept
    /// across reloads.
    verify: Mutex<BTreeMap<String, Arc<VerifyCounts>>>,
    /// Certificates and bundle roots loaded by the current generation.
    certs: Mutex<Vec<CertInfo>>,
}

/// A loaded certificate, as `GET /certs` and the expiry gauge report it: one a listener serves
/// or a cluster presents (`kind = "cert"`), or a root of a trust bundle (`"bundle_root"`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct CertInfo {
    /// `cert` or `bundle_root`.
    pub kind: &'static str,
    /// The listener that serves it or trusts it (set when `cluster` is not).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listener: Option<String>,
    /// The cluster that presents it (`identity`) or trusts it (`trust_bundle`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// Bundle roots: the trust domain of the bundle; certificates: the trust domain of their
    /// SPIFFE ID. `None`: no SPIFFE trust domain (a DNS certificate, web PKI roots).
    pub trust_domain: Option<String>,
    pub subject: String,
    pub serial: String,
    pub not_before: i64,
    pub not_after: i64,
    pub dns_names: Vec<String>,
    pub uris: Vec<String>,
    /// SNI names it is chosen for; empty for the default certificate and for everything
    /// but served certificates.
    pub sni: Vec<String>,
    /// The file it was loaded from.
    pub source: String,
}

impl Stats {
    pub fn new(shards: usize, access_log: Option<crate::accesslog::AccessLog>) -> Self {
        Stats {
            access_log,
            verify: Mutex::new(BTreeMap::new()),
            certs: Mutex::new(Vec::new()),
            shards: (0..shards)
                .map(|_| Arc::new(ShardStats::default()))
                .collect(),
            started: Instant::now(),
            started_unix: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            generation: AtomicU64::new(1),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            watch_reloads_ok: AtomicU64::new(0),
            watch_reloads_failed: AtomicU64::new(0),
        }
    }

    /// Replace the list of loaded certificates (on every applied generation).
    pub fn set_certs(&self, certs: Vec<CertInfo>) {
        *self.certs.lock().unwrap_or_else(|p| p.into_inner()) = certs;
    }

    /// The certificates and bundle roots loaded now.
    pub fn certs(&self) -> Vec<CertInfo> {
        self.certs.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The verification counters for `key` (`listener:NAME` or `cluster:NAME`).
    pub fn verify_counts(&self, key: &str) -> Arc<VerifyCounts> {
        self.verify
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.to_string())
            .or_default()
            .clone()
    }

    /// Sum of one listener counter over all shards.
    pub fn listener_total(&self, name: &str, f: impl Fn(&ListenerStats) -> u64) -> u64 {
        self.shards.iter().map(|s| f(&s.listener(name))).sum()
    }

    pub fn listener_active(&self, name: &str) -> i64 {
        self.shards
            .iter()
            .map(|s| s.listener(name).active.get())
            .sum()
    }

    pub fn cluster_total(&self, name: &str, f: impl Fn(&ClusterStats) -> u64) -> u64 {
        self.shards.iter().map(|s| f(&s.cluster(name))).sum()
    }

    pub fn cluster_active(&self, name: &str) -> i64 {
        self.shards
            .iter()
            .map(|s| s.cluster(name).active.get())
            .sum()
    }

    /// Render the Prometheus/OpenMetrics text exposition.
    pub fn render(self: &Arc<Self>, build: &BuildInfo) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Exporter {
            stats: self.clone(),
            build: build.clone(),
        }));
        let mut out = String::with_capacity(8192);
        // Encoding into a String cannot fail except on a fmt::Error from our own collector.
        if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
            out.push_str("# encoding error\n");
        }
        out
    }
}

/// `meshgate_build_info` labels.
#[derive(Debug, Clone)]
pub struct BuildInfo {
    pub version: &'static str,
    pub ring_mode: String,
}

/// (metric name, help, how to read it from one shard's stats block)
type CounterDef<S> = (&'static str, &'static str, fn(&S) -> u64);

#[derive(Debug)]
struct Exporter {
    stats: Arc<Stats>,
    build: BuildInfo,
}

fn family<M: EncodeMetric>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    kind: MetricType,
    series: impl IntoIterator<Item = (Vec<(&'static str, String)>, M)>,
) -> Result<(), std::fmt::Error> {
    let mut fam = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, metric) in series {
        let l: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
        metric.encode(fam.encode_family(&l)?)?;
    }
    Ok(())
}

impl Collector for Exporter {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let s = &self.stats;
        let lsnap: Vec<Vec<(String, Arc<ListenerStats>)>> =
            s.shards.iter().map(|ss| ss.listener_snapshot()).collect();
        let csnap: Vec<Vec<(String, Arc<ClusterStats>)>> =
            s.shards.iter().map(|ss| ss.cluster_snapshot()).collect();
        family(
            &mut enc,
            "meshgate_config_generation",
            "Config generation in force (1 = as started; +1 per applied reload)",
            MetricType::Gauge,
            [(vec![], ConstGauge::new(s.generation.load(Relaxed) as i64))],
        )?;
        if let Some(log) = &s.access_log {
            family(
                &mut enc,
                "meshgate_access_log_records",
                "Access-log records by outcome (dropped: the writer was behind and the queue full)",
                MetricType::Counter,
                [
                    (
                        vec![("outcome", "written".to_string())],
                        ConstCounter::new(log.written()),
                    ),
                    (
                        vec![("outcome", "dropped".to_string())],
                        ConstCounter::new(log.dropped()),
                    ),
                ],
            )?;
        }
        family(
            &mut enc,
            "meshgate_config_reloads",
            "Config reloads by result",
            MetricType::Counter,
            [
                (
                    vec![("result", "ok".to_string())],
                    ConstCounter::new(s.reloads_ok.load(Relaxed)),
                ),
                (
                    vec![("result", "error".to_string())],
                    ConstCounter::new(s.reloads_failed.load(Relaxed)),
                ),
            ],
        )?;
        family(
            &mut enc,
            "meshgate_tls_file_reloads",
            "Reloads triggered by a changed certificate, key, bundle or CRL file (runtime.watch_files) by result (error: the new files were refused and the old material stays in force)",
            MetricType::Counter,
            [
                (
                    vec![("result", "ok".to_string())],
                    ConstCounter::new(s.watch_reloads_ok.load(Relaxed)),
                ),
                (
                    vec![("result", "error".to_string())],
                    ConstCounter::new(s.watch_reloads_failed.load(Relaxed)),
                ),
            ],
        )?;
        family(
            &mut enc,
            "meshgate_build_info",
            "Build and runtime information",
            MetricType::Gauge,
            [(
                vec![
                    ("version", self.build.version.to_string()),
                    ("ring_mode", self.build.ring_mode.clone()),
                ],
                ConstGauge::new(1i64),
            )],
        )?;
        family(
            &mut enc,
            "meshgate_start_time_seconds",
            "Unix time the gateway started",
            MetricType::Gauge,
            [(vec![], ConstGauge::new(s.started_unix as i64))],
        )?;

        let lcounters: [CounterDef<ListenerStats>; 8] = [
            (
                "meshgate_listener_no_route",
                "Connections closed because no route took them (SNI / peer identity)",
                |l| l.no_route.get(),
            ),
            (
                "meshgate_listener_connections_accepted",
                "Downstream connections accepted",
                |l| l.accepted.get(),
            ),
            (
                "meshgate_listener_connections_closed",
                "Downstream connections closed",
                |l| l.closed.get(),
            ),
            (
                "meshgate_listener_received_bytes",
                "Bytes received from downstream",
                |l| l.bytes_in.get(),
            ),
            (
                "meshgate_listener_sent_bytes",
                "Bytes sent to downstream",
                |l| l.bytes_out.get(),
            ),
            (
                "meshgate_listener_connection_limit_rejections",
                "Connections refused at the listener's max_connections",
                |l| l.limit_rejected.get(),
            ),
            (
                "meshgate_listener_idle_timeouts",
                "Connections closed by the idle timeout",
                |l| l.idle_timeouts.get(),
            ),
            (
                "meshgate_listener_accept_errors",
                "accept() errors (e.g. out of file descriptors)",
                |l| l.accept_errors.get(),
            ),
        ];
        for (name, help, get) in lcounters {
            let series = lsnap.iter().enumerate().flat_map(|(shard, ss)| {
                ss.iter().map(move |(name, l)| {
                    (
                        vec![("listener", name.clone()), ("shard", shard.to_string())],
                        ConstCounter::new(get(l)),
                    )
                })
            });
            family(&mut enc, name, help, MetricType::Counter, series)?;
        }
        let series = lsnap.iter().enumerate().flat_map(|(shard, ss)| {
            ss.iter().map(move |(name, l)| {
                (
                    vec![("listener", name.clone()), ("shard", shard.to_string())],
                    ConstGauge::new(l.active.get()),
                )
            })
        });
        family(
            &mut enc,
            "meshgate_listener_connections_active",
            "Downstream connections open now",
            MetricType::Gauge,
            series,
        )?;

        let tls_series = lsnap.iter().enumerate().flat_map(|(shard, ss)| {
            ss.iter().flat_map(move |(name, l)| {
                l.tls
                    .series()
                    .into_iter()
                    .map(move |(result, version, domain, reason, n)| {
                        (
                            vec![
                                ("listener", name.clone()),
                                ("shard", shard.to_string()),
                                ("result", result.to_string()),
                                ("version", version.to_string()),
                                ("peer_trust_domain", domain),
                                ("reason", reason.to_string()),
                            ],
                            ConstCounter::new(n),
                        )
                    })
            })
        });
        family(
            &mut enc,
            "meshgate_tls_handshakes",
            "TLS handshakes on tls listeners by result (full, resumed, failed), version, verified peer trust domain (configured domains, other, none) and failure reason (none when completed)",
            MetricType::Counter,
            tls_series,
        )?;
        let mut seen = std::collections::HashSet::new();
        let series = s
            .certs()
            .into_iter()
            .map(|c| {
                let mut labels = vec![("kind", c.kind.to_string())];
                if let Some(l) = c.listener {
                    labels.push(("listener", l));
                }
                if let Some(cl) = c.cluster {
                    labels.push(("cluster", cl));
                }
                labels.push((
                    "trust_domain",
                    c.trust_domain.unwrap_or_else(|| "none".to_owned()),
                ));
                labels.push(("serial", c.serial));
                labels.push(("subject", c.subject));
                (labels, ConstGauge::new(c.not_after))
            })
            // The same root in two bundles of one listener would repeat a series.
            .filter(|(labels, _)| seen.insert(labels.clone()));
        family(
            &mut enc,
            "meshgate_cert_expiry_timestamp_seconds",
            "Unix time at which each loaded certificate (kind=cert: served by a listener or presented to a cluster) and trust-bundle root (kind=bundle_root) expires",
            MetricType::Gauge,
            series,
        )?;
        let verify: Vec<(String, Arc<VerifyCounts>)> = s
            .verify
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut series = Vec::new();
        for (key, counts) in &verify {
            let (scope, name) = key.split_once(':').unwrap_or(("", key));
            series.push((
                vec![
                    ("scope", scope.to_string()),
                    ("name", name.to_string()),
                    ("result", "accepted".to_string()),
                ],
                ConstCounter::new(counts.accepted_total()),
            ));
            for reason in Rejection::ALL {
                let n = counts.rejected_total(reason);
                if n > 0 {
                    series.push((
                        vec![
                            ("scope", scope.to_string()),
                            ("name", name.to_string()),
                            ("result", reason.as_str().to_string()),
                        ],
                        ConstCounter::new(n),
                    ));
                }
            }
        }
        family(
            &mut enc,
            "meshgate_tls_peer_verifications",
            "Peer certificate verifications (scope=listener: client certificates; scope=cluster: upstream certificates) by result or rejection reason",
            MetricType::Counter,
            series,
        )?;

        let ccounters: [CounterDef<ClusterStats>; 5] = [
            (
                "meshgate_cluster_upstream_connections",
                "Upstream connections established",
                |c| c.connects.get(),
            ),
            (
                "meshgate_cluster_upstream_connect_failures",
                "Upstream connection attempts that failed (refused, unreachable, timed out)",
                |c| c.connect_failures.get(),
            ),
            (
                "meshgate_cluster_upstream_connect_timeouts",
                "Upstream connection attempts that timed out",
                |c| c.connect_timeouts.get(),
            ),
            (
                "meshgate_cluster_upstream_sent_bytes",
                "Bytes sent to upstream endpoints",
                |c| c.bytes_sent.get(),
            ),
            (
                "meshgate_cluster_upstream_received_bytes",
                "Bytes received from upstream endpoints",
                |c| c.bytes_received.get(),
            ),
        ];
        for (name, help, get) in ccounters {
            let series = csnap.iter().enumerate().flat_map(|(shard, ss)| {
                ss.iter().map(move |(name, c)| {
                    (
                        vec![("cluster", name.clone()), ("shard", shard.to_string())],
                        ConstCounter::new(get(c)),
                    )
                })
            });
            family(&mut enc, name, help, MetricType::Counter, series)?;
        }
        let series = csnap.iter().enumerate().flat_map(|(shard, ss)| {
            ss.iter().map(move |(name, c)| {
                (
                    vec![("cluster", name.clone()), ("shard", shard.to_string())],
                    ConstGauge::new(c.active.get()),
                )
            })
        });
        family(
            &mut enc,
            "meshgate_cluster_upstream_connections_active",
            "Upstream connections open now",
            MetricType::Gauge,
            series,
        )?;
        let hsnap: Vec<HttpSnapshot> = s.shards.iter().map(|ss| ss.http_snapshot()).collect();
        let series = hsnap.iter().enumerate().flat_map(|(shard, ss)| {
            ss.iter().flat_map(move |((listener, route), h)| {
                HttpRouteStats::CLASSES
                    .iter()
                    .zip(&h.by_class)
                    .filter(|(_, c)| c.get() > 0)
                    .map(move |(class, c)| {
                        (
                            vec![
                                ("listener", listener.clone()),
                                ("route", route.clone()),
                                ("code_class", (*class).to_string()),
                                ("shard", shard.to_string()),
                            ],
                            ConstCounter::new(c.get()),
                        )
                    })
            })
        });
        family(
            &mut enc,
            "meshgate_http_requests",
            "HTTP requests answered, by listener, route (\"(none)\": no route took it) and response class",
            MetricType::Counter,
            series,
        )?;
        Ok(())
    }
}
