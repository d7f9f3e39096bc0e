//! The control thread's work after start-up: apply config changes (reload, rollback) and keep
//! the config history. Called from `run`'s event loop for SIGHUP and for the admin API's
//! `POST /reload` and `POST /config/rollback`, and for changed TLS files (see [`super::watch`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use meshgate_config::Config;
use meshgate_control::history::History;
use meshgate_control::state::write_atomic;
use meshgate_dataplane::Gateway;
use meshgate_dataplane::admin::{ControlAction, ReloadFailure, ReloadReply};

use super::watch::{FileWatch, Snapshot, tls_files};

pub struct Daemon {
    pub gateway: Gateway,
    pub source: ConfigSource,
    /// Where the local CA (and config history) live.
    pub state_dir: PathBuf,
    pub history: Option<History>,
    /// The config in force (to summarise what a change does).
    current: Arc<Config>,
    /// The text it was loaded from (a reload for changed files with the same text is not a
    /// new history entry).
    current_text: String,
    /// The TLS files of the config in force, when `runtime.watch_files` is on.
    watch: Option<FileWatch>,
    /// When the embedded default's serving certificate is due for renewal.
    renew_at: Option<std::time::SystemTime>,
}

/// Where the config comes from.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    File(PathBuf),
    /// The embedded default (`meshgate config default`).
    Embedded,
}

/// A config read and validated, with the exact text it came from.
#[derive(Debug)]
pub struct Loaded {
    pub text: String,
    pub source: String,
    pub config: Config,
    pub renew_at: Option<std::time::SystemTime>,
}

#[derive(Debug)]
pub enum LoadFailure {
    Invalid(meshgate_config::LoadError),
    Other(anyhow::Error),
}

impl ConfigSource {
    /// Read and validate (the same loader as `meshgate config validate`), then give every
    /// `tls` listener without certificates the gateway's own identity from the local CA in
    /// `state_dir`.
    pub fn load(&self, state_dir: &Path) -> Result<Loaded, LoadFailure> {
        let (text, source, mut config) = match self {
            ConfigSource::File(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    LoadFailure::Other(anyhow::anyhow!(
                        "cannot read the config file {}: {e}",
                        path.display()
                    ))
                })?;
                let config =
                    meshgate_config::parse_file_text(&text, path).map_err(LoadFailure::Invalid)?;
                (text, path.display().to_string(), config)
            }
            ConfigSource::Embedded => {
                let text = meshgate_config::EMBEDDED_DEFAULT.to_string();
                let config =
                    meshgate_config::parse(&text, meshgate_config::EMBEDDED_DEFAULT_ORIGIN)
                        .map_err(LoadFailure::Invalid)?;
                (text, "embedded default".to_string(), config)
            }
        };
        let renew_at = fill_local_identity(&mut config, state_dir).map_err(LoadFailure::Other)?;
        fill_federated(&mut config, state_dir, &source).map_err(LoadFailure::Other)?;
        Ok(Loaded {
            text,
            source,
            config,
            renew_at,
        })
    }
}

/// Point every `federated = true` trust bundle at the state directory's trust store.
fn fill_federated(config: &mut Config, state_dir: &Path, source: &str) -> anyhow::Result<()> {
    let store = meshgate_control::federation::store::TrustStore::new(state_dir);
    for (i, l) in config.listeners.iter_mut().enumerate() {
        let Some(tls) = l.tls.as_mut() else { continue };
        for (j, b) in tls.trust_bundles.iter_mut().enumerate() {
            if !b.federated {
                continue;
            }
            let td =
                meshgate_control::TrustDomain::parse(b.trust_domain.as_str()).map_err(|e| {
                    anyhow::anyhow!("{source}: listeners[{i}].tls.trust_bundles[{j}]: {e}")
                })?;
            let path = store.bundle_pem_path(&td);
            if !path.is_file() {
                anyhow::bail!(
                    "{source}: listeners[{i}].tls.trust_bundles[{j}]: trust domain {td} is federated, but the trust store has no bundle for it ({} is missing); run `meshgate trust add --state-dir {} --trust-domain {td} --endpoint URL --profile ...` (or `meshgate bundle import`) first",
                    path.display(),
                    state_dir.display()
                );
            }
            b.bundle = path;
        }
    }
    Ok(())
}

