//! `balance::pick`: choose a cluster among a route's weighted clusters, then an endpoint in it.
//!
//! Per-shard state (`Cell`s owned by one core), no locks. Cluster choice uses smooth weighted
//! round robin (nginx's algorithm), which spreads a 98/2 split evenly in time instead of in
//! bursts and is exact over every window of `sum(weights)` picks.
//!
//! Endpoint choice ([`EndpointPicker`], one per cluster per shard) follows the cluster's
//! `balance`:
//! - `round_robin`: plain round robin when all weights are equal (each shard starting at a
//!   different offset so that N shards do not all hit endpoint 0 first), smooth weighted round
//!   robin when they differ;
//! - `least_request`: power of two choices: two endpoints drawn at random in proportion to
//!   their weights, the one with fewer requests in flight *on this shard* (per unit of weight)
//!   wins;
//! - `maglev`: a Maglev lookup table ([`Maglev`], built once per generation on the control
//!   thread and shared by the shards) indexed by the hash of the request's key.
//!
//! Health: a cluster with `[clusters.health_check]` or `[clusters.outlier_detection]` carries a
//! [`ClusterHealth`] (one atomic per endpoint, written by the health checker on shard 0 and by
//! outlier detection, read here with a relaxed load); unusable endpoints are skipped. A cluster
//! without either carries `None` and pays one branch per pick. The same picker takes a list of
//! endpoints already tried ([`EndpointPicker::pick_excluding`]) for retries.

use std::cell::Cell;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use meshgate_config::{Balance, Cluster, HashOn};

use crate::health::{ClusterHealth, Outcome};
use crate::tls::spiffe::SpiffeId;

/// Smooth weighted round robin over a fixed set of weights.
#[derive(Debug)]
pub struct WeightedPicker {
    weights: Box<[i64]>,
    current: Box<[Cell<i64>]>,
    total: i64,
}

impl WeightedPicker {
    /// `weights` must be non-empty with every weight >= 1 (the config guarantees it).
    pub fn new(weights: &[u32]) -> Self {
        let weights: Box<[i64]> = weights.iter().map(|&w| i64::from(w)).collect();
        let total = weights.iter().sum();
        let current = weights.iter().map(|_| Cell::new(0)).collect();
        WeightedPicker {
            weights,
            current,
            total,
        }
    }

    /// Index of the next choice.
    pub fn pick(&self) -> usize {
        if self.weights.len() == 1 {
            return 0;
        }
        let mut best = 0;
        let mut best_val = i64::MIN;
        for (i, w) in self.weights.iter().enumerate() {
            let v = self.current[i].get() + w;
            self.current[i].set(v);
            if v > best_val {
                best_val = v;
                best = i;
            }
        }
        self.current[best].set(best_val - self.total);
        best
    }
}

/// Round robin over `n` endpoints.
#[derive(Debug)]
pub struct RoundRobin {
    next: Cell<usize>,
    n: usize,
}

impl RoundRobin {
    pub fn new(n: usize, start: usize) -> Self {
        RoundRobin {
            next: Cell::new(if n == 0 { 0 } else { start % n }),
            n,
        }
    }

    /// Index of the next endpoint (0 when there are none; callers check emptiness).
    pub fn pick(&self) -> usize {
        let i = self.next.get();
        self.next.set(if i + 1 >= self.n { 0 } else { i + 1 });
        i
    }

    /// The next endpoint other than those in `tried` (a retry); when every endpoint was
    /// tried, simply the next one.
    pub fn pick_except(&self, tried: &[usize]) -> usize {
        for _ in 0..self.n {
            let i = self.pick();
            if !tried.contains(&i) {
                return i;
            }
        }
        self.pick()
    }
}

/// What one cluster's pickers share across shards for a generation: the endpoints' health
/// and the Maglev table. Built on the control thread (`gateway::apply`).
#[derive(Debug, Clone, Default)]
pub struct SharedLb {
    pub health: Option<Arc<ClusterHealth>>,
    pub maglev: Option<Arc<Maglev>>,
}

