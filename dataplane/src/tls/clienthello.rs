//! Sans-IO ClientHello peek: what a `tls-passthrough` listener routes on, and what a `tls`
//! listener looks at before it picks a certificate.
//!
//! [`parse`] reads the raw bytes a client sent first (TLS records, not yet decrypted: the
//! ClientHello is always plaintext) and returns the server name (SNI `host_name`), the offered
//! ALPN protocols and versions. It never consumes anything: the caller keeps reading into the
//! same buffer while the answer is [`ParseError::Incomplete`], and afterwards forwards the
//! buffer untouched (passthrough) or feeds it to rustls (termination).
//!
//! The handshake message may be split across several records and records may arrive in pieces;
//! a handshake message that fits in its first record (nearly always) is parsed in place without
//! allocating, a fragmented one is reassembled into one bounded buffer. Sizes are capped
//! ([`MAX_HANDSHAKE_LEN`], [`MAX_RECORDS`]), so a caller never needs to buffer more than
//! [`MAX_PEEK_LEN`] bytes before it gets an answer.
//!
//! Strictness: anything a compliant client never sends (a duplicate extension, two host names,
//! an SNI that is not a DNS name, trailing bytes) is [`Invalid`]. A router that is lenient
//! where the upstream is strict (or the other way round) can be steered by a crafted hello.

use std::borrow::Cow;
use std::fmt;

/// Largest ClientHello handshake message accepted (body length, without the 4-byte header).
/// Real hellos are 200 bytes to ~2 KiB (post-quantum key shares included).
pub const MAX_HANDSHAKE_LEN: usize = 16 * 1024;

/// Largest number of records the ClientHello may be split into.
pub const MAX_RECORDS: usize = 512;

/// The most bytes [`parse`] can ask for before it answers: a buffer of this size always ends
/// the peek with a result or [`ParseError::Invalid`].
pub const MAX_PEEK_LEN: usize = MAX_HANDSHAKE_LEN + 4 + MAX_RECORDS * RECORD_HEADER_LEN;

/// Largest TLS plaintext record fragment (RFC 8446 section 5.1).
const MAX_RECORD_LEN: usize = 1 << 14;
const RECORD_HEADER_LEN: usize = 5;
const CONTENT_TYPE_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
/// Largest number of extensions a ClientHello may carry (browsers send about 20).
const MAX_EXTENSIONS: usize = 64;

const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
const EXT_SUPPORTED_VERSIONS: u16 = 43;

/// TLS protocol version numbers as they appear on the wire.
pub mod version {
    pub const SSL3: u16 = 0x0300;
    pub const TLS10: u16 = 0x0301;
    pub const TLS11: u16 = 0x0302;
    pub const TLS12: u16 = 0x0303;
    pub const TLS13: u16 = 0x0304;
}

/// Why [`parse`] did not return a ClientHello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// The bytes so far are a valid prefix; read more and call [`parse`] again on the whole
    /// buffer. `need`: at least this many more bytes are required (a lower bound), when known.
    Incomplete { need: Option<usize> },
    /// Not a TLS ClientHello, or one this gateway refuses to route on.
    Invalid(Invalid),
}