/// Whether the config reads the trust store: a `federated = true` trust bundle, or a
/// cluster's `trust_bundle` inside `<state-dir>/trust/`. A changed federated bundle reloads
/// only such a config.
pub fn uses_trust_store(config: &Config, state_dir: &Path) -> bool {
    let trust_dir = meshgate_control::federation::store::TrustStore::new(state_dir)
        .dir()
        .to_path_buf();
    config
        .listeners
        .iter()
        .filter_map(|l| l.tls.as_ref())
        .any(|t| t.trust_bundles.iter().any(|b| b.federated))
        || config
            .clusters
            .iter()
            .filter_map(|c| c.tls.as_ref())
            .any(|t| t.trust_bundle.starts_with(&trust_dir))
}

/// Serve the local CA's identity on every `tls` listener that names no certificate.
fn fill_local_identity(
    config: &mut Config,
    state_dir: &Path,
) -> anyhow::Result<Option<std::time::SystemTime>> {
    let wants = config
        .listeners
        .iter()
        .any(|l| l.tls.as_ref().is_some_and(|t| t.certificates.is_empty()));
    if !wants {
        return Ok(None);
    }
    let trust_domain = config
        .control
        .as_ref()
        .and_then(|c| c.trust_domain.as_ref())
        .map(|t| t.as_str().to_owned());
    let id = super::local_ca::ensure(state_dir, trust_domain.as_deref())?;
    tracing::info!(
        ca = %id.root.display(),
        "tls listeners without certificates serve the gateway's identity from the local CA; clients trust it with e.g. `curl --cacert {}`",
        id.root.display()
    );
    for l in &mut config.listeners {
        if let Some(tls) = l.tls.as_mut()
            && tls.certificates.is_empty()
        {
            tls.certificates.push(meshgate_config::ServerCertificate {
                cert: id.cert.clone(),
                key: id.key.clone(),
                sni: Vec::new(),
                default: true,
            });
        }
    }
    Ok(Some(id.renew_at))
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Daemon {
    /// `first` is what generation 1 was built from (recorded in the history).
    pub fn new(
        gateway: Gateway,
        source_kind: ConfigSource,
        state_dir: PathBuf,
        history: Option<History>,
        first: &Loaded,
    ) -> Daemon {
        let mut d = Daemon {
            gateway,
            source: source_kind,
            state_dir,
            history,
            current: Arc::new(first.config.clone()),
            current_text: first.text.clone(),
            watch: None,
            renew_at: first.renew_at,
        };
        d.sync_watch(Snapshot::default());
        d.record(&first.text, &first.source, 1, "started");
        d
    }

    /// After a load (or a refused one): watch the files of the config in force, taking
    /// `before` (their state just before the load) as what is loaded.
    fn sync_watch(&mut self, before: Snapshot) {
        if !self.current.runtime.watch_files {
            self.watch = None;
            return;
        }
        let paths = tls_files(&self.current);
        match &mut self.watch {
            Some(w) => w.rebase(&before, paths),
            None => {
                let base = Snapshot::take(&paths);
                tracing::debug!(files = paths.len(), "watching TLS files for changes");
                self.watch = Some(FileWatch::new(paths, base));
            }
        }
    }

    /// Fires when the watched files are due for a check (never without `watch_files`).
    pub fn watch_timer(&self) -> crossbeam_channel::Receiver<std::time::Instant> {
        match &self.watch {
            Some(w) => w.timer(),
            None => crossbeam_channel::never(),
        }
    }

    /// Check the watched files; reload when some changed (the same path as SIGHUP). A refused
    /// reload is logged with the file at fault and the old material stays in force.
    pub fn poll_files(&mut self) {
        let Some(changed) = self.watch.as_mut().and_then(FileWatch::poll) else {
            return;
        };
        let names: Vec<String> = changed.iter().map(|p| p.display().to_string()).collect();
        tracing::info!(files = ?names, "TLS files changed: reloading");
        let stats = self.gateway.stats().clone();
        match self.handle_for(ControlAction::Reload, Some(&names)) {
            Ok(_) => {
                stats
                    .watch_reloads_ok
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Err(f) => {
                stats
                    .watch_reloads_failed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::error!(files = ?names, reason = %f.reason, "changed TLS files refused; the certificates, keys and bundles in force stay");
            }
        }
    }

    fn record(&self, text: &str, source: &str, generation: u64, summary: &str) -> Option<u64> {
        let h = self.history.as_ref()?;
        match h.record(text, source, generation, summary, now_unix()) {
            Ok(e) => Some(e.id),
            Err(e) => {
                tracing::warn!(error = %e, "cannot record the config history");
                None
            }
        }
    }

    pub fn handle(&mut self, action: ControlAction) -> ReloadReply {
        self.handle_for(action, None)
    }

    /// `files`: the changed files that triggered it (a file-watch reload).
    fn handle_for(&mut self, action: ControlAction, files: Option<&[String]>) -> ReloadReply {
        let before = self
            .watch
            .as_ref()
            .map(FileWatch::snapshot)
            .unwrap_or_default();
        let reply = match action {
            ControlAction::Reload => self.reload_file(files),
            ControlAction::Rollback { to } => self.rollback(to),
            ControlAction::Drain => {
                tracing::info!(
                    "draining (POST /drain): listeners closed, /ready answers 503, open connections continue; SIGTERM to stop"
                );
                self.gateway.drain_listeners();
                let current = self.gateway.shared().current();
                Ok(meshgate_dataplane::gateway::ReloadOutcome {
                    generation: current.id,
                    listeners_added: Vec::new(),
                    listeners_removed: Vec::new(),
                    needs_restart: Vec::new(),
                    history_id: None,
                    summary: "draining".into(),
                })
            }
        };
        self.sync_watch(before);
        if let Err(f) = &reply {
            tracing::error!(reason = %f.reason, "config change refused; the running config stays in force");
            for err in &f.errors {
                tracing::error!(path = %err.path, error = %err.message, hint = err.hint.as_deref().unwrap_or(""), "invalid config");
            }
        }
        reply
    }

    fn path(&self) -> Result<&Path, ReloadFailure> {
        match &self.source {
            ConfigSource::File(p) => Ok(p),
            ConfigSource::Embedded => Err(ReloadFailure::other(
                "running on the embedded default config; there is no file to roll back (start with --config FILE)",
            )),
        }
    }

    /// A channel that fires when the embedded default's certificate needs renewing (never for
    /// a config file).
    pub fn renewal_timer(&self) -> crossbeam_channel::Receiver<std::time::Instant> {
        match self.renew_at {
            None => crossbeam_channel::never(),
            Some(at) => {
                let wait = at.duration_since(SystemTime::now()).unwrap_or_default();
                crossbeam_channel::after(wait.max(std::time::Duration::from_secs(1)))
            }
        }
    }

    /// Re-read the config (file, or the embedded default with a renewed identity) and apply
    /// it. The same loader as start-up and `config validate`.
    fn reload_file(&mut self, files: Option<&[String]>) -> ReloadReply {
        let loaded = match self.source.load(&self.state_dir) {
            Ok(l) => l,
            Err(LoadFailure::Invalid(e)) => {
                self.gateway
                    .stats()
                    .reloads_failed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Err(ReloadFailure::invalid(&e));
            }
            Err(LoadFailure::Other(e)) => return Err(ReloadFailure::other(format!("{e:#}"))),
        };
        self.renew_at = loaded.renew_at;
        self.apply(&loaded.text, loaded.config, &loaded.source, files)
    }

    /// Put history entry `to` (default: the one before the newest) back in the config file and
    /// apply it. The file's current content, if it was never applied, is kept in the history
    /// directory so no edit is lost.
    fn rollback(&mut self, to: Option<u64>) -> ReloadReply {
        let path = self.path()?.to_path_buf();
        let history = self.history.as_ref().ok_or_else(|| {
            ReloadFailure::other("config history is disabled (no writable state directory)")
        })?;
        let entries = history
            .list()
            .map_err(|e| ReloadFailure::other(e.to_string()))?;
        let id = match to {
            Some(id) => id,
            None => match entries.len() {
                0 | 1 => {
                    return Err(ReloadFailure::other(
                        "no earlier config in the history to roll back to",
                    ));
                }
                n => entries[n - 2].id,
            },
        };
        let (_, text) = history
            .get(id)
            .map_err(|e| ReloadFailure::other(e.to_string()))?;
        // Validate before touching the file (relative paths resolve against the file's
        // directory, as they will once it is written there).
        let config = meshgate_config::parse_file_text(&text, &path)
            .map_err(|e| ReloadFailure::invalid(&e))?;
        if let Ok(on_disk) = std::fs::read_to_string(&path) {
            let applied = entries.last().is_some_and(|e| {
                e.sha256 == meshgate_control::history::sha256_hex(on_disk.as_bytes())
            });
            if !applied {
                let keep = history_dir(history).join(format!("unapplied-{}.toml", now_unix()));
                if let Err(e) = write_atomic(&keep, on_disk.as_bytes(), 0o600) {
                    return Err(ReloadFailure::other(format!(
                        "{} has edits that were never applied and they cannot be saved ({e}); not overwriting it",
                        path.display()
                    )));
                }
                tracing::warn!(saved = %keep.display(), "the config file had unapplied edits; saved them before the rollback");
            }
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path)
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or(0o644);
        write_atomic(&path, text.as_bytes(), mode)
            .map_err(|e| ReloadFailure::other(e.to_string()))?;
        tracing::info!(to = id, file = %path.display(), "rolled the config file back");
        self.apply(&text, config, &format!("rollback to #{id}"), None)
    }

    /// The config in force.
    pub fn current(&self) -> &Config {
        &self.current
    }

    /// Re-read the certificates, keys, bundles and CRLs of the config in force (a new
    /// generation of the same config; not a history entry).
    pub fn refresh_files(&mut self, why: &str) {
        match self.gateway.reload(self.current.clone(), why) {
            Ok(o) => tracing::info!(
                generation = o.generation,
                "{why}: re-read the certificates, bundles and CRLs"
            ),
            Err(e) => tracing::error!(
                error = %e,
                "{why}: cannot re-read the TLS files; the running generation stays in force"
            ),
        }
    }

    /// `files`: set for a reload the file watch triggered; if the config text itself did not
    /// change, the outcome names the files and no history entry is added (rotations would
    /// otherwise push every real config change out of the history).
    fn apply(
        &mut self,
        text: &str,
        config: Config,
        source: &str,
        files: Option<&[String]>,
    ) -> ReloadReply {
        if self.current.control != config.control {
            return Err(ReloadFailure::other(
                "[control] changed: the control plane's settings take effect only at start; \
                 restart meshgate to apply them (or undo the change to [control] to reload the \
                 rest); nothing was applied",
            ));
        }
        let config = Arc::new(config);
        sd_notify_reloading();
        let result = self.gateway.reload(config.clone(), source);
        super::run::sd_notify("READY=1");
        let mut outcome = result
            .map_err(|e| ReloadFailure::other(format!("{e}; the running config stays in force")))?;
        outcome.summary = summarize(&self.current, &config);
        match files {
            Some(files) if text == self.current_text => {
                outcome.summary = format!("files changed: {}", files.join(", "));
            }
            _ => {
                outcome.history_id =
                    self.record(text, source, outcome.generation, &outcome.summary);
            }
        }
        self.current = config;
        self.current_text = text.to_owned();
        tracing::info!(
            generation = outcome.generation,
            history = ?outcome.history_id,
            summary = %outcome.summary,
            needs_restart = ?outcome.needs_restart,
            "config applied"
        );
        Ok(outcome)
    }
}

fn history_dir(h: &History) -> PathBuf {
    // The history keeps its files in one directory; find it through an entry path.
    h.dir().to_path_buf()
}

fn sd_notify_reloading() {
    let usec = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0);
    super::run::sd_notify(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
}

/// One line saying what changed between two configs, e.g.
/// `listeners +in2 -in; clusters ~up` (`+` added, `-` removed, `~` changed).
pub fn summarize(old: &Config, new: &Config) -> String {
    fn part<T: serde::Serialize>(
        kind: &str,
        old: &[T],
        new: &[T],
        name: impl Fn(&T) -> &str,
    ) -> Option<String> {
        let mut marks = Vec::new();
        for n in new {
            match old.iter().find(|o| name(o) == name(n)) {
                None => marks.push(format!("+{}", name(n))),
                Some(o) if serde_json::to_value(o).ok() != serde_json::to_value(n).ok() => {
                    marks.push(format!("~{}", name(n)))
                }
                Some(_) => {}
            }
        }
        for o in old {
            if !new.iter().any(|n| name(n) == name(o)) {
                marks.push(format!("-{}", name(o)));
            }
        }
        (!marks.is_empty()).then(|| format!("{kind} {}", marks.join(" ")))
    }
    let mut parts: Vec<String> = [
        part("listeners", &old.listeners, &new.listeners, |l| &l.name),
        part("routes", &old.routes, &new.routes, |r| &r.name),
        part("clusters", &old.clusters, &new.clusters, |c| &c.name),
    ]
    .into_iter()
    .flatten()
    .collect();
    if old.runtime != new.runtime {
        parts.push("runtime changed".into());
    }
    if old.admin != new.admin {
        parts.push("admin changed".into());
    }
    if parts.is_empty() {
        "no change".into()
    } else {
        parts.join("; ")
    }
}
