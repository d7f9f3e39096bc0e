//! The agent's side of the enrollment protocol: one HTTPS request per connection (rustls, ring),
//! the server verified against the trust bundle and required to present the enrollment
//! server's SPIFFE ID, the agent's current SVID as client certificate for renewals.
//!
//! Errors are classified for the agent's loop: [`CallError::is_permanent`] is a refusal only
//! an operator can fix (a used token, a revoked SVID); everything else is retried with backoff.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{AlertDescription, ClientConfig, ClientConnection, RootCertStore};

use crate::enroll::api::{ErrorBody, Reason};
use crate::inspect::inspect_der;
use crate::spiffe::SpiffeId;

/// Largest response body the agent reads.
const MAX_RESPONSE: usize = 1024 * 1024;

/// `https://host[:port][/prefix]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerUrl {
    pub host: String,
    pub port: u16,
    /// Path prefix without a trailing slash ("" for none).
    pub prefix: String,
}

impl FromStr for ServerUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let rest = s.strip_prefix("https://").ok_or_else(|| {
            format!(
                "{s:?}: the server URL must start with https:// (enrollment is never done in clear)"
            )
        })?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if path.contains(['?', '#']) {
            return Err(format!("{s:?}: no query or fragment allowed"));
        }
        if authority.contains('@') {
            return Err(format!("{s:?}: no user information allowed"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("{s:?}: unterminated IPv6 address"))?;
            let port = match after {
                "" => None,
                p => Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| format!("{s:?}: bad port"))?,
                ),
            };
            (h.to_owned(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_owned(), Some(p)),
                None => (authority.to_owned(), None),
            }
        };
        if host.is_empty() {
            return Err(format!("{s:?}: no host"));
        }
        let port = match port {
            None => 443,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{s:?}: bad port {p:?}"))?,
        };
        Ok(ServerUrl {
            host,
            port,
            prefix: path.trim_end_matches('/').to_owned(),
        })
    }
}

impl std::fmt::Display for ServerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "https://[{}]:{}{}", self.host, self.port, self.prefix)
        } else {
            write!(f, "https://{}:{}{}", self.host, self.port, self.prefix)
        }
    }
}

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The server could not be reached or the exchange broke off: retry later.
    #[error("cannot reach the enrollment server: {0}")]
    Unreachable(String),
    /// The server is not the enrollment server of our trust domain (certificate not trusted,
    /// or another SPIFFE ID).
    #[error("the server is not trusted: {0}")]
    Untrusted(String),
    /// The server refused our client certificate during the handshake (revoked, expired past
    /// the renewal grace, unknown issuer).
    #[error("the server refused this SVID: {0}")]
    CertificateRefused(String),
    /// An HTTP refusal.
    #[error("refused ({status} {}): {message}", reason.map(Reason::as_str).unwrap_or("?"))]
    Refused {
        status: u16,
        reason: Option<Reason>,
        message: String,
        retry_after: Option<Duration>,
    },
    /// The response is not what the protocol says.
    #[error("bad response from the server: {0}")]
    Protocol(String),
}

impl CallError {
    /// A refusal that retrying will not change.
    pub fn is_permanent(&self) -> bool {
        match self {
            CallError::CertificateRefused(_) => true,
            CallError::Refused { status, reason, .. } => match reason {
                Some(r) => !r.is_transient(),
                None => (400..500).contains(status) && *status != 429 && *status != 408,
            },
            _ => false,
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            CallError::Refused { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// Who the server must be and how the agent authenticates.
#[derive(Debug, Clone)]
pub struct Client {
    url: ServerUrl,
    server_id: SpiffeId,
    timeout: Duration,
    tls: Arc<ClientConfig>,
}

/// Certificates of a PEM text.
pub fn pem_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("not PEM certificates: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate".into());
    }
    Ok(certs)
}

impl Client {
    /// `roots_pem`: the trust bundle(s) to verify the server with; `identity`: the current SVID
    /// chain and key (PEM) to present, for renewal.
    pub fn new(
        url: ServerUrl,
        server_id: SpiffeId,
        roots_pem: &[&str],
        identity: Option<(&str, &str)>,
        timeout: Duration,
    ) -> Result<Client, String> {
        let provider = crate::enroll::tls::provider();
        let mut roots = RootCertStore::empty();
        for pem in roots_pem {
            for c in pem_certs(pem)? {
                roots
                    .add(c)
                    .map_err(|e| format!("cannot use a bundle certificate: {e}"))?;
            }
        }
        if roots.is_empty() {
            return Err("no trust anchor to verify the enrollment server with".into());
        }
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| e.to_string())?;
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_webpki_verifier(verifier);
        let mut cfg = match identity {
            None => builder.with_no_client_auth(),
            Some((chain, key)) => {
                let chain = pem_certs(chain)?;
                let key = PrivateKeyDer::from_pem_slice(key.as_bytes())
                    .map_err(|e| format!("private key: {e}"))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| e.to_string())?
            }
        };
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        // Every call is a full handshake: the server refuses resumption anyway (it must see
        // the client certificate each time), and a renewal changes the identity presented.
        cfg.resumption = rustls::client::Resumption::disabled();
        Ok(Client {
            url,
            server_id,
            timeout,
            tls: Arc::new(cfg),
        })
    }

