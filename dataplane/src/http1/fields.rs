//! Header fields stored as offsets into the caller's buffer, and the small syntax helpers
//! shared by requests, responses and the encoder.

use super::error::Violation;

/// A byte range of the buffer a head was parsed from.
///
/// Accessors never panic: a span applied to the wrong (shorter) buffer yields an empty slice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Span {
    start: u32,
    len: u32,
}

impl Span {
    pub const EMPTY: Span = Span { start: 0, len: 0 };

    /// The span of `part`, which must be a sub-slice of `buf`; [`Span::EMPTY`] otherwise.
    pub(crate) fn of(buf: &[u8], part: &[u8]) -> Span {
        let start = part.as_ptr().addr().wrapping_sub(buf.as_ptr().addr());
        if start <= buf.len() && part.len() <= buf.len() - start && buf.len() <= u32::MAX as usize {
            Span {
                start: start as u32,
                len: part.len() as u32,
            }
        } else {
            Span::EMPTY
        }
    }

    pub(crate) fn at(start: usize, len: usize, buf_len: usize) -> Span {
        match (u32::try_from(start), u32::try_from(len)) {
            (Ok(s), Ok(l)) if start.saturating_add(len) <= buf_len => Span { start: s, len: l },
            _ => Span::EMPTY,
        }
    }

    pub fn start(&self) -> usize {
        self.start as usize
    }

    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn end(&self) -> usize {
        self.start() + self.len()
    }

    /// The bytes of this span in `buf` (the buffer the head was parsed from).
    pub fn get<'b>(&self, buf: &'b [u8]) -> &'b [u8] {
        buf.get(self.start()..self.end()).unwrap_or_default()
    }

    /// As [`Span::get`], as text; empty if not UTF-8 (names and targets are ASCII by parse).
    pub fn get_str<'b>(&self, buf: &'b [u8]) -> &'b str {
        std::str::from_utf8(self.get(buf)).unwrap_or_default()
    }
}

/// One header field line: name and value (value without surrounding whitespace).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Field {
    pub(crate) name: Span,
    pub(crate) value: Span,
}

/// Fields kept inline before the list spills to the heap.
pub(crate) const INLINE_FIELDS: usize = 32;

/// Header fields in arrival order: the first [`INLINE_FIELDS`] inline (no allocation for a
/// typical request), the rest in a `Vec`.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct FieldList {
    len: u32,
    inline: [Field; INLINE_FIELDS],
    spill: Vec<Field>,
}

impl Default for FieldList {
    fn default() -> Self {
        FieldList {
            len: 0,
            inline: [Field::default(); INLINE_FIELDS],
            spill: Vec::new(),
        }
    }
}

impl std::fmt::Debug for FieldList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl FieldList {
    pub(crate) fn push(&mut self, field: Field) {
        let at = self.len as usize;
        match self.inline.get_mut(at) {
            Some(slot) => *slot = field,
            None => self.spill.push(field),
        }
        self.len += 1;
    }

    pub(crate) fn len(&self) -> usize {
        self.len as usize
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Field> + Clone {
        let inline = self.len().min(INLINE_FIELDS);
        self.inline[..inline].iter().chain(self.spill.iter())
    }
}

/// Iterator over `(name, value)` of a head's fields, in arrival order.
#[derive(Clone)]
pub struct Fields<'h, 'b> {
    pub(crate) inner: std::iter::Chain<std::slice::Iter<'h, Field>, std::slice::Iter<'h, Field>>,
    pub(crate) buf: &'b [u8],
}

impl std::fmt::Debug for Fields<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fields").finish_non_exhaustive()
    }
}

impl<'h, 'b> Fields<'h, 'b> {
    pub(crate) fn new(list: &'h FieldList, buf: &'b [u8]) -> Self {
        let inline = list.len().min(INLINE_FIELDS);
        Fields {
            inner: list.inline[..inline].iter().chain(list.spill.iter()),
            buf,
        }
    }
}

impl<'b> Iterator for Fields<'_, 'b> {
    type Item = (&'b str, &'b [u8]);
    fn next(&mut self) -> Option<Self::Item> {
        let f = self.inner.next()?;
        Some((f.name.get_str(self.buf), f.value.get(self.buf)))
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        self.inner.size_hint()
    }
}

/// Header names the codec treats specially.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Known {
    Host,
    ContentLength,
    TransferEncoding,
    Connection,
    KeepAlive,
    ProxyConnection,
    Te,
    Trailer,
    Upgrade,
    Expect,
    Other,
}

/// Special names by length: (lower-case first byte, kind, name). Lengths 7 and 10 have two.
const BY_LEN: [[(u8, Known, &[u8]); 2]; 18] = {
    const NONE: (u8, Known, &[u8]) = (0, Known::Other, b"");
    let mut t = [[NONE; 2]; 18];
    t[2][0] = (b't', Known::Te, b"te");
    t[4][0] = (b'h', Known::Host, b"host");
    t[6][0] = (b'e', Known::Expect, b"expect");
    t[7][0] = (b'u', Known::Upgrade, b"upgrade");
    t[7][1] = (b't', Known::Trailer, b"trailer");
    t[10][0] = (b'c', Known::Connection, b"connection");
    t[10][1] = (b'k', Known::KeepAlive, b"keep-alive");
    t[14][0] = (b'c', Known::ContentLength, b"content-length");
    t[16][0] = (b'p', Known::ProxyConnection, b"proxy-connection");
    t[17][0] = (b't', Known::TransferEncoding, b"transfer-encoding");
    t
};

