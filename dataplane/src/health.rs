//! Endpoint health: active health checks and passive outlier detection, published to every
//! shard through one atomic per endpoint.
//!
//! Where it sits: `balance::pick` skips endpoints whose [`EndpointHealth::usable`] is false (a
//! relaxed load of one byte: no lock, no locked instruction on the hot path). Two writers set
//! that byte:
//! - **Active checks** run once for the whole process, as tasks on shard 0 ([`spawn_tasks`],
//!   started when shard 0 commits a generation and cancelled when the next one commits): one
//!   task per endpoint of each cluster with `[clusters.health_check]`, TCP connect or
//!   `GET path` over HTTP/1.1, through the cluster's TLS origination (verified, with the
//!   cluster's client identity) when it has one. Running them on one shard, not on every
//!   shard, keeps the probe load at one check per endpoint per interval whatever the core
//!   count. The shard is the gateway's own io_uring runtime, so checks cost no thread.
//! - **Outlier detection**: every shard reports each response or failure of an endpoint
//!   ([`ClusterHealth::report`], only for clusters with `[clusters.outlier_detection]`) into
//!   shared per-endpoint counters; the report that crosses a threshold ejects the endpoint.
//!   A task on shard 0 reviews ejections every `interval` and brings endpoints back when
//!   their ejection time (base × consecutive ejections, capped) is over.
//!
//! State is kept per (cluster name, endpoint address) in a process-wide [`Registry`], so an
//! endpoint keeps its health and its ejection history across reloads; the admin API and
//! `/metrics` read it from there.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meshgate_config::{Cluster, HealthCheck, HealthCheckKind, OutlierDetection};
use serde::Serialize;

use crate::rt;
use crate::shard::ShardGen;

/// `state` bit: the last active checks failed (`unhealthy_threshold` in a row).
const UNHEALTHY: u8 = 1;
/// `state` bit: ejected by outlier detection.
const EJECTED: u8 = 2;
/// Largest response head a health check reads.
const MAX_CHECK_HEAD: usize = 8 * 1024;

/// One endpoint's health, shared by every shard and the admin threads.
#[derive(Debug, Default)]
pub struct EndpointHealth {
    /// 0: usable; otherwise [`UNHEALTHY`] and/or [`EJECTED`].
    state: AtomicU8,
    checks_ok: AtomicU64,
    checks_failed: AtomicU64,
    /// Outlier detection: consecutive 5xx responses / gateway failures.
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    /// Ejections so far (the counter `/metrics` exports).
    ejections: AtomicU64,
    /// Consecutive ejections: the next ejection lasts this many base ejection times.
    multiplier: AtomicU32,
    /// Milliseconds on the registry's clock when the ejection ends.
    ejected_until_ms: AtomicU64,
}

impl EndpointHealth {
    /// Not failing its health checks and not ejected.
    #[inline]
    pub fn usable(&self) -> bool {
        self.state.load(Relaxed) == 0
    }

    pub fn healthy(&self) -> bool {
        self.state.load(Relaxed) & UNHEALTHY == 0
    }

    pub fn ejected(&self) -> bool {
        self.state.load(Relaxed) & EJECTED != 0
    }

    pub fn ejections(&self) -> u64 {
        self.ejections.load(Relaxed)
    }

    pub fn checks(&self) -> (u64, u64) {
        (
            self.checks_ok.load(Relaxed),
            self.checks_failed.load(Relaxed),
        )
    }
}

/// What a request or connection to an endpoint ended with, for outlier detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response with this status.
    Status(u16),
    /// Connect failure, reset, timeout or unreadable response: no usable response.
    GatewayFailure,
    /// A TCP connection opened.
    Connected,
}

/// The health of one cluster's endpoints (same index as the cluster's `endpoints`) in one
/// generation.
#[derive(Debug)]
pub struct ClusterHealth {
    pub endpoints: Box<[Arc<EndpointHealth>]>,
    outlier: Option<OutlierDetection>,
    clock: Instant,
}