/// What is wrong with the bytes; for logs and the rejection counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    /// The first byte is not a TLS record type (e.g. a plaintext HTTP request).
    NotTls { first_byte: u8 },
    /// An SSL 2.0-format hello; not supported.
    SslV2,
    /// A record other than handshake before the ClientHello was complete.
    UnexpectedRecord { content_type: u8 },
    /// A record version whose major number is not 3.
    BadRecordVersion { version: u16 },
    /// A record longer than 2^14 bytes.
    RecordTooLong { len: usize },
    /// A zero-length handshake record (forbidden by RFC 8446).
    EmptyRecord,
    /// The ClientHello is split into more than [`MAX_RECORDS`] records.
    TooManyRecords,
    /// The first handshake message is not a ClientHello.
    NotClientHello { msg_type: u8 },
    /// The ClientHello is longer than [`MAX_HANDSHAKE_LEN`].
    TooLong { len: usize },
    /// A length field or structure of the ClientHello is wrong; names the part.
    Malformed(&'static str),
    /// The same extension type appears twice.
    DuplicateExtension { ext_type: u16 },
    /// More than [`MAX_EXTENSIONS`] extensions.
    TooManyExtensions,
    /// The server_name extension has no host_name, two of them, or one that is not a DNS name.
    BadServerName,
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Invalid::NotTls { first_byte } => {
                write!(f, "not TLS (first byte {first_byte:#04x})")
            }
            Invalid::SslV2 => f.write_str("SSL 2.0 hello"),
            Invalid::UnexpectedRecord { content_type } => {
                write!(f, "record type {content_type} before the ClientHello ended")
            }
            Invalid::BadRecordVersion { version } => {
                write!(f, "bad record version {version:#06x}")
            }
            Invalid::RecordTooLong { len } => write!(f, "record of {len} bytes (max 16384)"),
            Invalid::EmptyRecord => f.write_str("empty handshake record"),
            Invalid::TooManyRecords => {
                write!(f, "ClientHello split into more than {MAX_RECORDS} records")
            }
            Invalid::NotClientHello { msg_type } => {
                write!(f, "handshake message type {msg_type}, not ClientHello")
            }
            Invalid::TooLong { len } => {
                write!(f, "ClientHello of {len} bytes (max {MAX_HANDSHAKE_LEN})")
            }
            Invalid::Malformed(part) => write!(f, "malformed ClientHello: {part}"),
            Invalid::DuplicateExtension { ext_type } => {
                write!(f, "extension {ext_type} appears twice")
            }
            Invalid::TooManyExtensions => {
                write!(f, "more than {MAX_EXTENSIONS} extensions")
            }
            Invalid::BadServerName => f.write_str("bad server_name extension"),
        }
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::Incomplete { need: Some(n) } => write!(f, "incomplete: {n}+ bytes more"),
            ParseError::Incomplete { need: None } => f.write_str("incomplete"),
            ParseError::Invalid(invalid) => invalid.fmt(f),
        }
    }
}

impl std::error::Error for ParseError {}

impl From<Invalid> for ParseError {
    fn from(invalid: Invalid) -> Self {
        ParseError::Invalid(invalid)
    }
}

/// What a ClientHello offers. Borrows from the input unless the hello was fragmented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHelloInfo<'a> {
    /// The version in the first record header (usually 0x0301).
    pub record_version: u16,
    /// `legacy_version` of the ClientHello (0x0303 for TLS 1.2 and 1.3 clients).
    pub legacy_version: u16,
    /// The SNI host name, as sent minus one trailing dot. Compare it case-insensitively.
    /// `None`: the client sent no server_name extension.
    pub server_name: Option<Cow<'a, str>>,
    /// The ALPN `protocol_name_list` body, validated; read it with [`Self::alpn`].
    alpn: Cow<'a, [u8]>,
    /// The supported_versions list body, validated; read it with [`Self::supported_versions`].
    supported_versions: Cow<'a, [u8]>,
    /// Bytes of the input taken by the records that carry the ClientHello.
    pub records_len: usize,
}

impl ClientHelloInfo<'_> {
    /// The ALPN protocol names offered, in client preference order; empty when no ALPN.
    pub fn alpn(&self) -> AlpnIter<'_> {
        AlpnIter { rest: &self.alpn }
    }

    /// Whether the ALPN extension was present.
    pub fn has_alpn(&self) -> bool {
        !self.alpn.is_empty()
    }

    /// Versions from the supported_versions extension (GREASE values included, as sent);
    /// empty when the client sent none (a TLS 1.2-only client).
    pub fn supported_versions(&self) -> impl Iterator<Item = u16> + '_ {
        self.supported_versions
            .chunks_exact(2)
            .map(|pair| u16::from_be_bytes([pair[0], pair[1]]))
    }

    /// The highest TLS version the client offers.
    pub fn max_version(&self) -> u16 {
        self.supported_versions()
            .filter(|v| (version::SSL3..=version::TLS13).contains(v))
            .max()
            .unwrap_or(self.legacy_version)
    }

    /// Copies what is borrowed, for keeping the info beyond the input buffer.
    pub fn into_owned(self) -> ClientHelloInfo<'static> {
        ClientHelloInfo {
            record_version: self.record_version,
            legacy_version: self.legacy_version,
            server_name: self.server_name.map(|s| Cow::Owned(s.into_owned())),
            alpn: Cow::Owned(self.alpn.into_owned()),
            supported_versions: Cow::Owned(self.supported_versions.into_owned()),
            records_len: self.records_len,
        }
    }
}

