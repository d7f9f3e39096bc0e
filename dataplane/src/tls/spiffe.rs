//! SPIFFE identities for `tls::secure`: who the peer is, and whether to believe it.
//!
//! - [`SpiffeId`] / [`TrustDomain`]: parsed and validated per the SPIFFE ID spec.
//! - [`TrustBundles`]: root certificates (and optional CRLs) per trust domain. Bundles of
//!   different domains are never merged: a peer's chain is checked only against the roots of
//!   the trust domain its own SPIFFE ID names.
//! - [`SpiffeClientVerifier`]: rustls `ClientCertVerifier` for downstream mTLS (`optional` or
//!   `required` client auth); [`SpiffeServerVerifier`]: rustls `ServerCertVerifier` for upstream
//!   origination, accepting expected SPIFFE IDs / trust domains, or DNS names.
//! - [`Rejection`]: the precise reason a certificate was refused, its metric label, and the TLS
//!   alert it maps to; a [`VerifyObserver`] hears every outcome (the per-reason counter).
//! - [`peer_spiffe_id`]: the verified peer identity of a finished server handshake, for routing.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, ServerName, TrustAnchor, UnixTime,
};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    AlertDescription, CertificateError, DigitallySignedStruct, DistinguishedName, OtherError,
    SignatureScheme,
};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

pub use meshgate_config::spiffe::{
    MAX_SPIFFE_ID_LEN, MAX_TRUST_DOMAIN_LEN, SpiffeId, SpiffeIdError, TrustDomain,
};

/// Why a peer certificate was refused. `as_str` is the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rejection {
    /// Client auth is required and the client sent no certificate (rustls refuses before the
    /// verifier runs; see [`Rejection::from_error`]).
    NoCertificate,
    /// The certificate does not parse.
    BadEncoding,
    /// No URI SAN, or a URI SAN that is not a valid SPIFFE ID.
    NotSpiffe,
    /// More than one URI SAN (an X509-SVID has exactly one).
    MultipleUriSans,
    /// The SPIFFE ID names a trust domain we have no bundle for.
    UnknownTrustDomain,
    Expired,
    NotYetValid,
    /// The chain does not lead to a root of the ID's trust domain (self-signed leaves, leaves
    /// signed by another domain's CA).
    UnknownIssuer,
    BadSignature,
    Revoked,
    /// A CRL is configured but does not cover the certificate, or has expired.
    RevocationUnknown,
    /// The leaf is a CA certificate.
    CaAsLeaf,
    /// keyUsage without digitalSignature or with certificate/CRL signing; or an EKU that
    /// does not allow this use.
    BadKeyUsage,
    /// An upstream presented a valid identity other than the expected ones.
    UnexpectedIdentity,
    /// Any other verification failure.
    Other,
}

impl Rejection {
    pub const ALL: [Rejection; 15] = [
        Rejection::NoCertificate,
        Rejection::BadEncoding,
        Rejection::NotSpiffe,
        Rejection::MultipleUriSans,
        Rejection::UnknownTrustDomain,
        Rejection::Expired,
        Rejection::NotYetValid,
        Rejection::UnknownIssuer,
        Rejection::BadSignature,
        Rejection::Revoked,
        Rejection::RevocationUnknown,
        Rejection::CaAsLeaf,
        Rejection::BadKeyUsage,
        Rejection::UnexpectedIdentity,
        Rejection::Other,
    ];

