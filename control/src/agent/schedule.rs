//! When the agent acts next: a pure function of the time, the current certificate's validity
//! and the number of failures in a row, so the schedule is tested without sleeping.
//!
//! - No identity: enroll now; after failures, back off.
//! - An identity: renew at half of its lifetime (from issuance, not from the backdated
//!   `notBefore`), jittered by ±10% of that half (45%..55% of the lifetime) so a fleet enrolled
//!   together does not renew together.
//! - After a failed attempt: retry with exponential backoff, 1 s doubling to 5 min (±10%),
//!   whether or not the certificate has expired meanwhile; the files keep the last identity.

use std::time::Duration;

use time::OffsetDateTime;

/// First retry delay.
pub const MIN_BACKOFF: Duration = Duration::from_secs(1);
/// Longest retry delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// The validity the schedule works from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// When the CA signed it (the `issued_at` of the response or the ledger).
    pub issued_at: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

/// What to do, and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Enroll with the join token at `at`.
    Enroll { at: OffsetDateTime },
    /// Renew with the current SVID at `at`.
    Renew { at: OffsetDateTime },
}

impl Action {
    pub fn at(self) -> OffsetDateTime {
        match self {
            Action::Enroll { at } | Action::Renew { at } => at,
        }
    }
}

fn clamp_jitter(j: f64) -> f64 {
    if j.is_finite() {
        j.clamp(-1.0, 1.0)
    } else {
        0.0
    }
}

/// Delay before retry number `failures` (1 = the first retry): 1 s, 2 s, 4 s ... 5 min, scaled
/// by `1 + 0.1 * jitter` (`jitter` in -1..=1) and kept within 1 s .. 5 min.
pub fn backoff(failures: u32, jitter: f64) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    let exp = (failures - 1).min(16);
    let base = MIN_BACKOFF
        .saturating_mul(1u32 << exp)
        .min(MAX_BACKOFF)
        .as_secs_f64();
    Duration::from_secs_f64(base * (1.0 + 0.1 * clamp_jitter(jitter)))
        .clamp(MIN_BACKOFF, MAX_BACKOFF)
}

/// The renewal point of a certificate: 50% ± 5% of its lifetime after issuance.
pub fn renewal_due(v: Validity, jitter: f64) -> OffsetDateTime {
    let life = v.not_after - v.issued_at;
    if life <= time::Duration::ZERO {
        return v.issued_at;
    }
    v.issued_at + life * (0.5 + 0.05 * clamp_jitter(jitter))
}

/// The next action. `failures`: attempts that failed in a row since the last success;
/// `jitter`: a random number in -1..=1 drawn by the caller.
pub fn next_action(
    now: OffsetDateTime,
    validity: Option<Validity>,
    failures: u32,
    jitter: f64,
) -> Action {
    let retry = now + backoff(failures, jitter);
    match validity {
        None => Action::Enroll { at: retry },
        Some(_) if failures > 0 => Action::Renew { at: retry },
        Some(v) => Action::Renew {
            at: renewal_due(v, jitter).max(now),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, FixedClock};

    fn secs(s: i64) -> time::Duration {
        time::Duration::seconds(s)
    }

    #[test]
    fn renews_at_half_life_with_bounded_jitter() {
        let clock = FixedClock::at_system_now();
        let t0 = clock.now();
        let v = Validity {
            issued_at: t0,
            not_after: t0 + secs(60),
        };
        assert_eq!(
            next_action(t0, Some(v), 0, 0.0),
            Action::Renew { at: t0 + secs(30) }
        );
        assert_eq!(
            next_action(t0, Some(v), 0, 1.0),
            Action::Renew { at: t0 + secs(33) }
        );
        assert_eq!(
            next_action(t0, Some(v), 0, -1.0),
            Action::Renew { at: t0 + secs(27) }
        );
        // Out-of-range or NaN jitter cannot push it past 55%.
        assert_eq!(
            next_action(t0, Some(v), 0, 7.0),
            Action::Renew { at: t0 + secs(33) }
        );
        assert_eq!(
            next_action(t0, Some(v), 0, f64::NAN),
            Action::Renew { at: t0 + secs(30) }
        );
        // Past the due time (e.g. after a restart): now.
        clock.advance(Duration::from_secs(40));
        let now = clock.now();
        assert_eq!(next_action(now, Some(v), 0, 0.0), Action::Renew { at: now });
    }

    #[test]
    fn backs_off_exponentially_to_five_minutes() {
        let want = [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300];
        for (i, w) in want.iter().enumerate() {
            let f = u32::try_from(i + 1).expect("small");
            assert_eq!(backoff(f, 0.0), Duration::from_secs(*w), "failure {f}");
        }
        assert_eq!(backoff(u32::MAX, 0.0), MAX_BACKOFF);
        assert_eq!(backoff(4, 1.0), Duration::from_secs_f64(8.8));
        assert_eq!(backoff(4, -1.0), Duration::from_secs_f64(7.2));
        assert_eq!(backoff(1, -1.0), MIN_BACKOFF, "never under 1s");
        assert_eq!(backoff(20, 1.0), MAX_BACKOFF, "never over 5min");
        assert_eq!(backoff(0, 1.0), Duration::ZERO);
    }

    #[test]
    fn failures_retry_with_backoff_even_after_expiry() {
        let clock = FixedClock::at_system_now();
        let t0 = clock.now();
        let v = Validity {
            issued_at: t0,
            not_after: t0 + secs(60),
        };
        clock.advance(Duration::from_secs(31));
        let now = clock.now();
        assert_eq!(
            next_action(now, Some(v), 1, 0.0),
            Action::Renew { at: now + secs(1) }
        );
        assert_eq!(
            next_action(now, Some(v), 3, 0.0),
            Action::Renew { at: now + secs(4) }
        );
        // The CA stays away past expiry: keep trying to renew (the server may accept within
        // its renewal grace), capped at 5 minutes.
        clock.advance(Duration::from_secs(3600));
        let later = clock.now();
        assert_eq!(
            next_action(later, Some(v), 30, 0.0),
            Action::Renew {
                at: later + secs(300)
            }
        );
    }

    #[test]
    fn enrolls_without_identity() {
        let clock = FixedClock::at_system_now();
        let now = clock.now();
        assert_eq!(next_action(now, None, 0, 0.5), Action::Enroll { at: now });
        assert_eq!(
            next_action(now, None, 2, 0.0),
            Action::Enroll { at: now + secs(2) }
        );
        // A degenerate certificate (expiry at issuance) renews at once.
        let v = Validity {
            issued_at: now,
            not_after: now,
        };
        assert_eq!(next_action(now, Some(v), 0, 0.0), Action::Renew { at: now });
    }
}
