//! `meshgate run`: the daemon.
//!
//! Start-up order: load + validate config (exit 64 on errors) -> check the host (exit 71) ->
//! start the shards (they bind every listener or start-up fails) -> bind the admin API -> wait
//! for signals. SIGTERM/SIGINT: stop accepting, drain open connections until
//! `runtime.drain_timeout`, exit 0. SIGHUP, `POST /reload` and changed TLS files
//! (`runtime.watch_files`) reload the config.

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, ValueEnum};
use meshgate_control::history::History;
use meshgate_dataplane::accesslog;
use meshgate_dataplane::admin::{self, AdminState, ControlAction, ReloadRequest};
use meshgate_dataplane::metrics::BuildInfo;
use meshgate_dataplane::{Gateway, StartError};

use super::daemon::{ConfigSource, Daemon, LoadFailure};
use super::exit;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Configuration file (TOML). Without it, the embedded default runs.
    #[arg(short, long, env = "MESHGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "MESHGATE_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Log filter, e.g. `info`, `debug`, `meshgate_dataplane=debug`.
    #[arg(long, default_value = "info", env = "MESHGATE_LOG")]
    pub log: String,
    /// State directory (config history; CA state later). Created 0700 if missing.
    #[arg(long, env = "MESHGATE_STATE_DIR", default_value = "/var/lib/meshgate")]
    pub state_dir: PathBuf,
    /// Access log: a file path (reopened on SIGUSR1, for logrotate) or `stdout`; overrides the
    /// config's `[access_log]`. Off if neither is set.
    #[arg(long, env = "MESHGATE_ACCESS_LOG")]
    pub access_log: Option<String>,
    /// Access-log line format: `json` (Istio's keys) or `text` (Envoy's default format).
    #[arg(long, value_enum, default_value_t = AccessLogFormat::Json, env = "MESHGATE_ACCESS_LOG_FORMAT")]
    pub access_log_format: AccessLogFormat,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum AccessLogFormat {
    Json,
    Text,
}

/// Records queued between the shards and the access-log writer before new ones are dropped.
const ACCESS_LOG_QUEUE: usize = 65_536;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

fn init_logging(args: &RunArgs) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_new(&args.log).unwrap_or_else(|e| {
        eprintln!(
            "warning: bad --log filter {:?} ({e}); using `info`",
            args.log
        );
        EnvFilter::new("info")
    });
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

