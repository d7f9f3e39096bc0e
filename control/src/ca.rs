//! The CA: initialise a state directory, open it, and sign X509-SVIDs, CRLs and bundles.
//!
//! Where it sits: the CLI (`meshgate ca|cert|token|bundle ...`) calls it offline against a state
//! directory; later the enrollment server (token enrollment, mTLS renewal) and the gateway's own
//! identity manager call the same methods in-process. All mutable state goes through
//! [`crate::state::write_atomic`] under the state directory's [`StateLock`].
//!
//! SPIFFE rules enforced here (X509-SVID spec): leaf certificates carry exactly one URI SAN (a
//! SPIFFE ID in this CA's trust domain), `cA=false`, a critical keyUsage of digitalSignature
//! only, EKU serverAuth + clientAuth; CA certificates carry keyCertSign + cRLSign and the trust
//! domain's own ID (`spiffe://<td>`) as URI SAN. No certificate outlives the CA that signs it.
//!
//! Crash safety of issuance: the ledger entry is persisted (fsync'd) under the lock before the
//! certificate leaves this module. A crash before that point loses a certificate nobody has seen;
//! a crash after it leaves a ledger entry for a certificate the caller may not have received,
//! which is harmless. Serials are 126 random bits (see [`Serial::random`]).

use std::fmt;
use std::fs;
use std::io;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    PublicKeyData, RevokedCertParams, SanType, SerialNumber,
};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

use crate::bundle::{BundleState, TrustBundle};
use crate::clock::{Clock, SystemClock, rfc3339};
use crate::duration;
use crate::error::{CaError, CsrError, StoreError};
use crate::inspect::{CertInfo, der_to_pem, inspect_der, pem_certificates, sha256_fingerprint};
use crate::layout::{StateDir, StateLock};
use crate::ledger::{self, AuthorisedBy, LedgerEntry, Serial};
use crate::spiffe::{SpiffeId, TrustDomain};
use crate::state::{self, mode};
use crate::tokens::{JoinToken, TokenRecord, TokenStore};

/// Leaf certificates start this much before "now", to tolerate clock skew between hosts.
pub const BACKDATE: Duration = Duration::from_secs(30);
/// CA certificates and CRLs start this much before "now".
const CA_BACKDATE: Duration = Duration::from_secs(60);

pub const DEFAULT_SVID_TTL: Duration = Duration::from_secs(3600);
pub const DEFAULT_MAX_SVID_TTL: Duration = Duration::from_secs(24 * 3600);
pub const DEFAULT_ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 86_400);
pub const DEFAULT_INTERMEDIATE_TTL: Duration = Duration::from_secs(365 * 86_400);
pub const DEFAULT_CRL_VALIDITY: Duration = Duration::from_secs(7 * 86_400);
pub const DEFAULT_REFRESH_HINT: Duration = Duration::from_secs(300);
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(7 * 86_400);

/// PEM text holding a private key. `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretPem(String);

impl SecretPem {
    pub fn new(pem: String) -> Self {
        SecretPem(pem)
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretPem(<redacted>)")
    }
}

/// Root mode: meshgate generated the root and holds its key. Intermediate mode: the operator
/// brought a root; meshgate holds only an intermediate signed by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CaMode {
    Root,
    Intermediate,
}

impl fmt::Display for CaMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CaMode::Root => "root",
            CaMode::Intermediate => "intermediate",
        })
    }
}

/// `ca/config.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaConfig {
    pub version: u32,
    pub trust_domain: TrustDomain,
    pub mode: CaMode,
    pub default_ttl_secs: u64,
    pub max_ttl_secs: u64,
    pub crl_validity_secs: u64,
    pub bundle_refresh_hint_secs: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// A root the operator brings (`ca init --root-cert F --root-key F`). Its key is used once, to
/// sign the intermediate, and never stored.
#[derive(Debug, Clone)]
pub struct OperatorRoot {
    pub cert_pem: String,
    pub key_pem: SecretPem,
}

/// Settings for [`Ca::init`].
#[derive(Debug, Clone)]
pub struct InitOptions {
    pub trust_domain: TrustDomain,
    /// Lifetime of the CA certificate; default 10 years for a root, 1 year for an intermediate
    /// (never past the operator root's own expiry).
    pub ca_ttl: Option<Duration>,
    pub default_ttl: Duration,
    pub max_ttl: Duration,
    pub crl_validity: Duration,
    pub refresh_hint: Duration,
    pub operator_root: Option<OperatorRoot>,
}

impl InitOptions {
    pub fn new(trust_domain: TrustDomain) -> Self {
        InitOptions {
            trust_domain,
            ca_ttl: None,
            default_ttl: DEFAULT_SVID_TTL,
            max_ttl: DEFAULT_MAX_SVID_TTL,
            crl_validity: DEFAULT_CRL_VALIDITY,
            refresh_hint: DEFAULT_REFRESH_HINT,
            operator_root: None,
        }
    }
}

/// What to issue with a key the CA generates ([`Ca::issue`]).
#[derive(Debug, Clone)]
pub struct IssueRequest {
    pub spiffe_id: SpiffeId,
    pub dns_names: Vec<String>,
    /// None: the CA's default TTL.
    pub ttl: Option<Duration>,
    pub authorised_by: AuthorisedBy,
}

/// What to sign for a key the requester holds ([`Ca::sign_csr`]).
#[derive(Debug, Clone)]
pub struct CsrRequest<'a> {
    /// DER of a PKCS#10 request.
    pub csr_der: &'a [u8],
    /// The identity this request is authorised for; the CSR's URI SAN, if any, must equal it.
    pub spiffe_id: SpiffeId,
    /// DNS names the requester may have; the CSR's DNS SANs must be among them.
    pub allowed_dns_names: Vec<String>,
    pub ttl: Option<Duration>,
    pub authorised_by: AuthorisedBy,
}

/// A signed X509-SVID (without its key).
#[derive(Debug, Clone)]
pub struct SignedSvid {
    pub cert_der: Vec<u8>,
    /// The leaf alone.
    pub cert_pem: String,
    /// The leaf followed by the intermediates up to (not including) the trust anchor: what an
    /// `svid.pem` holds.
    pub chain_pem: String,
    pub entry: LedgerEntry,
    /// True when the TTL was cut short so as not to outlive the CA certificate.
    pub ttl_shortened: bool,
}

/// Options of [`Ca::renew_with`].
#[derive(Debug, Clone, Default)]
pub struct RenewOptions {
    /// None: the CA's default TTL.
    pub ttl: Option<Duration>,
    /// How long after expiry an SVID may still renew (zero: never).
    pub grace: Duration,
}

/// The result of [`Ca::renew_with`].
#[derive(Debug, Clone)]
pub struct Renewed {
    pub svid: SignedSvid,
    /// The certificate that authenticated the renewal.
    pub previous_serial: Serial,
    pub previous_spiffe_id: SpiffeId,
    /// The previous certificate had expired (renewed within the grace period).
    pub in_grace: bool,
}

/// A signed X509-SVID with the key the CA generated for it.
#[derive(Debug, Clone)]
pub struct IssuedSvid {
    pub cert_pem: String,
    pub chain_pem: String,
    pub key_pem: SecretPem,
    pub entry: LedgerEntry,
    pub ttl_shortened: bool,
}

/// RFC 5280 CRL reason codes offered to operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RevocationReason {
    Unspecified,
    KeyCompromise,
    CaCompromise,
    AffiliationChanged,
    Superseded,
    CessationOfOperation,
    PrivilegeWithdrawn,
}

impl RevocationReason {
    pub const NAMES: &'static [&'static str] = &[
        "unspecified",
        "key-compromise",
        "ca-compromise",
        "affiliation-changed",
        "superseded",
        "cessation-of-operation",
        "privilege-withdrawn",
    ];

    pub fn parse(s: &str) -> Result<Self, CaError> {
        use RevocationReason::*;
        Ok(
            match s.trim().to_ascii_lowercase().replace('_', "-").as_str() {
                "unspecified" => Unspecified,
                "key-compromise" => KeyCompromise,
                "ca-compromise" => CaCompromise,
                "affiliation-changed" => AffiliationChanged,
                "superseded" => Superseded,
                "cessation-of-operation" => CessationOfOperation,
                "privilege-withdrawn" => PrivilegeWithdrawn,
                _ => return Err(CaError::BadReason(s.to_owned())),
            },
        )
    }

    fn to_rcgen(self) -> rcgen::RevocationReason {
        use RevocationReason::*;
        match self {
            Unspecified => rcgen::RevocationReason::Unspecified,
            KeyCompromise => rcgen::RevocationReason::KeyCompromise,
            CaCompromise => rcgen::RevocationReason::CaCompromise,
            AffiliationChanged => rcgen::RevocationReason::AffiliationChanged,
            Superseded => rcgen::RevocationReason::Superseded,
            CessationOfOperation => rcgen::RevocationReason::CessationOfOperation,
            PrivilegeWithdrawn => rcgen::RevocationReason::PrivilegeWithdrawn,
        }
    }
}

impl fmt::Display for RevocationReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(Self::NAMES[*self as usize])
    }
}

/// One revoked certificate (`revocations.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub serial: Serial,
    pub spiffe_id: SpiffeId,
    pub reason: RevocationReason,
    #[serde(with = "time::serde::rfc3339")]
    pub revoked_at: OffsetDateTime,
    /// The certificate's own expiry: past it, the entry leaves the published CRL.
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct RevocationsFile {
    version: u32,
    /// Number of the last CRL published; the next one gets `crl_number + 1`.
    crl_number: u64,
    revoked: Vec<Revocation>,
}

/// The result of [`Ca::revoke`].
#[derive(Debug, Clone)]
pub struct RevokeOutcome {
    pub revocation: Revocation,
    /// The serial was already revoked; the CRL was published again anyway.
    pub already_revoked: bool,
    pub crl_number: u64,
}

/// A ledger entry with its current status, for `cert list`.
#[derive(Debug, Clone, Serialize)]
pub struct CertStatus {
    #[serde(flatten)]
    pub entry: LedgerEntry,
    /// `valid`, `expired`, `revoked` or `not-yet-valid`.
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revocation_reason: Option<RevocationReason>,
}

/// What `ca show` prints.
#[derive(Debug, Clone, Serialize)]
pub struct CaSummary {
    pub state_dir: String,
    pub trust_domain: String,
    pub mode: CaMode,
    /// The certificate that signs SVIDs (the root, or the intermediate).
    pub signing_certificate: CertInfo,
    /// Trust anchors, as exported by `bundle export`.
    pub roots: Vec<CertInfo>,
    /// The CA rotation in progress (`ca rotate`), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rotation: Option<RotationState>,
    pub default_ttl: String,
    pub max_ttl: String,
    pub crl_validity: String,
    pub bundle_sequence: u64,
    pub issued_total: usize,
    pub revoked_total: usize,
}

/// The signing certificate, parsed once at open.
#[derive(Debug, Clone)]
struct SigningCert {
    der: Vec<u8>,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    key_id: KeyIdMethod,
}