    fn connect(&self) -> Result<TcpStream, CallError> {
        let addrs: Vec<SocketAddr> = (self.url.host.as_str(), self.url.port)
            .to_socket_addrs()
            .map_err(|e| CallError::Unreachable(format!("cannot resolve {}: {e}", self.url.host)))?
            .collect();
        let mut last = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, self.timeout) {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(format!("{a}: {e}")),
            }
        }
        Err(CallError::Unreachable(last.unwrap_or_else(|| {
            format!("{} resolves to no address", self.url.host)
        })))
    }

    /// POST `body` (JSON) to `path`; returns the response body of a 200.
    pub fn post(&self, path: &str, body: &[u8]) -> Result<Vec<u8>, CallError> {
        self.request("POST", path, body)
    }

    pub fn get(&self, path: &str) -> Result<Vec<u8>, CallError> {
        self.request("GET", path, b"")
    }

    fn request(&self, method: &str, path: &str, body: &[u8]) -> Result<Vec<u8>, CallError> {
        let deadline = Instant::now() + self.timeout;
        let mut tcp = self.connect()?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(self.url.host.clone())
            .map_err(|e| CallError::Untrusted(format!("{}: {e}", self.url.host)))?;
        let mut tls = ClientConnection::new(self.tls.clone(), name)
            .map_err(|e| CallError::Unreachable(e.to_string()))?;
        let arm = |tcp: &TcpStream| -> Result<(), CallError> {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(CallError::Unreachable("timed out".into()));
            }
            tcp.set_read_timeout(Some(left))
                .and_then(|()| tcp.set_write_timeout(Some(left)))
                .map_err(|e| CallError::Unreachable(e.to_string()))
        };
        while tls.is_handshaking() {
            arm(&tcp)?;
            tls.complete_io(&mut tcp).map_err(classify)?;
        }
        self.check_server(&tls)?;
        let host = if self.url.host.contains(':') {
            format!("[{}]", self.url.host)
        } else {
            self.url.host.clone()
        };
        let mut req = format!(
            "{method} {}{path} HTTP/1.1\r\nhost: {host}:{}\r\nuser-agent: meshgate-agent/{}\r\naccept: application/json\r\nconnection: close\r\n",
            self.url.prefix,
            self.url.port,
            env!("CARGO_PKG_VERSION"),
        )
        .into_bytes();
        if method == "POST" {
            req.extend_from_slice(
                format!(
                    "content-type: application/json\r\ncontent-length: {}\r\n",
                    body.len()
                )
                .as_bytes(),
            );
        }
        req.extend_from_slice(b"\r\n");
        req.extend_from_slice(body);
        arm(&tcp)?;
        let mut stream = rustls::Stream::new(&mut tls, &mut tcp);
        stream
            .write_all(&req)
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
                    if resp.len() > MAX_RESPONSE {
                        return Err(CallError::Protocol("response too large".into()));
                    }
                }
                // The server may close without close_notify after a complete response.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && !resp.is_empty() => break,
                Err(e) => return Err(classify(e)),
            }
        }
        parse_response(&resp)
    }

    /// The server must present the enrollment server's SPIFFE ID (the chain and the host name
    /// were verified by webpki during the handshake).
    fn check_server(&self, tls: &ClientConnection) -> Result<(), CallError> {
        let leaf = tls
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or_else(|| CallError::Untrusted("no server certificate".into()))?;
        let info = inspect_der(leaf, 0).map_err(|e| CallError::Untrusted(e.to_string()))?;
        match info.spiffe_id.as_deref() {
            Some(id) if SpiffeId::parse(id).is_ok_and(|i| i == self.server_id) => Ok(()),
            other => Err(CallError::Untrusted(format!(
                "the server presented {}, expected {}",
                other.unwrap_or("no SPIFFE ID"),
                self.server_id
            ))),
        }
    }
}

