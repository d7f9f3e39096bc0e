//! Trust bundles: the CA certificates a peer needs to verify this trust domain's SVIDs, as PEM
//! or in the SPIFFE bundle format (a JWKS with `use: x509-svid` keys, `spiffe_sequence` and
//! `spiffe_refresh_hint`; <https://github.com/spiffe/spiffe/blob/main/standards/SPIFFE_Trust_Domain_and_Bundle.md>).
//!
//! Bundles of different trust domains are never merged: a `TrustBundle` holds one trust domain.
//! [`TrustBundle::parse`] reads a peer's bundle (SPIFFE JSON or PEM) for one named trust domain
//! and refuses anything that is not one: a key without exactly one `x5c`, a certificate that is
//! not a CA, a JWK whose key is not the certificate's, or an authority that names another trust
//! domain in its SPIFFE URI SAN.

use std::fs;
use std::io;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

use crate::error::StoreError;
use crate::inspect::{der_to_pem, sha256_fingerprint};
use crate::layout::StateDir;
use crate::spiffe::TrustDomain;
use crate::state::{self, mode};

/// One trust domain's X.509 authorities.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustBundle {
    pub trust_domain: TrustDomain,
    /// DER of each X.509 authority (root certificates), in order.
    pub x509_authorities: Vec<Vec<u8>>,
    /// Bumped whenever the set of authorities changes.
    pub sequence: u64,
    /// Seconds between polls suggested to consumers.
    pub refresh_hint_secs: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("authority {index}: {detail}")]
pub struct JwkError {
    pub index: usize,
    pub detail: String,
}

/// Largest bundle document meshgate reads (a bundle of a few roots is a few KiB).
pub const MAX_BUNDLE_BYTES: usize = 1024 * 1024;

/// Bundle formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BundleFormat {
    /// SPIFFE bundle (JWKS).
    Spiffe,
    /// Concatenated PEM certificates.
    Pem,
}

/// Why a bundle document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    #[error("the bundle is larger than {MAX_BUNDLE_BYTES} bytes")]
    TooLarge,
    #[error("not a SPIFFE bundle: {0}")]
    Malformed(String),
    #[error("keys[{index}]: {detail}")]
    BadKey { index: usize, detail: String },
    #[error("the bundle holds no X.509 authority (no key with \"use\": \"x509-svid\")")]
    Empty,
    #[error(
        "authority {index} belongs to trust domain {found}, not {expected}: the bundle is for another trust domain"
    )]
    WrongTrustDomain {
        index: usize,
        expected: TrustDomain,
        found: String,
    },
}

impl TrustBundle {
    /// Read a bundle document of `format` for `trust_domain` (see the module docs for what is
    /// refused). PEM carries no sequence or refresh hint: both are 0.
    pub fn parse(
        trust_domain: &TrustDomain,
        format: BundleFormat,
        data: &[u8],
    ) -> Result<TrustBundle, BundleError> {
        if data.len() > MAX_BUNDLE_BYTES {
            return Err(BundleError::TooLarge);
        }
        let (ders, sequence, refresh_hint_secs) = match format {
            BundleFormat::Pem => (
                crate::inspect::pem_certificates(data)
                    .map_err(|e| BundleError::Malformed(e.to_string()))?,
                0,
                0,
            ),
            BundleFormat::Spiffe => parse_jwks(data)?,
        };
        if ders.is_empty() {
            return Err(BundleError::Empty);
        }
        check_authorities(trust_domain, &ders)?;
        Ok(TrustBundle {
            trust_domain: trust_domain.clone(),
            x509_authorities: ders,
            sequence,
            refresh_hint_secs,
        })
    }