/// Phase of a CA rotation (`ca/rotation.json`; root mode only). Which files sign and which are
/// published follows from the phase alone, so each step is one atomic write:
///
/// | phase | signs with | bundle |
/// |---|---|---|
/// | (no rotation) | `root.pem` | `root.pem` |
/// | `prepared` | `root.pem` | `root.pem` + `next-root.pem` |
/// | `active` | `next-root.pem` | `root.pem` + `next-root.pem` |
/// | `retiring` | `next-root.pem` | `next-root.pem` (being copied over `root.pem`) |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RotationPhase {
    Prepared,
    Active,
    Retiring,
}

impl fmt::Display for RotationPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RotationPhase::Prepared => "prepared",
            RotationPhase::Active => "active",
            RotationPhase::Retiring => "retiring",
        })
    }
}

/// `ca/rotation.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotationState {
    pub version: u32,
    pub phase: RotationPhase,
    /// SHA-256 fingerprint of the root being replaced.
    pub previous_sha256: String,
    /// SHA-256 fingerprint of the new root.
    pub next_sha256: String,
    #[serde(with = "time::serde::rfc3339")]
    pub prepared_at: OffsetDateTime,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub activated_at: Option<OffsetDateTime>,
}

/// What `ca rotate retire` found, or refused for.
#[derive(Debug, Clone, Serialize)]
pub struct RetireOutcome {
    /// Unexpired SVIDs in the ledger signed by the old root (retired anyway with `--force`).
    pub dependent_svids: usize,
    #[serde(with = "time::serde::rfc3339::option")]
    pub latest_expiry: Option<OffsetDateTime>,
    pub forced: bool,
    pub root_sha256: String,
}

/// The signing key and the published anchors, as of one rotation phase.
struct Signer {
    issuer: Issuer<'static, KeyPair>,
    signing: SigningCert,
    /// Certificates to send after the leaf (intermediate mode: the intermediate).
    intermediates: Vec<Vec<u8>>,
    /// Trust anchors (DER).
    anchors: Vec<Vec<u8>>,
    /// The rotation state this was loaded for.
    rotation: Option<RotationState>,
}

/// An opened CA. Cheap to share behind an `Arc`; all methods take `&self`. A long-running
/// holder (the enrollment server) follows CA rotations: each issuance and bundle export first
/// checks `ca/rotation.json` and reloads the signing key if another process rotated it.
pub struct Ca {
    dir: StateDir,
    config: CaConfig,
    signer: RwLock<Arc<Signer>>,
    clock: Arc<dyn Clock>,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("dir", &self.dir.root())
            .field("trust_domain", &self.config.trust_domain)
            .field("mode", &self.config.mode)
            .field("signing_key", &"<redacted>")
            .finish()
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, StoreError> {
    fs::read(path).map_err(|e| StoreError::read(path, e))
}

fn to_time(d: Duration) -> time::Duration {
    time::Duration::try_from(d).unwrap_or(time::Duration::MAX)
}

fn secs(d: Duration) -> String {
    duration::format(d)
}

/// The key's SubjectPublicKeyInfo must be the certificate's.
fn key_matches_cert(key: &KeyPair, cert: &X509Certificate<'_>) -> bool {
    key.subject_public_key_info() == cert.public_key().raw
}

fn ca_distinguished_name(td: &TrustDomain, what: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "meshgate");
    dn.push(DnType::CommonName, format!("meshgate {what} CA {td}"));
    dn
}

fn uri_san(id: &str) -> Result<SanType, CaError> {
    Ia5String::try_from(id)
        .map(SanType::URI)
        .map_err(|e| CaError::Crypto {
            what: "encode the URI SAN",
            source: e,
        })
}

fn new_serial() -> Result<Serial, CaError> {
    Serial::random().map_err(|_| CaError::Store(StoreError::Random))
}

/// Check a DNS SAN: letters, digits and '-' in labels of 1..=63, at most 253 in total, a
/// leading `*.` allowed, no trailing dot.
pub fn validate_dns_name(name: &str) -> Result<(), CaError> {
    let bad = |reason| {
        Err(CaError::InvalidDnsName {
            name: name.to_owned(),
            reason,
        })
    };
    let body = name.strip_prefix("*.").unwrap_or(name);
    if body.is_empty() {
        return bad("empty");
    }
    if name.len() > 253 {
        return bad("longer than 253 characters");
    }
    for label in body.split('.') {
        if label.is_empty() {
            return bad("empty label (\"..\", or a leading or trailing dot)");
        }
        if label.len() > 63 {
            return bad("a label is longer than 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return bad("only letters, digits, '-' and '.' are allowed (and a leading \"*.\")");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return bad("a label starts or ends with '-'");
        }
    }
    Ok(())
}

/// A CSR whose signature verified, reduced to what issuance needs.
#[derive(Debug, Clone)]
pub struct VerifiedCsr {
    spki: rcgen::SubjectPublicKeyInfo,
    pub uris: Vec<String>,
    pub dns_names: Vec<String>,
}

/// Parse a PKCS#10 CSR, verify its self-signature, check its key type and SANs. No state is
/// touched, so the enrollment server can refuse a bad CSR before spending a join token.
pub fn verify_csr(csr_der: &[u8]) -> Result<VerifiedCsr, CsrError> {
    let (rest, csr) = X509CertificationRequest::from_der(csr_der)
        .map_err(|e| CsrError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::Malformed(format!(
            "{} bytes after the request",
            rest.len()
        )));
    }
    csr.verify_signature().map_err(|_| CsrError::BadSignature)?;
    let info = &csr.certification_request_info;
    let spki_raw = info.subject_pki.raw;
    if let Ok(PublicKey::RSA(rsa)) = info.subject_pki.parsed()
        && rsa.key_size() < 2048
    {
        return Err(CsrError::UnsupportedKey(format!("RSA {}", rsa.key_size())));
    }
    let spki = rcgen::SubjectPublicKeyInfo::from_der(spki_raw)
        .map_err(|e| CsrError::UnsupportedKey(e.to_string()))?;
    let mut uris = Vec::new();
    let mut dns_names = Vec::new();
    if let Some(exts) = csr.requested_extensions() {
        for ext in exts {
            if let ParsedExtension::SubjectAlternativeName(san) = ext {
                for name in &san.general_names {
                    match name {
                        GeneralName::URI(u) => uris.push((*u).to_owned()),
                        GeneralName::DNSName(d) => dns_names.push((*d).to_owned()),
                        other => return Err(CsrError::UnsupportedSan(other.to_string())),
                    }
                }
            }
        }
    }
    Ok(VerifiedCsr {
        spki,
        uris,
        dns_names,
    })
}

impl VerifiedCsr {
    /// The CSR may name no identity (the request carries it) or exactly `id`.
    fn check_identity(&self, id: &SpiffeId) -> Result<(), CsrError> {
        match self.uris.as_slice() {
            [] => Ok(()),
            [only] if SpiffeId::parse(only).is_ok_and(|u| &u == id) => Ok(()),
            _ => Err(CsrError::IdentityMismatch {
                authorised: id.clone(),
                in_csr: self.uris.join(", "),
            }),
        }
    }

    fn check_dns(&self, allowed: &[String]) -> Result<(), CsrError> {
        match self
            .dns_names
            .iter()
            .find(|d| !allowed.iter().any(|a| a.eq_ignore_ascii_case(d)))
        {
            Some(d) => Err(CsrError::DnsNotAuthorised(d.clone())),
            None => Ok(()),
        }
    }
}

impl Ca {
    /// Create a CA in `dir` (created 0700 if missing). Refuses a directory that already holds a
    /// CA, or that holds files that are not meshgate state. A crash part-way leaves no
    /// `ca/config.json`, so the next `init` starts over.
    pub fn init(dir: &Path, opts: &InitOptions, clock: Arc<dyn Clock>) -> Result<Ca, CaError> {
        let sd = StateDir::new(dir);
        if let Ok(cfg) = read_config(&sd) {
            return Err(CaError::AlreadyInitialised {
                dir: dir.to_path_buf(),
                trust_domain: cfg.trust_domain,
            });
        }
        if let Ok(entries) = fs::read_dir(dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let ours = StateDir::is_ours(&name);
                if !ours {
                    return Err(CaError::ForeignDir {
                        dir: dir.to_path_buf(),
                        found: name,
                    });
                }
            }
        }
        validate_init(opts)?;
        state::ensure_state_dir(dir)?;
        state::ensure_state_dir(&sd.ca_dir())?;
        state::ensure_state_dir(&sd.ledger_dir())?;
        let _lock = StateLock::exclusive(&sd)?;
        // Another `init` may have won the race for the lock.
        if let Ok(cfg) = read_config(&sd) {
            return Err(CaError::AlreadyInitialised {
                dir: dir.to_path_buf(),
                trust_domain: cfg.trust_domain,
            });
        }

        let now = clock.now();
        let td = &opts.trust_domain;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(CaError::crypto("generate the CA key"))?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![uri_san(&td.id_string())?];
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.serial_number = Some(SerialNumber::from_slice(new_serial()?.as_bytes()));
        params.not_before = now - CA_BACKDATE;

        let mode = match &opts.operator_root {
            None => {
                params.distinguished_name = ca_distinguished_name(td, "root");
                params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
                params.not_after = now + to_time(opts.ca_ttl.unwrap_or(DEFAULT_ROOT_TTL));
                let cert = params
                    .self_signed(&key)
                    .map_err(CaError::crypto("self-sign the root"))?;
                state::write_atomic(&sd.root_key(), key.serialize_pem().as_bytes(), mode::SECRET)?;
                state::write_atomic(&sd.root_cert(), cert.pem().as_bytes(), mode::PUBLIC)?;
                CaMode::Root
            }
            Some(root) => {
                let (root_der, root_not_after) = check_operator_root(root, now)?;
                let root_key = KeyPair::from_pem(root.key_pem.expose()).map_err(|e| {
                    CaError::OperatorRoot(format!(
                        "cannot read the root key ({e}); it must be an unencrypted PKCS#8 PEM (\"BEGIN PRIVATE KEY\"): convert with `openssl pkcs8 -topk8 -nocrypt -in KEY -out KEY.p8`"
                    ))
                })?;
                let (_, root_cert) = X509Certificate::from_der(&root_der).map_err(|e| {
                    CaError::OperatorRoot(format!("cannot parse the root certificate: {e}"))
                })?;
                if !key_matches_cert(&root_key, &root_cert) {
                    return Err(CaError::OperatorRoot(
                        "the root key does not belong to the root certificate; pass the matching pair".into(),
                    ));
                }
                let root_pem = der_to_pem("CERTIFICATE", &root_der);
                let issuer = Issuer::from_ca_cert_pem(&root_pem, root_key).map_err(|e| {
                    CaError::OperatorRoot(format!("cannot use the root certificate as issuer: {e}"))
                })?;
                params.distinguished_name = ca_distinguished_name(td, "intermediate");
                params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
                params.use_authority_key_identifier_extension = true;
                params.not_after = (now + to_time(opts.ca_ttl.unwrap_or(DEFAULT_INTERMEDIATE_TTL)))
                    .min(root_not_after);
                let cert = params
                    .signed_by(&key, &issuer)
                    .map_err(CaError::crypto("sign the intermediate"))?;
                state::write_atomic(
                    &sd.intermediate_key(),
                    key.serialize_pem().as_bytes(),
                    mode::SECRET,
                )?;
                state::write_atomic(&sd.intermediate_cert(), cert.pem().as_bytes(), mode::PUBLIC)?;
                state::write_atomic(&sd.root_cert(), root_pem.as_bytes(), mode::PUBLIC)?;
                CaMode::Intermediate
            }
        };

