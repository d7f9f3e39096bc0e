//! Reading and checking the PEM files a config names: certificate chains, private keys, trust
//! bundles and CRLs (rustls-pki-types `PemObject`).
//!
//! Used twice with the same rules: by validation (so `meshgate config validate` catches a bad
//! file before the daemon does) and by the dataplane when it builds its TLS state from a
//! validated config (first start and every reload). Every error names the file, says what is
//! wrong and how to fix it. Nothing here logs or prints key material.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use x509_parser::extensions::GeneralName;

/// A problem with one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileError {
    pub path: PathBuf,
    /// What is wrong, e.g. "certificate expired on 2024-05-01 00:00:00 UTC".
    pub problem: String,
    /// How to fix it.
    pub hint: String,
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} (hint: {})",
            self.path.display(),
            self.problem,
            self.hint
        )
    }
}

impl std::error::Error for FileError {}

fn error(path: &Path, problem: impl Into<String>, hint: impl Into<String>) -> FileError {
    FileError {
        path: path.to_owned(),
        problem: problem.into(),
        hint: hint.into(),
    }
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, FileError> {
    std::fs::read(path).map_err(|err| {
        let hint = match err.kind() {
            std::io::ErrorKind::NotFound => format!(
                "check the path (a relative path starts at the config file's directory) and \
                 that the {what} was created"
            ),
            std::io::ErrorKind::PermissionDenied => {
                format!("make the {what} readable by the user meshgate runs as")
            }
            _ => format!("check that the path names a readable {what}"),
        };
        error(path, format!("cannot read {what}: {err}"), hint)
    })
}

/// What kinds of PEM sections a file holds, for hints when the wanted kind is missing.
fn section_labels(bytes: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(bytes);
    text.lines()
        .filter_map(|line| {
            line.trim()
                .strip_prefix("-----BEGIN ")
                .and_then(|rest| rest.strip_suffix("-----"))
                .map(str::to_owned)
        })
        .collect()
}

/// The certificates of a PEM file, in file order (a chain: leaf first).
pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, FileError> {
    let bytes = read(path, "certificate file")?;
    let mut certs = Vec::new();
    for item in CertificateDer::pem_slice_iter(&bytes) {
        match item {
            Ok(cert) => certs.push(cert),
            Err(err) => {
                return Err(error(
                    path,
                    format!("not a valid PEM file: {err}"),
                    "the file must hold \"-----BEGIN CERTIFICATE-----\" blocks; convert DER \
                     with `openssl x509 -inform der -in FILE -out FILE.pem`",
                ));
            }
        }
    }
    if certs.is_empty() {
        let labels = section_labels(&bytes);
        let hint = if labels.iter().any(|l| l.contains("PRIVATE KEY")) {
            "this looks like a private key: are `cert` and `key` swapped?".to_owned()
        } else if labels.is_empty() {
            "the file must hold \"-----BEGIN CERTIFICATE-----\" blocks (PEM); convert DER with \
             `openssl x509 -inform der -in FILE -out FILE.pem`"
                .to_owned()
        } else {
            format!(
                "found {} but no CERTIFICATE block",
                labels
                    .iter()
                    .map(|l| format!("\"{l}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        return Err(error(path, "no certificate in the file", hint));
    }
    for (index, cert) in certs.iter().enumerate() {
        if let Err(err) = x509_parser::parse_x509_certificate(cert) {
            return Err(error(
                path,
                format!("certificate {index} in the file does not parse: {err}"),
                "regenerate or re-export the certificate",
            ));
        }
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 RSA or SEC1 EC).
pub fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, FileError> {
    let bytes = read(path, "private key file")?;
    match PrivateKeyDer::from_pem_slice(&bytes) {
        Ok(key) => Ok(key),
        Err(err) => {
            let labels = section_labels(&bytes);
            let hint = if labels.iter().any(|l| l == "ENCRYPTED PRIVATE KEY") {
                "the key is encrypted; meshgate needs it unencrypted (mode 0600): \
                 `openssl pkcs8 -in KEY -out KEY.pem` asks for the passphrase once"
            } else if labels.iter().any(|l| l == "CERTIFICATE") {
                "this looks like a certificate: are `cert` and `key` swapped?"
            } else {
                "the file must hold one \"-----BEGIN PRIVATE KEY-----\" (or RSA/EC PRIVATE KEY) \
                 block"
            };
            Err(error(path, format!("no usable private key: {err}"), hint))
        }
    }
}

/// Checks that `key` is the private key of the first certificate of `chain` and that rustls
/// (ring provider) can sign with it.
pub fn check_key_matches(
    chain: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'_>,
    cert_path: &Path,
    key_path: &Path,
) -> Result<(), FileError> {
    let signing_key = rustls::crypto::ring::sign::any_supported_type(key).map_err(|err| {
        error(
            key_path,
            format!("unsupported private key: {err}"),
            "use an ECDSA P-256/P-384, Ed25519 or RSA (2048+ bits) key",
        )
    })?;
    let certified = rustls::sign::CertifiedKey::new(chain.to_vec(), signing_key);
    match certified.keys_match() {
        Ok(()) => Ok(()),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(()),
        Err(_) => Err(error(
            cert_path,
            format!(
                "the certificate does not match the private key {}",
                key_path.display()
            ),
            "pair each certificate with the key it was issued for; compare \
             `openssl x509 -noout -pubkey -in CERT` with `openssl pkey -pubout -in KEY`",
        )),
    }
}

/// What a certificate says about itself; for checks, `/certs` and expiry gauges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSummary {
    pub subject: String,
    /// Hex, lowercase, no separators.
    pub serial: String,
    /// Seconds since the Unix epoch.
    pub not_before: i64,
    pub not_after: i64,
    pub dns_names: Vec<String>,
    pub uris: Vec<String>,
    pub is_ca: bool,
}

/// Reads the fields of `cert` that matter to an operator.
pub fn summarize(cert: &CertificateDer<'_>) -> Option<CertSummary> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    let mut dns_names = Vec::new();
    let mut uris = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(dns) => dns_names.push((*dns).to_owned()),
                GeneralName::URI(uri) => uris.push((*uri).to_owned()),
                _ => {}
            }
        }
    }
    Some(CertSummary {
        subject: parsed.subject().to_string(),
        serial: parsed
            .raw_serial()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
        not_before: parsed.validity().not_before.timestamp(),
        not_after: parsed.validity().not_after.timestamp(),
        dns_names,
        uris,
        is_ca: parsed.is_ca(),
    })
}

fn unix_now(now: SystemTime) -> i64 {
    match now.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(_) => 0,
    }
}

/// `YYYY-MM-DD HH:MM:SS UTC` for a Unix timestamp.
pub fn format_timestamp(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Checks that every certificate of `certs` is valid at `now`.
pub fn check_validity(
    certs: &[CertificateDer<'_>],
    path: &Path,
    now: SystemTime,
) -> Result<(), FileError> {
    let now = unix_now(now);
    for (index, cert) in certs.iter().enumerate() {
        let Some(summary) = summarize(cert) else {
            return Err(error(
                path,
                format!("certificate {index} in the file does not parse"),
                "regenerate or re-export the certificate",
            ));
        };
        let which = if certs.len() == 1 {
            "the certificate".to_owned()
        } else if index == 0 {
            "the leaf certificate".to_owned()
        } else {
            format!("certificate {index} of the chain ({})", summary.subject)
        };
        if now > summary.not_after {
            return Err(error(
                path,
                format!("{which} expired on {}", format_timestamp(summary.not_after)),
                "renew it (e.g. `meshgate cert renew`) and replace the file; meshgate re-reads \
                 it on reload",
            ));
        }
        if now < summary.not_before {
            return Err(error(
                path,
                format!(
                    "{which} is not valid before {}",
                    format_timestamp(summary.not_before)
                ),
                "check the clock of this machine and of the issuing CA",
            ));
        }
    }
    Ok(())
}

/// A server or client identity: the chain and key files, loaded and checked together.
pub fn read_identity(
    cert_path: &Path,
    key_path: &Path,
    now: SystemTime,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), FileError> {
    let chain = read_certificates(cert_path)?;
    let key = read_private_key(key_path)?;
    check_key_matches(&chain, &key, cert_path, key_path)?;
    check_validity(&chain, cert_path, now)?;
    Ok((chain, key))
}

/// The CA certificates of a trust bundle file. Every certificate must be a CA that is valid
/// at `now` (an expired root would make every peer fail).
pub fn read_bundle(
    path: &Path,
    now: SystemTime,
) -> Result<Vec<CertificateDer<'static>>, FileError> {
    let certs = read_certificates(path)?;
    for (index, cert) in certs.iter().enumerate() {
        if summarize(cert).is_some_and(|s| !s.is_ca) {
            return Err(error(
                path,
                format!("certificate {index} of the bundle is not a CA certificate"),
                "a trust bundle holds the trust domain's root (CA) certificates, not leaves",
            ));
        }
    }
    check_validity(&certs, path, now)?;
    Ok(certs)
}

/// The CRLs of a PEM file (`-----BEGIN X509 CRL-----`).
pub fn read_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, FileError> {
    let bytes = read(path, "CRL file")?;
    let mut crls = Vec::new();
    for item in CertificateRevocationListDer::pem_slice_iter(&bytes) {
        match item {
            Ok(crl) => crls.push(crl),
            Err(err) => {
                return Err(error(
                    path,
                    format!("not a valid PEM file: {err}"),
                    "the file must hold \"-----BEGIN X509 CRL-----\" blocks",
                ));
            }
        }
    }
    if crls.is_empty() {
        return Err(error(
            path,
            "no CRL in the file",
            "the file must hold \"-----BEGIN X509 CRL-----\" blocks; convert DER with \
             `openssl crl -inform der -in FILE -out FILE.pem`",
        ));
    }
    for (index, crl) in crls.iter().enumerate() {
        if x509_parser::parse_x509_crl(crl).is_err() {
            return Err(error(
                path,
                format!("CRL {index} in the file does not parse"),
                "re-export the CRL from the CA",
            ));
        }
    }
    Ok(crls)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_format_as_utc() {
        assert_eq!(format_timestamp(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_timestamp(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(format_timestamp(1_714_521_600), "2024-05-01 00:00:00 UTC");
        assert_eq!(format_timestamp(4_102_444_799), "2099-12-31 23:59:59 UTC");
    }

    #[test]
    fn unreadable_and_wrong_files_say_what_to_do() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let missing = dir.path().join("missing.pem");
        let err = read_certificates(&missing)
            .err()
            .unwrap_or_else(|| panic!("read"));
        assert!(
            err.problem.starts_with("cannot read certificate file"),
            "{err}"
        );
        let key_like = dir.path().join("key.pem");
        std::fs::write(
            &key_like,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let err = read_certificates(&key_like)
            .err()
            .unwrap_or_else(|| panic!("read"));
        assert_eq!(err.problem, "no certificate in the file");
        assert!(err.hint.contains("swapped"), "{err}");
        let encrypted = dir.path().join("enc.pem");
        std::fs::write(
            &encrypted,
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let err = read_private_key(&encrypted)
            .err()
            .unwrap_or_else(|| panic!("read"));
        assert!(err.hint.contains("encrypted"), "{err}");
        let err = read_crls(&key_like).err().unwrap_or_else(|| panic!("read"));
        assert_eq!(err.problem, "no CRL in the file");
    }
}