    /// Guess the format of a document: JSON starts with `{`.
    pub fn sniff(data: &[u8]) -> BundleFormat {
        match data.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'{') => BundleFormat::Spiffe,
            _ => BundleFormat::Pem,
        }
    }

    /// SHA-256 fingerprints of the authorities, in order.
    pub fn fingerprints(&self) -> Vec<String> {
        BundleState::fingerprints(&self.x509_authorities)
    }

    /// The same authorities (in any order and count) as `other`.
    pub fn same_authorities(&self, other: &TrustBundle) -> bool {
        let mut a = self.fingerprints();
        let mut b = other.fingerprints();
        a.sort();
        a.dedup();
        b.sort();
        b.dedup();
        a == b
    }

    pub fn to_pem(&self) -> String {
        self.x509_authorities
            .iter()
            .map(|d| der_to_pem("CERTIFICATE", d))
            .collect()
    }

    /// The SPIFFE bundle document (JWKS).
    pub fn to_spiffe_json(&self) -> Result<Value, JwkError> {
        let keys = self
            .x509_authorities
            .iter()
            .enumerate()
            .map(|(index, der)| jwk(der).map_err(|detail| JwkError { index, detail }))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(json!({
            "keys": keys,
            "spiffe_sequence": self.sequence,
            "spiffe_refresh_hint": self.refresh_hint_secs,
        }))
    }
}

/// (authorities, sequence, refresh hint) of a SPIFFE bundle document.
fn parse_jwks(data: &[u8]) -> Result<(Vec<Vec<u8>>, u64, u64), BundleError> {
    let doc: Value =
        serde_json::from_slice(data).map_err(|e| BundleError::Malformed(e.to_string()))?;
    let obj = doc
        .as_object()
        .ok_or_else(|| BundleError::Malformed("the document is not a JSON object".into()))?;
    let keys = obj
        .get("keys")
        .and_then(Value::as_array)
        .ok_or_else(|| BundleError::Malformed("no \"keys\" array".into()))?;
    let num = |name: &str| -> Result<u64, BundleError> {
        match obj.get(name) {
            None => Ok(0),
            Some(v) => v.as_u64().ok_or_else(|| {
                BundleError::Malformed(format!("\"{name}\" is not a non-negative integer"))
            }),
        }
    };
    let sequence = num("spiffe_sequence")?;
    let refresh = num("spiffe_refresh_hint")?;
    let mut ders = Vec::new();
    for (index, key) in keys.iter().enumerate() {
        let bad = |detail: String| BundleError::BadKey { index, detail };
        let key = key
            .as_object()
            .ok_or_else(|| bad("not a JSON object".into()))?;
        // Keys for other uses (jwt-svid) are not X.509 authorities; the SPIFFE spec says to
        // ignore uses one does not support.
        match key.get("use").and_then(Value::as_str) {
            Some("x509-svid") => {}
            Some(_) => continue,
            None => return Err(bad("no \"use\"".into())),
        }
        let x5c = key
            .get("x5c")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("an x509-svid key needs an \"x5c\" array".into()))?;
        let [cert] = x5c.as_slice() else {
            return Err(bad(format!(
                "an x509-svid key holds exactly one certificate in \"x5c\", not {}",
                x5c.len()
            )));
        };
        let der = cert
            .as_str()
            .and_then(|s| STANDARD.decode(s).ok())
            .ok_or_else(|| bad("\"x5c\"[0] is not base64".into()))?;
        // The key parameters, when given, must be the certificate's own.
        let expected = jwk(&der).map_err(bad)?;
        for field in ["kty", "crv", "x", "y", "n", "e"] {
            if let Some(v) = key.get(field)
                && expected.get(field) != Some(v)
            {
                return Err(bad(format!(
                    "\"{field}\" does not match the key of the certificate in \"x5c\""
                )));
            }
        }
        ders.push(der);
    }
    Ok((ders, sequence, refresh))
}

