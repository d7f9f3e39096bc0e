//! Request heads: `parse_request` and [`RequestHead`].

use std::mem::MaybeUninit;

use super::body::BodyDecoder;
use super::error::{H1Error, Side, Violation};
use super::fields::{
    ConnectionOptions, Field, FieldList, Fields, Known, Span, TransferCodings, classify,
    parse_content_length, valid_authority,
};
use super::{Framing, Limits, MAX_HEADERS, Method, Parsed, Version};

/// Longest method token accepted (the longest registered method is 17 bytes).
const MAX_METHOD_LEN: usize = 32;

/// The form of a request target (RFC 9112 §3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TargetForm {
    /// `/path?query`: the usual form.
    Origin,
    /// `http://host/path?query`: a request to a proxy; the host comes from the target.
    Absolute,
    /// `host:port`: CONNECT only.
    Authority,
    /// `*`: OPTIONS only.
    Asterisk,
}

/// A parsed request head. Holds offsets into the buffer it was parsed from: every accessor
/// that returns text takes that buffer (`buf`) again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    method: Method,
    version: Version,
    form: TargetForm,
    framing: Framing,
    keep_alive: bool,
    expect_continue: bool,
    upgrade: bool,
    has_host: bool,
    conn_nominates: bool,
    head_len: u32,
    method_span: Span,
    target: Span,
    path: Span,
    host: Span,
    upgrade_value: Span,
    fields: FieldList,
}

impl RequestHead {
    pub fn method(&self) -> Method {
        self.method
    }

    /// The method as sent (case-sensitive token).
    pub fn method_str<'b>(&self, buf: &'b [u8]) -> &'b str {
        self.method_span.get_str(buf)
    }

    pub fn version(&self) -> Version {
        self.version
    }

    pub fn target_form(&self) -> TargetForm {
        self.form
    }

    /// The request target exactly as sent.
    pub fn target<'b>(&self, buf: &'b [u8]) -> &'b str {
        self.target.get_str(buf)
    }

    /// Path and query: the target for origin-form, the part after the authority for
    /// absolute-form (may be empty, meaning `/`), `*` for asterisk-form, empty for CONNECT.
    /// Routing wants [`super::normalize_path`] of this.
    pub fn path<'b>(&self, buf: &'b [u8]) -> &'b str {
        self.path.get_str(buf)
    }

    /// The effective host (`host[:port]`, as sent): the authority of an absolute-form or
    /// authority-form target, else the Host field. `None` only for HTTP/1.0 without Host.
    pub fn host<'b>(&self, buf: &'b [u8]) -> Option<&'b str> {
        self.has_host.then(|| self.host.get_str(buf))
    }

    /// How the request body is delimited: `None`, `Length` or `Chunked`.
    pub fn framing(&self) -> Framing {
        self.framing
    }

    pub fn content_length(&self) -> Option<u64> {
        match self.framing {
            Framing::Length(n) => Some(n),
            _ => None,
        }
    }

    pub fn is_chunked(&self) -> bool {
        self.framing == Framing::Chunked
    }

    /// The client wants the connection kept open after this exchange (HTTP/1.1 unless
    /// `Connection: close`; HTTP/1.0 only with `Connection: keep-alive`).
    pub fn keep_alive(&self) -> bool {
        self.keep_alive
    }

    /// `Expect: 100-continue` (ignored in HTTP/1.0, RFC 9110 §10.1.1).
    pub fn expect_continue(&self) -> bool {
        self.expect_continue
    }

    /// HTTP/1.1 request with `Connection: upgrade` and an Upgrade field.
    pub fn is_upgrade(&self) -> bool {
        self.upgrade
    }

    /// The Upgrade field's value when [`RequestHead::is_upgrade`].
    pub fn upgrade<'b>(&self, buf: &'b [u8]) -> Option<&'b [u8]> {
        self.upgrade.then(|| self.upgrade_value.get(buf))
    }

    /// An upgrade to cleartext HTTP/2 (`Upgrade: h2c`), which is never forwarded.
    pub fn is_h2c_upgrade(&self, buf: &[u8]) -> bool {
        self.upgrade(buf)
            .is_some_and(|v| super::fields::list_contains(v, b"h2c"))
    }

    /// All fields, in arrival order.
    pub fn headers<'h, 'b>(&'h self, buf: &'b [u8]) -> Fields<'h, 'b> {
        Fields::new(&self.fields, buf)
    }

    /// The first field called `name` (case-insensitive).
    pub fn header<'b>(&self, buf: &'b [u8], name: &str) -> Option<&'b [u8]> {
        self.headers(buf)
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    pub fn header_count(&self) -> usize {
        self.fields.len()
    }

    /// Length of the head in bytes (where the body starts).
    pub fn head_len(&self) -> usize {
        self.head_len as usize
    }

    /// A decoder for this request's body.
    pub fn body_decoder(&self, limits: &Limits) -> BodyDecoder {
        BodyDecoder::new(self.framing, limits, Side::Request)
    }

    pub(crate) fn fields(&self) -> &FieldList {
        &self.fields
    }

    pub(crate) fn method_bytes<'b>(&self, buf: &'b [u8]) -> &'b [u8] {
        self.method_span.get(buf)
    }

    pub(crate) fn target_bytes<'b>(&self, buf: &'b [u8]) -> &'b [u8] {
        self.target.get(buf)
    }

    pub(crate) fn path_bytes<'b>(&self, buf: &'b [u8]) -> &'b [u8] {
        self.path.get(buf)
    }

    pub(crate) fn host_bytes<'b>(&self, buf: &'b [u8]) -> &'b [u8] {
        self.host.get(buf)
    }

    pub(crate) fn conn_nominates(&self) -> bool {
        self.conn_nominates
    }

    pub(crate) fn upgrade_span(&self) -> Span {
        self.upgrade_value
    }
}

