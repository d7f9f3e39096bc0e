#!/usr/bin/env python3
"""Writes the hand-made fixtures of this directory (the req-ok-curl/wrk/h2load/python ones
were captured from the real clients). Run from this directory; the files are committed.

Naming, read by dataplane/src/http1/tests.rs:
  req-ok-*.http      one or more requests (heads + bodies) that must parse and decode
  req-NNN-*.http     must fail with status NNN (head or body), nothing before it forwarded
  resp-ok-*.http     responses (to GET; "-to-head-"/"-to-connect-" in the name change it)
  resp-502-*.http    upstream responses that must be refused
"""

H = b"Host: example.com\r\n"

def req(line=b"POST / HTTP/1.1", fields=(H,), body=b""):
    return line + b"\r\n" + b"".join(fields) + b"\r\n" + body

CASES = {
    # ---- valid requests -------------------------------------------------------------
    "req-ok-browser-like.http": req(b"GET /assets/app.js?v=3 HTTP/1.1", (
        b"Host: www.example.com\r\n",
        b"Connection: keep-alive\r\n",
        b"sec-ch-ua: \"Chromium\";v=\"124\", \"Not-A.Brand\";v=\"99\"\r\n",
        b"sec-ch-ua-mobile: ?0\r\n",
        b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36\r\n",
        b"sec-ch-ua-platform: \"Linux\"\r\n",
        b"Accept: */*\r\n",
        b"Sec-Fetch-Site: same-origin\r\n",
        b"Sec-Fetch-Mode: no-cors\r\n",
        b"Sec-Fetch-Dest: script\r\n",
        b"Referer: https://www.example.com/\r\n",
        b"Accept-Encoding: gzip, deflate, br, zstd\r\n",
        b"Accept-Language: en-US,en;q=0.9\r\n",
        b"Cookie: session=abc123; theme=dark\r\n",
    )),
    "req-ok-pipelined-three.http":
        req(b"GET /one HTTP/1.1") + req(b"POST /two HTTP/1.1", (H, b"Content-Length: 5\r\n"), b"hello")
        + req(b"GET /three HTTP/1.1", (H, b"Connection: close\r\n")),
    "req-ok-chunked-trailers-ext.http": req(fields=(H, b"Transfer-Encoding: chunked\r\n", b"Trailer: x-checksum\r\n"),
        body=b"5;name=value\r\nhello\r\n0006\r\n world\r\nA ; q=\"x\"\r\n0123456789\r\n0\r\nx-checksum: 1234\r\nx-other: y\r\n\r\n"),
    "req-ok-te-case-and-tab.http": req(fields=(H, b"Transfer-Encoding:\tCHUNKED\r\n"), body=b"1\r\na\r\n0\r\n\r\n"),
    "req-ok-cl-identical-duplicates.http": req(fields=(H, b"Content-Length: 3\r\n", b"content-length: 3\r\n"), body=b"abc"),
    "req-ok-cl-identical-list.http": req(fields=(H, b"Content-Length: 3, 3\r\n"), body=b"abc"),
    "req-ok-cl-zero.http": req(fields=(H, b"Content-Length: 0\r\n")),
    "req-ok-leading-crlf.http": b"\r\n" + req(b"GET / HTTP/1.1"),
    "req-ok-http10-no-host-keepalive.http": req(b"GET /x HTTP/1.0", (b"Connection: keep-alive\r\n",)),
    "req-ok-options-asterisk.http": req(b"OPTIONS * HTTP/1.1"),
    "req-ok-connect.http": req(b"CONNECT example.com:443 HTTP/1.1", (b"Host: example.com:443\r\n",)),
    "req-ok-absolute-ipv6.http": req(b"GET http://[::1]:8080 HTTP/1.1", (b"Host: [::1]:8080\r\n",)),
    "req-ok-empty-value-obs-text.http": req(b"GET / HTTP/1.1", (H, b"X-Empty:\r\n", b"X-Latin: caf\xe9\r\n")),
    "req-ok-max-headers-100.http": req(b"GET / HTTP/1.1", (H,) + tuple(b"X-H%d: v\r\n" % i for i in range(99))),

    # ---- smuggling: CL.TE / TE.CL / TE.TE (RFC 9112 §6.1, §6.3) -------------------
    "req-400-cl-te.http": req(fields=(H, b"Content-Length: 13\r\n", b"Transfer-Encoding: chunked\r\n"),
        body=b"0\r\n\r\nSMUGGLED"),
    "req-400-te-cl.http": req(fields=(H, b"Transfer-Encoding: chunked\r\n", b"Content-Length: 3\r\n"),
        body=b"8\r\nSMUGGLED\r\n0\r\n\r\n"),
    "req-400-te-te-second-field.http": req(fields=(H, b"Transfer-Encoding: chunked\r\n", b"Transfer-encoding: cow\r\n"),
        body=b"0\r\n\r\n"),
    "req-400-te-xchunked.http": req(fields=(H, b"Transfer-Encoding: xchunked\r\n"), body=b"0\r\n\r\n"),
    "req-400-te-space-before-colon.http": req(fields=(H, b"Transfer-Encoding : chunked\r\n"), body=b"0\r\n\r\n"),
    "req-400-te-obs-fold.http": req(fields=(H, b"X: y\r\n", b" Transfer-Encoding: chunked\r\n"), body=b"0\r\n\r\n"),
    "req-400-te-folded-value.http": req(fields=(H, b"Transfer-Encoding:\r\n", b" chunked\r\n"), body=b"0\r\n\r\n"),
    "req-400-te-leading-space-first-field.http": req(fields=(b" Transfer-Encoding: chunked\r\n", H), body=b"0\r\n\r\n"),
    "req-400-te-chunked-not-final.http": req(fields=(H, b"Transfer-Encoding: chunked, gzip\r\n"), body=b"0\r\n\r\n"),
    "req-400-te-chunked-twice.http": req(fields=(H, b"Transfer-Encoding: chunked, chunked\r\n"), body=b"0\r\n\r\n"),
    "req-400-te-gzip-only.http": req(fields=(H, b"Transfer-Encoding: gzip\r\n"), body=b"x"),
    "req-400-te-empty.http": req(fields=(H, b"Transfer-Encoding: \r\n"), body=b""),
    "req-400-te-empty-element.http": req(fields=(H, b"Transfer-Encoding: ,chunked\r\n"), body=b"0\r\n\r\n"),
    "req-400-te-quoted.http": req(fields=(H, b"Transfer-Encoding: \"chunked\"\r\n"), body=b"0\r\n\r\n"),
    "req-400-te-vertical-tab.http": req(fields=(H, b"Transfer-Encoding: chunked\x0b\r\n"), body=b"0\r\n\r\n"),
    "req-400-te-http10.http": req(b"POST / HTTP/1.0", (H, b"Transfer-Encoding: chunked\r\n"), b"0\r\n\r\n"),
    "req-400-te-http10-with-cl.http": req(b"POST / HTTP/1.0", (H, b"Content-Length: 5\r\n", b"Transfer-Encoding: chunked\r\n"), b"0\r\n\r\n"),
    "req-501-te-gzip-chunked.http": req(fields=(H, b"Transfer-Encoding: gzip, chunked\r\n"), body=b"0\r\n\r\n"),
    "req-501-te-identity-chunked.http": req(fields=(H, b"Transfer-Encoding: identity\r\n", b"Transfer-Encoding: chunked\r\n"), body=b"0\r\n\r\n"),
    "req-400-cl-differing-fields.http": req(fields=(H, b"Content-Length: 6\r\n", b"Content-Length: 5\r\n"), body=b"hello!"),
    "req-400-cl-differing-list.http": req(fields=(H, b"Content-Length: 5, 6\r\n"), body=b"hello!"),
    "req-400-cl-plus.http": req(fields=(H, b"Content-Length: +5\r\n"), body=b"hello"),
    "req-400-cl-negative.http": req(fields=(H, b"Content-Length: -1\r\n")),
    "req-400-cl-hex.http": req(fields=(H, b"Content-Length: 0x5\r\n"), body=b"hello"),
    "req-400-cl-inner-space.http": req(fields=(H, b"Content-Length: 1 2\r\n"), body=b"x" * 12),
    "req-400-cl-empty.http": req(fields=(H, b"Content-Length:\r\n")),
    "req-400-cl-overflow.http": req(fields=(H, b"Content-Length: 99999999999999999999999\r\n")),
    "req-400-cl-space-before-colon.http": req(fields=(H, b"Content-Length : 5\r\n"), body=b"hello"),
    "req-400-cl-trailing-comma.http": req(fields=(H, b"Content-Length: 5,\r\n"), body=b"hello"),

    # ---- line endings and bytes ------------------------------------------------------
    "req-400-bare-lf-everywhere.http": b"GET / HTTP/1.1\nHost: example.com\n\n",
    "req-400-bare-lf-one-field.http": b"GET / HTTP/1.1\r\nHost: example.com\r\nX: y\n\r\n",
    "req-400-bare-lf-end.http": b"GET / HTTP/1.1\r\nHost: example.com\r\n\n",
    "req-400-bare-lf-request-line.http": b"GET / HTTP/1.1\nHost: example.com\r\n\r\n",
    "req-400-bare-lf-leading.http": b"\nGET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
    "req-400-bare-cr.http": b"GET / HTTP/1.1\r\nHost: example.com\rX: y\r\n\r\n",
    "req-400-nul-in-value.http": req(b"GET / HTTP/1.1", (H, b"X: a\x00b\r\n")),
    "req-400-ctl-in-value.http": req(b"GET / HTTP/1.1", (H, b"X: a\x01b\r\n")),
    "req-400-del-in-value.http": req(b"GET / HTTP/1.1", (H, b"X: a\x7fb\r\n")),
    "req-400-bad-name-char.http": req(b"GET / HTTP/1.1", (H, b"X@Y: a\r\n")),
    "req-400-empty-name.http": req(b"GET / HTTP/1.1", (H, b": a\r\n")),
    "req-400-no-colon.http": req(b"GET / HTTP/1.1", (H, b"NoColon\r\n")),
    "req-400-http09.http": b"GET /\r\n\r\n",
    "req-505-http12.http": req(b"GET / HTTP/1.2"),
    "req-505-http20.http": req(b"GET / HTTP/2.0"),
    "req-400-bad-version.http": req(b"GET / HTXP/1.1"),
    "req-400-lowercase-version.http": req(b"GET / http/1.1"),
    "req-400-double-space.http": req(b"GET  / HTTP/1.1"),
    "req-400-tab-delimiter.http": req(b"GET\t/ HTTP/1.1"),

    # ---- host and target -------------------------------------------------------------
    "req-400-missing-host.http": req(b"GET / HTTP/1.1", ()),
    "req-400-duplicate-host.http": req(b"GET / HTTP/1.1", (H, b"Host: evil.example\r\n")),
    "req-400-host-userinfo.http": req(b"GET / HTTP/1.1", (b"Host: user@example.com\r\n",)),
    "req-400-host-path.http": req(b"GET / HTTP/1.1", (b"Host: example.com/evil\r\n",)),
    "req-400-host-space.http": req(b"GET / HTTP/1.1", (b"Host: example.com evil\r\n",)),
    "req-400-absolute-userinfo.http": req(b"GET http://user:pw@example.com/ HTTP/1.1"),
    "req-400-absolute-ftp.http": req(b"GET ftp://example.com/ HTTP/1.1"),
    "req-400-target-fragment.http": req(b"GET /a#b HTTP/1.1"),
    "req-400-target-utf8.http": req("GET /caf\u00e9 HTTP/1.1".encode()),
    "req-400-target-relative.http": req(b"GET index.html HTTP/1.1"),
    "req-400-asterisk-get.http": req(b"GET * HTTP/1.1"),
    "req-400-connect-origin-form.http": req(b"CONNECT / HTTP/1.1"),
    "req-400-connect-no-port.http": req(b"CONNECT example.com HTTP/1.1"),

    "req-400-connection-33-options.http": req(b"GET / HTTP/1.1", (H, b"Connection: " + b", ".join(b"x-%d" % i for i in range(33)) + b"\r\n")),
    "req-ok-connection-nominates.http": req(b"GET / HTTP/1.1", (H, b"Connection: keep-alive, X-Hop\r\n", b"X-Hop: 1\r\n", b"X-End: 2\r\n")),

    # ---- limits -----------------------------------------------------------------------
    "req-431-70k-header.http": req(b"GET / HTTP/1.1", (H, b"X-Big: " + b"a" * (70 * 1024) + b"\r\n")),
    "req-431-101-headers.http": req(b"GET / HTTP/1.1", (H,) + tuple(b"X-H%d: v\r\n" % i for i in range(100))),
    "req-414-9k-target.http": req(b"GET /" + b"a" * (9 * 1024) + b" HTTP/1.1"),

    # ---- chunked body syntax ------------------------------------------------------------
    "req-400-chunk-size-overflow.http": req(fields=(H, b"Transfer-Encoding: chunked\r\n"), body=b"fffffffffffffffff\r\nx\r\n0\r\n\r\n"),
    "req-400-chunk-size-17-digits.http": req(fields=(H, b"Transfer-Encoding: chunked\r\n"), body=b"00000000000000001\r\nx\r\n0\r\n\r\n"),
    "req-400-chunk-size-negative.http": req(fields=(H, b"Transfer-Encoding: chunked\r\n"), body=b"-1\r\nx\r\n0\r\n\r\n"),
    "req-400-chunk-size-0x.http": req(fields=(H, b"Transfer-Encoding: chunked\r\n"), body=b"0x5\r\nhello\r\n0\r\n\r\n"),
    "req-400-chunk-size-empty.http": req(fields=(H, b"Transfer-Encoding: chunked\r\n"), body=b"\r\nhello\r\n0\r\n\r\n"),
    "req-400-chunk-size-inner-space.http": req(fields=(H, b"Transfer-Encoding: chunked\r\n"), body=b"1 0\r\n" + b"x" * 16 + b"\r\n0\r\n\r\n"),
    "req-400-chunk-size-bare-lf.http": req(fields=(H, b"Transfer-Encoding: chunked\r\n"), body=b"5\nhello\r\n0\r\n\r\n"),
    "req-400-chunk-ext-bare-lf.http": req(fields=(H, b"Transfer-Encoding: chunked\r\n"), body=b"5;a\nb\r\nhello\r\n0\r\n\r\n"),
    "req-400-chunk-ext-too-long.http": req(fields=(H, b"Transfer-Encoding: chunked\r\n"), body=b"5;" + b"a" * 2000 + b"\r\nhello\r\n0\r\n\r\n"),
    "req-400-chunk-data-no-crlf.http": req(fields=(H, b"Transfer-Encoding: chunked\r\n"), body=b"5\r\nhelloXX0\r\n\r\n"),
    "req-400-chunk-data-bare-lf.http": req(fields=(H, b"Transfer-Encoding: chunked\r\n"), body=b"5\r\nhello\n0\r\n\r\n"),
    "req-400-chunk-data-too-long.http": req(fields=(H, b"Transfer-Encoding: chunked\r\n"), body=b"3\r\nhello\r\n0\r\n\r\n"),
    "req-400-chunk-last-bare-lf.http": req(fields=(H, b"Transfer-Encoding: chunked\r\n"), body=b"0\n\r\n"),
    "req-400-trailer-obs-fold.http": req(fields=(H, b"Transfer-Encoding: chunked\r\n"), body=b"0\r\nx: a\r\n b\r\n\r\n"),
    "req-400-trailer-bare-lf.http": req(fields=(H, b"Transfer-Encoding: chunked\r\n"), body=b"0\r\nx: a\ny: b\r\n\r\n"),
    "req-400-trailer-nul.http": req(fields=(H, b"Transfer-Encoding: chunked\r\n"), body=b"0\r\nx: a\x00\r\n\r\n"),
    "req-400-trailer-too-large.http": req(fields=(H, b"Transfer-Encoding: chunked\r\n"), body=b"0\r\nx: " + b"a" * (17 * 1024) + b"\r\n\r\n"),

    # ---- responses ----------------------------------------------------------------------
    "resp-ok-nginx-200.http": b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Tue, 25 Nov 2025 10:00:00 GMT\r\nContent-Type: text/html\r\nContent-Length: 5\r\nLast-Modified: Mon, 24 Nov 2025 10:00:00 GMT\r\nConnection: keep-alive\r\nETag: \"6564-5\"\r\nAccept-Ranges: bytes\r\n\r\nhello",
    "resp-ok-chunked-trailers.http": b"HTTP/1.1 200 OK\r\nContent-Type: application/grpc\r\nTransfer-Encoding: chunked\r\nTrailer: grpc-status\r\n\r\n4\r\nabcd\r\n0\r\ngrpc-status: 0\r\ngrpc-message: ok\r\n\r\n",
    "resp-ok-204-then-304.http": b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\nHTTP/1.1 304 Not Modified\r\nContent-Length: 1234\r\nETag: \"x\"\r\n\r\n",
    "resp-ok-100-then-200.http": b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "resp-ok-to-head-with-length.http": b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n",
    "resp-ok-to-head-chunked.http": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
    "resp-ok-to-connect-200.http": b"HTTP/1.1 200 Connection Established\r\n\r\n",
    "resp-ok-close-delimited-http10.http": b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the upstream closes",
    "resp-ok-101-websocket.http": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
    "resp-ok-no-reason.http": b"HTTP/1.1 404\r\nContent-Length: 0\r\n\r\n",
    "resp-ok-obs-text-reason.http": b"HTTP/1.1 200 Tr\xe8s bien\r\nContent-Length: 0\r\n\r\n",
    "resp-502-cl-te.http": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "resp-502-cl-differing.http": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "resp-502-te-gzip.http": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nxx",
    "resp-502-bare-lf.http": b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
    "resp-502-obs-fold.http": b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 0\r\n\r\n",
    "resp-502-space-before-colon.http": b"HTTP/1.1 200 OK\r\nContent-Length : 0\r\n\r\n",
    "resp-502-bad-status.http": b"HTTP/1.1 2x0 OK\r\n\r\n",
    "resp-502-status-099.http": b"HTTP/1.1 099 Odd\r\nContent-Length: 0\r\n\r\n",
    "resp-502-http2-status-line.http": b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    "resp-502-chunk-overflow.http": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000000\r\n",
    "resp-502-truncated-length.http": b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
    "resp-502-http10-te.http": b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
}

if __name__ == "__main__":
    for name, data in CASES.items():
        with open(name, "wb") as f:
            f.write(data)
    print(f"wrote {len(CASES)} fixtures")
