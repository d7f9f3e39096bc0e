//! Retries, retry budgets and circuit breakers of HTTP routes (Envoy's semantics).
//!
//! Where it sits: `proxy::http::forward` runs the attempt loop (`balance::pick` ->
//! `upstream::connect` -> exchange), for HTTP/1.1 and HTTP/2 clusters alike (the HTTP/2
//! exchange is `proxy::h2_upstream::attempt`); this module decides, for each failed attempt, whether
//! another one is made ([`Attempts::retry`]), picks its endpoint away from the ones tried
//! ([`Attempts::endpoint`], through [`EndpointPicker::pick_excluding`]) and holds the
//! request's place in its cluster's limits ([`Breaker`]).
//!
//! Cost on a request that does not retry: [`Attempts::new`] and its drop touch one per-shard
//! gauge (a load and a store, no locked instruction); nothing is allocated, no syscall is made.
//! Clusters with `[clusters.circuit_breakers]` also take one process-wide atomic per limit.
//!
//! - **Retry policy** (`[routes.retry]`): which failures are retried (`on`), how many attempts,
//!   backoff (exponential, full jitter). A request whose head went upstream is retried only if
//!   it is idempotent and has no body (nothing to replay); a connect failure is retriable for
//!   any request, since nothing was sent.
//! - **Retry budget** (`[clusters.retry_budget]`), per shard: retries in progress may be at most
//!   `budget_percent` of the shard's requests in flight to the cluster, but at least
//!   `min_retry_concurrency`. State: two [`Gauge`]s in the shard's own [`ClusterStats`].
//! - **Circuit breakers** (`[clusters.circuit_breakers]`), per process: requests in flight and
//!   requests waiting for a new connection are atomics shared by the shards; open connections
//!   are the sum of the shards' connection gauges. Over a limit: 503 `UO`.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use meshgate_config::{CircuitBreakers, RetryBudget, RetryOn, RetryPolicy};

use crate::balance::EndpointPicker;
use crate::metrics::ClusterStats;
use crate::rt;

/// Most attempts a route may configure (the config enforces the same bound).
pub const MAX_ATTEMPTS: usize = 10;

/// Why an attempt failed, as far as retrying is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Connect or TLS handshake refused, failed or timed out: nothing was sent.
    ConnectFailure,
    /// Closed or reset before a response head (the request may have been sent).
    Reset,
    /// No response head within the route's `per_try_timeout`.
    PerTryTimeout,
    /// A complete response head with this status.
    Status(u16),
    /// HTTP/2: the upstream refused the stream (`REFUSED_STREAM`) or it was above a GOAWAY's
    /// last stream ID, and the gateway still holds every body byte it took from the client
    /// (`proxy::h2_upstream` keeps up to 64 KiB). The upstream did not process it, so it is
    /// retried whatever `on` lists and whatever the method.
    Refused,
}

impl Failure {
    /// Index into [`ClusterStats::retries`] and [`RETRY_REASONS`].
    fn reason(self) -> usize {
        match self {
            Failure::ConnectFailure => 0,
            Failure::Reset => 1,
            Failure::PerTryTimeout => 2,
            Failure::Status(_) => 3,
            Failure::Refused => 4,
        }
    }
}

/// The `reason` label of `meshgate_http_retries_total`, by [`Failure`].
pub const RETRY_REASONS: [&str; 5] = [
    "connect-failure",
    "reset",
    "per-try-timeout",
    "status",
    "refused-stream",
];

/// Whether `policy` lists a condition that covers `failure`.
pub fn covers(policy: &RetryPolicy, failure: Failure) -> bool {
    let any = |list: &[RetryOn]| list.iter().any(|o| policy.on(*o));
    match failure {
        Failure::ConnectFailure => any(&[
            RetryOn::ConnectFailure,
            RetryOn::FiveXx,
            RetryOn::GatewayError,
        ]),
        Failure::Reset | Failure::PerTryTimeout => {
            any(&[RetryOn::Reset, RetryOn::FiveXx, RetryOn::GatewayError])
        }
        Failure::Status(code) => {
            (policy.on(RetryOn::FiveXx) && (500..=599).contains(&code))
                || (policy.on(RetryOn::GatewayError) && matches!(code, 502..=504))
                || (policy.on(RetryOn::RetriableStatusCodes) && policy.status_codes.contains(&code))
        }
        Failure::Refused => true,
    }
}

