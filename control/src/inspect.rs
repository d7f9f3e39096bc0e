//! Reading certificates for people and scripts: `cert inspect`, `cert needs-renewal`,
//! `ca show`. Works on any PEM certificate, not only ones this CA issued.

use std::fmt::Write as _;

use serde::Serialize;
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::pem::Pem;
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

use crate::ledger::Serial;

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("no PEM certificate found (expected a -----BEGIN CERTIFICATE----- block)")]
    NoCertificate,
    #[error("PEM block {index} is not valid PEM: {detail}")]
    Pem { index: usize, detail: String },
    #[error("certificate {index} cannot be parsed: {detail}")]
    X509 { index: usize, detail: String },
}

/// Split PEM text into the DER of each `CERTIFICATE` block (other blocks, e.g. keys, are
/// skipped).
pub fn pem_certificates(data: &[u8]) -> Result<Vec<Vec<u8>>, InspectError> {
    let mut out = Vec::new();
    for (index, pem) in Pem::iter_from_buffer(data).enumerate() {
        let pem = pem.map_err(|e| InspectError::Pem {
            index,
            detail: e.to_string(),
        })?;
        if pem.label == "CERTIFICATE" {
            out.push(pem.contents);
        }
    }
    if out.is_empty() {
        return Err(InspectError::NoCertificate);
    }
    Ok(out)
}

/// DER to PEM (`CERTIFICATE`, 64-column base64).
pub fn der_to_pem(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    let _ = writeln!(out, "-----END {label}-----");
    out
}

/// Colon-separated uppercase hex SHA-256, as `openssl x509 -fingerprint -sha256` prints it.
pub fn sha256_fingerprint(der: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    d.as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// What `cert inspect -o json` prints for one certificate.
#[derive(Debug, Clone, Serialize)]
pub struct CertInfo {
    /// The single `spiffe://` URI SAN, or null when there is none or more than one URI SAN
    /// (then it is not an X509-SVID).
    pub spiffe_id: Option<String>,
    pub subject: String,
    pub issuer: String,
    /// Uppercase hex.
    pub serial: String,
    #[serde(with = "time::serde::rfc3339")]
    pub not_before: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    pub dns_names: Vec<String>,
    pub uris: Vec<String>,
    pub ip_addresses: Vec<String>,
    /// e.g. `digital_signature`, `key_cert_sign`, `crl_sign`.
    pub key_usage: Vec<String>,
    pub key_usage_critical: bool,
    /// e.g. `server_auth`, `client_auth`, or a dotted OID.
    pub extended_key_usage: Vec<String>,
    pub is_ca: bool,
    pub path_len_constraint: Option<u32>,
    /// e.g. `EC P-256`, `RSA 2048`, `Ed25519`.
    pub public_key: String,
    pub signature_algorithm: String,
    pub sha256_fingerprint: String,
    /// Self-signed (subject == issuer and the signature verifies with its own key).
    pub self_signed: bool,
}

impl CertInfo {
    pub fn lifetime_fraction_elapsed(&self, now: OffsetDateTime) -> f64 {
        let total = (self.not_after - self.not_before).as_seconds_f64();
        if total <= 0.0 {
            return 1.0;
        }
        ((now - self.not_before).as_seconds_f64() / total).max(0.0)
    }
}

/// Parse every certificate in a PEM file.
pub fn inspect_pem(data: &[u8]) -> Result<Vec<CertInfo>, InspectError> {
    pem_certificates(data)?
        .iter()
        .enumerate()
        .map(|(i, der)| inspect_der(der, i))
        .collect()
}

pub fn inspect_der(der: &[u8], index: usize) -> Result<CertInfo, InspectError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| InspectError::X509 {
        index,
        detail: e.to_string(),
    })?;
    let mut info = CertInfo {
        spiffe_id: None,
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        serial: Serial::from_bytes(cert.raw_serial()).to_string(),
        not_before: cert.validity().not_before.to_datetime(),
        not_after: cert.validity().not_after.to_datetime(),
        dns_names: vec![],
        uris: vec![],
        ip_addresses: vec![],
        key_usage: vec![],
        key_usage_critical: false,
        extended_key_usage: vec![],
        is_ca: false,
        path_len_constraint: None,
        public_key: public_key_name(&cert),
        signature_algorithm: signature_name(&cert),
        sha256_fingerprint: sha256_fingerprint(der),
        self_signed: cert.subject() == cert.issuer() && cert.verify_signature(None).is_ok(),
    };
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                for name in &san.general_names {
                    match name {
                        GeneralName::DNSName(d) => info.dns_names.push((*d).to_owned()),
                        GeneralName::URI(u) => info.uris.push((*u).to_owned()),
                        GeneralName::IPAddress(ip) => info.ip_addresses.push(ip_text(ip)),
                        _ => {}
                    }
                }
            }
            ParsedExtension::KeyUsage(ku) => {
                info.key_usage_critical = ext.critical;
                let names = [
                    "digital_signature",
                    "non_repudiation",
                    "key_encipherment",
                    "data_encipherment",
                    "key_agreement",
                    "key_cert_sign",
                    "crl_sign",
                    "encipher_only",
                    "decipher_only",
                ];
                info.key_usage = names
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| ku.flags >> i & 1 == 1)
                    .map(|(_, n)| (*n).to_owned())
                    .collect();
            }
            ParsedExtension::ExtendedKeyUsage(eku) => {
                let flags = [
                    (eku.any, "any"),
                    (eku.server_auth, "server_auth"),
                    (eku.client_auth, "client_auth"),
                    (eku.code_signing, "code_signing"),
                    (eku.email_protection, "email_protection"),
                    (eku.time_stamping, "time_stamping"),
                    (eku.ocsp_signing, "ocsp_signing"),
                ];
                info.extended_key_usage = flags
                    .iter()
                    .filter(|(on, _)| *on)
                    .map(|(_, n)| (*n).to_owned())
                    .collect();
                info.extended_key_usage
                    .extend(eku.other.iter().map(|o| o.to_id_string()));
            }
            ParsedExtension::BasicConstraints(bc) => {
                info.is_ca = bc.ca;
                info.path_len_constraint = bc.path_len_constraint;
            }
            _ => {}
        }
    }
    if let [only] = info.uris.as_slice()
        && only.starts_with("spiffe://")
    {
        info.spiffe_id = Some(only.clone());
    }
    Ok(info)
}