/// How far a growing buffer has been searched for the end of a head, so that a client
/// trickling a head byte by byte costs O(n) in total instead of O(n²) re-parses.
///
/// Use one per connection with [`parse_request_resumable`]; the buffer must keep its start
/// between calls. Resets itself when a head completes or fails.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeadProgress {
    searched: usize,
    line_seen: bool,
}

impl HeadProgress {
    pub(crate) fn searched(&self) -> usize {
        self.searched
    }
}

/// Parse a request head from the start of `buf`.
///
/// `Ok(Parsed::Partial)` means read more and call again with the grown buffer. A head larger
/// than `limits.max_head_size` is an error even before it is complete. Stateless: prefer
/// [`parse_request_resumable`] on connections, which does not re-parse on every read.
pub fn parse_request(buf: &[u8], limits: &Limits) -> Result<Parsed<RequestHead>, H1Error> {
    parse_request_resumable(buf, limits, &mut HeadProgress::default())
}

/// [`parse_request`] that remembers (in `progress`) how much of `buf` it has searched.
pub fn parse_request_resumable(
    buf: &[u8],
    limits: &Limits,
    progress: &mut HeadProgress,
) -> Result<Parsed<RequestHead>, H1Error> {
    let result = parse_inner(buf, limits, progress);
    if !matches!(result, Ok(Parsed::Partial)) {
        *progress = HeadProgress::default();
    }
    result.map_err(H1Error::Request)
}

fn parse_inner(
    buf: &[u8],
    limits: &Limits,
    progress: &mut HeadProgress,
) -> Result<Parsed<RequestHead>, Violation> {
    let max = limits.head_limit();
    let window = &buf[..buf.len().min(max)];
    if progress.searched > 0 && !has_head_end(window, progress.searched) {
        return partial(window, buf.len(), max, limits, progress, true);
    }
    let mut raw = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut req,
        window,
        &mut raw[..limits.header_limit()],
    );
    match parsed {
        Ok(httparse::Status::Complete(len)) => {
            let head = build(window, len, &req, limits)?;
            Ok(Parsed::Complete {
                head,
                consumed: len,
            })
        }
        Ok(httparse::Status::Partial) => partial(window, buf.len(), max, limits, progress, true),
        Err(e) => Err(classify_error(window, e, true)),
    }
}

/// A head is not complete in `window`: wait for more, or fail if it cannot fit.
pub(crate) fn partial<H>(
    window: &[u8],
    total: usize,
    max: usize,
    limits: &Limits,
    progress: &mut HeadProgress,
    is_request: bool,
) -> Result<Parsed<H>, Violation> {
    if is_request && !progress.line_seen {
        // Longest valid request line: method, SP, target, SP, "HTTP/1.1", CR.
        let line_limit = limits.max_target_len.saturating_add(MAX_METHOD_LEN + 11);
        if window.len() > line_limit || total >= max {
            if window.contains(&b'\n') {
                progress.line_seen = true;
            } else {
                return Err(Violation::TargetTooLong);
            }
        }
    }
    if total >= max {
        return Err(Violation::HeadTooLarge);
    }
    progress.searched = window.len();
    Ok(Parsed::Partial)
}

/// Whether `window` contains an empty line ("\n\n" or "\n\r\n") at or after `searched - 2`.
pub(crate) fn has_head_end(window: &[u8], searched: usize) -> bool {
    let from = searched.saturating_sub(2);
    let Some(tail) = window.get(from..) else {
        return false;
    };
    let mut rest = tail;
    while let Some(i) = rest.iter().position(|&b| b == b'\n') {
        match rest.get(i + 1..) {
            Some([b'\n', ..]) | Some([b'\r', b'\n', ..]) => return true,
            Some([]) | Some([b'\r']) | None => return false,
            Some(_) => rest = &rest[i + 1..],
        }
    }
    false
}

