//! One fetch of a peer's bundle: HTTPS GET of the endpoint URL, the server verified per the
//! profile, the body parsed and validated for the peer's trust domain.
//!
//! - `https_web`: standard Web PKI (the host name in the URL must be in the server certificate),
//!   with the system's CAs (`/etc/ssl/certs/ca-certificates.crt`) or the peer's `web_ca_file`.
//! - `https_spiffe`: the server's chain must verify against the peer domain's bundle in force
//!   (the bootstrap bundle the first time), and the leaf must carry exactly the configured
//!   endpoint SPIFFE ID. The host name is not checked (SPIFFE authenticates the ID).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

use super::Profile;
use super::store::PeerConfig;
use crate::agent::client::{ServerUrl, pem_certs};
use crate::bundle::{BundleFormat, MAX_BUNDLE_BYTES, TrustBundle};
use crate::inspect::inspect_der;
use crate::spiffe::SpiffeId;

/// The system's CA file (Debian's ca-certificates), for `https_web` peers without a CA file.
pub const SYSTEM_CA_FILE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Why a fetch failed. The message is what `trust list` shows as the last error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    #[error("setup: {0}")]
    Setup(String),
    #[error("unreachable: {0}")]
    Unreachable(String),
    #[error("endpoint not trusted: {0}")]
    Untrusted(String),
    #[error("HTTP {status} from the endpoint")]
    Status { status: u16 },
    #[error("bad response: {0}")]
    Protocol(String),
    #[error("bundle refused: {0}")]
    Bundle(String),
}

/// Verifies an `https_spiffe` endpoint: chain to the peer's anchors, exact SPIFFE ID.
#[derive(Debug)]
struct SpiffeServerVerifier {
    anchors: Vec<TrustAnchor<'static>>,
    expected: SpiffeId,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| rustls::Error::General(format!("server certificate: {e}")))?;
        cert.verify_for_usage(
            self.algorithms.all,
            &self.anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| rustls::Error::General(format!("server certificate: {e}")))?;
        let info = inspect_der(end_entity, 0)
            .map_err(|e| rustls::Error::General(format!("server certificate: {e}")))?;
        match info.spiffe_id.as_deref().map(SpiffeId::parse) {
            Some(Ok(id)) if id == self.expected => Ok(ServerCertVerified::assertion()),
            other => Err(rustls::Error::General(format!(
                "the endpoint presented {}, expected {}",
                match other {
                    Some(Ok(id)) => id.to_string(),
                    _ => "no SPIFFE ID".into(),
                },
                self.expected
            ))),
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
        self.algorithms.supported_schemes()
    }
}

/// The TLS client config for `peer`. `anchors`: the peer domain's bundle in force
/// (`https_spiffe`).
fn tls_config(
    peer: &PeerConfig,
    anchors: Option<&TrustBundle>,
) -> Result<ClientConfig, FetchError> {
    let provider = crate::enroll::tls::provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| FetchError::Setup(e.to_string()))?;
    let mut cfg = match peer.profile {
        Profile::HttpsSpiffe => {
            let expected = peer.endpoint_spiffe_id.clone().ok_or_else(|| {
                FetchError::Setup("https_spiffe needs the endpoint's SPIFFE ID".into())
            })?;
            let bundle = anchors.ok_or_else(|| {
                FetchError::Setup(format!(
                    "no bundle of {} to verify the endpoint with; add the peer again with --bootstrap-bundle",
                    expected.trust_domain()
                ))
            })?;
            let mut list = Vec::new();
            for der in &bundle.x509_authorities {
                let cert = CertificateDer::from(der.as_slice());
                let a = webpki::anchor_from_trusted_cert(&cert)
                    .map_err(|e| FetchError::Setup(format!("bundle authority: {e}")))?;
                list.push(a.to_owned());
            }
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier {
                    anchors: list,
                    expected,
                    algorithms: provider.signature_verification_algorithms,
                }))
                .with_no_client_auth()
        }
        Profile::HttpsWeb => {
            let file = peer
                .web_ca_file
                .clone()
                .unwrap_or_else(|| SYSTEM_CA_FILE.into());
            let text = std::fs::read_to_string(&file)
                .map_err(|e| FetchError::Setup(format!("{}: {e}", file.display())))?;
            let mut roots = RootCertStore::empty();
            for c in pem_certs(&text)
                .map_err(|e| FetchError::Setup(format!("{}: {e}", file.display())))?
            {
                // The system file holds a few certificates webpki cannot use; skip those.
                let _ = roots.add(c);
            }
            if roots.is_empty() {
                return Err(FetchError::Setup(format!(
                    "{}: no usable CA certificate",
                    file.display()
                )));
            }
            let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| FetchError::Setup(e.to_string()))?;
            builder.with_webpki_verifier(verifier).with_no_client_auth()
        }
        Profile::Static => {
            return Err(FetchError::Setup(
                "an imported (static) bundle has no endpoint to fetch".into(),
            ));
        }
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Fetch and validate `peer`'s bundle. `current`: the bundle in force for the peer's domain
/// (or for the endpoint ID's domain when it differs), used by `https_spiffe`.
pub fn fetch(
    peer: &PeerConfig,
    current: Option<&TrustBundle>,
    timeout: Duration,
) -> Result<TrustBundle, FetchError> {
    let url_text = peer
        .endpoint
        .as_deref()
        .ok_or_else(|| FetchError::Setup("no endpoint URL".into()))?;
    let url: ServerUrl = url_text.parse().map_err(FetchError::Setup)?;
    let cfg = Arc::new(tls_config(peer, current)?);
    let body = get(&url, cfg, timeout)?;
    TrustBundle::parse(&peer.trust_domain, BundleFormat::Spiffe, &body)
        .map_err(|e| FetchError::Bundle(e.to_string()))
}