impl SharedLb {
    pub fn build(cluster: &Cluster, health: Option<Arc<ClusterHealth>>) -> SharedLb {
        SharedLb {
            health,
            maglev: (cluster.balance == Balance::Maglev)
                .then(|| Arc::new(Maglev::new(&cluster.endpoints, &cluster.endpoint_weights))),
        }
    }
}

/// One cluster's endpoint choice on one shard.
#[derive(Debug)]
pub struct EndpointPicker {
    n: usize,
    kind: Kind,
    health: Option<Arc<ClusterHealth>>,
}

#[derive(Debug)]
enum Kind {
    RoundRobin(RoundRobin),
    Weighted(WeightedPicker),
    LeastRequest(LeastRequest),
    Maglev {
        table: Arc<Maglev>,
        hash_on: HashOn,
        /// Requests without a key.
        fallback: RoundRobin,
    },
}

impl EndpointPicker {
    /// `seed` spreads the shards' starting points (the shard id).
    pub fn new(cluster: &Cluster, shared: &SharedLb, seed: usize) -> EndpointPicker {
        let n = cluster.endpoints.len();
        let kind = match (cluster.balance, &shared.maglev, &cluster.hash_on) {
            (Balance::Maglev, Some(table), Some(hash_on)) => Kind::Maglev {
                table: table.clone(),
                hash_on: hash_on.clone(),
                fallback: RoundRobin::new(n, seed),
            },
            (Balance::LeastRequest, ..) => {
                Kind::LeastRequest(LeastRequest::new(&cluster.endpoint_weights, seed))
            }
            _ if cluster.weighted() => {
                let w = WeightedPicker::new(&cluster.endpoint_weights);
                // Spread the shards' starting points as round robin does.
                for _ in 0..seed % n.max(1) {
                    w.pick();
                }
                Kind::Weighted(w)
            }
            _ => Kind::RoundRobin(RoundRobin::new(n, seed)),
        };
        EndpointPicker {
            n,
            kind,
            health: shared.health.clone(),
        }
    }

    /// The hash key of a connection or request for a `maglev` cluster (`None` for other
    /// policies, or when the key is absent). `header`: the hash of the request's `hash_on`
    /// header, computed by the HTTP proxy before the head is released.
    #[inline]
    pub fn hash_key(
        &self,
        header: Option<u64>,
        source: SocketAddr,
        peer: Option<&SpiffeId>,
    ) -> Option<u64> {
        let Kind::Maglev { hash_on, .. } = &self.kind else {
            return None;
        };
        match hash_on {
            HashOn::Header(_) => header,
            HashOn::PeerIdentity => peer.map(|p| hash_bytes(p.as_str().as_bytes())),
            HashOn::SourceIp => Some(match source.ip().to_canonical() {
                IpAddr::V4(v4) => hash_bytes(&v4.octets()),
                IpAddr::V6(v6) => hash_bytes(&v6.octets()),
            }),
        }
    }

    /// The header a `maglev` cluster hashes on, if any.
    pub fn hash_header(&self) -> Option<&str> {
        match &self.kind {
            Kind::Maglev {
                hash_on: HashOn::Header(h),
                ..
            } => Some(h),
            _ => None,
        }
    }

    /// Index of the endpoint for the next request or connection; `None` when no endpoint is
    /// usable (all unhealthy or ejected: answer 503 `UH`).
    #[inline]
    pub fn pick(&self, key: Option<u64>) -> Option<usize> {
        self.pick_excluding(key, &[])
    }