    /// Metric label (`reason="..."`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Rejection::NoCertificate => "no_certificate",
            Rejection::BadEncoding => "bad_encoding",
            Rejection::NotSpiffe => "not_spiffe",
            Rejection::MultipleUriSans => "multiple_uri_sans",
            Rejection::UnknownTrustDomain => "unknown_trust_domain",
            Rejection::Expired => "expired",
            Rejection::NotYetValid => "not_yet_valid",
            Rejection::UnknownIssuer => "unknown_issuer",
            Rejection::BadSignature => "bad_signature",
            Rejection::Revoked => "revoked",
            Rejection::RevocationUnknown => "revocation_unknown",
            Rejection::CaAsLeaf => "ca_as_leaf",
            Rejection::BadKeyUsage => "bad_key_usage",
            Rejection::UnexpectedIdentity => "unexpected_identity",
            Rejection::Other => "other",
        }
    }

    /// The rustls error the verifier returns; rustls turns it into [`Self::alert`].
    ///
    /// Reasons rustls has a variant for use it (so the alert is the standard one); the
    /// SPIFFE-shape reasons travel as `CertificateError::Other` carrying this `Rejection`,
    /// which rustls sends as `certificate_unknown`. An unknown trust domain is `unknown_ca`
    /// like an unknown issuer: it is exactly "no trust anchor for this certificate".
    pub fn certificate_error(self) -> CertificateError {
        match self {
            Rejection::BadEncoding => CertificateError::BadEncoding,
            Rejection::Expired => CertificateError::Expired,
            Rejection::NotYetValid => CertificateError::NotValidYet,
            Rejection::UnknownIssuer | Rejection::UnknownTrustDomain => {
                CertificateError::UnknownIssuer
            }
            Rejection::BadSignature => CertificateError::BadSignature,
            Rejection::Revoked => CertificateError::Revoked,
            Rejection::RevocationUnknown => CertificateError::UnknownRevocationStatus,
            Rejection::BadKeyUsage => CertificateError::InvalidPurpose,
            Rejection::UnexpectedIdentity => CertificateError::NotValidForName,
            Rejection::NoCertificate
            | Rejection::NotSpiffe
            | Rejection::MultipleUriSans
            | Rejection::CaAsLeaf
            | Rejection::Other => CertificateError::Other(OtherError(Arc::new(self))),
        }
    }

    /// The TLS alert sent to the peer.
    pub fn alert(self) -> AlertDescription {
        match self {
            // What rustls sends itself when a required certificate is missing (TLS 1.3).
            Rejection::NoCertificate => AlertDescription::CertificateRequired,
            other => other.certificate_error().into(),
        }
    }

    /// The reason behind a handshake error, when it is a certificate rejection. Exact for
    /// every reason except [`Rejection::UnknownTrustDomain`], which shares its alert and rustls
    /// error with [`Rejection::UnknownIssuer`] and comes back as that (the observer sees the
    /// exact one).
    pub fn from_error(error: &rustls::Error) -> Option<Rejection> {
        use CertificateError as E;
        let rustls::Error::InvalidCertificate(error) = error else {
            return matches!(error, rustls::Error::NoCertificatesPresented)
                .then_some(Rejection::NoCertificate);
        };
        Some(match error {
            E::BadEncoding => Rejection::BadEncoding,
            E::Expired | E::ExpiredContext { .. } => Rejection::Expired,
            E::NotValidYet | E::NotValidYetContext { .. } => Rejection::NotYetValid,
            E::UnknownIssuer => Rejection::UnknownIssuer,
            E::BadSignature => Rejection::BadSignature,
            E::Revoked => Rejection::Revoked,
            E::UnknownRevocationStatus
            | E::ExpiredRevocationList
            | E::ExpiredRevocationListContext { .. } => Rejection::RevocationUnknown,
            E::InvalidPurpose | E::InvalidPurposeContext { .. } => Rejection::BadKeyUsage,
            E::NotValidForName | E::NotValidForNameContext { .. } => Rejection::UnexpectedIdentity,
            E::Other(other) => other
                .0
                .downcast_ref::<Rejection>()
                .copied()
                .unwrap_or(Rejection::Other),
            _ => Rejection::Other,
        })
    }

    fn from_webpki(error: &webpki::Error) -> Rejection {
        use webpki::Error as W;
        match error {
            W::BadDer | W::BadDerTime | W::TrailingData(_) | W::UnsupportedCertVersion => {
                Rejection::BadEncoding
            }
            W::CertExpired { .. } | W::InvalidCertValidity => Rejection::Expired,
            W::CertNotValidYet { .. } => Rejection::NotYetValid,
            W::UnknownIssuer => Rejection::UnknownIssuer,
            W::InvalidSignatureForPublicKey => Rejection::BadSignature,
            W::CertRevoked => Rejection::Revoked,
            W::UnknownRevocationStatus | W::CrlExpired { .. } => Rejection::RevocationUnknown,
            W::CaUsedAsEndEntity => Rejection::CaAsLeaf,
            W::RequiredEkuNotFoundContext(_) | W::EmptyEkuExtension => Rejection::BadKeyUsage,
            #[expect(
                deprecated,
                reason = "older webpki versions still return the unit variant"
            )]
            W::RequiredEkuNotFound => Rejection::BadKeyUsage,
            _ => Rejection::Other,
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::error::Error for Rejection {}

