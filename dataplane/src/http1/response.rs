//! Response heads: `parse_response` and [`ResponseHead`], with the body rules that depend on
//! the request (RFC 9112 §6.3).

use std::mem::MaybeUninit;

use super::body::BodyDecoder;
use super::error::{H1Error, Side, Violation};
use super::fields::{
    ConnectionOptions, Field, FieldList, Fields, Known, Span, TransferCodings, classify,
    parse_content_length,
};
use super::request::{HeadProgress, check_line_endings, classify_error, has_head_end, partial};
use super::{Framing, Limits, MAX_HEADERS, Method, Parsed, Version};

/// A parsed response head; like [`super::RequestHead`], it holds offsets into its buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    version: Version,
    status: u16,
    framing: Framing,
    keep_alive: bool,
    tunnel: bool,
    upgrade: bool,
    conn_nominates: bool,
    content_length: Option<u64>,
    head_len: u32,
    reason: Span,
    upgrade_value: Span,
    fields: FieldList,
}

impl ResponseHead {
    pub fn version(&self) -> Version {
        self.version
    }

    pub fn status(&self) -> u16 {
        self.status
    }

    /// The reason phrase as sent (may be empty, may hold obs-text).
    pub fn reason<'b>(&self, buf: &'b [u8]) -> &'b [u8] {
        self.reason.get(buf)
    }

    /// How the body is delimited, given the request method this answers.
    pub fn framing(&self) -> Framing {
        self.framing
    }

    /// The Content-Length field, when present and meaningful: for a response to HEAD or a
    /// 304 it describes the body the request would have had, and is kept when forwarding.
    /// Always `None` for 1xx and 204.
    pub fn content_length(&self) -> Option<u64> {
        self.content_length
    }

    /// 1xx other than 101: a final response follows on the same connection.
    pub fn is_interim(&self) -> bool {
        (100..200).contains(&self.status) && self.status != 101
    }

    /// After this head the connection carries opaque bytes both ways: 101 Switching
    /// Protocols, or a 2xx answer to CONNECT.
    pub fn is_tunnel(&self) -> bool {
        self.tunnel
    }

    /// The Upgrade value of a 101 response.
    pub fn upgrade<'b>(&self, buf: &'b [u8]) -> Option<&'b [u8]> {
        self.upgrade.then(|| self.upgrade_value.get(buf))
    }

    /// The upstream connection can carry another request after this response's body.
    pub fn keep_alive(&self) -> bool {
        self.keep_alive
    }

    pub fn headers<'h, 'b>(&'h self, buf: &'b [u8]) -> Fields<'h, 'b> {
        Fields::new(&self.fields, buf)
    }

    pub fn header<'b>(&self, buf: &'b [u8], name: &str) -> Option<&'b [u8]> {
        self.headers(buf)
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    pub fn header_count(&self) -> usize {
        self.fields.len()
    }

    pub fn head_len(&self) -> usize {
        self.head_len as usize
    }

    /// A decoder for this response's body.
    pub fn body_decoder(&self, limits: &Limits) -> BodyDecoder {
        BodyDecoder::new(self.framing, limits, Side::Response)
    }

    pub(crate) fn fields(&self) -> &FieldList {
        &self.fields
    }

    pub(crate) fn conn_nominates(&self) -> bool {
        self.conn_nominates
    }

    pub(crate) fn upgrade_span(&self) -> Span {
        self.upgrade_value
    }
}

/// Parse a response head from the start of `buf`; `method` is the method of the request it
/// answers (HEAD and CONNECT change the body rules).
///
/// Response errors are the upstream's fault ([`H1Error::Response`], status 502). Stricter
/// than RFC 9112 in one place: a response with both Content-Length and Transfer-Encoding,
/// or with a transfer coding other than `chunked`, is refused rather than repaired.
pub fn parse_response(
    buf: &[u8],
    limits: &Limits,
    method: Method,
) -> Result<Parsed<ResponseHead>, H1Error> {
    parse_response_resumable(buf, limits, method, &mut HeadProgress::default())
}

/// [`parse_response`] that remembers (in `progress`) how much of `buf` it has searched.
pub fn parse_response_resumable(
    buf: &[u8],
    limits: &Limits,
    method: Method,
    progress: &mut HeadProgress,
) -> Result<Parsed<ResponseHead>, H1Error> {
    let result = parse_inner(buf, limits, method, progress);
    if !matches!(result, Ok(Parsed::Partial)) {
        *progress = HeadProgress::default();
    }
    result.map_err(H1Error::Response)
}