impl ClusterHealth {
    #[inline]
    pub fn usable(&self, i: usize) -> bool {
        self.endpoints.get(i).is_some_and(|e| e.usable())
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.clock.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Count what endpoint `i` did; eject it when a threshold is crossed.
    pub fn report(&self, i: usize, outcome: Outcome) {
        let (Some(od), Some(e)) = (&self.outlier, self.endpoints.get(i)) else {
            return;
        };
        let reset = |c: &AtomicU32| {
            if c.load(Relaxed) != 0 {
                c.store(0, Relaxed);
            }
        };
        let (five, gateway) = match outcome {
            Outcome::Status(s) if s >= 500 => (true, matches!(s, 502..=504)),
            Outcome::GatewayFailure => (false, true),
            Outcome::Status(_) | Outcome::Connected => {
                reset(&e.consecutive_5xx);
                reset(&e.consecutive_gateway);
                return;
            }
        };
        let mut eject = false;
        if five {
            let n = e.consecutive_5xx.fetch_add(1, Relaxed) + 1;
            eject |= od.consecutive_5xx > 0 && n >= od.consecutive_5xx;
        } else {
            reset(&e.consecutive_5xx);
        }
        if gateway {
            let n = e.consecutive_gateway.fetch_add(1, Relaxed) + 1;
            eject |= od.consecutive_gateway_failures > 0 && n >= od.consecutive_gateway_failures;
        } else {
            reset(&e.consecutive_gateway);
        }
        if eject {
            self.eject(i, od);
        }
    }

    fn eject(&self, i: usize, od: &OutlierDetection) {
        let e = &self.endpoints[i];
        e.consecutive_5xx.store(0, Relaxed);
        e.consecutive_gateway.store(0, Relaxed);
        if e.ejected() {
            return;
        }
        let ejected = self.endpoints.iter().filter(|e| e.ejected()).count();
        let allowed = (self.endpoints.len() * od.max_ejection_percent as usize / 100).max(1);
        if ejected >= allowed {
            return;
        }
        // Two shards may cross the threshold at once: only the one that sets the bit counts.
        if e.state.fetch_or(EJECTED, Relaxed) & EJECTED != 0 {
            return;
        }
        let times = e.multiplier.fetch_add(1, Relaxed) + 1;
        let length = od
            .base_ejection_time
            .saturating_mul(times)
            .min(od.max_ejection_time);
        e.ejected_until_ms.store(
            self.now_ms()
                .saturating_add(u64::try_from(length.as_millis()).unwrap_or(u64::MAX)),
            Relaxed,
        );
        e.ejections.fetch_add(1, Relaxed);
        tracing::info!(endpoint = i, ejection = times, ?length, "endpoint ejected");
    }

    /// Bring back endpoints whose ejection is over; lower the multiplier of endpoints that
    /// stayed in for a whole interval since their last ejection ended.
    fn review(&self, od: &OutlierDetection) {
        let now = self.now_ms();
        let interval = u64::try_from(od.interval.as_millis()).unwrap_or(u64::MAX);
        for e in self.endpoints.iter() {
            let until = e.ejected_until_ms.load(Relaxed);
            if e.ejected() {
                if now >= until {
                    e.state.fetch_and(!EJECTED, Relaxed);
                    tracing::info!("ejected endpoint returns");
                }
            } else if e.multiplier.load(Relaxed) > 0 && now >= until.saturating_add(interval) {
                e.multiplier.fetch_sub(1, Relaxed);
                e.ejected_until_ms.store(now, Relaxed);
            }
        }
    }
}

/// Every endpoint's health, by (cluster name, address), for the life of the process.
#[derive(Debug)]
pub struct Registry {
    map: Mutex<HashMap<(String, SocketAddr), Arc<EndpointHealth>>>,
    /// The clusters of the generation in force (what `/metrics` and `/clusters` list).
    current: Mutex<Arc<[Cluster]>>,
    clock: Instant,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            map: Mutex::new(HashMap::new()),
            current: Mutex::new(Arc::from(Vec::new())),
            clock: Instant::now(),
        }
    }
}

