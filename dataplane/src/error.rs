//! Dataplane errors that say who is at fault and whether a retry is safe.
//!
//! Every stage returns a [`ProxyError`]; one place ([`ProxyError::response_flag`], and later the
//! HTTP/TLS layers) turns it into what the peer sees and what the access log says.

use std::io;
use std::net::SocketAddr;

/// Who caused a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// The client: reset, garbage, timeout on its side.
    Downstream,
    /// The upstream endpoint: refused, reset, timed out.
    Upstream,
    /// meshgate itself: configuration or resource exhaustion.
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyErrorKind {
    #[error("cannot connect to upstream {endpoint}: {source}")]
    UpstreamConnect {
        endpoint: SocketAddr,
        source: io::Error,
    },
    #[error("{blame:?} I/O error: {source}")]
    Io { blame: Blame, source: io::Error },
    #[error("no data moved for the idle timeout")]
    IdleTimeout,
    #[error("no healthy endpoint in the cluster")]
    NoHealthyUpstream,
    #[error("{0}")]
    Internal(&'static str),
}

#[derive(Debug, thiserror::Error)]
#[error("{kind}")]
pub struct ProxyError {
    pub kind: ProxyErrorKind,
}

impl ProxyError {
    pub fn upstream_connect(endpoint: SocketAddr, source: io::Error) -> Self {
        ProxyError {
            kind: ProxyErrorKind::UpstreamConnect { endpoint, source },
        }
    }
    pub fn io(blame: Blame, source: io::Error) -> Self {
        ProxyError {
            kind: ProxyErrorKind::Io { blame, source },
        }
    }
    pub fn idle() -> Self {
        ProxyError {
            kind: ProxyErrorKind::IdleTimeout,
        }
    }
    pub fn internal(what: &'static str) -> Self {
        ProxyError {
            kind: ProxyErrorKind::Internal(what),
        }
    }

    pub fn blame(&self) -> Blame {
        match &self.kind {
            ProxyErrorKind::UpstreamConnect { .. } => Blame::Upstream,
            ProxyErrorKind::Io { blame, .. } => *blame,
            ProxyErrorKind::IdleTimeout => Blame::Downstream,
            ProxyErrorKind::NoHealthyUpstream => Blame::Upstream,
            ProxyErrorKind::Internal(_) => Blame::Internal,
        }
    }

    /// Safe to retry on another endpoint: nothing reached the upstream yet.
    pub fn retryable(&self) -> bool {
        matches!(self.kind, ProxyErrorKind::UpstreamConnect { .. })
    }

    /// Envoy's response-flag vocabulary, for access logs and counters.
    pub fn response_flag(&self) -> &'static str {
        match &self.kind {
            ProxyErrorKind::UpstreamConnect { source, .. }
                if source.kind() == io::ErrorKind::TimedOut =>
            {
                "UF,UT"
            }
            ProxyErrorKind::UpstreamConnect { .. } => "UF",
            ProxyErrorKind::Io {
                blame: Blame::Downstream,
                ..
            } => "DC",
            ProxyErrorKind::Io {
                blame: Blame::Upstream,
                ..
            } => "UC",
            ProxyErrorKind::Io {
                blame: Blame::Internal,
                ..
            }
            | ProxyErrorKind::Internal(_) => "NR",
            ProxyErrorKind::IdleTimeout => "SI",
            ProxyErrorKind::NoHealthyUpstream => "UH",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_and_blame() {
        let e = ProxyError::upstream_connect(
            "127.0.0.1:1".parse().expect("literal"),
            io::Error::from(io::ErrorKind::ConnectionRefused),
        );
        assert_eq!(e.response_flag(), "UF");
        assert_eq!(e.blame(), Blame::Upstream);
        assert!(e.retryable());
        assert_eq!(ProxyError::idle().response_flag(), "SI");
        assert!(!ProxyError::io(Blame::Downstream, io::Error::other("x")).retryable());
    }
}
