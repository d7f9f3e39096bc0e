//! `meshgate agent`: enroll this host with a join token, then keep its SVID fresh (see
//! docs/enrollment.md and `meshgate_control::agent`).
//!
//! Also holds what `meshgate ca serve` shares with it: logging to stderr and SIGTERM/SIGINT
//! handling with sigwait(2).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{Args, ValueEnum};
use meshgate_control::SystemClock;
use meshgate_control::agent::client::ServerUrl;
use meshgate_control::agent::{Agent, AgentConfig, AgentExit, SignalTarget};

use super::ca::{parse_duration, parse_spiffe_id, usage};
use super::exit;

/// The CA refused and nothing else can be tried (EX_NOPERM): a used, expired or revoked join
/// token, a revoked SVID, an SVID expired past the server's renewal grace. systemd units set
/// `RestartPreventExitStatus=77`: restarting cannot help until an operator acts.
pub const EXIT_REFUSED: u8 = 77;

#[derive(Debug, Clone, Copy, ValueEnum, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct LogArgs {
    /// Log filter (tracing EnvFilter syntax), e.g. `info`, `debug`, `meshgate::audit=info`.
    #[arg(
        long,
        env = "MESHGATE_LOG",
        default_value = "info",
        value_name = "FILTER"
    )]
    pub log: String,
    #[arg(long, value_enum, default_value_t)]
    pub log_format: LogFormat,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The enrollment server, `https://HOST[:PORT]` (`meshgate ca serve`).
    #[arg(long, value_name = "URL")]
    pub server: String,
    /// The identity to enroll for; the join token must be for this SPIFFE ID.
    #[arg(long, value_name = "ID")]
    pub spiffe_id: String,
    /// Output directory: svid.pem, svid_key.pem (0600), bundle.pem, replaced as one set.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// File holding the join token (`meshgate token create`). Needed only when there is no
    /// usable identity in --out; read at each enrollment attempt.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// The CA's trust bundle (PEM, `meshgate bundle export --format pem`), to verify the server
    /// at the first enrollment. Without it (and without an identity in --out) the agent refuses
    /// to enroll.
    #[arg(long, value_name = "FILE")]
    pub ca_bundle: Option<PathBuf>,
    /// The SPIFFE ID the server must present [default: spiffe://<td>/meshgate/enrollment].
    #[arg(long, value_name = "ID")]
    pub server_spiffe_id: Option<String>,
    /// Shell command run after each rotation (env: MESHGATE_SVID, MESHGATE_SVID_KEY,
    /// MESHGATE_BUNDLE, MESHGATE_SVID_DIR, MESHGATE_SPIFFE_ID, MESHGATE_SERIAL).
    #[arg(long, value_name = "CMD")]
    pub on_rotate: Option<String>,
    /// Signal a process after each rotation, e.g. `1234:HUP`.
    #[arg(long, value_name = "PID:SIG")]
    pub signal: Option<String>,
    /// Enroll or renew once if needed, then exit (0 when an identity is in place).
    #[arg(long)]
    pub once: bool,
    /// Timeout of each request to the server.
    #[arg(long, value_name = "DUR", default_value = "10s")]
    pub timeout: String,
    #[command(flatten)]
    pub logging: LogArgs,
}

/// Log to stderr.
pub fn init_logging(args: &LogArgs) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_new(&args.log).unwrap_or_else(|e| {
        eprintln!(
            "warning: bad --log filter {:?} ({e}); using `info`",
            args.log
        );
        EnvFilter::new("info")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match args.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// SIGTERM and SIGINT, received synchronously with sigwait(2). Block them before starting any
/// thread so every thread inherits the mask (child processes get a clean mask from std).
pub struct Signals {
    set: libc::sigset_t,
}

impl Signals {
    pub fn block() -> std::io::Result<Signals> {
        // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it; pthread_sigmask
        // only changes this thread's mask (threads spawned later inherit it).
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for s in [libc::SIGTERM, libc::SIGINT] {
                libc::sigaddset(&mut set, s);
            }
            let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            if rc != 0 {
                return Err(std::io::Error::from_raw_os_error(rc));
            }
            Ok(Signals { set })
        }
    }

    /// Block until SIGTERM or SIGINT arrives; returns the signal.
    pub fn wait(&self) -> i32 {
        loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` was initialised in `block`; `sig` is a valid out-pointer.
            let rc = unsafe { libc::sigwait(&self.set, &mut sig) };
            if rc == 0 {
                return sig;
            }
        }
    }

    /// Set `flag` when a signal arrives (on a thread of its own).
    pub fn set_on_signal(self, flag: Arc<AtomicBool>) {
        let spawned = std::thread::Builder::new()
            .name("meshgate-signals".into())
            .spawn(move || {
                let sig = self.wait();
                tracing::info!(signal = sig, "stopping");
                flag.store(true, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the signal thread");
        }
    }
}

pub fn run(a: AgentArgs) -> u8 {
    let server: ServerUrl = match a.server.parse() {
        Ok(u) => u,
        Err(e) => return usage(format!("--server: {e}")),
    };
    let spiffe_id = match parse_spiffe_id(&a.spiffe_id) {
        Ok(id) => id,
        Err(code) => return code,
    };
    let server_id = match &a.server_spiffe_id {
        Some(s) => match meshgate_control::SpiffeId::parse(s) {
            Ok(id) => Some(id),
            Err(e) => return usage(format!("--server-spiffe-id: {e}")),
        },
        None => None,
    };
    let signal = match a
        .signal
        .as_deref()
        .map(str::parse::<SignalTarget>)
        .transpose()
    {
        Ok(s) => s,
        Err(e) => return usage(format!("--signal: {e}")),
    };
    let timeout = match parse_duration("timeout", &a.timeout) {
        Ok(t) if t >= Duration::from_secs(1) => t,
        Ok(_) => return usage("--timeout: at least 1s"),
        Err(code) => return code,
    };
    init_logging(&a.logging);
    let signals = match Signals::block() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot set up signal handling: {e}");
            return exit::FAILURE;
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let cfg = AgentConfig {
        server,
        spiffe_id,
        out: a.out,
        token_file: a.token_file,
        ca_bundle: a.ca_bundle,
        server_id,
        on_rotate: a.on_rotate,
        signal,
        once: a.once,
        timeout,
    };
    let agent = Agent::new(cfg.clone(), Arc::new(SystemClock), stop.clone());
    if agent.load_identity().is_none() {
        // Enrollment needs a token and a bundle to trust the server with; say so now.
        if cfg.token_file.is_none() {
            return usage(format!(
                "no usable identity in {} and no --token-file: create a join token with `meshgate token create --spiffe-id {}` and pass it with --token-file",
                cfg.out.display(),
                cfg.spiffe_id
            ));
        }
        if cfg.ca_bundle.is_none() {
            return usage(format!(
                "no usable identity in {} and no --ca-bundle: the agent will not enroll with a server it cannot verify; copy the CA's bundle (`meshgate bundle export --format pem`) and pass it with --ca-bundle",
                cfg.out.display()
            ));
        }
    }
    signals.set_on_signal(stop);
    match agent.run() {
        AgentExit::Stopped | AgentExit::Done => exit::OK,
        AgentExit::Refused(m) => {
            eprintln!("error: {m}");
            EXIT_REFUSED
        }
        AgentExit::Failed(m) => {
            eprintln!("error: {m}");
            exit::FAILURE
        }
    }
}
