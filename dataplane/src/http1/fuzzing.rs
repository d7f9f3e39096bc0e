//! The fuzz target's property, public for `fuzz/fuzz_targets/http1.rs`; not part of the
//! pipeline API. The unit tests replay `fuzz/corpus/http1` through the same function.
//!
//! For any input: nothing panics; a request or response head that parses is re-encoded
//! (no edits) and re-parses to the same head; every prefix of a head that parses is
//! `Partial`; bodies decode the same fed whole or byte by byte; normalised paths are
//! idempotent and free of dot segments, empty segments and encoded separators.

use super::fields::{Known, classify, list_contains};
use super::{
    BodyDecoder, Decoded, Framing, H1Error, Limits, MAX_HEAD_SIZE, Method, Parsed, RequestEdits,
    RequestHead, ResponseEdits, ResponseHead, TargetForm, Violation, encode_request,
    encode_response, normalize_path, parse_request, parse_response,
};

/// Check every property on `data`; panics (with a message) when one fails.
pub fn fuzz_check(data: &[u8]) {
    let limits = Limits::default();
    check_request(data, &limits);
    let method = match data.first().map(|b| b % 4) {
        Some(1) => Method::Head,
        Some(2) => Method::Connect,
        _ => Method::Get,
    };
    check_response(data, &limits, method);
    check_chunked(data, &limits);
    check_path(data);
}

fn status_ok(e: &H1Error) {
    assert!(
        matches!(e.status(), 400 | 413 | 414 | 431 | 501 | 502 | 505),
        "unexpected status for {e}"
    );
}

fn check_request(data: &[u8], limits: &Limits) {
    let (head, consumed) = match parse_request(data, limits) {
        Ok(Parsed::Complete { head, consumed }) => (head, consumed),
        Ok(Parsed::Partial) => return,
        Err(e) => return status_ok(&e),
    };
    assert!(consumed <= data.len() && head.head_len() == consumed);
    for cut in [0, 1, consumed / 2, consumed.saturating_sub(1)] {
        if cut < consumed {
            assert_eq!(
                parse_request(&data[..cut], limits),
                Ok(Parsed::Partial),
                "prefix {cut} of a complete head"
            );
        }
    }

    let mut out = Vec::new();
    encode_request(&head, data, &RequestEdits::default(), &mut out)
        .unwrap_or_else(|e| panic!("re-encoding a parsed request failed: {e}"));
    let wide = Limits {
        max_head_size: MAX_HEAD_SIZE,
        ..limits.clone()
    };
    match parse_request(&out, &wide) {
        Ok(Parsed::Complete {
            head: again,
            consumed: n,
        }) => {
            assert_eq!(n, out.len(), "re-encoded head has trailing bytes");
            assert_eq!(
                RequestSummary::of(&head, data),
                RequestSummary::of(&again, &out),
                "re-encoded request differs: {:?}",
                String::from_utf8_lossy(&out)
            );
        }
        Err(H1Error::Request(Violation::TooManyHeaders)) if head.header_count() >= 97 => {}
        other => panic!(
            "re-encoded request does not parse: {other:?}\n{:?}",
            String::from_utf8_lossy(&out)
        ),
    }

    check_body(head.body_decoder(limits), &data[consumed..]);
    if head.target_form() == TargetForm::Origin {
        check_path(head.path(data).as_bytes());
    }
}

fn check_response(data: &[u8], limits: &Limits, method: Method) {
    let (head, consumed) = match parse_response(data, limits, method) {
        Ok(Parsed::Complete { head, consumed }) => (head, consumed),
        Ok(Parsed::Partial) => return,
        Err(e) => return status_ok(&e),
    };
    assert!(consumed <= data.len() && head.head_len() == consumed);
    for cut in [0, 1, consumed / 2, consumed.saturating_sub(1)] {
        if cut < consumed {
            assert_eq!(
                parse_response(&data[..cut], limits, method),
                Ok(Parsed::Partial),
                "prefix {cut} of a complete head"
            );
        }
    }
    let mut out = Vec::new();
    encode_response(&head, data, &ResponseEdits::default(), &mut out)
        .unwrap_or_else(|e| panic!("re-encoding a parsed response failed: {e}"));
    let wide = Limits {
        max_head_size: MAX_HEAD_SIZE,
        ..limits.clone()
    };
    match parse_response(&out, &wide, method) {
        Ok(Parsed::Complete {
            head: again,
            consumed: n,
        }) => {
            assert_eq!(n, out.len());
            assert_eq!(
                ResponseSummary::of(&head, data),
                ResponseSummary::of(&again, &out),
                "re-encoded response differs: {:?}",
                String::from_utf8_lossy(&out)
            );
        }
        Err(H1Error::Response(Violation::TooManyHeaders)) if head.header_count() >= 97 => {}
        other => panic!(
            "re-encoded response does not parse: {other:?}\n{:?}",
            String::from_utf8_lossy(&out)
        ),
    }
    check_body(head.body_decoder(limits), &data[consumed..]);
}

fn check_chunked(data: &[u8], limits: &Limits) {
    check_body(BodyDecoder::for_request(Framing::Chunked, limits), data);
}

/// The body decodes the same whole and byte by byte.
fn check_body(decoder: BodyDecoder, input: &[u8]) {
    let input = &input[..input.len().min(4096)];
    let whole = drive(decoder.clone(), input, input.len().max(1));
    let bytewise = drive(decoder, input, 1);
    assert_eq!(whole, bytewise, "body decodes differently when split");
}

