//! The federation poller: one thread that refreshes every federated trust domain of a trust
//! store at the peer's refresh hint (bounded by [`PollerConfig::min_interval`] and
//! [`PollerConfig::max_interval`]), retries failures with backoff, and reports changed bundles.
//!
//! A failed or refused fetch (unreachable, garbage, wrong trust domain, lower sequence) keeps
//! the last good bundle: only `status.json` records the error, which `meshgate trust list` and
//! the `meshgate_federation_*` metrics show, and a warning is logged.
//!
//! Change detection reads the store, not the fetches: a bundle stored by this poller, by
//! `meshgate trust refresh` or by `meshgate bundle import` (another process) is reported alike,
//! so `meshgate run` reloads whichever way the bundle arrived.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use time::OffsetDateTime;

use super::Profile;
use super::client::fetch;
use super::store::{Stored, TrustStore};
use crate::spiffe::TrustDomain;

/// Bounds of the refresh schedule.
#[derive(Debug, Clone, Copy)]
pub struct PollerConfig {
    /// Never poll a peer more often than this, whatever its hint.
    pub min_interval: Duration,
    /// Poll at least this often, whatever its hint.
    pub max_interval: Duration,
    /// Used when a peer gives no refresh hint.
    pub default_interval: Duration,
    /// Deadline of one fetch.
    pub timeout: Duration,
}

impl Default for PollerConfig {
    fn default() -> Self {
        PollerConfig {
            min_interval: Duration::from_secs(1),
            max_interval: Duration::from_secs(3600),
            default_interval: Duration::from_secs(300),
            timeout: Duration::from_secs(10),
        }
    }
}

impl PollerConfig {
    /// The interval for a peer's hint (seconds; 0 = none).
    pub fn interval(&self, hint_secs: u64) -> Duration {
        let hint = if hint_secs == 0 {
            self.default_interval
        } else {
            Duration::from_secs(hint_secs)
        };
        hint.clamp(self.min_interval, self.max_interval.max(self.min_interval))
    }
}

/// Fetch `td`'s bundle once and store it if it passes validation; on failure record the
/// error (the bundle in force stays) and return it.
pub fn refresh_one(
    store: &TrustStore,
    td: &TrustDomain,
    timeout: Duration,
) -> Result<Stored, String> {
    let peer = store.peer(td).map_err(|e| e.to_string())?;
    if peer.profile == Profile::Static {
        return Ok(Stored::Unchanged);
    }
    // https_spiffe: the endpoint is authenticated by the bundle of its ID's trust domain.
    let auth_td = peer
        .endpoint_spiffe_id
        .as_ref()
        .map(|id| id.trust_domain().clone())
        .unwrap_or_else(|| td.clone());
    let result = store
        .bundle(&auth_td)
        .map_err(|e| e.to_string())
        .and_then(|current| fetch(&peer, current.as_ref(), timeout).map_err(|e| e.to_string()))
        .and_then(|b| {
            store
                .store_bundle(&b, OffsetDateTime::now_utc(), false)
                .map_err(|e| e.to_string())
        });
    match result {
        Ok(s) => {
            if s == Stored::Updated {
                let st = store.status(td).unwrap_or_default();
                tracing::info!(
                    trust_domain = %td,
                    sequence = st.sequence,
                    authorities = st.authorities,
                    "federation: new bundle in force"
                );
            }
            Ok(s)
        }
        Err(e) => {
            let failures = store
                .record_failure(td, &e, OffsetDateTime::now_utc())
                .map(|s| s.consecutive_failures)
                .unwrap_or(0);
            tracing::warn!(
                trust_domain = %td,
                endpoint = peer.endpoint.as_deref().unwrap_or(""),
                error = %e,
                consecutive_failures = failures,
                "federation: bundle refresh failed; the last good bundle stays in force"
            );
            Err(e)
        }
    }
}

