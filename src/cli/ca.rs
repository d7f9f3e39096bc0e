//! `meshgate ca init|show|crl`: the offline CA in a state directory (see docs/state-dir.md).
//!
//! Also holds what the other CA commands (`cert`, `token`, `bundle`) share: the `--state-dir`
//! flag, value parsing that exits 64, and error reporting.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use meshgate_control::ca::{CaSummary, InitOptions, OperatorRoot, SecretPem};
use meshgate_control::clock::rfc3339;
use meshgate_control::inspect::CertInfo;
use meshgate_control::{Ca, CaError, SpiffeId, SystemClock, TrustDomain, duration};

use super::{Output, exit};

/// Default state directory (FHS; the systemd unit's StateDirectory).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/meshgate";

#[derive(Debug, Args)]
pub struct StateDirArg {
    /// State directory holding the CA, ledger, tokens and CRL.
    #[arg(long, env = "MESHGATE_STATE_DIR", default_value = DEFAULT_STATE_DIR, value_name = "DIR")]
    pub state_dir: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum CaCmd {
    /// Create a CA: an ECDSA P-256 root, or an intermediate under a root you bring.
    Init(InitArgs),
    /// Show the CA: trust domain, fingerprints, validity, key algorithm, limits.
    Show(ShowArgs),
    /// Publish a fresh CRL (next number, new nextUpdate) from the recorded revocations.
    Crl(CrlArgs),
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Trust domain name, e.g. `example.org` (lowercase; `spiffe://example.org` also accepted).
    #[arg(long, value_name = "TD")]
    pub trust_domain: String,
    #[command(flatten)]
    pub state: StateDirArg,
    /// Lifetime of the CA certificate [default: 10y for a root, 1y for an intermediate].
    #[arg(long, alias = "ca-ttl", value_name = "DUR")]
    pub root_ttl: Option<String>,
    /// Longest SVID TTL this CA will issue.
    #[arg(long, value_name = "DUR", default_value = "24h")]
    pub max_ttl: String,
    /// SVID TTL when `cert issue` is given no --ttl.
    #[arg(long, value_name = "DUR", default_value = "1h")]
    pub default_ttl: String,
    /// How long each published CRL stays valid (its nextUpdate).
    #[arg(long, value_name = "DUR", default_value = "7d")]
    pub crl_validity: String,
    /// Your root CA certificate (PEM): meshgate creates an intermediate signed by it.
    #[arg(long, value_name = "FILE", requires = "root_key")]
    pub root_cert: Option<PathBuf>,
    /// The root's private key (unencrypted PKCS#8 PEM). Used once to sign; never stored.
    #[arg(long, value_name = "FILE", requires = "root_cert")]
    pub root_key: Option<PathBuf>,
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    #[command(flatten)]
    pub state: StateDirArg,
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct CrlArgs {
    #[command(flatten)]
    pub state: StateDirArg,
}

pub fn run(cmd: CaCmd) -> u8 {
    match cmd {
        CaCmd::Init(a) => init(a),
        CaCmd::Show(a) => show(a),
        CaCmd::Crl(a) => crl(a),
    }
}

/// Print a CA error and pick the exit code: 64 when the input or setup is at fault.
pub fn fail(e: &CaError) -> u8 {
    eprintln!("error: {e}");
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        eprintln!("  caused by: {s}");
        src = s.source();
    }
    if e.is_usage() {
        exit::CONFIG
    } else {
        exit::FAILURE
    }
}

/// Print a usage error (bad flag value) and return 64.
pub fn usage(msg: impl std::fmt::Display) -> u8 {
    eprintln!("error: {msg}");
    exit::CONFIG
}

pub fn parse_duration(flag: &str, v: &str) -> Result<Duration, u8> {
    duration::parse(v).map_err(|e| usage(format!("--{flag}: {e}")))
}

pub fn parse_spiffe_id(v: &str) -> Result<SpiffeId, u8> {
    SpiffeId::parse(v).map_err(|e| usage(format!("--spiffe-id: {e}")))
}

pub fn open(dir: &Path) -> Result<Ca, u8> {
    Ca::open(dir).map_err(|e| fail(&e))
}

fn read_text(flag: &str, path: &Path) -> Result<String, u8> {
    std::fs::read_to_string(path).map_err(|e| usage(format!("--{flag} {}: {e}", path.display())))
}

fn init(a: InitArgs) -> u8 {
    let td = match TrustDomain::parse(&a.trust_domain) {
        Ok(td) => td,
        Err(e) => return usage(format!("--trust-domain: {e}")),
    };
    let mut opts = InitOptions::new(td);
    let parsed = (|| {
        if let Some(v) = &a.root_ttl {
            opts.ca_ttl = Some(parse_duration("root-ttl", v)?);
        }
        opts.max_ttl = parse_duration("max-ttl", &a.max_ttl)?;
        opts.default_ttl = parse_duration("default-ttl", &a.default_ttl)?;
        opts.crl_validity = parse_duration("crl-validity", &a.crl_validity)?;
        if let (Some(c), Some(k)) = (&a.root_cert, &a.root_key) {
            opts.operator_root = Some(OperatorRoot {
                cert_pem: read_text("root-cert", c)?,
                key_pem: SecretPem::new(read_text("root-key", k)?),
            });
        }
        Ok::<(), u8>(())
    })();
    if let Err(code) = parsed {
        return code;
    }
    let ca = match Ca::init(&a.state.state_dir, &opts, Arc::new(SystemClock)) {
        Ok(ca) => ca,
        Err(e) => return fail(&e),
    };
    let summary = match ca.summary() {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    match a.output {
        Output::Json => print_json(&summary),
        Output::Table => {
            println!(
                "initialised a {} CA for trust domain {} in {}",
                summary.mode,
                summary.trust_domain,
                a.state.state_dir.display()
            );
            print_summary(&summary);
            println!(
                "next: meshgate cert issue --state-dir {} --spiffe-id spiffe://{}/<path> --cert svid.pem --key svid_key.pem",
                a.state.state_dir.display(),
                summary.trust_domain
            );
            exit::OK
        }
    }
}

fn show(a: ShowArgs) -> u8 {
    let ca = match open(&a.state.state_dir) {
        Ok(ca) => ca,
        Err(code) => return code,
    };
    let summary = match ca.summary() {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    match a.output {
        Output::Json => print_json(&summary),
        Output::Table => {
            print_summary(&summary);
            exit::OK
        }
    }
}

fn crl(a: CrlArgs) -> u8 {
    let ca = match open(&a.state.state_dir) {
        Ok(ca) => ca,
        Err(code) => return code,
    };
    match ca.publish_crl() {
        Ok(n) => {
            println!(
                "published CRL #{n} to {}",
                a.state.state_dir.join("crl.pem").display()
            );
            exit::OK
        }
        Err(e) => fail(&e),
    }
}

pub fn print_json(v: &impl serde::Serialize) -> u8 {
    match serde_json::to_string_pretty(v) {
        Ok(s) => {
            println!("{s}");
            exit::OK
        }
        Err(e) => {
            eprintln!("error: cannot encode JSON: {e}");
            exit::FAILURE
        }
    }
}

fn cert_rows(t: &mut Table, label: &str, c: &CertInfo) {
    t.add_row([format!("{label} subject"), c.subject.clone()]);
    t.add_row([
        format!("{label} validity"),
        format!("{} to {}", rfc3339(c.not_before), rfc3339(c.not_after)),
    ]);
    t.add_row([format!("{label} key"), c.public_key.clone()]);
    t.add_row([format!("{label} sha256"), c.sha256_fingerprint.clone()]);
}

fn print_summary(s: &CaSummary) {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.add_row(["trust domain".to_owned(), s.trust_domain.clone()]);
    t.add_row(["mode".to_owned(), s.mode.to_string()]);
    t.add_row(["state dir".to_owned(), s.state_dir.clone()]);
    for (i, r) in s.roots.iter().enumerate() {
        cert_rows(
            &mut t,
            if s.roots.len() == 1 {
                "root".into()
            } else {
                format!("root[{i}]")
            }
            .as_str(),
            r,
        );
    }
    if s.mode == meshgate_control::ca::CaMode::Intermediate {
        cert_rows(&mut t, "intermediate", &s.signing_certificate);
    }
    t.add_row([
        "SVID TTL".to_owned(),
        format!("default {}, max {}", s.default_ttl, s.max_ttl),
    ]);
    t.add_row(["CRL validity".to_owned(), s.crl_validity.clone()]);
    t.add_row(["bundle sequence".to_owned(), s.bundle_sequence.to_string()]);
    t.add_row([
        "issued / revoked".to_owned(),
        format!("{} / {}", s.issued_total, s.revoked_total),
    ]);
    println!("{t}");
}