/// The head must use CRLF everywhere: httparse accepts bare LF, meshgate does not.
/// Lines are delimited by the fields' name offsets and the head's end, so this costs
/// O(fields), not O(bytes).
pub(crate) fn check_line_endings(
    buf: &[u8],
    len: usize,
    first_line_start: usize,
    fields: &[httparse::Header<'_>],
) -> Result<(), Violation> {
    let crlf_before = |at: usize| at >= 2 && buf.get(at - 2..at) == Some(b"\r\n");
    let lead = buf.get(..first_line_start).unwrap_or_default();
    if lead.len() % 2 != 0 || lead.chunks(2).any(|pair| pair != b"\r\n") {
        return Err(Violation::InvalidLineEnding);
    }
    for f in fields {
        if !crlf_before(Span::of(buf, f.name.as_bytes()).start()) {
            return Err(Violation::InvalidLineEnding);
        }
    }
    if !(crlf_before(len) && crlf_before(len.saturating_sub(2))) {
        return Err(Violation::InvalidLineEnding);
    }
    Ok(())
}

fn build(
    buf: &[u8],
    len: usize,
    req: &httparse::Request<'_, '_>,
    limits: &Limits,
) -> Result<RequestHead, Violation> {
    let method_bytes = req.method.unwrap_or_default().as_bytes();
    let target_bytes = req.path.unwrap_or_default().as_bytes();
    let method_span = Span::of(buf, method_bytes);
    check_line_endings(buf, len, method_span.start(), req.headers)?;

    let version = if req.version == Some(1) {
        Version::Http11
    } else {
        Version::Http10
    };
    if method_bytes.len() > MAX_METHOD_LEN {
        return Err(Violation::InvalidRequestLine);
    }
    let method = Method::from_token(method_bytes);
    let target = Span::of(buf, target_bytes);
    if target_bytes.len() > limits.max_target_len {
        return Err(Violation::TargetTooLong);
    }
    // httparse admits UTF-8 in targets; RFC 9112 does not (percent-encode it).
    if !target_bytes
        .iter()
        .all(|&b| (b'!'..=b'~').contains(&b) && b != b'#')
    {
        return Err(Violation::InvalidTarget);
    }
    let (form, path, mut host) = classify_target(buf, target_bytes, method)?;

    let mut fields = FieldList::default();
    let mut content_length: Option<u64> = None;
    let mut codings = TransferCodings::default();
    let mut conn = ConnectionOptions::default();
    let mut host_fields = 0u32;
    let mut expect_continue = false;
    let mut upgrade_value: Option<Span> = None;
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        let value = Span::of(buf, h.value);
        fields.push(Field {
            name: Span::of(buf, name),
            value,
        });
        match classify(name) {
            Known::Host => {
                host_fields += 1;
                if host_fields > 1 {
                    return Err(Violation::DuplicateHost);
                }
                if !valid_authority(h.value, false) {
                    return Err(Violation::InvalidHost);
                }
                if form == TargetForm::Origin || form == TargetForm::Asterisk {
                    host = Some(value);
                }
            }
            Known::ContentLength => {
                let n = parse_content_length(h.value)?;
                match content_length {
                    Some(m) if m != n => return Err(Violation::ConflictingContentLength),
                    _ => content_length = Some(n),
                }
            }
            Known::TransferEncoding => codings.add(h.value)?,
            Known::Connection => conn.add(h.value)?,
            Known::Expect => {
                expect_continue |= h.value.eq_ignore_ascii_case(b"100-continue");
            }
            Known::Upgrade if upgrade_value.is_none() => upgrade_value = Some(value),
            _ => {}
        }
    }

    if version == Version::Http11 && host_fields == 0 {
        return Err(Violation::MissingHost);
    }
    let framing = if codings.present {
        if version == Version::Http10 {
            return Err(Violation::Http10TransferEncoding);
        }
        if content_length.is_some() {
            return Err(Violation::ContentLengthWithTransferEncoding);
        }
        if !codings.chunked_last {
            return Err(Violation::ChunkedNotFinal);
        }
        if codings.other {
            return Err(Violation::UnsupportedTransferCoding);
        }
        Framing::Chunked
    } else if let Some(n) = content_length {
        if n > limits.max_body_size {
            return Err(Violation::BodyTooLarge);
        }
        Framing::Length(n)
    } else {
        Framing::None
    };
    let keep_alive = match version {
        Version::Http11 => !conn.close,
        Version::Http10 => conn.keep_alive && !conn.close,
    };
    let upgrade = version == Version::Http11 && conn.upgrade && upgrade_value.is_some();

    Ok(RequestHead {
        method,
        version,
        form,
        framing,
        keep_alive,
        expect_continue: expect_continue && version == Version::Http11,
        upgrade,
        has_host: host.is_some(),
        conn_nominates: conn.nominates,
        head_len: u32::try_from(len).unwrap_or(u32::MAX),
        method_span,
        target,
        path,
        host: host.unwrap_or_default(),
        upgrade_value: upgrade_value.unwrap_or_default(),
        fields,
    })
}

