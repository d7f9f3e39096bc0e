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
use std::time::{Duration, Instant, SystemTime};

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
    /// HTTP requests in flight to the cluster on this shard (the retry budget's base).
    pub rq_active: Gauge,
    /// Of those, requests that retried (the retry budget's count).
    pub retries_active: Gauge,
    /// HTTP retries by reason (`retry::RETRY_REASONS`).
    pub retries: [Counter; crate::retry::RETRY_REASONS.len()],
    /// Retries the cluster's retry budget refused.
    pub retry_budget_exhausted: Counter,
    /// Requests refused by a circuit breaker, by limit (`retry::LIMIT_NAMES`).
    pub overflow: [Counter; 3],
}

/// One shard's counters, keyed by listener and cluster *name* so they carry over config
/// reloads (a listener that keeps its name keeps its counters). Only the shard that owns this
/// block writes the counters; the maps are locked only when a config generation is applied
/// and when the admin API reads them, never per connection.
#[derive(Debug, Default)]
pub struct ShardStats {
    listeners: RwLock<BTreeMap<String, Arc<ListenerStats>>>,
    clusters: RwLock<BTreeMap<String, Arc<ClusterStats>>>,
    /// HTTP requests per (listener, route, cluster): bounded by the config's names.
    http: RwLock<BTreeMap<HttpKey, Arc<RequestStats>>>,
    /// TCP connections per (listener, cluster).
    tcp: RwLock<BTreeMap<(String, String), Arc<TcpStats>>>,
    /// Calls refused by `[[policies]]` per (listener, policy); bounded by the config's names.
    authz: RwLock<BTreeMap<(String, String), Arc<Counter>>>,
    /// Istio-compatible series, with `[telemetry] istio_compat` only.
    istio: Option<Arc<IstioShard>>,
    /// The shard's runtime idle-time counter (ns) and when the shard started, set once by the
    /// shard itself.
    runtime: std::sync::OnceLock<(Arc<crate::rt::IdleClock>, Instant)>,
}

/// (listener, route, cluster) of HTTP request stats.
type HttpKey = (String, String, String);
type HttpSnapshot = Vec<(HttpKey, Arc<RequestStats>)>;

/// Upper bounds, in microseconds, of the duration histograms' buckets: 0.5 ms .. 60 s (and
/// +Inf). Fixed, so that shards merge by adding and dashboards can rely on them.
pub const DURATION_BUCKETS_US: [u64; 16] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000, 10_000_000, 30_000_000, 60_000_000,
];
/// Upper bounds, in bytes, of the per-connection byte histograms: 256 B .. 1 GiB (and +Inf).
pub const BYTES_BUCKETS: [u64; 12] = [
    256,
    1 << 10,
    4 << 10,
    16 << 10,
    64 << 10,
    256 << 10,
    1 << 20,
    4 << 20,
    16 << 20,
    64 << 20,
    256 << 20,
    1 << 30,
];

/// `d` in whole microseconds without `as_micros`' 128-bit arithmetic (saturating).
#[inline]
fn micros(d: Duration) -> u64 {
    d.as_secs()
        .saturating_mul(1_000_000)
        .saturating_add(u64::from(d.subsec_micros()))
}

/// A histogram written by one shard only: a counter per bucket (not cumulative; the encoder
/// accumulates at scrape) and the sum of the observed values in the bounds' unit. `N` is the
/// number of bounds plus one (+Inf). The count is the sum of the buckets, so an observation
/// costs a bucket search and two adds.
#[derive(Debug)]
pub struct Histogram<const N: usize> {
    buckets: [Counter; N],
    sum: Counter,
}

impl<const N: usize> Default for Histogram<N> {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| Counter::default()),
            sum: Counter::default(),
        }
    }
}

impl<const N: usize> Histogram<N> {
    /// Count `v` in the first bucket whose bound is `>= v` (`bounds.len() == N - 1`).
    #[inline]
    pub fn observe(&self, bounds: &[u64], v: u64) {
        debug_assert_eq!(bounds.len() + 1, N);
        let i = bounds.partition_point(|&b| b < v).min(N - 1);
        self.buckets[i].inc();
        self.sum.add(v);
    }

    /// Add this shard's counts into `into` (per bucket, then the sum).
    fn merge_into(&self, into: &mut HistogramSnapshot) {
        if into.buckets.len() < N {
            into.buckets.resize(N, 0);
        }
        for (acc, b) in into.buckets.iter_mut().zip(&self.buckets) {
            *acc += b.get();
        }
        into.sum += self.sum.get();
    }

    fn count(&self) -> u64 {
        self.buckets.iter().map(Counter::get).sum()
    }
}

/// A histogram summed over shards, for encoding.
#[derive(Debug, Default, Clone)]
struct HistogramSnapshot {
    buckets: Vec<u64>,
    sum: u64,
}

/// A histogram as the encoder writes it: `bounds` and `sum` scaled into the metric's unit.
#[derive(Debug)]
struct ConstHistogram {
    sum: f64,
    count: u64,
    /// (upper bound, count in this bucket alone); the last bound is +Inf.
    buckets: Vec<(f64, u64)>,
}

impl ConstHistogram {
    fn new(snap: &HistogramSnapshot, bounds: &[u64], divisor: f64) -> ConstHistogram {
        let buckets = bounds
            .iter()
            .map(|&b| b as f64 / divisor)
            // prometheus-client writes `le="+Inf"` for f64::MAX.
            .chain([f64::MAX])
            .zip(snap.buckets.iter().copied())
            .collect();
        ConstHistogram {
            sum: snap.sum as f64 / divisor,
            count: snap.buckets.iter().sum(),
            buckets,
        }
    }
}