        let config = CaConfig {
            version: 1,
            trust_domain: td.clone(),
            mode,
            default_ttl_secs: opts.default_ttl.as_secs(),
            max_ttl_secs: opts.max_ttl.as_secs(),
            crl_validity_secs: opts.crl_validity.as_secs(),
            bundle_refresh_hint_secs: opts.refresh_hint.as_secs(),
            created_at: now,
        };
        // Everything else first; config.json last marks the CA complete.
        let ca = Ca::load(sd.clone(), config.clone(), clock)?;
        let revs = RevocationsFile {
            version: 1,
            crl_number: 0,
            revoked: Vec::new(),
        };
        ca.publish_crl_locked(revs)?;
        TokenStore::new(sd.clone(), ca.clock.clone()).init()?;
        BundleState {
            sequence: 1,
            authorities: BundleState::fingerprints(&ca.signer()?.anchors),
        }
        .save(&sd)?;
        let mut json =
            serde_json::to_vec_pretty(&config).map_err(|e| StoreError::corrupt(sd.config(), e))?;
        json.push(b'\n');
        state::write_atomic(&sd.config(), &json, mode::PUBLIC)?;
        Ok(ca)
    }

    /// Open the CA in `dir` with the system clock.
    pub fn open(dir: &Path) -> Result<Ca, CaError> {
        Self::open_with_clock(dir, Arc::new(SystemClock))
    }

    pub fn open_with_clock(dir: &Path, clock: Arc<dyn Clock>) -> Result<Ca, CaError> {
        let sd = StateDir::new(dir);
        let config = read_config(&sd)?;
        Self::load(sd, config, clock)
    }

    fn load(sd: StateDir, config: CaConfig, clock: Arc<dyn Clock>) -> Result<Ca, CaError> {
        let signer = load_signer(&sd, &config)?;
        Ok(Ca {
            dir: sd,
            config,
            signer: RwLock::new(Arc::new(signer)),
            clock,
        })
    }

    /// The signer for the rotation phase on disk now (reloaded if another process rotated).
    fn signer(&self) -> Result<Arc<Signer>, CaError> {
        let on_disk = read_rotation(&self.dir)?;
        let cur = self
            .signer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if cur.rotation == on_disk {
            return Ok(cur);
        }
        let fresh = Arc::new(load_signer(&self.dir, &self.config)?);
        tracing::info!(
            phase = ?fresh.rotation.as_ref().map(|r| r.phase),
            "the CA was rotated: signing key and bundle reloaded"
        );
        *self.signer.write().unwrap_or_else(|p| p.into_inner()) = fresh.clone();
        Ok(fresh)
    }
}

fn read_rotation(sd: &StateDir) -> Result<Option<RotationState>, CaError> {
    let path = sd.rotation();
    match fs::read(&path) {
        Ok(b) => Ok(Some(
            serde_json::from_slice(&b).map_err(|e| StoreError::corrupt(&path, e))?,
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::read(&path, e).into()),
    }
}

fn write_rotation(sd: &StateDir, r: &RotationState) -> Result<(), CaError> {
    let path = sd.rotation();
    let mut json = serde_json::to_vec_pretty(r).map_err(|e| StoreError::corrupt(&path, e))?;
    json.push(b'\n');
    state::write_atomic(&path, &json, mode::PUBLIC)?;
    Ok(())
}

/// What [`load_issuer`] returns: the issuer, the parsed signing certificate, and every
/// certificate of the file (the first is the signing one).
type LoadedIssuer = (Issuer<'static, KeyPair>, SigningCert, Vec<Vec<u8>>);

/// A CA certificate with its key, ready to sign: the key must be private (0600) and match.
fn load_issuer(cert_path: &Path, key_path: &Path) -> Result<LoadedIssuer, CaError> {
    let meta = fs::metadata(key_path).map_err(|e| StoreError::read(key_path, e))?;
    let key_mode = meta.permissions().mode() & 0o777;
    if key_mode & 0o077 != 0 {
        return Err(CaError::InsecureKey {
            path: key_path.to_path_buf(),
            mode: key_mode,
        });
    }
    let key_text =
        String::from_utf8(read_file(key_path)?).map_err(|e| StoreError::corrupt(key_path, e))?;
    let key = KeyPair::from_pem(&key_text).map_err(|e| StoreError::corrupt(key_path, e))?;
    let certs =
        pem_certificates(&read_file(cert_path)?).map_err(|e| StoreError::corrupt(cert_path, e))?;
    let signing_der = certs[0].clone();
    let (_, cert) =
        X509Certificate::from_der(&signing_der).map_err(|e| StoreError::corrupt(cert_path, e))?;
    if !key_matches_cert(&key, &cert) {
        return Err(StoreError::corrupt(
            key_path,
            format!("the key does not match {}", cert_path.display()),
        )
        .into());
    }
    let key_id = match cert
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(ski) => Some(ski.0.to_vec()),
            _ => None,
        }) {
        Some(ski) => KeyIdMethod::PreSpecified(ski),
        None => KeyIdMethod::Sha256,
    };
    let signing = SigningCert {
        not_before: cert.validity().not_before.to_datetime(),
        not_after: cert.validity().not_after.to_datetime(),
        der: signing_der.clone(),
        key_id,
    };
    let issuer = Issuer::from_ca_cert_pem(&der_to_pem("CERTIFICATE", &signing_der), key)
        .map_err(|e| StoreError::corrupt(cert_path, e))?;
    Ok((issuer, signing, certs))
}

fn load_signer(sd: &StateDir, config: &CaConfig) -> Result<Signer, CaError> {
    let rotation = read_rotation(sd)?;
    let phase = rotation.as_ref().map(|r| r.phase);
    let (cert_path, key_path) = match (config.mode, phase) {
        (CaMode::Intermediate, _) => (sd.intermediate_cert(), sd.intermediate_key()),
        (CaMode::Root, None | Some(RotationPhase::Prepared)) => (sd.root_cert(), sd.root_key()),
        (CaMode::Root, Some(RotationPhase::Active | RotationPhase::Retiring)) => {
            (sd.next_root_cert(), sd.next_root_key())
        }
    };
    let (issuer, signing, certs) = load_issuer(&cert_path, &key_path)?;
    let read_certs = |path: PathBuf| -> Result<Vec<Vec<u8>>, CaError> {
        Ok(pem_certificates(&read_file(&path)?).map_err(|e| StoreError::corrupt(&path, e))?)
    };
    let anchors = match (config.mode, phase) {
        (CaMode::Intermediate, _) => read_certs(sd.root_cert())?,
        (CaMode::Root, None) => certs.clone(),
        (CaMode::Root, Some(RotationPhase::Prepared | RotationPhase::Active)) => {
            let mut a = read_certs(sd.root_cert())?;
            a.extend(read_certs(sd.next_root_cert())?);
            a
        }
        (CaMode::Root, Some(RotationPhase::Retiring)) => read_certs(sd.next_root_cert())?,
    };
    let intermediates = match config.mode {
        CaMode::Root => Vec::new(),
        CaMode::Intermediate => certs,
    };
    Ok(Signer {
        issuer,
        signing,
        intermediates,
        anchors,
        rotation,
    })
}

impl Ca {
    pub fn config(&self) -> &CaConfig {
        &self.config
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.config.trust_domain
    }

    pub fn state_dir(&self) -> &Path {
        self.dir.root()
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    pub fn max_ttl(&self) -> Duration {
        Duration::from_secs(self.config.max_ttl_secs)
    }

    pub fn default_ttl(&self) -> Duration {
        Duration::from_secs(self.config.default_ttl_secs)
    }

    /// Expiry of the certificate that signs SVIDs.
    pub fn not_after(&self) -> OffsetDateTime {
        self.signer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .signing
            .not_after
    }

    /// The signing certificate (root or intermediate), DER.
    pub fn signing_cert_der(&self) -> Vec<u8> {
        self.signer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .signing
            .der
            .clone()
    }

    /// The identity must be in our trust domain.
    pub fn check_member(&self, id: &SpiffeId) -> Result<(), CaError> {
        if id.is_member_of(&self.config.trust_domain) {
            Ok(())
        } else {
            Err(CaError::ForeignTrustDomain {
                id: id.clone(),
                trust_domain: self.config.trust_domain.clone(),
            })
        }
    }

    fn check_ttl(&self, ttl: Duration) -> Result<(), CaError> {
        if ttl.as_secs() == 0 {
            return Err(CaError::InvalidTtl("it must be at least 1s".into()));
        }
        if ttl > self.max_ttl() {
            return Err(CaError::TtlTooLong {
                requested: secs(ttl),
                max: secs(self.max_ttl()),
            });
        }
        Ok(())
    }

    /// (not_before, not_after, shortened) for a leaf issued now.
    fn validity(
        &self,
        signing: &SigningCert,
        ttl: Duration,
    ) -> Result<(OffsetDateTime, OffsetDateTime, bool), CaError> {
        let now = self.clock.now();
        if now >= signing.not_after {
            return Err(CaError::CaExpired {
                not_after: rfc3339(signing.not_after),
            });
        }
        if now < signing.not_before {
            return Err(CaError::CaNotYetValid {
                not_before: rfc3339(signing.not_before),
            });
        }
        let not_before = (now - BACKDATE).max(signing.not_before);
        let wanted = now + to_time(ttl);
        let not_after = wanted.min(signing.not_after);
        Ok((not_before, not_after, not_after < wanted))
    }

    /// Issue an X509-SVID with a fresh ECDSA P-256 key generated here.
    pub fn issue(&self, req: &IssueRequest) -> Result<IssuedSvid, CaError> {
        self.issue_with_ips(req, &[])
    }

    /// [`Ca::issue`] with IP address SANs as well: for a server reached by address, such as
    /// the enrollment server's own serving certificate (`https://127.0.0.1:15080`).
    pub fn issue_with_ips(
        &self,
        req: &IssueRequest,
        ip_addresses: &[IpAddr],
    ) -> Result<IssuedSvid, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(CaError::crypto("generate a key"))?;
        let svid = self.sign_leaf(
            &key,
            &req.spiffe_id,
            &req.dns_names,
            ip_addresses,
            req.ttl,
            &req.authorised_by,
        )?;
        Ok(IssuedSvid {
            cert_pem: svid.cert_pem,
            chain_pem: svid.chain_pem,
            key_pem: SecretPem(key.serialize_pem()),
            entry: svid.entry,
            ttl_shortened: svid.ttl_shortened,
        })
    }

