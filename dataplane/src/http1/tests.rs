//! Fixture-driven tests (dataplane/testdata/http1), split-at-every-byte parsing, encoder and
//! decoder behaviour, allocation counts, and the fuzz corpus replay.

#![allow(clippy::unwrap_used, clippy::panic)] // reason: tests

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use super::fuzzing::{drive, fuzz_check};
use super::*;

// ---- fixtures -----------------------------------------------------------------------------

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/http1");

fn fixtures(prefix: &str) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(FIXTURES).unwrap_or_else(|e| panic!("{FIXTURES}: {e}")) {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with(prefix) && name.ends_with(".http") {
            out.push((name, std::fs::read(&path).unwrap()));
        }
    }
    out.sort();
    out
}

/// Expected outcome from a fixture's name: `req-ok-*` or `req-NNN-*`.
fn expected_status(name: &str) -> Option<u16> {
    let kind = name.split('-').nth(1).unwrap();
    if kind == "ok" {
        None
    } else {
        Some(
            kind.parse()
                .unwrap_or_else(|_| panic!("{name}: bad fixture name")),
        )
    }
}

#[derive(Debug)]
struct Message {
    head_len: usize,
    body: Vec<u8>,
    trailers: Option<Vec<u8>>,
}

/// Parse and decode every request in `data`, like a keep-alive connection would.
/// Err: (index of the failing message, error).
fn run_requests(data: &[u8], limits: &Limits) -> Result<Vec<Message>, (usize, H1Error)> {
    let mut rest = data;
    let mut messages = Vec::new();
    while !rest.is_empty() {
        let i = messages.len();
        let (head, consumed) = match parse_request(rest, limits) {
            Ok(Parsed::Complete { head, consumed }) => (head, consumed),
            Ok(Parsed::Partial) => panic!("message {i}: head incomplete"),
            Err(e) => return Err((i, e)),
        };
        let (body, trailers, used, done, err) =
            drive(head.body_decoder(limits), &rest[consumed..], usize::MAX);
        if let Some(e) = err {
            return Err((i, e));
        }
        assert!(done, "message {i}: body incomplete");
        messages.push(Message {
            head_len: consumed,
            body,
            trailers,
        });
        rest = &rest[consumed + used..];
    }
    Ok(messages)
}

fn response_method(name: &str) -> Method {
    if name.contains("-to-head-") {
        Method::Head
    } else if name.contains("-to-connect-") {
        Method::Connect
    } else {
        Method::Get
    }
}

/// Parse and decode every response in `data` (close-delimited bodies end at the end).
fn run_responses(data: &[u8], method: Method) -> Result<Vec<Message>, (usize, H1Error)> {
    let limits = Limits::default();
    let mut rest = data;
    let mut messages = Vec::new();
    while !rest.is_empty() {
        let i = messages.len();
        let (head, consumed) = match parse_response(rest, &limits, method) {
            Ok(Parsed::Complete { head, consumed }) => (head, consumed),
            Ok(Parsed::Partial) => panic!("message {i}: head incomplete"),
            Err(e) => return Err((i, e)),
        };
        let mut decoder = head.body_decoder(&limits);
        let (body, trailers, used, done, err) =
            drive(decoder.clone(), &rest[consumed..], usize::MAX);
        if let Some(e) = err {
            return Err((i, e));
        }
        if !done {
            // End of input = the upstream closed.
            let _ = decoder.decode(&rest[consumed..]);
            decoder.eof().map_err(|e| (i, e))?;
        }
        messages.push(Message {
            head_len: consumed,
            body,
            trailers,
        });
        rest = &rest[consumed + used..];
        if head.is_tunnel() {
            break;
        }
    }
    Ok(messages)
}

#[test]
fn request_fixtures() {
    let all = fixtures("req-");
    assert!(all.len() >= 90, "only {} request fixtures", all.len());
    for (name, data) in &all {
        let got = run_requests(data, &Limits::default());
        match (expected_status(name), got) {
            (None, Ok(messages)) => assert!(!messages.is_empty(), "{name}"),
            (None, Err((i, e))) => panic!("{name}: message {i} refused: {e}"),
            (Some(want), Ok(_)) => panic!("{name}: accepted, want {want}"),
            (Some(want), Err((i, e))) => {
                assert_eq!(e.status(), want, "{name}: {e}");
                assert_eq!(i, 0, "{name}: refused only at message {i}");
                assert_eq!(e.blame(), crate::error::Blame::Downstream, "{name}");
            }
        }
    }
}

#[test]
fn response_fixtures() {
    let all = fixtures("resp-");
    assert!(all.len() >= 20, "only {} response fixtures", all.len());
    for (name, data) in &all {
        let got = run_responses(data, response_method(name));
        match (expected_status(name), got) {
            (None, Ok(messages)) => assert!(!messages.is_empty(), "{name}"),
            (None, Err((i, e))) => panic!("{name}: message {i} refused: {e}"),
            (Some(want), Ok(_)) => panic!("{name}: accepted, want {want}"),
            (Some(want), Err((_, e))) => {
                assert_eq!(e.status(), want, "{name}: {e}");
                assert_eq!(e.blame(), crate::error::Blame::Upstream, "{name}");
            }
        }
    }
}

