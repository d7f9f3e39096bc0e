//! TLS of the enrollment server (rustls, ring provider only).
//!
//! - [`ServingCert`]: the server's own X509-SVID (`spiffe://<td>/meshgate/enrollment`, with the
//!   DNS and IP SANs clients connect to), issued in memory by the CA and swapped atomically when
//!   the maintenance thread rotates it at half-life. The key never touches the disk.
//! - [`ClientVerifier`]: optional client authentication against the CA's roots and its CRL
//!   (reloaded when `crl.pem` changes). A client certificate that expired at most
//!   `renewal_grace` ago is accepted at the TLS layer (the chain must have been valid at some
//!   instant within the grace); only `/v1/renew` does anything with it, and
//!   [`crate::Ca::renew_with`] then requires that it be the newest certificate of its identity.
//!   Anything else (unknown issuer, revoked, expired beyond the grace, bad signature) fails the
//!   handshake with the matching alert.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, TrustAnchor, UnixTime,
};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, ServerConfig,
    SignatureScheme,
};

use crate::ca::IssuedSvid;
use crate::inspect::pem_certificates;

/// The ring provider: the only one meshgate uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Turn an SVID with its key into a rustls `CertifiedKey`.
pub fn certified_key(svid: &IssuedSvid) -> Result<Arc<CertifiedKey>, String> {
    let chain: Vec<CertificateDer<'static>> = pem_certificates(svid.chain_pem.as_bytes())
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let key = PrivateKeyDer::from_pem_slice(svid.key_pem.expose().as_bytes())
        .map_err(|e| format!("cannot read the generated key: {e}"))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| format!("unsupported key: {e}"))?;
    Ok(Arc::new(CertifiedKey::new(chain, signer)))
}

/// The server's rotating certificate.
#[derive(Debug)]
pub struct ServingCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ServingCert {
    pub fn new(key: Arc<CertifiedKey>) -> ServingCert {
        ServingCert {
            current: RwLock::new(key),
        }
    }

    /// New handshakes use `key` from now on; handshakes in flight finish with the old one.
    pub fn replace(&self, key: Arc<CertifiedKey>) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = key;
    }

    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// Client-certificate verifier: the CA's roots, its CRL, optional, with a renewal grace.
#[derive(Debug)]
pub struct ClientVerifier {
    roots: Vec<TrustAnchor<'static>>,
    subjects: Vec<DistinguishedName>,
    crls: RwLock<Arc<Vec<webpki::CertRevocationList<'static>>>>,
    grace: Duration,
    algorithms: WebPkiSupportedAlgorithms,
    schemes: Vec<SignatureScheme>,
}

/// Parse the CRLs of a PEM text (`crl.pem`).
pub fn parse_crls(pem: &[u8]) -> Result<Vec<webpki::CertRevocationList<'static>>, String> {
    let mut out = Vec::new();
    for item in CertificateRevocationListDer::pem_slice_iter(pem) {
        let der = item.map_err(|e| format!("not a PEM CRL: {e}"))?;
        let crl = webpki::OwnedCertRevocationList::from_der(&der)
            .map_err(|e| format!("cannot parse the CRL: {e}"))?;
        out.push(webpki::CertRevocationList::Owned(crl));
    }
    Ok(out)
}

fn certificate_error(e: webpki::Error) -> CertificateError {
    use webpki::Error as W;
    match e {
        W::CertExpired { .. } => CertificateError::Expired,
        W::CertNotValidYet { .. } => CertificateError::NotValidYet,
        W::CertRevoked => CertificateError::Revoked,
        W::UnknownIssuer => CertificateError::UnknownIssuer,
        W::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        W::UnknownRevocationStatus => CertificateError::UnknownRevocationStatus,
        W::BadDer | W::BadDerTime | W::TrailingData(_) => CertificateError::BadEncoding,
        W::RequiredEkuNotFoundContext(_) | W::EmptyEkuExtension => CertificateError::InvalidPurpose,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    }
}