/// Every authority parses, is a CA certificate, and names no other trust domain.
fn check_authorities(td: &TrustDomain, ders: &[Vec<u8>]) -> Result<(), BundleError> {
    use x509_parser::extensions::GeneralName;
    for (index, der) in ders.iter().enumerate() {
        let bad = |detail: String| BundleError::BadKey { index, detail };
        let (rest, cert) = X509Certificate::from_der(der)
            .map_err(|e| bad(format!("not an X.509 certificate: {e}")))?;
        if !rest.is_empty() {
            return Err(bad("bytes after the certificate".into()));
        }
        if !cert.is_ca() {
            return Err(bad(
                "the certificate is not a CA (basicConstraints cA is false)".into(),
            ));
        }
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                if let GeneralName::URI(u) = name
                    && let Some(rest) = u.strip_prefix("spiffe://")
                {
                    let found = rest.split('/').next().unwrap_or_default();
                    if !found.eq_ignore_ascii_case(td.as_str()) {
                        return Err(BundleError::WrongTrustDomain {
                            index,
                            expected: td.clone(),
                            found: found.to_owned(),
                        });
                    }
                }
            }
        }
    }
    Ok(())
}

fn b64u(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn strip_zeros(b: &[u8]) -> &[u8] {
    let i = b
        .iter()
        .position(|&x| x != 0)
        .unwrap_or(b.len().saturating_sub(1));
    &b[i..]
}

/// A JWK for one X.509 authority: the public key's parameters plus the certificate in `x5c`.
fn jwk(der: &[u8]) -> Result<Value, String> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    let spki = cert.public_key();
    let x5c = json!([STANDARD.encode(der)]);
    let alg_oid = spki.algorithm.algorithm.to_id_string();
    match spki.parsed().map_err(|e| e.to_string())? {
        PublicKey::EC(point) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|o| o.to_id_string())
                .unwrap_or_default();
            let (crv, len) = match curve.as_str() {
                "1.2.840.10045.3.1.7" => ("P-256", 32),
                "1.3.132.0.34" => ("P-384", 48),
                "1.3.132.0.35" => ("P-521", 66),
                other => return Err(format!("unsupported EC curve {other}")),
            };
            let data = point.data();
            if data.len() != 1 + 2 * len || data[0] != 4 {
                return Err("EC point is not an uncompressed point".into());
            }
            Ok(json!({
                "use": "x509-svid",
                "kty": "EC",
                "crv": crv,
                "x": b64u(&data[1..1 + len]),
                "y": b64u(&data[1 + len..]),
                "x5c": x5c,
            }))
        }
        PublicKey::RSA(rsa) => Ok(json!({
            "use": "x509-svid",
            "kty": "RSA",
            "n": b64u(strip_zeros(rsa.modulus)),
            "e": b64u(strip_zeros(rsa.exponent)),
            "x5c": x5c,
        })),
        _ if alg_oid == "1.3.101.112" => Ok(json!({
            "use": "x509-svid",
            "kty": "OKP",
            "crv": "Ed25519",
            "x": b64u(spki.subject_public_key.as_ref()),
            "x5c": x5c,
        })),
        _ => Err(format!("unsupported public key algorithm {alg_oid}")),
    }
}

/// `bundle.json`: the sequence number and the authorities it was last bumped for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct BundleState {
    pub sequence: u64,
    /// SHA-256 fingerprints of the authorities at `sequence`.
    pub authorities: Vec<String>,
}

impl BundleState {
    pub fn load(dir: &StateDir) -> Result<Option<Self>, StoreError> {
        let path = dir.bundle_state();
        match fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| StoreError::corrupt(&path, e)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::read(&path, e)),
        }
    }

    pub fn save(&self, dir: &StateDir) -> Result<(), StoreError> {
        let path = dir.bundle_state();
        let mut json =
            serde_json::to_vec_pretty(self).map_err(|e| StoreError::corrupt(&path, e))?;
        json.push(b'\n');
        state::write_atomic(&path, &json, mode::PUBLIC)?;
        Ok(())
    }

    pub fn fingerprints(authorities: &[Vec<u8>]) -> Vec<String> {
        authorities.iter().map(|d| sha256_fingerprint(d)).collect()
    }
}