/// The precise rule each classic smuggling input breaks.
#[test]
fn smuggling_violations() {
    let cases: &[(&str, Violation)] = &[
        (
            "req-400-cl-te.http",
            Violation::ContentLengthWithTransferEncoding,
        ),
        (
            "req-400-te-cl.http",
            Violation::ContentLengthWithTransferEncoding,
        ),
        (
            "req-400-te-te-second-field.http",
            Violation::ChunkedNotFinal,
        ),
        ("req-400-te-xchunked.http", Violation::ChunkedNotFinal),
        (
            "req-400-te-space-before-colon.http",
            Violation::WhitespaceBeforeColon,
        ),
        ("req-400-te-obs-fold.http", Violation::ObsFold),
        ("req-400-te-folded-value.http", Violation::ObsFold),
        (
            "req-400-te-leading-space-first-field.http",
            Violation::ObsFold,
        ),
        (
            "req-400-te-chunked-twice.http",
            Violation::InvalidTransferEncoding,
        ),
        (
            "req-400-te-empty-element.http",
            Violation::InvalidTransferEncoding,
        ),
        ("req-400-te-http10.http", Violation::Http10TransferEncoding),
        (
            "req-501-te-gzip-chunked.http",
            Violation::UnsupportedTransferCoding,
        ),
        (
            "req-400-cl-differing-fields.http",
            Violation::ConflictingContentLength,
        ),
        (
            "req-400-cl-differing-list.http",
            Violation::ConflictingContentLength,
        ),
        ("req-400-cl-plus.http", Violation::InvalidContentLength),
        ("req-400-cl-overflow.http", Violation::InvalidContentLength),
        (
            "req-400-bare-lf-everywhere.http",
            Violation::InvalidLineEnding,
        ),
        (
            "req-400-bare-lf-one-field.http",
            Violation::InvalidLineEnding,
        ),
        ("req-400-bare-lf-end.http", Violation::InvalidLineEnding),
        (
            "req-400-bare-lf-request-line.http",
            Violation::InvalidLineEnding,
        ),
        ("req-400-bare-lf-leading.http", Violation::InvalidLineEnding),
        ("req-400-bare-cr.http", Violation::InvalidHeaderValue),
        ("req-400-nul-in-value.http", Violation::InvalidHeaderValue),
        ("req-400-bad-name-char.http", Violation::InvalidHeaderName),
        ("req-400-http09.http", Violation::Http09),
        ("req-505-http20.http", Violation::UnsupportedVersion),
        (
            "req-400-connection-33-options.http",
            Violation::TooManyConnectionOptions,
        ),
        ("req-400-missing-host.http", Violation::MissingHost),
        ("req-400-duplicate-host.http", Violation::DuplicateHost),
        ("req-400-host-userinfo.http", Violation::InvalidHost),
        ("req-400-absolute-userinfo.http", Violation::InvalidTarget),
        ("req-400-target-utf8.http", Violation::InvalidTarget),
        ("req-431-70k-header.http", Violation::HeadTooLarge),
        ("req-431-101-headers.http", Violation::TooManyHeaders),
        ("req-414-9k-target.http", Violation::TargetTooLong),
        (
            "req-400-chunk-size-overflow.http",
            Violation::InvalidChunkSize,
        ),
        (
            "req-400-chunk-size-bare-lf.http",
            Violation::InvalidChunkSize,
        ),
        (
            "req-400-chunk-ext-bare-lf.http",
            Violation::InvalidChunkSize,
        ),
        (
            "req-400-chunk-ext-too-long.http",
            Violation::ChunkExtensionTooLong,
        ),
        (
            "req-400-chunk-data-no-crlf.http",
            Violation::MissingChunkCrlf,
        ),
        ("req-400-trailer-bare-lf.http", Violation::InvalidLineEnding),
        (
            "req-400-trailer-too-large.http",
            Violation::TrailersTooLarge,
        ),
    ];
    for (name, want) in cases {
        let data = std::fs::read(format!("{FIXTURES}/{name}")).unwrap();
        let got = run_requests(&data, &Limits::default())
            .map(|_| ())
            .map_err(|(_, e)| e);
        assert_eq!(got, Err(H1Error::Request(*want)), "{name}");
    }
}