/// Hears every verification outcome; implementations count (per reason, per trust domain).
/// Called on the thread running the handshake, so it must be cheap and thread-safe.
pub trait VerifyObserver: Send + Sync + fmt::Debug {
    fn accepted(&self, id: &SpiffeId);
    fn rejected(&self, reason: Rejection);
}

/// A [`VerifyObserver`] with one atomic counter per outcome; the metrics stage reads it.
#[derive(Debug, Default)]
pub struct VerifyCounts {
    accepted: AtomicU64,
    rejected: [AtomicU64; Rejection::ALL.len()],
}

impl VerifyCounts {
    pub fn accepted_total(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    pub fn rejected_total(&self, reason: Rejection) -> u64 {
        self.rejected[reason as usize].load(Ordering::Relaxed)
    }

    /// Counts a rejection the verifier cannot see (no certificate sent; see
    /// [`Rejection::from_error`]).
    pub fn count(&self, reason: Rejection) {
        self.rejected[reason as usize].fetch_add(1, Ordering::Relaxed);
    }
}

impl VerifyObserver for VerifyCounts {
    fn accepted(&self, _id: &SpiffeId) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
    }

    fn rejected(&self, reason: Rejection) {
        self.count(reason);
    }
}

/// Why a trust bundle could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    #[error("trust domain {0}: no root certificates")]
    Empty(TrustDomain),
    #[error("trust domain {domain}: root certificate {index} is not usable: {problem}")]
    BadRoot {
        domain: TrustDomain,
        index: usize,
        problem: String,
    },
    #[error("trust domain {domain}: CRL {index} is not usable: {problem}")]
    BadCrl {
        domain: TrustDomain,
        index: usize,
        problem: String,
    },
    #[error("trust domain {0} is listed twice; bundles of one domain go in one entry")]
    Duplicate(TrustDomain),
}

/// The roots (and CRLs) of one trust domain.
#[derive(Debug)]
struct DomainBundle {
    roots: Vec<TrustAnchor<'static>>,
    crls: Vec<webpki::CertRevocationList<'static>>,
}

/// Root certificates per trust domain. A peer's chain is checked against the roots of the
/// trust domain in its own SPIFFE ID only.
#[derive(Debug, Default)]
pub struct TrustBundles {
    domains: HashMap<TrustDomain, DomainBundle>,
    /// Subjects of all roots, offered as certificate_authorities hints.
    subjects: Vec<DistinguishedName>,
}

impl TrustBundles {
    pub fn new() -> TrustBundles {
        TrustBundles::default()
    }