/// A running poller; dropping it stops it.
#[derive(Debug)]
pub struct Poller {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Poller {
    /// Start polling the trust store of `state_dir`. `on_change` is called (on the poller's
    /// thread) with the trust domains whose bundle in force changed, or that were removed.
    pub fn start(
        state_dir: &Path,
        cfg: PollerConfig,
        on_change: impl Fn(Vec<TrustDomain>) + Send + 'static,
    ) -> std::io::Result<Poller> {
        let store = TrustStore::new(state_dir);
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("federation-poller".into())
            .spawn(move || run(&store, cfg, &stop2, &on_change))?;
        Ok(Poller {
            stop,
            thread: Some(thread),
        })
    }

    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn run(
    store: &TrustStore,
    cfg: PollerConfig,
    stop: &AtomicBool,
    on_change: &dyn Fn(Vec<TrustDomain>),
) {
    let mut due: HashMap<TrustDomain, Instant> = HashMap::new();
    // What each domain's bundle in force was when last reported: (last_update, sequence).
    // Start from what is on disk now: the gateway started with it.
    let mut seen: HashMap<TrustDomain, (Option<OffsetDateTime>, u64)> = store
        .domains()
        .unwrap_or_default()
        .into_iter()
        .map(|td| {
            let st = store.status(&td).unwrap_or_default();
            (td, (st.last_update, st.sequence))
        })
        .collect();
    while !stop.load(Ordering::SeqCst) {
        let domains = match store.domains() {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "federation: cannot list the trust store");
                Vec::new()
            }
        };
        let now = Instant::now();
        for td in &domains {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            if due.get(td).is_some_and(|t| *t > now) {
                continue;
            }
            let outcome = refresh_one(store, td, cfg.timeout);
            let st = store.status(td).unwrap_or_default();
            let interval = cfg.interval(st.refresh_hint_secs);
            let next = match outcome {
                Ok(_) => interval,
                // Retry sooner after a failure: 1 s doubling, never later than the interval.
                Err(_) => {
                    let shift = st.consecutive_failures.saturating_sub(1).min(16) as u32;
                    (cfg.min_interval * 2u32.saturating_pow(shift)).min(interval)
                }
            };
            due.insert(td.clone(), Instant::now() + next);
        }
        due.retain(|td, _| domains.contains(td));

        let mut changed = Vec::new();
        for td in &domains {
            let st = store.status(td).unwrap_or_default();
            let key = (st.last_update, st.sequence);
            if seen.get(td) != Some(&key) {
                changed.push(td.clone());
                seen.insert(td.clone(), key);
            }
        }
        let removed: Vec<TrustDomain> = seen
            .keys()
            .filter(|td| !domains.contains(td))
            .cloned()
            .collect();
        for td in removed {
            seen.remove(&td);
            changed.push(td);
        }
        if !changed.is_empty() {
            on_change(changed);
        }
        for _ in 0..4 {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_follow_the_hint_within_bounds() {
        let cfg = PollerConfig::default();
        assert_eq!(cfg.interval(0), Duration::from_secs(300), "no hint");
        assert_eq!(cfg.interval(30), Duration::from_secs(30));
        assert_eq!(cfg.interval(86_400), Duration::from_secs(3600), "capped");
        let fast = PollerConfig {
            min_interval: Duration::from_secs(5),
            ..cfg
        };
        assert_eq!(fast.interval(1), Duration::from_secs(5), "floored");
    }

    #[test]
    fn reports_bundles_stored_by_another_process() {
        let d = tempfile::tempdir().expect("tmp");
        let (tx, rx) = std::sync::mpsc::channel();
        let poller = Poller::start(d.path(), PollerConfig::default(), move |tds| {
            let _ = tx.send(tds);
        })
        .expect("start");
        // A static (imported) domain appears: the poller never fetches it, but reports it.
        let store = TrustStore::new(d.path());
        let ca = crate::ca::Ca::init(
            &d.path().join("a"),
            &crate::ca::InitOptions::new(TrustDomain::parse("a.test").expect("td")),
            Arc::new(crate::clock::SystemClock),
        )
        .expect("ca");
        let now = OffsetDateTime::now_utc();
        store
            .add(
                &super::super::store::PeerConfig {
                    version: 1,
                    trust_domain: TrustDomain::parse("a.test").expect("td"),
                    endpoint: None,
                    profile: Profile::Static,
                    endpoint_spiffe_id: None,
                    web_ca_file: None,
                    added_at: now,
                },
                Some(&ca.bundle().expect("bundle")),
                now,
            )
            .expect("add");
        let got = rx.recv_timeout(Duration::from_secs(10)).expect("reported");
        assert_eq!(got, vec![TrustDomain::parse("a.test").expect("td")]);
        store
            .remove(&TrustDomain::parse("a.test").expect("td"))
            .expect("remove");
        let got = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("removal reported");
        assert_eq!(got.len(), 1);
        poller.stop();
    }
}
