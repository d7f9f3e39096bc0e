//! Message bodies: a streaming decoder that yields payload slices of its input without
//! copying, and the chunked encoder for re-framing.

use super::error::{H1Error, Side, Violation};
use super::fields::is_value_byte;
use super::{Framing, Limits, MAX_HEADERS};

/// What one [`BodyDecoder::decode`] call produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoded<'a> {
    /// Bytes of the input used up (payload and framing). The caller drops these and presents
    /// the rest again, with more bytes appended, on the next call.
    pub consumed: usize,
    /// Body bytes (de-chunked), a sub-slice of the input; may be empty.
    pub payload: &'a [u8],
    /// The trailer section of a chunked body, when it ended in this call: the field lines
    /// exactly as received, each ending in CRLF, without the final empty line. Validated
    /// like header fields; forward with [`write_last_chunk`].
    pub trailers: Option<&'a [u8]>,
}

impl Decoded<'_> {
    const NOTHING: Decoded<'static> = Decoded {
        consumed: 0,
        payload: &[],
        trailers: None,
    };
}

/// Streaming body decoder: `Length(remaining)`, `Chunked(state)`, `CloseDelimited`, `None`.
///
/// Contract: call [`BodyDecoder::decode`] with the unconsumed bytes of the connection buffer;
/// forward `payload`; drop `consumed` bytes from the buffer; if `consumed == 0` and the body is
/// not done, read more (appending) and call again. Bytes after the end of the body are never
/// consumed: they belong to the next message. `consumed` bytes are validated wire bytes, so
/// a chunked-to-chunked proxy may also forward `&input[..consumed]` verbatim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyDecoder {
    state: State,
    side: Side,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Length(u64),
    Chunked(Chunked),
    CloseDelimited,
    Done,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Chunked {
    phase: Phase,
    /// Bytes left in the current chunk (or the size being parsed).
    remaining: u64,
    digits: u8,
    ext_len: u32,
    total: u64,
    max_body: u64,
    max_ext: u32,
    max_trailer: u32,
    max_fields: u16,
}

/// A complete trailer section: bytes used and the field lines (`None`: no fields).
type Section<'a> = Option<(usize, Option<&'a [u8]>)>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Expecting the first hex digit of a chunk size.
    SizeStart,
    Size,
    /// Whitespace after the size, before `;` or CR.
    SizeWs,
    Ext,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    Trailers,
}

impl BodyDecoder {
    pub(crate) fn new(framing: Framing, limits: &Limits, side: Side) -> Self {
        let state = match framing {
            Framing::None | Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::CloseDelimited => State::CloseDelimited,
            Framing::Chunked => State::Chunked(Chunked {
                phase: Phase::SizeStart,
                remaining: 0,
                digits: 0,
                ext_len: 0,
                total: 0,
                max_body: limits.max_body_size,
                max_ext: u32::try_from(limits.max_chunk_ext_len).unwrap_or(u32::MAX),
                max_trailer: u32::try_from(limits.max_trailer_size).unwrap_or(u32::MAX),
                max_fields: u16::try_from(limits.header_limit()).unwrap_or(u16::MAX),
            }),
        };
        BodyDecoder { state, side }
    }

    /// A decoder for a request body framed as `framing` (e.g. for tests or re-use).
    pub fn for_request(framing: Framing, limits: &Limits) -> Self {
        BodyDecoder::new(framing, limits, Side::Request)
    }

    /// A decoder for a response body framed as `framing`.
    pub fn for_response(framing: Framing, limits: &Limits) -> Self {
        BodyDecoder::new(framing, limits, Side::Response)
    }

    /// The whole body has been decoded (for close-delimited bodies: after [`Self::eof`]).
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// Body bytes still expected, when known (`Length` framing).
    pub fn remaining(&self) -> Option<u64> {
        match self.state {
            State::Length(n) => Some(n),
            State::Done => Some(0),
            _ => None,
        }
    }

    /// The peer closed the connection: fine for a close-delimited body (which ends here), an
    /// error for a body that is not done.
    pub fn eof(&mut self) -> Result<(), H1Error> {
        match self.state {
            State::CloseDelimited | State::Done => {
                self.state = State::Done;
                Ok(())
            }
            State::Length(_) | State::Chunked(_) => Err(self.side.err(Violation::IncompleteBody)),
        }
    }