    /// Sign a CSR: verify its signature, hold it to the authorised identity and DNS names.
    pub fn sign_csr(&self, req: &CsrRequest<'_>) -> Result<SignedSvid, CaError> {
        let csr = verify_csr(req.csr_der)?;
        self.sign_verified(
            &csr,
            &req.spiffe_id,
            &req.allowed_dns_names,
            req.ttl,
            &req.authorised_by,
        )
    }

    fn sign_verified(
        &self,
        csr: &VerifiedCsr,
        id: &SpiffeId,
        allowed_dns: &[String],
        ttl: Option<Duration>,
        by: &AuthorisedBy,
    ) -> Result<SignedSvid, CaError> {
        csr.check_identity(id)?;
        csr.check_dns(allowed_dns)?;
        self.sign_leaf(&csr.spki, id, &csr.dns_names, &[], ttl, by)
    }

    /// Enrollment with a join token: check the CSR first (a malformed or mismatched CSR does not
    /// spend the token), then redeem the token (marked used durably), then sign.
    pub fn enroll(
        &self,
        token: &JoinToken,
        spiffe_id: &SpiffeId,
        csr_der: &[u8],
        ttl: Option<Duration>,
    ) -> Result<SignedSvid, CaError> {
        self.check_member(spiffe_id)?;
        if spiffe_id.is_reserved() {
            return Err(CaError::ReservedIdentity(spiffe_id.clone()));
        }
        if let Some(t) = ttl {
            self.check_ttl(t)?;
        }
        let csr = verify_csr(csr_der)?;
        csr.check_identity(spiffe_id)?;
        csr.check_dns(&[])?;
        let grant = self.tokens().redeem(token, spiffe_id)?;
        self.sign_verified(&csr, &grant.spiffe_id, &[], ttl, &grant.authorised_by())
    }

    /// Renewal authenticated by a current SVID (the enrollment server has already verified the
    /// mTLS handshake; this re-checks, fail closed): `current_der` must be signed by this CA,
    /// unexpired and unrevoked. The new certificate keeps its SPIFFE ID and DNS names.
    pub fn renew(
        &self,
        current_der: &[u8],
        csr_der: &[u8],
        ttl: Option<Duration>,
    ) -> Result<SignedSvid, CaError> {
        self.renew_with(
            current_der,
            csr_der,
            &RenewOptions {
                ttl,
                grace: Duration::ZERO,
            },
        )
        .map(|r| r.svid)
    }

    /// [`Ca::renew`] with a grace period for a certificate that expired while its holder could
    /// not reach the CA (an outage longer than the time left on the SVID).
    ///
    /// An SVID that expired at most `opts.grace` ago may still renew, but only if it is the
    /// newest certificate this CA issued for its SPIFFE ID (by ledger order) and is not revoked.
    /// So a key that leaked earlier cannot be used after its holder has renewed, and the
    /// ledger shows who renewed. `grace = 0` disables this (only unexpired SVIDs renew).
    pub fn renew_with(
        &self,
        current_der: &[u8],
        csr_der: &[u8],
        opts: &RenewOptions,
    ) -> Result<Renewed, CaError> {
        let refuse = CaError::RenewalRefused;
        let (_, cur) = X509Certificate::from_der(current_der).map_err(|e| refuse(e.to_string()))?;
        // During a rotation an SVID signed by the old root renews (with the new key).
        let current = self.signer()?;
        let mut issuers = vec![current.signing.der.clone()];
        if self.config.mode == CaMode::Root {
            issuers.extend(current.anchors.iter().cloned());
        }
        let issued_here = issuers.iter().any(|der| {
            X509Certificate::from_der(der)
                .is_ok_and(|(_, ca)| cur.verify_signature(Some(ca.public_key())).is_ok())
        });
        if !issued_here {
            return Err(refuse(
                "the presented certificate was not issued by this CA".into(),
            ));
        }
        let now = self.clock.now();
        let not_before = cur.validity().not_before.to_datetime();
        let not_after = cur.validity().not_after.to_datetime();
        if now < not_before {
            return Err(refuse(format!(
                "the presented certificate is not valid before {}; check this host's clock",
                rfc3339(not_before)
            )));
        }
        let expired = now > not_after;
        if expired && now - not_after > to_time(opts.grace) {
            return Err(refuse(format!(
                "the presented certificate expired at {} (more than the renewal grace of {} ago); enroll again with a new join token",
                rfc3339(not_after),
                secs(opts.grace)
            )));
        }
        let info = inspect_der(current_der, 0).map_err(|e| refuse(e.to_string()))?;
        let serial: Serial = info.serial.parse()?;
        if self.revocations()?.iter().any(|r| r.serial == serial) {
            return Err(refuse(format!("certificate {serial} is revoked")));
        }
        let id = info
            .spiffe_id
            .as_deref()
            .and_then(|s| SpiffeId::parse(s).ok())
            .ok_or_else(|| refuse("the presented certificate has no SPIFFE ID".into()))?;
        if id.is_reserved() {
            return Err(CaError::ReservedIdentity(id));
        }
        if expired {
            let newest = ledger::read_all(&self.dir)?
                .into_iter()
                .rev()
                .find(|e| e.spiffe_id == id);
            match newest {
                Some(e) if e.serial == serial => {}
                Some(e) => {
                    return Err(refuse(format!(
                        "the presented certificate {serial} expired at {} and a newer certificate ({}) exists for {id}; only the newest may renew after expiry; enroll again with a new join token",
                        rfc3339(not_after),
                        e.serial
                    )));
                }
                None => {
                    return Err(refuse(format!(
                        "the presented certificate {serial} is not in this CA's ledger"
                    )));
                }
            }
        }
        let csr = verify_csr(csr_der)?;
        let svid = self.sign_verified(
            &csr,
            &id,
            &info.dns_names,
            opts.ttl,
            &AuthorisedBy::Renewal(serial.clone()),
        )?;
        Ok(Renewed {
            svid,
            previous_serial: serial,
            previous_spiffe_id: id,
            in_grace: expired,
        })
    }

    fn sign_leaf(
        &self,
        public_key: &impl PublicKeyData,
        id: &SpiffeId,
        dns_names: &[String],
        ip_addresses: &[IpAddr],
        ttl: Option<Duration>,
        by: &AuthorisedBy,
    ) -> Result<SignedSvid, CaError> {
        self.check_member(id)?;
        let ttl = ttl.unwrap_or_else(|| self.default_ttl());
        self.check_ttl(ttl)?;
        let mut dns: Vec<String> = Vec::new();
        for d in dns_names {
            validate_dns_name(d)?;
            if !dns.iter().any(|x| x.eq_ignore_ascii_case(d)) {
                dns.push(d.clone());
            }
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "meshgate");
        params.subject_alt_names = vec![uri_san(&id.to_string())?];
        for d in &dns {
            let name = Ia5String::try_from(d.as_str()).map_err(|_| CaError::InvalidDnsName {
                name: d.clone(),
                reason: "not ASCII",
            })?;
            params.subject_alt_names.push(SanType::DnsName(name));
        }
        let mut ips: Vec<IpAddr> = Vec::new();
        for ip in ip_addresses {
            if !ips.contains(ip) {
                ips.push(*ip);
                params.subject_alt_names.push(SanType::IpAddress(*ip));
            }
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;

        let _lock = StateLock::exclusive(&self.dir)?;
        // Under the lock, so a concurrent `ca rotate activate` is seen before signing.
        let signer = self.signer()?;
        let (not_before, not_after, ttl_shortened) = self.validity(&signer.signing, ttl)?;
        params.not_before = not_before;
        params.not_after = not_after;
        let serial = new_serial()?;
        params.serial_number = Some(SerialNumber::from_slice(serial.as_bytes()));
        let cert = params
            .signed_by(public_key, &signer.issuer)
            .map_err(CaError::crypto("sign the certificate"))?;
        let der = cert.der().to_vec();
        let entry = LedgerEntry {
            serial,
            spiffe_id: id.clone(),
            dns_names: dns,
            ip_addresses: ips,
            not_before,
            not_after,
            issued_at: self.clock.now(),
            authorised_by: by.to_string(),
            sha256_fingerprint: sha256_fingerprint(&der),
            issuer_sha256: Some(sha256_fingerprint(&signer.signing.der)),
        };
        ledger::append(&self.dir, &entry)?;
        let cert_pem = der_to_pem("CERTIFICATE", &der);
        let mut chain_pem = cert_pem.clone();
        for i in &signer.intermediates {
            chain_pem.push_str(&der_to_pem("CERTIFICATE", i));
        }
        Ok(SignedSvid {
            cert_der: der,
            cert_pem,
            chain_pem,
            entry,
            ttl_shortened,
        })
    }

    /// Every certificate issued, oldest first.
    pub fn ledger(&self) -> Result<Vec<LedgerEntry>, CaError> {
        Ok(ledger::read_all(&self.dir)?)
    }

    /// Ledger entries with their status now.
    pub fn certificates(&self) -> Result<Vec<CertStatus>, CaError> {
        let now = self.clock.now();
        let revs = self.revocations()?;
        Ok(self
            .ledger()?
            .into_iter()
            .map(|entry| {
                let rev = revs.iter().find(|r| r.serial == entry.serial);
                let status = if rev.is_some() {
                    "revoked"
                } else if now >= entry.not_after {
                    "expired"
                } else if now < entry.not_before {
                    "not-yet-valid"
                } else {
                    "valid"
                };
                CertStatus {
                    entry,
                    status,
                    revocation_reason: rev.map(|r| r.reason),
                }
            })
            .collect())
    }

    fn load_revocations(&self) -> Result<RevocationsFile, StoreError> {
        let path = self.dir.revocations();
        match fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| StoreError::corrupt(&path, e)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(RevocationsFile {
                version: 1,
                ..Default::default()
            }),
            Err(e) => Err(StoreError::read(&path, e)),
        }
    }

    pub fn revocations(&self) -> Result<Vec<Revocation>, CaError> {
        Ok(self.load_revocations()?.revoked)
    }

    /// Revoke `serial` (which must be in the ledger) and publish a new CRL. Revoking a revoked
    /// serial publishes the CRL again (useful after a crash between the two writes) and keeps
    /// the first revocation's time and reason.
    pub fn revoke(
        &self,
        serial: &Serial,
        reason: RevocationReason,
    ) -> Result<RevokeOutcome, CaError> {
        let _lock = StateLock::exclusive(&self.dir)?;
        let mut revs = self.load_revocations()?;
        let (revocation, already_revoked) = match revs.revoked.iter().find(|r| &r.serial == serial)
        {
            Some(r) => (r.clone(), true),
            None => {
                let entry = ledger::read_all(&self.dir)?
                    .into_iter()
                    .find(|e| &e.serial == serial)
                    .ok_or_else(|| CaError::UnknownSerial(serial.to_string()))?;
                let r = Revocation {
                    serial: serial.clone(),
                    spiffe_id: entry.spiffe_id,
                    reason,
                    revoked_at: self.clock.now(),
                    not_after: entry.not_after,
                };
                revs.revoked.push(r.clone());
                (r, false)
            }
        };
        let crl_number = self.publish_crl_locked(revs)?;
        Ok(RevokeOutcome {
            revocation,
            already_revoked,
            crl_number,
        })
    }

