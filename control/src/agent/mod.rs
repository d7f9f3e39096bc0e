//! The agent: a VM or bare-metal host's side of enrollment (`meshgate agent`).
//!
//! It generates its P-256 key locally (the key never leaves the host), enrolls once with a join
//! token, writes `svid.pem`, `svid_key.pem` and `bundle.pem` as one set ([`files`]), then renews
//! over mTLS with its current SVID at half-life ([`schedule`]), with exponential backoff while
//! the CA is unreachable. The files keep the last identity meanwhile. After a restart it resumes
//! from its files, no token needed. After each rotation it runs a command and/or signals a
//! process, as spiffe-helper does, so the workload reloads.
//!
//! Trust: the first enrollment verifies the server against `--ca-bundle` (fail closed: no
//! bundle, no enrollment) and requires it to present `spiffe://<td>/meshgate/enrollment`. Later
//! calls also trust the bundle the server returned with the SVID.
//!
//! When the CA refuses for good (token used or revoked, SVID revoked or expired past the
//! server's grace) and there is nothing else to try, [`Agent::run`] returns
//! [`AgentExit::Refused`] (the CLI exits 77) with the server's reason.

pub mod client;
pub mod files;
pub mod schedule;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rcgen::string::Ia5String;
use rcgen::{CertificateParams, KeyPair, SanType};
use ring::rand::SecureRandom;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::ca::SecretPem;
use crate::clock::{Clock, rfc3339};
use crate::enroll::SERVER_ID_PATH;
use crate::enroll::api::{EnrollRequest, RenewRequest, SvidResponse};
use crate::spiffe::SpiffeId;

use client::{CallError, Client, ServerUrl};
use files::{Identity, OutDir};
use schedule::{Action, Validity, next_action};

/// A signal to send after each rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignalTarget {
    pub pid: i32,
    pub signal: i32,
}

impl std::str::FromStr for SignalTarget {
    type Err = String;

    /// `PID:SIG`, SIG a name (`HUP`, `SIGHUP`, `USR1`...) or a number.
    fn from_str(s: &str) -> Result<Self, String> {
        let (pid, sig) = s
            .split_once(':')
            .ok_or_else(|| format!("{s:?}: expected PID:SIGNAL, e.g. 1234:HUP"))?;
        let pid: i32 = pid
            .parse()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("{s:?}: bad PID {pid:?}"))?;
        let name = sig.trim().to_ascii_uppercase();
        let name = name.strip_prefix("SIG").unwrap_or(&name);
        let signal = match name {
            "HUP" => libc::SIGHUP,
            "INT" => libc::SIGINT,
            "QUIT" => libc::SIGQUIT,
            "TERM" => libc::SIGTERM,
            "USR1" => libc::SIGUSR1,
            "USR2" => libc::SIGUSR2,
            "KILL" => libc::SIGKILL,
            n => n
                .parse::<i32>()
                .ok()
                .filter(|n| (1..=64).contains(n))
                .ok_or_else(|| format!("{s:?}: unknown signal {sig:?}"))?,
        };
        Ok(SignalTarget { pid, signal })
    }
}

/// Settings of the agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub server: ServerUrl,
    pub spiffe_id: SpiffeId,
    pub out: PathBuf,
    /// The join token (read at each enrollment attempt, so an operator can drop a new one in).
    pub token_file: Option<PathBuf>,
    /// Trust anchors for the first enrollment.
    pub ca_bundle: Option<PathBuf>,
    /// The server's SPIFFE ID [default: `spiffe://<td>/meshgate/enrollment`].
    pub server_id: Option<SpiffeId>,
    /// `sh -c` command run after each rotation.
    pub on_rotate: Option<String>,
    pub signal: Option<SignalTarget>,
    /// Stop after the first successful enrollment or renewal (or if the files are current).
    pub once: bool,
    /// Per request.
    pub timeout: Duration,
}

/// How [`Agent::run`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentExit {
    /// Asked to stop.
    Stopped,
    /// `--once`: one identity is in place.
    Done,
    /// The CA refused and nothing else can be tried; the message says what the operator must do.
    Refused(String),
    /// Setup or local failure (bad bundle file, unwritable output directory...).
    Failed(String),
}