/// Every prefix of every valid message is `Partial`; fed one byte at a time through a
/// resumable parser, the head completes exactly at its end, identical to a one-shot parse.
#[test]
fn split_at_every_byte() {
    let limits = Limits::default();
    for (name, data) in fixtures("req-ok-") {
        let first = match parse_request(&data, &limits) {
            Ok(Parsed::Complete { head, consumed }) => (head, consumed),
            other => panic!("{name}: {other:?}"),
        };
        let mut progress = HeadProgress::default();
        for cut in 0..first.1 {
            assert_eq!(
                parse_request(&data[..cut], &limits),
                Ok(Parsed::Partial),
                "{name} @{cut}"
            );
            assert_eq!(
                parse_request_resumable(&data[..cut], &limits, &mut progress),
                Ok(Parsed::Partial),
                "{name} @{cut} (resumable)"
            );
        }
        let done = parse_request_resumable(&data[..first.1], &limits, &mut progress);
        assert_eq!(
            done,
            Ok(Parsed::Complete {
                head: first.0.clone(),
                consumed: first.1
            }),
            "{name}"
        );
        assert_eq!(
            progress,
            HeadProgress::default(),
            "{name}: progress not reset"
        );
        // Body byte by byte gives the same payload as whole.
        let body = &data[first.1..];
        let whole = drive(first.0.body_decoder(&limits), body, usize::MAX);
        let bytewise = drive(first.0.body_decoder(&limits), body, 1);
        assert_eq!(whole, bytewise, "{name}: body");
    }
    for (name, data) in fixtures("resp-ok-") {
        let method = response_method(&name);
        let Ok(Parsed::Complete { consumed, .. }) = parse_response(&data, &limits, method) else {
            panic!("{name}");
        };
        for cut in 0..consumed {
            assert_eq!(
                parse_response(&data[..cut], &limits, method),
                Ok(Parsed::Partial),
                "{name} @{cut}"
            );
        }
    }
}

/// Errors are found the same when the bytes arrive one at a time.
#[test]
fn errors_found_when_split() {
    let limits = Limits::default();
    for (name, data) in fixtures("req-") {
        let Some(_) = expected_status(&name) else {
            continue;
        };
        let whole = match parse_request(&data, &limits) {
            Err(e) => e,
            Ok(_) => continue, // body-level error: covered by the decoder split test
        };
        let mut progress = HeadProgress::default();
        let mut got = None;
        for cut in 1..=data.len() {
            match parse_request_resumable(&data[..cut], &limits, &mut progress) {
                Ok(Parsed::Partial) => {}
                Ok(Parsed::Complete { .. }) => panic!("{name}: completed at {cut}"),
                Err(e) => {
                    got = Some(e);
                    break;
                }
            }
        }
        let got = got.unwrap_or_else(|| panic!("{name}: never failed"));
        assert_eq!(got.status(), whole.status(), "{name}: {got} vs {whole}");
    }
}

// ---- head accessors ---------------------------------------------------------------------

fn head(data: &[u8]) -> RequestHead {
    match parse_request(data, &Limits::default()) {
        Ok(Parsed::Complete { head, .. }) => head,
        other => panic!("{other:?}"),
    }
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{FIXTURES}/{name}")).unwrap()
}

#[test]
fn request_accessors() {
    let buf = fixture("req-ok-curl-get.http");
    let h = head(&buf);
    assert_eq!(h.method(), Method::Get);
    assert_eq!(h.method_str(&buf), "GET");
    assert_eq!(h.target(&buf), "/index.html?q=1");
    assert_eq!(h.path(&buf), "/index.html?q=1");
    assert_eq!(h.host(&buf), Some("127.0.0.1:18080"));
    assert_eq!(h.version(), Version::Http11);
    assert_eq!(h.framing(), Framing::None);
    assert!(h.keep_alive() && !h.expect_continue() && !h.is_upgrade());
    assert_eq!(h.header(&buf, "user-agent"), Some(&b"curl/7.88.1"[..]));
    assert_eq!(h.header_count(), 3);
    assert_eq!(h.head_len(), buf.len());

    let buf = fixture("req-ok-curl-proxy-absolute.http");
    let h = head(&buf);
    assert_eq!(h.target_form(), TargetForm::Absolute);
    assert_eq!(h.host(&buf), Some("example.com"));
    assert_eq!(h.path(&buf), "/path/to?x=y");

    let buf = fixture("req-ok-curl-http10.http");
    let h = head(&buf);
    assert_eq!(h.version(), Version::Http10);
    assert!(!h.keep_alive());
    let buf = fixture("req-ok-http10-no-host-keepalive.http");
    let h = head(&buf);
    assert!(h.keep_alive());
    assert_eq!(h.host(&buf), None);

    let buf = fixture("req-ok-curl-expect-100.http");
    let h = head(&buf);
    assert!(h.expect_continue());
    assert_eq!(h.framing(), Framing::Length(3));

    let buf = fixture("req-ok-curl-websocket-upgrade.http");
    let h = head(&buf);
    assert!(h.is_upgrade());
    assert_eq!(h.upgrade(&buf), Some(&b"websocket"[..]));
    assert!(!h.is_h2c_upgrade(&buf));
    let buf = fixture("req-ok-curl-h2c-upgrade.http");
    assert!(head(&buf).is_h2c_upgrade(&buf));

    let buf = fixture("req-ok-python-urllib.http");
    assert!(!head(&buf).keep_alive());

    let buf = fixture("req-ok-connect.http");
    let h = head(&buf);
    assert_eq!(
        (h.method(), h.target_form(), h.host(&buf)),
        (
            Method::Connect,
            TargetForm::Authority,
            Some("example.com:443")
        )
    );
    let buf = fixture("req-ok-options-asterisk.http");
    assert_eq!(head(&buf).target_form(), TargetForm::Asterisk);

    let buf = fixture("req-ok-absolute-ipv6.http");
    let h = head(&buf);
    assert_eq!((h.host(&buf), h.path(&buf)), (Some("[::1]:8080"), ""));

    let buf = fixture("req-ok-empty-value-obs-text.http");
    let h = head(&buf);
    assert_eq!(h.header(&buf, "x-empty"), Some(&b""[..]));
    assert_eq!(h.header(&buf, "x-latin"), Some(&b"caf\xe9"[..]));

    // 100 fields: 32 inline, the rest spilled; order preserved.
    let buf = fixture("req-ok-max-headers-100.http");
    let h = head(&buf);
    let names: Vec<&str> = h.headers(&buf).map(|(n, _)| n).collect();
    assert_eq!(names.len(), 100);
    assert_eq!(names[33], "X-H32");
    assert_eq!(names[99], "X-H98");

    // Spans used on a wrong buffer give empty answers, not panics.
    assert_eq!(h.target(b""), "");
    assert_eq!(h.headers(b"").count(), 100);
}