pub(crate) fn classify(name: &[u8]) -> Known {
    // Table lookups and predictable compares: no jump table to mispredict per field.
    let (Some(candidates), Some(&first)) = (BY_LEN.get(name.len()), name.first()) else {
        return Known::Other;
    };
    let first = first | 0x20;
    for &(f, known, lit) in candidates {
        if f == first && eq_lowercase_token(name, lit) {
            return known;
        }
    }
    Known::Other
}

/// `name == lit` ignoring ASCII case, for a lower-case `lit` of letters and `-` and a `name`
/// of token bytes (no CR or other control byte, the only ones `| 0x20` could confuse with
/// `-` or a letter). Eight bytes at a time: this runs for every field of every message.
fn eq_lowercase_token(name: &[u8], lit: &[u8]) -> bool {
    const LOWER: u64 = 0x2020_2020_2020_2020;
    let word = |s: &[u8], at: usize| {
        s.get(at..at + 8)
            .and_then(|w| <[u8; 8]>::try_from(w).ok())
            .map(u64::from_le_bytes)
    };
    let n = name.len();
    if n != lit.len() {
        return false;
    }
    if n < 8 {
        return name.iter().zip(lit).all(|(&a, &b)| a | 0x20 == b);
    }
    let mut at = 0;
    loop {
        // The last word may overlap the previous one.
        let at_now = at.min(n - 8);
        match (word(name, at_now), word(lit, at_now)) {
            (Some(a), Some(b)) if a | LOWER == b => {}
            _ => return false,
        }
        if at_now + 8 >= n {
            return true;
        }
        at += 8;
    }
}

/// RFC 9110 `tchar`.
pub(crate) fn is_tchar(b: u8) -> bool {
    matches!(b,
        b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9'
        | b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'*' | b'+' | b'-' | b'.'
        | b'^' | b'_' | b'`' | b'|' | b'~')
}

pub(crate) fn is_token(s: &[u8]) -> bool {
    !s.is_empty() && s.iter().all(|&b| is_tchar(b))
}

/// A field value byte (RFC 9110 `field-vchar` / SP / HTAB): no CR, LF, NUL or other controls.
pub(crate) fn is_value_byte(b: u8) -> bool {
    b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80
}

pub(crate) fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// Elements of a comma-separated field value, OWS trimmed (empty elements included).
pub(crate) fn list_items(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(trim_ows)
}

/// Whether the comma-separated `value` contains `token` (case-insensitive).
pub(crate) fn list_contains(value: &[u8], token: &[u8]) -> bool {
    list_items(value).any(|t| t.eq_ignore_ascii_case(token))
}

/// `1*DIGIT` as u64; `None` on anything else or overflow.
pub(crate) fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    let mut n: u64 = 0;
    for &b in s {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(n)
}

/// A Content-Length value: one decimal, or a list of identical decimals (RFC 9110 §8.6).
pub(crate) fn parse_content_length(value: &[u8]) -> Result<u64, Violation> {
    let mut found = None;
    for item in list_items(value) {
        let n = parse_decimal(item).ok_or(Violation::InvalidContentLength)?;
        match found {
            None => found = Some(n),
            Some(m) if m == n => {}
            Some(_) => return Err(Violation::ConflictingContentLength),
        }
    }
    found.ok_or(Violation::InvalidContentLength)
}

/// Transfer-Encoding accumulated over all its field lines (RFC 9112 §6.1).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct TransferCodings {
    pub(crate) present: bool,
    /// The last coding seen is `chunked`.
    pub(crate) chunked_last: bool,
    chunked_seen: bool,
    /// A coding other than `chunked` was seen.
    pub(crate) other: bool,
}

impl TransferCodings {
    pub(crate) fn add(&mut self, value: &[u8]) -> Result<(), Violation> {
        self.present = true;
        for item in list_items(value) {
            if item.eq_ignore_ascii_case(b"chunked") {
                if self.chunked_seen {
                    // chunked applied twice: never valid, a classic TE.TE confusion.
                    return Err(Violation::InvalidTransferEncoding);
                }
                self.chunked_seen = true;
                self.chunked_last = true;
            } else {
                // Empty elements and parameters are refused rather than guessed at.
                if !is_token(item) {
                    return Err(Violation::InvalidTransferEncoding);
                }
                self.other = true;
                self.chunked_last = false;
            }
        }
        Ok(())
    }
}

/// Most options the Connection fields of one message may list. Real clients send one to
/// three; the cap bounds the work of removing the fields they name.
pub(crate) const MAX_CONNECTION_OPTIONS: usize = 32;