    /// Adds a trust domain's roots and CRLs. A domain may be added once.
    pub fn add(
        &mut self,
        domain: TrustDomain,
        roots: &[CertificateDer<'_>],
        crls: &[CertificateRevocationListDer<'_>],
    ) -> Result<(), BundleError> {
        if self.domains.contains_key(&domain) {
            return Err(BundleError::Duplicate(domain));
        }
        if roots.is_empty() {
            return Err(BundleError::Empty(domain));
        }
        let mut anchors = Vec::with_capacity(roots.len());
        for (index, root) in roots.iter().enumerate() {
            let anchor =
                webpki::anchor_from_trusted_cert(root).map_err(|err| BundleError::BadRoot {
                    domain: domain.clone(),
                    index,
                    problem: err.to_string(),
                })?;
            self.subjects
                .push(DistinguishedName::in_sequence(&anchor.subject));
            anchors.push(anchor.to_owned());
        }
        let mut owned_crls = Vec::with_capacity(crls.len());
        for (index, crl) in crls.iter().enumerate() {
            let crl = webpki::OwnedCertRevocationList::from_der(crl).map_err(|err| {
                BundleError::BadCrl {
                    domain: domain.clone(),
                    index,
                    problem: err.to_string(),
                }
            })?;
            owned_crls.push(webpki::CertRevocationList::Owned(crl));
        }
        self.domains.insert(
            domain,
            DomainBundle {
                roots: anchors,
                crls: owned_crls,
            },
        );
        Ok(())
    }

    pub fn contains(&self, domain: &str) -> bool {
        self.domains.keys().any(|d| d.as_str() == domain)
    }

    pub fn is_empty(&self) -> bool {
        self.domains.is_empty()
    }

    pub fn trust_domains(&self) -> impl Iterator<Item = &TrustDomain> {
        self.domains.keys()
    }

    fn get(&self, domain: &str) -> Option<&DomainBundle> {
        // Keys are few (one per federated domain); avoid allocating a TrustDomain.
        self.domains
            .iter()
            .find_map(|(d, b)| (d.as_str() == domain).then_some(b))
    }
}

/// The SPIFFE ID of an X509-SVID leaf, checking its shape: exactly one URI SAN holding a
/// valid SPIFFE ID, not a CA, keyUsage (if present) with digitalSignature and without
/// certificate or CRL signing.
pub fn svid_identity(leaf: &CertificateDer<'_>) -> Result<SpiffeId, Rejection> {
    let cert = parse_cert(leaf)?;
    let id = single_uri_san(&cert)?;
    check_leaf_shape(&cert)?;
    Ok(id)
}

fn parse_cert<'a>(der: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, Rejection> {
    match x509_parser::parse_x509_certificate(der) {
        Ok(([], cert)) => Ok(cert),
        _ => Err(Rejection::BadEncoding),
    }
}

fn single_uri_san(cert: &X509Certificate<'_>) -> Result<SpiffeId, Rejection> {
    let san = cert
        .subject_alternative_name()
        .map_err(|_| Rejection::BadEncoding)?;
    let mut uris = san
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        });
    let first = uris.next().ok_or(Rejection::NotSpiffe)?;
    if uris.next().is_some() {
        return Err(Rejection::MultipleUriSans);
    }
    SpiffeId::parse(first).map_err(|_| Rejection::NotSpiffe)
}

fn check_leaf_shape(cert: &X509Certificate<'_>) -> Result<(), Rejection> {
    let constraints = cert
        .basic_constraints()
        .map_err(|_| Rejection::BadEncoding)?;
    if constraints.is_some_and(|bc| bc.value.ca) {
        return Err(Rejection::CaAsLeaf);
    }
    let usage = cert.key_usage().map_err(|_| Rejection::BadEncoding)?;
    if let Some(usage) = usage {
        let ku = usage.value;
        if !ku.digital_signature() || ku.key_cert_sign() || ku.crl_sign() {
            return Err(Rejection::BadKeyUsage);
        }
    }
    Ok(())
}

/// Checks an SVID chain: shape, trust domain, then the path to that domain's roots (and its
/// CRLs, when configured). Shared by both verifiers.
fn verify_svid(
    bundles: &TrustBundles,
    algorithms: &WebPkiSupportedAlgorithms,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: webpki::KeyUsage,
) -> Result<SpiffeId, Rejection> {
    let id = svid_identity(end_entity)?;
    let bundle = bundles
        .get(id.trust_domain_name())
        .ok_or(Rejection::UnknownTrustDomain)?;
    verify_chain(
        &bundle.roots,
        &bundle.crls,
        algorithms,
        end_entity,
        intermediates,
        now,
        usage,
    )?;
    Ok(id)
}

fn verify_chain<'a>(
    roots: &[TrustAnchor<'_>],
    crls: &[webpki::CertRevocationList<'_>],
    algorithms: &WebPkiSupportedAlgorithms,
    end_entity: &'a CertificateDer<'a>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: webpki::KeyUsage,
) -> Result<webpki::EndEntityCert<'a>, Rejection> {
    let cert =
        webpki::EndEntityCert::try_from(end_entity).map_err(|e| Rejection::from_webpki(&e))?;
    let crl_refs: Vec<&webpki::CertRevocationList<'_>> = crls.iter().collect();
    let revocation = if crl_refs.is_empty() {
        None
    } else {
        match webpki::RevocationOptionsBuilder::new(&crl_refs) {
            // Leaves only: the CRL of a domain is issued by the CA that signs its leaves.
            // A leaf the CRL does not speak for is refused (fail closed).
            Ok(builder) => Some(
                builder
                    .with_depth(webpki::RevocationCheckDepth::EndEntity)
                    .with_status_policy(webpki::UnknownStatusPolicy::Deny)
                    .with_expiration_policy(webpki::ExpirationPolicy::Enforce)
                    .build(),
            ),
            Err(_) => None,
        }
    };
    cert.verify_for_usage(
        algorithms.all,
        roots,
        intermediates,
        now,
        usage,
        revocation,
        None,
    )
    .map_err(|e| Rejection::from_webpki(&e))?;
    Ok(cert)
}

