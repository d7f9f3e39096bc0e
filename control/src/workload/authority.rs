//! A fix-up between a Workload API client and the HTTP/2 server: gRPC clients in C core
//! (Python's grpcio, Ruby, PHP...) and grpc-java send the Unix socket path, percent-encoded,
//! as `:authority` (e.g. `%2Frun%2Fmeshgate%2Fworkload.sock`), which the `h2` crate refuses as
//! malformed (RST_STREAM PROTOCOL_ERROR; hyperium/h2#487, grpc/grpc#38142). Over a Unix socket
//! the authority means nothing, so the header blocks the client sends are decoded and encoded
//! again with `:authority: localhost` when theirs is not a valid authority; every other frame,
//! and everything the server sends, passes through unchanged.
//!
//! The client's HPACK state lives in our decoder and the server's in our encoder, so each side
//! keeps a consistent dynamic table. HEADERS padding and priority are dropped (the server
//! ignores priority); a header block split over CONTINUATION frames is joined and sent again
//! as frames of at most 16 KiB (the HTTP/2 default SETTINGS_MAX_FRAME_SIZE).

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
const MAX_FRAME: usize = 16_384;
/// The largest header block we reassemble (our server's header list limit is far below).
const MAX_BLOCK: usize = 256 * 1024;

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_owned())
}

/// Copy the client's half of an HTTP/2 connection to the server, fixing `:authority`.
/// Returns when the client closes; an error on malformed framing.
pub async fn pump<R, W>(mut from: R, mut to: W) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut preface = [0u8; 24];
    from.read_exact(&mut preface).await?;
    if &preface != PREFACE {
        return Err(bad("not an HTTP/2 connection preface"));
    }
    to.write_all(&preface).await?;
    let mut decoder = hpack::Decoder::new();
    let mut encoder = hpack::Encoder::new();
    // (stream id, END_STREAM, block so far) of a header block awaiting CONTINUATION.
    let mut pending: Option<(u32, bool, Vec<u8>)> = None;
    loop {
        let mut head = [0u8; 9];
        match from.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        if len > MAX_BLOCK {
            return Err(bad("frame too large"));
        }
        let mut payload = vec![0u8; len];
        from.read_exact(&mut payload).await?;
        if pending.is_some() && kind != CONTINUATION {
            return Err(bad("a header block was interrupted"));
        }
        match kind {
            HEADERS => {
                let mut body = payload.as_slice();
                let mut pad = 0usize;
                if flags & PADDED != 0 {
                    let (&p, rest) = body.split_first().ok_or_else(|| bad("bad padding"))?;
                    pad = usize::from(p);
                    body = rest;
                }
                if flags & PRIORITY != 0 {
                    body = body.get(5..).ok_or_else(|| bad("bad priority"))?;
                }
                let block = body
                    .get(
                        ..body
                            .len()
                            .checked_sub(pad)
                            .ok_or_else(|| bad("bad padding"))?,
                    )
                    .ok_or_else(|| bad("bad padding"))?
                    .to_vec();
                let end_stream = flags & END_STREAM != 0;
                if flags & END_HEADERS != 0 {
                    emit(
                        &mut to,
                        &mut decoder,
                        &mut encoder,
                        stream,
                        end_stream,
                        &block,
                    )
                    .await?;
                } else {
                    pending = Some((stream, end_stream, block));
                }
            }
            CONTINUATION => {
                let Some((id, end_stream, mut block)) = pending.take() else {
                    return Err(bad("CONTINUATION without HEADERS"));
                };
                if id != stream || block.len() + payload.len() > MAX_BLOCK {
                    return Err(bad("bad CONTINUATION"));
                }
                block.extend_from_slice(&payload);
                if flags & END_HEADERS != 0 {
                    emit(&mut to, &mut decoder, &mut encoder, id, end_stream, &block).await?;
                } else {
                    pending = Some((id, end_stream, block));
                }
            }
            _ => {
                to.write_all(&head).await?;
                to.write_all(&payload).await?;
            }
        }
    }
}