/// The retry state of one forwarded request. Shared by reference with the response relay (it
/// decides on a retriable status before anything reaches the client), so its state is in cells.
#[derive(Debug)]
pub struct Attempts<'a> {
    policy: &'a RetryPolicy,
    budget: RetryBudget,
    stats: &'a ClusterStats,
    /// The request can be sent again after its head went upstream (idempotent, no body).
    replayable: bool,
    /// Endpoint indexes tried, in order.
    tried: Cell<[usize; MAX_ATTEMPTS]>,
    made: Cell<usize>,
    /// This request counts in the shard's active retries (from its first retry to its end).
    holds_retry: Cell<bool>,
    /// A retry was refused because the attempts were used up (Envoy's `URX`).
    exhausted: Cell<bool>,
    /// The backoff before the next attempt.
    delay: Cell<Duration>,
    /// The route timeout over all attempts: set when the first request was sent in full.
    deadline: Cell<Option<Instant>>,
}

impl<'a> Attempts<'a> {
    /// `stats`: the shard's block of the cluster (its requests-in-flight gauge counts this
    /// request until drop).
    pub fn new(
        policy: &'a RetryPolicy,
        budget: RetryBudget,
        stats: &'a ClusterStats,
        replayable: bool,
    ) -> Self {
        stats.rq_active.inc();
        Attempts {
            policy,
            budget,
            stats,
            replayable,
            tried: Cell::new([0; MAX_ATTEMPTS]),
            made: Cell::new(0),
            holds_retry: Cell::new(false),
            exhausted: Cell::new(false),
            delay: Cell::new(Duration::ZERO),
            deadline: Cell::new(None),
        }
    }

    /// Attempts made so far.
    pub fn made(&self) -> usize {
        self.made.get()
    }

    /// A retry was made.
    pub fn retried(&self) -> bool {
        self.made.get() > 1
    }

    /// A retry was refused for want of attempts (after at least one retry was allowed by the
    /// policy): the access log says `URX`.
    pub fn exhausted(&self) -> bool {
        self.exhausted.get()
    }

    /// The endpoint index of the next attempt: the balancer's choice for the first one, then
    /// one not tried yet where the cluster has one (else any usable one). `None`: no endpoint
    /// is healthy.
    pub fn endpoint(&self, picker: &EndpointPicker, key: Option<u64>) -> Option<usize> {
        let made = self.made.get();
        let mut tried = self.tried.get();
        let before = &tried[..made.min(MAX_ATTEMPTS)];
        let index = picker
            .pick_excluding(key, before)
            .or_else(|| (!before.is_empty()).then(|| picker.pick(key)).flatten())?;
        if let Some(slot) = tried.get_mut(made) {
            *slot = index;
            self.tried.set(tried);
        }
        self.made.set(made + 1);
        Some(index)
    }

    /// The first attempt's request was sent in full at `at`: the route timeout (`total`)
    /// runs from there over every attempt.
    pub fn sent(&self, at: Instant, total: Duration) {
        if self.deadline.get().is_none() {
            self.deadline.set(Some(at + total));
        }
    }

    /// A deadline over every attempt known before the first send (a gRPC request's
    /// `grpc-timeout`, capped by the route timeout): no attempt starts past it.
    pub fn limit(&self, deadline: Instant) {
        let d = self.deadline.get().map_or(deadline, |d| d.min(deadline));
        self.deadline.set(Some(d));
    }

    /// What is left of the route timeout for an attempt; `None` before the first send.
    pub fn time_left(&self, now: Instant) -> Option<Duration> {
        self.deadline
            .get()
            .map(|d| d.saturating_duration_since(now))
    }

    /// The route's per-try timeout.
    pub fn per_try_timeout(&self) -> Option<Duration> {
        self.policy.per_try_timeout
    }

    /// Decide whether the attempt that failed with `failure` is tried again. When it is, the
    /// retry is counted and the backoff chosen ([`Attempts::backoff`] waits it); when the
    /// budget refuses, that is counted.
    pub fn retry(&self, failure: Failure) -> bool {
        if !covers(self.policy, failure) {
            return false;
        }
        // Nothing reached (or was processed by) an upstream: any request may go again.
        let unsent = matches!(failure, Failure::ConnectFailure | Failure::Refused);
        if !unsent && !self.replayable {
            return false;
        }
        if self.made.get() >= self.policy.attempts as usize {
            self.exhausted.set(self.policy.attempts > 1);
            return false;
        }
        let delay = self.next_delay();
        if let Some(left) = self.time_left(Instant::now())
            && left <= delay
        {
            return false;
        }
        if !self.holds_retry.get() {
            if !budget_allows(
                self.budget,
                self.stats.rq_active.get(),
                self.stats.retries_active.get(),
            ) {
                self.stats.retry_budget_exhausted.inc();
                return false;
            }
            self.stats.retries_active.inc();
            self.holds_retry.set(true);
        }
        self.stats.retries[failure.reason()].inc();
        self.delay.set(delay);
        true
    }