fn ip_text(b: &[u8]) -> String {
    match b.len() {
        4 => std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]).to_string(),
        16 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(b);
            std::net::Ipv6Addr::from(a).to_string()
        }
        _ => b.iter().map(|x| format!("{x:02x}")).collect(),
    }
}

fn public_key_name(cert: &X509Certificate<'_>) -> String {
    let spki = cert.public_key();
    match spki.parsed() {
        Ok(PublicKey::EC(_)) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|oid| match oid.to_id_string().as_str() {
                    "1.2.840.10045.3.1.7" => "P-256".to_owned(),
                    "1.3.132.0.34" => "P-384".to_owned(),
                    "1.3.132.0.35" => "P-521".to_owned(),
                    other => other.to_owned(),
                })
                .unwrap_or_else(|| "unknown curve".to_owned());
            format!("EC {curve}")
        }
        Ok(PublicKey::RSA(rsa)) => format!("RSA {}", rsa.key_size()),
        _ if spki.algorithm.algorithm.to_id_string() == "1.3.101.112" => "Ed25519".to_owned(),
        _ => spki.algorithm.algorithm.to_id_string(),
    }
}

fn signature_name(cert: &X509Certificate<'_>) -> String {
    let oid = cert.signature_algorithm.algorithm.to_id_string();
    match oid.as_str() {
        "1.2.840.10045.4.3.2" => "ecdsa-with-SHA256".into(),
        "1.2.840.10045.4.3.3" => "ecdsa-with-SHA384".into(),
        "1.2.840.113549.1.1.11" => "sha256WithRSAEncryption".into(),
        "1.2.840.113549.1.1.12" => "sha384WithRSAEncryption".into(),
        "1.2.840.113549.1.1.13" => "sha512WithRSAEncryption".into(),
        "1.3.101.112" => "Ed25519".into(),
        _ => oid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed() -> (Vec<u8>, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut p = rcgen::CertificateParams::new(vec!["a.example".to_owned()]).expect("params");
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(1));
        let cert = p.self_signed(&key).expect("cert");
        (cert.der().to_vec(), key.serialize_pem())
    }

    #[test]
    fn pem_round_trip_skips_keys_and_keeps_order() {
        let (a, key_pem) = self_signed();
        let (b, _) = self_signed();
        let text = format!(
            "{}{}{}",
            der_to_pem("CERTIFICATE", &a),
            key_pem,
            der_to_pem("CERTIFICATE", &b)
        );
        assert_eq!(
            pem_certificates(text.as_bytes()).expect("parse"),
            vec![a.clone(), b]
        );
        assert!(matches!(
            pem_certificates(key_pem.as_bytes()),
            Err(InspectError::NoCertificate)
        ));
        assert!(matches!(
            pem_certificates(b"hello"),
            Err(InspectError::NoCertificate)
        ));
        let info = inspect_der(&a, 0).expect("inspect");
        assert!(info.is_ca && info.self_signed);
        assert_eq!(info.path_len_constraint, Some(1));
        assert_eq!(info.dns_names, vec!["a.example"]);
        assert_eq!(info.spiffe_id, None);
        assert_eq!(info.sha256_fingerprint.len(), 32 * 3 - 1);
    }

    #[test]
    fn lifetime_fraction() {
        let (a, _) = self_signed();
        let info = inspect_der(&a, 0).expect("inspect");
        let mid = info.not_before + (info.not_after - info.not_before) / 2;
        assert!((info.lifetime_fraction_elapsed(mid) - 0.5).abs() < 1e-9);
        assert_eq!(
            info.lifetime_fraction_elapsed(info.not_before - time::Duration::DAY),
            0.0
        );
    }
}
