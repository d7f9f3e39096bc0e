//! Codec errors: what rule was broken ([`Violation`]) and by whom ([`H1Error`]).

use crate::error::Blame;

/// A rule of RFC 9110/9112 (or of meshgate's limits) that a message broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum Violation {
    #[error("message head larger than the limit")]
    HeadTooLarge,
    #[error("more header fields than the limit")]
    TooManyHeaders,
    #[error("request target longer than the limit")]
    TargetTooLong,
    #[error("HTTP/0.9 request line (no version)")]
    Http09,
    #[error("unsupported HTTP version")]
    UnsupportedVersion,
    #[error("malformed request line")]
    InvalidRequestLine,
    #[error("malformed status line")]
    InvalidStatusLine,
    #[error("invalid request target")]
    InvalidTarget,
    #[error("invalid byte in a header field name")]
    InvalidHeaderName,
    #[error("invalid byte in a header field value")]
    InvalidHeaderValue,
    #[error("whitespace between a header field name and the colon")]
    WhitespaceBeforeColon,
    #[error("obsolete line folding")]
    ObsFold,
    #[error("line not ended by CRLF (bare LF or bare CR)")]
    InvalidLineEnding,
    #[error("more Connection options than the limit")]
    TooManyConnectionOptions,
    #[error("HTTP/1.1 request without Host")]
    MissingHost,
    #[error("more than one Host field")]
    DuplicateHost,
    #[error("invalid Host")]
    InvalidHost,
    #[error("both Content-Length and Transfer-Encoding")]
    ContentLengthWithTransferEncoding,
    #[error("invalid Content-Length")]
    InvalidContentLength,
    #[error("Content-Length values differ")]
    ConflictingContentLength,
    #[error("Transfer-Encoding whose final coding is not chunked")]
    ChunkedNotFinal,
    #[error("malformed Transfer-Encoding")]
    InvalidTransferEncoding,
    #[error("transfer coding other than chunked")]
    UnsupportedTransferCoding,
    #[error("Transfer-Encoding in an HTTP/1.0 message")]
    Http10TransferEncoding,
    #[error("body larger than the limit")]
    BodyTooLarge,
    #[error("invalid chunk-size line")]
    InvalidChunkSize,
    #[error("chunk extension longer than the limit")]
    ChunkExtensionTooLong,
    #[error("chunk data not followed by CRLF")]
    MissingChunkCrlf,
    #[error("trailer section larger than the limit")]
    TrailersTooLarge,
    #[error("malformed trailer section")]
    InvalidTrailers,
    #[error("connection closed before the end of the body")]
    IncompleteBody,
    #[error("invalid status code")]
    InvalidStatus,
    #[error("encoded '/' or '\\' in the path")]
    EncodedSeparator,
    #[error("encoded NUL in the path")]
    EncodedNul,
    #[error("malformed percent-encoding in the path")]
    InvalidPercentEncoding,
    #[error("invalid byte in the path")]
    InvalidPath,
    #[error("header field managed by the codec (framing, connection, host)")]
    ManagedHeader,
    #[error("upgrade requested but the message carries no Upgrade field")]
    NoUpgrade,
}

impl Violation {
    /// The status a server answers a request that broke this rule with.
    pub fn request_status(self) -> u16 {
        match self {
            Violation::HeadTooLarge | Violation::TooManyHeaders => 431,
            Violation::TargetTooLong => 414,
            Violation::UnsupportedVersion => 505,
            Violation::UnsupportedTransferCoding => 501,
            Violation::BodyTooLarge => 413,
            _ => 400,
        }
    }
}

/// An HTTP/1 codec error: the broken rule and which side of the proxy broke it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum H1Error {
    /// The downstream client's request (head or body).
    #[error("invalid request from the client: {0}")]
    Request(Violation),
    /// The upstream's response (head or body).
    #[error("invalid response from the upstream: {0}")]
    Response(Violation),
    /// A route action (edit) would produce an invalid message: a configuration bug.
    #[error("route action would produce an invalid message: {0}")]
    Edit(Violation),
}

impl H1Error {
    /// The rule that was broken.
    pub fn violation(&self) -> Violation {
        match *self {
            H1Error::Request(v) | H1Error::Response(v) | H1Error::Edit(v) => v,
        }
    }

    /// Status to answer the downstream client with (if nothing has been sent yet):
    /// 400/413/414/431/501/505 for its own faults, 502 for the upstream's, 500 for ours.
    pub fn status(&self) -> u16 {
        match *self {
            H1Error::Request(v) => v.request_status(),
            H1Error::Response(_) => 502,
            H1Error::Edit(_) => 500,
        }
    }

    /// Who is at fault.
    pub fn blame(&self) -> Blame {
        match self {
            H1Error::Request(_) => Blame::Downstream,
            H1Error::Response(_) => Blame::Upstream,
            H1Error::Edit(_) => Blame::Internal,
        }
    }

    /// Envoy response flag for the access log: downstream/upstream protocol error.
    pub fn response_flag(&self) -> Option<&'static str> {
        match self {
            H1Error::Request(_) => Some("DPE"),
            H1Error::Response(_) => Some("UPE"),
            H1Error::Edit(_) => None,
        }
    }
}

/// Which side a message came from; decides the [`H1Error`] variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Request,
    Response,
}

impl Side {
    pub(crate) fn err(self, v: Violation) -> H1Error {
        match self {
            Side::Request => H1Error::Request(v),
            Side::Response => H1Error::Response(v),
        }
    }
}
