//! `balance::pick`: choose a cluster among a route's weighted clusters, then an endpoint in it.
//!
//! Per-shard state only (`Cell`s owned by one core): no locks, no atomics, no RNG. Cluster
//! choice uses smooth weighted round robin (nginx's algorithm), which spreads a 98/2 split evenly
//! in time instead of in bursts and is exact over every window of `sum(weights)` picks.
//! Endpoint choice is round robin, each shard starting at a different offset so that N shards
//! do not all hit endpoint 0 first.

use std::cell::Cell;

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
}