impl ClientVerifier {
    /// `roots`: the trust domain's anchors (DER); `crl_pem`: the CA's `crl.pem`.
    pub fn new(
        roots: &[Vec<u8>],
        crl_pem: &[u8],
        grace: Duration,
        provider: &CryptoProvider,
    ) -> Result<ClientVerifier, String> {
        let mut anchors = Vec::new();
        let mut subjects = Vec::new();
        for (i, der) in roots.iter().enumerate() {
            let cert = CertificateDer::from(der.as_slice());
            let anchor = webpki::anchor_from_trusted_cert(&cert)
                .map_err(|e| format!("trust anchor {i}: {e}"))?;
            subjects.push(DistinguishedName::in_sequence(&anchor.subject));
            anchors.push(anchor.to_owned());
        }
        let algorithms = provider.signature_verification_algorithms;
        Ok(ClientVerifier {
            roots: anchors,
            subjects,
            crls: RwLock::new(Arc::new(parse_crls(crl_pem)?)),
            grace,
            schemes: algorithms.supported_schemes(),
            algorithms,
        })
    }

    /// Use a newly published CRL for the next handshakes.
    pub fn set_crl(&self, crl_pem: &[u8]) -> Result<(), String> {
        let crls = parse_crls(crl_pem)?;
        *self.crls.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(crls);
        Ok(())
    }

    fn verify_at(
        &self,
        crls: &[webpki::CertRevocationList<'static>],
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        at: UnixTime,
    ) -> Result<(), webpki::Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity)?;
        let refs: Vec<&webpki::CertRevocationList<'_>> = crls.iter().collect();
        let revocation = if refs.is_empty() {
            None
        } else {
            // The CRL is published by the CA that signs the leaves; intermediates (operator
            // root mode) are not covered by it, so only the leaf is checked. A leaf the CRL
            // does not speak for is refused.
            webpki::RevocationOptionsBuilder::new(&refs).ok().map(|b| {
                b.with_depth(webpki::RevocationCheckDepth::EndEntity)
                    .with_status_policy(webpki::UnknownStatusPolicy::Deny)
                    .with_expiration_policy(webpki::ExpirationPolicy::Ignore)
                    .build()
            })
        };
        cert.verify_for_usage(
            self.algorithms.all,
            &self.roots,
            intermediates,
            at,
            webpki::KeyUsage::client_auth(),
            revocation,
            None,
        )
        .map(|_| ())
    }

    /// Verify at `now`; a chain that expired at most the grace ago is verified again at the
    /// instant it expired, so every other check still applies.
    pub fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), webpki::Error> {
        let crls = self.crls.read().unwrap_or_else(|p| p.into_inner()).clone();
        match self.verify_at(&crls, end_entity, intermediates, now) {
            Err(webpki::Error::CertExpired { not_after, .. })
                if now.as_secs().saturating_sub(not_after.as_secs()) <= self.grace.as_secs() =>
            {
                self.verify_at(&crls, end_entity, intermediates, not_after)
            }
            other => other,
        }
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        // Enrollment has no certificate yet; /v1/renew requires one (HTTP 401 without).
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.subjects
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity, intermediates, now)
            .map(|()| ClientCertVerified::assertion())
            .map_err(|e| rustls::Error::InvalidCertificate(certificate_error(e)))
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

/// The server's rustls config: TLS 1.2/1.3, ALPN http/1.1, the rotating certificate, the
/// optional client verifier, no resumption.
pub fn server_config(
    provider: Arc<CryptoProvider>,
    cert: Arc<ServingCert>,
    verifier: Arc<ClientVerifier>,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert);
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    // No session resumption: a resumed session skips client-certificate verification, so a
    // certificate revoked (or expired) since the first handshake would still be accepted.
    // Enrollment is rare; a full handshake each time costs nothing that matters.
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

/// The reason code of a refused handshake, for the audit line.
pub fn handshake_reason(e: &rustls::Error) -> &'static str {
    use CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            C::Expired | C::ExpiredContext { .. } => "client_certificate_expired",
            C::Revoked => "client_certificate_revoked",
            C::UnknownIssuer => "client_certificate_unknown_issuer",
            C::NotValidYet | C::NotValidYetContext { .. } => "client_certificate_not_yet_valid",
            C::BadSignature => "client_certificate_bad_signature",
            C::InvalidPurpose | C::InvalidPurposeContext { .. } => {
                "client_certificate_bad_key_usage"
            }
            _ => "client_certificate_invalid",
        },
        rustls::Error::NoCertificatesPresented => "client_certificate_required",
        rustls::Error::PeerIncompatible(_) | rustls::Error::NoApplicationProtocol => {
            "tls_incompatible"
        }
        rustls::Error::AlertReceived(_) => "tls_alert_received",
        _ => "tls_handshake_failed",
    }
}