    /// Like [`pick`](Self::pick), never returning one of `tried` (endpoint indexes): for a
    /// retry on another endpoint. `None` when every usable endpoint was tried.
    pub fn pick_excluding(&self, key: Option<u64>, tried: &[usize]) -> Option<usize> {
        let first = match &self.kind {
            Kind::RoundRobin(rr) => rr.pick(),
            Kind::Weighted(w) => w.pick(),
            Kind::LeastRequest(lr) => lr.pick(|i| self.usable(i, tried)).unwrap_or(0),
            Kind::Maglev {
                table, fallback, ..
            } => match key {
                Some(k) => table.lookup(k),
                None => fallback.pick(),
            },
        };
        if first < self.n && self.usable(first, tried) {
            return Some(first);
        }
        self.pick_slow(key, tried)
    }

    #[inline]
    fn usable(&self, i: usize, tried: &[usize]) -> bool {
        !tried.contains(&i) && self.health.as_ref().is_none_or(|h| h.usable(i))
    }

    /// The first choice was unusable: move on in the policy's own order.
    #[cold]
    fn pick_slow(&self, key: Option<u64>, tried: &[usize]) -> Option<usize> {
        match &self.kind {
            Kind::RoundRobin(rr) => {
                for _ in 1..self.n {
                    let i = rr.pick();
                    if self.usable(i, tried) {
                        return Some(i);
                    }
                }
                None
            }
            Kind::Weighted(w) => {
                for _ in 0..w.total.min(4 * self.n as i64) {
                    let i = w.pick();
                    if self.usable(i, tried) {
                        return Some(i);
                    }
                }
                (0..self.n).find(|&i| self.usable(i, tried))
            }
            Kind::LeastRequest(_) => (0..self.n).find(|&i| self.usable(i, tried)),
            Kind::Maglev {
                table, fallback, ..
            } => match key {
                // The next entries of the table: a key whose endpoint is out goes to another
                // endpoint chosen by the same table (so keys of a failed endpoint spread), and
                // comes back when the endpoint does.
                Some(k) => table
                    .probe(k)
                    .find(|&i| self.usable(i, tried))
                    .or_else(|| (0..self.n).find(|&i| self.usable(i, tried))),
                None => {
                    for _ in 1..self.n {
                        let i = fallback.pick();
                        if self.usable(i, tried) {
                            return Some(i);
                        }
                    }
                    None
                }
            },
        }
    }

    /// A request (or connection) to endpoint `i` starts; counted for `least_request` until the
    /// returned guard drops.
    #[inline]
    pub fn begin(&self, i: usize) -> InFlight<'_> {
        if let Kind::LeastRequest(lr) = &self.kind {
            lr.add(i, 1);
        }
        InFlight { picker: self, i }
    }

    /// Like [`begin`](Self::begin) for a guard that cannot borrow (the TCP path's upstream
    /// guard): pair with [`end`](Self::end).
    #[inline]
    pub fn begin_owned(&self, i: usize) {
        if let Kind::LeastRequest(lr) = &self.kind {
            lr.add(i, 1);
        }
    }

    #[inline]
    pub fn end(&self, i: usize) {
        if let Kind::LeastRequest(lr) = &self.kind {
            lr.add(i, -1);
        }
    }

    /// What endpoint `i` did, for outlier detection (nothing without it).
    #[inline]
    pub fn report(&self, i: usize, outcome: Outcome) {
        if let Some(h) = &self.health {
            h.report(i, outcome);
        }
    }
}

/// A request in flight to one endpoint (see [`EndpointPicker::begin`]).
#[derive(Debug)]
pub struct InFlight<'a> {
    picker: &'a EndpointPicker,
    i: usize,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.picker.end(self.i);
    }
}

/// Power of two choices over requests in flight on this shard.
#[derive(Debug)]
struct LeastRequest {
    /// Running sum of the weights, for draws in proportion to them.
    cumulative: Box<[u64]>,
    weights: Box<[u64]>,
    active: Box<[Cell<u32>]>,
    rng: Cell<u64>,
}

