//! Rate limits of the enrollment server: a token bucket per source address and one global
//! bucket. Time is passed in (`Instant`), so the arithmetic is tested without sleeping.
//!
//! IPv6 sources are grouped by /64 (one host usually owns a whole /64, so per-address buckets
//! would be trivial to sidestep). The per-source table is bounded: when it is full, buckets that
//! have refilled completely (they carry no information) are dropped; if none has, the request is
//! refused as rate limited rather than letting the table grow.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One bucket's shape: `burst` requests at once, refilled at `per_minute`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub burst: u32,
    pub per_minute: u32,
}

/// Limits of [`RateLimiter`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimits {
    pub per_source: Rate,
    pub global: Rate,
    /// Most sources tracked at once.
    pub max_sources: usize,
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits {
            per_source: Rate {
                burst: 20,
                per_minute: 60,
            },
            global: Rate {
                burst: 200,
                per_minute: 1200,
            },
            max_sources: 10_000,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(rate: Rate, now: Instant) -> Bucket {
        Bucket {
            tokens: f64::from(rate.burst),
            at: now,
        }
    }

    fn refill(&mut self, rate: Rate, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens =
            (self.tokens + dt * f64::from(rate.per_minute) / 60.0).min(f64::from(rate.burst));
        self.at = now;
    }

    /// How long until one token is available (zero if one is).
    fn wait(&self, rate: Rate) -> Duration {
        if self.tokens >= 1.0 {
            Duration::ZERO
        } else if rate.per_minute == 0 {
            Duration::from_secs(3600)
        } else {
            Duration::from_secs_f64((1.0 - self.tokens) * 60.0 / f64::from(rate.per_minute))
        }
    }
}

#[derive(Debug)]
struct State {
    sources: HashMap<IpAddr, Bucket>,
    global: Bucket,
}

/// Per-source and global token buckets.
#[derive(Debug)]
pub struct RateLimiter {
    limits: RateLimits,
    state: Mutex<State>,
}

/// The key of a source: the address, or its /64 for IPv6 (IPv4-mapped addresses as IPv4).
fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut seg = v6.segments();
                for s in &mut seg[4..] {
                    *s = 0;
                }
                IpAddr::V6(seg.into())
            }
        },
    }
}

impl RateLimiter {
    pub fn new(limits: RateLimits, now: Instant) -> RateLimiter {
        RateLimiter {
            limits,
            state: Mutex::new(State {
                sources: HashMap::new(),
                global: Bucket::full(limits.global, now),
            }),
        }
    }

    /// Take one token from `ip`'s bucket and the global one, or say how long to wait. A refused
    /// request takes nothing.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let l = self.limits;
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let key = source_key(ip);
        if !st.sources.contains_key(&key) && st.sources.len() >= l.max_sources {
            st.sources.retain(|_, b| {
                b.refill(l.per_source, now);
                b.tokens < f64::from(l.per_source.burst)
            });
            if st.sources.len() >= l.max_sources {
                return Err(Duration::from_secs(1));
            }
        }
        let mut src = st
            .sources
            .get(&key)
            .copied()
            .unwrap_or_else(|| Bucket::full(l.per_source, now));
        src.refill(l.per_source, now);
        let mut global = st.global;
        global.refill(l.global, now);
        let wait = src.wait(l.per_source).max(global.wait(l.global));
        if wait > Duration::ZERO {
            st.sources.insert(key, src);
            st.global = global;
            return Err(wait);
        }
        src.tokens -= 1.0;
        global.tokens -= 1.0;
        st.sources.insert(key, src);
        st.global = global;
        Ok(())
    }
}

/// Seconds for a `Retry-After` header: at least 1, rounded up.
pub fn retry_after_secs(wait: Duration) -> u64 {
    let s = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    s.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(burst: u32, per_minute: u32, gburst: u32, gpm: u32) -> RateLimits {
        RateLimits {
            per_source: Rate { burst, per_minute },
            global: Rate {
                burst: gburst,
                per_minute: gpm,
            },
            max_sources: 3,
        }
    }

    #[test]
    fn per_source_burst_then_refill() {
        let t0 = Instant::now();
        let rl = RateLimiter::new(limits(3, 60, 100, 6000), t0);
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        for _ in 0..3 {
            rl.check(a, t0).expect("burst");
        }
        let wait = rl.check(a, t0).expect_err("limited");
        assert_eq!(wait, Duration::from_secs(1));
        assert_eq!(retry_after_secs(wait), 1);
        rl.check(b, t0).expect("another source has its own bucket");
        rl.check(a, t0 + Duration::from_millis(1000))
            .expect("one token back after a second at 60/min");
        assert!(rl.check(a, t0 + Duration::from_millis(1000)).is_err());
    }

    #[test]
    fn global_bucket_caps_all_sources() {
        let t0 = Instant::now();
        let rl = RateLimiter::new(limits(10, 60, 2, 6), t0);
        rl.check("10.0.0.1".parse().expect("ip"), t0).expect("1");
        rl.check("10.0.0.2".parse().expect("ip"), t0).expect("2");
        let wait = rl
            .check("10.0.0.3".parse().expect("ip"), t0)
            .expect_err("global");
        assert_eq!(retry_after_secs(wait), 10);
    }

    #[test]
    fn ipv6_grouped_by_64_and_table_bounded() {
        let t0 = Instant::now();
        let rl = RateLimiter::new(limits(1, 1, 100, 6000), t0);
        rl.check("2001:db8::1".parse().expect("ip"), t0)
            .expect("first");
        assert!(
            rl.check("2001:db8::ffff".parse().expect("ip"), t0).is_err(),
            "same /64"
        );
        rl.check("2001:db8:0:1::1".parse().expect("ip"), t0)
            .expect("other /64");
        rl.check("10.0.0.1".parse().expect("ip"), t0).expect("3rd");
        // The table holds 3 sources, none refilled: a 4th is refused.
        assert!(rl.check("10.0.0.2".parse().expect("ip"), t0).is_err());
        // A minute later all have refilled and are dropped to make room.
        rl.check(
            "10.0.0.2".parse().expect("ip"),
            t0 + Duration::from_secs(61),
        )
        .expect("room again");
        assert_eq!(
            source_key("::ffff:10.1.2.3".parse().expect("ip")),
            "10.1.2.3".parse::<IpAddr>().expect("ip")
        );
    }
}
