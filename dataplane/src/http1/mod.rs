//! HTTP/1.1 codec: sans-IO parsing and encoding of message heads and bodies.
//!
//! Where it sits: the HTTP proxy stage reads bytes from a connection into a buffer and calls
//! [`parse_request`]; routing sees the [`RequestHead`] (and [`normalize_path`] of its path);
//! [`encode_request`] writes the upstream head; a [`BodyDecoder`] streams the body through in
//! fixed buffers; [`parse_response`] / [`encode_response`] do the same on the way back. No
//! sockets, no async, no allocation on the common path: heads store offsets into the caller's
//! buffer, bodies are yielded as slices of the input.
//!
//! Why not hyper: measured on this machine, hyper's HTTP/1 costs 4.5-5 µs more per proxied
//! request and ~12 KiB per idle connection (issue 4). The parser underneath is `httparse`;
//! this module adds the strict framing rules of RFC 9112 that make request smuggling
//! impossible through meshgate:
//!
//! - Content-Length together with Transfer-Encoding, differing or malformed Content-Length
//!   values, Transfer-Encoding in HTTP/1.0, `chunked` not the final (or only) coding: 400;
//!   other transfer codings in requests: 501.
//! - Obsolete line folding, whitespace before the colon, invalid bytes in names and values,
//!   and **bare LF** line endings (httparse tolerates those; this module rejects them: a
//!   front end that accepts a line ending the back end does not is a smuggling vector).
//! - HTTP/0.9 and unknown versions (505), missing or repeated Host in HTTP/1.1.
//! - Chunk-size lines: hex only, at most 16 digits, no overflow, bounded extensions, CRLF only.
//!
//! Everything a caller sees as an error is an [`H1Error`] that names the guilty party
//! ([`H1Error::blame`]) and the status to answer with ([`H1Error::status`]). No input panics
//! (fuzzed: `fuzz/fuzz_targets/http1.rs`, corpus replayed by the unit tests).
//!
//! One exchange as the proxy loop drives it (in memory here; on a connection, `Partial` or
//! `consumed == 0` mean "read more into the same buffer and call again"):
//!
//! ```
//! use meshgate_dataplane::http1::*;
//! # fn main() -> Result<(), H1Error> {
//! let limits = Limits::default();
//! // 1. Downstream head (the buffer may also hold body bytes and pipelined requests).
//! let client = b"POST /api/../v1/items HTTP/1.1\r\nHost: shop.example\r\nContent-Length: 5\r\n\r\nhello";
//! let mut progress = HeadProgress::default(); // one per connection
//! let Parsed::Complete { head, consumed } = parse_request_resumable(client, &limits, &mut progress)?
//! else {
//!     panic!("read more and call again");
//! };
//! // 2. Route on the effective host and the normalised path (400 on %2F, %00, ...).
//! let path = normalize_path(head.path(client).as_bytes())?;
//! assert_eq!((head.host(client), &*path), (Some("shop.example"), "/v1/items"));
//! // 3. Upstream head, route actions as edits; hop-by-hop fields are dropped.
//! let mut upstream = Vec::new();
//! let edits = RequestEdits {
//!     path: Some(path.as_bytes()),
//!     headers: HeaderEdits { add: &[("X-Forwarded-Proto", b"https")], ..HeaderEdits::default() },
//!     ..RequestEdits::default()
//! };
//! encode_request(&head, client, &edits, &mut upstream)?;
//! // 4. Stream the body: payload slices point into the input, nothing is copied.
//! let mut body = head.body_decoder(&limits);
//! let mut rest = &client[consumed..];
//! while !body.is_done() {
//!     let d = body.decode(rest)?;
//!     upstream.extend_from_slice(d.payload); // writev on a real connection
//!     rest = &rest[d.consumed..];
//!     assert!(d.consumed > 0, "read more");
//! }
//! assert!(upstream.ends_with(b"X-Forwarded-Proto: https\r\nContent-Length: 5\r\n\r\nhello"));
//! // 5. Response head: body rules depend on the request method.
//! let origin = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n";
//! let Parsed::Complete { head: resp, consumed } = parse_response(origin, &limits, head.method())?
//! else {
//!     panic!("read more and call again");
//! };
//! // 6. Downstream head: persistence is the client's choice, said in its HTTP version.
//! let mut downstream = Vec::new();
//! let edits = ResponseEdits {
//!     connection: Some(ConnectionHeader::for_peer(head.version(), head.keep_alive())),
//!     ..ResponseEdits::default()
//! };
//! encode_response(&resp, origin, &edits, &mut downstream)?;
//! // 7. Stream the response body back, re-chunked (here: same framing both sides).
//! let mut body = resp.body_decoder(&limits);
//! let mut rest = &origin[consumed..];
//! while !body.is_done() {
//!     let d = body.decode(rest)?;
//!     write_chunk(&mut downstream, d.payload);
//!     if body.is_done() {
//!         write_last_chunk(&mut downstream, d.trailers);
//!     }
//!     rest = &rest[d.consumed..];
//! }
//! assert_eq!(downstream, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n");
//! // 8. Keep-alive: both sides may carry the next exchange.
//! assert!(head.keep_alive() && resp.keep_alive());
//! # Ok(())
//! # }
//! ```