pub fn run(args: RunArgs) -> u8 {
    let config_source = match &args.config {
        Some(path) => ConfigSource::File(path.clone()),
        None => ConfigSource::Embedded,
    };
    // Refuse a host that cannot run the dataplane before anything is created on it.
    if let Err(e) = meshgate_dataplane::rt::check() {
        eprintln!("error: this host cannot run the dataplane: {e}");
        eprintln!("hint: `meshgate check` shows what the host supports");
        return exit::HOST;
    }
    // The embedded default serves TLS with an identity from the local CA: logging must be up
    // before it is issued, so that its messages are seen.
    init_logging(&args);
    let loaded = match config_source.load(&args.state_dir) {
        Ok(l) => l,
        Err(LoadFailure::Invalid(e)) => {
            eprint!("{e}");
            eprintln!("meshgate: configuration is invalid; nothing was started");
            return exit::CONFIG;
        }
        Err(LoadFailure::Other(e)) => {
            super::report(&e);
            return exit::FAILURE;
        }
    };
    let source = loaded.source.clone();
    let config = Arc::new(loaded.config.clone());

    // Block the signals we handle before any thread starts, so every thread inherits the mask
    // and only the sigwait below receives them.
    let signals = match Signals::block() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot set up signal handling: {e}");
            return exit::FAILURE;
        }
    };

    // The access log: --access-log overrides the config's [access_log].
    let from_flag = args.access_log.as_ref().map(|t| {
        let target = if t == "stdout" || t == "-" {
            accesslog::Target::Stdout
        } else {
            accesslog::Target::File(PathBuf::from(t))
        };
        let format = match args.access_log_format {
            AccessLogFormat::Json => accesslog::Format::Json,
            AccessLogFormat::Text => accesslog::Format::Text,
        };
        (target, format, ACCESS_LOG_QUEUE)
    });
    let from_config = config.access_log.as_ref().map(|a| {
        let target = match &a.target {
            meshgate_config::AccessLogTarget::Stdout => accesslog::Target::Stdout,
            meshgate_config::AccessLogTarget::File(p) => accesslog::Target::File(p.clone()),
        };
        let format = match a.format {
            meshgate_config::AccessLogFormat::Json => accesslog::Format::Json,
            meshgate_config::AccessLogFormat::Text => accesslog::Format::Text,
        };
        (target, format, a.queue)
    });
    let (access_log, access_writer) = match from_flag.or(from_config) {
        None => (None, None),
        Some((target, format, queue)) => match accesslog::AccessLog::start(target, format, queue) {
            Ok((log, writer)) => (Some(log), Some(writer)),
            Err(e) => {
                eprintln!("error: cannot open the access log: {e}");
                return exit::FAILURE;
            }
        },
    };
    let gateway = match Gateway::start(config.clone(), &source, access_log) {
        Ok(g) => g,
        Err(StartError::Runtime(e)) => {
            eprintln!("error: this host cannot run the dataplane: {e}");
            eprintln!("hint: `meshgate check` shows what the host supports");
            return exit::HOST;
        }
        Err(e) => {
            eprintln!("error: cannot start the gateway: {e}");
            return exit::FAILURE;
        }
    };

    // The control plane (`[control]`): its own threads, started after the shards so a
    // listener that cannot bind fails start-up first.
    let control = match &config.control {
        None => None,
        Some(c) => match super::control::ControlPlane::start(c, &args.state_dir) {
            Ok(cp) => {
                if let Some(addr) = cp.enrollment_addr() {
                    tracing::info!(address = %addr, "control: enrollment server running (https)");
                }
                Some(cp)
            }
            Err(e) => {
                eprintln!("error: cannot start the control plane ([control]): {e:#}");
                gateway.stop();
                return exit::FAILURE;
            }
        },
    };
    let crl_changed = control
        .as_ref()
        .map_or_else(crossbeam_channel::never, |c| c.crl_changed().clone());

    let history = match meshgate_control::state::ensure_state_dir(&args.state_dir) {
        Ok(()) => Some(History::new(&args.state_dir)),
        Err(e) => {
            tracing::warn!(error = %e, "config history disabled: the state directory is not writable (--state-dir)");
            None
        }
    };
    let (reload_tx, reload_rx) = crossbeam_channel::bounded::<ReloadRequest>(4);
    let state = Arc::new(AdminState {
        stats: gateway.stats().clone(),
        shared: gateway.shared().clone(),
        build: BuildInfo {
            version: env!("CARGO_PKG_VERSION"),
            ring_mode: gateway.ring_features().to_string(),
        },
        shards: gateway.stats().shards.len(),
        reload: Some(reload_tx),
        history: history.clone(),
        extra_metrics: Some(admin::ExtraMetrics(Arc::new({
            let store = meshgate_control::federation::store::TrustStore::new(&args.state_dir);
            move || store.render_metrics()
        }))),
    });
    let admin = match admin::serve(
        state,
        config.admin.address,
        config.admin.unix_socket.as_deref(),
    ) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: cannot start the admin API: {e}");
            if let Some(c) = control {
                c.stop();
            }
            gateway.stop();
            return exit::FAILURE;
        }
    };
    for (l, addr) in config.listeners.iter().zip(gateway.listener_addrs()) {
        tracing::info!(listener = %l.name, address = %addr, protocol = %l.protocol, "listening");
    }
    if let Some(a) = admin.tcp {
        tracing::info!(address = %a, "admin API listening");
    }
    if let Some(p) = &admin.unix {
        tracing::info!(path = %p.display(), "admin API listening");
    }
    tracing::info!(config = %source, "meshgate is ready");
    sd_notify("READY=1");

    let mut daemon = Daemon::new(
        gateway,
        config_source,
        args.state_dir.clone(),
        history,
        &loaded,
    );
    let sig_rx = signals.forward();
    // Federation: refresh peers' bundles; a changed bundle reloads (every shard's verifier).
    let (fed_tx, fed_rx) = crossbeam_channel::bounded::<()>(1);
    let poller = start_federation(&args.state_dir, fed_tx);
    // Without a poller the sender is gone; a disconnected channel would be ready forever.
    let fed_rx = if poller.is_some() {
        fed_rx
    } else {
        crossbeam_channel::never()
    };
    let watchdog = watchdog_interval();
    let watchdog_tick = match watchdog {
        Some(every) => {
            tracing::info!(every = ?every, "systemd watchdog: WATCHDOG=1 while every shard answers its heartbeat");
            crossbeam_channel::tick(every)
        }
        None => crossbeam_channel::never(),
    };
    let mut stuck_before = false;
    let drain_timeout = loop {
        crossbeam_channel::select! {
            recv(watchdog_tick) -> _ => {
                let wait = watchdog.map_or(HEARTBEAT_WAIT, |w| w.min(HEARTBEAT_WAIT));
                let stuck = daemon.gateway.heartbeat(wait);
                if stuck.is_empty() {
                    if stuck_before {
                        tracing::warn!("every shard answers its heartbeat again; feeding the systemd watchdog");
                        stuck_before = false;
                    }
                    sd_notify("WATCHDOG=1");
                } else {
                    tracing::error!(shards = ?stuck, wait = ?wait, "shard(s) did not answer the watchdog heartbeat (stuck?); withholding WATCHDOG=1, so systemd restarts the gateway at WatchdogSec");
                    stuck_before = true;
                }
            }
            recv(sig_rx) -> sig => match sig {
                Ok(libc::SIGHUP) => {
                    tracing::info!("SIGHUP: reloading the config");
                    let _ = daemon.handle(ControlAction::Reload);
                }
                Ok(libc::SIGUSR1) => {
                    if let Some(w) = &access_writer {
                        tracing::info!("SIGUSR1: reopening the access log");
                        w.reopen();
                    }
                }
                Ok(_) | Err(_) => break daemon.gateway.shared().current().config.runtime.drain_timeout,
            },
            recv(reload_rx) -> req => {
                if let Ok(req) = req {
                    let _ = req.reply.send(daemon.handle(req.action));
                }
            }
            recv(fed_rx) -> msg => {
                let current = daemon.gateway.shared().current().config.clone();
                if msg.is_ok() && super::daemon::uses_trust_store(&current, &args.state_dir) {
                    daemon.refresh_files("a federated trust bundle changed");
                }
            }
            recv(daemon.watch_timer()) -> _ => daemon.poll_files(),
            recv(crl_changed) -> _ => {
                if control.as_ref().is_some_and(|c| c.used_by(daemon.current())) {
                    daemon.refresh_files("the CA's CRL changed");
                }
            }
            recv(daemon.renewal_timer()) -> _ => {
                tracing::info!("the gateway's serving certificate is at half its lifetime: renewing");
                let _ = daemon.handle(ControlAction::Reload);
            }
        }
    };
    tracing::info!(
        timeout = %meshgate_config::format_duration(drain_timeout),
        "draining: listeners closed, waiting for open connections"
    );
    sd_notify("STOPPING=1");
    if let Some(c) = control {
        c.stop();
    }
    let left = daemon.gateway.drain(drain_timeout);
    if let Some(p) = &admin.unix {
        let _ = std::fs::remove_file(p);
    }
    if let Some(w) = access_writer {
        w.finish();
    }
    tracing::info!(closed_at_deadline = left, "stopped");
    exit::OK
}

