//! `tls::secure`: the stage between `listen::accept` and `route::resolve`.
//!
//! Socket-free building blocks; the pipeline drives them over `rt::TcpStream`:
//! - [`clienthello`]: sans-IO ClientHello peek (SNI, ALPN, versions) for `tls-passthrough`
//!   routing and for logging before a handshake.
//! - [`spiffe`]: SPIFFE IDs, per-trust-domain bundles, the rustls client-certificate verifier
//!   (downstream mTLS) and server-certificate verifier (upstream mTLS), rejection reasons.
//! - [`certs`]: server certificates chosen by SNI, PEM loading, and the rustls `ServerConfig` /
//!   `ClientConfig` builders (ring provider only).
//! - [`setup`]: validated config -> [`setup::ListenerTlsState`] / [`setup::ClusterTlsState`],
//!   and [`setup::select_route`] (`route::resolve` for tls listeners).
//! - [`stream`]: rustls over any `futures_io` transport ([`stream::TlsStream`] is itself
//!   `AsyncRead + AsyncWrite`), the ClientHello peek over a stream, upstream [`stream::connect`].
//! - [`secure`]: the stage itself for a `tls` listener: peek, handshake, peer identity.
//!
//! Nothing here touches a socket or a clock other than through its arguments.

pub mod certs;
pub mod clienthello;
pub mod setup;
pub mod spiffe;
pub mod stream;

use futures_io::{AsyncRead, AsyncWrite};
use rustls::ProtocolVersion;

use self::setup::ListenerTlsState;
use self::spiffe::{Rejection, SpiffeId, TrustBundles};
use self::stream::{HandshakeError, PeekError, ServerTlsStream};
use crate::metrics::TlsHandshakeStats;

/// A terminated downstream connection, ready for `route::resolve`.
#[derive(Debug)]
pub struct Secured<IO> {
    pub stream: ServerTlsStream<IO>,
    /// The SNI the client sent (lowercase, no trailing dot).
    pub sni: Option<String>,
    /// The negotiated ALPN protocol.
    pub alpn: Option<Vec<u8>>,
    /// The client's verified SPIFFE ID (`None` without client auth, or `optional` and no
    /// certificate).
    pub peer: Option<SpiffeId>,
    pub version: Option<ProtocolVersion>,
    /// The session was resumed (ticket or session ID).
    pub resumed: bool,
}

impl<IO> Secured<IO> {
    /// Count this completed handshake (version, resumed, peer trust domain).
    pub fn count(&self, stats: &TlsHandshakeStats, state: &ListenerTlsState) {
        stats.completed(
            version_label(self.version),
            self.resumed,
            peer_domain_label(self.peer.as_ref(), &state.bundles),
        );
    }
}

/// Why [`secure`] failed. Always the downstream's doing (a bad hello, a refused certificate,
/// a closed connection): not retryable, nothing to report upstream.
#[derive(Debug, thiserror::Error)]
pub enum SecureError {
    #[error("client hello: {0}")]
    Peek(#[from] PeekError),
    #[error("handshake (sni {sni:?}): {error}")]
    Handshake {
        sni: Option<String>,
        error: HandshakeError,
        /// The version negotiated before the failure (`None`: failed before ServerHello).
        version: Option<ProtocolVersion>,
    },
}

/// Every label [`SecureError::reason`] can return, plus [`TIMEOUT_REASON`] (the metric's
/// bounded `reason` set).
pub const FAILURE_REASONS: [&str; Rejection::ALL.len() + 6] = {
    let mut all = [""; Rejection::ALL.len() + 6];
    let mut i = 0;
    while i < Rejection::ALL.len() {
        all[i] = Rejection::ALL[i].as_str();
        i += 1;
    }
    all[i] = "not_tls";
    all[i + 1] = "closed";
    all[i + 2] = "io";
    all[i + 3] = "peer_alert";
    all[i + 4] = "protocol";
    all[i + 5] = TIMEOUT_REASON;
    all
};

/// The failure label of a handshake that did not finish within `handshake_timeout`.
pub const TIMEOUT_REASON: &str = "timeout";

/// Metric label of a TLS version: `TLSv1.3`, `TLSv1.2`, or `unknown` (not negotiated).
pub fn version_label(version: Option<ProtocolVersion>) -> &'static str {
    match version {
        Some(ProtocolVersion::TLSv1_3) => "TLSv1.3",
        Some(ProtocolVersion::TLSv1_2) => "TLSv1.2",
        _ => "unknown",
    }
}