/// Outcome of feeding `input` to a decoder `step` bytes at a time through a caller-style
/// buffer: (payload, trailers, consumed, done, error).
pub(crate) type Drive = (Vec<u8>, Option<Vec<u8>>, usize, bool, Option<H1Error>);

pub(crate) fn drive(mut decoder: BodyDecoder, input: &[u8], step: usize) -> Drive {
    let mut buf: Vec<u8> = Vec::new();
    let mut fed = 0;
    let mut payload = Vec::new();
    let mut trailers = None;
    let mut consumed = 0;
    loop {
        let got: Result<Decoded<'_>, H1Error> = decoder.decode(&buf);
        let d = match got {
            Ok(d) => d,
            Err(e) => return (payload, trailers, consumed, false, Some(e)),
        };
        assert!(d.consumed <= buf.len());
        assert!(d.payload.len() <= d.consumed);
        payload.extend_from_slice(d.payload);
        if let Some(t) = d.trailers {
            trailers = Some(t.to_vec());
        }
        let used = d.consumed;
        buf.drain(..used);
        consumed += used;
        if decoder.is_done() {
            break;
        }
        if used == 0 {
            if fed == input.len() {
                break;
            }
            let next = (fed + step).min(input.len());
            buf.extend_from_slice(&input[fed..next]);
            fed = next;
        }
    }
    (payload, trailers, consumed, decoder.is_done(), None)
}

fn check_path(p: &[u8]) {
    let Ok(norm) = normalize_path(p) else {
        return;
    };
    let n = norm.as_bytes();
    assert!(n.starts_with(b"/"));
    assert!(!n.windows(2).any(|w| w == b"//"), "{norm}");
    for seg in n.split(|&b| b == b'/') {
        assert!(seg != b"." && seg != b"..", "{norm}");
    }
    let lower = norm.to_ascii_lowercase();
    assert!(!lower.contains("%2f") && !lower.contains("%5c") && !lower.contains("%00"));
    assert_eq!(
        normalize_path(n).as_deref().ok(),
        Some(&*norm),
        "not idempotent"
    );
}

/// End-to-end fields: what a proxy forwards (hop-by-hop and framing fields removed).
fn end_to_end<'b>(
    fields: impl Iterator<Item = (&'b str, &'b [u8])> + Clone,
    strip_host: bool,
    strip_expect: bool,
) -> Vec<(String, Vec<u8>)> {
    let connection: Vec<&[u8]> = fields
        .clone()
        .filter(|(n, _)| classify(n.as_bytes()) == Known::Connection)
        .map(|(_, v)| v)
        .collect();
    fields
        .filter(|(n, _)| match classify(n.as_bytes()) {
            Known::Other => true,
            Known::Host => !strip_host,
            Known::Expect => !strip_expect,
            _ => false,
        })
        .filter(|(n, _)| !connection.iter().any(|v| list_contains(v, n.as_bytes())))
        .map(|(n, v)| (n.to_string(), v.to_vec()))
        .collect()
}

#[derive(Debug, PartialEq, Eq)]
struct RequestSummary {
    method: String,
    target: Vec<u8>,
    host: String,
    fields: Vec<(String, Vec<u8>)>,
    framing: Framing,
    keep_alive: Option<bool>,
    expect_continue: bool,
    upgrade: Option<Vec<u8>>,
}

impl RequestSummary {
    fn of(head: &RequestHead, buf: &[u8]) -> Self {
        let target = match head.target_form() {
            TargetForm::Absolute if !head.path(buf).starts_with('/') => {
                format!("/{}", head.path(buf)).into_bytes()
            }
            TargetForm::Authority => head.target(buf).as_bytes().to_vec(),
            _ => head.path(buf).as_bytes().to_vec(),
        };
        let fields = end_to_end(
            head.headers(buf),
            true,
            head.version() == super::Version::Http10,
        );
        let expect_continue = fields.iter().any(|(n, v)| {
            n.eq_ignore_ascii_case("expect") && v.eq_ignore_ascii_case(b"100-continue")
        });
        RequestSummary {
            method: head.method_str(buf).to_string(),
            target,
            host: head.host(buf).unwrap_or_default().to_string(),
            fields,
            framing: head.framing(),
            keep_alive: (!head.is_upgrade()).then(|| head.keep_alive()),
            expect_continue,
            upgrade: head.upgrade(buf).map(<[u8]>::to_vec),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
struct ResponseSummary {
    status: u16,
    reason: Vec<u8>,
    fields: Vec<(String, Vec<u8>)>,
    framing: Framing,
    content_length: Option<u64>,
    keep_alive: Option<bool>,
    tunnel: bool,
    upgrade: Option<Vec<u8>>,
}

impl ResponseSummary {
    fn of(head: &ResponseHead, buf: &[u8]) -> Self {
        ResponseSummary {
            status: head.status(),
            reason: head.reason(buf).to_vec(),
            fields: end_to_end(head.headers(buf), false, false),
            framing: head.framing(),
            content_length: head.content_length(),
            keep_alive: (!head.is_tunnel()).then(|| head.keep_alive()),
            tunnel: head.is_tunnel(),
            upgrade: head.upgrade(buf).map(<[u8]>::to_vec),
        }
    }
}