impl EncodeMetric for ConstHistogram {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            self.sum,
            self.count,
            &self.buckets,
            None,
        )
    }
    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// HTTP requests of one (listener, route, cluster) on one shard, by response class: a counter
/// and a duration histogram (request head received -> response sent, microseconds) per class.
#[derive(Debug, Default)]
pub struct RequestStats {
    /// 1xx .. 5xx.
    by_class: [Counter; 5],
    duration: [Histogram<17>; 5],
}

impl RequestStats {
    #[inline]
    fn record(&self, status: u16, elapsed: Duration) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.by_class[class].inc();
        let us = micros(elapsed);
        self.duration[class].observe(&DURATION_BUCKETS_US, us);
    }
}

/// One finished HTTP request, as the proxy reports it to [`HttpRouteStats::record_request`].
#[derive(Debug, Clone, Copy)]
pub struct RequestRecord<'a> {
    /// Index (in the config) of the cluster the request went to; None when the gateway
    /// answered itself.
    pub cluster: Option<usize>,
    pub status: u16,
    /// From the complete request head to the end of the response.
    pub elapsed: Duration,
    /// Envoy response flags, `-` for none.
    pub flags: &'static str,
    /// Istio's `request_protocol`: `http` or `grpc`.
    pub protocol: &'static str,
    /// The client's verified SPIFFE ID (mTLS), if any.
    pub peer: Option<&'a str>,
    /// Bytes received from / sent to the client for this request.
    pub request_bytes: u64,
    pub response_bytes: u64,
}

/// The request stats of one route of one listener on one shard, for one config generation:
/// one [`RequestStats`] per cluster the route forwards to, plus one for answers the gateway
/// gives itself (no cluster). The route label of requests no route took (404, or refused
/// before routing) is [`HttpRouteStats::NO_ROUTE`].
#[derive(Debug)]
pub struct HttpRouteStats {
    local: Arc<RequestStats>,
    /// (cluster index in the config, cluster name, its stats); a route has few clusters.
    targets: Box<[RouteTarget]>,
    /// Istio-compatible series (`[telemetry] istio_compat`), else None.
    istio: Option<Arc<IstioShard>>,
}

/// (cluster index in the config, cluster name, its request stats).
type RouteTarget = (usize, Arc<str>, Arc<RequestStats>);

impl HttpRouteStats {
    /// Route (and cluster) label of requests that no route (or cluster) took; not a valid
    /// name, so no clash.
    pub const NO_ROUTE: &'static str = "(none)";
    const CLASSES: [&'static str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

    /// The hook for one finished HTTP request (every HTTP version calls it once per request).
    #[inline]
    pub fn record_request(&self, r: &RequestRecord<'_>) {
        let target = r
            .cluster
            .and_then(|c| self.targets.iter().find(|(i, _, _)| *i == c));
        target
            .map_or(&self.local, |(_, _, s)| s)
            .record(r.status, r.elapsed);
        if let Some(istio) = &self.istio {
            istio.request(target.map(|(_, name, _)| name), r);
        }
    }
}

/// TCP connections of one (listener, cluster) on one shard: how long they lasted and how many
/// bytes each moved (received from / sent to the client).
#[derive(Debug, Default)]
pub struct TcpStats {
    duration: Histogram<17>,
    received: Histogram<13>,
    sent: Histogram<13>,
}

/// One (listener, cluster)'s TCP hooks on one shard, for one config generation.
#[derive(Debug)]
pub struct TcpRouteStats {
    pub cluster: usize,
    name: Arc<str>,
    stats: Arc<TcpStats>,
    istio: Option<Arc<IstioShard>>,
}

/// One finished TCP connection, as the proxy reports it to [`TcpRouteStats::closed`].
#[derive(Debug, Clone, Copy)]
pub struct ConnectionRecord<'a> {
    pub elapsed: Duration,
    /// Bytes received from / sent to the client.
    pub received: u64,
    pub sent: u64,
    pub flags: &'static str,
    /// The client's verified SPIFFE ID (mTLS), if any.
    pub peer: Option<&'a str>,
}

impl TcpRouteStats {
    /// The hook for a connection routed to this cluster (before the upstream connect).
    #[inline]
    pub fn opened(&self, peer: Option<&str>) {
        if let Some(istio) = &self.istio {
            istio.tcp_opened(&self.name, peer);
        }
    }

    /// The hook for a connection that [`opened`](Self::opened) and ended.
    #[inline]
    pub fn closed(&self, r: &ConnectionRecord<'_>) {
        let us = micros(r.elapsed);
        self.stats.duration.observe(&DURATION_BUCKETS_US, us);
        self.stats.received.observe(&BYTES_BUCKETS, r.received);
        self.stats.sent.observe(&BYTES_BUCKETS, r.sent);
        if let Some(istio) = &self.istio {
            istio.tcp_closed(&self.name, r);
        }
    }
}

/// Istio's request-duration buckets, in microseconds (its milliseconds bounds x 1000).
const ISTIO_DURATION_BUCKETS_US: [u64; 19] = [
    500,
    1_000,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    30_000_000,
    60_000_000,
    300_000_000,
    600_000_000,
    1_800_000_000,
    3_600_000_000,
];
/// Istio's request/response size buckets, in bytes.
const ISTIO_BYTES_BUCKETS: [u64; 8] = [1, 10, 100, 1_000, 10_000, 100_000, 1_000_000, 10_000_000];
/// Distinct peer identities a shard keeps as `source_principal` values; later ones are
/// counted as `unknown`, so a flood of identities cannot grow the exposition without bound.
const ISTIO_MAX_PRINCIPALS: usize = 1024;