    /// Publish a fresh CRL (new number, new nextUpdate) from the recorded revocations. The
    /// running control plane calls this well before nextUpdate; operators can with `ca crl`.
    pub fn publish_crl(&self) -> Result<u64, CaError> {
        let _lock = StateLock::exclusive(&self.dir)?;
        let revs = self.load_revocations()?;
        self.publish_crl_locked(revs)
    }

    /// Publish a fresh CRL if the current one is past half of its validity (thisUpdate to
    /// nextUpdate), or missing or unreadable. Verifiers enforce nextUpdate (an expired CRL
    /// fails closed), so a running control plane calls this periodically: the new CRL is out
    /// half a validity period before the old one would expire. Returns the new CRL number.
    pub fn republish_crl_if_due(&self) -> Result<Option<u64>, CaError> {
        let now = self.clock.now();
        let due = |pem: Option<Vec<u8>>| match pem.as_deref().and_then(crl_window) {
            Some((this, next)) => now >= this + (next - this) / 2,
            None => true,
        };
        if !due(fs::read(self.dir.crl()).ok()) {
            return Ok(None);
        }
        let _lock = StateLock::exclusive(&self.dir)?;
        // Another process may have published while we waited for the lock.
        if !due(fs::read(self.dir.crl()).ok()) {
            return Ok(None);
        }
        let revs = self.load_revocations()?;
        self.publish_crl_locked(revs).map(Some)
    }

    /// Bump the CRL number, persist the revocations, then write `crl.pem`. Caller holds the lock.
    fn publish_crl_locked(&self, mut revs: RevocationsFile) -> Result<u64, CaError> {
        let signer = self.signer()?;
        let now = self.clock.now();
        revs.version = 1;
        revs.crl_number += 1;
        let params = CertificateRevocationListParams {
            this_update: now - CA_BACKDATE,
            next_update: now + to_time(Duration::from_secs(self.config.crl_validity_secs)),
            crl_number: SerialNumber::from(revs.crl_number),
            issuing_distribution_point: None,
            revoked_certs: revs
                .revoked
                .iter()
                .filter(|r| r.not_after > now)
                .map(|r| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(r.serial.as_bytes()),
                    revocation_time: r.revoked_at,
                    reason_code: Some(r.reason.to_rcgen()),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: signer.signing.key_id.clone(),
        };
        let crl = params
            .signed_by(&signer.issuer)
            .map_err(CaError::crypto("sign the CRL"))?;
        let mut pem = crl.pem().map_err(CaError::crypto("encode the CRL"))?;
        // While a rotation is active, SVIDs of the old root are still in use: a verifier that
        // requires a CRL for every leaf's issuer needs one signed by the old root as well.
        if self.config.mode == CaMode::Root
            && signer.rotation.as_ref().map(|r| r.phase) == Some(RotationPhase::Active)
        {
            let (old, old_signing, _) = load_issuer(&self.dir.root_cert(), &self.dir.root_key())?;
            let mut old_params = params;
            old_params.key_identifier_method = old_signing.key_id.clone();
            let old_crl = old_params
                .signed_by(&old)
                .map_err(CaError::crypto("sign the CRL with the old root"))?;
            pem.push_str(&old_crl.pem().map_err(CaError::crypto("encode the CRL"))?);
        }
        let path = self.dir.revocations();
        let mut json =
            serde_json::to_vec_pretty(&revs).map_err(|e| StoreError::corrupt(&path, e))?;
        json.push(b'\n');
        state::write_atomic(&path, &json, mode::PUBLIC)?;
        state::write_atomic(&self.dir.crl(), pem.as_bytes(), mode::PUBLIC)?;
        Ok(revs.crl_number)
    }

    /// The published CRL (PEM).
    pub fn crl_pem(&self) -> Result<String, CaError> {
        let path = self.dir.crl();
        let b = read_file(&path)?;
        Ok(String::from_utf8(b).map_err(|e| StoreError::corrupt(&path, e))?)
    }

    /// This trust domain's bundle. The sequence is bumped (under the lock) if the trust anchors
    /// differ from the ones it was last bumped for.
    pub fn bundle(&self) -> Result<TrustBundle, CaError> {
        let signer = self.signer()?;
        let fps = BundleState::fingerprints(&signer.anchors);
        let current = BundleState::load(&self.dir)?;
        let sequence = match current {
            Some(s) if s.authorities == fps => s.sequence,
            _ => {
                let _lock = StateLock::exclusive(&self.dir)?;
                let prev = BundleState::load(&self.dir)?.unwrap_or_default();
                if prev.authorities == fps {
                    prev.sequence
                } else {
                    let next = BundleState {
                        sequence: prev.sequence + 1,
                        authorities: fps,
                    };
                    next.save(&self.dir)?;
                    next.sequence
                }
            }
        };
        Ok(TrustBundle {
            trust_domain: self.config.trust_domain.clone(),
            x509_authorities: signer.anchors.clone(),
            sequence,
            refresh_hint_secs: self.config.bundle_refresh_hint_secs,
        })
    }

    /// The join-token table.
    pub fn tokens(&self) -> TokenStore {
        TokenStore::new(self.dir.clone(), self.clock.clone())
    }

    /// Create a join token for an identity in this trust domain.
    pub fn create_token(
        &self,
        spiffe_id: &SpiffeId,
        ttl: Duration,
    ) -> Result<(JoinToken, TokenRecord), CaError> {
        self.check_member(spiffe_id)?;
        if spiffe_id.is_reserved() {
            return Err(CaError::ReservedIdentity(spiffe_id.clone()));
        }
        if ttl.as_secs() == 0 {
            return Err(CaError::InvalidTtl(
                "a join token needs a TTL of at least 1s".into(),
            ));
        }
        if ttl > MAX_TOKEN_TTL {
            return Err(CaError::TtlTooLong {
                requested: secs(ttl),
                max: secs(MAX_TOKEN_TTL),
            });
        }
        Ok(self.tokens().create(spiffe_id, to_time(ttl))?)
    }

    /// The rotation in progress, if any.
    pub fn rotation(&self) -> Result<Option<RotationState>, CaError> {
        read_rotation(&self.dir)
    }

    /// `ca rotate prepare`: create a new root and publish it in the bundle next to the current
    /// one; issuance stays on the current key. Root mode only. Writes the key, then the
    /// certificate, then `rotation.json` (its presence marks the step done; a crash before it
    /// leaves files the next `prepare` overwrites).
    pub fn rotate_prepare(&self, ca_ttl: Option<Duration>) -> Result<RotationState, CaError> {
        if self.config.mode != CaMode::Root {
            return Err(CaError::Rotation(
                "this CA is an intermediate under an operator's root: rotate it by issuing a new intermediate from your root and running `meshgate ca init` in a new state directory".into(),
            ));
        }
        let state = {
            let _lock = StateLock::exclusive(&self.dir)?;
            if let Some(r) = read_rotation(&self.dir)? {
                return Err(CaError::Rotation(format!(
                    "a rotation is already in progress (phase {}, prepared at {}); continue with `meshgate ca rotate {}`",
                    r.phase,
                    rfc3339(r.prepared_at),
                    if r.phase == RotationPhase::Prepared {
                        "activate"
                    } else {
                        "retire"
                    }
                )));
            }
            let now = self.clock.now();
            let ttl = ca_ttl.unwrap_or(DEFAULT_ROOT_TTL);
            if ttl <= self.max_ttl() {
                return Err(CaError::InvalidTtl(format!(
                    "the new root's TTL {} must be longer than the maximum SVID TTL {}",
                    secs(ttl),
                    secs(self.max_ttl())
                )));
            }
            let old = pem_certificates(&read_file(&self.dir.root_cert())?)
                .map_err(|e| StoreError::corrupt(self.dir.root_cert(), e))?;
            let td = &self.config.trust_domain;
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                .map_err(CaError::crypto("generate the new root key"))?;
            let mut params = CertificateParams::default();
            // A distinct subject, so chain building never confuses the two roots.
            params.distinguished_name =
                ca_distinguished_name(td, &format!("root {}", now.unix_timestamp()));
            params.subject_alt_names = vec![uri_san(&td.id_string())?];
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            params.serial_number = Some(SerialNumber::from_slice(new_serial()?.as_bytes()));
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.not_before = now - CA_BACKDATE;
            params.not_after = now + to_time(ttl);
            let cert = params
                .self_signed(&key)
                .map_err(CaError::crypto("self-sign the new root"))?;
            state::write_atomic(
                &self.dir.next_root_key(),
                key.serialize_pem().as_bytes(),
                mode::SECRET,
            )?;
            state::write_atomic(
                &self.dir.next_root_cert(),
                cert.pem().as_bytes(),
                mode::PUBLIC,
            )?;
            let r = RotationState {
                version: 1,
                phase: RotationPhase::Prepared,
                previous_sha256: old
                    .first()
                    .map(|d| sha256_fingerprint(d))
                    .unwrap_or_default(),
                next_sha256: sha256_fingerprint(cert.der()),
                prepared_at: now,
                activated_at: None,
            };
            write_rotation(&self.dir, &r)?;
            r
        };
        self.bundle()?;
        Ok(state)
    }

    /// `ca rotate activate`: issue with the new key from now on (both roots stay published).
    /// Refused before one bundle refresh hint has passed since `prepare` (peers may not have
    /// the new root yet) unless `force`.
    pub fn rotate_activate(&self, force: bool) -> Result<RotationState, CaError> {
        let _lock = StateLock::exclusive(&self.dir)?;
        let mut r = read_rotation(&self.dir)?.ok_or_else(|| {
            CaError::Rotation(
                "no rotation in progress; start one with `meshgate ca rotate prepare`".into(),
            )
        })?;
        if r.phase != RotationPhase::Prepared {
            return Err(CaError::Rotation(format!(
                "the new root is already active (phase {}); next: `meshgate ca rotate retire`",
                r.phase
            )));
        }
        let now = self.clock.now();
        let hint = time::Duration::seconds(
            i64::try_from(self.config.bundle_refresh_hint_secs).unwrap_or(i64::MAX),
        );
        if !force && now - r.prepared_at < hint {
            return Err(CaError::Rotation(format!(
                "the new root was published at {}; federated peers poll every {}s, so wait until {} before activating (or pass --force)",
                rfc3339(r.prepared_at),
                self.config.bundle_refresh_hint_secs,
                rfc3339(r.prepared_at + hint)
            )));
        }
        r.phase = RotationPhase::Active;
        r.activated_at = Some(now);
        write_rotation(&self.dir, &r)?;
        // The new key's SVIDs need a CRL from it (and the old root's keep theirs).
        let revs = self.load_revocations()?;
        self.publish_crl_locked(revs)?;
        Ok(r)
    }

    /// Unexpired, unrevoked SVIDs signed by the root being replaced (entries without an
    /// issuer were written before rotation existed and count as the old root's).
    fn dependents(&self, r: &RotationState) -> Result<(usize, Option<OffsetDateTime>), CaError> {
        let now = self.clock.now();
        let revoked = self.revocations()?;
        let mut count = 0;
        let mut latest: Option<OffsetDateTime> = None;
        for e in self.ledger()? {
            let old = match &e.issuer_sha256 {
                Some(i) => *i == r.previous_sha256,
                None => true,
            };
            if old && e.not_after > now && !revoked.iter().any(|x| x.serial == e.serial) {
                count += 1;
                latest = Some(latest.map_or(e.not_after, |l| l.max(e.not_after)));
            }
        }
        Ok((count, latest))
    }

    /// `ca rotate retire`: drop the old root from the bundle and make the new one `root.pem`.
    /// Refused while an unexpired SVID signed by the old root exists, unless `force`.
    /// Crash-safe: `rotation.json` says `retiring` before the new root is copied over
    /// `root.pem`/`root-key.pem`, and is removed last; running `retire` again finishes.
    pub fn rotate_retire(&self, force: bool) -> Result<RetireOutcome, CaError> {
        let outcome = {
            let _lock = StateLock::exclusive(&self.dir)?;
            let mut r = read_rotation(&self.dir)?.ok_or_else(|| {
                CaError::Rotation(
                    "no rotation in progress; start one with `meshgate ca rotate prepare`".into(),
                )
            })?;
            let (count, latest) = match r.phase {
                RotationPhase::Prepared => {
                    return Err(CaError::Rotation(
                        "the new root is not active yet; run `meshgate ca rotate activate` first"
                            .into(),
                    ));
                }
                RotationPhase::Active => {
                    let (count, latest) = self.dependents(&r)?;
                    if count > 0 && !force {
                        return Err(CaError::RetireRefused {
                            count,
                            latest_expiry: latest.map(rfc3339).unwrap_or_default(),
                        });
                    }
                    r.phase = RotationPhase::Retiring;
                    write_rotation(&self.dir, &r)?;
                    (count, latest)
                }
                RotationPhase::Retiring => (0, None),
            };
            let key = read_file(&self.dir.next_root_key())?;
            let cert = read_file(&self.dir.next_root_cert())?;
            state::write_atomic(&self.dir.root_key(), &key, mode::SECRET)?;
            state::write_atomic(&self.dir.root_cert(), &cert, mode::PUBLIC)?;
            let remove = |p: PathBuf| match fs::remove_file(&p) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(StoreError::read(&p, e)),
            };
            remove(self.dir.rotation())?;
            fs::File::open(self.dir.ca_dir())
                .and_then(|d| d.sync_all())
                .map_err(|e| StoreError::read(self.dir.ca_dir(), e))?;
            // Left over, these are ignored (no rotation.json) and overwritten by `prepare`.
            let _ = remove(self.dir.next_root_key());
            let _ = remove(self.dir.next_root_cert());
            // The CRL from the new root only.
            let revs = self.load_revocations()?;
            self.publish_crl_locked(revs)?;
            RetireOutcome {
                dependent_svids: count,
                latest_expiry: latest,
                forced: count > 0,
                root_sha256: r.next_sha256.clone(),
            }
        };
        self.bundle()?;
        Ok(outcome)
    }