impl LeastRequest {
    fn new(weights: &[u32], seed: usize) -> Self {
        let mut sum = 0u64;
        let cumulative = weights
            .iter()
            .map(|&w| {
                sum += u64::from(w);
                sum
            })
            .collect();
        LeastRequest {
            cumulative,
            weights: weights.iter().map(|&w| u64::from(w)).collect(),
            active: weights.iter().map(|_| Cell::new(0)).collect(),
            rng: Cell::new(
                0x9e37_79b9_7f4a_7c15 ^ (seed as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9),
            ),
        }
    }

    fn next(&self) -> u64 {
        // xorshift64*
        let mut x = self.rng.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn draw(&self) -> usize {
        let total = self.cumulative.last().copied().unwrap_or(0).max(1);
        let r = self.next() % total;
        self.cumulative.partition_point(|&c| c <= r)
    }

    fn add(&self, i: usize, delta: i32) {
        if let Some(a) = self.active.get(i) {
            a.set(a.get().saturating_add_signed(delta));
        }
    }

    /// Two different endpoints drawn among usable ones (a few tries each); the less loaded per
    /// unit of weight wins (the first drawn on a tie). Distinct draws: with two endpoints, a
    /// slow one is chosen only when it is not the busier one.
    fn pick(&self, usable: impl Fn(usize) -> bool) -> Option<usize> {
        let a = (0..4).map(|_| self.draw()).find(|&i| usable(i))?;
        let n = self.weights.len();
        let Some(b) = (0..4)
            .map(|_| self.draw())
            .find(|&i| i != a && usable(i))
            .or_else(|| (1..n).map(|d| (a + d) % n).find(|&i| usable(i)))
        else {
            return Some(a);
        };
        // active_a / w_a <= active_b / w_b, without division.
        let load = |i: usize| u64::from(self.active[i].get()) * self.weights[a ^ b ^ i];
        Some(if load(a) <= load(b) { a } else { b })
    }
}

/// Maglev lookup table (Eisenbud et al., NSDI 2016) over a cluster's endpoints, with weights
/// as Envoy does them: each round, an endpoint fills a slot only while its share of the filled
/// slots is below its share of the weight. Built from the endpoints' *addresses*, so a reload
/// that removes one endpoint moves only the keys that were on it (plus a few), about 1/N.
#[derive(Debug)]
pub struct Maglev {
    table: Box<[u32]>,
}

impl Maglev {
    /// Table size: a prime well above 100 × the endpoint count (Maglev's rule for < 1 %
    /// imbalance), Envoy's default.
    pub const SIZE: usize = 65_537;

    pub fn new(endpoints: &[SocketAddr], weights: &[u32]) -> Maglev {
        let m = Self::SIZE as u64;
        let n = endpoints.len();
        let mut table = vec![u32::MAX; Self::SIZE];
        if n == 0 {
            return Maglev {
                table: table.into_boxed_slice(),
            };
        }
        let perms: Vec<(u64, u64)> = endpoints
            .iter()
            .map(|e| {
                let name = e.to_string();
                let offset = hash_seeded(name.as_bytes(), 0x6d61_676c) % m;
                let skip = hash_seeded(name.as_bytes(), 0x6576_2121) % (m - 1) + 1;
                (offset, skip)
            })
            .collect();
        let max_w = f64::from(weights.iter().copied().max().unwrap_or(1).max(1));
        let mut next = vec![0u64; n];
        let mut target = vec![0f64; n];
        let mut count = vec![0u64; n];
        let mut filled = 0usize;
        'fill: loop {
            for i in 0..n {
                target[i] += f64::from(weights.get(i).copied().unwrap_or(1)) / max_w;
                while (count[i] as f64) < target[i] {
                    let (offset, skip) = perms[i];
                    let slot = loop {
                        let c = ((offset + skip * next[i]) % m) as usize;
                        next[i] += 1;
                        if table[c] == u32::MAX {
                            break c;
                        }
                    };
                    table[slot] = i as u32;
                    count[i] += 1;
                    filled += 1;
                    if filled == Self::SIZE {
                        break 'fill;
                    }
                }
            }
        }
        Maglev {
            table: table.into_boxed_slice(),
        }
    }