    /// Wait the backoff chosen by the last [`Attempts::retry`].
    pub async fn backoff(&self) {
        let delay = self.delay.replace(Duration::ZERO);
        if !delay.is_zero() {
            rt::sleep(delay).await;
        }
    }

    /// Full jitter: uniform in `[0, min(max, base * 2^(retries-1)))`.
    fn next_delay(&self) -> Duration {
        let retries = self.made.get().max(1) as u32; // the retry about to be made: 1, 2, ...
        let cap = self
            .policy
            .backoff_base
            .saturating_mul(1u32 << (retries - 1).min(20))
            .min(self.policy.backoff_max);
        let nanos = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
        if nanos == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(jitter() % nanos)
    }
}

impl Drop for Attempts<'_> {
    fn drop(&mut self) {
        self.stats.rq_active.dec();
        if self.holds_retry.get() {
            self.stats.retries_active.dec();
        }
    }
}

/// Envoy's budget: active retries below `max(min_retry_concurrency, budget_percent% of
/// active requests)`.
fn budget_allows(budget: RetryBudget, active_requests: i64, active_retries: i64) -> bool {
    let by_percent = active_requests.max(0) * i64::from(budget.budget_percent) / 100;
    let allowed = by_percent.max(i64::from(budget.min_retry_concurrency));
    active_retries < allowed
}

thread_local! {
    static JITTER: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0x9e37_79b9_7f4a_7c15);
    h.finish() | 1
}

/// xorshift64*: per-shard, good enough to spread backoffs.
fn jitter() -> u64 {
    JITTER.with(|s| {
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}

/// Which circuit-breaker limit refused a request (`limit` label of
/// `meshgate_cluster_upstream_overflow_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Connections = 0,
    PendingRequests = 1,
    Requests = 2,
}

pub const LIMIT_NAMES: [&str; 3] = ["max_connections", "max_pending_requests", "max_requests"];

/// A cluster's circuit-breaker counts for the whole process, shared by every shard and kept
/// across reloads (by cluster name).
#[derive(Debug)]
pub struct Breaker {
    requests: AtomicU32,
    pending: AtomicU32,
    /// Every shard's counters of this cluster (their connection gauges add up to the
    /// process's open connections).
    shards: Box<[Arc<ClusterStats>]>,
}

/// A place taken in a process-wide count; given back on drop.
#[derive(Debug)]
pub struct Slot<'a>(Option<&'a AtomicU32>);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if let Some(count) = self.0 {
            count.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Breaker {
    pub fn new(shards: Box<[Arc<ClusterStats>]>) -> Breaker {
        Breaker {
            requests: AtomicU32::new(0),
            pending: AtomicU32::new(0),
            shards,
        }
    }

    /// A request to the cluster starts (`max_requests`). No limit: nothing is touched.
    pub fn request(&self, limits: &CircuitBreakers) -> Result<Slot<'_>, Limit> {
        take(&self.requests, limits.max_requests, Limit::Requests)
    }

    /// A request waits for a new connection (`max_pending_requests`), which may not be
    /// opened when the cluster has `max_connections` open already.
    pub fn connect(&self, limits: &CircuitBreakers) -> Result<Slot<'_>, Limit> {
        self.may_open(limits)?;
        self.pending(limits)
    }

    /// Whether another connection may be opened (`max_connections`).
    pub fn may_open(&self, limits: &CircuitBreakers) -> Result<(), Limit> {
        if let Some(max) = limits.max_connections {
            let open: i64 = self.shards.iter().map(|s| s.active.get()).sum();
            if open >= i64::from(max) {
                return Err(Limit::Connections);
            }
        }
        Ok(())
    }

    /// A request waits for a connection being opened (`max_pending_requests`); HTTP/2
    /// requests waiting for a connection another request opens count too.
    pub fn pending(&self, limits: &CircuitBreakers) -> Result<Slot<'_>, Limit> {
        take(
            &self.pending,
            limits.max_pending_requests,
            Limit::PendingRequests,
        )
    }

    #[cfg(test)]
    fn in_flight(&self) -> u32 {
        self.requests.load(Ordering::Relaxed)
    }
}