    pub fn summary(&self) -> Result<CaSummary, CaError> {
        let corrupt = |e| StoreError::corrupt(self.dir.ca_dir(), e);
        let signer = self.signer()?;
        let signing_certificate = inspect_der(&signer.signing.der, 0).map_err(corrupt)?;
        let roots = signer
            .anchors
            .iter()
            .enumerate()
            .map(|(i, d)| {
                inspect_der(d, i).map_err(|e| StoreError::corrupt(self.dir.root_cert(), e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(CaSummary {
            state_dir: self.dir.root().display().to_string(),
            trust_domain: self.config.trust_domain.to_string(),
            mode: self.config.mode,
            signing_certificate,
            roots,
            default_ttl: secs(self.default_ttl()),
            max_ttl: secs(self.max_ttl()),
            crl_validity: secs(Duration::from_secs(self.config.crl_validity_secs)),
            rotation: signer.rotation.clone(),
            bundle_sequence: BundleState::load(&self.dir)?
                .map(|s| s.sequence)
                .unwrap_or(0),
            issued_total: self.ledger()?.len(),
            revoked_total: self.revocations()?.len(),
        })
    }
}

/// thisUpdate and nextUpdate of a PEM CRL; `None` if it is not one or has no nextUpdate.
fn crl_window(pem: &[u8]) -> Option<(OffsetDateTime, OffsetDateTime)> {
    use rustls::pki_types::CertificateRevocationListDer;
    use rustls::pki_types::pem::PemObject;
    let der = CertificateRevocationListDer::from_pem_slice(pem).ok()?;
    let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(&der).ok()?;
    Some((
        crl.last_update().to_datetime(),
        crl.next_update()?.to_datetime(),
    ))
}

fn read_config(sd: &StateDir) -> Result<CaConfig, CaError> {
    let path = sd.config();
    match fs::read(&path) {
        Ok(b) => Ok(serde_json::from_slice(&b).map_err(|e| StoreError::corrupt(&path, e))?),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(CaError::NotInitialised {
            dir: sd.root().to_path_buf(),
        }),
        Err(e) => Err(StoreError::read(&path, e).into()),
    }
}

fn validate_init(opts: &InitOptions) -> Result<(), CaError> {
    let bad = |m: String| Err(CaError::InvalidTtl(m));
    if opts.default_ttl.as_secs() == 0 || opts.max_ttl.as_secs() == 0 {
        return bad("the default and maximum SVID TTL must be at least 1s".into());
    }
    if opts.default_ttl > opts.max_ttl {
        return bad(format!(
            "the default SVID TTL {} is longer than the maximum {}",
            secs(opts.default_ttl),
            secs(opts.max_ttl)
        ));
    }
    if let Some(ca) = opts.ca_ttl
        && ca <= opts.max_ttl
    {
        return bad(format!(
            "the CA TTL {} must be longer than the maximum SVID TTL {}",
            secs(ca),
            secs(opts.max_ttl)
        ));
    }
    if opts.crl_validity.as_secs() < 60 {
        return bad("the CRL validity must be at least 1m".into());
    }
    Ok(())
}

/// The operator root must be a CA certificate that may sign an intermediate and is valid now.
/// Returns its DER and expiry.
fn check_operator_root(
    root: &OperatorRoot,
    now: OffsetDateTime,
) -> Result<(Vec<u8>, OffsetDateTime), CaError> {
    let e = |m: String| CaError::OperatorRoot(m);
    let ders = pem_certificates(root.cert_pem.as_bytes())
        .map_err(|err| e(format!("root certificate: {err}")))?;
    let der = ders[0].clone();
    let (_, cert) = X509Certificate::from_der(&der)
        .map_err(|err| e(format!("cannot parse the root certificate: {err}")))?;
    match cert.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {
            if bc.value.path_len_constraint == Some(0) {
                return Err(e(
                    "the root's pathLenConstraint is 0, so it cannot sign an intermediate".into(),
                ));
            }
        }
        _ => {
            return Err(e(
                "the root certificate is not a CA (basicConstraints CA:TRUE is missing)".into(),
            ));
        }
    }
    if let Ok(Some(ku)) = cert.key_usage()
        && !ku.value.key_cert_sign()
    {
        return Err(e("the root certificate's keyUsage lacks keyCertSign".into()));
    }
    let not_before = cert.validity().not_before.to_datetime();
    let not_after = cert.validity().not_after.to_datetime();
    if now < not_before || now >= not_after {
        return Err(e(format!(
            "the root certificate is not valid now (valid {} to {})",
            rfc3339(not_before),
            rfc3339(not_after)
        )));
    }
    Ok((der, not_after))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::FixedClock;
    use crate::error::TokenError;

    struct Fixture {
        _dir: tempfile::TempDir,
        ca: Ca,
        clock: Arc<FixedClock>,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(FixedClock::at_system_now());
        let opts = InitOptions::new(TrustDomain::parse("example.org").expect("td"));
        let ca = Ca::init(&dir.path().join("state"), &opts, clock.clone()).expect("init");
        Fixture {
            _dir: dir,
            ca,
            clock,
        }
    }

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).expect("id")
    }

    fn req(s: &str) -> IssueRequest {
        IssueRequest {
            spiffe_id: id(s),
            dns_names: vec![],
            ttl: None,
            authorised_by: AuthorisedBy::Operator("test".into()),
        }
    }

    #[test]
    fn issued_svid_follows_the_x509_svid_profile() {
        let f = fixture();
        let mut r = req("spiffe://example.org/ns/web");
        r.dns_names = vec!["web.internal".into()];
        let svid = f.ca.issue(&r).expect("issue");
        let info = &crate::inspect::inspect_pem(svid.cert_pem.as_bytes()).expect("parse")[0];
        assert_eq!(
            info.spiffe_id.as_deref(),
            Some("spiffe://example.org/ns/web")
        );
        assert_eq!(info.uris.len(), 1);
        assert_eq!(info.dns_names, vec!["web.internal"]);
        assert!(!info.is_ca);
        assert_eq!(info.key_usage, vec!["digital_signature"]);
        assert!(info.key_usage_critical);
        assert_eq!(info.extended_key_usage, vec!["server_auth", "client_auth"]);
        assert_eq!(info.public_key, "EC P-256");
        assert_eq!(info.serial, svid.entry.serial.to_string());
        assert_eq!(
            info.not_after - info.not_before,
            to_time(DEFAULT_SVID_TTL + BACKDATE)
        );
        // Signed by the CA.
        let ders = pem_certificates(svid.cert_pem.as_bytes()).expect("pem");
        let (_, leaf) = X509Certificate::from_der(&ders[0]).expect("leaf");
        let signing_der = f.ca.signing_cert_der();
        let (_, ca) = X509Certificate::from_der(&signing_der).expect("ca");
        leaf.verify_signature(Some(ca.public_key()))
            .expect("signature");
        // Recorded.
        assert_eq!(f.ca.ledger().expect("ledger"), vec![svid.entry.clone()]);
        assert_eq!(svid.entry.authorised_by, "operator:test");
        assert!(
            !format!("{svid:?}").contains("PRIVATE KEY"),
            "Debug leaks the key"
        );
    }

    #[test]
    fn refuses_other_trust_domains_long_ttls_and_bad_dns() {
        let f = fixture();
        assert!(matches!(
            f.ca.issue(&req("spiffe://other.org/web")),
            Err(CaError::ForeignTrustDomain { .. })
        ));
        let mut r = req("spiffe://example.org/web");
        r.ttl = Some(Duration::from_secs(25 * 3600));
        assert!(matches!(f.ca.issue(&r), Err(CaError::TtlTooLong { .. })));
        r.ttl = Some(Duration::ZERO);
        assert!(matches!(f.ca.issue(&r), Err(CaError::InvalidTtl(_))));
        r.ttl = None;
        for bad in ["", "a..b", "-a.b", "a_b.c", "é.com", "a.b."] {
            r.dns_names = vec![bad.into()];
            assert!(
                matches!(f.ca.issue(&r), Err(CaError::InvalidDnsName { .. })),
                "{bad:?}"
            );
        }
        r.dns_names = vec!["*.example.org".into()];
        f.ca.issue(&r).expect("wildcard allowed");
        assert_eq!(
            f.ca.ledger().expect("ledger").len(),
            1,
            "refusals are not recorded"
        );
    }

    #[test]
    fn never_outlives_the_ca() {
        let f = fixture();
        // Move to one hour before the CA expires and ask for 2h.
        f.clock.set(f.ca.not_after() - time::Duration::hours(1));
        let mut r = req("spiffe://example.org/web");
        r.ttl = Some(Duration::from_secs(7200));
        let svid = f.ca.issue(&r).expect("issue");
        assert!(svid.ttl_shortened);
        assert_eq!(svid.entry.not_after, f.ca.not_after());
        f.clock.set(f.ca.not_after());
        assert!(matches!(f.ca.issue(&r), Err(CaError::CaExpired { .. })));
    }

    #[test]
    fn init_refuses_existing_ca_and_foreign_dirs() {
        let f = fixture();
        let opts = InitOptions::new(TrustDomain::parse("example.org").expect("td"));
        assert!(matches!(
            Ca::init(f.ca.state_dir(), &opts, f.clock.clone()),
            Err(CaError::AlreadyInitialised { .. })
        ));
        let d = tempfile::tempdir().expect("tempdir");
        fs::write(d.path().join("notes.txt"), b"mine").expect("write");
        assert!(matches!(
            Ca::init(d.path(), &opts, f.clock.clone()),
            Err(CaError::ForeignDir { .. })
        ));
        let empty = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            Ca::open(&empty.path().join("nope")),
            Err(CaError::NotInitialised { .. })
        ));
    }

    #[test]
    fn reopens_with_the_same_key_and_refuses_a_readable_key() {
        let f = fixture();
        let again = Ca::open(f.ca.state_dir()).expect("open");
        assert_eq!(again.signing_cert_der(), f.ca.signing_cert_der());
        let key = StateDir::new(f.ca.state_dir()).root_key();
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(matches!(
            Ca::open(f.ca.state_dir()),
            Err(CaError::InsecureKey { .. })
        ));
    }

    fn csr_for(san: Option<&str>, dns: &[&str]) -> (KeyPair, Vec<u8>) {
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::default();
        if let Some(u) = san {
            p.subject_alt_names
                .push(SanType::URI(Ia5String::try_from(u).expect("ia5")));
        }
        for d in dns {
            p.subject_alt_names
                .push(SanType::DnsName(Ia5String::try_from(*d).expect("ia5")));
        }
        let csr = p.serialize_request(&key).expect("csr");
        (key, csr.der().to_vec())
    }

    #[test]
    fn sign_csr_enforces_identity_and_signature() {
        let f = fixture();
        let web = id("spiffe://example.org/web");
        fn mk<'a>(der: &'a [u8], web: &SpiffeId) -> CsrRequest<'a> {
            CsrRequest {
                csr_der: der,
                spiffe_id: web.clone(),
                allowed_dns_names: vec!["web.internal".into()],
                ttl: Some(Duration::from_secs(600)),
                authorised_by: AuthorisedBy::Operator("test".into()),
            }
        }
        let (key, der) = csr_for(Some("spiffe://example.org/web"), &["web.internal"]);
        let svid = f.ca.sign_csr(&mk(&der, &web)).expect("sign");
        let (_, leaf) = X509Certificate::from_der(&svid.cert_der).expect("leaf");
        assert_eq!(
            leaf.public_key().raw,
            key.subject_public_key_info().as_slice()
        );
        assert_eq!(svid.entry.dns_names, vec!["web.internal"]);

        let (_, no_san) = csr_for(None, &[]);
        f.ca.sign_csr(&mk(&no_san, &web))
            .expect("identity from the request");

        let (_, other) = csr_for(Some("spiffe://example.org/db"), &[]);
        assert!(matches!(
            f.ca.sign_csr(&mk(&other, &web)),
            Err(CaError::Csr(CsrError::IdentityMismatch { .. }))
        ));
        let (_, dns) = csr_for(None, &["db.internal"]);
        assert!(matches!(
            f.ca.sign_csr(&mk(&dns, &web)),
            Err(CaError::Csr(CsrError::DnsNotAuthorised(_)))
        ));
        let mut tampered = der.clone();
        let n = tampered.len();
        tampered[n - 5] ^= 0x55;
        assert!(matches!(
            f.ca.sign_csr(&mk(&tampered, &web)),
            Err(CaError::Csr(
                CsrError::BadSignature | CsrError::Malformed(_)
            ))
        ));
        assert!(matches!(
            f.ca.sign_csr(&mk(b"junk", &web)),
            Err(CaError::Csr(CsrError::Malformed(_)))
        ));
    }

    #[test]
    fn enroll_spends_the_token_once_and_not_on_a_bad_csr() {
        let f = fixture();
        let vm = id("spiffe://example.org/vm/1");
        let (token, _) =
            f.ca.create_token(&vm, Duration::from_secs(600))
                .expect("token");
        let (_, wrong) = csr_for(Some("spiffe://example.org/vm/2"), &[]);
        assert!(matches!(
            f.ca.enroll(&token, &vm, &wrong, None),
            Err(CaError::Csr(_))
        ));
        let (_, good) = csr_for(Some("spiffe://example.org/vm/1"), &[]);
        let svid = f.ca.enroll(&token, &vm, &good, None).expect("enroll");
        assert_eq!(
            svid.entry.authorised_by,
            format!("token:{}", token.id().expect("id"))
        );
        assert!(matches!(
            f.ca.enroll(&token, &vm, &good, None),
            Err(CaError::Token(TokenError::AlreadyUsed { .. }))
        ));

        // Renewal with the SVID just issued.
        let (_, csr) = csr_for(None, &[]);
        let renewed = f.ca.renew(&svid.cert_der, &csr, None).expect("renew");
        assert_eq!(renewed.entry.spiffe_id, vm);
        assert_eq!(
            renewed.entry.authorised_by,
            format!("renewal:{}", svid.entry.serial)
        );
        f.ca.revoke(&svid.entry.serial, RevocationReason::Superseded)
            .expect("revoke");
        assert!(
            f.ca.renew(&svid.cert_der, &csr, None).is_err(),
            "revoked SVIDs cannot renew"
        );
        f.clock.advance(DEFAULT_SVID_TTL + Duration::from_secs(1));
        assert!(
            f.ca.renew(&renewed.cert_der, &csr, None).is_err(),
            "expired SVIDs cannot renew"
        );
    }

    #[test]
    fn renewal_grace_admits_only_the_newest_expired_svid() {
        let f = fixture();
        let vm = id("spiffe://example.org/vm/g");
        let mut r = req("spiffe://example.org/vm/g");
        r.ttl = Some(Duration::from_secs(600));
        let a = f.ca.issue(&r).expect("a");
        let a_der = pem_certificates(a.cert_pem.as_bytes()).expect("pem")[0].clone();
        let (_, csr) = csr_for(None, &[]);
        let grace = |g: u64| RenewOptions {
            ttl: None,
            grace: Duration::from_secs(g),
        };
        // 100 s past expiry.
        f.clock.advance(Duration::from_secs(700));
        assert!(matches!(
            f.ca.renew_with(&a_der, &csr, &grace(0)),
            Err(CaError::RenewalRefused(_))
        ));
        assert!(matches!(
            f.ca.renew_with(&a_der, &csr, &grace(99)),
            Err(CaError::RenewalRefused(_))
        ));
        let b =
            f.ca.renew_with(&a_der, &csr, &grace(100))
                .expect("within grace");
        assert!(b.in_grace);
        assert_eq!(b.previous_serial, a.entry.serial);
        assert_eq!(b.svid.entry.spiffe_id, vm);
        // A is no longer the newest for its identity.
        let e =
            f.ca.renew_with(&a_der, &csr, &grace(3600))
                .expect_err("superseded");
        assert!(e.to_string().contains("newer certificate"), "{e}");
        // B is valid: renews without grace, and not "in grace".
        let c =
            f.ca.renew_with(&b.svid.cert_der, &csr, &grace(0))
                .expect("valid");
        assert!(!c.in_grace);
        // A revoked newest SVID cannot use the grace either.
        f.ca.revoke(&c.svid.entry.serial, RevocationReason::KeyCompromise)
            .expect("revoke");
        f.clock.advance(DEFAULT_SVID_TTL + Duration::from_secs(10));
        assert!(
            f.ca.renew_with(&c.svid.cert_der, &csr, &grace(86_400))
                .is_err()
        );
    }

    #[test]
    fn reserved_identities_get_no_token_enrollment_or_renewal() {
        let f = fixture();
        let server = id("spiffe://example.org/meshgate/enrollment");
        assert!(server.is_reserved() && id("spiffe://example.org/meshgate").is_reserved());
        assert!(!id("spiffe://example.org/meshgatex/a").is_reserved());
        assert!(matches!(
            f.ca.create_token(&server, Duration::from_secs(60)),
            Err(CaError::ReservedIdentity(_))
        ));
        let vm = id("spiffe://example.org/vm/1");
        let (token, _) =
            f.ca.create_token(&vm, Duration::from_secs(60))
                .expect("token");
        let (_, csr) = csr_for(None, &[]);
        assert!(matches!(
            f.ca.enroll(&token, &server, &csr, None),
            Err(CaError::ReservedIdentity(_))
        ));
        // An operator may issue one (offline), but it cannot renew over the network.
        let svid =
            f.ca.issue(&req("spiffe://example.org/meshgate/enrollment"))
                .expect("operator issue");
        let der = pem_certificates(svid.cert_pem.as_bytes()).expect("pem")[0].clone();
        assert!(matches!(
            f.ca.renew(&der, &csr, None),
            Err(CaError::ReservedIdentity(_))
        ));
    }

    #[test]
    fn revoke_publishes_a_crl_listing_the_serial() {
        let f = fixture();
        let svid = f.ca.issue(&req("spiffe://example.org/web")).expect("issue");
        let first_crl = f.ca.crl_pem().expect("initial crl");
        let out =
            f.ca.revoke(&svid.entry.serial, RevocationReason::KeyCompromise)
                .expect("revoke");
        assert!(!out.already_revoked);
        assert_eq!(out.crl_number, 2);
        let pem = f.ca.crl_pem().expect("crl");
        assert_ne!(pem, first_crl);
        let der = &x509_parser::pem::parse_x509_pem(pem.as_bytes())
            .expect("pem")
            .1
            .contents;
        let (_, crl) =
            x509_parser::revocation_list::CertificateRevocationList::from_der(der).expect("crl");
        let listed: Vec<_> = crl
            .iter_revoked_certificates()
            .map(|r| Serial::from_bytes(r.raw_serial()))
            .collect();
        assert_eq!(listed, vec![svid.entry.serial.clone()]);
        let signing_der = f.ca.signing_cert_der();
        let (_, ca) = X509Certificate::from_der(&signing_der).expect("ca");
        crl.verify_signature(ca.public_key())
            .expect("CRL signed by the CA");
        assert!(crl.next_update().is_some());

        let again =
            f.ca.revoke(&svid.entry.serial, RevocationReason::Unspecified)
                .expect("again");
        assert!(again.already_revoked);
        assert_eq!(again.revocation.reason, RevocationReason::KeyCompromise);
        assert_eq!(again.crl_number, 3);
        assert!(matches!(
            f.ca.revoke(
                &"01".parse().expect("serial"),
                RevocationReason::Unspecified
            ),
            Err(CaError::UnknownSerial(_))
        ));
        let st = f.ca.certificates().expect("list");
        assert_eq!(st[0].status, "revoked");
    }

    #[test]
    fn crl_is_republished_past_half_its_validity() {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(FixedClock::at_system_now());
        let opts = InitOptions::new(TrustDomain::parse("example.org").expect("td"));
        let ca = Ca::init(&dir.path().join("state"), &opts, clock.clone()).expect("init");
        let first = ca.crl_pem().expect("crl");
        assert_eq!(ca.republish_crl_if_due().expect("check"), None);
        // 7 days of validity: not due after 3 days, due after 4.
        clock.advance(Duration::from_secs(3 * 86_400));
        assert_eq!(ca.republish_crl_if_due().expect("check"), None);
        clock.advance(Duration::from_secs(86_400));
        assert_eq!(ca.republish_crl_if_due().expect("republish"), Some(2));
        let second = ca.crl_pem().expect("crl");
        assert_ne!(first, second);
        let (this, next) = crl_window(second.as_bytes()).expect("window");
        assert!(
            next - clock.now() > time::Duration::days(6),
            "{this} {next}"
        );
        assert_eq!(ca.republish_crl_if_due().expect("check"), None);
        // A damaged crl.pem is replaced at once.
        std::fs::write(dir.path().join("state/crl.pem"), "junk").expect("write");
        assert_eq!(ca.republish_crl_if_due().expect("republish"), Some(3));
    }

    #[test]
    fn bundle_sequence_bumps_only_on_change() {
        let f = fixture();
        let b = f.ca.bundle().expect("bundle");
        assert_eq!(b.sequence, 1);
        assert_eq!(f.ca.bundle().expect("again").sequence, 1);
        let json = b.to_spiffe_json().expect("jwks");
        let k = &json["keys"][0];
        assert_eq!(k["use"], "x509-svid");
        assert_eq!(k["kty"], "EC");
        assert_eq!(k["crv"], "P-256");
        assert_eq!(k["x5c"].as_array().expect("x5c").len(), 1);
        // Replace the anchor behind the CA's back: the sequence moves.
        let sd = StateDir::new(f.ca.state_dir());
        let other = fixture();
        fs::copy(
            StateDir::new(other.ca.state_dir()).root_cert(),
            sd.root_cert(),
        )
        .expect("copy");
        fs::copy(
            StateDir::new(other.ca.state_dir()).root_key(),
            sd.root_key(),
        )
        .expect("copy");
        let reopened = Ca::open(f.ca.state_dir()).expect("open");
        assert_eq!(reopened.bundle().expect("bundle").sequence, 2);
    }

    fn signed_by(cert_pem: &str, root_der: &[u8]) -> bool {
        let der = pem_certificates(cert_pem.as_bytes()).expect("pem")[0].clone();
        let (_, leaf) = X509Certificate::from_der(&der).expect("leaf");
        let (_, root) = X509Certificate::from_der(root_der).expect("root");
        leaf.verify_signature(Some(root.public_key())).is_ok()
    }

    #[test]
    fn rotation_prepare_activate_retire() {
        let f = fixture();
        let old_root = f.ca.bundle().expect("bundle").x509_authorities[0].clone();
        // Opened before the rotation: must follow it (as a running enrollment server does).
        let stale = Ca::open_with_clock(f.ca.state_dir(), f.clock.clone()).expect("open");
        let a = f.ca.issue(&req("spiffe://example.org/a")).expect("a");

        let r = f.ca.rotate_prepare(None).expect("prepare");
        assert_eq!(r.phase, RotationPhase::Prepared);
        let b = f.ca.bundle().expect("bundle");
        assert_eq!(b.x509_authorities.len(), 2);
        assert_eq!(b.x509_authorities[0], old_root);
        assert_eq!(b.sequence, 2);
        let new_root = b.x509_authorities[1].clone();
        assert!(matches!(
            f.ca.rotate_prepare(None),
            Err(CaError::Rotation(_))
        ));
        // Still issuing with the old key.
        let still_old = f.ca.issue(&req("spiffe://example.org/b")).expect("b");
        assert!(signed_by(&still_old.cert_pem, &old_root));
        assert!(matches!(
            f.ca.rotate_retire(false),
            Err(CaError::Rotation(_))
        ));
        let e = f.ca.rotate_activate(false).expect_err("too early");
        assert!(e.to_string().contains("--force"), "{e}");
        f.clock.advance(DEFAULT_REFRESH_HINT);
        f.ca.rotate_activate(false).expect("activate");
        assert_eq!(f.ca.bundle().expect("bundle").sequence, 2, "same anchors");
        // Both roots sign a CRL while the rotation is active, so a verifier that wants a CRL
        // for every leaf's issuer accepts SVIDs of either root.
        let crls = |ca: &Ca| -> Vec<Vec<u8>> {
            let pem = ca.crl_pem().expect("crl");
            x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
                .map(|p| p.expect("pem").contents)
                .collect()
        };
        let verify_crls = |ders: &[Vec<u8>], roots: &[&Vec<u8>]| {
            assert_eq!(ders.len(), roots.len());
            for (der, root) in ders.iter().zip(roots) {
                let (_, crl) =
                    x509_parser::revocation_list::CertificateRevocationList::from_der(der)
                        .expect("crl");
                let (_, r) = X509Certificate::from_der(root).expect("root");
                crl.verify_signature(r.public_key())
                    .expect("signed by the root");
            }
        };
        verify_crls(&crls(&f.ca), &[&new_root, &old_root]);

        let c = stale.issue(&req("spiffe://example.org/c")).expect("c");
        assert!(signed_by(&c.cert_pem, &new_root), "stale handle follows");
        assert_eq!(
            c.entry.issuer_sha256.as_deref(),
            Some(sha256_fingerprint(&new_root).as_str())
        );
        // An SVID of the old root renews onto the new key.
        let a_der = pem_certificates(a.cert_pem.as_bytes()).expect("pem")[0].clone();
        let (_, csr) = csr_for(None, &[]);
        let renewed = f.ca.renew(&a_der, &csr, None).expect("renew old-root SVID");
        assert!(signed_by(&renewed.cert_pem, &new_root));

        let e = f.ca.rotate_retire(false).expect_err("dependents");
        match e {
            CaError::RetireRefused { count, .. } => assert_eq!(count, 2),
            other => panic!("{other}"),
        }
        f.clock.advance(DEFAULT_SVID_TTL);
        let out = f.ca.rotate_retire(false).expect("retire");
        assert_eq!(out.dependent_svids, 0);
        verify_crls(&crls(&f.ca), &[&new_root]);
        let b = f.ca.bundle().expect("bundle");
        assert_eq!(b.x509_authorities, vec![new_root.clone()]);
        assert_eq!(b.sequence, 3);
        assert!(f.ca.rotation().expect("rotation").is_none());
        let sd = StateDir::new(f.ca.state_dir());
        assert!(!sd.next_root_cert().exists() && !sd.next_root_key().exists());
        let reopened = Ca::open_with_clock(f.ca.state_dir(), f.clock.clone()).expect("open");
        assert_eq!(reopened.signing_cert_der(), new_root);
        let d = reopened.issue(&req("spiffe://example.org/d")).expect("d");
        assert!(signed_by(&d.cert_pem, &new_root));
    }

    #[test]
    fn interrupted_retire_finishes_on_rerun() {
        let f = fixture();
        f.ca.rotate_prepare(None).expect("prepare");
        f.ca.rotate_activate(true).expect("activate");
        let sd = StateDir::new(f.ca.state_dir());
        let new_root = fs::read(sd.next_root_cert()).expect("next");
        // As if killed after writing `retiring` and the key, before the certificate.
        let mut r = f.ca.rotation().expect("r").expect("some");
        r.phase = RotationPhase::Retiring;
        write_rotation(&sd, &r).expect("write");
        fs::copy(sd.next_root_key(), sd.root_key()).expect("copy key");
        let mid = Ca::open_with_clock(f.ca.state_dir(), f.clock.clone()).expect("open mid-retire");
        let svid = mid
            .issue(&req("spiffe://example.org/m"))
            .expect("issue mid-retire");
        assert!(signed_by(
            &svid.cert_pem,
            &pem_certificates(&new_root).expect("pem")[0]
        ));
        f.ca.rotate_retire(false).expect("finish");
        assert_eq!(fs::read(sd.root_cert()).expect("root"), new_root);
        Ca::open(f.ca.state_dir()).expect("open after");
    }

    #[test]
    fn intermediate_under_an_operator_root() {
        let clock = Arc::new(FixedClock::at_system_now());
        let now = clock.now();
        let root_key = KeyPair::generate().expect("key");
        let mut rp = CertificateParams::default();
        rp.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        rp.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        rp.distinguished_name
            .push(DnType::CommonName, "operator root");
        rp.not_before = now - time::Duration::days(1);
        rp.not_after = now + time::Duration::days(30);
        let root = rp.self_signed(&root_key).expect("root");

        let dir = tempfile::tempdir().expect("tempdir");
        let mut opts = InitOptions::new(TrustDomain::parse("corp.example").expect("td"));
        opts.operator_root = Some(OperatorRoot {
            cert_pem: root.pem(),
            key_pem: SecretPem::new(root_key.serialize_pem()),
        });
        let ca = Ca::init(dir.path(), &opts, clock.clone()).expect("init");
        assert_eq!(ca.config().mode, CaMode::Intermediate);
        assert_eq!(ca.not_after(), rp.not_after, "clamped to the root's expiry");
        assert!(
            !StateDir::new(dir.path()).root_key().exists(),
            "operator root key never stored"
        );

        let svid = ca.issue(&req("spiffe://corp.example/web")).expect("issue");
        assert_eq!(
            pem_certificates(svid.chain_pem.as_bytes())
                .expect("chain")
                .len(),
            2
        );
        assert_eq!(
            ca.bundle().expect("bundle").x509_authorities,
            vec![root.der().to_vec()]
        );

        // A key that does not match, and a leaf posing as a root, are refused.
        let other_key = KeyPair::generate().expect("key");
        opts.operator_root = Some(OperatorRoot {
            cert_pem: root.pem(),
            key_pem: SecretPem::new(other_key.serialize_pem()),
        });
        let d2 = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            Ca::init(d2.path(), &opts, clock.clone()),
            Err(CaError::OperatorRoot(_))
        ));
        let leaf_pem = svid.cert_pem.clone();
        opts.operator_root = Some(OperatorRoot {
            cert_pem: leaf_pem,
            key_pem: SecretPem::new(other_key.serialize_pem()),
        });
        assert!(matches!(
            Ca::init(d2.path(), &opts, clock),
            Err(CaError::OperatorRoot(_))
        ));
    }
}