/// Metric label of a verified peer's trust domain, bounded by the config: the domain when the
/// listener has a bundle for it, `other` otherwise, `none` without a client certificate.
pub fn peer_domain_label<'a>(peer: Option<&'a SpiffeId>, bundles: &TrustBundles) -> &'a str {
    match peer {
        None => "none",
        Some(id) if bundles.contains(id.trust_domain_name()) => id.trust_domain_name(),
        Some(_) => "other",
    }
}

impl SecureError {
    /// The certificate rejection, when that is what ended the handshake.
    pub fn rejection(&self) -> Option<Rejection> {
        match self {
            SecureError::Handshake { error, .. } => error.tls().and_then(Rejection::from_error),
            SecureError::Peek(_) => None,
        }
    }

    /// Count this failed handshake (reason, version).
    pub fn count(&self, stats: &TlsHandshakeStats) {
        stats.failed(self.reason(), version_label(self.version()));
    }

    /// The TLS version negotiated before the failure, if any.
    pub fn version(&self) -> Option<ProtocolVersion> {
        match self {
            SecureError::Handshake { version, .. } => *version,
            SecureError::Peek(_) => None,
        }
    }

    /// A short label for the handshake-result metric (one of [`FAILURE_REASONS`]).
    pub fn reason(&self) -> &'static str {
        match self {
            SecureError::Peek(PeekError::Invalid(_)) => "not_tls",
            SecureError::Peek(PeekError::Eof(_)) => "closed",
            SecureError::Peek(PeekError::Io(_)) => "io",
            SecureError::Handshake { error, .. } => match (self.rejection(), error) {
                (Some(reason), _) => reason.as_str(),
                (None, HandshakeError::Io(_)) => "io",
                (None, HandshakeError::Tls(rustls::Error::AlertReceived(_))) => "peer_alert",
                (None, HandshakeError::Tls(_)) => "protocol",
            },
        }
    }
}

/// `tls::secure` for a `tls` listener: reads the ClientHello (refusing non-TLS early), runs
/// the handshake with the listener's certificates and client-auth policy, and returns the
/// stream with what routing needs (SNI, ALPN, verified peer). A refused client certificate is
/// answered with its alert and counted in `state.counts` (the verifier counts most reasons;
/// a missing certificate is counted here, since rustls refuses it before the verifier runs).
pub async fn secure<IO: AsyncRead + AsyncWrite + Unpin>(
    mut io: IO,
    state: &ListenerTlsState,
) -> Result<Secured<IO>, SecureError> {
    let mut buf = Vec::new();
    let hello = stream::peek_client_hello(&mut io, &mut buf).await?;
    let sni = hello
        .server_name
        .as_deref()
        .map(|name| name.to_ascii_lowercase());
    let stream = match stream::accept_versioned(io, state.server_config.clone(), &buf).await {
        Ok(stream) => stream,
        Err((error, version)) => {
            if error
                .tls()
                .and_then(Rejection::from_error)
                .is_some_and(|r| r == Rejection::NoCertificate)
            {
                state.counts.count(Rejection::NoCertificate);
            }
            return Err(SecureError::Handshake {
                sni,
                error,
                version,
            });
        }
    };
    let conn = stream.get_ref().1;
    Ok(Secured {
        sni,
        alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
        peer: spiffe::peer_spiffe_id(conn),
        version: conn.protocol_version(),
        resumed: conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
        stream,
    })
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod label_tests {
    use super::*;

    #[test]
    fn failure_reasons_are_unique_and_peer_domains_bounded() {
        let set: std::collections::HashSet<_> = FAILURE_REASONS.iter().collect();
        assert_eq!(set.len(), FAILURE_REASONS.len());
        assert!(!FAILURE_REASONS.contains(&""));
        let mut bundles = TrustBundles::new();
        let ca = meshgate_testkit::pki::TrustDomainCa::new("example.test", false).expect("ca");
        bundles
            .add(
                spiffe::TrustDomain::new("example.test").expect("td"),
                &[ca.root_der()],
                &[],
            )
            .expect("bundle");
        let inside = SpiffeId::parse("spiffe://example.test/a").expect("id");
        let outside = SpiffeId::parse("spiffe://attacker.test/a").expect("id");
        assert_eq!(peer_domain_label(Some(&inside), &bundles), "example.test");
        assert_eq!(peer_domain_label(Some(&outside), &bundles), "other");
        assert_eq!(peer_domain_label(None, &bundles), "none");
    }
}
