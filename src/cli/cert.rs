//! `meshgate cert issue|inspect|list|revoke|needs-renewal`: X509-SVIDs from the offline CA, and
//! reading any PEM certificate.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use meshgate_control::ca::RevocationReason;
use meshgate_control::clock::{Clock, rfc3339};
use meshgate_control::inspect::{CertInfo, inspect_pem};
use meshgate_control::state::{mode, write_atomic};
use meshgate_control::{AuthorisedBy, IssueRequest, Serial, SystemClock};

use super::ca::{StateDirArg, fail, open, parse_duration, parse_spiffe_id, print_json, usage};
use super::{Output, exit};

#[derive(Debug, Subcommand)]
pub enum CertCmd {
    /// Issue an X509-SVID (key generated here) and record it in the ledger.
    Issue(IssueArgs),
    /// Show a PEM certificate: SPIFFE ID, issuer, validity, serial, SANs, key usage.
    Inspect(InspectArgs),
    /// List issued certificates from the ledger (valid ones unless --all).
    List(ListArgs),
    /// Revoke a certificate by serial and publish a new CRL (crl.pem in the state directory).
    Revoke(RevokeArgs),
    /// Exit 0 when a certificate is due for renewal (past --fraction of its lifetime, or
    /// expired), 1 when not yet, 64 when the file cannot be read.
    NeedsRenewal(NeedsRenewalArgs),
}