/// rustls `ClientCertVerifier` for downstream mTLS with SPIFFE semantics.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    bundles: Arc<TrustBundles>,
    mandatory: bool,
    algorithms: WebPkiSupportedAlgorithms,
    schemes: Vec<SignatureScheme>,
    observer: Option<Arc<dyn VerifyObserver>>,
}

impl SpiffeClientVerifier {
    /// `mandatory`: `client_auth = "required"` (true) or `"optional"` (false).
    pub fn new(
        bundles: Arc<TrustBundles>,
        mandatory: bool,
        provider: &CryptoProvider,
        observer: Option<Arc<dyn VerifyObserver>>,
    ) -> SpiffeClientVerifier {
        let algorithms = provider.signature_verification_algorithms;
        SpiffeClientVerifier {
            bundles,
            mandatory,
            schemes: algorithms.supported_schemes(),
            algorithms,
            observer,
        }
    }

    /// The verification itself, with the precise reason on failure.
    pub fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<SpiffeId, Rejection> {
        verify_svid(
            &self.bundles,
            &self.algorithms,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.bundles.subjects
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match self.check(end_entity, intermediates, now) {
            Ok(id) => {
                if let Some(observer) = &self.observer {
                    observer.accepted(&id);
                }
                Ok(ClientCertVerified::assertion())
            }
            Err(reason) => {
                if let Some(observer) = &self.observer {
                    observer.rejected(reason);
                }
                tracing::debug!(%reason, "client certificate rejected");
                Err(rustls::Error::InvalidCertificate(
                    reason.certificate_error(),
                ))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes.clone()
    }
}

/// What an upstream must prove to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpectedPeer {
    /// One of these SPIFFE IDs (an X509-SVID, verified against its domain's bundle).
    SpiffeIds(Vec<SpiffeId>),
    /// Any SPIFFE ID in one of these trust domains.
    TrustDomains(Vec<TrustDomain>),
    /// A certificate valid (standard webpki rules) for one of these DNS names.
    DnsNames(Vec<String>),
}

/// rustls `ServerCertVerifier` for upstream origination.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    expected: ExpectedPeer,
    bundles: Arc<TrustBundles>,
    /// For [`ExpectedPeer::DnsNames`]: all roots of all bundles (web PKI has no domains).
    dns_roots: Vec<TrustAnchor<'static>>,
    algorithms: WebPkiSupportedAlgorithms,
    schemes: Vec<SignatureScheme>,
    observer: Option<Arc<dyn VerifyObserver>>,
}

impl SpiffeServerVerifier {
    /// For SPIFFE expectations `bundles` holds the domains' roots; for DNS names, every root
    /// in `bundles` is a web PKI root.
    pub fn new(
        expected: ExpectedPeer,
        bundles: Arc<TrustBundles>,
        provider: &CryptoProvider,
        observer: Option<Arc<dyn VerifyObserver>>,
    ) -> SpiffeServerVerifier {
        let algorithms = provider.signature_verification_algorithms;
        let dns_roots = bundles
            .domains
            .values()
            .flat_map(|b| b.roots.iter().cloned())
            .collect();
        SpiffeServerVerifier {
            expected,
            bundles,
            dns_roots,
            schemes: algorithms.supported_schemes(),
            algorithms,
            observer,
        }
    }

