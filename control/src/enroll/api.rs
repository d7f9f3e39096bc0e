//! The enrollment protocol on the wire: request and response bodies (JSON) shared by the server
//! and the agent, and the refusal reasons with their HTTP status.
//!
//! Endpoints (docs/enrollment.md):
//! - `POST /v1/enroll` `{token, spiffe_id, csr_pem}` -> [`SvidResponse`]
//! - `POST /v1/renew` `{csr_pem}` over mTLS with the current SVID -> [`SvidResponse`]
//! - `GET /v1/bundle` -> [`BundleResponse`] (`?format=pem` for PEM, `?format=spiffe` for the
//!   SPIFFE bundle document alone)
//!
//! Every refusal is `{"error": "<reason>", "message": "<what to do>"}` with the status of
//! [`Reason::status`].

use serde::{Deserialize, Serialize};

use crate::error::{CaError, CsrError, TokenError};

/// `POST /v1/enroll`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnrollRequest {
    /// The join token in clear (`mgjt.<id>.<secret>`).
    pub token: String,
    pub spiffe_id: String,
    /// PKCS#10 request, PEM (`-----BEGIN CERTIFICATE REQUEST-----`).
    pub csr_pem: String,
}

/// `POST /v1/renew`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RenewRequest {
    pub csr_pem: String,
}

/// A signed SVID with what its holder needs to use it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SvidResponse {
    pub spiffe_id: String,
    /// Uppercase hex, as `meshgate cert list` prints it.
    pub serial: String,
    /// The leaf followed by intermediates (what `svid.pem` holds).
    pub svid_pem: String,
    /// The trust domain's roots, PEM.
    pub bundle_pem: String,
    /// The SPIFFE bundle document (JWKS).
    pub spiffe_bundle: serde_json::Value,
    /// RFC 3339.
    pub not_before: String,
    pub not_after: String,
    /// When the CA signed it; the agent schedules renewal from here (not from `not_before`,
    /// which is backdated for clock skew).
    pub issued_at: String,
}

/// `GET /v1/bundle`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BundleResponse {
    pub trust_domain: String,
    pub sequence: u64,
    pub bundle_pem: String,
    pub spiffe_bundle: serde_json::Value,
}

/// A refusal body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    pub message: String,
}

