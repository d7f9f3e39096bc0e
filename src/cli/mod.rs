//! Command-line surface. Each command lives in its own module; this one holds the clap model
//! and maps outcomes to exit codes.

mod admin_client;
mod agent;
mod bundle;
mod ca;
mod cert;
mod check;
mod config_cmd;
mod control;
mod daemon;
mod drain;
mod local_ca;
mod proxy_config;
mod reload;
mod run;
mod status;
mod token;
mod trust;
mod watch;
mod workload;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};

/// Exit codes (sysexits.h), also listed in `meshgate --help` and docs/operations.md.
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// Generic failure (the message says what).
    pub const FAILURE: u8 = 1;
    /// Invalid configuration (EX_USAGE): every error is printed with its file and field path.
    pub const CONFIG: u8 = 64;
    /// The admin API of the running gateway could not be reached (EX_UNAVAILABLE).
    pub const UNAVAILABLE: u8 = 69;
    /// The host cannot run the dataplane: io_uring unavailable or memlock too low (EX_OSERR).
    pub const HOST: u8 = 71;
}

const AFTER_HELP: &str = "\
Exit codes:
  0   success
  1   failure (the message says what)
  2   wrong command-line usage
  64  invalid configuration (each error names file, field path and fix)
  69  the running gateway's admin API could not be reached
  71  this host cannot run the dataplane (io_uring or memlock; see `meshgate check`)

Docs: docs/operations.md, docs/config-reference.md";

#[derive(Debug, Parser)]
#[command(
    name = "meshgate",
    version,
    about = "Edge gateway appliance: thread-per-core io_uring proxy, mTLS and a SPIFFE CA for VM and bare-metal workloads",
    after_help = AFTER_HELP,
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum, Default, PartialEq, Eq)]
pub enum Output {
    /// Readable tables for people.
    #[default]
    Table,
    /// JSON for scripts.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway in the foreground (dataplane shards + admin API).
    ///
    /// With no --config, runs the embedded default configuration (see `meshgate config default`).
    Run(run::RunArgs),
    /// Validate, show or print configuration files.
    #[command(subcommand)]
    Config(config_cmd::ConfigCmd),
    /// Show the running gateway's state (reads its admin API).
    Status(status::StatusArgs),
    /// Show what the running gateway has loaded: listeners, routes, clusters, endpoints or
    /// secrets (certificates and trust-bundle roots), like `istioctl proxy-config`.
    ProxyConfig(proxy_config::ProxyConfigArgs),
    /// Re-read the running gateway's config file and apply it without dropping connections.
    ///
    /// The same as SIGHUP, but waits for and reports the outcome. An invalid config is refused
    /// with every error listed (exit 64) and the running config stays in force.
    Reload(reload::ReloadArgs),
    /// Take the running gateway out of service: /ready answers 503, listeners stop accepting,
    /// open connections finish (as Envoy's /drain_listeners). The process keeps running;
    /// `--wait` waits for the open connections. SIGTERM (systemctl stop) drains and exits.
    Drain(drain::DrainArgs),
    /// Check that this host can run this config: io_uring, memlock and open-file limits, the
    /// config, its ports and the expiry of its certificates (each line with a fix).
    Check(check::CheckArgs),
    /// Offline CA in a state directory: init, show, publish the CRL, rotate the root.
    #[command(subcommand)]
    Ca(ca::CaCmd),
    /// Issue, inspect, list and revoke X509-SVIDs; check whether one needs renewal.
    #[command(subcommand)]
    Cert(cert::CertCmd),
    /// Create, list and revoke single-use join tokens for enrolling workloads.
    #[command(subcommand)]
    Token(token::TokenCmd),
    /// Register local workloads (by Unix uid or executable) for the SPIFFE Workload API.
    #[command(subcommand)]
    Workload(workload::WorkloadCmd),
    /// Export or import trust bundles (PEM or SPIFFE format); serve the SPIFFE bundle endpoint.
    #[command(subcommand)]
    Bundle(bundle::BundleCmd),
    /// Federated trust domains: add, list, show, remove, refresh (SPIFFE federation).
    #[command(subcommand)]
    Trust(trust::TrustCmd),
    /// Enroll this host with a join token and keep its SVID fresh (writes svid.pem,
    /// svid_key.pem, bundle.pem; renews at half-life; exits 77 when the CA refuses for good).
    Agent(agent::AgentArgs),
    /// Print version and build information.
    Version {
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Default admin endpoint used by client commands.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:15000";

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Config(cmd) => config_cmd::run(cmd),
        Command::Status(args) => status::run(args),
        Command::ProxyConfig(args) => proxy_config::run(args),
        Command::Reload(args) => reload::run(args),
        Command::Drain(args) => drain::run(args),
        Command::Check(args) => check::run(args),
        Command::Ca(cmd) => ca::run(cmd),
        Command::Cert(cmd) => cert::run(cmd),
        Command::Token(cmd) => token::run(cmd),
        Command::Workload(cmd) => workload::run(cmd),
        Command::Bundle(cmd) => bundle::run(cmd),
        Command::Trust(cmd) => trust::run(cmd),
        Command::Agent(args) => agent::run(args),
        Command::Version { output } => version(output),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "meshgate",
                &mut std::io::stdout(),
            );
            exit::OK
        }
    };
    ExitCode::from(code)
}

fn version(output: Output) -> u8 {
    let v = env!("CARGO_PKG_VERSION");
    match output {
        Output::Table => println!("meshgate {v}"),
        Output::Json => println!(
            "{}",
            serde_json::json!({
                "version": v,
                "target": std::env::consts::ARCH,
                "os": std::env::consts::OS,
            })
        ),
    }
    exit::OK
}

/// Print an error for operators: `error: ...` plus the cause chain.
pub fn report(err: &anyhow::Error) {
    eprintln!("error: {err}");
    for cause in err.chain().skip(1) {
        eprintln!("  caused by: {cause}");
    }
}