/// `:authority` values the `http` crate (and so `h2`) accepts pass unchanged.
fn fixed_authority(value: &[u8]) -> Option<&'static [u8]> {
    match http::uri::Authority::try_from(value) {
        Ok(_) => None,
        Err(_) => Some(b"localhost"),
    }
}

async fn emit<W: AsyncWrite + Unpin>(
    to: &mut W,
    decoder: &mut hpack::Decoder<'_>,
    encoder: &mut hpack::Encoder<'_>,
    stream: u32,
    end_stream: bool,
    block: &[u8],
) -> io::Result<()> {
    let headers = decoder
        .decode(block)
        .map_err(|e| bad(&format!("bad header block: {e:?}")))?;
    let fields: Vec<(&[u8], &[u8])> = headers
        .iter()
        .map(|(n, v)| {
            let v = match n.as_slice() {
                b":authority" => fixed_authority(v).unwrap_or(v),
                _ => v,
            };
            (n.as_slice(), v)
        })
        .collect();
    let encoded = encoder.encode(fields);
    let mut chunks = encoded.chunks(MAX_FRAME).peekable();
    let mut first = true;
    loop {
        let chunk = chunks.next().unwrap_or(&[]);
        let last = chunks.peek().is_none();
        let mut flags = 0u8;
        if first && end_stream {
            flags |= END_STREAM;
        }
        if last {
            flags |= END_HEADERS;
        }
        let kind = if first { HEADERS } else { CONTINUATION };
        let len = chunk.len();
        let head = [
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            kind,
            flags,
            (stream >> 24) as u8,
            (stream >> 16) as u8,
            (stream >> 8) as u8,
            stream as u8,
        ];
        to.write_all(&head).await?;
        to.write_all(chunk).await?;
        first = false;
        if last {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_only_invalid_authorities() {
        assert_eq!(fixed_authority(b"localhost"), None);
        assert_eq!(fixed_authority(b"example.org:443"), None);
        assert_eq!(
            fixed_authority(b"%2Frun%2Fmeshgate%2Fworkload.sock"),
            Some(&b"localhost"[..])
        );
        assert_eq!(fixed_authority(b"/run/x.sock"), Some(&b"localhost"[..]));
    }

    #[test]
    fn header_blocks_are_reencoded_and_other_frames_pass() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let mut client = hpack::Encoder::new();
            let block = client.encode(vec![
                (&b":method"[..], &b"POST"[..]),
                (&b":authority"[..], &b"%2Ftmp%2Fw.sock"[..]),
                (&b":path"[..], &b"/SpiffeWorkloadAPI/FetchX509SVID"[..]),
            ]);
            let mut input = PREFACE.to_vec();
            // HEADERS split in two: HEADERS without END_HEADERS, then CONTINUATION.
            let (a, b) = block.split_at(3);
            for (kind, flags, part) in [(HEADERS, END_STREAM, a), (CONTINUATION, END_HEADERS, b)] {
                let l = part.len();
                input.extend_from_slice(&[0, (l >> 8) as u8, l as u8, kind, flags, 0, 0, 0, 1]);
                input.extend_from_slice(part);
            }
            // A PING passes as is.
            let ping = [0u8, 0, 8, 6, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
            input.extend_from_slice(&ping);
            let mut out = Vec::new();
            pump(input.as_slice(), &mut out).await.expect("pump");
            assert_eq!(&out[..24], PREFACE);
            let f = &out[24..];
            let len = usize::from(f[1]) << 8 | usize::from(f[2]);
            assert_eq!((f[3], f[4]), (HEADERS, END_STREAM | END_HEADERS));
            let mut server = hpack::Decoder::new();
            let headers = server.decode(&f[9..9 + len]).expect("decode");
            assert_eq!(headers[1], (b":authority".to_vec(), b"localhost".to_vec()));
            assert_eq!(headers[2].1, b"/SpiffeWorkloadAPI/FetchX509SVID".to_vec());
            assert_eq!(&f[9 + len..], &ping);
        });
    }
}