/// One endpoint as the admin API and `/metrics` show it.
#[derive(Debug, Clone, Serialize)]
pub struct EndpointStatus {
    pub cluster: String,
    pub endpoint: SocketAddr,
    pub weight: u32,
    /// Passing its health checks (always true without `[clusters.health_check]`).
    pub healthy: bool,
    pub ejected: bool,
    /// Seconds of ejection left.
    pub ejected_for_seconds: Option<f64>,
    pub ejections: u64,
    pub health_checks_passed: u64,
    pub health_checks_failed: u64,
    pub health_checked: bool,
    pub outlier_detection: bool,
}

impl Registry {
    /// The health of `cluster`'s endpoints for a new generation; `None` when the cluster has
    /// neither health checks nor outlier detection (its endpoints are always usable). State
    /// a feature no longer configured is cleared.
    pub fn cluster(&self, cluster: &Cluster) -> Option<Arc<ClusterHealth>> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let tracked = cluster.health_check.is_some() || cluster.outlier_detection.is_some();
        let endpoints: Vec<Arc<EndpointHealth>> = cluster
            .endpoints
            .iter()
            .map(|&a| {
                let e = map.entry((cluster.name.clone(), a)).or_default().clone();
                if cluster.health_check.is_none() {
                    e.state.fetch_and(!UNHEALTHY, Relaxed);
                }
                if cluster.outlier_detection.is_none() {
                    e.state.fetch_and(!EJECTED, Relaxed);
                }
                e
            })
            .collect();
        tracked.then(|| {
            Arc::new(ClusterHealth {
                endpoints: endpoints.into_boxed_slice(),
                outlier: cluster.outlier_detection.clone(),
                clock: self.clock,
            })
        })
    }

    /// The generation in force changed: its clusters are the ones reported.
    pub fn set_current(&self, clusters: &[Cluster]) {
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Arc::from(clusters);
    }

    /// Every endpoint of the generation in force, in config order.
    pub fn current_status(&self) -> Vec<EndpointStatus> {
        let clusters = self
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        self.status(&clusters)
    }

    /// Every endpoint of `clusters`, in config order.
    pub fn status(&self, clusters: &[Cluster]) -> Vec<EndpointStatus> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let now = u64::try_from(self.clock.elapsed().as_millis()).unwrap_or(u64::MAX);
        let mut out = Vec::new();
        for c in clusters {
            for (i, &a) in c.endpoints.iter().enumerate() {
                let e = map.get(&(c.name.clone(), a));
                let ejected = e.is_some_and(|e| e.ejected());
                let (ok, failed) = e.map(|e| e.checks()).unwrap_or_default();
                out.push(EndpointStatus {
                    cluster: c.name.clone(),
                    endpoint: a,
                    weight: c.endpoint_weights.get(i).copied().unwrap_or(1),
                    healthy: e.is_none_or(|e| e.healthy()),
                    ejected,
                    ejected_for_seconds: ejected.then(|| {
                        let until = e.map_or(0, |e| e.ejected_until_ms.load(Relaxed));
                        until.saturating_sub(now) as f64 / 1000.0
                    }),
                    ejections: e.map_or(0, |e| e.ejections()),
                    health_checks_passed: ok,
                    health_checks_failed: failed,
                    health_checked: c.health_check.is_some(),
                    outlier_detection: c.outlier_detection.is_some(),
                });
            }
        }
        out
    }
}