fn get(url: &ServerUrl, cfg: Arc<ClientConfig>, timeout: Duration) -> Result<Vec<u8>, FetchError> {
    let deadline = Instant::now() + timeout;
    let addrs: Vec<SocketAddr> = (url.host.as_str(), url.port)
        .to_socket_addrs()
        .map_err(|e| FetchError::Unreachable(format!("cannot resolve {}: {e}", url.host)))?
        .collect();
    let mut tcp = None;
    let mut last = format!("{} resolves to no address", url.host);
    for a in addrs {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(e) => last = format!("{a}: {e}"),
        }
    }
    let mut tcp = tcp.ok_or(FetchError::Unreachable(last))?;
    let name = ServerName::try_from(url.host.clone())
        .map_err(|e| FetchError::Setup(format!("{}: {e}", url.host)))?;
    let mut tls = ClientConnection::new(cfg, name).map_err(|e| FetchError::Setup(e.to_string()))?;
    let arm = |tcp: &TcpStream| -> Result<(), FetchError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(FetchError::Unreachable("timed out".into()));
        }
        tcp.set_read_timeout(Some(left))
            .and_then(|()| tcp.set_write_timeout(Some(left)))
            .map_err(|e| FetchError::Unreachable(e.to_string()))
    };
    let classify =
        |e: std::io::Error| match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            Some(rustls::Error::InvalidCertificate(c)) => FetchError::Untrusted(format!("{c:?}")),
            Some(rustls::Error::General(m)) => FetchError::Untrusted(m.clone()),
            Some(other) => FetchError::Unreachable(other.to_string()),
            None => FetchError::Unreachable(e.to_string()),
        };
    while tls.is_handshaking() {
        arm(&tcp)?;
        tls.complete_io(&mut tcp).map_err(classify)?;
    }
    let host = if url.host.contains(':') {
        format!("[{}]", url.host)
    } else {
        url.host.clone()
    };
    let path = if url.prefix.is_empty() {
        "/"
    } else {
        url.prefix.as_str()
    };
    let req = format!(
        "GET {path} HTTP/1.1\r\nhost: {host}:{}\r\nuser-agent: meshgate-federation/{}\r\naccept: application/json\r\nconnection: close\r\n\r\n",
        url.port,
        env!("CARGO_PKG_VERSION"),
    );
    arm(&tcp)?;
    let mut stream = rustls::Stream::new(&mut tls, &mut tcp);
    stream
        .write_all(req.as_bytes())
        .and_then(|()| stream.flush())
        .map_err(classify)?;
    let mut resp = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        arm(stream.sock)?;
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                resp.extend_from_slice(&chunk[..n]);
                if resp.len() > MAX_BUNDLE_BYTES + 16 * 1024 {
                    return Err(FetchError::Protocol("response too large".into()));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !resp.is_empty() => break,
            Err(e) => return Err(classify(e)),
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut r = httparse::Response::new(&mut headers);
    let head_len = match r.parse(&resp) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return Err(FetchError::Unreachable(
                "the connection closed before a complete response".into(),
            ));
        }
        Err(e) => return Err(FetchError::Protocol(format!("not HTTP: {e}"))),
    };
    let status = r.code.unwrap_or(0);
    if status != 200 {
        return Err(FetchError::Status { status });
    }
    let mut body = resp[head_len..].to_vec();
    if let Some(len) = r
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(h.value).ok())
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        if body.len() < len {
            return Err(FetchError::Unreachable("truncated response body".into()));
        }
        body.truncate(len);
    }
    Ok(body)
}