#[test]
fn pipelined_messages_and_trailers() {
    let data = fixture("req-ok-pipelined-three.http");
    let messages = run_requests(&data, &Limits::default()).unwrap();
    assert_eq!(messages.len(), 3);
    assert_eq!(messages[1].body, b"hello");
    assert!(messages.iter().all(|m| m.head_len > 0));

    let data = fixture("req-ok-chunked-trailers-ext.http");
    let m = &run_requests(&data, &Limits::default()).unwrap()[0];
    assert_eq!(m.body, b"hello world0123456789");
    assert_eq!(
        m.trailers.as_deref(),
        Some(&b"x-checksum: 1234\r\nx-other: y\r\n"[..])
    );

    let data = fixture("resp-ok-chunked-trailers.http");
    let m = &run_responses(&data, Method::Post).unwrap()[0];
    assert_eq!(m.body, b"abcd");
    assert_eq!(
        m.trailers.as_deref(),
        Some(&b"grpc-status: 0\r\ngrpc-message: ok\r\n"[..])
    );
}

#[test]
fn limits_are_configurable() {
    let small = Limits {
        max_head_size: 1024,
        max_headers: 4,
        max_target_len: 16,
        max_body_size: 10,
        ..Limits::default()
    };
    let status = |data: &[u8]| {
        run_requests(data, &small)
            .map(|_| 0)
            .unwrap_or_else(|(_, e)| e.status())
    };
    let big_field = [
        &b"GET / HTTP/1.1\r\nHost: a\r\nX: "[..],
        &[b'a'; 1100],
        b"\r\n\r\n",
    ]
    .concat();
    assert_eq!(status(&big_field), 431);
    assert_eq!(
        status(b"GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\n"),
        431
    );
    assert_eq!(
        status(b"GET /0123456789abcdefg HTTP/1.1\r\nHost: a\r\n\r\n"),
        414
    );
    // An over-long request line is refused before it ends.
    let line = [&b"GET /"[..], &[b'a'; 200]].concat();
    assert_eq!(
        parse_request(&line, &small).map_err(|e| e.status()),
        Err(414)
    );
    assert_eq!(
        status(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\nhello world"),
        413
    );
    assert_eq!(
        status(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
        413
    );
    assert_eq!(
        status(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n0123456789"),
        0
    );
}

#[test]
fn response_framing_rules() {
    let limits = Limits::default();
    let parse = |data: &[u8], method| match parse_response(data, &limits, method) {
        Ok(Parsed::Complete { head, .. }) => head,
        other => panic!("{other:?}"),
    };
    let h = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", Method::Get);
    assert_eq!((h.framing(), h.keep_alive()), (Framing::Length(5), true));
    let h = parse(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
        Method::Head,
    );
    assert_eq!((h.framing(), h.content_length()), (Framing::None, Some(5)));
    let h = parse(
        b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
        Method::Get,
    );
    assert_eq!((h.framing(), h.content_length()), (Framing::None, None));
    let h = parse(
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
        Method::Get,
    );
    assert_eq!((h.framing(), h.content_length()), (Framing::None, Some(5)));
    let h = parse(b"HTTP/1.1 100 Continue\r\n\r\n", Method::Post);
    assert!(h.is_interim() && !h.is_tunnel());
    let h = parse(b"HTTP/1.1 200 OK\r\n\r\n", Method::Connect);
    assert!(h.is_tunnel() && !h.keep_alive());
    assert_eq!(h.framing(), Framing::None);
    let h = parse(b"HTTP/1.1 200 OK\r\n\r\n", Method::Get);
    assert_eq!(
        (h.framing(), h.keep_alive()),
        (Framing::CloseDelimited, false)
    );
    let h = parse(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        Method::Get,
    );
    assert_eq!((h.framing(), h.keep_alive()), (Framing::Chunked, false));
    let h = parse(
        b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\nConnection: keep-alive\r\n\r\n",
        Method::Get,
    );
    assert_eq!((h.version(), h.keep_alive()), (Version::Http10, true));
    let buf =
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n";
    let h = parse(buf, Method::Get);
    assert!(h.is_tunnel());
    assert_eq!(h.upgrade(buf), Some(&b"websocket"[..]));
    let buf = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n";
    let h = parse(buf, Method::Get);
    assert_eq!(
        (h.status(), h.reason(buf)),
        (503, &b"Service Unavailable"[..])
    );
}

// ---- encoder --------------------------------------------------------------------------------

fn encode_req(data: &[u8], edits: &RequestEdits<'_>) -> String {
    let h = head(data);
    let mut out = Vec::new();
    encode_request(&h, data, edits, &mut out).unwrap();
    String::from_utf8(out).unwrap()
}

#[test]
fn encode_strips_hop_by_hop_and_applies_edits() {
    let data = b"POST /api/v1/x?y=1 HTTP/1.1\r\nHost: a.example\r\nConnection: keep-alive, X-Secret\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\nTrailer: x-sum\r\nUpgrade: foo\r\nX-Secret: s\r\nX-Drop: d\r\nX-Set: old\r\nAccept: */*\r\nContent-Length: 2\r\n\r\nhi";
    let out = encode_req(
        data,
        &RequestEdits {
            headers: HeaderEdits {
                remove: &["x-drop"],
                set: &[("X-Set", b"new")],
                add: &[("X-Forwarded-For", b"192.0.2.1")],
            },
            path: Some(b"/v1/x?y=1"),
            host: Some(b"backend.internal:8080"),
            ..RequestEdits::default()
        },
    );
    assert_eq!(
        out,
        "POST /v1/x?y=1 HTTP/1.1\r\nHost: backend.internal:8080\r\nAccept: */*\r\nX-Set: new\r\nX-Forwarded-For: 192.0.2.1\r\nContent-Length: 2\r\n\r\n"
    );
}

#[test]
fn encode_forms_versions_and_connection() {
    // Absolute-form becomes origin-form with the target's authority as Host.
    let out = encode_req(
        &fixture("req-ok-curl-proxy-absolute.http"),
        &RequestEdits::default(),
    );
    assert!(
        out.starts_with("GET /path/to?x=y HTTP/1.1\r\nHost: example.com\r\n"),
        "{out}"
    );
    assert!(!out.contains("Proxy-Connection"), "{out}");
    let out = encode_req(
        &fixture("req-ok-absolute-ipv6.http"),
        &RequestEdits::default(),
    );
    assert!(
        out.starts_with("GET / HTTP/1.1\r\nHost: [::1]:8080\r\n"),
        "{out}"
    );
    // Fields the Connection field names are hop-by-hop too.
    let out = encode_req(
        &fixture("req-ok-connection-nominates.http"),
        &RequestEdits::default(),
    );
    assert_eq!(
        out,
        "GET / HTTP/1.1\r\nHost: example.com\r\nX-End: 2\r\n\r\n"
    );
    // HTTP/1.0 goes out as 1.1, closing unless it asked for keep-alive.
    let out = encode_req(
        &fixture("req-ok-curl-http10.http"),
        &RequestEdits::default(),
    );
    assert!(
        out.starts_with("GET /old HTTP/1.1\r\n") && out.ends_with("Connection: close\r\n\r\n"),
        "{out}"
    );
    // Upgrades keep Upgrade and say so in Connection; HTTP2-Settings (named) never leaks.
    let out = encode_req(
        &fixture("req-ok-curl-websocket-upgrade.http"),
        &RequestEdits::default(),
    );
    assert!(
        out.ends_with("Connection: upgrade\r\nUpgrade: websocket\r\n\r\n"),
        "{out}"
    );
    let data = fixture("req-ok-curl-h2c-upgrade.http");
    let out = encode_req(
        &data,
        &RequestEdits {
            connection: Some(ConnectionHeader::Persist),
            ..RequestEdits::default()
        },
    );
    assert!(
        !out.contains("upgrade") && !out.contains("HTTP2-Settings") && !out.contains("Upgrade"),
        "{out}"
    );
    // Chunked request body re-framed with a length (e.g. after buffering it).
    let out = encode_req(
        &fixture("req-ok-curl-post-chunked.http"),
        &RequestEdits {
            framing: Some(Framing::Length(19)),
            ..RequestEdits::default()
        },
    );
    assert!(
        out.contains("Content-Length: 19\r\n") && !out.contains("Transfer-Encoding"),
        "{out}"
    );
    // Expect from HTTP/1.0 is dropped: the origin must not answer 100 to a 1.0 client.
    let out = encode_req(
        b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\nx",
        &RequestEdits::default(),
    );
    assert!(!out.contains("Expect"), "{out}");
}

#[test]
fn encode_refuses_bad_edits() {
    let data = fixture("req-ok-curl-get.http");
    let h = head(&data);
    let mut out = Vec::new();
    let try_edit = |edits: RequestEdits<'_>, out: &mut Vec<u8>| {
        encode_request(&h, &data, &edits, out).map_err(|e| e.violation())
    };
    let bad: [(RequestEdits<'_>, Violation); 7] = [
        (
            RequestEdits {
                headers: HeaderEdits {
                    add: &[("X-A", b"a\r\nInjected: 1")],
                    ..HeaderEdits::default()
                },
                ..RequestEdits::default()
            },
            Violation::InvalidHeaderValue,
        ),
        (
            RequestEdits {
                headers: HeaderEdits {
                    set: &[("Bad Name", b"v")],
                    ..HeaderEdits::default()
                },
                ..RequestEdits::default()
            },
            Violation::InvalidHeaderName,
        ),
        (
            RequestEdits {
                headers: HeaderEdits {
                    add: &[("Content-Length", b"0")],
                    ..HeaderEdits::default()
                },
                ..RequestEdits::default()
            },
            Violation::ManagedHeader,
        ),
        (
            RequestEdits {
                path: Some(b"no-slash"),
                ..RequestEdits::default()
            },
            Violation::InvalidPath,
        ),
        (
            RequestEdits {
                path: Some(b"/a b"),
                ..RequestEdits::default()
            },
            Violation::InvalidPath,
        ),
        (
            RequestEdits {
                host: Some(b"a/b"),
                ..RequestEdits::default()
            },
            Violation::InvalidHost,
        ),
        (
            RequestEdits {
                connection: Some(ConnectionHeader::Upgrade),
                ..RequestEdits::default()
            },
            Violation::NoUpgrade,
        ),
    ];
    for (edits, want) in bad {
        assert_eq!(try_edit(edits, &mut out), Err(want));
        assert!(out.is_empty(), "partial output on error");
    }
    assert_eq!(
        encode_request(
            &h,
            &data,
            &RequestEdits {
                host: Some(b"x"),
                ..RequestEdits::default()
            },
            &mut out
        )
        .map_err(|e| (e.status(), e.blame())),
        Ok(())
    );
    assert!(is_managed_header("Transfer-Encoding") && !is_managed_header("x-request-id"));
}

#[test]
fn encode_responses() {
    let limits = Limits::default();
    let enc = |data: &[u8], method, edits: &ResponseEdits<'_>| {
        let Ok(Parsed::Complete { head, .. }) = parse_response(data, &limits, method) else {
            panic!()
        };
        let mut out = Vec::new();
        encode_response(&head, data, edits, &mut out).unwrap();
        String::from_utf8_lossy(&out).into_owned()
    };
    let nginx = fixture("resp-ok-nginx-200.http");
    let out = enc(&nginx, Method::Get, &ResponseEdits::default());
    assert!(
        out.starts_with("HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\n"),
        "{out}"
    );
    assert!(
        out.ends_with("Accept-Ranges: bytes\r\nContent-Length: 5\r\n\r\n"),
        "{out}"
    );
    // Chunked upstream, HTTP/1.0 client: close-delimited, Connection: close.
    let chunked = fixture("resp-ok-chunked-trailers.http");
    let out = enc(
        &chunked,
        Method::Get,
        &ResponseEdits {
            framing: Some(Framing::CloseDelimited),
            connection: Some(ConnectionHeader::for_peer(Version::Http10, true)),
            ..ResponseEdits::default()
        },
    );
    assert!(
        !out.contains("Transfer-Encoding") && !out.contains("Trailer:"),
        "{out}"
    );
    assert!(out.ends_with("Connection: close\r\n\r\n"), "{out}");
    // HTTP/1.0 keep-alive client.
    let out = enc(
        &nginx,
        Method::Get,
        &ResponseEdits {
            connection: Some(ConnectionHeader::for_peer(Version::Http10, true)),
            headers: HeaderEdits {
                remove: &["server"],
                ..HeaderEdits::default()
            },
            ..ResponseEdits::default()
        },
    );
    assert!(
        out.ends_with("Content-Length: 5\r\nConnection: keep-alive\r\n\r\n")
            && !out.contains("nginx"),
        "{out}"
    );
    // HEAD and 304 keep their Content-Length; 204 loses it.
    let out = enc(
        &fixture("resp-ok-to-head-with-length.http"),
        Method::Head,
        &ResponseEdits::default(),
    );
    assert!(out.contains("Content-Length: 100000\r\n"), "{out}");
    let out = enc(
        b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n",
        Method::Get,
        &ResponseEdits::default(),
    );
    assert_eq!(out, "HTTP/1.1 204 No Content\r\n\r\n");
    let out = enc(
        &fixture("resp-ok-101-websocket.http"),
        Method::Get,
        &ResponseEdits::default(),
    );
    assert!(
        out.ends_with("Connection: upgrade\r\nUpgrade: websocket\r\n\r\n"),
        "{out}"
    );
    let out = enc(
        &fixture("resp-ok-no-reason.http"),
        Method::Get,
        &ResponseEdits::default(),
    );
    assert!(out.starts_with("HTTP/1.1 404 \r\n"), "{out}");
}

// ---- bodies -------------------------------------------------------------------------------

#[test]
fn body_decoder_states() {
    let limits = Limits::default();
    let mut d = BodyDecoder::for_request(Framing::Length(5), &limits);
    let got = d.decode(b"helloGET /").unwrap();
    assert_eq!((got.consumed, got.payload), (5, &b"hello"[..]));
    assert!(d.is_done());
    assert_eq!(d.decode(b"GET /").unwrap().consumed, 0);

    let mut d = BodyDecoder::for_request(Framing::Length(5), &limits);
    assert_eq!(d.decode(b"hel").unwrap().payload, b"hel");
    assert_eq!(d.remaining(), Some(2));
    assert_eq!(d.eof(), Err(H1Error::Request(Violation::IncompleteBody)));

    let mut d = BodyDecoder::for_response(Framing::CloseDelimited, &limits);
    assert_eq!(d.decode(b"abc").unwrap().payload, b"abc");
    assert!(!d.is_done());
    assert_eq!(d.eof(), Ok(()));
    assert!(d.is_done());

    let mut d = BodyDecoder::for_response(Framing::None, &limits);
    assert!(d.is_done());
    assert_eq!(d.decode(b"next").unwrap().consumed, 0);

    // Chunked: one payload slice per call, framing around it consumed eagerly.
    let mut d = BodyDecoder::for_response(Framing::Chunked, &limits);
    let input = b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\nNEXT";
    let a = d.decode(input).unwrap();
    assert_eq!((a.payload, a.consumed), (&b"abc"[..], 11));
    let b = d.decode(&input[11..]).unwrap();
    assert_eq!(
        (b.payload, b.consumed, b.trailers),
        (&b"defg"[..], 11, None)
    );
    assert!(d.is_done());
    assert_eq!(&input[22..], b"NEXT");

    // Incomplete chunked body at EOF.
    let mut d = BodyDecoder::for_response(Framing::Chunked, &limits);
    d.decode(b"5\r\nhe").unwrap();
    assert_eq!(d.eof(), Err(H1Error::Response(Violation::IncompleteBody)));
}

#[test]
fn chunked_encoder_round_trips() {
    assert_eq!(ChunkHeader::new(0).as_bytes(), b"0\r\n");
    assert_eq!(ChunkHeader::new(255).as_bytes(), b"ff\r\n");
    assert_eq!(ChunkHeader::new(4096).as_bytes(), b"1000\r\n");
    assert_eq!(
        ChunkHeader::new(u64::MAX).as_bytes(),
        b"ffffffffffffffff\r\n"
    );
    let mut wire = Vec::new();
    write_chunk(&mut wire, b"hello ");
    write_chunk(&mut wire, b"");
    write_chunk(&mut wire, &[b'x'; 300]);
    write_last_chunk(&mut wire, Some(b"grpc-status: 0\r\n"));
    let (payload, trailers, consumed, done, err) = drive(
        BodyDecoder::for_request(Framing::Chunked, &Limits::default()),
        &wire,
        7,
    );
    assert_eq!(err, None);
    assert!(done);
    assert_eq!(consumed, wire.len());
    assert_eq!(payload.len(), 306);
    assert_eq!(trailers.as_deref(), Some(&b"grpc-status: 0\r\n"[..]));
}

/// Streaming through a small fixed buffer: the proxy pattern.
#[test]
fn streams_through_a_fixed_buffer() {
    let body: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let mut wire = Vec::new();
    for piece in body.chunks(777) {
        write_chunk(&mut wire, piece);
    }
    write_last_chunk(&mut wire, None);
    let mut decoder = BodyDecoder::for_request(Framing::Chunked, &Limits::default());
    let mut buf = [0u8; 512];
    let (mut filled, mut fed) = (0, 0);
    let mut out = Vec::new();
    while !decoder.is_done() {
        // "read": append what fits.
        let n = (buf.len() - filled).min(wire.len() - fed);
        buf[filled..filled + n].copy_from_slice(&wire[fed..fed + n]);
        filled += n;
        fed += n;
        loop {
            let d = decoder.decode(&buf[..filled]).unwrap();
            out.extend_from_slice(d.payload);
            let used = d.consumed;
            buf.copy_within(used..filled, 0);
            filled -= used;
            if used == 0 || decoder.is_done() {
                break;
            }
        }
        assert!(n > 0 || decoder.is_done(), "stuck");
    }
    assert_eq!(out, body);
}

// ---- allocation and size budgets ----------------------------------------------------------

/// Counts allocations per thread (tests run on several threads), passing through to System.
struct CountingAlloc;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn count() {
    let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
}

// SAFETY: every call is forwarded unchanged to `System`, which upholds the GlobalAlloc
// contract; the counter is a const-initialised thread-local Cell that never allocates.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: same layout contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: same layout contract as our caller's.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: ptr was allocated by System with this layout (all our allocations are).
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: ptr was allocated by System with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static COUNTING: CountingAlloc = CountingAlloc;

fn allocations_in(f: impl FnOnce()) -> u64 {
    let before = ALLOCATIONS.with(Cell::get);
    f();
    ALLOCATIONS.with(Cell::get) - before
}

const TEN_HEADERS: &[u8] = b"POST /api/v1/orders?id=42 HTTP/1.1\r\nHost: shop.example.com\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64)\r\nAccept: application/json\r\nAccept-Encoding: gzip, deflate, br\r\nAccept-Language: en-US,en;q=0.9\r\nContent-Type: application/json\r\nContent-Length: 2\r\nX-Request-Id: 4bf92f3577b34da6a3ce929d0e0e4736\r\nCookie: session=abc123\r\nConnection: keep-alive\r\n\r\n{}";

#[test]
fn zero_allocations_on_the_common_path() {
    let limits = Limits::default();
    let mut out = Vec::with_capacity(1024);
    let mut progress = HeadProgress::default();
    let mut decoded = 0;
    let n = allocations_in(|| {
        let Ok(Parsed::Complete { head, consumed }) =
            parse_request_resumable(TEN_HEADERS, &limits, &mut progress)
        else {
            panic!()
        };
        assert_eq!(head.header_count(), 10);
        let path = normalize_path(head.path(TEN_HEADERS).as_bytes()).unwrap();
        encode_request(
            &head,
            TEN_HEADERS,
            &RequestEdits {
                path: Some(path.as_bytes()),
                headers: HeaderEdits {
                    add: &[("X-Forwarded-For", b"192.0.2.1")],
                    ..HeaderEdits::default()
                },
                ..RequestEdits::default()
            },
            &mut out,
        )
        .unwrap();
        let mut body = head.body_decoder(&limits);
        decoded = body.decode(&TEN_HEADERS[consumed..]).unwrap().payload.len();
        let resp = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nDate: Tue, 25 Nov 2025 10:00:00 GMT\r\n\r\n{}";
        let Ok(Parsed::Complete { head: r, .. }) = parse_response(resp, &limits, head.method())
        else {
            panic!()
        };
        out.clear();
        encode_response(&r, resp, &ResponseEdits::default(), &mut out).unwrap();
    });
    assert_eq!(decoded, 2);
    assert_eq!(
        n, 0,
        "allocations on parse + normalize + encode + decode + response"
    );

    // 32 fields still inline; the 33rd spills once.
    let mut req = b"GET / HTTP/1.1\r\nHost: a\r\n".to_vec();
    for i in 0..31 {
        req.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
    }
    let at_32 = [&req[..], b"\r\n"].concat();
    let at_33 = [&req[..], b"X-Last: v\r\n\r\n"].concat();
    assert_eq!(allocations_in(|| drop(parse_request(&at_32, &limits))), 0);
    assert!(allocations_in(|| drop(parse_request(&at_33, &limits))) > 0);
}

#[test]
fn head_sizes() {
    let req = std::mem::size_of::<RequestHead>();
    let resp = std::mem::size_of::<ResponseHead>();
    let dec = std::mem::size_of::<BodyDecoder>();
    assert!(req <= 640, "RequestHead is {req} bytes");
    assert!(resp <= 640, "ResponseHead is {resp} bytes");
    assert!(dec <= 64, "BodyDecoder is {dec} bytes");
    println!("RequestHead {req} B, ResponseHead {resp} B, BodyDecoder {dec} B");
}

/// `cargo test --release -p meshgate-dataplane --lib http1::tests::bench -- --ignored --nocapture`
#[test]
#[ignore = "micro-benchmark; run in release with --nocapture"]
fn bench() {
    use std::hint::black_box;
    use std::time::Instant;
    let limits = Limits::default();
    let iters = 1_000_000u32;
    let t = Instant::now();
    for _ in 0..iters {
        let parsed = parse_request(black_box(TEN_HEADERS), &limits);
        black_box(&parsed);
    }
    let parse_ns = t.elapsed().as_nanos() as f64 / f64::from(iters);
    let Ok(Parsed::Complete { head, .. }) = parse_request(TEN_HEADERS, &limits) else {
        panic!()
    };
    let mut out = Vec::with_capacity(1024);
    let t = Instant::now();
    for _ in 0..iters {
        out.clear();
        encode_request(
            black_box(&head),
            TEN_HEADERS,
            &RequestEdits::default(),
            &mut out,
        )
        .unwrap();
        black_box(&out);
    }
    let encode_ns = t.elapsed().as_nanos() as f64 / f64::from(iters);
    let t = Instant::now();
    for _ in 0..iters {
        let mut raw = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; 100];
        let mut req = httparse::Request::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_request_with_uninit_headers(
            &mut req,
            black_box(TEN_HEADERS),
            &mut raw,
        );
        black_box(parsed.is_ok());
    }
    let httparse_ns = t.elapsed().as_nanos() as f64 / f64::from(iters);
    println!(
        "10-header request: parse_request {parse_ns:.0} ns (bare httparse {httparse_ns:.0} ns), encode_request {encode_ns:.0} ns"
    );
}

// ---- fuzz corpus ----------------------------------------------------------------------------

/// The fuzz corpus, replayed without a fuzzer (stable CI): see `fuzzing::fuzz_check`.
#[test]
fn fuzz_corpus_replays() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/corpus/http1");
    let mut count = 0;
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{dir}: {e}")) {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let result = std::panic::catch_unwind(|| fuzz_check(&bytes));
        assert!(result.is_ok(), "{path:?} fails the fuzz property");
        count += 1;
    }
    assert!(count >= 100, "only {count} corpus files in {dir}");
}

/// Every fixture also satisfies the fuzz property.
#[test]
fn fixtures_satisfy_fuzz_property() {
    for (_, data) in fixtures("") {
        fuzz_check(&data);
    }
}

#[test]
#[ignore = "profiling aid: perf record the test binary running only this"]
fn parse_loop_for_perf() {
    let limits = Limits::default();
    for _ in 0..5_000_000u32 {
        let parsed = parse_request(std::hint::black_box(TEN_HEADERS), &limits);
        std::hint::black_box(&parsed);
    }
}