/// The label values of one Istio series (besides the constant ones).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct IstioKey {
    tcp: bool,
    /// Destination cluster name; None: answered by the gateway.
    destination: Option<Arc<str>>,
    /// 0 for TCP.
    code: u16,
    flags: &'static str,
    protocol: &'static str,
    principal: Option<Arc<str>>,
}

/// Plain counts: only touched under the shard's lock.
#[derive(Debug, Clone, Default)]
struct IstioSeries {
    duration: [u64; 20],
    duration_sum_us: u64,
    request_bytes: [u64; 9],
    request_bytes_sum: u64,
    response_bytes: [u64; 9],
    response_bytes_sum: u64,
    tcp_opened: u64,
    tcp_closed: u64,
    tcp_received: u64,
    tcp_sent: u64,
}

fn bump(buckets: &mut [u64], bounds: &[u64], v: u64) {
    let i = bounds.partition_point(|&b| b < v).min(buckets.len() - 1);
    buckets[i] += 1;
}

/// One shard's Istio-compatible series. A lock (uncontended but for scrapes) guards a map
/// whose keys include the response code and peer identity, so it exists only with
/// `[telemetry] istio_compat = true`.
#[derive(Debug, Default)]
pub struct IstioShard {
    inner: Mutex<IstioInner>,
}

#[derive(Debug, Default)]
struct IstioInner {
    series: std::collections::HashMap<IstioKey, IstioSeries>,
    principals: std::collections::HashMap<Box<str>, Arc<str>>,
    /// `unknown`, for identities past [`ISTIO_MAX_PRINCIPALS`].
    overflow: Option<Arc<str>>,
}

impl IstioInner {
    fn principal(&mut self, peer: Option<&str>) -> Option<Arc<str>> {
        let peer = peer?;
        if let Some(p) = self.principals.get(peer) {
            return Some(p.clone());
        }
        if self.principals.len() >= ISTIO_MAX_PRINCIPALS {
            return Some(
                self.overflow
                    .get_or_insert_with(|| Arc::from("unknown"))
                    .clone(),
            );
        }
        let p: Arc<str> = Arc::from(peer);
        self.principals.insert(peer.into(), p.clone());
        Some(p)
    }

    fn series(
        &mut self,
        tcp: bool,
        destination: Option<&Arc<str>>,
        code: u16,
        flags: &'static str,
        protocol: &'static str,
        peer: Option<&str>,
    ) -> &mut IstioSeries {
        let key = IstioKey {
            tcp,
            destination: destination.cloned(),
            code,
            flags,
            protocol,
            principal: self.principal(peer),
        };
        self.series.entry(key).or_default()
    }
}