    /// Decode from `input`: see the type's contract.
    pub fn decode<'a>(&mut self, input: &'a [u8]) -> Result<Decoded<'a>, H1Error> {
        match &mut self.state {
            State::Done => Ok(Decoded::NOTHING),
            State::Length(remaining) => {
                let n = input
                    .len()
                    .min(usize::try_from(*remaining).unwrap_or(usize::MAX));
                *remaining -= n as u64;
                if *remaining == 0 {
                    self.state = State::Done;
                }
                Ok(Decoded {
                    consumed: n,
                    payload: &input[..n],
                    trailers: None,
                })
            }
            State::CloseDelimited => Ok(Decoded {
                consumed: input.len(),
                payload: input,
                trailers: None,
            }),
            State::Chunked(c) => match c.decode(input) {
                Ok((decoded, done)) => {
                    if done {
                        self.state = State::Done;
                    }
                    Ok(decoded)
                }
                Err(v) => Err(self.side.err(v)),
            },
        }
    }
}

fn hex_value(b: u8) -> Option<u64> {
    match b {
        b'0'..=b'9' => Some(u64::from(b - b'0')),
        b'a'..=b'f' => Some(u64::from(b - b'a' + 10)),
        b'A'..=b'F' => Some(u64::from(b - b'A' + 10)),
        _ => None,
    }
}

impl Chunked {
    /// Returns the decoded piece and whether the body ended.
    fn decode<'a>(&mut self, input: &'a [u8]) -> Result<(Decoded<'a>, bool), Violation> {
        let mut pos = 0;
        let mut payload: &'a [u8] = &[];
        loop {
            if self.phase == Phase::Data {
                // One payload slice per call: stop at the start of the next chunk's data.
                if !payload.is_empty() || pos == input.len() {
                    break;
                }
                let n =
                    (input.len() - pos).min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
                payload = &input[pos..pos + n];
                pos += n;
                self.remaining -= n as u64;
                if self.remaining == 0 {
                    self.phase = Phase::DataCr;
                }
                continue;
            }
            if self.phase == Phase::Trailers {
                let section = match self.trailers(&input[pos..]) {
                    Ok(section) => section,
                    Err(_) if pos > 0 => break,
                    Err(v) => return Err(v),
                };
                return match section {
                    Some((used, trailers)) => Ok((
                        Decoded {
                            consumed: pos + used,
                            payload,
                            trailers,
                        },
                        true,
                    )),
                    None => Ok((
                        Decoded {
                            consumed: pos,
                            payload,
                            trailers: None,
                        },
                        false,
                    )),
                };
            }
            let Some(&b) = input.get(pos) else {
                break;
            };
            match self.byte(b) {
                Ok(()) => pos += 1,
                // Hand out what was decoded before the bad byte; the next call, starting at
                // it, fails. Errors so land at the same offset however the input is split.
                Err(_) if pos > 0 => break,
                Err(v) => return Err(v),
            }
        }
        Ok((
            Decoded {
                consumed: pos,
                payload,
                trailers: None,
            },
            false,
        ))
    }

    /// One byte of framing (chunk-size line, CRLF after data).
    fn byte(&mut self, b: u8) -> Result<(), Violation> {
        match self.phase {
            Phase::SizeStart => {
                let v = hex_value(b).ok_or(Violation::InvalidChunkSize)?;
                self.remaining = v;
                self.digits = 1;
                self.ext_len = 0;
                self.phase = Phase::Size;
            }
            Phase::Size => {
                if let Some(v) = hex_value(b) {
                    if self.digits >= 16 {
                        return Err(Violation::InvalidChunkSize);
                    }
                    self.digits += 1;
                    self.remaining = (self.remaining << 4) | v;
                } else {
                    self.phase = match b {
                        b';' => Phase::Ext,
                        b' ' | b'\t' => Phase::SizeWs,
                        b'\r' => Phase::SizeLf,
                        _ => return Err(Violation::InvalidChunkSize),
                    };
                }
            }
            Phase::SizeWs => {
                // Bounded like an extension: whitespace must not be free to send forever.
                if self.ext_len >= self.max_ext {
                    return Err(Violation::ChunkExtensionTooLong);
                }
                self.phase = match b {
                    b' ' | b'\t' => Phase::SizeWs,
                    b';' => Phase::Ext,
                    b'\r' => Phase::SizeLf,
                    _ => return Err(Violation::InvalidChunkSize),
                };
                self.ext_len += 1;
            }
            Phase::Ext => {
                if b == b'\r' {
                    self.phase = Phase::SizeLf;
                } else if is_value_byte(b) {
                    if self.ext_len >= self.max_ext {
                        return Err(Violation::ChunkExtensionTooLong);
                    }
                    self.ext_len += 1;
                } else {
                    return Err(Violation::InvalidChunkSize);
                }
            }
            Phase::SizeLf => {
                if b != b'\n' {
                    return Err(Violation::InvalidChunkSize);
                }
                if self.remaining == 0 {
                    self.phase = Phase::Trailers;
                } else {
                    self.total = self
                        .total
                        .checked_add(self.remaining)
                        .filter(|&t| t <= self.max_body)
                        .ok_or(Violation::BodyTooLarge)?;
                    self.phase = Phase::Data;
                }
            }
            Phase::DataCr => {
                if b != b'\r' {
                    return Err(Violation::MissingChunkCrlf);
                }
                self.phase = Phase::DataLf;
            }
            Phase::DataLf => {
                if b != b'\n' {
                    return Err(Violation::MissingChunkCrlf);
                }
                self.phase = Phase::SizeStart;
            }
            // Handled by `decode` before bytes are fed one by one.
            Phase::Data | Phase::Trailers => {}
        }
        Ok(())
    }

    /// The trailer section after the last chunk, whole or not at all:
    /// `Some((consumed, trailers))` when complete, `None` when more input is needed.
    fn trailers<'a>(&self, input: &'a [u8]) -> Result<Section<'a>, Violation> {
        match input {
            [] | [b'\r'] => return Ok(None),
            [b'\r', b'\n', ..] => return Ok(Some((2, None))),
            [b'\r', ..] | [b'\n', ..] => return Err(Violation::InvalidTrailers),
            _ => {}
        }
        let max = self.max_trailer as usize;
        let window = &input[..input.len().min(max)];
        let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let fields = &mut raw[..usize::from(self.max_fields).min(MAX_HEADERS)];
        match httparse::parse_headers(window, fields) {
            Ok(httparse::Status::Complete((len, parsed))) => {
                let crlf_before = |at: usize| at >= 2 && window.get(at - 2..at) == Some(b"\r\n");
                let lines_ok = parsed.iter().skip(1).all(|h| {
                    let at = h.name.as_ptr().addr().wrapping_sub(window.as_ptr().addr());
                    crlf_before(at)
                });
                if !lines_ok || !crlf_before(len) || !crlf_before(len.saturating_sub(2)) {
                    return Err(Violation::InvalidLineEnding);
                }
                Ok(Some((len, Some(&window[..len - 2]))))
            }
            Ok(httparse::Status::Partial) if window.len() >= max => {
                Err(Violation::TrailersTooLarge)
            }
            Ok(httparse::Status::Partial) => Ok(None),
            Err(httparse::Error::TooManyHeaders) => Err(Violation::TrailersTooLarge),
            Err(_) => Err(Violation::InvalidTrailers),
        }
    }
}

