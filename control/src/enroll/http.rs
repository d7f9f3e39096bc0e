//! Sans-IO HTTP/1.1 for the enrollment server: parse a request head (httparse) under size caps,
//! and encode a response. No socket here, so every refusal path is testable on byte slices.
//!
//! Deliberately small: one request per connection (`Connection: close`), bodies only with
//! `Content-Length` (no chunked transfer coding; a `Transfer-Encoding` header is refused, which
//! also rules out CL/TE request smuggling), at most [`Limits::max_head`] bytes of head and
//! [`Limits::max_body`] of body.

use super::api::Reason;

/// Size caps.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Request line + headers, bytes.
    pub max_head: usize,
    pub max_headers: usize,
    /// Body bytes (a P-256 CSR in PEM is ~600; RSA-4096 ~1.8 KiB).
    pub max_body: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_head: 8 * 1024,
            max_headers: 32,
            max_body: 64 * 1024,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
    Other,
}

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub method: Method,
    /// The path without the query string.
    pub path: String,
    pub query: Option<String>,
    /// 0 when absent on a request that may have no body.
    pub content_length: usize,
    /// Bytes of the buffer the head took; the body starts here.
    pub head_len: usize,
    /// `Expect: 100-continue`: the client waits for an interim response before the body.
    pub expect_continue: bool,
}

impl Head {
    /// The value of `name` in the query string (`a=b&c=d`), without percent-decoding (the
    /// values meshgate reads are plain words).
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query.as_deref()?.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k == name).then_some(v)
        })
    }
}

/// Why a head was refused: the reason (and so the status) and a message for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpError {
    pub reason: Reason,
    pub message: &'static str,
}

fn bad(message: &'static str) -> HttpError {
    HttpError {
        reason: Reason::BadRequest,
        message,
    }
}

/// Parse the request head at the start of `buf`. `Ok(None)`: incomplete, read more (the caller
/// stops at [`Limits::max_head`], which this also enforces).
pub fn parse_head(buf: &[u8], limits: &Limits) -> Result<Option<Head>, HttpError> {
    let too_large = HttpError {
        reason: Reason::TooLarge,
        message: "the request head is too large",
    };
    let mut headers = vec![httparse::EMPTY_HEADER; limits.max_headers];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() >= limits.max_head {
                Err(too_large)
            } else {
                Ok(None)
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Err(too_large),
        Err(_) => return Err(bad("malformed HTTP/1.1 request")),
    };
    if head_len > limits.max_head {
        return Err(too_large);
    }
    let method = match req.method {
        Some("GET") => Method::Get,
        Some("POST") => Method::Post,
        _ => Method::Other,
    };
    let target = req.path.ok_or_else(|| bad("no request target"))?;
    if !target.starts_with('/') {
        return Err(bad("the request target must be a path (origin form)"));
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
        None => (target.to_owned(), None),
    };
    let mut content_length: Option<usize> = None;
    let mut expect_continue = false;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("expect") && h.value.eq_ignore_ascii_case(b"100-continue") {
            expect_continue = true;
        }
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(bad(
                "Transfer-Encoding is not accepted; send the body with Content-Length",
            ));
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            if content_length.is_some() {
                return Err(bad("more than one Content-Length header"));
            }
            let v = std::str::from_utf8(h.value)
                .ok()
                .map(str::trim)
                .filter(|v| !v.is_empty() && v.len() <= 10 && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<usize>().ok())
                .ok_or_else(|| bad("Content-Length is not a number"))?;
            content_length = Some(v);
        }
    }
    let content_length = match (method, content_length) {
        (Method::Post, None) => {
            return Err(HttpError {
                reason: Reason::LengthRequired,
                message: "a POST needs a Content-Length header",
            });
        }
        (_, v) => v.unwrap_or(0),
    };
    if content_length > limits.max_body {
        return Err(HttpError {
            reason: Reason::TooLarge,
            message: "the request body is too large",
        });
    }
    Ok(Some(Head {
        method,
        path,
        query,
        content_length,
        head_len,
        expect_continue,
    }))
}