/// Start the federation poller: it keeps the trust store's peers fresh (from the first `meshgate
/// trust add` on, even while running) and reports changed bundles; the control loop reloads
/// when the config in force reads the trust store. Without peers it only lists an empty
/// directory once a second.
fn start_federation(
    state_dir: &std::path::Path,
    changed: crossbeam_channel::Sender<()>,
) -> Option<meshgate_control::federation::poller::Poller> {
    use meshgate_control::federation::{poller, store::TrustStore};
    let store = TrustStore::new(state_dir);
    let cfg = poller::PollerConfig::default();
    match poller::Poller::start(state_dir, cfg, move |domains| {
        tracing::info!(trust_domains = ?domains.iter().map(ToString::to_string).collect::<Vec<_>>(), "federated bundles changed");
        // A full channel means a reload is already pending: it reads the newest files.
        let _ = changed.try_send(());
    }) {
        Ok(p) => {
            let peers = store.domains().map(|d| d.len()).unwrap_or(0);
            tracing::info!(trust_store = %store.dir().display(), federated_domains = peers, "federation poller running");
            Some(p)
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot start the federation poller");
            None
        }
    }
}

/// How long a shard may take to answer a watchdog heartbeat.
const HEARTBEAT_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Half of systemd's `WATCHDOG_USEC` (meant for this process: `WATCHDOG_PID` unset or ours), or
/// None when the watchdog is off.
fn watchdog_interval() -> Option<std::time::Duration> {
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.trim().parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    (usec > 0).then(|| std::time::Duration::from_micros(usec / 2))
}

/// SIGTERM, SIGINT and SIGHUP, received synchronously with sigwait(2).
struct Signals {
    set: libc::sigset_t,
}

impl Signals {
    fn block() -> std::io::Result<Signals> {
        // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it; pthread_sigmask
        // only changes this thread's mask (threads spawned later inherit it).
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGUSR1] {
                libc::sigaddset(&mut set, s);
            }
            let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            if rc != 0 {
                return Err(std::io::Error::from_raw_os_error(rc));
            }
            Ok(Signals { set })
        }
    }

    /// Receive the signals on a dedicated thread and forward them to a channel.
    fn forward(self) -> crossbeam_channel::Receiver<i32> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let spawned = std::thread::Builder::new()
            .name("meshgate-signals".into())
            .spawn(move || {
                loop {
                    let sig = self.wait();
                    if sig != 0 && tx.send(sig).is_err() {
                        break;
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the signal thread");
        }
        rx
    }

    fn wait(&self) -> i32 {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` was initialised in `block`; `sig` is a valid out-pointer.
        let rc = unsafe { libc::sigwait(&self.set, &mut sig) };
        if rc != 0 { 0 } else { sig }
    }
}

/// Tell systemd (Type=notify) about readiness and shutdown; a no-op outside systemd.
pub(super) fn sd_notify(msg: &str) {
    use std::os::unix::net::UnixDatagram;
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|a| sock.send_to_addr(msg.as_bytes(), &a))
    } else {
        sock.send_to(msg.as_bytes(), &path)
    };
    if let Err(e) = sent {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}
