//! Trust bundles: the CA certificates a peer needs to verify this trust domain's SVIDs, as PEM
//! or in the SPIFFE bundle format (a JWKS with `use: x509-svid` keys, `spiffe_sequence` and
//! `spiffe_refresh_hint`; <https://github.com/spiffe/spiffe/blob/main/standards/SPIFFE_Trust_Domain_and_Bundle.md>).
//!
//! Bundles of different trust domains are never merged: a `TrustBundle` holds one trust domain.

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

impl TrustBundle {
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