impl IstioShard {
    fn lock(&self) -> std::sync::MutexGuard<'_, IstioInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn request(&self, destination: Option<&Arc<str>>, r: &RequestRecord<'_>) {
        let mut inner = self.lock();
        let s = inner.series(false, destination, r.status, r.flags, r.protocol, r.peer);
        let us = micros(r.elapsed);
        bump(&mut s.duration, &ISTIO_DURATION_BUCKETS_US, us);
        s.duration_sum_us += us;
        bump(&mut s.request_bytes, &ISTIO_BYTES_BUCKETS, r.request_bytes);
        s.request_bytes_sum += r.request_bytes;
        bump(
            &mut s.response_bytes,
            &ISTIO_BYTES_BUCKETS,
            r.response_bytes,
        );
        s.response_bytes_sum += r.response_bytes;
    }

    fn tcp_opened(&self, destination: &Arc<str>, peer: Option<&str>) {
        let mut inner = self.lock();
        inner
            .series(true, Some(destination), 0, "-", "tcp", peer)
            .tcp_opened += 1;
    }

    fn tcp_closed(&self, destination: &Arc<str>, r: &ConnectionRecord<'_>) {
        let mut inner = self.lock();
        // Opened with flags "-": the flags of a closed connection are only known at its end.
        let s = inner.series(true, Some(destination), 0, r.flags, "tcp", r.peer);
        s.tcp_closed += 1;
        s.tcp_received += r.received;
        s.tcp_sent += r.sent;
    }

    fn snapshot(&self) -> Vec<(IstioKey, IstioSeries)> {
        self.lock()
            .series
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
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

    /// The request stats of `route` on `listener` for a generation: one slot per cluster in
    /// `targets` (the route's weighted clusters) and one for answers without a cluster.
    pub fn http_route(
        &self,
        listener: &str,
        route: &str,
        targets: &[meshgate_config::WeightedCluster],
    ) -> Arc<HttpRouteStats> {
        let get = |cluster: &str| {
            let key = (listener.to_owned(), route.to_owned(), cluster.to_owned());
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
        };
        Arc::new(HttpRouteStats {
            local: get(HttpRouteStats::NO_ROUTE),
            targets: targets
                .iter()
                .map(|t| {
                    (
                        t.cluster_index,
                        Arc::from(t.cluster.as_str()),
                        get(&t.cluster),
                    )
                })
                .collect(),
            istio: self.istio.clone(),
        })
    }

    /// The TCP connection hooks of (`listener`, `target`'s cluster) for a generation.
    pub fn tcp(&self, listener: &str, target: &meshgate_config::WeightedCluster) -> TcpRouteStats {
        let key = (listener.to_owned(), target.cluster.clone());
        let existing = self
            .tcp
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .cloned();
        let stats = existing.unwrap_or_else(|| {
            self.tcp
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .entry(key)
                .or_default()
                .clone()
        });
        TcpRouteStats {
            cluster: target.cluster_index,
            name: Arc::from(target.cluster.as_str()),
            stats,
            istio: self.istio.clone(),
        }
    }

    /// The refusal counter of (`listener`, `policy`), created on first use.
    pub fn authz_denied(&self, listener: &str, policy: &str) -> Arc<Counter> {
        let key = (listener.to_owned(), policy.to_owned());
        if let Some(c) = self
            .authz
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return c.clone();
        }
        self.authz
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_default()
            .clone()
    }

    fn authz_snapshot(&self) -> Vec<((String, String), u64)> {
        self.authz
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.get()))
            .collect()
    }

    /// Called by the shard when it starts, with its runtime's idle-time counter.
    pub fn set_idle_counter(&self, idle: Arc<crate::rt::IdleClock>) {
        let _ = self.runtime.set((idle, Instant::now()));
    }

    /// (busy, idle) time of the shard so far.
    fn utilisation(&self) -> Option<(Duration, Duration)> {
        let (idle, since) = self.runtime.get()?;
        let idle = idle.idle();
        Some((since.elapsed().saturating_sub(idle), idle))
    }

    fn http_snapshot(&self) -> HttpSnapshot {
        self.http
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn tcp_snapshot(&self) -> Vec<((String, String), Arc<TcpStats>)> {
        self.tcp
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
    /// Endpoint health and ejections, by cluster and endpoint; kept across reloads.
    pub health: crate::health::Registry,
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
        Self::with_options(shards, access_log, false)
    }

    /// `istio_compat`: also keep and export Istio's standard metrics.
    pub fn with_options(
        shards: usize,
        access_log: Option<crate::accesslog::AccessLog>,
        istio_compat: bool,
    ) -> Self {
        Stats {
            access_log,
            verify: Mutex::new(BTreeMap::new()),
            certs: Mutex::new(Vec::new()),
            health: crate::health::Registry::default(),
            shards: (0..shards)
                .map(|_| {
                    Arc::new(ShardStats {
                        istio: istio_compat.then(Arc::default),
                        ..ShardStats::default()
                    })
                })
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

    /// Per shard: (open downstream connections, (busy, idle) time so far).
    pub fn shard_summary(&self) -> Vec<(i64, Option<(Duration, Duration)>)> {
        self.shards
            .iter()
            .map(|ss| {
                let open = ss
                    .listener_snapshot()
                    .iter()
                    .map(|(_, l)| l.active.get())
                    .sum();
                (open, ss.utilisation())
            })
            .collect()
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

/// Retries, retry-budget refusals and circuit-breaker overflows per cluster and shard.
fn cluster_retry_families(
    enc: &mut DescriptorEncoder<'_>,
    csnap: &[Vec<(String, Arc<ClusterStats>)>],
) -> Result<(), std::fmt::Error> {
    use crate::retry::{LIMIT_NAMES, RETRY_REASONS};
    let labelled = |names: &'static [&'static str],
                    key: &'static str,
                    get: fn(&ClusterStats) -> &[Counter]| {
        csnap.iter().enumerate().flat_map(move |(shard, ss)| {
            ss.iter().flat_map(move |(cluster, c)| {
                names
                    .iter()
                    .zip(get(c))
                    .filter(|(_, n)| n.get() > 0)
                    .map(move |(label, n)| {
                        (
                            vec![
                                ("cluster", cluster.clone()),
                                (key, (*label).to_string()),
                                ("shard", shard.to_string()),
                            ],
                            ConstCounter::new(n.get()),
                        )
                    })
            })
        })
    };
    family(
        enc,
        "meshgate_http_retries",
        "HTTP requests tried again on another attempt, by cluster and reason (connect-failure, reset, per-try-timeout, status, refused-stream)",
        MetricType::Counter,
        labelled(&RETRY_REASONS, "reason", |c| &c.retries),
    )?;
    family(
        enc,
        "meshgate_cluster_upstream_overflow",
        "HTTP requests refused with 503 UO by a circuit breaker, by cluster and limit",
        MetricType::Counter,
        labelled(&LIMIT_NAMES, "limit", |c| &c.overflow),
    )?;
    let series = csnap.iter().enumerate().flat_map(|(shard, ss)| {
        ss.iter().map(move |(cluster, c)| {
            (
                vec![("cluster", cluster.clone()), ("shard", shard.to_string())],
                ConstCounter::new(c.retry_budget_exhausted.get()),
            )
        })
    });
    family(
        enc,
        "meshgate_http_retry_budget_exhausted",
        "HTTP retries not made because the cluster's retry budget was spent (the failure went to the client)",
        MetricType::Counter,
        series,
    )
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
                "Access-log records by outcome (dropped: the writer was behind and the queue full; failed: the file refused the write, e.g. disk full)",
                MetricType::Counter,
                [
                    ("written", log.written()),
                    ("dropped", log.dropped()),
                    ("failed", log.failed()),
                ]
                .map(|(outcome, n)| (vec![("outcome", outcome.to_string())], ConstCounter::new(n))),
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
        let authz: Vec<_> = s.shards.iter().map(|ss| ss.authz_snapshot()).collect();
        let series = authz.iter().enumerate().flat_map(|(shard, ss)| {
            ss.iter().map(move |((listener, policy), n)| {
                (
                    vec![
                        ("listener", listener.clone()),
                        ("policy", policy.clone()),
                        ("shard", shard.to_string()),
                    ],
                    ConstCounter::new(*n),
                )
            })
        });
        family(
            &mut enc,
            "meshgate_authz_denied",
            "Requests (http/https listeners) and connections (others) refused by [[policies]], by the deny policy that matched (\"-\": the listener has allow policies and none matched)",
            MetricType::Counter,
            series,
        )?;
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
        cluster_retry_families(&mut enc, &csnap)?;
        let hsnap: Vec<HttpSnapshot> = s.shards.iter().map(|ss| ss.http_snapshot()).collect();
        let series = hsnap.iter().enumerate().flat_map(|(shard, ss)| {
            ss.iter().flat_map(move |((listener, route, cluster), h)| {
                HttpRouteStats::CLASSES
                    .iter()
                    .zip(&h.by_class)
                    .filter(|(_, c)| c.get() > 0)
                    .map(move |(class, c)| {
                        (
                            vec![
                                ("listener", listener.clone()),
                                ("route", route.clone()),
                                ("cluster", cluster.clone()),
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
            "HTTP requests answered, by listener, route and cluster (\"(none)\": no route / answered by the gateway) and response class",
            MetricType::Counter,
            series,
        )?;
        // Histograms are summed over shards at scrape (one series per label set, not per shard).
        let mut merged: BTreeMap<(&HttpKey, usize), HistogramSnapshot> = BTreeMap::new();
        for ss in &hsnap {
            for (key, h) in ss {
                for (class, hist) in h.duration.iter().enumerate() {
                    if hist.count() > 0 {
                        hist.merge_into(merged.entry((key, class)).or_default());
                    }
                }
            }
        }
        let series = merged.iter().map(|(((l, r, c), class), snap)| {
            (
                vec![
                    ("listener", l.clone()),
                    ("route", r.clone()),
                    ("cluster", c.clone()),
                    ("code_class", HttpRouteStats::CLASSES[*class].to_string()),
                ],
                ConstHistogram::new(snap, &DURATION_BUCKETS_US, 1e6),
            )
        });
        family(
            &mut enc,
            "meshgate_http_request_duration_seconds",
            "HTTP request duration (first request byte to last response byte), by listener, route, cluster and response class",
            MetricType::Histogram,
            series,
        )?;
        let tsnap: Vec<_> = s.shards.iter().map(|ss| ss.tcp_snapshot()).collect();
        let mut merged: BTreeMap<&(String, String), [HistogramSnapshot; 3]> = BTreeMap::new();
        for ss in &tsnap {
            for (key, t) in ss {
                if t.duration.count() == 0 {
                    continue;
                }
                let m = merged.entry(key).or_default();
                t.duration.merge_into(&mut m[0]);
                t.received.merge_into(&mut m[1]);
                t.sent.merge_into(&mut m[2]);
            }
        }
        let labels =
            |(l, c): &(String, String)| vec![("listener", l.clone()), ("cluster", c.clone())];
        family(
            &mut enc,
            "meshgate_tcp_connection_duration_seconds",
            "Duration of proxied TCP connections (tcp, tls, tls-passthrough listeners), by listener and cluster",
            MetricType::Histogram,
            merged.iter().map(|(k, m)| {
                (
                    labels(k),
                    ConstHistogram::new(&m[0], &DURATION_BUCKETS_US, 1e6),
                )
            }),
        )?;
        family(
            &mut enc,
            "meshgate_tcp_connection_received_bytes",
            "Bytes received from the client per proxied TCP connection, by listener and cluster",
            MetricType::Histogram,
            merged
                .iter()
                .map(|(k, m)| (labels(k), ConstHistogram::new(&m[1], &BYTES_BUCKETS, 1.0))),
        )?;
        family(
            &mut enc,
            "meshgate_tcp_connection_sent_bytes",
            "Bytes sent to the client per proxied TCP connection, by listener and cluster",
            MetricType::Histogram,
            merged
                .iter()
                .map(|(k, m)| (labels(k), ConstHistogram::new(&m[2], &BYTES_BUCKETS, 1.0))),
        )?;
        let util: Vec<(usize, (Duration, Duration))> = s
            .shards
            .iter()
            .enumerate()
            .filter_map(|(i, ss)| Some((i, ss.utilisation()?)))
            .collect();
        family(
            &mut enc,
            "meshgate_shard_busy_seconds",
            "Time each shard spent working (not parked waiting for I/O or timers); rate() is its utilisation",
            MetricType::Counter,
            util.iter().map(|(i, (busy, _))| {
                (
                    vec![("shard", i.to_string())],
                    ConstCounter::new(busy.as_secs_f64()),
                )
            }),
        )?;
        family(
            &mut enc,
            "meshgate_shard_idle_seconds",
            "Time each shard spent parked waiting for I/O or timers",
            MetricType::Counter,
            util.iter().map(|(i, (_, idle))| {
                (
                    vec![("shard", i.to_string())],
                    ConstCounter::new(idle.as_secs_f64()),
                )
            }),
        )?;
        encode_health(&mut enc, s)?;
        encode_istio(&mut enc, s)?;
        Ok(())
    }
}

/// Endpoint health, ejections and health-check results (`crate::health`).
fn encode_health(enc: &mut DescriptorEncoder<'_>, s: &Stats) -> Result<(), std::fmt::Error> {
    let eps = s.health.current_status();
    let labels = |e: &crate::health::EndpointStatus| {
        vec![
            ("cluster", e.cluster.clone()),
            ("endpoint", e.endpoint.to_string()),
        ]
    };
    family(
        enc,
        "meshgate_endpoint_healthy",
        "1 when the endpoint may get traffic (passing its health checks and not ejected), else 0",
        MetricType::Gauge,
        eps.iter().map(|e| {
            (
                labels(e),
                ConstGauge::new(i64::from(e.healthy && !e.ejected)),
            )
        }),
    )?;
    family(
        enc,
        "meshgate_endpoint_ejections",
        "Times outlier detection ejected the endpoint",
        MetricType::Counter,
        eps.iter()
            .filter(|e| e.outlier_detection)
            .map(|e| (labels(e), ConstCounter::new(e.ejections))),
    )?;
    family(
        enc,
        "meshgate_endpoint_health_checks",
        "Active health checks of the endpoint, by result",
        MetricType::Counter,
        eps.iter().filter(|e| e.health_checked).flat_map(|e| {
            [
                ("passed", e.health_checks_passed),
                ("failed", e.health_checks_failed),
            ]
            .map(|(result, n)| {
                let mut l = labels(e);
                l.push(("result", result.to_string()));
                (l, ConstCounter::new(n))
            })
        }),
    )?;
    Ok(())
}

/// Istio's standard metrics, with its label names, summed over shards.
fn encode_istio(enc: &mut DescriptorEncoder<'_>, s: &Stats) -> Result<(), std::fmt::Error> {
    let shards: Vec<&Arc<IstioShard>> =
        s.shards.iter().filter_map(|ss| ss.istio.as_ref()).collect();
    if shards.is_empty() {
        return Ok(());
    }
    let mut merged: BTreeMap<IstioKey, IstioSeries> = BTreeMap::new();
    for shard in shards {
        for (k, v) in shard.snapshot() {
            let m = merged.entry(k).or_default();
            let add = |a: &mut [u64], b: &[u64]| a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
            add(&mut m.duration, &v.duration);
            m.duration_sum_us += v.duration_sum_us;
            add(&mut m.request_bytes, &v.request_bytes);
            m.request_bytes_sum += v.request_bytes_sum;
            add(&mut m.response_bytes, &v.response_bytes);
            m.response_bytes_sum += v.response_bytes_sum;
            m.tcp_opened += v.tcp_opened;
            m.tcp_closed += v.tcp_closed;
            m.tcp_received += v.tcp_received;
            m.tcp_sent += v.tcp_sent;
        }
    }
    let (http, tcp): (Vec<_>, Vec<_>) = merged.iter().partition(|(k, _)| !k.tcp);
    let hist = |buckets: &[u64], sum: u64, bounds: &[u64], divisor: f64| {
        ConstHistogram::new(
            &HistogramSnapshot {
                buckets: buckets.to_vec(),
                sum,
            },
            bounds,
            divisor,
        )
    };
    family(
        enc,
        "istio_requests",
        "Requests (Istio-compatible, [telemetry] istio_compat)",
        MetricType::Counter,
        http.iter().map(|(k, v)| {
            (
                istio_labels(k),
                ConstCounter::new(v.duration.iter().sum::<u64>()),
            )
        }),
    )?;
    family(
        enc,
        "istio_request_duration_milliseconds",
        "Request duration in milliseconds (Istio-compatible)",
        MetricType::Histogram,
        http.iter().map(|(k, v)| {
            (
                istio_labels(k),
                hist(
                    &v.duration,
                    v.duration_sum_us,
                    &ISTIO_DURATION_BUCKETS_US,
                    1e3,
                ),
            )
        }),
    )?;
    family(
        enc,
        "istio_request_bytes",
        "Request size in bytes (Istio-compatible)",
        MetricType::Histogram,
        http.iter().map(|(k, v)| {
            (
                istio_labels(k),
                hist(
                    &v.request_bytes,
                    v.request_bytes_sum,
                    &ISTIO_BYTES_BUCKETS,
                    1.0,
                ),
            )
        }),
    )?;
    family(
        enc,
        "istio_response_bytes",
        "Response size in bytes (Istio-compatible)",
        MetricType::Histogram,
        http.iter().map(|(k, v)| {
            (
                istio_labels(k),
                hist(
                    &v.response_bytes,
                    v.response_bytes_sum,
                    &ISTIO_BYTES_BUCKETS,
                    1.0,
                ),
            )
        }),
    )?;
    let tcp_counters: [CounterDef<IstioSeries>; 4] = [
        (
            "istio_tcp_connections_opened",
            "TCP connections opened (Istio-compatible)",
            |v| v.tcp_opened,
        ),
        (
            "istio_tcp_connections_closed",
            "TCP connections closed (Istio-compatible)",
            |v| v.tcp_closed,
        ),
        (
            "istio_tcp_received_bytes",
            "Bytes received from clients on TCP connections, counted when a connection closes (Istio-compatible)",
            |v| v.tcp_received,
        ),
        (
            "istio_tcp_sent_bytes",
            "Bytes sent to clients on TCP connections, counted when a connection closes (Istio-compatible)",
            |v| v.tcp_sent,
        ),
    ];
    for (name, help, get) in tcp_counters {
        family(
            enc,
            name,
            help,
            MetricType::Counter,
            tcp.iter()
                .filter(|(_, v)| get(v) > 0)
                .map(|(k, v)| (istio_labels(k), ConstCounter::new(get(v)))),
        )?;
    }
    Ok(())
}

/// Istio's standard labels. meshgate reports as a gateway does (`reporter="source"`): the
/// source is the client, known by its verified SPIFFE ID (`spiffe://TD/ns/NS/sa/SA` gives
/// `source_workload_namespace` NS and `source_workload` SA); the destination is the cluster.
fn istio_labels(k: &IstioKey) -> Vec<(&'static str, String)> {
    const UNKNOWN: &str = "unknown";
    let principal = k.principal.as_deref();
    let (ns, sa) = principal
        .and_then(|p| p.strip_prefix("spiffe://"))
        .and_then(|p| p.split_once('/'))
        .and_then(|(_, path)| {
            let mut parts = path.split('/');
            match (parts.next(), parts.next(), parts.next(), parts.next()) {
                (Some("ns"), Some(ns), Some("sa"), Some(sa)) => Some((ns, sa)),
                _ => None,
            }
        })
        .unwrap_or((UNKNOWN, UNKNOWN));
    let dest = k.destination.as_deref().unwrap_or(UNKNOWN);
    let mut labels = vec![
        ("reporter", "source".to_string()),
        ("source_workload", sa.to_string()),
        ("source_workload_namespace", ns.to_string()),
        ("source_principal", principal.unwrap_or(UNKNOWN).to_string()),
        ("source_app", UNKNOWN.to_string()),
        ("source_version", UNKNOWN.to_string()),
        ("destination_workload", dest.to_string()),
        ("destination_workload_namespace", UNKNOWN.to_string()),
        ("destination_principal", UNKNOWN.to_string()),
        ("destination_app", UNKNOWN.to_string()),
        ("destination_version", UNKNOWN.to_string()),
        ("destination_service", dest.to_string()),
        ("destination_service_name", dest.to_string()),
        ("destination_service_namespace", UNKNOWN.to_string()),
        ("destination_cluster", UNKNOWN.to_string()),
        ("request_protocol", k.protocol.to_string()),
    ];
    if !k.tcp {
        labels.push(("response_code", k.code.to_string()));
    }
    labels.push(("response_flags", k.flags.to_string()));
    labels.push((
        "connection_security_policy",
        if principal.is_some() {
            "mutual_tls"
        } else {
            "none"
        }
        .to_string(),
    ));
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(name: &str, index: usize) -> meshgate_config::WeightedCluster {
        meshgate_config::WeightedCluster {
            cluster: name.into(),
            cluster_index: index,
            weight: 1,
        }
    }

    fn rec(cluster: Option<usize>, status: u16, elapsed: Duration) -> RequestRecord<'static> {
        RequestRecord {
            cluster,
            status,
            elapsed,
            flags: "-",
            protocol: "http",
            peer: None,
            request_bytes: 100,
            response_bytes: 2000,
        }
    }

    #[test]
    fn histogram_buckets_are_le_bounds() {
        let h = Histogram::<17>::default();
        for v in [0, 500, 501, 1_000, 60_000_000, 60_000_001, u64::MAX / 2] {
            h.observe(&DURATION_BUCKETS_US, v);
        }
        let got: Vec<u64> = h.buckets.iter().map(Counter::get).collect();
        // 0 and 500 in `le=0.0005`, 501 and 1000 in `le=0.001`, 60 s in its own, the rest +Inf.
        assert_eq!(got[0], 2);
        assert_eq!(got[1], 2);
        assert_eq!(got[15], 1);
        assert_eq!(got[16], 2);
        assert_eq!(h.count(), 7);
    }

    #[test]
    fn request_histograms_merge_shards_and_keep_labels_bounded() {
        let stats = Arc::new(Stats::new(2, None));
        let targets = [target("a", 3), target("b", 7)];
        for (shard, ms) in [(0, 3u64), (1, 30)] {
            let route = stats.shards[shard].http_route("web", "r1", &targets);
            route.record_request(&rec(Some(7), 200, Duration::from_millis(ms)));
            route.record_request(&rec(None, 404, Duration::from_micros(100)));
            // A cluster the route does not know counts as the route's own answer.
            route.record_request(&rec(Some(99), 503, Duration::from_secs(100)));
        }
        let text = stats.render(&BuildInfo {
            version: "test",
            ring_mode: "x".into(),
        });
        let v = |name: &str, labels: &[(&str, &str)]| value(&text, name, labels);
        assert!(text.contains("# TYPE meshgate_http_request_duration_seconds histogram"));
        let b = "meshgate_http_request_duration_seconds_bucket";
        let l = [("route", "r1"), ("cluster", "b"), ("code_class", "2xx")];
        let with = |le: &'static str| {
            let mut x = l.to_vec();
            x.push(("le", le));
            x
        };
        assert_eq!(v(b, &with("0.0025")), "0");
        assert_eq!(v(b, &with("0.005")), "1");
        assert_eq!(v(b, &with("0.05")), "2");
        assert_eq!(v(b, &with("+Inf")), "2");
        assert_eq!(v("meshgate_http_request_duration_seconds_count", &l), "2");
        assert_eq!(v("meshgate_http_request_duration_seconds_sum", &l), "0.033");
        assert_eq!(
            v(
                "meshgate_http_request_duration_seconds_count",
                &[("cluster", "(none)"), ("code_class", "5xx")]
            ),
            "2"
        );
        assert_eq!(
            v(
                "meshgate_http_requests_total",
                &[("cluster", "(none)"), ("code_class", "4xx"), ("shard", "1")]
            ),
            "1"
        );
        // Cluster `a` took nothing: no series for it.
        assert!(!text.contains("cluster=\"a\""), "{text}");
    }

    #[test]
    fn tcp_histograms() {
        let stats = Arc::new(Stats::new(1, None));
        let t = stats.shards[0].tcp("in", &target("up", 0));
        t.opened(None);
        t.closed(&ConnectionRecord {
            elapsed: Duration::from_millis(2),
            received: 1000,
            sent: 5000,
            flags: "-",
            peer: None,
        });
        let text = stats.render(&BuildInfo {
            version: "test",
            ring_mode: "x".into(),
        });
        let l = [("listener", "in"), ("cluster", "up")];
        let with = |le: &'static str| {
            let mut x = l.to_vec();
            x.push(("le", le));
            x
        };
        let v = |name: &str, labels: &[(&str, &str)]| value(&text, name, labels);
        assert_eq!(
            v(
                "meshgate_tcp_connection_received_bytes_bucket",
                &with("1024.0")
            ),
            "1"
        );
        assert_eq!(
            v("meshgate_tcp_connection_sent_bytes_bucket", &with("4096.0")),
            "0"
        );
        assert_eq!(
            v("meshgate_tcp_connection_sent_bytes_bucket", &with("+Inf")),
            "1"
        );
        assert_eq!(v("meshgate_tcp_connection_duration_seconds_count", &l), "1");
    }

    #[test]
    fn istio_compat_series_with_istio_labels() {
        let plain = Arc::new(Stats::new(2, None));
        let stats = Arc::new(Stats::with_options(2, None, true));
        for st in [&plain, &stats] {
            let route = st.shards[1].http_route("web", "r1", &[target("reviews", 0)]);
            let mut r = rec(Some(0), 503, Duration::from_millis(7));
            r.flags = "UF";
            r.peer = Some("spiffe://example.org/ns/prod/sa/frontend");
            route.record_request(&r);
            route.record_request(&rec(None, 404, Duration::from_millis(1)));
            let t = st.shards[0].tcp("in", &target("db", 1));
            t.opened(None);
            t.closed(&ConnectionRecord {
                elapsed: Duration::from_secs(1),
                received: 10,
                sent: 20,
                flags: "-",
                peer: None,
            });
        }
        let build = BuildInfo {
            version: "test",
            ring_mode: "x".into(),
        };
        assert!(!plain.render(&build).contains("istio_"));
        let text = stats.render(&build);
        let v = |name: &str, labels: &[(&str, &str)]| value(&text, name, labels);
        let peer = [
            ("reporter", "source"),
            (
                "source_principal",
                "spiffe://example.org/ns/prod/sa/frontend",
            ),
            ("source_workload", "frontend"),
            ("source_workload_namespace", "prod"),
            ("destination_service", "reviews"),
            ("destination_service_name", "reviews"),
            ("request_protocol", "http"),
            ("response_code", "503"),
            ("response_flags", "UF"),
            ("connection_security_policy", "mutual_tls"),
        ];
        assert_eq!(v("istio_requests_total", &peer), "1");
        assert_eq!(v("istio_request_duration_milliseconds_sum", &peer), "7.0");
        let mut le = peer.to_vec();
        le.push(("le", "10.0"));
        assert_eq!(v("istio_request_duration_milliseconds_bucket", &le), "1");
        assert_eq!(v("istio_response_bytes_sum", &peer), "2000.0");
        assert_eq!(
            v(
                "istio_requests_total",
                &[
                    ("response_code", "404"),
                    ("destination_service", "unknown"),
                    ("connection_security_policy", "none"),
                    ("source_principal", "unknown")
                ]
            ),
            "1"
        );
        let tcp = [("destination_service", "db"), ("request_protocol", "tcp")];
        assert_eq!(v("istio_tcp_connections_opened_total", &tcp), "1");
        assert_eq!(v("istio_tcp_connections_closed_total", &tcp), "1");
        assert_eq!(v("istio_tcp_received_bytes_total", &tcp), "10");
        assert_eq!(v("istio_tcp_sent_bytes_total", &tcp), "20");
        assert!(
            !text.contains("response_code=\"0\""),
            "TCP series have no response_code"
        );
    }

    #[test]
    fn istio_principals_are_bounded() {
        let stats = Arc::new(Stats::with_options(1, None, true));
        let route = stats.shards[0].http_route("web", "r1", &[]);
        let ids: Vec<String> = (0..ISTIO_MAX_PRINCIPALS + 50)
            .map(|i| format!("spiffe://td/client-{i}"))
            .collect();
        for id in &ids {
            let mut r = rec(None, 200, Duration::from_millis(1));
            r.peer = Some(id);
            route.record_request(&r);
        }
        let text = stats.render(&BuildInfo {
            version: "test",
            ring_mode: "x".into(),
        });
        let series = text
            .lines()
            .filter(|l| l.starts_with("istio_requests_total{"))
            .count();
        assert_eq!(series, ISTIO_MAX_PRINCIPALS + 1, "the rest share `unknown`");
        assert_eq!(
            value(
                &text,
                "istio_requests_total",
                &[
                    ("source_principal", "unknown"),
                    ("connection_security_policy", "mutual_tls")
                ]
            ),
            "50"
        );
    }

    /// The value of the one series of `name` that has every label of `labels`.
    fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> String {
        let found: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
            .filter(|l| {
                labels
                    .iter()
                    .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
            })
            .collect();
        assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?}\n{text}");
        found[0]
            .rsplit_once(' ')
            .map(|(_, v)| v.to_string())
            .unwrap_or_default()
    }

    /// The per-request hook's cost (a bucket search and a few single-writer adds). A
    /// measurement, not a check: `cargo test --release -p meshgate-dataplane --lib
    /// record_request_cost -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement; run in release mode"]
    fn record_request_cost() {
        let stats = ShardStats::default();
        let route = stats.http_route("web", "r1", &[target("a", 0), target("b", 1)]);
        let n = 1_000_000u32;
        let t = Instant::now();
        for i in 0..n {
            route.record_request(&rec(
                Some((i & 1) as usize),
                200,
                Duration::from_micros(u64::from(i % 4096)),
            ));
        }
        let per = t.elapsed() / n;
        println!("record_request: {per:?} per request");
    }
}
