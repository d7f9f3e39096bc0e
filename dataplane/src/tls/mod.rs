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
use self::spiffe::{Rejection, SpiffeId};
use self::stream::{HandshakeError, PeekError, ServerTlsStream};

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
    },
}

impl SecureError {
    /// The certificate rejection, when that is what ended the handshake.
    pub fn rejection(&self) -> Option<Rejection> {
        match self {
            SecureError::Handshake { error, .. } => error.tls().and_then(Rejection::from_error),
            SecureError::Peek(_) => None,
        }
    }

    /// A short label for the handshake-result metric.
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
    let stream = match stream::accept(io, state.server_config.clone(), &buf).await {
        Ok(stream) => stream,
        Err(error) => {
            if error
                .tls()
                .and_then(Rejection::from_error)
                .is_some_and(|r| r == Rejection::NoCertificate)
            {
                state.counts.count(Rejection::NoCertificate);
            }
            return Err(SecureError::Handshake { sni, error });
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