/// Iterator over ALPN protocol names (validated: each 1..=255 bytes).
#[derive(Debug, Clone)]
pub struct AlpnIter<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for AlpnIter<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let (&len, rest) = self.rest.split_first()?;
        let (name, rest) = rest.split_at_checked(usize::from(len))?;
        self.rest = rest;
        Some(name)
    }
}

/// Parses the ClientHello at the start of `buf` (raw bytes from the client).
pub fn parse(buf: &[u8]) -> Result<ClientHelloInfo<'_>, ParseError> {
    let (message, record_version, records_len) = reassemble(buf)?;
    match message {
        Cow::Borrowed(body) => parse_body(body, record_version, records_len),
        Cow::Owned(body) => {
            parse_body(&body, record_version, records_len).map(ClientHelloInfo::into_owned)
        }
    }
}

/// Collects the ClientHello handshake body (without its 4-byte header) from the records.
/// Borrows when the whole message is in the first record.
fn reassemble(buf: &[u8]) -> Result<(Cow<'_, [u8]>, u16, usize), ParseError> {
    let mut pos = 0;
    let mut record_version = 0;
    // Handshake bytes gathered so far when they span records.
    let mut joined: Vec<u8> = Vec::new();
    for record in 0.. {
        if record == MAX_RECORDS {
            return Err(Invalid::TooManyRecords.into());
        }
        let header = buf.get(pos..).unwrap_or_default();
        if let Some(&content_type) = header.first() {
            check_content_type(content_type, record == 0)?;
        }
        if let Some(&major) = header.get(1)
            && major != 3
        {
            return Err(Invalid::BadRecordVersion {
                version: (u16::from(major) << 8) | u16::from(header.get(2).copied().unwrap_or(0)),
            }
            .into());
        }
        let Some(header) = header.get(..RECORD_HEADER_LEN) else {
            let missing_hs = missing_handshake(&joined).unwrap_or(1);
            return Err(ParseError::Incomplete {
                need: Some(RECORD_HEADER_LEN - header.len() + missing_hs),
            });
        };
        let version = u16::from_be_bytes([header[1], header[2]]);
        if record == 0 {
            record_version = version;
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len > MAX_RECORD_LEN {
            return Err(Invalid::RecordTooLong { len }.into());
        }
        if len == 0 {
            return Err(Invalid::EmptyRecord.into());
        }
        let start = pos + RECORD_HEADER_LEN;
        let end = start + len;
        let available = buf.get(start..end.min(buf.len())).unwrap_or_default();
        // Check the handshake header as soon as its bytes are there, so garbage is refused
        // without waiting for a whole record.
        if record == 0 {
            check_handshake_header(available)?;
        } else if joined.len() < 4 {
            let mut head = joined.clone();
            head.extend_from_slice(available.get(..4 - joined.len()).unwrap_or(available));
            check_handshake_header(&head)?;
        }
        if available.len() < len {
            return Err(ParseError::Incomplete {
                need: Some(end - buf.len()),
            });
        }
        pos = end;
        if record == 0 && available.len() >= 4 {
            let total = 4 + handshake_len(available);
            if let Some(message) = available.get(4..total) {
                // The common case: the whole message in one record. Anything after it in
                // the record would be a second handshake message, which a client never
                // sends before the server answers.
                if available.len() != total {
                    return Err(Invalid::Malformed("data after the ClientHello").into());
                }
                return Ok((Cow::Borrowed(message), record_version, pos));
            }
        }
        if joined.is_empty() {
            joined.reserve_exact(available.len().max(4));
        }
        joined.extend_from_slice(available);
        if joined.len() >= 4 {
            let total = 4 + handshake_len(&joined);
            if joined.len() >= total {
                if joined.len() != total {
                    return Err(Invalid::Malformed("data after the ClientHello").into());
                }
                joined.drain(..4);
                return Ok((Cow::Owned(joined), record_version, pos));
            }
            joined.reserve_exact(total - joined.len());
        }
    }
    // `0..` does not end; the loop returns from inside.
    Err(Invalid::TooManyRecords.into())
}

/// Handshake bytes still missing from `joined`, when its header is known.
fn missing_handshake(joined: &[u8]) -> Option<usize> {
    (joined.len() >= 4).then(|| (4 + handshake_len(joined)).saturating_sub(joined.len()))
}

fn check_content_type(content_type: u8, first: bool) -> Result<(), Invalid> {
    match content_type {
        CONTENT_TYPE_HANDSHAKE => Ok(()),
        0x80..=0xff if first => Err(Invalid::SslV2),
        20..=24 => Err(Invalid::UnexpectedRecord { content_type }),
        first_byte if first => Err(Invalid::NotTls { first_byte }),
        content_type => Err(Invalid::UnexpectedRecord { content_type }),
    }
}

/// Checks the type and length of the handshake message from its first bytes (any prefix).
fn check_handshake_header(head: &[u8]) -> Result<(), Invalid> {
    if let Some(&msg_type) = head.first()
        && msg_type != HANDSHAKE_CLIENT_HELLO
    {
        return Err(Invalid::NotClientHello { msg_type });
    }
    if head.len() >= 4 {
        let len = handshake_len(head);
        if len > MAX_HANDSHAKE_LEN {
            return Err(Invalid::TooLong { len });
        }
    }
    Ok(())
}

/// The 24-bit length of the handshake message starting at `head` (at least 4 bytes).
fn handshake_len(head: &[u8]) -> usize {
    (usize::from(head[1]) << 16) | (usize::from(head[2]) << 8) | usize::from(head[3])
}

/// Big-endian reader over a byte slice; every read checks bounds.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], Invalid> {
        let (head, rest) = self
            .rest
            .split_at_checked(n)
            .ok_or(Invalid::Malformed(what))?;
        self.rest = rest;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, Invalid> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, Invalid> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A vector with a one-byte length prefix.
    fn vec8(&mut self, what: &'static str) -> Result<&'a [u8], Invalid> {
        let len = self.u8(what)?;
        self.take(usize::from(len), what)
    }

    /// A vector with a two-byte length prefix.
    fn vec16(&mut self, what: &'static str) -> Result<&'a [u8], Invalid> {
        let len = self.u16(what)?;
        self.take(usize::from(len), what)
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }
}

fn parse_body(
    body: &[u8],
    record_version: u16,
    records_len: usize,
) -> Result<ClientHelloInfo<'_>, ParseError> {
    let mut r = Reader { rest: body };
    let legacy_version = r.u16("legacy_version")?;
    if legacy_version >> 8 != 3 {
        return Err(Invalid::Malformed("legacy_version is not 3.x").into());
    }
    r.take(32, "random")?;
    let session_id = r.vec8("legacy_session_id")?;
    if session_id.len() > 32 {
        return Err(Invalid::Malformed("legacy_session_id longer than 32 bytes").into());
    }
    let suites = r.vec16("cipher_suites")?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(Invalid::Malformed("cipher_suites length").into());
    }
    let compression = r.vec8("legacy_compression_methods")?;
    if compression.is_empty() {
        return Err(Invalid::Malformed("legacy_compression_methods is empty").into());
    }
    let mut info = ClientHelloInfo {
        record_version,
        legacy_version,
        server_name: None,
        alpn: Cow::Borrowed(&[]),
        supported_versions: Cow::Borrowed(&[]),
        records_len,
    };
    if r.is_empty() {
        // A hello without extensions (SSL 3.0 style): valid, nothing more to learn.
        return Ok(info);
    }
    let extensions = r.vec16("extensions")?;
    if !r.is_empty() {
        return Err(Invalid::Malformed("data after the extensions").into());
    }
    let mut seen = [0u16; MAX_EXTENSIONS];
    let mut count = 0;
    let mut r = Reader { rest: extensions };
    while !r.is_empty() {
        let ext_type = r.u16("extension type")?;
        let data = r.vec16("extension data")?;
        if seen[..count].contains(&ext_type) {
            return Err(Invalid::DuplicateExtension { ext_type }.into());
        }
        let Some(slot) = seen.get_mut(count) else {
            return Err(Invalid::TooManyExtensions.into());
        };
        *slot = ext_type;
        count += 1;
        match ext_type {
            EXT_SERVER_NAME => info.server_name = Some(Cow::Borrowed(server_name(data)?)),
            EXT_ALPN => info.alpn = Cow::Borrowed(alpn(data)?),
            EXT_SUPPORTED_VERSIONS => {
                info.supported_versions = Cow::Borrowed(supported_versions(data)?)
            }
            _ => {}
        }
    }
    Ok(info)
}