/// Form, path span and (for absolute/authority-form) host span of a target.
fn classify_target(
    buf: &[u8],
    target: &[u8],
    method: Method,
) -> Result<(TargetForm, Span, Option<Span>), Violation> {
    if method == Method::Connect {
        if !valid_authority(target, true) {
            return Err(Violation::InvalidTarget);
        }
        let empty = Span::of(buf, &target[target.len()..]);
        return Ok((TargetForm::Authority, empty, Some(Span::of(buf, target))));
    }
    if target.starts_with(b"/") {
        return Ok((TargetForm::Origin, Span::of(buf, target), None));
    }
    if target == b"*" {
        if method != Method::Options {
            return Err(Violation::InvalidTarget);
        }
        return Ok((TargetForm::Asterisk, Span::of(buf, target), None));
    }
    let (authority, path) = split_absolute(target).ok_or(Violation::InvalidTarget)?;
    if authority.is_empty() || !valid_authority(authority, false) {
        return Err(Violation::InvalidTarget);
    }
    Ok((
        TargetForm::Absolute,
        Span::of(buf, path),
        Some(Span::of(buf, authority)),
    ))
}

/// `http://authority/path?query` -> (authority, "/path?query"); http and https only.
fn split_absolute(target: &[u8]) -> Option<(&[u8], &[u8])> {
    let sep = target.windows(3).position(|w| w == b"://")?;
    let scheme = &target[..sep];
    if !(scheme.eq_ignore_ascii_case(b"http") || scheme.eq_ignore_ascii_case(b"https")) {
        return None;
    }
    let rest = &target[sep + 3..];
    let end = rest
        .iter()
        .position(|&b| b == b'/' || b == b'?')
        .unwrap_or(rest.len());
    Some((&rest[..end], &rest[end..]))
}

/// Name the rule an httparse error broke, looking at the bytes (error path only).
pub(crate) fn classify_error(buf: &[u8], e: httparse::Error, is_request: bool) -> Violation {
    let start = buf
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(buf.len());
    let first = &buf[start..];
    let line_end = first
        .iter()
        .position(|&b| b == b'\r' || b == b'\n')
        .unwrap_or(first.len());
    let line = &first[..line_end];
    match e {
        httparse::Error::Version => {
            let version = if is_request {
                line.rsplit(|&b| b == b' ').next().unwrap_or_default()
            } else {
                line
            };
            match version {
                [b'H', b'T', b'T', b'P', b'/', d, ..] if d.is_ascii_digit() => {
                    Violation::UnsupportedVersion
                }
                _ if is_request => Violation::InvalidRequestLine,
                _ => Violation::InvalidStatusLine,
            }
        }
        httparse::Error::Token => {
            let spaces = line.iter().filter(|&&b| b == b' ').count();
            if is_request && spaces == 1 && line_end < first.len() && !line.ends_with(b" ") {
                Violation::Http09
            } else {
                Violation::InvalidRequestLine
            }
        }
        httparse::Error::HeaderName => classify_field_line(&first[line_end..]),
        httparse::Error::HeaderValue => Violation::InvalidHeaderValue,
        httparse::Error::NewLine => Violation::InvalidLineEnding,
        httparse::Error::TooManyHeaders => Violation::TooManyHeaders,
        httparse::Error::Status => Violation::InvalidStatusLine,
    }
}

/// Find the field line httparse tripped on and say what is wrong with it.
pub(crate) fn classify_field_line(after_first_line: &[u8]) -> Violation {
    for raw in after_first_line.split(|&b| b == b'\n').skip(1) {
        let line = raw.strip_suffix(b"\r").unwrap_or(raw);
        match line.first() {
            None => break,
            Some(b' ' | b'\t') => return Violation::ObsFold,
            Some(_) => {}
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return Violation::InvalidHeaderName;
        };
        let name = &line[..colon];
        if !super::fields::is_token(name) {
            let trimmed = super::fields::trim_ows(name);
            return if trimmed.len() < name.len() && super::fields::is_token(trimmed) {
                Violation::WhitespaceBeforeColon
            } else {
                Violation::InvalidHeaderName
            };
        }
    }
    Violation::InvalidHeaderName
}