/// A chunk-size line (`hex CRLF`) on the stack, for vectored writes: header, payload, CRLF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    buf: [u8; 18],
    len: u8,
}

impl ChunkHeader {
    pub fn new(size: u64) -> Self {
        let mut buf = [0u8; 18];
        let digits = if size == 0 {
            1
        } else {
            (64 - size.leading_zeros() as usize).div_ceil(4)
        };
        for (i, slot) in buf[..digits].iter_mut().enumerate() {
            let shift = 4 * (digits - 1 - i);
            *slot = b"0123456789abcdef"[((size >> shift) & 0xf) as usize];
        }
        buf[digits] = b'\r';
        buf[digits + 1] = b'\n';
        ChunkHeader {
            buf,
            len: (digits + 2) as u8,
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }

    /// What follows each chunk's data.
    pub const END: &'static [u8] = b"\r\n";
}

/// Append one chunk carrying `data` (nothing for empty data: an empty chunk would end the
/// body).
pub fn write_chunk(out: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    out.extend_from_slice(ChunkHeader::new(data.len() as u64).as_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(ChunkHeader::END);
}

/// Append the last chunk and the trailer section (as [`Decoded::trailers`] yields it).
pub fn write_last_chunk(out: &mut Vec<u8>, trailers: Option<&[u8]>) {
    out.extend_from_slice(b"0\r\n");
    if let Some(t) = trailers {
        out.extend_from_slice(t);
    }
    out.extend_from_slice(b"\r\n");
}