fn take(count: &AtomicU32, max: Option<u32>, limit: Limit) -> Result<Slot<'_>, Limit> {
    let Some(max) = max else {
        return Ok(Slot(None));
    };
    if count.fetch_add(1, Ordering::Relaxed) >= max {
        count.fetch_sub(1, Ordering::Relaxed);
        return Err(limit);
    }
    Ok(Slot(Some(count)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(on: &[RetryOn], attempts: u32) -> RetryPolicy {
        RetryPolicy {
            attempts,
            on: on.to_vec(),
            status_codes: vec![429],
            ..RetryPolicy::default_policy()
        }
    }

    #[test]
    fn conditions_follow_envoy() {
        let p = policy(&[RetryOn::GatewayError], 2);
        assert!(covers(&p, Failure::ConnectFailure));
        assert!(covers(&p, Failure::Reset));
        assert!(covers(&p, Failure::Status(503)));
        assert!(!covers(&p, Failure::Status(500)));
        let p = policy(&[RetryOn::ConnectFailure], 2);
        assert!(!covers(&p, Failure::Reset));
        assert!(!covers(&p, Failure::Status(503)));
        let p = policy(&[RetryOn::RetriableStatusCodes], 2);
        assert!(covers(&p, Failure::Status(429)));
        assert!(!covers(&p, Failure::Status(503)));
        assert!(!covers(&p, Failure::ConnectFailure));
    }

    #[test]
    fn only_replayable_requests_retry_after_sending() {
        let stats = ClusterStats::default();
        let p = policy(&[RetryOn::FiveXx], 3);
        let post = Attempts::new(&p, RetryBudget::default(), &stats, false);
        let rr = picker(2);
        post.endpoint(&rr, None);
        assert!(!post.retry(Failure::Reset));
        assert!(!post.retry(Failure::Status(503)));
        assert!(post.retry(Failure::ConnectFailure), "nothing was sent");
        let get = Attempts::new(&p, RetryBudget::default(), &stats, true);
        get.endpoint(&rr, None);
        assert!(get.retry(Failure::Reset));
        get.endpoint(&rr, None);
        assert!(get.retry(Failure::Status(500)));
        get.endpoint(&rr, None);
        assert!(!get.retry(Failure::Status(500)), "3 attempts made");
        assert!(get.exhausted());
        assert_eq!(stats.rq_active.get(), 2);
        drop((post, get));
        assert_eq!((stats.rq_active.get(), stats.retries_active.get()), (0, 0));
        assert_eq!(stats.retries[1].get(), 1);
        assert_eq!(stats.retries[3].get(), 1);
    }

    /// A round-robin picker over `n` endpoints, as a shard builds it from the config.
    fn picker(n: usize) -> EndpointPicker {
        let endpoints: Vec<String> = (0..n)
            .map(|i| format!("\"127.0.0.1:{}\"", 1000 + i))
            .collect();
        let text = format!(
            "version = 1\n[[listeners]]\nname = \"l\"\naddress = \"127.0.0.1:0\"\nprotocol = \"http\"\n\
             [[routes]]\nname = \"r\"\nlistener = \"l\"\ncluster = \"c\"\n\
             [[clusters]]\nname = \"c\"\nendpoints = [{}]\n",
            endpoints.join(", ")
        );
        let config = meshgate_config::parse(&text, "retry.toml").expect("config");
        let c = &config.clusters[0];
        EndpointPicker::new(c, &crate::balance::SharedLb::build(c, None), 0)
    }

    #[test]
    fn retries_go_to_endpoints_not_tried_yet() {
        let stats = ClusterStats::default();
        let p = policy(&[RetryOn::Reset], 3);
        let rr = picker(3);
        let a = Attempts::new(&p, RetryBudget::default(), &stats, true);
        let first = a.endpoint(&rr, None).expect("endpoint");
        // Other requests move the round robin on meanwhile.
        rr.pick(None);
        let second = a.endpoint(&rr, None).expect("endpoint");
        let third = a.endpoint(&rr, None).expect("endpoint");
        let mut seen = [first, second, third];
        seen.sort_unstable();
        assert_eq!(seen, [0, 1, 2]);
    }

    #[test]
    fn budget_is_a_share_of_active_requests_with_a_floor() {
        let b = RetryBudget {
            budget_percent: 20,
            min_retry_concurrency: 3,
        };
        assert!(budget_allows(b, 1, 2));
        assert!(!budget_allows(b, 1, 3));
        assert!(budget_allows(b, 100, 19));
        assert!(!budget_allows(b, 100, 20));
        let stats = ClusterStats::default();
        let p = policy(&[RetryOn::Reset], 2);
        let zero = RetryBudget {
            budget_percent: 0,
            min_retry_concurrency: 1,
        };
        let rr = picker(2);
        let a = Attempts::new(&p, zero, &stats, true);
        let b = Attempts::new(&p, zero, &stats, true);
        a.endpoint(&rr, None);
        b.endpoint(&rr, None);
        assert!(a.retry(Failure::Reset));
        assert!(!b.retry(Failure::Reset), "one retry at a time");
        assert_eq!(stats.retry_budget_exhausted.get(), 1);
        drop(a);
        assert!(b.retry(Failure::Reset));
    }

    #[test]
    fn backoff_is_jittered_below_the_cap() {
        let stats = ClusterStats::default();
        let p = policy(&[RetryOn::Reset], 10);
        let a = Attempts::new(&p, RetryBudget::default(), &stats, true);
        let rr = picker(1);
        for n in 1..6u32 {
            a.endpoint(&rr, None);
            let d = a.next_delay();
            let cap = (Duration::from_millis(25) * 2u32.pow(n - 1)).min(Duration::from_millis(250));
            assert!(d < cap, "retry {n}: {d:?} >= {cap:?}");
        }
    }

    #[test]
    fn no_retry_past_the_route_deadline() {
        let stats = ClusterStats::default();
        let p = policy(&[RetryOn::Reset], 3);
        let a = Attempts::new(&p, RetryBudget::default(), &stats, true);
        a.endpoint(&picker(1), None);
        a.sent(
            Instant::now() - Duration::from_secs(2),
            Duration::from_secs(1),
        );
        assert!(!a.retry(Failure::Reset));
    }

    #[test]
    fn refused_streams_retry_whatever_the_policy_and_method() {
        let stats = ClusterStats::default();
        let p = policy(&[RetryOn::RetriableStatusCodes], 2);
        let post = Attempts::new(&p, RetryBudget::default(), &stats, false);
        post.endpoint(&picker(2), None);
        assert!(!post.retry(Failure::Reset));
        assert!(
            post.retry(Failure::Refused),
            "the upstream did not process it"
        );
        assert_eq!(stats.retries[4].get(), 1);
        post.endpoint(&picker(2), None);
        assert!(!post.retry(Failure::Refused), "within the attempts");
    }

    #[test]
    fn a_grpc_deadline_bounds_every_attempt() {
        let stats = ClusterStats::default();
        let p = policy(&[RetryOn::Reset], 3);
        let a = Attempts::new(&p, RetryBudget::default(), &stats, true);
        let now = Instant::now();
        a.limit(now + Duration::from_millis(200));
        a.sent(now, Duration::from_secs(15));
        let left = a.time_left(now).expect("deadline");
        assert_eq!(
            left,
            Duration::from_millis(200),
            "the earlier deadline stands"
        );
        a.endpoint(&picker(2), None);
        a.limit(now);
        assert!(!a.retry(Failure::Reset), "no retry past the deadline");
    }

    #[test]
    fn breaker_counts_for_the_process() {
        let limits = CircuitBreakers {
            max_requests: Some(2),
            max_connections: Some(1),
            max_pending_requests: None,
        };
        let shards: Box<[Arc<ClusterStats>]> = vec![
            Arc::new(ClusterStats::default()),
            Arc::new(ClusterStats::default()),
        ]
        .into();
        let b = Breaker::new(shards.clone());
        let one = b.request(&limits).expect("first");
        let two = b.request(&limits).expect("second");
        assert_eq!(b.request(&limits).err(), Some(Limit::Requests));
        drop(one);
        let three = b.request(&limits).expect("room again");
        assert_eq!(b.in_flight(), 2);
        drop((two, three));
        assert!(b.connect(&limits).is_ok());
        shards[1].active.inc();
        assert_eq!(b.connect(&limits).err(), Some(Limit::Connections));
        let free = CircuitBreakers::default();
        assert!(b.connect(&free).is_ok());
    }
}