/// Start the health-check and ejection-review tasks of `snap` (on shard 0 only). The caller
/// cancels them when the next generation commits.
pub fn spawn_tasks(snap: &std::rc::Rc<ShardGen>) -> Vec<rt::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for (c, cluster) in snap.config.clusters.iter().enumerate() {
        let Some(health) = snap.lb.get(c).and_then(|l| l.health.clone()) else {
            continue;
        };
        if let Some(hc) = &cluster.health_check {
            let n = cluster.endpoints.len() as u32;
            for (i, &endpoint) in cluster.endpoints.iter().enumerate() {
                let probe = Probe {
                    snap: snap.clone(),
                    cluster: c,
                    endpoint,
                    hc: hc.clone(),
                };
                // Spread the first checks over the interval.
                let delay = hc.interval / n.max(1) * i as u32;
                tasks.push(rt::spawn(check_loop(
                    probe,
                    health.endpoints[i].clone(),
                    delay,
                )));
            }
        }
        if let Some(od) = cluster.outlier_detection.clone() {
            let health = health.clone();
            tasks.push(rt::spawn(async move {
                loop {
                    rt::sleep(od.interval.min(Duration::from_secs(1))).await;
                    health.review(&od);
                }
            }));
        }
    }
    tasks
}

struct Probe {
    snap: std::rc::Rc<ShardGen>,
    cluster: usize,
    endpoint: SocketAddr,
    hc: HealthCheck,
}

async fn check_loop(probe: Probe, health: Arc<EndpointHealth>, delay: Duration) {
    rt::sleep(delay).await;
    let name = probe.snap.cluster_names[probe.cluster].clone();
    let (mut ok_run, mut fail_run) = (0u32, 0u32);
    loop {
        let started = Instant::now();
        let result = match rt::timeout(probe.hc.timeout, Box::pin(check(&probe))).await {
            Ok(r) => r,
            Err(rt::Elapsed) => Err("timed out".to_owned()),
        };
        match result {
            Ok(()) => {
                health.checks_ok.fetch_add(1, Relaxed);
                ok_run += 1;
                fail_run = 0;
                if !health.healthy() && ok_run >= probe.hc.healthy_threshold {
                    health.state.fetch_and(!UNHEALTHY, Relaxed);
                    tracing::info!(cluster = %name, endpoint = %probe.endpoint, "endpoint healthy");
                }
            }
            Err(why) => {
                health.checks_failed.fetch_add(1, Relaxed);
                fail_run += 1;
                ok_run = 0;
                tracing::debug!(cluster = %name, endpoint = %probe.endpoint, problem = %why, "health check failed");
                if health.healthy() && fail_run >= probe.hc.unhealthy_threshold {
                    health.state.fetch_or(UNHEALTHY, Relaxed);
                    tracing::warn!(cluster = %name, endpoint = %probe.endpoint, problem = %why, "endpoint unhealthy");
                }
            }
        }
        rt::sleep(probe.hc.interval.saturating_sub(started.elapsed())).await;
    }
}