mod body;
mod encode;
mod error;
mod fields;
#[doc(hidden)]
pub mod fuzzing;
mod path;
mod request;
mod response;
#[cfg(test)]
mod tests;

pub use body::{BodyDecoder, ChunkHeader, Decoded, write_chunk, write_last_chunk};
pub use encode::{
    ConnectionHeader, HeaderEdits, RequestEdits, ResponseEdits, encode_request, encode_response,
    is_managed_header,
};
pub use error::{H1Error, Violation};
pub use fields::{Fields, Span};
pub use path::{normalize_path, split_query};
pub use request::{HeadProgress, RequestHead, TargetForm, parse_request, parse_request_resumable};
pub use response::{ResponseHead, parse_response, parse_response_resumable};

/// Hard upper bound on header fields per head (the parser's stack array).
pub const MAX_HEADERS: usize = 100;

/// Hard upper bound on a head's size whatever [`Limits`] says: offsets are stored as `u32`,
/// and nothing legitimate needs more.
pub const MAX_HEAD_SIZE: usize = 1 << 20;

/// Parser limits. Defaults are the edge-safe values of issue 4.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest head (request/status line + fields + CRLFs), in bytes; larger -> 431.
    pub max_head_size: usize,
    /// Most header fields in a head (and in a trailer section); more -> 431.
    /// Capped at [`MAX_HEADERS`].
    pub max_headers: usize,
    /// Longest request target; longer -> 414.
    pub max_target_len: usize,
    /// Largest body (declared Content-Length, or sum of chunks); larger -> 413.
    pub max_body_size: u64,
    /// Longest chunk extension on one chunk-size line.
    pub max_chunk_ext_len: usize,
    /// Largest trailer section after the last chunk.
    pub max_trailer_size: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_head_size: 64 * 1024,
            max_headers: MAX_HEADERS,
            max_target_len: 8 * 1024,
            max_body_size: u64::MAX,
            max_chunk_ext_len: 1024,
            max_trailer_size: 16 * 1024,
        }
    }
}

impl Limits {
    pub(crate) fn head_limit(&self) -> usize {
        self.max_head_size.clamp(32, MAX_HEAD_SIZE)
    }
    pub(crate) fn header_limit(&self) -> usize {
        self.max_headers.min(MAX_HEADERS)
    }
}

/// Result of parsing a head from a buffer that may not hold all of it yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed<H> {
    /// The head is complete: it took `consumed` bytes from the start of the buffer; the body
    /// (or the next pipelined message) starts there.
    Complete { head: H, consumed: usize },
    /// More bytes are needed; call again with the same buffer grown.
    Partial,
}

/// HTTP/1.x minor version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    Http10,
    Http11,
}

impl Version {
    pub fn as_str(self) -> &'static str {
        match self {
            Version::Http10 => "HTTP/1.0",
            Version::Http11 => "HTTP/1.1",
        }
    }
}

/// Request method. Extension methods are [`Method::Other`]; their text is in the head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Connect,
    Options,
    Trace,
    Patch,
    Other,
}

impl Method {
    pub(crate) fn from_token(token: &[u8]) -> Method {
        match token {
            b"GET" => Method::Get,
            b"HEAD" => Method::Head,
            b"POST" => Method::Post,
            b"PUT" => Method::Put,
            b"DELETE" => Method::Delete,
            b"CONNECT" => Method::Connect,
            b"OPTIONS" => Method::Options,
            b"TRACE" => Method::Trace,
            b"PATCH" => Method::Patch,
            _ => Method::Other,
        }
    }

    /// Idempotent per RFC 9110 §9.2.2: a retry after a failure cannot do harm twice.
    pub fn is_idempotent(self) -> bool {
        matches!(
            self,
            Method::Get
                | Method::Head
                | Method::Put
                | Method::Delete
                | Method::Options
                | Method::Trace
        )
    }
}

/// How a message body is delimited on the wire (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Framing {
    /// No body at all (a request without Content-Length/Transfer-Encoding, a response to
    /// HEAD, 1xx/204/304, a tunnel).
    None,
    /// Exactly this many bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Response body that ends when the upstream closes the connection.
    CloseDelimited,
}