    /// The verification itself; `Ok(Some(id))` for a SPIFFE peer, `Ok(None)` for a DNS peer.
    pub fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<Option<SpiffeId>, Rejection> {
        let usage = webpki::KeyUsage::server_auth();
        match &self.expected {
            ExpectedPeer::SpiffeIds(ids) => {
                let id = verify_svid(
                    &self.bundles,
                    &self.algorithms,
                    end_entity,
                    intermediates,
                    now,
                    usage,
                )?;
                if ids.contains(&id) {
                    Ok(Some(id))
                } else {
                    Err(Rejection::UnexpectedIdentity)
                }
            }
            ExpectedPeer::TrustDomains(domains) => {
                let id = verify_svid(
                    &self.bundles,
                    &self.algorithms,
                    end_entity,
                    intermediates,
                    now,
                    usage,
                )?;
                if domains.iter().any(|d| d.as_str() == id.trust_domain_name()) {
                    Ok(Some(id))
                } else {
                    Err(Rejection::UnexpectedIdentity)
                }
            }
            ExpectedPeer::DnsNames(names) => {
                let cert = verify_chain(
                    &self.dns_roots,
                    &[],
                    &self.algorithms,
                    end_entity,
                    intermediates,
                    now,
                    usage,
                )?;
                let valid = names.iter().any(|name| {
                    ServerName::try_from(name.as_str())
                        .is_ok_and(|n| cert.verify_is_valid_for_subject_name(&n).is_ok())
                });
                if valid {
                    Ok(None)
                } else {
                    Err(Rejection::UnexpectedIdentity)
                }
            }
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The SNI we send is a routing hint for the upstream; what we accept is configured
        // explicitly in `expected`.
        match self.check(end_entity, intermediates, now) {
            Ok(id) => {
                if let (Some(observer), Some(id)) = (&self.observer, &id) {
                    observer.accepted(id);
                }
                Ok(ServerCertVerified::assertion())
            }
            Err(reason) => {
                if let Some(observer) = &self.observer {
                    observer.rejected(reason);
                }
                tracing::debug!(%reason, "upstream certificate rejected");
                Err(rustls::Error::InvalidCertificate(
                    reason.certificate_error(),
                ))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes.clone()
    }
}

/// The SPIFFE ID of the peer of a finished server handshake: `None` while handshaking, when
/// the client sent no certificate (`optional` client auth), or when client auth is off.
///
/// The verifier has already accepted the leaf, so this only re-reads its URI SAN.
pub fn peer_spiffe_id(conn: &rustls::ServerConnection) -> Option<SpiffeId> {
    if conn.is_handshaking() {
        return None;
    }
    let leaf = conn.peer_certificates()?.first()?;
    svid_identity(leaf).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejection_counters_are_indexed_by_declaration_order() {
        let counts = VerifyCounts::default();
        for (index, reason) in Rejection::ALL.into_iter().enumerate() {
            assert_eq!(reason as usize, index, "{reason}");
            counts.rejected(reason);
            assert_eq!(counts.rejected_total(reason), 1);
        }
        let labels: std::collections::HashSet<&str> =
            Rejection::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(labels.len(), Rejection::ALL.len(), "labels are unique");
    }

    #[test]
    fn rejections_round_trip_through_rustls_errors() {
        for reason in Rejection::ALL {
            let error = match reason {
                Rejection::NoCertificate => rustls::Error::NoCertificatesPresented,
                _ => rustls::Error::InvalidCertificate(reason.certificate_error()),
            };
            let back = Rejection::from_error(&error);
            let want = match reason {
                Rejection::UnknownTrustDomain => Rejection::UnknownIssuer,
                other => other,
            };
            assert_eq!(back, Some(want), "{reason}");
        }
        assert_eq!(
            Rejection::Revoked.alert(),
            AlertDescription::CertificateRevoked
        );
        assert_eq!(
            Rejection::Expired.alert(),
            AlertDescription::CertificateExpired
        );
        assert_eq!(
            Rejection::NotYetValid.alert(),
            AlertDescription::CertificateExpired
        );
        assert_eq!(
            Rejection::UnknownTrustDomain.alert(),
            AlertDescription::UnknownCA
        );
        assert_eq!(
            Rejection::BadKeyUsage.alert(),
            AlertDescription::UnsupportedCertificate
        );
        assert_eq!(
            Rejection::NotSpiffe.alert(),
            AlertDescription::CertificateUnknown
        );
        assert_eq!(
            Rejection::BadSignature.alert(),
            AlertDescription::DecryptError
        );
    }
}
