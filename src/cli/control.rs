//! The control plane inside `meshgate run` (`[control]`): the CA in the state directory, its
//! enrollment server, the SPIFFE Workload API socket, and a watcher that keeps the CRL fresh and tells the daemon when it
//! changed.
//!
//! Threads, never the shards: the enrollment server's own (see
//! `meshgate_control::enroll`) and one `meshgate-control` thread that once a second
//! republishes the CRL when it is past half its validity ([`Ca::republish_crl_if_due`]) and
//! compares `crl.pem` with what it saw last. A change (this thread's republish, or a
//! `meshgate cert revoke` in another process) is sent to the daemon's event loop, which
//! re-reads the TLS files of the running config when a listener uses that CRL.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use meshgate_config::{Config, ControlConfig};
use meshgate_control::Ca;
use meshgate_control::enroll::{EnrollmentConfig, EnrollmentHandle, EnrollmentServer};
use meshgate_control::workload::{self, WorkloadApiConfig, WorkloadApiHandle};

/// The running control plane.
pub struct ControlPlane {
    enrollment: Option<EnrollmentHandle>,
    workload_api: Option<WorkloadApiHandle>,
    watcher: Option<JoinHandle<()>>,
    /// Dropping it stops the watcher.
    stop: Option<Sender<()>>,
    crl_changed: Receiver<()>,
    crl_path: PathBuf,
}

impl ControlPlane {
    /// Open (or initialise) the CA in `state_dir` and start what `config` asks for.
    pub fn start(config: &ControlConfig, state_dir: &Path) -> Result<ControlPlane> {
        let td = config.trust_domain.as_ref().map(|t| t.as_str().to_owned());
        let ca = Arc::new(super::local_ca::open_or_init(state_dir, td.as_deref())?);
        let crl_path = state_dir.join("crl.pem");
        let enrollment = match &config.enrollment {
            None => None,
            Some(e) => {
                let mut cfg = EnrollmentConfig::new(e.address);
                for name in &e.dns_names {
                    match name.parse::<IpAddr>() {
                        Ok(ip) => cfg.ip_addresses.push(ip),
                        Err(_) => cfg.dns_names.push(name.clone()),
                    }
                }
                cfg.svid_ttl = e.svid_ttl;
                cfg.renewal_grace = e.renewal_grace;
                let handle = EnrollmentServer::start(ca.clone(), cfg)
                    .map_err(|err| anyhow::anyhow!("{err}"))
                    .with_context(|| {
                        format!(
                            "start the enrollment server (control.enrollment.address = \"{}\")",
                            e.address
                        )
                    })?;
                Some(handle)
            }
        };
        let workload_api = match &config.workload_api {
            None => None,
            Some(w) => Some(
                workload::start(
                    ca.clone(),
                    WorkloadApiConfig {
                        socket: w.socket.clone(),
                        svid_ttl: w.svid_ttl,
                    },
                )
                .map_err(|err| anyhow::anyhow!("{err}"))
                .context("start the Workload API (control.workload_api)")?,
            ),
        };
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let (changed_tx, changed_rx) = crossbeam_channel::bounded::<()>(1);
        let path = crl_path.clone();
        let watcher = std::thread::Builder::new()
            .name("meshgate-control".into())
            .spawn(move || watch_crl(&ca, &path, &stop_rx, &changed_tx))
            .context("start the control thread")?;
        Ok(ControlPlane {
            enrollment,
            workload_api,
            watcher: Some(watcher),
            stop: Some(stop_tx),
            crl_changed: changed_rx,
            crl_path,
        })
    }

    /// Fires when the CA's `crl.pem` changed.
    pub fn crl_changed(&self) -> &Receiver<()> {
        &self.crl_changed
    }

    pub fn enrollment_addr(&self) -> Option<SocketAddr> {
        self.enrollment.as_ref().map(EnrollmentHandle::local_addr)
    }

    /// Whether a listener of `config` checks client certificates against the CA's CRL.
    pub fn used_by(&self, config: &Config) -> bool {
        let ours = std::fs::canonicalize(&self.crl_path).unwrap_or(self.crl_path.clone());
        config
            .listeners
            .iter()
            .filter_map(|l| l.tls.as_ref())
            .flat_map(|t| t.trust_bundles.iter())
            .filter_map(|b| b.crl.as_ref())
            .any(|p| std::fs::canonicalize(p).is_ok_and(|p| p == ours))
    }

    /// Stop the enrollment server (connections in progress finish) and the watcher.
    pub fn stop(mut self) {
        if let Some(e) = self.enrollment.take() {
            e.stop();
        }
        if let Some(w) = self.workload_api.take() {
            w.stop();
        }
        self.stop.take();
        if let Some(w) = self.watcher.take() {
            let _ = w.join();
        }
    }
}

fn watch_crl(ca: &Ca, path: &Path, stop: &Receiver<()>, changed: &Sender<()>) {
    let mut seen = std::fs::read(path).ok();
    let mut failures: u64 = 0;
    loop {
        match stop.recv_timeout(Duration::from_secs(1)) {
            Err(RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        match ca.republish_crl_if_due() {
            Ok(Some(n)) => {
                failures = 0;
                tracing::info!(crl_number = n, "republished the CRL before its nextUpdate");
            }
            Ok(None) => failures = 0,
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(60) {
                    tracing::error!(error = %e, "cannot republish the CRL; verifiers refuse every client once it expires");
                }
            }
        }
        let now = std::fs::read(path).ok();
        if now.is_some() && now != seen {
            seen = now;
            // A full channel already holds a change the daemon has not handled yet.
            let _ = changed.try_send(());
        }
    }
}