    #[inline]
    pub fn lookup(&self, key: u64) -> usize {
        self.table[(key % Self::SIZE as u64) as usize] as usize
    }

    /// The entries after the key's own, for keys whose endpoint is out (bounded).
    fn probe(&self, key: u64) -> impl Iterator<Item = usize> + '_ {
        let start = (key % Self::SIZE as u64) as usize;
        (1..Self::SIZE.min(4096)).map(move |d| self.table[(start + d) % Self::SIZE] as usize)
    }
}

/// The hash of a key (header value, peer ID, source IP): FNV-1a, then a 64-bit finalizer so
/// that short keys spread over the whole table.
#[inline]
pub fn hash_bytes(data: &[u8]) -> u64 {
    hash_seeded(data, 0)
}

fn hash_seeded(data: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // splitmix64's finalizer
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_split_is_exact_per_window() {
        let p = WeightedPicker::new(&[98, 2]);
        let mut counts = [0usize; 2];
        for _ in 0..100 {
            counts[p.pick()] += 1;
        }
        assert_eq!(counts, [98, 2]);
    }

    #[test]
    fn weighted_is_smooth() {
        let p = WeightedPicker::new(&[1, 1, 2]);
        let picks: Vec<usize> = (0..4).map(|_| p.pick()).collect();
        // The heaviest never goes twice in a row within a window of 4.
        assert_eq!(picks.iter().filter(|&&i| i == 2).count(), 2);
        assert_ne!(picks[0], picks[1]);
    }

    #[test]
    fn round_robin_cycles_from_offset() {
        let rr = RoundRobin::new(3, 4);
        let picks: Vec<usize> = (0..6).map(|_| rr.pick()).collect();
        assert_eq!(picks, vec![1, 2, 0, 1, 2, 0]);
    }

    fn addrs(n: usize) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| SocketAddr::from(([10, 0, (i / 250) as u8, (i % 250) as u8 + 1], 8080)))
            .collect()
    }

    #[test]
    fn maglev_spreads_by_weight() {
        let eps = addrs(3);
        let m = Maglev::new(&eps, &[1, 1, 2]);
        let mut counts = [0usize; 3];
        for &e in m.table.iter() {
            counts[e as usize] += 1;
        }
        let total = Maglev::SIZE as f64;
        assert!((counts[2] as f64 / total - 0.5).abs() < 0.01, "{counts:?}");
        assert!((counts[0] as f64 / total - 0.25).abs() < 0.01, "{counts:?}");
    }

    #[test]
    fn maglev_removal_moves_about_one_nth() {
        let eps = addrs(10);
        let before = Maglev::new(&eps, &[1; 10]);
        let fewer: Vec<SocketAddr> = eps.iter().copied().filter(|e| *e != eps[3]).collect();
        let after = Maglev::new(&fewer, &[1; 9]);
        let mut moved = 0;
        for key in 0..20_000u64 {
            let k = hash_bytes(&key.to_le_bytes());
            if eps[before.lookup(k)] != fewer[after.lookup(k)] {
                moved += 1;
            }
        }
        // The keys of the removed endpoint (1/10) must move; Maglev moves a few more.
        let share = f64::from(moved) / 20_000.0;
        assert!((0.09..0.15).contains(&share), "moved {share}");
    }

    #[test]
    fn least_request_prefers_the_idle_endpoint() {
        let lr = LeastRequest::new(&[1, 1], 0);
        lr.add(0, 5);
        // Two endpoints: both are always compared, so the busy one never wins.
        assert!((0..100).all(|_| lr.pick(|_| true) == Some(1)));
        // Weight counts: 5 in flight on weight 10 is less load than 1 on weight 1.
        let lr = LeastRequest::new(&[10, 1], 0);
        lr.add(0, 5);
        lr.add(1, 1);
        assert!((0..100).all(|_| lr.pick(|_| true) == Some(0)));
    }
}