#[derive(Debug, Args)]
pub struct IssueArgs {
    #[command(flatten)]
    pub state: StateDirArg,
    /// SPIFFE ID for the certificate's URI SAN, in the CA's trust domain.
    #[arg(long, value_name = "ID")]
    pub spiffe_id: String,
    /// Where to write the certificate chain (leaf first), PEM, mode 0644.
    #[arg(long, value_name = "FILE")]
    pub cert: PathBuf,
    /// Where to write the private key, PKCS#8 PEM, mode 0600.
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
    /// Lifetime [default: the CA's default TTL, 1h unless set at `ca init`].
    #[arg(long, value_name = "DUR")]
    pub ttl: Option<String>,
    /// Add a DNS SAN (repeatable).
    #[arg(long = "dns", value_name = "NAME")]
    pub dns: Vec<String>,
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Output,
    /// Testing: issue N certificates in one process, writing FILE.0, FILE.1, ...
    #[arg(long, hide = true, default_value_t = 1)]
    pub count: u32,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// PEM file (a certificate or a chain).
    pub file: PathBuf,
    /// Show every certificate of a chain, not only the first (JSON: an array).
    #[arg(long)]
    pub all: bool,
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub state: StateDirArg,
    /// Include expired and revoked certificates.
    #[arg(long)]
    pub all: bool,
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct RevokeArgs {
    #[command(flatten)]
    pub state: StateDirArg,
    /// Serial number in hex, as `cert list` or `cert inspect` prints it.
    pub serial: String,
    /// unspecified, key-compromise, ca-compromise, affiliation-changed, superseded,
    /// cessation-of-operation, privilege-withdrawn.
    #[arg(long, default_value = "unspecified")]
    pub reason: String,
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct NeedsRenewalArgs {
    /// PEM certificate (the first one in the file is checked).
    pub file: PathBuf,
    /// Fraction of the lifetime after which renewal is due (0 < f <= 1).
    #[arg(long, default_value_t = 0.5)]
    pub fraction: f64,
}

pub fn run(cmd: CertCmd) -> u8 {
    match cmd {
        CertCmd::Issue(a) => issue(a),
        CertCmd::Inspect(a) => inspect(a),
        CertCmd::List(a) => list(a),
        CertCmd::Revoke(a) => revoke(a),
        CertCmd::NeedsRenewal(a) => needs_renewal(a),
    }
}

fn with_suffix(p: &Path, i: u32) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(format!(".{i}"));
    PathBuf::from(s)
}

fn issue(a: IssueArgs) -> u8 {
    let id = match parse_spiffe_id(&a.spiffe_id) {
        Ok(id) => id,
        Err(code) => return code,
    };
    let ttl = match a
        .ttl
        .as_deref()
        .map(|v| parse_duration("ttl", v))
        .transpose()
    {
        Ok(t) => t,
        Err(code) => return code,
    };
    if a.cert == a.key {
        return usage("--cert and --key must be different files");
    }
    for (flag, p) in [("cert", &a.cert), ("key", &a.key)] {
        let parent = p
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !parent.is_dir() {
            return usage(format!(
                "--{flag}: directory {} does not exist",
                parent.display()
            ));
        }
    }
    let ca = match open(&a.state.state_dir) {
        Ok(ca) => ca,
        Err(code) => return code,
    };
    let req = IssueRequest {
        spiffe_id: id,
        dns_names: a.dns.clone(),
        ttl,
        authorised_by: AuthorisedBy::Operator("cli".into()),
    };
    let mut last = None;
    for i in 0..a.count.max(1) {
        let (cert_path, key_path) = if a.count > 1 {
            (with_suffix(&a.cert, i), with_suffix(&a.key, i))
        } else {
            (a.cert.clone(), a.key.clone())
        };
        let svid = match ca.issue(&req) {
            Ok(s) => s,
            Err(e) => return fail(&e),
        };
        // Key first: if we die between the two writes, a certificate file never exists
        // without its key.
        if let Err(e) = write_atomic(&key_path, svid.key_pem.expose().as_bytes(), mode::SECRET) {
            eprintln!("error: {e}");
            return exit::FAILURE;
        }
        if let Err(e) = write_atomic(&cert_path, svid.chain_pem.as_bytes(), mode::PUBLIC) {
            eprintln!("error: {e}");
            return exit::FAILURE;
        }
        last = Some((svid, cert_path, key_path));
    }
    let Some((svid, cert_path, key_path)) = last else {
        return exit::OK;
    };
    if svid.ttl_shortened {
        eprintln!(
            "note: the TTL was shortened to end with the CA certificate ({}); rotate the CA soon",
            rfc3339(svid.entry.not_after)
        );
    }
    match a.output {
        Output::Json => print_json(&serde_json::json!({
            "serial": svid.entry.serial,
            "spiffe_id": svid.entry.spiffe_id,
            "dns_names": svid.entry.dns_names,
            "not_before": rfc3339(svid.entry.not_before),
            "not_after": rfc3339(svid.entry.not_after),
            "sha256_fingerprint": svid.entry.sha256_fingerprint,
            "cert": cert_path,
            "key": key_path,
        })),
        Output::Table => {
            println!(
                "issued {} serial {} valid until {}",
                svid.entry.spiffe_id,
                svid.entry.serial,
                rfc3339(svid.entry.not_after)
            );
            println!("  cert: {}", cert_path.display());
            println!("  key:  {} (0600)", key_path.display());
            exit::OK
        }
    }
}

fn read_certs(file: &Path) -> Result<Vec<CertInfo>, u8> {
    let data =
        std::fs::read(file).map_err(|e| usage(format!("cannot read {}: {e}", file.display())))?;
    inspect_pem(&data).map_err(|e| usage(format!("{}: {e}", file.display())))
}

fn inspect(a: InspectArgs) -> u8 {
    let certs = match read_certs(&a.file) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let shown: &[CertInfo] = if a.all { &certs } else { &certs[..1] };
    match a.output {
        Output::Json if a.all => print_json(&shown),
        Output::Json => print_json(&shown[0]),
        Output::Table => {
            for (i, c) in shown.iter().enumerate() {
                if a.all {
                    println!("certificate {i}:");
                }
                print_cert(c);
            }
            exit::OK
        }
    }
}

fn print_cert(c: &CertInfo) {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    let list = |v: &[String]| {
        if v.is_empty() {
            "-".to_owned()
        } else {
            v.join(", ")
        }
    };
    t.add_row([
        "SPIFFE ID".to_owned(),
        c.spiffe_id.clone().unwrap_or_else(|| "-".into()),
    ]);
    t.add_row(["subject".to_owned(), c.subject.clone()]);
    t.add_row(["issuer".to_owned(), c.issuer.clone()]);
    t.add_row(["serial".to_owned(), c.serial.clone()]);
    t.add_row(["not before".to_owned(), rfc3339(c.not_before)]);
    t.add_row(["not after".to_owned(), rfc3339(c.not_after)]);
    t.add_row(["URI SANs".to_owned(), list(&c.uris)]);
    t.add_row(["DNS SANs".to_owned(), list(&c.dns_names)]);
    if !c.ip_addresses.is_empty() {
        t.add_row(["IP SANs".to_owned(), list(&c.ip_addresses)]);
    }
    let ku = list(&c.key_usage);
    t.add_row([
        "key usage".to_owned(),
        if c.key_usage_critical {
            format!("{ku} (critical)")
        } else {
            ku
        },
    ]);
    t.add_row(["extended key usage".to_owned(), list(&c.extended_key_usage)]);
    t.add_row(["CA".to_owned(), c.is_ca.to_string()]);
    t.add_row(["public key".to_owned(), c.public_key.clone()]);
    t.add_row(["signature".to_owned(), c.signature_algorithm.clone()]);
    t.add_row(["sha256".to_owned(), c.sha256_fingerprint.clone()]);
    println!("{t}");
}

fn list(a: ListArgs) -> u8 {
    let ca = match open(&a.state.state_dir) {
        Ok(ca) => ca,
        Err(code) => return code,
    };
    let mut certs = match ca.certificates() {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    if !a.all {
        certs.retain(|c| c.status == "valid");
    }
    match a.output {
        Output::Json => print_json(&certs),
        Output::Table => {
            let mut t = Table::new();
            t.load_preset(UTF8_FULL_CONDENSED);
            t.set_header([
                "serial",
                "SPIFFE ID",
                "status",
                "not after",
                "authorised by",
            ]);
            for c in &certs {
                t.add_row([
                    c.entry.serial.to_string(),
                    c.entry.spiffe_id.to_string(),
                    c.status.to_owned(),
                    rfc3339(c.entry.not_after),
                    c.entry.authorised_by.clone(),
                ]);
            }
            println!("{t}");
            exit::OK
        }
    }
}

fn revoke(a: RevokeArgs) -> u8 {
    let serial: Serial = match a.serial.parse() {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    let reason = match RevocationReason::parse(&a.reason) {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    let ca = match open(&a.state.state_dir) {
        Ok(ca) => ca,
        Err(code) => return code,
    };
    let out = match ca.revoke(&serial, reason) {
        Ok(o) => o,
        Err(e) => return fail(&e),
    };
    let crl_path = a.state.state_dir.join("crl.pem");
    match a.output {
        Output::Json => print_json(&serde_json::json!({
            "serial": out.revocation.serial,
            "spiffe_id": out.revocation.spiffe_id,
            "reason": out.revocation.reason,
            "revoked_at": rfc3339(out.revocation.revoked_at),
            "already_revoked": out.already_revoked,
            "crl_number": out.crl_number,
            "crl": crl_path,
        })),
        Output::Table => {
            if out.already_revoked {
                println!(
                    "{} was already revoked at {} ({}); CRL #{} republished to {}",
                    out.revocation.serial,
                    rfc3339(out.revocation.revoked_at),
                    out.revocation.reason,
                    out.crl_number,
                    crl_path.display()
                );
            } else {
                println!(
                    "revoked {} ({}, {}); CRL #{} published to {}",
                    out.revocation.serial,
                    out.revocation.spiffe_id,
                    out.revocation.reason,
                    out.crl_number,
                    crl_path.display()
                );
            }
            exit::OK
        }
    }
}

fn needs_renewal(a: NeedsRenewalArgs) -> u8 {
    if !(a.fraction > 0.0 && a.fraction <= 1.0) {
        return usage(format!(
            "--fraction {}: must be greater than 0 and at most 1",
            a.fraction
        ));
    }
    let certs = match read_certs(&a.file) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let c = &certs[0];
    let now = SystemClock.now();
    let elapsed = c.lifetime_fraction_elapsed(now);
    let lifetime = c.not_after - c.not_before;
    let due_at = c.not_before + lifetime * a.fraction;
    if now >= c.not_after {
        println!("due: expired at {}", rfc3339(c.not_after));
        exit::OK
    } else if elapsed >= a.fraction {
        println!(
            "due: {:.0}% of the lifetime has passed (renew at {:.0}%), expires {}",
            elapsed * 100.0,
            a.fraction * 100.0,
            rfc3339(c.not_after)
        );
        exit::OK
    } else {
        println!(
            "not yet: {:.0}% of the lifetime has passed; due at {}",
            elapsed * 100.0,
            rfc3339(due_at.replace_nanosecond(0).unwrap_or(due_at))
        );
        exit::FAILURE
    }
}