/// Turn an I/O error (possibly wrapping a rustls error) into a [`CallError`].
fn classify(e: io::Error) -> CallError {
    let Some(err) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return CallError::Unreachable(e.to_string());
    };
    match err {
        rustls::Error::InvalidCertificate(c) => CallError::Untrusted(format!("{c:?}")),
        rustls::Error::AlertReceived(a) => match a {
            AlertDescription::BadCertificate
            | AlertDescription::CertificateRevoked
            | AlertDescription::CertificateExpired
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::AccessDenied
            | AlertDescription::CertificateRequired => {
                CallError::CertificateRefused(format!("TLS alert {a:?}"))
            }
            other => CallError::Unreachable(format!("TLS alert {other:?}")),
        },
        other => CallError::Unreachable(other.to_string()),
    }
}

/// Parse a complete HTTP/1.1 response; a non-200 becomes [`CallError::Refused`].
pub fn parse_response(resp: &[u8]) -> Result<Vec<u8>, CallError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut r = httparse::Response::new(&mut headers);
    let head_len = match r.parse(resp) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return Err(CallError::Unreachable(
                "the connection closed before a complete response".into(),
            ));
        }
        Err(e) => return Err(CallError::Protocol(format!("not HTTP: {e}"))),
    };
    let status = r.code.unwrap_or(0);
    let header = |name: &str| {
        r.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map(str::trim)
    };
    let mut body = resp[head_len..].to_vec();
    if let Some(len) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        if body.len() < len {
            return Err(CallError::Unreachable("truncated response body".into()));
        }
        body.truncate(len);
    }
    if status == 200 {
        return Ok(body);
    }
    let retry_after = header("retry-after")
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_secs);
    let (reason, message) = match serde_json::from_slice::<ErrorBody>(&body) {
        Ok(b) => (Reason::parse(&b.error), b.message),
        Err(_) => (None, String::from_utf8_lossy(&body).trim().to_owned()),
    };
    Err(CallError::Refused {
        status,
        reason,
        message,
        retry_after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_server_urls() {
        let u: ServerUrl = "https://127.0.0.1:15080".parse().expect("url");
        assert_eq!(
            (u.host.as_str(), u.port, u.prefix.as_str()),
            ("127.0.0.1", 15080, "")
        );
        let u: ServerUrl = "https://ca.example.org/enroll/".parse().expect("url");
        assert_eq!(
            (u.host.as_str(), u.port, u.prefix.as_str()),
            ("ca.example.org", 443, "/enroll")
        );
        let u: ServerUrl = "https://[::1]:8443".parse().expect("url");
        assert_eq!((u.host.as_str(), u.port), ("::1", 8443));
        assert_eq!(u.to_string(), "https://[::1]:8443");
        for bad in [
            "http://127.0.0.1:15080",
            "https://",
            "https://h:0",
            "https://h:99999",
            "https://u@h",
            "https://h/?x",
            "https://[::1",
        ] {
            assert!(bad.parse::<ServerUrl>().is_err(), "{bad}");
        }
    }

    #[test]
    fn classifies_responses() {
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(parse_response(ok).expect("ok"), b"{}");
        let used = b"HTTP/1.1 403 Forbidden\r\ncontent-length: 55\r\n\r\n{\"error\":\"token_used\",\"message\":\"already used at noon\"}";
        let e = parse_response(used).expect_err("refused");
        assert!(e.is_permanent(), "{e:?}");
        assert!(e.to_string().contains("token_used"), "{e}");
        let limited =
            b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 7\r\ncontent-length: 0\r\n\r\n";
        let e = parse_response(limited).expect_err("limited");
        assert!(!e.is_permanent());
        assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));
        let e = parse_response(b"HTTP/1.1 503 Service Unavailable\r\n\r\n").expect_err("5xx");
        assert!(!e.is_permanent());
        assert!(matches!(
            parse_response(b"HTTP/1.1 200 OK\r\ncontent-"),
            Err(CallError::Unreachable(_))
        ));
        assert!(matches!(
            parse_response(b"\x00\x01garbage\r\n\r\n"),
            Err(CallError::Protocol(_))
        ));
    }
}