/// The agent.
#[derive(Debug)]
pub struct Agent {
    cfg: AgentConfig,
    out: OutDir,
    server_id: SpiffeId,
    clock: Arc<dyn Clock>,
    stop: Arc<AtomicBool>,
}

/// How one attempt failed.
enum Failure {
    Call(CallError),
    /// Nothing to try (no token to enroll with).
    Refused(String),
    Local(String),
}

fn jitter() -> f64 {
    let mut b = [0u8; 4];
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        return 0.0;
    }
    f64::from(u32::from_le_bytes(b)) / f64::from(u32::MAX) * 2.0 - 1.0
}

/// The chain must lead to one of the bundle's roots at `now`, for client and server use:
/// never install a set that cannot work.
fn verify_chain(chain_pem: &str, bundle_pem: &str, now: OffsetDateTime) -> Result<(), String> {
    let chain = client::pem_certs(chain_pem)?;
    let roots = client::pem_certs(bundle_pem).map_err(|e| format!("bundle: {e}"))?;
    let anchors = roots
        .iter()
        .map(|r| {
            webpki::anchor_from_trusted_cert(r)
                .map(|a| a.to_owned())
                .map_err(|e| format!("bundle: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let leaf = webpki::EndEntityCert::try_from(&chain[0]).map_err(|e| e.to_string())?;
    let at = rustls::pki_types::UnixTime::since_unix_epoch(Duration::from_secs(
        u64::try_from(now.unix_timestamp()).unwrap_or(0),
    ));
    let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms;
    for usage in [
        webpki::KeyUsage::client_auth(),
        webpki::KeyUsage::server_auth(),
    ] {
        leaf.verify_for_usage(algs.all, &anchors, &chain[1..], at, usage, None, None)
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn parse_time(s: &str) -> Result<OffsetDateTime, String> {
    OffsetDateTime::parse(s, &Rfc3339).map_err(|e| format!("bad timestamp {s:?}: {e}"))
}

impl Agent {
    pub fn new(cfg: AgentConfig, clock: Arc<dyn Clock>, stop: Arc<AtomicBool>) -> Agent {
        let server_id = cfg.server_id.clone().unwrap_or_else(|| {
            SpiffeId::parse(&format!(
                "{}{SERVER_ID_PATH}",
                cfg.spiffe_id.trust_domain().id_string()
            ))
            .unwrap_or_else(|_| cfg.spiffe_id.clone())
        });
        Agent {
            out: OutDir::new(&cfg.out),
            cfg,
            server_id,
            clock,
            stop,
        }
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Sleep until `at` (by the agent's clock), waking early when asked to stop. Returns false
    /// when stopping.
    fn sleep_until(&self, at: OffsetDateTime) -> bool {
        loop {
            if self.stopped() {
                return false;
            }
            let left = at - self.clock.now();
            if left <= time::Duration::ZERO {
                return true;
            }
            let nap = Duration::try_from(left)
                .unwrap_or(Duration::ZERO)
                .min(Duration::from_millis(200));
            std::thread::sleep(nap.max(Duration::from_millis(10)));
        }
    }

    /// The identity in the output directory, if it is usable for `--spiffe-id`.
    pub fn load_identity(&self) -> Option<Identity> {
        match self.out.load() {
            Ok(Some(id)) if id.spiffe_id == self.cfg.spiffe_id => Some(id),
            Ok(Some(id)) => {
                tracing::warn!(
                    found = %id.spiffe_id,
                    wanted = %self.cfg.spiffe_id,
                    dir = %self.cfg.out.display(),
                    "the output directory holds another identity; enrolling for the requested one"
                );
                None
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %e, "cannot resume from the output directory");
                None
            }
        }
    }

    /// Trust anchors for the server: `--ca-bundle` and the bundle that came with the last SVID.
    fn roots(&self, identity: Option<&Identity>) -> Result<Vec<String>, Failure> {
        let mut roots = Vec::new();
        if let Some(p) = &self.cfg.ca_bundle {
            let pem = std::fs::read_to_string(p)
                .map_err(|e| Failure::Local(format!("--ca-bundle {}: {e}", p.display())))?;
            roots.push(pem);
        }
        if let Some(id) = identity {
            roots.push(id.bundle_pem.clone());
        }
        if roots.is_empty() {
            return Err(Failure::Local(
                "no trust bundle to verify the enrollment server: pass --ca-bundle FILE (from `meshgate bundle export --format pem` on the CA)"
                    .into(),
            ));
        }
        Ok(roots)
    }

    fn client(&self, identity: Option<&Identity>, present: bool) -> Result<Client, Failure> {
        let roots = self.roots(identity)?;
        let refs: Vec<&str> = roots.iter().map(String::as_str).collect();
        let auth = match identity {
            Some(id) if present => Some((id.chain_pem.as_str(), id.key_pem.expose())),
            _ => None,
        };
        Client::new(
            self.cfg.server.clone(),
            self.server_id.clone(),
            &refs,
            auth,
            self.cfg.timeout,
        )
        .map_err(Failure::Local)
    }

    /// A new P-256 key and a CSR naming our SPIFFE ID.
    fn key_and_csr(&self) -> Result<(KeyPair, String), Failure> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| Failure::Local(format!("cannot generate a key: {e}")))?;
        let mut params = CertificateParams::default();
        let uri = Ia5String::try_from(self.cfg.spiffe_id.to_string())
            .map_err(|e| Failure::Local(e.to_string()))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        let csr = params
            .serialize_request(&key)
            .and_then(|c| c.pem())
            .map_err(|e| Failure::Local(format!("cannot build the CSR: {e}")))?;
        Ok((key, csr))
    }

    /// Check a response against our key and identity and turn it into an [`Identity`].
    fn accept(&self, key: &KeyPair, body: &[u8]) -> Result<Identity, Failure> {
        let proto = |m: String| Failure::Call(CallError::Protocol(m));
        let r: SvidResponse = serde_json::from_slice(body)
            .map_err(|e| proto(format!("not an SVID response: {e}")))?;
        let key_pem = SecretPem::new(key.serialize_pem());
        let (id, serial, not_after) =
            files::check_pair(&r.svid_pem, key_pem.expose()).map_err(proto)?;
        if id != self.cfg.spiffe_id {
            return Err(proto(format!(
                "the server issued {id}, not {}",
                self.cfg.spiffe_id
            )));
        }
        verify_chain(&r.svid_pem, &r.bundle_pem, self.clock.now())
            .map_err(|e| proto(format!("the SVID does not verify against the bundle: {e}")))?;
        let issued_at = parse_time(&r.issued_at).map_err(proto)?;
        Ok(Identity {
            spiffe_id: id,
            chain_pem: r.svid_pem,
            key_pem,
            bundle_pem: r.bundle_pem,
            serial,
            not_after,
            issued_at,
        })
    }

    fn enroll(&self, last: Option<&Identity>) -> Result<Identity, Failure> {
        let path = self.cfg.token_file.as_ref().ok_or_else(|| {
            Failure::Refused(
                "no usable identity and no --token-file to enroll with: create a join token with `meshgate token create` and pass it with --token-file".into(),
            )
        })?;
        let token = std::fs::read_to_string(path)
            .map_err(|e| Failure::Local(format!("--token-file {}: {e}", path.display())))?
            .trim()
            .to_owned();
        let client = self.client(last, false)?;
        let (key, csr_pem) = self.key_and_csr()?;
        let body = serde_json::to_vec(&EnrollRequest {
            token,
            spiffe_id: self.cfg.spiffe_id.to_string(),
            csr_pem,
        })
        .map_err(|e| Failure::Local(e.to_string()))?;
        let resp = client.post("/v1/enroll", &body).map_err(Failure::Call)?;
        self.accept(&key, &resp)
    }

    fn renew(&self, current: &Identity) -> Result<Identity, Failure> {
        let client = self.client(Some(current), true)?;
        let (key, csr_pem) = self.key_and_csr()?;
        let body = serde_json::to_vec(&RenewRequest { csr_pem })
            .map_err(|e| Failure::Local(e.to_string()))?;
        let resp = client.post("/v1/renew", &body).map_err(Failure::Call)?;
        self.accept(&key, &resp)
    }

    /// Install a new identity and tell the workload.
    fn rotate(&self, new: &Identity, how: &str) -> Result<(), Failure> {
        let dir = self
            .out
            .install(new)
            .map_err(|e| Failure::Local(format!("cannot write the identity: {e}")))?;
        tracing::info!(
            spiffe_id = %new.spiffe_id,
            serial = %new.serial,
            not_after = %rfc3339(new.not_after),
            dir = %dir.display(),
            "{how}"
        );
        self.hooks(new, &dir);
        Ok(())
    }

    fn hooks(&self, id: &Identity, dir: &std::path::Path) {
        if let Some(cmd) = &self.cfg.on_rotate {
            let root = self.out.root();
            let spawned = Command::new("/bin/sh")
                .arg("-c")
                .arg(cmd)
                .env("MESHGATE_SVID", root.join(files::SVID))
                .env("MESHGATE_SVID_KEY", root.join(files::KEY))
                .env("MESHGATE_BUNDLE", root.join(files::BUNDLE))
                .env("MESHGATE_SVID_DIR", dir)
                .env("MESHGATE_SPIFFE_ID", id.spiffe_id.to_string())
                .env("MESHGATE_SERIAL", &id.serial)
                .stdin(std::process::Stdio::null())
                .spawn();
            match spawned {
                Ok(mut child) => {
                    // Reap it off the agent's thread: a slow hook must not delay renewals.
                    let cmd = cmd.clone();
                    let _ = std::thread::Builder::new()
                        .name("agent-on-rotate".into())
                        .spawn(move || match child.wait() {
                            Ok(s) if s.success() => {
                                tracing::debug!(command = %cmd, "on-rotate command succeeded");
                            }
                            Ok(s) => tracing::warn!(command = %cmd, status = %s, "on-rotate command failed"),
                            Err(e) => tracing::warn!(command = %cmd, error = %e, "on-rotate command lost"),
                        });
                }
                Err(e) => {
                    tracing::warn!(command = %cmd, error = %e, "cannot run the on-rotate command")
                }
            }
        }
        if let Some(t) = self.cfg.signal {
            // SAFETY: kill(2) takes plain integers and has no memory effects in this process.
            let rc = unsafe { libc::kill(t.pid, t.signal) };
            if rc != 0 {
                tracing::warn!(
                    pid = t.pid,
                    signal = t.signal,
                    error = %std::io::Error::last_os_error(),
                    "cannot signal the workload after rotation"
                );
            }
        }
    }

    /// Run until stopped, `--once` is satisfied, or the CA refuses for good.
    pub fn run(&self) -> AgentExit {
        let mut identity = self.load_identity();
        // The last identity installed, even when it can no longer renew: its bundle still
        // says whom to trust.
        let mut trusted = identity.clone();
        if let Some(id) = &identity {
            let expired = self.clock.now() >= id.not_after;
            tracing::info!(
                spiffe_id = %id.spiffe_id,
                serial = %id.serial,
                not_after = %rfc3339(id.not_after),
                expired,
                dir = %self.cfg.out.display(),
                "resuming from the identity on disk"
            );
        }
        let mut failures: u32 = 0;
        let mut not_before: Option<OffsetDateTime> = None;
        // Why the last SVID could not renew, when enrolling again because of it.
        let mut renewal_refused: Option<String> = None;
        loop {
            if self.stopped() {
                return AgentExit::Stopped;
            }
            let now = self.clock.now();
            let validity = identity.as_ref().map(|i| Validity {
                issued_at: i.issued_at,
                not_after: i.not_after,
            });
            if self.cfg.once
                && failures == 0
                && let Some(v) = validity
                && now < schedule::renewal_due(v, 0.0)
            {
                return AgentExit::Done;
            }
            let mut action = next_action(now, validity, failures, jitter());
            if let Some(nb) = not_before.take()
                && nb > action.at()
            {
                action = match action {
                    Action::Enroll { .. } => Action::Enroll { at: nb },
                    Action::Renew { .. } => Action::Renew { at: nb },
                };
            }
            tracing::debug!(?action, failures, "next");
            if !self.sleep_until(action.at()) {
                return AgentExit::Stopped;
            }
            let (result, what) = match (&action, &identity) {
                (Action::Renew { .. }, Some(cur)) => (self.renew(cur), "renewed"),
                _ => (self.enroll(trusted.as_ref()), "enrolled"),
            };
            let err = match result.and_then(|new| self.rotate(&new, what).map(|()| new)) {
                Ok(new) => {
                    trusted = Some(new.clone());
                    identity = Some(new);
                    failures = 0;
                    renewal_refused = None;
                    if self.cfg.once {
                        return AgentExit::Done;
                    }
                    continue;
                }
                Err(e) => e,
            };
            match err {
                Failure::Refused(m) => return AgentExit::Refused(m),
                Failure::Local(m) => {
                    if identity.is_none() {
                        return AgentExit::Failed(m);
                    }
                    failures = failures.saturating_add(1);
                    tracing::error!(error = %m, "renewal failed locally; retrying");
                }
                Failure::Call(e) if e.is_permanent() => match (&action, &identity) {
                    (Action::Renew { .. }, Some(cur)) if self.cfg.token_file.is_some() => {
                        tracing::warn!(
                            error = %e,
                            serial = %cur.serial,
                            "the CA will not renew this SVID; enrolling again with the join token"
                        );
                        // Keep the files; enroll next (a refusal of the token ends the run).
                        renewal_refused = Some(e.to_string());
                        identity = None;
                        failures = 0;
                    }
                    (Action::Renew { .. }, _) => {
                        return AgentExit::Refused(format!(
                            "{e}; enroll again: create a join token (`meshgate token create`) and pass it with --token-file"
                        ));
                    }
                    _ => {
                        return AgentExit::Refused(match &renewal_refused {
                            Some(r) => format!(
                                "the SVID could not be renewed ({r}) and enrollment was refused: {e}; create a new join token (`meshgate token create`) and put it in --token-file"
                            ),
                            None => e.to_string(),
                        });
                    }
                },
                Failure::Call(e @ CallError::Untrusted(_)) if identity.is_none() => {
                    return AgentExit::Failed(format!(
                        "{e}; check --server and --ca-bundle (the bundle of the CA that runs the enrollment server)"
                    ));
                }
                Failure::Call(e) => {
                    failures = failures.saturating_add(1);
                    not_before = e.retry_after().map(|d| self.clock.now() + d);
                    let retry_in = schedule::backoff(failures, 0.0);
                    match &identity {
                        Some(cur) => tracing::warn!(
                            error = %e,
                            failures,
                            retry_in = ?retry_in,
                            keeping = %cur.serial,
                            valid_until = %rfc3339(cur.not_after),
                            "renewal failed; keeping the current identity"
                        ),
                        None => tracing::warn!(
                            error = %e,
                            failures,
                            retry_in = ?retry_in,
                            "enrollment failed; retrying"
                        ),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installs_only_chains_that_verify_against_the_bundle() {
        use crate::ca::{Ca, InitOptions, IssueRequest};
        use crate::clock::SystemClock;
        use crate::ledger::AuthorisedBy;
        use crate::spiffe::TrustDomain;
        let mk = || {
            let d = tempfile::tempdir().expect("tempdir");
            let opts = InitOptions::new(TrustDomain::parse("example.org").expect("td"));
            let ca = Ca::init(&d.path().join("s"), &opts, Arc::new(SystemClock)).expect("init");
            (d, ca)
        };
        let ((_d1, a), (_d2, b)) = (mk(), mk());
        let svid = a
            .issue(&IssueRequest {
                spiffe_id: SpiffeId::parse("spiffe://example.org/vm").expect("id"),
                dns_names: vec![],
                ttl: None,
                authorised_by: AuthorisedBy::Operator("test".into()),
            })
            .expect("issue");
        let now = SystemClock.now();
        let a_pem = a.bundle().expect("bundle").to_pem();
        let b_pem = b.bundle().expect("bundle").to_pem();
        verify_chain(&svid.chain_pem, &a_pem, now).expect("own CA");
        assert!(
            verify_chain(&svid.chain_pem, &b_pem, now).is_err(),
            "other CA"
        );
        assert!(
            verify_chain(&svid.chain_pem, &a_pem, now + time::Duration::days(1)).is_err(),
            "expired"
        );
    }

    #[test]
    fn parses_signal_targets() {
        let t: SignalTarget = "1234:HUP".parse().expect("hup");
        assert_eq!(
            t,
            SignalTarget {
                pid: 1234,
                signal: libc::SIGHUP
            }
        );
        let t: SignalTarget = "7:sigusr1".parse().expect("usr1");
        assert_eq!(t.signal, libc::SIGUSR1);
        let t: SignalTarget = "7:15".parse().expect("number");
        assert_eq!(t.signal, 15);
        for bad in ["1234", "0:HUP", "-1:HUP", "x:HUP", "1:NOPE", "1:99"] {
            assert!(bad.parse::<SignalTarget>().is_err(), "{bad}");
        }
    }
}
