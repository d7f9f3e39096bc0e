//! The trust store: federated trust domains in the state directory.
//!
//! ```text
//! trust/.lock              flock target of every writer (the CLI, the poller)
//! trust/<td>/peer.json     how to reach the peer: endpoint URL, profile, endpoint SPIFFE ID
//! trust/<td>/bundle.json   the last good bundle, SPIFFE format (with its sequence)
//! trust/<td>/bundle.pem    the same authorities as PEM: what the dataplane's verifier reads
//! trust/<td>/status.json   last refresh, last attempt, last error, failure count
//! ```
//!
//! Every file is replaced through [`crate::state::write_atomic`]. A new bundle is written JSON
//! first, then PEM, then status; a crash in between leaves a bundle.pem that is either the old
//! good one or the new good one (both validated), never a mix. A failed fetch only writes
//! `status.json`: the last good bundle stays in force.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::Profile;
use crate::bundle::{BundleError, BundleFormat, TrustBundle};
use crate::layout::StateDir;
use crate::spiffe::{SpiffeId, TrustDomain};
use crate::state::{self, mode};

/// How to reach one federated trust domain (`peer.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub version: u32,
    pub trust_domain: TrustDomain,
    /// `https://host:port/path`; None for an imported (static) bundle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    pub profile: Profile,
    /// `https_spiffe`: the SPIFFE ID the endpoint server must present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_spiffe_id: Option<SpiffeId>,
    /// `https_web`: a PEM file of CAs to verify the server with instead of the system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub web_ca_file: Option<PathBuf>,
    #[serde(with = "time::serde::rfc3339")]
    pub added_at: OffsetDateTime,
}

/// Refresh status of one federated trust domain (`status.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    /// Sequence of the bundle in force (0: none yet, or a PEM bundle).
    pub sequence: u64,
    /// The peer's refresh hint, seconds (0: none given).
    pub refresh_hint_secs: u64,
    /// Number of X.509 authorities in force.
    pub authorities: usize,
    /// Last successful fetch (the bundle may or may not have changed).
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub last_refresh: Option<OffsetDateTime>,
    /// When the bundle in force was stored.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub last_update: Option<OffsetDateTime>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub last_attempt: Option<OffsetDateTime>,
    /// Why the last attempt failed (None when it succeeded).
    #[serde(default)]
    pub last_error: Option<String>,
    pub consecutive_failures: u64,
    pub failures_total: u64,
    pub updates_total: u64,
}

/// A peer as `trust list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct PeerView {
    #[serde(flatten)]
    pub config: PeerConfig,
    #[serde(flatten)]
    pub status: PeerStatus,
    /// SHA-256 fingerprints of the authorities in force.
    pub fingerprints: Vec<String>,
    pub bundle_pem: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TrustStoreError {
    #[error("{0}")]
    Io(String),
    #[error("{path} is damaged ({detail}); remove the trust domain and add it again")]
    Corrupt { path: PathBuf, detail: String },
    #[error("trust domain {0} is not in the trust store; see `meshgate trust list`")]
    Unknown(TrustDomain),
    #[error(
        "trust domain {0} is already in the trust store; remove it first (`meshgate trust remove`)"
    )]
    Exists(TrustDomain),
    #[error("the bundle for {td} was refused: {source}")]
    Bundle {
        td: TrustDomain,
        #[source]
        source: BundleError,
    },
    #[error(
        "the bundle for {td} has sequence {got}, lower than {have} in force; keeping the bundle in force"
    )]
    SequenceWentBack {
        td: TrustDomain,
        have: u64,
        got: u64,
    },
    #[error(
        "the bundle for {td} changed its authorities without raising its sequence ({have}); keeping the bundle in force"
    )]
    ChangedWithoutSequence { td: TrustDomain, have: u64 },
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> TrustStoreError {
    TrustStoreError::Io(format!("{}: {e}", path.display()))
}

/// What storing a fetched bundle did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// New authorities (or a new sequence) are in force.
    Updated,
    /// Same bundle as before.
    Unchanged,
}