fn status_text(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// A response to encode with [`Response::encode`].
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(status: u16, v: &impl serde::Serialize) -> Response {
        let mut body = serde_json::to_vec(v).unwrap_or_else(|_| b"{}".to_vec());
        body.push(b'\n');
        Response {
            status,
            content_type: "application/json",
            headers: Vec::new(),
            body,
        }
    }

    pub fn text(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Response {
        Response {
            status,
            content_type,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    pub fn refusal(reason: Reason, message: impl Into<String>) -> Response {
        Response::json(
            reason.status(),
            &super::api::ErrorBody {
                error: reason.as_str().to_owned(),
                message: message.into(),
            },
        )
    }

    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Response {
        self.headers.push((name, value.into()));
        self
    }

    /// The bytes on the wire. Header values come from the server itself, never from the
    /// request, so no header injection is possible; CR/LF are dropped anyway.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: {}\r\ncontent-length: {}\r\ncache-control: no-store\r\nconnection: close\r\n",
            self.status,
            status_text(self.status),
            self.content_type,
            self.body.len()
        );
        for (k, v) in &self.headers {
            let v: String = v.chars().filter(|c| *c != '\r' && *c != '\n').collect();
            out.push_str(k);
            out.push_str(": ");
            out.push_str(&v);
            out.push_str("\r\n");
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(&self.body);
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(b: &[u8]) -> Result<Option<Head>, HttpError> {
        parse_head(b, &Limits::default())
    }

    #[test]
    fn parses_a_post_and_a_get() {
        let req =
            b"POST /v1/enroll HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n\r\n{\"a\":\"b\"}...";
        let h = parse(req).expect("ok").expect("complete");
        assert_eq!(h.method, Method::Post);
        assert_eq!(h.path, "/v1/enroll");
        assert_eq!(h.content_length, 12);
        assert_eq!(&req[h.head_len..h.head_len + 3], b"{\"a");
        let h = parse(b"GET /v1/bundle?format=pem&x HTTP/1.1\r\n\r\n")
            .expect("ok")
            .expect("complete");
        assert_eq!(h.method, Method::Get);
        assert_eq!(h.query_param("format"), Some("pem"));
        assert_eq!(h.query_param("x"), Some(""));
        assert_eq!(h.query_param("y"), None);
        assert_eq!(h.content_length, 0);
        assert!(!h.expect_continue);
        let h = parse(
            b"POST /v1/enroll HTTP/1.1\r\nExpect: 100-Continue\r\nContent-Length: 2000\r\n\r\n",
        )
        .expect("ok")
        .expect("complete");
        assert!(h.expect_continue);
    }

    #[test]
    fn incomplete_then_too_large() {
        assert_eq!(parse(b"POST /v1/enroll HTTP/1.1\r\nHost"), Ok(None));
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.resize(9000, b'a');
        assert_eq!(parse(&big).map_err(|e| e.reason), Err(Reason::TooLarge));
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..40 {
            many.extend_from_slice(format!("H{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(parse(&many).map_err(|e| e.reason), Err(Reason::TooLarge));
    }

    #[test]
    fn refuses_what_it_does_not_speak() {
        let cases: &[(&[u8], Reason)] = &[
            (b"\x16\x03\x01\x00\x00garbage\r\n\r\n", Reason::BadRequest),
            (b"POST /v1/enroll HTTP/1.1\r\n\r\n", Reason::LengthRequired),
            (
                b"POST /v1/enroll HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                Reason::BadRequest,
            ),
            (
                b"POST /v1/enroll HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
                Reason::BadRequest,
            ),
            (
                b"POST /v1/enroll HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
                Reason::BadRequest,
            ),
            (
                b"POST /v1/enroll HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
                Reason::BadRequest,
            ),
            (
                b"POST /v1/enroll HTTP/1.1\r\nContent-Length: 70000\r\n\r\n",
                Reason::TooLarge,
            ),
            (b"GET http://x/ HTTP/1.1\r\n\r\n", Reason::BadRequest),
        ];
        for (bytes, want) in cases {
            assert_eq!(
                parse(bytes).map_err(|e| e.reason),
                Err(*want),
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A small deterministic generator (xorshift): prefixes of valid requests with random
        // bytes spliced in.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let seed = b"POST /v1/renew HTTP/1.1\r\nContent-Length: 5\r\nHost: a\r\n\r\nhello";
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut buf = seed.to_vec();
            let n = (x % 8) as usize;
            for k in 0..n {
                let pos = ((x >> (8 * k)) as usize) % buf.len();
                buf[pos] = (x >> (3 * k)) as u8;
            }
            buf.truncate(((x >> 40) as usize) % (buf.len() + 1));
            let _ = parse(&buf);
        }
    }

    #[test]
    fn responses_encode_with_length_and_close() {
        let r = Response::refusal(Reason::RateLimited, "slow down").header("retry-after", "3");
        let text = String::from_utf8(r.encode()).expect("utf8");
        assert!(
            text.starts_with("HTTP/1.1 429 Too Many Requests\r\n"),
            "{text}"
        );
        assert!(text.contains("\r\nretry-after: 3\r\n"));
        assert!(text.contains("connection: close"));
        assert!(text.ends_with("\"error\":\"rate_limited\",\"message\":\"slow down\"}\n"));
        let body_len = text.split("\r\n\r\n").nth(1).expect("body").len();
        assert!(text.contains(&format!("content-length: {body_len}\r\n")));
    }
}