/// Effects of the Connection field lines.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ConnectionOptions {
    pub(crate) close: bool,
    pub(crate) keep_alive: bool,
    pub(crate) upgrade: bool,
    /// Names a field other than the standard hop-by-hop ones (to be removed when forwarding).
    pub(crate) nominates: bool,
    count: usize,
}

impl ConnectionOptions {
    pub(crate) fn add(&mut self, value: &[u8]) -> Result<(), Violation> {
        for item in list_items(value) {
            if item.is_empty() {
                continue;
            }
            self.count += 1;
            if self.count > MAX_CONNECTION_OPTIONS {
                return Err(Violation::TooManyConnectionOptions);
            }
            if item.eq_ignore_ascii_case(b"close") {
                self.close = true;
            } else if item.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
            } else if item.eq_ignore_ascii_case(b"upgrade") {
                self.upgrade = true;
            } else {
                self.nominates = true;
            }
        }
        Ok(())
    }
}

/// RFC 3986 `reg-name` bytes: unreserved, sub-delims and `%` (of pct-encoded).
static REG_NAME: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'%'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
            );
        b += 1;
    }
    t
};

/// `uri-host [ ":" port ]` as in Host and in absolute/authority-form targets: reg-name,
/// IPv4 or bracketed IP literal; no userinfo, path, whitespace or backslash.
pub(crate) fn valid_authority(a: &[u8], require_port: bool) -> bool {
    let (host, port) = if let Some(rest) = a.strip_prefix(b"[") {
        let Some(close) = rest.iter().position(|&b| b == b']') else {
            return false;
        };
        let literal = &rest[..close];
        if literal.is_empty()
            || !literal
                .iter()
                .all(|&b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.' | b'v' | b'V'))
        {
            return false;
        }
        match &rest[close + 1..] {
            [] => (literal, None),
            [b':', port @ ..] => (literal, Some(port)),
            _ => return false,
        }
    } else {
        match a.iter().rposition(|&b| b == b':') {
            Some(i) => (&a[..i], Some(&a[i + 1..])),
            None => (a, None),
        }
    };
    let reg_name_ok = a.starts_with(b"[") || host.iter().all(|&b| REG_NAME[usize::from(b)]);
    let port_ok = match port {
        Some(p) => {
            p.len() <= 5 && p.iter().all(u8::is_ascii_digit) && !(require_port && p.is_empty())
        }
        None => !require_port,
    };
    reg_name_ok && port_ok && !(require_port && host.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_length_values() {
        assert_eq!(parse_content_length(b"0"), Ok(0));
        assert_eq!(parse_content_length(b"42"), Ok(42));
        assert_eq!(parse_content_length(b"42, 42"), Ok(42));
        assert_eq!(
            parse_content_length(b"42,43"),
            Err(Violation::ConflictingContentLength)
        );
        for bad in [
            &b""[..],
            b"+1",
            b"-1",
            b"0x10",
            b"1e3",
            b"1 2",
            b"1,",
            b"18446744073709551616",
        ] {
            assert_eq!(
                parse_content_length(bad),
                Err(Violation::InvalidContentLength),
                "{bad:?}"
            );
        }
        assert_eq!(parse_content_length(b"18446744073709551615"), Ok(u64::MAX));
    }

    #[test]
    fn authorities() {
        for ok in [
            &b"example.com"[..],
            b"example.com:8080",
            b"127.0.0.1:80",
            b"[::1]:443",
            b"[::1]",
            b"",
        ] {
            assert!(valid_authority(ok, false), "{ok:?}");
        }
        for bad in [
            &b"user@example.com"[..],
            b"a b",
            b"a/b",
            b"a\\b",
            b"example.com:http",
            b"[::1",
            b"[::1]x",
            b"a:1:2",
            b"example.com:123456",
        ] {
            assert!(!valid_authority(bad, false), "{bad:?}");
        }
        assert!(valid_authority(b"example.com:443", true));
        assert!(!valid_authority(b"example.com", true));
        assert!(!valid_authority(b":443", true));
    }

    #[test]
    fn lowercase_token_compare() {
        for lit in [
            &b"te"[..],
            b"host",
            b"upgrade",
            b"connection",
            b"content-length",
            b"proxy-connection",
            b"transfer-encoding",
        ] {
            let upper = lit.to_ascii_uppercase();
            assert!(eq_lowercase_token(&upper, lit));
            assert!(eq_lowercase_token(lit, lit));
            for i in 0..lit.len() {
                let mut other = lit.to_vec();
                other[i] = b'z';
                assert!(!eq_lowercase_token(&other, lit), "{other:?}");
            }
        }
        assert!(!eq_lowercase_token(b"host", b"hosts"));
    }

    #[test]
    fn classify_is_case_insensitive() {
        assert_eq!(classify(b"Content-Length"), Known::ContentLength);
        assert_eq!(classify(b"TRANSFER-ENCODING"), Known::TransferEncoding);
        assert_eq!(classify(b"x-te"), Known::Other);
        assert_eq!(classify(b"Keep-Alive"), Known::KeepAlive);
    }
}
