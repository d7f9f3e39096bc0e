//! The embedded default's own identity: with no certificates configured, the gateway keeps a
//! local CA in its state directory and issues its own serving certificate (as Caddy does for
//! local HTTPS), so the quickstart needs no setup.
//!
//! Files (all written atomically, keys 0600): the CA under `<state>/ca/` (see
//! docs/state-dir.md), the serving SVID `spiffe://meshgate.local/gateway` (DNS `localhost`) as
//! `<state>/gateway/svid.pem` + `svid_key.pem`. The SVID is reissued when missing, unreadable
//! or past half its lifetime; the daemon checks again at that point and reloads.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use meshgate_control::ca::{InitOptions, IssueRequest};
use meshgate_control::inspect::inspect_pem;
use meshgate_control::ledger::AuthorisedBy;
use meshgate_control::state::{ensure_state_dir, mode, write_atomic};
use meshgate_control::{Ca, SpiffeId, SystemClock, TrustDomain};

/// Trust domain of the local CA.
pub const TRUST_DOMAIN: &str = "meshgate.local";
const SVID_TTL: Duration = Duration::from_secs(24 * 3600);

/// Where the embedded default finds its identity.
#[derive(Debug, Clone)]
pub struct LocalIdentity {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA certificate clients should trust (`curl --cacert`).
    pub root: PathBuf,
    /// When the serving certificate should be renewed (half its lifetime).
    pub renew_at: std::time::SystemTime,
}

/// Open the CA in `state_dir`, or initialise one for `trust_domain` (default
/// [`TRUST_DOMAIN`]) if there is none. An existing CA of another trust domain than the one
/// asked for is an error.
pub fn open_or_init(state_dir: &Path, trust_domain: Option<&str>) -> Result<Ca> {
    ensure_state_dir(state_dir)
        .with_context(|| format!("state directory {}", state_dir.display()))?;
    let ca = match Ca::open(state_dir) {
        Ok(ca) => ca,
        Err(_) if !state_dir.join("ca").join("config.json").exists() => {
            let name = trust_domain.unwrap_or(TRUST_DOMAIN);
            let td = TrustDomain::parse(name).map_err(|e| anyhow::anyhow!("{e}"))?;
            match Ca::init(state_dir, &InitOptions::new(td), Arc::new(SystemClock)) {
                Ok(ca) => {
                    tracing::info!(state_dir = %state_dir.display(), trust_domain = name, "initialised the local CA");
                    ca
                }
                // Another process initialised it meanwhile: use theirs.
                Err(init_err) => Ca::open(state_dir).map_err(|_| {
                    anyhow::anyhow!("{init_err}").context(format!(
                        "initialise the local CA in {}",
                        state_dir.display()
                    ))
                })?,
            }
        }
        Err(e) => return Err(anyhow::anyhow!("{e}")).context("open the local CA"),
    };
    if let Some(want) = trust_domain
        && ca.trust_domain().as_str() != want
    {
        anyhow::bail!(
            "the CA in {} is for trust domain {}, not {want} (control.trust_domain): set \
             control.trust_domain = \"{}\", or use another --state-dir",
            state_dir.display(),
            ca.trust_domain().as_str(),
            ca.trust_domain().as_str()
        );
    }
    Ok(ca)
}

/// Make sure the local CA and a fresh-enough serving SVID exist in `state_dir` (a new CA is
/// for `trust_domain`, default [`TRUST_DOMAIN`]).
pub fn ensure(state_dir: &Path, trust_domain: Option<&str>) -> Result<LocalIdentity> {
    let ca = open_or_init(state_dir, trust_domain)?;
    let dir = state_dir.join("gateway");
    ensure_state_dir(&dir)?;
    let cert = dir.join("svid.pem");
    let key = dir.join("svid_key.pem");
    let root = state_dir.join("ca").join("root.pem");
    let now = time::OffsetDateTime::now_utc();
    let current = std::fs::read(&cert)
        .ok()
        .and_then(|pem| inspect_pem(&pem).ok())
        .and_then(|certs| certs.into_iter().next())
        .filter(|c| key.exists() && c.lifetime_fraction_elapsed(now) < 0.5);
    let renew_at = match current {
        Some(c) => half_life(c.not_before, c.not_after),
        None => {
            // The CA's own trust domain: `meshgate.local` when meshgate created it, the
            // operator's when they ran `meshgate ca init` in this state directory.
            let id = SpiffeId::parse(&format!("spiffe://{}/gateway", ca.trust_domain().as_str()))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let issued = ca
                .issue(&IssueRequest {
                    spiffe_id: id,
                    dns_names: vec!["localhost".into()],
                    // A CA made with a shorter --max-ttl caps it.
                    ttl: Some(SVID_TTL.min(ca.max_ttl())),
                    authorised_by: AuthorisedBy::Operator("meshgate:local-identity".into()),
                })
                .context("issue the gateway's serving certificate")?;
            // Key first, then the certificate: a reader that sees the new certificate also
            // finds its key.
            write_atomic(&key, issued.key_pem.expose().as_bytes(), mode::SECRET)?;
            write_atomic(&cert, issued.chain_pem.as_bytes(), mode::PUBLIC)?;
            tracing::info!(cert = %cert.display(), not_after = %issued.entry.not_after, "issued the gateway's serving certificate from the local CA");
            half_life(issued.entry.not_before, issued.entry.not_after)
        }
    };
    Ok(LocalIdentity {
        cert,
        key,
        root,
        renew_at,
    })
}

fn half_life(a: time::OffsetDateTime, b: time::OffsetDateTime) -> std::time::SystemTime {
    let mid: time::OffsetDateTime = a + (b - a) / 2;
    std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(mid.unix_timestamp().max(0) as u64)
}
