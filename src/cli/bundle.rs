//! `meshgate bundle export|import|serve`: this trust domain's CA certificates as PEM or as a
//! SPIFFE bundle (JWKS with `spiffe_sequence` and `spiffe_refresh_hint`), to stdout or
//! atomically to a file; another trust domain's bundle into the trust store; the SPIFFE bundle
//! endpoint in the foreground.

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, Subcommand, ValueEnum};
use meshgate_control::bundle::{BundleFormat, TrustBundle};
use meshgate_control::federation::Profile;
use meshgate_control::federation::endpoint::{BundleEndpoint, EndpointConfig, EndpointProfile};
use meshgate_control::federation::store::{PeerConfig, TrustStore};
use meshgate_control::state::{mode, write_atomic};
use meshgate_control::{Ca, TrustDomain};

use super::ca::{StateDirArg, fail, open, usage};
use super::exit;

#[derive(Debug, Subcommand)]
pub enum BundleCmd {
    /// Export the local trust bundle.
    Export(ExportArgs),
    /// Import another trust domain's bundle into the trust store (a static federated domain:
    /// nothing polls it; `meshgate trust add` is the polled kind).
    Import(ImportArgs),
    /// Serve the local trust bundle as a SPIFFE bundle endpoint (HTTPS, GET /) in the
    /// foreground. SIGTERM or SIGINT stops it. See docs/federation.md.
    Serve(ServeArgs),
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    #[command(flatten)]
    pub state: StateDirArg,
    /// The trust domain the bundle belongs to (never this CA's own).
    #[arg(long, value_name = "TD")]
    pub trust_domain: String,
    /// Format of FILE [default: spiffe if it starts with `{`, else pem].
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// Replace the bundle in force even if its sequence is lower.
    #[arg(long)]
    pub force: bool,
    /// The bundle file (`-` for stdin).
    pub file: PathBuf,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum ServeProfile {
    /// The server presents an SVID of the local CA (spiffe://<td>/meshgate/bundle-endpoint).
    HttpsSpiffe,
    /// The server presents an operator certificate (--cert/--key), verified by Web PKI.
    HttpsWeb,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub state: StateDirArg,
    /// Address to listen on (port 0 picks one; the address is printed on stdout).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:15081")]
    pub listen: std::net::SocketAddr,
    #[arg(long, value_enum, default_value = "https-spiffe")]
    pub profile: ServeProfile,
    /// https_web: certificate chain (PEM), re-read when it changes.
    #[arg(long, value_name = "FILE", required_if_eq("profile", "https-web"))]
    pub cert: Option<PathBuf>,
    /// https_web: private key (PEM).
    #[arg(long, value_name = "FILE", required_if_eq("profile", "https-web"))]
    pub key: Option<PathBuf>,
    /// https_spiffe: a DNS name or IP address added to the server's SVID (repeatable).
    #[arg(long = "dns", value_name = "NAME")]
    pub dns: Vec<String>,
    #[command(flatten)]
    pub logging: super::agent::LogArgs,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Format {
    /// Concatenated PEM certificates (for `openssl verify -CAfile`, curl --cacert, ...).
    Pem,
    /// SPIFFE bundle format (JWKS), as served by a SPIFFE bundle endpoint.
    Spiffe,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub state: StateDirArg,
    #[arg(long, value_enum)]
    pub format: Format,
    /// Write here (atomically, mode 0644) instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

pub fn run(cmd: BundleCmd) -> u8 {
    match cmd {
        BundleCmd::Export(a) => export(a),
        BundleCmd::Import(a) => import(a),
        BundleCmd::Serve(a) => serve(a),
    }
}

fn import(a: ImportArgs) -> u8 {
    let td = match TrustDomain::parse(&a.trust_domain) {
        Ok(td) => td,
        Err(e) => return usage(format!("--trust-domain: {e}")),
    };
    if let Ok(ca) = Ca::open(&a.state.state_dir)
        && ca.trust_domain() == &td
    {
        return usage(format!(
            "{td} is this CA's own trust domain; its bundle comes from the CA (bundles of different trust domains are never merged)"
        ));
    }
    let data = if a.file.as_os_str() == "-" {
        let mut v = Vec::new();
        if let Err(e) = std::io::Read::read_to_end(&mut std::io::stdin(), &mut v) {
            return usage(format!("stdin: {e}"));
        }
        v
    } else {
        match std::fs::read(&a.file) {
            Ok(v) => v,
            Err(e) => return usage(format!("{}: {e}", a.file.display())),
        }
    };
    let format = match a.format {
        Some(Format::Pem) => BundleFormat::Pem,
        Some(Format::Spiffe) => BundleFormat::Spiffe,
        None => TrustBundle::sniff(&data),
    };
    let bundle = match TrustBundle::parse(&td, format, &data) {
        Ok(b) => b,
        Err(e) => {
            return usage(format!(
                "{}: the bundle for {td} was refused: {e}",
                a.file.display()
            ));
        }
    };
    let store = TrustStore::new(&a.state.state_dir);
    let now = time::OffsetDateTime::now_utc();
    let result = match store.peer(&td) {
        Ok(_) => store.store_bundle(&bundle, now, a.force).map(|_| ()),
        Err(_) => store.add(
            &PeerConfig {
                version: 1,
                trust_domain: td.clone(),
                endpoint: None,
                profile: Profile::Static,
                endpoint_spiffe_id: None,
                web_ca_file: None,
                added_at: now,
            },
            Some(&bundle),
            now,
        ),
    };
    match result {
        Ok(()) => {
            eprintln!(
                "imported {} authorities for {td} (sequence {}) into {}",
                bundle.x509_authorities.len(),
                bundle.sequence,
                store.bundle_pem_path(&td).display()
            );
            exit::OK
        }
        Err(e) => {
            eprintln!("error: {e}");
            exit::FAILURE
        }
    }
}

fn serve(a: ServeArgs) -> u8 {
    let profile = match (a.profile, a.cert, a.key) {
        (ServeProfile::HttpsSpiffe, None, None) => EndpointProfile::HttpsSpiffe,
        (ServeProfile::HttpsSpiffe, _, _) => {
            return usage("--cert and --key go with --profile https-web");
        }
        (ServeProfile::HttpsWeb, Some(cert), Some(key)) => EndpointProfile::HttpsWeb { cert, key },
        (ServeProfile::HttpsWeb, _, _) => {
            return usage("--profile https-web needs --cert and --key");
        }
    };
    let mut cfg = EndpointConfig::new(a.listen, profile);
    for name in &a.dns {
        match name.parse::<std::net::IpAddr>() {
            Ok(ip) => cfg.ip_addresses.push(ip),
            Err(_) => cfg.dns_names.push(name.clone()),
        }
    }
    super::agent::init_logging(&a.logging);
    let ca = match open(&a.state.state_dir) {
        Ok(ca) => Arc::new(ca),
        Err(code) => return code,
    };
    let signals = match super::agent::Signals::block() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot set up signal handling: {e}");
            return exit::FAILURE;
        }
    };
    let handle = match BundleEndpoint::start(ca, cfg) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::FAILURE;
        }
    };
    match handle.spiffe_id() {
        Some(id) => println!("listening on https://{} as {id}", handle.local_addr()),
        None => println!("listening on https://{}", handle.local_addr()),
    }
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    let sig = signals.wait();
    tracing::info!(signal = sig, "stopping the bundle endpoint");
    handle.stop();
    exit::OK
}

fn export(a: ExportArgs) -> u8 {
    let ca = match open(&a.state.state_dir) {
        Ok(ca) => ca,
        Err(code) => return code,
    };
    let bundle = match ca.bundle() {
        Ok(b) => b,
        Err(e) => return fail(&e),
    };
    let text = match a.format {
        Format::Pem => bundle.to_pem(),
        Format::Spiffe => match bundle
            .to_spiffe_json()
            .map(|v| serde_json::to_string_pretty(&v))
        {
            Ok(Ok(s)) => s + "\n",
            Ok(Err(e)) => {
                eprintln!("error: cannot encode the bundle: {e}");
                return exit::FAILURE;
            }
            Err(e) => {
                eprintln!("error: cannot express a CA key as a JWK: {e}");
                return exit::FAILURE;
            }
        },
    };
    match a.out {
        None => {
            print!("{text}");
            exit::OK
        }
        Some(path) => match write_atomic(&path, text.as_bytes(), mode::PUBLIC) {
            Ok(()) => {
                eprintln!(
                    "wrote {} (bundle sequence {})",
                    path.display(),
                    bundle.sequence
                );
                exit::OK
            }
            Err(e) => {
                eprintln!("error: {e}");
                exit::FAILURE
            }
        },
    }
}
