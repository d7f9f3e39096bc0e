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
    /// Run the enrollment server in the foreground (HTTPS: join-token enrollment, mTLS
    /// renewal, trust bundle). SIGTERM or SIGINT stops it. See docs/enrollment.md.
    Serve(ServeArgs),
    /// Rotate the root without a failed handshake: prepare (publish the new root next to the
    /// old), activate (issue with the new key), retire (drop the old root once nothing
    /// unexpired depends on it). See docs/federation.md.
    #[command(subcommand)]
    Rotate(RotateCmd),
}

#[derive(Debug, Subcommand)]
pub enum RotateCmd {
    /// Create the new root and publish it in the bundle next to the current one.
    Prepare(RotatePrepareArgs),
    /// Issue with the new root's key from now on (both roots stay in the bundle).
    Activate(RotateStepArgs),
    /// Remove the old root from the bundle; refused while an unexpired SVID signed by it
    /// exists (shows how many and when the last expires) unless --force.
    Retire(RotateStepArgs),
}

#[derive(Debug, Args)]
pub struct RotatePrepareArgs {
    #[command(flatten)]
    pub state: StateDirArg,
    /// Lifetime of the new root.
    #[arg(long, value_name = "DUR", default_value = "10y")]
    pub root_ttl: String,
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct RotateStepArgs {
    #[command(flatten)]
    pub state: StateDirArg,
    /// activate: before one bundle refresh hint has passed since prepare; retire: cutting
    /// off unexpired SVIDs of the old root (they fail verification at once).
    #[arg(long)]
    pub force: bool,
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Output,
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
    /// `spiffe_refresh_hint` of the published bundle: how often federated peers poll it.
    #[arg(long, value_name = "DUR", default_value = "5m")]
    pub bundle_refresh_hint: String,
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

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub state: StateDirArg,
    /// Address to listen on (port 0 picks one; the address is printed on stdout).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:15080")]
    pub listen: std::net::SocketAddr,
    /// A name (or IP address) clients use to reach the server, added to its certificate
    /// (repeatable). The listen address is always included unless it is 0.0.0.0/::.
    #[arg(long = "dns", value_name = "NAME")]
    pub dns: Vec<String>,
    /// TTL of the SVIDs issued [default: the CA's default TTL].
    #[arg(long, value_name = "DUR")]
    pub svid_ttl: Option<String>,
    /// Lifetime of the server's own certificate, rotated at half of it [default: the CA's
    /// default TTL].
    #[arg(long, value_name = "DUR")]
    pub serving_ttl: Option<String>,
    /// How long after expiry an SVID may still renew (only the newest SVID of its identity,
    /// never a revoked one); 0 disables.
    #[arg(long, value_name = "DUR", default_value = "24h")]
    pub renewal_grace: String,
    /// Requests a source address may make at once.
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub per_source_burst: u32,
    /// Sustained requests per minute per source address.
    #[arg(long, value_name = "N", default_value_t = 60)]
    pub per_source_per_minute: u32,
    /// Requests all sources together may make at once.
    #[arg(long, value_name = "N", default_value_t = 200)]
    pub global_burst: u32,
    /// Sustained requests per minute, all sources together.
    #[arg(long, value_name = "N", default_value_t = 1200)]
    pub global_per_minute: u32,
    /// Connection workers.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub workers: usize,
    /// Audit file [default: <state-dir>/audit/enrollment.jsonl].
    #[arg(long, value_name = "FILE", conflicts_with = "no_audit_file")]
    pub audit_file: Option<PathBuf>,
    /// Audit only to the log (target `meshgate::audit`), not to a file.
    #[arg(long)]
    pub no_audit_file: bool,
    /// Also serve the SPIFFE bundle endpoint (https_spiffe profile) on this address.
    #[arg(long, value_name = "ADDR")]
    pub bundle_listen: Option<std::net::SocketAddr>,
    #[command(flatten)]
    pub logging: super::agent::LogArgs,
}

pub fn run(cmd: CaCmd) -> u8 {
    match cmd {
        CaCmd::Init(a) => init(a),
        CaCmd::Show(a) => show(a),
        CaCmd::Crl(a) => crl(a),
        CaCmd::Serve(a) => serve(a),
        CaCmd::Rotate(c) => rotate(c),
    }
}

fn rotate(cmd: RotateCmd) -> u8 {
    let (state, output) = match &cmd {
        RotateCmd::Prepare(a) => (&a.state, a.output),
        RotateCmd::Activate(a) | RotateCmd::Retire(a) => (&a.state, a.output),
    };
    let ca = match open(&state.state_dir) {
        Ok(ca) => ca,
        Err(code) => return code,
    };
    let result = match &cmd {
        RotateCmd::Prepare(a) => {
            let ttl = match parse_duration("root-ttl", &a.root_ttl) {
                Ok(t) => t,
                Err(c) => return c,
            };
            ca.rotate_prepare(Some(ttl))
                .map(|r| serde_json::to_value(&r).unwrap_or_default())
        }
        RotateCmd::Activate(a) => ca
            .rotate_activate(a.force)
            .map(|r| serde_json::to_value(&r).unwrap_or_default()),
        RotateCmd::Retire(a) => ca
            .rotate_retire(a.force)
            .map(|r| serde_json::to_value(&r).unwrap_or_default()),
    };
    let value = match result {
        Ok(v) => v,
        Err(e) => return fail(&e),
    };
    let seq = ca.bundle().map(|b| b.sequence).unwrap_or(0);
    match output {
        Output::Json => {
            let mut v = value;
            v["bundle_sequence"] = serde_json::json!(seq);
            print_json(&v)
        }
        Output::Table => {
            match &cmd {
                RotateCmd::Prepare(_) => println!(
                    "prepared: the new root {} is published next to the old one (bundle sequence {seq}); issuance stays on the old key.\nnext: wait one refresh hint ({}s) so federated peers fetch it, then `meshgate ca rotate activate`",
                    value["next_sha256"].as_str().unwrap_or(""),
                    ca.config().bundle_refresh_hint_secs
                ),
                RotateCmd::Activate(_) => println!(
                    "activated: new SVIDs are signed by the new root. Re-issue or renew the SVIDs in use; next, once the old root's SVIDs have expired: `meshgate ca rotate retire`"
                ),
                RotateCmd::Retire(_) => println!(
                    "retired: the bundle holds only the new root {} (sequence {seq}){}",
                    value["root_sha256"].as_str().unwrap_or(""),
                    if value["forced"].as_bool() == Some(true) {
                        format!(
                            "; {} unexpired SVID(s) of the old root were cut off",
                            value["dependent_svids"]
                        )
                    } else {
                        String::new()
                    }
                ),
            }
            exit::OK
        }
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
        opts.refresh_hint = parse_duration("bundle-refresh-hint", &a.bundle_refresh_hint)?;
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

fn serve(a: ServeArgs) -> u8 {
    use meshgate_control::enroll::ratelimit::Rate;
    use meshgate_control::enroll::{AuditTarget, EnrollmentConfig, EnrollmentServer};

    let mut cfg = EnrollmentConfig::new(a.listen);
    for name in &a.dns {
        match name.parse::<std::net::IpAddr>() {
            Ok(ip) => cfg.ip_addresses.push(ip),
            Err(_) => cfg.dns_names.push(name.clone()),
        }
    }
    let parsed = (|| {
        if let Some(v) = &a.svid_ttl {
            cfg.svid_ttl = Some(parse_duration("svid-ttl", v)?);
        }
        if let Some(v) = &a.serving_ttl {
            cfg.serving_ttl = Some(parse_duration("serving-ttl", v)?);
        }
        cfg.renewal_grace = if a.renewal_grace.trim() == "0" {
            Duration::ZERO
        } else {
            parse_duration("renewal-grace", &a.renewal_grace)?
        };
        Ok::<(), u8>(())
    })();
    if let Err(code) = parsed {
        return code;
    }
    if a.per_source_burst == 0 || a.global_burst == 0 || a.workers == 0 {
        return usage("--per-source-burst, --global-burst and --workers must be at least 1");
    }
    cfg.rate_limits.per_source = Rate {
        burst: a.per_source_burst,
        per_minute: a.per_source_per_minute,
    };
    cfg.rate_limits.global = Rate {
        burst: a.global_burst,
        per_minute: a.global_per_minute,
    };
    cfg.workers = a.workers;
    cfg.audit = match (&a.audit_file, a.no_audit_file) {
        (_, true) => AuditTarget::TracingOnly,
        (Some(p), _) => AuditTarget::File(p.clone()),
        (None, false) => AuditTarget::StateDir,
    };

    super::agent::init_logging(&a.logging);
    let ca = match open(&a.state.state_dir) {
        Ok(ca) => Arc::new(ca),
        Err(code) => return code,
    };
    // Before any server thread starts, so they all inherit the blocked mask.
    let signals = match super::agent::Signals::block() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot set up signal handling: {e}");
            return exit::FAILURE;
        }
    };
    let handle = match EnrollmentServer::start(ca, cfg) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::FAILURE;
        }
    };
    println!(
        "listening on https://{} as {}",
        handle.local_addr(),
        handle.server_id()
    );
    let bundle_endpoint = match a.bundle_listen {
        None => None,
        Some(addr) => {
            use meshgate_control::federation::endpoint as ep;
            let ca = match open(&a.state.state_dir) {
                Ok(ca) => Arc::new(ca),
                Err(code) => return code,
            };
            let mut ecfg = ep::EndpointConfig::new(addr, ep::EndpointProfile::HttpsSpiffe);
            ecfg.dns_names = a
                .dns
                .iter()
                .filter(|d| d.parse::<std::net::IpAddr>().is_err())
                .cloned()
                .collect();
            match ep::BundleEndpoint::start(ca, ecfg) {
                Ok(h) => {
                    if let Some(id) = h.spiffe_id() {
                        println!("bundle endpoint on https://{} as {id}", h.local_addr());
                    }
                    Some(h)
                }
                Err(e) => {
                    eprintln!("error: bundle endpoint: {e}");
                    handle.stop();
                    return exit::FAILURE;
                }
            }
        }
    };
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    let sig = signals.wait();
    tracing::info!(signal = sig, "stopping the enrollment server");
    handle.stop();
    if let Some(h) = bundle_endpoint {
        h.stop();
    }
    exit::OK
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
    if let Some(r) = &s.rotation {
        t.add_row([
            "rotation".to_owned(),
            format!(
                "{} (new root {}, prepared {})",
                r.phase,
                r.next_sha256,
                rfc3339(r.prepared_at)
            ),
        ]);
    }
    t.add_row([
        "issued / revoked".to_owned(),
        format!("{} / {}", s.issued_total, s.revoked_total),
    ]);
    println!("{t}");
}