/// One check: connect (and TLS handshake), then for `http` a `GET` and its status.
async fn check(probe: &Probe) -> Result<(), String> {
    use crate::pool::{UpRead, UpWrite};
    use crate::proxy::http_io::{HttpRead, HttpWrite, tls_split};
    let stream = rt::TcpStream::connect(probe.endpoint)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let tls = probe
        .snap
        .cluster_tls
        .get(probe.cluster)
        .and_then(Option::as_ref);
    let (mut rd, mut wr) = match tls {
        None => {
            if probe.hc.kind == HealthCheckKind::Tcp {
                return Ok(());
            }
            let (rd, wr) = stream.into_split();
            (UpRead::Plain(rd), UpWrite::Plain(wr))
        }
        Some(tls) => {
            let s = crate::tls::stream::connect(
                stream,
                tls.client_config.clone(),
                tls.server_name.clone(),
            )
            .await
            .map_err(|e| format!("TLS: {e}"))?;
            if probe.hc.kind == HealthCheckKind::Tcp {
                return Ok(());
            }
            let (rd, wr) = tls_split(s);
            (UpRead::Tls(rd), UpWrite::Tls(wr))
        }
    };
    let host = match &probe.hc.host {
        Some(h) => h.clone(),
        None => probe.endpoint.to_string(),
    };
    let request = format!(
        "GET {} HTTP/1.1\r\nhost: {host}\r\nuser-agent: meshgate-health-check\r\nconnection: close\r\n\r\n",
        probe.hc.path
    );
    wr.write_all(request.as_bytes())
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut head = Vec::new();
    loop {
        let chunk = rd
            .recv_buf()
            .await
            .map_err(|e| format!("receive: {e}"))?
            .ok_or_else(|| "closed before a response".to_owned())?;
        head.extend_from_slice(&chunk);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&head) {
            Ok(httparse::Status::Complete(_)) => {
                let status = resp.code.unwrap_or(0);
                return if probe.hc.expected_statuses.contains(&status) {
                    Ok(())
                } else {
                    Err(format!("status {status}"))
                };
            }
            Ok(httparse::Status::Partial) if head.len() < MAX_CHECK_HEAD => {}
            Ok(httparse::Status::Partial) => return Err("response head too large".into()),
            Err(e) => return Err(format!("bad response: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(n: usize, od: Option<OutlierDetection>) -> Cluster {
        let text = format!(
            "version = 1\n[[clusters]]\nname = \"c\"\nendpoints = [{}]\n",
            (0..n)
                .map(|i| format!("\"127.0.0.1:{}\"", 1000 + i))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let mut c = meshgate_config::parse(&text, "t.toml")
            .map(|c| c.clusters[0].clone())
            .unwrap_or_else(|e| panic!("{e}"));
        c.outlier_detection = od;
        c
    }

    fn od() -> OutlierDetection {
        OutlierDetection {
            consecutive_5xx: 3,
            consecutive_gateway_failures: 2,
            base_ejection_time: Duration::from_millis(50),
            max_ejection_time: Duration::from_secs(1),
            max_ejection_percent: 50,
            interval: Duration::from_millis(10),
        }
    }

    #[test]
    fn consecutive_5xx_eject_and_time_brings_back() {
        let reg = Registry::default();
        let h = reg.cluster(&cluster(4, Some(od()))).expect("tracked");
        h.report(0, Outcome::Status(500));
        h.report(0, Outcome::Status(500));
        h.report(0, Outcome::Status(200)); // resets
        h.report(0, Outcome::Status(500));
        h.report(0, Outcome::Status(500));
        assert!(h.usable(0));
        h.report(0, Outcome::Status(500));
        assert!(!h.usable(0));
        assert_eq!(h.endpoints[0].ejections(), 1);
        h.review(&od());
        assert!(!h.usable(0), "back before its time");
        std::thread::sleep(Duration::from_millis(60));
        h.review(&od());
        assert!(h.usable(0));
        // A second ejection right away lasts twice as long.
        h.report(0, Outcome::GatewayFailure);
        h.report(0, Outcome::GatewayFailure);
        assert!(!h.usable(0));
        std::thread::sleep(Duration::from_millis(60));
        h.review(&od());
        assert!(!h.usable(0), "second ejection is 2 x base");
        std::thread::sleep(Duration::from_millis(50));
        h.review(&od());
        assert!(h.usable(0));
    }

    #[test]
    fn max_ejection_percent_caps_but_one_always_may_go() {
        let reg = Registry::default();
        let h = reg.cluster(&cluster(4, Some(od()))).expect("tracked");
        for i in 0..4 {
            for _ in 0..3 {
                h.report(i, Outcome::Status(503));
            }
        }
        assert_eq!((0..4).filter(|&i| !h.usable(i)).count(), 2);
        let one = OutlierDetection {
            max_ejection_percent: 0,
            ..od()
        };
        let reg = Registry::default();
        let h = reg.cluster(&cluster(2, Some(one))).expect("tracked");
        for i in 0..2 {
            for _ in 0..3 {
                h.report(i, Outcome::Status(500));
            }
        }
        assert_eq!((0..2).filter(|&i| !h.usable(i)).count(), 1);
    }

    #[test]
    fn untracked_clusters_have_no_health() {
        let reg = Registry::default();
        assert!(reg.cluster(&cluster(2, None)).is_none());
    }
}