/// The host_name of a server_name extension (RFC 6066 section 3).
fn server_name(data: &[u8]) -> Result<&str, Invalid> {
    let mut r = Reader { rest: data };
    let list = r.vec16("server_name_list")?;
    if !r.is_empty() || list.is_empty() {
        return Err(Invalid::BadServerName);
    }
    let mut r = Reader { rest: list };
    let mut host = None;
    while !r.is_empty() {
        let name_type = r.u8("server_name type")?;
        let name = r.vec16("server_name")?;
        if name_type == 0 {
            if host.is_some() {
                return Err(Invalid::BadServerName);
            }
            host = Some(name);
        }
    }
    let name = host.ok_or(Invalid::BadServerName)?;
    let name = name.strip_suffix(b".").unwrap_or(name);
    if is_dns_name(name) {
        // Checked to be ASCII.
        std::str::from_utf8(name).map_err(|_| Invalid::BadServerName)
    } else {
        Err(Invalid::BadServerName)
    }
}

/// A DNS name as sent in SNI: 1..=253 bytes of labels of 1..=63 bytes from `A-Z a-z 0-9 - _`.
/// (Underscores are not valid host names, but real clients send them.) An IP literal is not
/// allowed in SNI and is refused because its labels are all digits.
fn is_dns_name(name: &[u8]) -> bool {
    if name.is_empty() || name.len() > 253 {
        return false;
    }
    let mut all_numeric = true;
    for label in name.split(|&b| b == b'.') {
        if label.is_empty()
            || label.len() > 63
            || !label
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
        {
            return false;
        }
        all_numeric &= label.iter().all(u8::is_ascii_digit);
    }
    !all_numeric
}