/// The trust store of one state directory.
#[derive(Debug, Clone)]
pub struct TrustStore {
    dir: PathBuf,
}

/// An exclusive lock on `trust/.lock`, held until dropped.
#[derive(Debug)]
struct StoreLock {
    _file: File,
}

impl TrustStore {
    pub fn new(state_dir: &Path) -> TrustStore {
        TrustStore {
            dir: StateDir::new(state_dir).trust_dir(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `trust/<td>`. A name starting with '.' (".", "..", valid trust domain characters) would
    /// leave the trust directory or collide with `.lock`: such names map to a path that never
    /// exists (`!` is never in a trust domain), and [`TrustStore::add`] refuses them.
    fn domain_dir(&self, td: &TrustDomain) -> PathBuf {
        if td.as_str().starts_with('.') {
            return self.dir.join("!invalid");
        }
        self.dir.join(td.as_str())
    }

    /// The PEM file the dataplane reads for `td`.
    pub fn bundle_pem_path(&self, td: &TrustDomain) -> PathBuf {
        self.domain_dir(td).join("bundle.pem")
    }

    fn lock(&self) -> Result<StoreLock, TrustStoreError> {
        state::ensure_state_dir(&self.dir).map_err(|e| TrustStoreError::Io(e.to_string()))?;
        let path = self.dir.join(".lock");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(mode::SECRET)
            .open(&path)
            .map_err(|e| io_err(&path, e))?;
        file.lock().map_err(|e| io_err(&path, e))?;
        Ok(StoreLock { _file: file })
    }

    fn read_json<T: serde::de::DeserializeOwned>(
        path: &Path,
    ) -> Result<Option<T>, TrustStoreError> {
        match fs::read(path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| TrustStoreError::Corrupt {
                    path: path.to_path_buf(),
                    detail: e.to_string(),
                }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(path, e)),
        }
    }

    fn write_json(path: &Path, v: &impl Serialize) -> Result<(), TrustStoreError> {
        let mut json = serde_json::to_vec_pretty(v).map_err(|e| io_err(path, e))?;
        json.push(b'\n');
        state::write_atomic(path, &json, mode::PUBLIC)
            .map_err(|e| TrustStoreError::Io(e.to_string()))
    }

    /// Federated trust domains, sorted by name.
    pub fn domains(&self) -> Result<Vec<TrustDomain>, TrustStoreError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&self.dir, e)),
        };
        let mut out: Vec<TrustDomain> = entries
            .flatten()
            .filter(|e| e.path().join("peer.json").is_file())
            .filter_map(|e| TrustDomain::parse(&e.file_name().to_string_lossy()).ok())
            .collect();
        out.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        Ok(out)
    }

    pub fn peer(&self, td: &TrustDomain) -> Result<PeerConfig, TrustStoreError> {
        Self::read_json(&self.domain_dir(td).join("peer.json"))?
            .ok_or_else(|| TrustStoreError::Unknown(td.clone()))
    }

    pub fn status(&self, td: &TrustDomain) -> Result<PeerStatus, TrustStoreError> {
        Ok(Self::read_json(&self.domain_dir(td).join("status.json"))?.unwrap_or_default())
    }

    /// The last good bundle of `td`, if any.
    pub fn bundle(&self, td: &TrustDomain) -> Result<Option<TrustBundle>, TrustStoreError> {
        let path = self.domain_dir(td).join("bundle.json");
        match fs::read(&path) {
            Ok(b) => TrustBundle::parse(td, BundleFormat::Spiffe, &b)
                .map(Some)
                .map_err(|e| TrustStoreError::Corrupt {
                    path,
                    detail: e.to_string(),
                }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path, e)),
        }
    }

    pub fn view(&self, td: &TrustDomain) -> Result<PeerView, TrustStoreError> {
        let config = self.peer(td)?;
        let status = self.status(td)?;
        let fingerprints = self
            .bundle(td)?
            .map(|b| b.fingerprints())
            .unwrap_or_default();
        Ok(PeerView {
            config,
            status,
            fingerprints,
            bundle_pem: self.bundle_pem_path(td),
        })
    }

    pub fn list(&self) -> Result<Vec<PeerView>, TrustStoreError> {
        self.domains()?.iter().map(|td| self.view(td)).collect()
    }

    /// Add a peer, with its bootstrap bundle if given. Refuses a domain already present.
    pub fn add(
        &self,
        peer: &PeerConfig,
        bootstrap: Option<&TrustBundle>,
        now: OffsetDateTime,
    ) -> Result<(), TrustStoreError> {
        if peer.trust_domain.as_str().starts_with('.') {
            return Err(TrustStoreError::Io(format!(
                "trust domain {:?} cannot be stored (it starts with '.')",
                peer.trust_domain.as_str()
            )));
        }
        let _lock = self.lock()?;
        let dir = self.domain_dir(&peer.trust_domain);
        if dir.join("peer.json").exists() {
            return Err(TrustStoreError::Exists(peer.trust_domain.clone()));
        }
        state::ensure_state_dir(&dir).map_err(|e| TrustStoreError::Io(e.to_string()))?;
        // A half-added domain (crash before peer.json) is simply overwritten.
        let mut status = PeerStatus::default();
        if let Some(b) = bootstrap {
            self.write_bundle(b)?;
            status.sequence = b.sequence;
            status.refresh_hint_secs = b.refresh_hint_secs;
            status.authorities = b.x509_authorities.len();
            status.last_update = Some(now);
        }
        Self::write_json(&dir.join("status.json"), &status)?;
        // peer.json last: its presence marks the domain as added.
        Self::write_json(&dir.join("peer.json"), peer)
    }

    /// Remove a peer and its bundle.
    pub fn remove(&self, td: &TrustDomain) -> Result<(), TrustStoreError> {
        let _lock = self.lock()?;
        let dir = self.domain_dir(td);
        let peer = dir.join("peer.json");
        if !peer.exists() {
            return Err(TrustStoreError::Unknown(td.clone()));
        }
        // peer.json first: from then on the domain is gone, whatever is left behind.
        fs::remove_file(&peer).map_err(|e| io_err(&peer, e))?;
        fs::remove_dir_all(&dir).map_err(|e| io_err(&dir, e))
    }

    fn write_bundle(&self, b: &TrustBundle) -> Result<(), TrustStoreError> {
        let dir = self.domain_dir(&b.trust_domain);
        let json = b.to_spiffe_json().map_err(|e| TrustStoreError::Bundle {
            td: b.trust_domain.clone(),
            source: BundleError::Malformed(e.to_string()),
        })?;
        Self::write_json(&dir.join("bundle.json"), &json)?;
        let pem = dir.join("bundle.pem");
        state::write_atomic(&pem, b.to_pem().as_bytes(), mode::PUBLIC)
            .map_err(|e| TrustStoreError::Io(e.to_string()))
    }

    /// Store a bundle fetched (or imported) for its trust domain, if it passes the sequence
    /// rules: never lower than the one in force, and never different authorities under the
    /// same (non-zero) sequence. `force` (operator import) skips those rules.
    pub fn store_bundle(
        &self,
        b: &TrustBundle,
        now: OffsetDateTime,
        force: bool,
    ) -> Result<Stored, TrustStoreError> {
        let _lock = self.lock()?;
        let td = &b.trust_domain;
        self.peer(td)?;
        let mut status = self.status(td)?;
        let current = self.bundle(td)?;
        let outcome = match &current {
            Some(cur) if !force => {
                if b.sequence < cur.sequence {
                    return Err(TrustStoreError::SequenceWentBack {
                        td: td.clone(),
                        have: cur.sequence,
                        got: b.sequence,
                    });
                }
                let same = cur.same_authorities(b);
                if b.sequence == cur.sequence && cur.sequence > 0 && !same {
                    return Err(TrustStoreError::ChangedWithoutSequence {
                        td: td.clone(),
                        have: cur.sequence,
                    });
                }
                if same
                    && b.sequence == cur.sequence
                    && b.refresh_hint_secs == cur.refresh_hint_secs
                {
                    Stored::Unchanged
                } else {
                    Stored::Updated
                }
            }
            _ => Stored::Updated,
        };
        if outcome == Stored::Updated {
            self.write_bundle(b)?;
            status.last_update = Some(now);
            status.updates_total += 1;
        }
        status.sequence = b.sequence;
        status.refresh_hint_secs = b.refresh_hint_secs;
        status.authorities = b.x509_authorities.len();
        status.last_refresh = Some(now);
        status.last_attempt = Some(now);
        status.last_error = None;
        status.consecutive_failures = 0;
        Self::write_json(&self.domain_dir(td).join("status.json"), &status)?;
        Ok(outcome)
    }

    /// Record a failed refresh: only `status.json` changes; the bundle in force stays.
    pub fn record_failure(
        &self,
        td: &TrustDomain,
        error: &str,
        now: OffsetDateTime,
    ) -> Result<PeerStatus, TrustStoreError> {
        let _lock = self.lock()?;
        self.peer(td)?;
        let mut status = self.status(td)?;
        status.last_attempt = Some(now);
        status.last_error = Some(error.to_owned());
        status.consecutive_failures += 1;
        status.failures_total += 1;
        Self::write_json(&self.domain_dir(td).join("status.json"), &status)?;
        Ok(status)
    }

    /// Prometheus/OpenMetrics lines for every federated domain (for the admin `/metrics`).
    pub fn render_metrics(&self) -> String {
        use std::fmt::Write as _;
        let Ok(views) = self.list() else {
            return String::new();
        };
        let mut out = String::new();
        let mut family = |name: &str, kind: &str, help: &str, f: &dyn Fn(&PeerView) -> String| {
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "# HELP {name} {help}");
            let sample = if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_owned()
            };
            for v in &views {
                let _ = writeln!(
                    out,
                    "{sample}{{trust_domain=\"{}\"}} {}",
                    v.config.trust_domain,
                    f(v)
                );
            }
        };
        let ts = |t: Option<OffsetDateTime>| t.map_or(0, |t| t.unix_timestamp()).to_string();
        family(
            "meshgate_federation_bundle_sequence",
            "gauge",
            "Sequence number of the federated bundle in force.",
            &|v| v.status.sequence.to_string(),
        );
        family(
            "meshgate_federation_bundle_authorities",
            "gauge",
            "X.509 authorities in the federated bundle in force.",
            &|v| v.status.authorities.to_string(),
        );
        family(
            "meshgate_federation_last_refresh_timestamp_seconds",
            "gauge",
            "Unix time of the last successful bundle fetch (0: never).",
            &|v| ts(v.status.last_refresh),
        );
        family(
            "meshgate_federation_refresh_ok",
            "gauge",
            "1 if the last bundle fetch succeeded, 0 if it failed (the last good bundle stays in force).",
            &|v| u8::from(v.status.last_error.is_none()).to_string(),
        );
        family(
            "meshgate_federation_refresh_failures",
            "counter",
            "Bundle fetches that failed or were refused (garbage, wrong trust domain, lower sequence, unreachable).",
            &|v| v.status.failures_total.to_string(),
        );
        family(
            "meshgate_federation_bundle_updates",
            "counter",
            "Times a new federated bundle was put in force.",
            &|v| v.status.updates_total.to_string(),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{Ca, InitOptions};
    use crate::clock::SystemClock;
    use std::sync::Arc;

    fn ca(dir: &Path, td: &str) -> Ca {
        Ca::init(
            dir,
            &InitOptions::new(TrustDomain::parse(td).expect("td")),
            Arc::new(SystemClock),
        )
        .expect("init")
    }

    #[test]
    fn keeps_the_last_good_bundle_and_orders_by_sequence() {
        let d = tempfile::tempdir().expect("tmp");
        let a = ca(&d.path().join("a"), "a.test");
        let other = ca(&d.path().join("x"), "a.test");
        let store = TrustStore::new(&d.path().join("b"));
        let td = TrustDomain::parse("a.test").expect("td");
        let now = OffsetDateTime::now_utc();
        let peer = PeerConfig {
            version: 1,
            trust_domain: td.clone(),
            endpoint: Some("https://127.0.0.1:1".into()),
            profile: Profile::HttpsWeb,
            endpoint_spiffe_id: None,
            web_ca_file: None,
            added_at: now,
        };
        store.add(&peer, None, now).expect("add");
        assert!(matches!(
            store.add(&peer, None, now),
            Err(TrustStoreError::Exists(_))
        ));
        let mut b = a.bundle().expect("bundle");
        b.sequence = 5;
        assert_eq!(
            store.store_bundle(&b, now, false).expect("store"),
            Stored::Updated
        );
        assert_eq!(
            store.store_bundle(&b, now, false).expect("again"),
            Stored::Unchanged
        );
        let mut lower = b.clone();
        lower.sequence = 4;
        assert!(matches!(
            store.store_bundle(&lower, now, false),
            Err(TrustStoreError::SequenceWentBack {
                have: 5,
                got: 4,
                ..
            })
        ));
        let mut swapped = other.bundle().expect("other");
        swapped.sequence = 5;
        assert!(matches!(
            store.store_bundle(&swapped, now, false),
            Err(TrustStoreError::ChangedWithoutSequence { .. })
        ));
        store.record_failure(&td, "boom", now).expect("fail");
        let v = store.view(&td).expect("view");
        assert_eq!(v.status.sequence, 5);
        assert_eq!(v.status.failures_total, 1);
        assert_eq!(v.status.last_error.as_deref(), Some("boom"));
        assert_eq!(
            fs::read_to_string(store.bundle_pem_path(&td)).expect("pem"),
            b.to_pem()
        );
        let m = store.render_metrics();
        assert!(
            m.contains("meshgate_federation_refresh_failures_total{trust_domain=\"a.test\"} 1"),
            "{m}"
        );
        assert!(m.contains("meshgate_federation_refresh_ok{trust_domain=\"a.test\"} 0"));
        store.remove(&td).expect("remove");
        assert!(store.domains().expect("list").is_empty());
        // Names that would leave the trust directory are refused, never resolved.
        for bad in ["..", "."] {
            let mut p = peer.clone();
            p.trust_domain = TrustDomain::parse(bad).expect("valid characters");
            assert!(store.add(&p, None, now).is_err(), "{bad}");
            assert!(matches!(
                store.remove(&p.trust_domain),
                Err(TrustStoreError::Unknown(_))
            ));
        }
        assert!(d.path().join("b").exists());
    }

    #[test]
    fn parse_refuses_other_domains_and_bad_keys() {
        let d = tempfile::tempdir().expect("tmp");
        let a = ca(&d.path().join("a"), "a.test");
        let json =
            serde_json::to_vec(&a.bundle().expect("b").to_spiffe_json().expect("j")).expect("json");
        let a_td = TrustDomain::parse("a.test").expect("td");
        let c_td = TrustDomain::parse("c.test").expect("td");
        let ok = TrustBundle::parse(&a_td, BundleFormat::Spiffe, &json).expect("parse");
        assert_eq!(ok.sequence, 1);
        assert!(matches!(
            TrustBundle::parse(&c_td, BundleFormat::Spiffe, &json),
            Err(BundleError::WrongTrustDomain { .. })
        ));
        for garbage in [&b"not json"[..], b"{}", b"{\"keys\": []}", b"[]"] {
            assert!(TrustBundle::parse(&a_td, BundleFormat::Spiffe, garbage).is_err());
        }
        let mut v: serde_json::Value = serde_json::from_slice(&json).expect("v");
        v["keys"][0]["x"] = serde_json::Value::String("AAAA".into());
        let bad = serde_json::to_vec(&v).expect("json");
        assert!(matches!(
            TrustBundle::parse(&a_td, BundleFormat::Spiffe, &bad),
            Err(BundleError::BadKey { .. })
        ));
        let pem = a.bundle().expect("b").to_pem();
        assert_eq!(TrustBundle::sniff(pem.as_bytes()), BundleFormat::Pem);
        TrustBundle::parse(&a_td, BundleFormat::Pem, pem.as_bytes()).expect("pem");
    }
}