fn parse_inner(
    buf: &[u8],
    limits: &Limits,
    method: Method,
    progress: &mut HeadProgress,
) -> Result<Parsed<ResponseHead>, Violation> {
    let max = limits.head_limit();
    let window = &buf[..buf.len().min(max)];
    if progress.searched() > 0 && !has_head_end(window, progress.searched()) {
        return partial(window, buf.len(), max, limits, progress, false);
    }
    let mut raw = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        window,
        &mut raw[..limits.header_limit()],
    );
    match parsed {
        Ok(httparse::Status::Complete(len)) => {
            let head = build(window, len, &resp, method)?;
            Ok(Parsed::Complete {
                head,
                consumed: len,
            })
        }
        Ok(httparse::Status::Partial) => partial(window, buf.len(), max, limits, progress, false),
        Err(e) => Err(classify_error(window, e, false)),
    }
}

fn build(
    buf: &[u8],
    len: usize,
    resp: &httparse::Response<'_, '_>,
    method: Method,
) -> Result<ResponseHead, Violation> {
    let start = buf
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(buf.len());
    check_line_endings(buf, len, start, resp.headers)?;
    let version = if resp.version == Some(1) {
        Version::Http11
    } else {
        Version::Http10
    };
    let status = resp.code.unwrap_or(0);
    if status < 100 {
        return Err(Violation::InvalidStatus);
    }
    // "HTTP/1.1 200 " is 13 bytes; the reason runs to the end of the status line.
    let line_end = resp
        .headers
        .first()
        .map(|h| Span::of(buf, h.name.as_bytes()).start())
        .unwrap_or(len.saturating_sub(2))
        .saturating_sub(2);
    let reason_start = (start + 13).min(line_end);
    let reason = Span::at(reason_start, line_end - reason_start, buf.len());

    let mut fields = FieldList::default();
    let mut content_length: Option<u64> = None;
    let mut codings = TransferCodings::default();
    let mut conn = ConnectionOptions::default();
    let mut upgrade_value: Option<Span> = None;
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        let value = Span::of(buf, h.value);
        fields.push(Field {
            name: Span::of(buf, name),
            value,
        });
        match classify(name) {
            Known::ContentLength => {
                let n = parse_content_length(h.value)?;
                match content_length {
                    Some(m) if m != n => return Err(Violation::ConflictingContentLength),
                    _ => content_length = Some(n),
                }
            }
            Known::TransferEncoding => codings.add(h.value)?,
            Known::Connection => conn.add(h.value)?,
            Known::Upgrade if upgrade_value.is_none() => upgrade_value = Some(value),
            _ => {}
        }
    }
    if codings.present {
        if version == Version::Http10 {
            return Err(Violation::Http10TransferEncoding);
        }
        if content_length.is_some() {
            return Err(Violation::ContentLengthWithTransferEncoding);
        }
        if !codings.chunked_last || codings.other {
            return Err(Violation::UnsupportedTransferCoding);
        }
    }

    let switching = status == 101;
    let connect_ok = method == Method::Connect && (200..300).contains(&status);
    let tunnel = switching || connect_ok;
    let bodiless =
        method == Method::Head || (100..200).contains(&status) || status == 204 || status == 304;
    let framing = if bodiless || connect_ok {
        Framing::None
    } else if codings.present {
        Framing::Chunked
    } else if let Some(n) = content_length {
        Framing::Length(n)
    } else {
        Framing::CloseDelimited
    };
    if (100..200).contains(&status) || status == 204 || connect_ok {
        content_length = None;
    }
    let keep_alive = !tunnel
        && framing != Framing::CloseDelimited
        && match version {
            Version::Http11 => !conn.close,
            Version::Http10 => conn.keep_alive && !conn.close,
        };
    Ok(ResponseHead {
        version,
        status,
        framing,
        keep_alive,
        tunnel,
        upgrade: switching && upgrade_value.is_some(),
        conn_nominates: conn.nominates,
        content_length,
        head_len: u32::try_from(len).unwrap_or(u32::MAX),
        reason,
        upgrade_value: upgrade_value.unwrap_or_default(),
        fields,
    })
}