/// The protocol_name_list body of an ALPN extension (RFC 7301), validated.
fn alpn(data: &[u8]) -> Result<&[u8], Invalid> {
    let mut r = Reader { rest: data };
    let list = r.vec16("ALPN protocol_name_list")?;
    if !r.is_empty() || list.is_empty() {
        return Err(Invalid::Malformed("ALPN extension length"));
    }
    let mut names = Reader { rest: list };
    while !names.is_empty() {
        if names.vec8("ALPN protocol name")?.is_empty() {
            return Err(Invalid::Malformed("empty ALPN protocol name"));
        }
    }
    Ok(list)
}

/// The version list of a ClientHello supported_versions extension (RFC 8446 section 4.2.1).
fn supported_versions(data: &[u8]) -> Result<&[u8], Invalid> {
    let mut r = Reader { rest: data };
    let list = r.vec8("supported_versions")?;
    if !r.is_empty() || list.is_empty() || list.len() % 2 != 0 {
        return Err(Invalid::Malformed("supported_versions length"));
    }
    Ok(list)
}

/// The fuzz target's body: parse must not panic, and a parsed hello must describe the same
/// records when every prefix is fed (`Incomplete` with a truthful `need`). Public for
/// `fuzz/fuzz_targets/clienthello.rs`; not part of the pipeline API.
#[doc(hidden)]
pub fn fuzz_check(bytes: &[u8]) {
    let result = parse(bytes);
    if let Ok(info) = &result {
        assert!(info.records_len <= bytes.len());
        assert!(info.records_len <= MAX_PEEK_LEN);
        let records = &bytes[..info.records_len];
        assert_eq!(parse(records).as_ref().ok(), Some(info));
        if let Some(name) = &info.server_name {
            assert!(is_dns_name(name.as_bytes()));
        }
        for cut in [0, 1, 4, 5, 6, records.len() / 2, records.len() - 1] {
            if cut < records.len() {
                match parse(&records[..cut]) {
                    Err(ParseError::Incomplete { need: Some(need) }) => {
                        assert!(need >= 1 && cut + need <= records.len());
                    }
                    other => panic!("prefix {cut} of a valid hello: {other:?}"),
                }
            }
        }
    }
    if let Err(ParseError::Incomplete { need: Some(need) }) = result {
        assert!(need >= 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!("{}/testdata/clienthello/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|err| panic!("{path}: {err}"))
    }

    fn ok(buf: &[u8]) -> ClientHelloInfo<'_> {
        parse(buf).unwrap_or_else(|err| panic!("{err}"))
    }

    fn invalid(buf: &[u8]) -> Invalid {
        match parse(buf) {
            Err(ParseError::Invalid(invalid)) => invalid,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    fn alpn_list(info: &ClientHelloInfo<'_>) -> Vec<String> {
        info.alpn()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect()
    }

    /// Re-splits the handshake carried by the records of `hello` into records of `size` bytes.
    fn refragment(hello: &[u8], size: usize) -> Vec<u8> {
        let info = ok(hello);
        let mut handshake = Vec::new();
        let mut pos = 0;
        while pos < info.records_len {
            let len = usize::from(u16::from_be_bytes([hello[pos + 3], hello[pos + 4]]));
            handshake.extend_from_slice(&hello[pos + 5..pos + 5 + len]);
            pos += 5 + len;
        }
        let mut out = Vec::new();
        for chunk in handshake.chunks(size) {
            out.extend_from_slice(&[22, 3, 1]);
            out.extend_from_slice(&u16::try_from(chunk.len()).unwrap_or(0).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    #[test]
    fn openssl_tls13_with_sni_and_alpn() {
        let buf = fixture("openssl-sni-alpn.bin");
        let info = ok(&buf);
        assert_eq!(info.server_name.as_deref(), Some("gateway.example.test"));
        assert!(matches!(info.server_name, Some(Cow::Borrowed(_))));
        assert_eq!(alpn_list(&info), ["h2", "http/1.1"]);
        assert_eq!(info.legacy_version, version::TLS12);
        assert_eq!(info.record_version, version::TLS10);
        assert_eq!(info.max_version(), version::TLS13);
        assert!(info.supported_versions().any(|v| v == version::TLS12));
        assert_eq!(info.records_len, buf.len());
    }

    #[test]
    fn openssl_tls12_only() {
        let buf = fixture("openssl-tls12-sni.bin");
        let info = ok(&buf);
        assert_eq!(info.server_name.as_deref(), Some("api.example.test"));
        assert!(!info.has_alpn());
        assert_eq!(info.supported_versions().count(), 0);
        assert_eq!(info.max_version(), version::TLS12);
    }

    #[test]
    fn openssl_without_sni() {
        let buf = fixture("openssl-no-sni.bin");
        let info = ok(&buf);
        assert_eq!(info.server_name, None);
        assert_eq!(info.max_version(), version::TLS13);
    }

    #[test]
    fn curl_with_sni_and_alpn() {
        let buf = fixture("curl-sni-alpn.bin");
        let info = ok(&buf);
        assert_eq!(info.server_name.as_deref(), Some("a.example.test"));
        assert_eq!(alpn_list(&info), ["h2", "http/1.1"]);
    }

    #[test]
    fn handmade_fragmented_fixture() {
        // The openssl hello re-split into 7-byte records (make.py).
        let buf = fixture("fragmented-7.bin");
        let info = ok(&buf);
        assert_eq!(info.server_name.as_deref(), Some("gateway.example.test"));
        assert!(matches!(info.server_name, Some(Cow::Owned(_))));
        assert_eq!(alpn_list(&info), ["h2", "http/1.1"]);
        assert_eq!(info.records_len, buf.len());
    }

    #[test]
    fn every_fragmentation_gives_the_same_answer() {
        let whole = fixture("curl-sni-alpn.bin");
        let want = ok(&whole).into_owned();
        // 512 bytes of handshake: 1-byte records are exactly MAX_RECORDS.
        assert_eq!(whole.len(), 512 + 5);
        // A 600-byte hello in 1-byte records runs out of records first.
        let mut too_many = Vec::new();
        for byte in [1, 0, 2, 0x58].into_iter().chain([0; 600]) {
            too_many.extend_from_slice(&[22, 3, 1, 0, 1, byte]);
        }
        assert_eq!(invalid(&too_many), Invalid::TooManyRecords);
        for size in [1, 2, 3, 4, 5, 100, 511, 512, 16384] {
            let buf = refragment(&whole, size);
            if buf.len().div_ceil(size + 5) > MAX_RECORDS {
                assert_eq!(invalid(&buf), Invalid::TooManyRecords, "size {size}");
                continue;
            }
            let got = ok(&buf);
            assert_eq!(got.server_name, want.server_name, "size {size}");
            assert_eq!(alpn_list(&got), alpn_list(&want));
            assert_eq!(got.max_version(), want.max_version());
            assert_eq!(got.records_len, buf.len());
        }
    }

    #[test]
    fn every_prefix_is_incomplete_with_a_true_lower_bound() {
        for name in ["openssl-sni-alpn.bin", "fragmented-7.bin"] {
            let buf = fixture(name);
            for cut in 0..buf.len() {
                match parse(&buf[..cut]) {
                    Err(ParseError::Incomplete { need: Some(need) }) => {
                        assert!(need >= 1, "{name} cut {cut}");
                        assert!(cut + need <= buf.len(), "{name} cut {cut}: need {need}");
                    }
                    other => panic!("{name} cut {cut}: {other:?}"),
                }
            }
        }
        assert_eq!(
            parse(&fixture("truncated.bin")),
            Err(ParseError::Incomplete { need: Some(40) })
        );
    }

    #[test]
    fn bytes_after_the_records_are_ignored() {
        let mut buf = fixture("openssl-sni-alpn.bin");
        let len = buf.len();
        // A TLS 1.3 client may send a ChangeCipherSpec or early data right after.
        buf.extend_from_slice(&[20, 3, 3, 0, 1, 1]);
        assert_eq!(ok(&buf).records_len, len);
    }

    #[test]
    fn garbage_fixtures_are_invalid() {
        assert_eq!(
            invalid(&fixture("http-request.bin")),
            Invalid::NotTls { first_byte: b'G' }
        );
        assert_eq!(invalid(&fixture("sslv2.bin")), Invalid::SslV2);
        assert_eq!(
            invalid(&fixture("duplicate-sni.bin")),
            Invalid::DuplicateExtension { ext_type: 0 }
        );
        assert_eq!(
            invalid(&fixture("oversized.bin")),
            Invalid::TooLong { len: 0x01_0000 }
        );
        assert_eq!(
            invalid(&fixture("server-hello.bin")),
            Invalid::NotClientHello { msg_type: 2 }
        );
        assert_eq!(invalid(&fixture("ip-sni.bin")), Invalid::BadServerName);
    }

    #[test]
    fn garbage_is_refused_from_the_first_bytes() {
        assert_eq!(invalid(b"G"), Invalid::NotTls { first_byte: b'G' });
        assert_eq!(
            invalid(&[22, 2]),
            Invalid::BadRecordVersion { version: 0x0200 }
        );
        assert_eq!(
            invalid(&[22, 3, 1, 0x40, 1]),
            Invalid::RecordTooLong { len: 0x4001 }
        );
        assert_eq!(invalid(&[22, 3, 1, 0, 0]), Invalid::EmptyRecord);
        assert_eq!(
            invalid(&[22, 3, 1, 1, 0, 2]),
            Invalid::NotClientHello { msg_type: 2 }
        );
        assert_eq!(
            invalid(&[21, 3, 3, 0, 2, 2, 40]),
            Invalid::UnexpectedRecord { content_type: 21 }
        );
        // An alert in the middle of a fragmented hello.
        let mut buf = refragment(&fixture("openssl-sni-alpn.bin"), 100);
        buf.truncate(105);
        buf.extend_from_slice(&[21, 3, 3, 0, 2, 2, 40]);
        assert_eq!(
            invalid(&buf),
            Invalid::UnexpectedRecord { content_type: 21 }
        );
    }

    #[test]
    fn sni_names_are_checked() {
        assert!(is_dns_name(b"a.example.test"));
        assert!(is_dns_name(b"_srv.example.test"));
        assert!(is_dns_name(b"xn--bcher-kva.example"));
        assert!(!is_dns_name(b""));
        assert!(!is_dns_name(b"a..b"));
        assert!(!is_dns_name(b"10.0.0.1"));
        assert!(!is_dns_name(b"a b"));
        assert!(!is_dns_name(b"a\0b"));
        assert!(!is_dns_name(&[b'a'; 64]));
        assert!(!is_dns_name("bücher.example".as_bytes()));
    }

    /// The fuzz corpus, replayed without a fuzzer: no input may panic, and whatever parses
    /// must parse the same after re-fragmenting.
    #[test]
    fn fuzz_corpus_replays() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/corpus/clienthello");
        let mut count = 0;
        for entry in std::fs::read_dir(dir).unwrap_or_else(|err| panic!("{dir}: {err}")) {
            let path = entry.unwrap_or_else(|err| panic!("{dir}: {err}")).path();
            let bytes = std::fs::read(&path).unwrap_or_else(|err| panic!("{path:?}: {err}"));
            check_one(&bytes);
            count += 1;
        }
        assert!(count >= 10, "only {count} corpus files in {dir}");
    }

    /// The property the fuzz target checks (fuzz/fuzz_targets/clienthello.rs calls the same
    /// through [`super::fuzz_check`]).
    fn check_one(bytes: &[u8]) {
        super::fuzz_check(bytes);
    }
}