/// Why a request was refused (or failed). `as_str` is the `error` field and the audit `reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The request is not HTTP/1.1 we accept, or its body is not the JSON we expect.
    BadRequest,
    /// The headers or the body exceed the size caps.
    TooLarge,
    /// POST without Content-Length (chunked bodies are not accepted).
    LengthRequired,
    NotFound,
    MethodNotAllowed,
    RateLimited,
    TokenMalformed,
    TokenUnknown,
    TokenExpired,
    TokenUsed,
    TokenRevoked,
    /// The token is bound to another SPIFFE ID than the one asked for.
    TokenIdentityMismatch,
    /// The CSR names another identity than the one authorised.
    CsrIdentityMismatch,
    CsrDnsNotAuthorised,
    CsrMalformed,
    CsrBadSignature,
    CsrUnsupportedKey,
    CsrUnsupportedSan,
    BadSpiffeId,
    ForeignTrustDomain,
    /// A path under `/meshgate/`: meshgate's own components.
    ReservedIdentity,
    BadTtl,
    /// `/v1/renew` without a client certificate.
    ClientCertificateRequired,
    /// The presented SVID may not renew (expired past the grace, revoked, superseded...).
    RenewalRefused,
    /// The CA certificate expired or is not yet valid.
    CaUnavailable,
    /// State could not be read or written; the request may be retried.
    Internal,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        use Reason::*;
        match self {
            BadRequest => "bad_request",
            TooLarge => "too_large",
            LengthRequired => "length_required",
            NotFound => "not_found",
            MethodNotAllowed => "method_not_allowed",
            RateLimited => "rate_limited",
            TokenMalformed => "token_malformed",
            TokenUnknown => "token_unknown",
            TokenExpired => "token_expired",
            TokenUsed => "token_used",
            TokenRevoked => "token_revoked",
            TokenIdentityMismatch => "token_identity_mismatch",
            CsrIdentityMismatch => "csr_identity_mismatch",
            CsrDnsNotAuthorised => "csr_dns_not_authorised",
            CsrMalformed => "csr_malformed",
            CsrBadSignature => "csr_bad_signature",
            CsrUnsupportedKey => "csr_unsupported_key",
            CsrUnsupportedSan => "csr_unsupported_san",
            BadSpiffeId => "bad_spiffe_id",
            ForeignTrustDomain => "foreign_trust_domain",
            ReservedIdentity => "reserved_identity",
            BadTtl => "bad_ttl",
            ClientCertificateRequired => "client_certificate_required",
            RenewalRefused => "renewal_refused",
            CaUnavailable => "ca_unavailable",
            Internal => "internal",
        }
    }

    /// HTTP status: 400 for malformed input, 401 when the credential is missing or not
    /// recognised (unknown/expired/malformed token, no or unusable client certificate), 403 when
    /// it is recognised but may not do this (used/revoked token, another identity), 429 rate
    /// limited, 5xx when the CA cannot serve (retry later).
    pub fn status(self) -> u16 {
        use Reason::*;
        match self {
            BadRequest | CsrMalformed | CsrBadSignature | CsrUnsupportedKey | CsrUnsupportedSan
            | BadSpiffeId | BadTtl => 400,
            TokenMalformed
            | TokenUnknown
            | TokenExpired
            | ClientCertificateRequired
            | RenewalRefused => 401,
            TokenUsed
            | TokenRevoked
            | TokenIdentityMismatch
            | CsrIdentityMismatch
            | CsrDnsNotAuthorised
            | ForeignTrustDomain
            | ReservedIdentity => 403,
            NotFound => 404,
            MethodNotAllowed => 405,
            LengthRequired => 411,
            TooLarge => 413,
            RateLimited => 429,
            Internal => 500,
            CaUnavailable => 503,
        }
    }

    /// Whether a client should try the same request again later (the agent backs off), as
    /// opposed to a refusal that only an operator can fix.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            Reason::RateLimited | Reason::Internal | Reason::CaUnavailable
        )
    }

    pub fn parse(s: &str) -> Option<Reason> {
        use Reason::*;
        const ALL: &[Reason] = &[
            BadRequest,
            TooLarge,
            LengthRequired,
            NotFound,
            MethodNotAllowed,
            RateLimited,
            TokenMalformed,
            TokenUnknown,
            TokenExpired,
            TokenUsed,
            TokenRevoked,
            TokenIdentityMismatch,
            CsrIdentityMismatch,
            CsrDnsNotAuthorised,
            CsrMalformed,
            CsrBadSignature,
            CsrUnsupportedKey,
            CsrUnsupportedSan,
            BadSpiffeId,
            ForeignTrustDomain,
            ReservedIdentity,
            BadTtl,
            ClientCertificateRequired,
            RenewalRefused,
            CaUnavailable,
            Internal,
        ];
        ALL.iter().copied().find(|r| r.as_str() == s)
    }

    /// The reason for a CA refusal or failure.
    pub fn of(e: &CaError) -> Reason {
        use Reason::*;
        match e {
            CaError::Token(t) => match t {
                TokenError::Malformed => TokenMalformed,
                TokenError::Unknown | TokenError::NoSuchId(_) => TokenUnknown,
                TokenError::Expired { .. } => TokenExpired,
                TokenError::AlreadyUsed { .. } => TokenUsed,
                TokenError::Revoked { .. } => TokenRevoked,
                TokenError::IdentityMismatch { .. } => TokenIdentityMismatch,
                TokenError::Store(_) => Internal,
            },
            CaError::Csr(c) => match c {
                CsrError::Malformed(_) => CsrMalformed,
                CsrError::BadSignature => CsrBadSignature,
                CsrError::UnsupportedKey(_) => CsrUnsupportedKey,
                CsrError::IdentityMismatch { .. } => CsrIdentityMismatch,
                CsrError::DnsNotAuthorised(_) => CsrDnsNotAuthorised,
                CsrError::UnsupportedSan(_) => CsrUnsupportedSan,
            },
            CaError::SpiffeId(_) => BadSpiffeId,
            CaError::ForeignTrustDomain { .. } => ForeignTrustDomain,
            CaError::ReservedIdentity(_) => ReservedIdentity,
            CaError::InvalidTtl(_) | CaError::TtlTooLong { .. } => BadTtl,
            CaError::InvalidDnsName { .. } => CsrDnsNotAuthorised,
            CaError::RenewalRefused(_) | CaError::BadSerial(_) | CaError::UnknownSerial(_) => {
                RenewalRefused
            }
            CaError::CaExpired { .. } | CaError::CaNotYetValid { .. } => CaUnavailable,
            CaError::NotInitialised { .. }
            | CaError::AlreadyInitialised { .. }
            | CaError::ForeignDir { .. }
            | CaError::Store(_)
            | CaError::InsecureKey { .. }
            | CaError::BadReason(_)
            | CaError::OperatorRoot(_)
            | CaError::Rotation(_)
            | CaError::RetireRefused { .. }
            | CaError::Crypto { .. } => Internal,
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_round_trip_and_map_to_statuses() {
        for r in [
            Reason::TokenUsed,
            Reason::TokenUnknown,
            Reason::CsrIdentityMismatch,
            Reason::RateLimited,
            Reason::Internal,
        ] {
            assert_eq!(Reason::parse(r.as_str()), Some(r));
        }
        assert_eq!(Reason::TokenUnknown.status(), 401);
        assert_eq!(Reason::TokenExpired.status(), 401);
        assert_eq!(Reason::TokenUsed.status(), 403);
        assert_eq!(Reason::TokenRevoked.status(), 403);
        assert_eq!(Reason::CsrIdentityMismatch.status(), 403);
        assert_eq!(Reason::CsrMalformed.status(), 400);
        assert_eq!(Reason::ClientCertificateRequired.status(), 401);
        assert_eq!(Reason::RateLimited.status(), 429);
        assert!(Reason::RateLimited.is_transient() && !Reason::TokenUsed.is_transient());
        assert_eq!(Reason::parse("nope"), None);
    }
}
