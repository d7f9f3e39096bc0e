//! The HTTP gateway's edge behaviour through the real binary, with real peers: WebSocket
//! upgrades (python `websockets` client and server) on `http` and `https` listeners,
//! query-parameter routes, chunked trailers both ways, every request-smuggling input refused
//! with 400 before any byte reaches the origin (a raw recorder), header count/size limits on
//! HTTP/1 and HTTP/2, a 98/2 split over 10,000 requests and a split changed by SIGHUP under
//! load, python `h2` and `httpx` clients, and a slowloris client cut at the header-read timeout.
//!
//! The python peers run in the CI virtualenv (`.ci/run` installs `websockets`, `h2`, `httpx`;
//! `MESHGATE_TEST_PYTHON` names its interpreter, see testkit::spiffe_python).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use meshgate_testkit::http::raw;
use meshgate_testkit::pki::TestPki;
use meshgate_testkit::{
    HttpUpstream, Meshgate, RawOrigin, free_port, metric_sum, spiffe_python, wait_until,
};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_meshgate"))
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/http_edge")
        .join(name)
}

/// Run a python helper; (exit ok, stdout, stderr).
fn python(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(spiffe_python())
        .args(args)
        .output()
        .expect("run python");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const NEEDS: &str = "needs python `websockets`, `h2`, `httpx[http2]` (.ci/run installs them in its \
                     virtualenv; set MESHGATE_TEST_PYTHON to an interpreter that has them)";

/// The python WebSocket echo server, killed on drop.
struct WsServer {
    child: Child,
    addr: SocketAddr,
}

impl WsServer {
    /// `tls`: serve WebSocket over TLS with this (certificate, key).
    fn start(tls: Option<&(PathBuf, PathBuf)>) -> WsServer {
        let addr = addr(free_port());
        let mut child = Command::new(spiffe_python())
            .arg(script("ws.py"))
            .args(["server", &addr.port().to_string()])
            .args(tls.iter().flat_map(|(c, k)| [c.as_os_str(), k.as_os_str()]))
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the websocket server");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("stdout");
        BufReader::new(stdout).read_line(&mut line).expect("read");
        assert_eq!(
            line.trim(),
            "ready",
            "the websocket server did not start; {NEEDS}"
        );
        WsServer { child, addr }
    }
}

impl Drop for WsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Read from `s` until `out` ends with `end` (or fail after 5 s).
fn read_until(s: &mut TcpStream, end: &[u8]) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut out = Vec::new();
    let mut chunk = [0u8; 16384];
    while !out.windows(end.len()).any(|w| w == end) {
        match s.read(&mut chunk) {
            Ok(0) => panic!(
                "closed before {:?}: {}",
                String::from_utf8_lossy(end),
                String::from_utf8_lossy(&out)
            ),
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            Err(e) => panic!("read: {e}; so far: {}", String::from_utf8_lossy(&out)),
        }
    }
    out
}

/// The gateway with an `http` listener `web` and an `https` listener `secure` (example.test's
/// gateway certificate, no client auth), both with `idle_timeout`, then `rest` (routes and
/// clusters).
struct Gateway {
    mg: Meshgate,
    web: SocketAddr,
    secure: SocketAddr,
    /// The example.test root, to verify `secure` as `gateway.example.test`.
    root: PathBuf,
    _pki: TestPki,
}

impl Gateway {
    fn start(idle_timeout: &str, rest: &str) -> Gateway {
        let pki = TestPki::new();
        let (cert, key) = pki.gateway();
        let root = pki.bundle(&pki.example, "root");
        let (admin, web, secure) = (addr(free_port()), addr(free_port()), addr(free_port()));
        let config = format!(
            r#"version = 1
[admin]
address = "{admin}"
[runtime]
cores = 2
drain_timeout = "1s"

[[listeners]]
name = "web"
address = "{web}"
protocol = "http"
idle_timeout = "{idle_timeout}"

[[listeners]]
name = "secure"
address = "{secure}"
protocol = "https"
idle_timeout = "{idle_timeout}"
[listeners.tls]
certificates = [{{ cert = "{cert}", key = "{key}" }}]
{rest}"#,
            cert = s(&cert),
            key = s(&key),
        );
        let mg = Meshgate::start(bin(), &config, admin).expect("gateway starts");
        Gateway {
            mg,
            web,
            secure,
            root,
            _pki: pki,
        }
    }
}

#[test]
fn websocket_upgrades_relay_both_ways_on_http_and_https_with_an_idle_timeout() {
    let ws = WsServer::start(None);
    // A second origin that speaks WebSocket over TLS, reached through a [clusters.tls] cluster.
    let origin_pki = TestPki::new();
    let origin_cert = origin_pki.server("ws-origin", &["origin.example.test"]);
    let origin_root = origin_pki.bundle(&origin_pki.example, "origin-root");
    let wss_origin = WsServer::start(Some(&origin_cert));
    let Gateway {
        mg,
        web,
        secure,
        root,
        _pki,
    } = Gateway::start(
        "2s",
        &format!(
            r#"
[[routes]]
name = "no-upgrade"
listener = "web"
match = {{ path = {{ prefix = "/plain" }} }}
cluster = "ws"
upgrades = []

[[routes]]
name = "to-tls"
listener = "web"
match = {{ path = {{ prefix = "/tls" }} }}
cluster = "ws-tls"

[[routes]]
name = "ws"
listener = "web"
cluster = "ws"

[[routes]]
name = "wss"
listener = "secure"
cluster = "ws"

[[clusters]]
name = "ws"
endpoints = ["{}"]

[[clusters]]
name = "ws-tls"
endpoints = ["{}"]
[clusters.tls]
verify = {{ dns_names = ["origin.example.test"] }}
trust_bundle = "{}"
"#,
            ws.addr,
            wss_origin.addr,
            s(&origin_root),
        ),
    );
    let ws_py = script("ws.py");
    let ws_py = s(&ws_py);

    // Plain HTTP/1.1: the greeting the server sends right behind its 101, then 200 echoes of
    // text and binary messages up to 256 KiB.
    let (ok, out, err) = python(&[ws_py, "client", &format!("ws://{web}/chat")]);
    assert!(
        ok && out.trim() == "echoed 200",
        "{out}\n{err}\n{NEEDS}\n{}",
        mg.log()
    );
    // Over TLS (the https listener), verified against the example.test root.
    let (ok, out, err) = python(&[
        ws_py,
        "client",
        &format!("wss://127.0.0.1:{}/chat", secure.port()),
        s(&root),
        "gateway.example.test",
    ]);
    assert!(
        ok && out.trim() == "echoed 200",
        "{out}\n{err}\n{}",
        mg.log()
    );
    // Plain client, TLS upstream (verified by DNS name): the relay runs over the rustls session.
    let (ok, out, err) = python(&[ws_py, "client", &format!("ws://{web}/tls")]);
    assert!(
        ok && out.trim() == "echoed 200",
        "{out}\n{err}\n{}",
        mg.log()
    );

    // An upgraded connection that goes quiet is closed at the listener's idle timeout (2 s).
    let (ok, out, err) = python(&[ws_py, "idle", &format!("ws://{web}/chat"), "15"]);
    assert!(ok, "{out}\n{err}");
    let after: f64 = out
        .trim()
        .strip_prefix("closed after ")
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("the idle tunnel was not closed: {out}"));
    assert!((1.5..6.0).contains(&after), "closed after {after} s");

    // A route with `upgrades = []` forwards the request without Upgrade: no 101.
    let handshake = |path: &str, upgrade: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: upgrade\r\nupgrade: {upgrade}\r\n\
             sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
    };
    let mut c = TcpStream::connect(web).expect("connect");
    c.write_all(handshake("/plain", "websocket").as_bytes())
        .expect("send");
    let answer = String::from_utf8_lossy(&read_until(&mut c, b"\r\n\r\n")).into_owned();
    assert!(!answer.starts_with("HTTP/1.1 101"), "{answer}");
    assert!(answer.starts_with("HTTP/1.1 4"), "{answer}");
    // `Upgrade: h2c` is never forwarded, whatever the route allows.
    let mut c = TcpStream::connect(web).expect("connect");
    c.write_all(handshake("/chat", "h2c").as_bytes())
        .expect("send");
    let answer = String::from_utf8_lossy(&read_until(&mut c, b"\r\n\r\n")).into_owned();
    assert!(answer.starts_with("HTTP/1.1 4"), "{answer}");
    // A raw handshake through the gateway: the 101 carries the server's accept key.
    let mut c = TcpStream::connect(web).expect("connect");
    c.write_all(handshake("/chat", "websocket").as_bytes())
        .expect("send");
    let answer = String::from_utf8_lossy(&read_until(&mut c, b"\r\n\r\n")).into_owned();
    let lower = answer.to_ascii_lowercase();
    assert!(answer.starts_with("HTTP/1.1 101 "), "{answer}");
    assert!(lower.contains("upgrade: websocket"), "{answer}");
    assert!(lower.contains("connection: upgrade"), "{answer}");
    assert!(
        lower.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{answer}"
    );
    let m = mg.metrics();
    assert!(
        metric_sum(
            &m,
            "meshgate_http_requests_total",
            &[("route", "ws"), ("code_class", "1xx")]
        ) >= 2.0,
        "{m}"
    );
}

/// The gateway with one route on listener `web` to `origin`: (gateway, listener address).
fn one_origin(origin: SocketAddr) -> (Meshgate, SocketAddr) {
    let (admin, web) = (addr(free_port()), addr(free_port()));
    let routes = "[[routes]]\nname = \"all\"\nlistener = \"web\"\ncluster = \"o\"\n";
    let clusters = format!("[[clusters]]\nname = \"o\"\nendpoints = [\"{origin}\"]\n");
    let config = upstream_config(admin, web, routes, &clusters);
    (
        Meshgate::start(bin(), &config, admin).expect("gateway starts"),
        web,
    )
}

fn upstream_config(admin: SocketAddr, web: SocketAddr, routes: &str, clusters: &str) -> String {
    format!(
        r#"version = 1
[admin]
address = "{admin}"
[runtime]
cores = 2
drain_timeout = "1s"

[[listeners]]
name = "web"
address = "{web}"
protocol = "http"
[listeners.http]
request_timeout = "2s"
{routes}
{clusters}"#
    )
}

#[test]
fn query_parameters_route_requests() {
    let (stable, canary) = (HttpUpstream::start("stable"), HttpUpstream::start("canary"));
    let (admin, web) = (addr(free_port()), addr(free_port()));
    let routes = r#"
[[routes]]
name = "v2"
listener = "web"
cluster = "canary"
[[routes.match.query]]
name = "version"
exact = "2"
[[routes.match.query]]
name = "debug"
present = false

[[routes]]
name = "numbered"
listener = "web"
match = { path = { prefix = "/items" }, query = [{ name = "id", regex = "^[0-9]+$" }] }
cluster = "canary"

[[routes]]
name = "rest"
listener = "web"
cluster = "stable"
"#;
    let clusters = format!(
        "[[clusters]]\nname = \"stable\"\nendpoints = [\"{}\"]\n[[clusters]]\nname = \"canary\"\nendpoints = [\"{}\"]\n",
        stable.addr, canary.addr
    );
    let mg = Meshgate::start(
        bin(),
        &upstream_config(admin, web, routes, &clusters),
        admin,
    )
    .expect("gateway starts");
    for (path, want) in [
        ("/a?version=2", "canary"),
        ("/a?x=1&version=%32", "canary"),
        ("/a?version=2&version=3", "canary"),
        ("/a?version=3", "stable"),
        ("/a?version=2&debug", "stable"),
        ("/a?version=2&debug=0", "stable"),
        ("/a?versions=2", "stable"),
        ("/a", "stable"),
        ("/items?id=42", "canary"),
        ("/items?id=4x2", "stable"),
        ("/items/?x&id=%34", "canary"),
        ("/other?id=42", "stable"),
    ] {
        let got = meshgate_testkit::http_get(web, path);
        assert_eq!(
            got.ok(),
            Some((200, want.to_owned())),
            "{path}\n{}",
            mg.log()
        );
    }
}

#[test]
fn chunked_trailers_pass_both_ways() {
    let origin = RawOrigin::start(
        b"x-checksum: abc\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n3\r\n!!!\r\n0\r\nx-sum: 42\r\nx-status: done\r\n\r\n",
    );
    let (mg, web) = one_origin(origin.addr);
    let mut c = TcpStream::connect(web).expect("connect");
    c.write_all(
        b"POST /upload HTTP/1.1\r\nhost: 127.0.0.1\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nx-checksum: abc\r\n\r\n",
    )
    .expect("send");
    let answer = read_until(&mut c, b"x-status: done\r\n\r\n");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(
        answer.ends_with("\r\n\r\n2\r\nok\r\n3\r\n!!!\r\n0\r\nx-sum: 42\r\nx-status: done\r\n\r\n"),
        "response trailers lost: {answer}"
    );
    let got = String::from_utf8_lossy(&origin.received()).into_owned();
    assert!(got.contains("Transfer-Encoding: chunked\r\n"), "{got}");
    assert!(
        got.ends_with("\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nx-checksum: abc\r\n\r\n"),
        "request trailers lost: {got}"
    );
    // The connection stays usable: the next request on it works.
    c.write_all(b"POST /again HTTP/1.1\r\nhost: 127.0.0.1\r\ntransfer-encoding: chunked\r\n\r\n0\r\nx-checksum: abc\r\n\r\n")
        .expect("send");
    read_until(&mut c, b"x-status: done\r\n\r\n");
    // A malformed trailer is refused like a malformed header.
    let before = origin.received().len();
    let (answer, closed) = raw(
        web,
        b"POST /bad HTTP/1.1\r\nhost: 127.0.0.1\r\ntransfer-encoding: chunked\r\n\r\n0\r\nbad trailer\r\n\r\n",
    );
    assert!(
        answer.starts_with("HTTP/1.1 400 "),
        "{answer}\n{}",
        mg.log()
    );
    assert!(closed);
    assert_eq!(
        origin.received().len(),
        before,
        "the origin saw the bad request"
    );
}

#[test]
fn every_smuggling_input_gets_400_and_reaches_no_origin() {
    let origin = RawOrigin::start(
        b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
    );
    let (mg, web) = one_origin(origin.addr);
    const H: &str = "host: 127.0.0.1\r\n";
    let post = |fields: &str, body: &str| format!("POST /s HTTP/1.1\r\n{H}{fields}\r\n{body}");
    let chunked = |body: &str| post("transfer-encoding: chunked\r\n", body);
    let long_ext = format!("5;{}\r\nhello\r\n0\r\n\r\n", "e".repeat(2000));
    let cases: Vec<(&str, String)> = vec![
        (
            "CL then TE",
            post(
                "content-length: 6\r\ntransfer-encoding: chunked\r\n",
                "0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n",
            ),
        ),
        (
            "TE then CL",
            post(
                "transfer-encoding: chunked\r\ncontent-length: 6\r\n",
                "0\r\n\r\nX",
            ),
        ),
        (
            "differing content-lengths",
            post("content-length: 5\r\ncontent-length: 6\r\n", "hello!"),
        ),
        (
            "content-length list",
            post("content-length: 5, 6\r\n", "hello!"),
        ),
        ("content-length +5", post("content-length: +5\r\n", "hello")),
        ("content-length -1", post("content-length: -1\r\n", "")),
        (
            "content-length 0x5",
            post("content-length: 0x5\r\n", "hello"),
        ),
        ("content-length 5a", post("content-length: 5a\r\n", "hello")),
        ("content-length empty", post("content-length: \r\n", "")),
        (
            "content-length 1 2",
            post("content-length: 1 2\r\n", "hello"),
        ),
        (
            "content-length overflow",
            post("content-length: 99999999999999999999999\r\n", "x"),
        ),
        ("chunk size not hex", chunked("zz\r\nhello\r\n0\r\n\r\n")),
        ("chunk size negative", chunked("-5\r\nhello\r\n0\r\n\r\n")),
        (
            "chunk size overflow",
            chunked("1ffffffffffffffff\r\nx\r\n0\r\n\r\n"),
        ),
        (
            "chunk size leading space",
            chunked(" 5\r\nhello\r\n0\r\n\r\n"),
        ),
        ("chunk size 0x", chunked("0x5\r\nhello\r\n0\r\n\r\n")),
        (
            "chunk extension control byte",
            chunked("5;a\x01b\r\nhello\r\n0\r\n\r\n"),
        ),
        ("chunk extension too long", chunked(&long_ext)),
        ("chunk line bare LF", chunked("5\nhello\r\n0\r\n\r\n")),
        ("chunk data without CRLF", chunked("5\r\nhelloX0\r\n\r\n")),
        ("chunk data with bare LF", chunked("5\r\nhello\n0\r\n\r\n")),
        ("last chunk bare LF", chunked("5\r\nhello\r\n0\n\n")),
        (
            "obs-fold",
            format!("GET /s HTTP/1.1\r\n{H}x-a: 1\r\n 2\r\n\r\n"),
        ),
        (
            "obs-fold with tab",
            format!("GET /s HTTP/1.1\r\n{H}x-a: 1\r\n\t2\r\n\r\n"),
        ),
        (
            "whitespace before colon",
            format!("GET /s HTTP/1.1\r\n{H}x-a : 1\r\n\r\n"),
        ),
        (
            "space before colon on transfer-encoding",
            post("transfer-encoding : chunked\r\n", "0\r\n\r\n"),
        ),
        (
            "space in a field name",
            format!("GET /s HTTP/1.1\r\n{H}x a: 1\r\n\r\n"),
        ),
        (
            "separator in a field name",
            format!("GET /s HTTP/1.1\r\n{H}x@a: 1\r\n\r\n"),
        ),
        (
            "NUL in a value",
            format!("GET /s HTTP/1.1\r\n{H}x-a: a\0b\r\n\r\n"),
        ),
        (
            "CR in a value",
            format!("GET /s HTTP/1.1\r\n{H}x-a: a\rb\r\n\r\n"),
        ),
        (
            "bare LF line endings",
            "GET /s HTTP/1.1\nhost: 127.0.0.1\n\n".to_owned(),
        ),
        (
            "transfer-encoding in HTTP/1.0",
            format!("POST /s HTTP/1.0\r\n{H}transfer-encoding: chunked\r\n\r\n0\r\n\r\n"),
        ),
        (
            "chunked not last",
            post("transfer-encoding: chunked, gzip\r\n", "0\r\n\r\n"),
        ),
        (
            "only another coding",
            post("transfer-encoding: gzip\r\n", "hello"),
        ),
        (
            "chunked then identity field",
            post(
                "transfer-encoding: chunked\r\ntransfer-encoding: identity\r\n",
                "0\r\n\r\n",
            ),
        ),
        ("two Host fields", format!("GET /s HTTP/1.1\r\n{H}{H}\r\n")),
        (
            "HTTP/1.1 without Host",
            "GET /s HTTP/1.1\r\n\r\n".to_owned(),
        ),
    ];
    let mut failures = Vec::new();
    for (what, request) in &cases {
        let (answer, closed) = raw(web, request.as_bytes());
        if !answer.starts_with("HTTP/1.1 400 ")
            || !answer.to_ascii_lowercase().contains("connection: close")
            || !closed
        {
            failures.push(format!("{what}: closed={closed} {answer:?}"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    assert_eq!(
        String::from_utf8_lossy(&origin.received()),
        "",
        "the origin received bytes of a refused request"
    );
    // Not a framing error but a coding the gateway does not implement: 501, nothing sent.
    let (answer, _) = raw(
        web,
        post("transfer-encoding: gzip, chunked\r\n", "0\r\n\r\n").as_bytes(),
    );
    assert!(answer.starts_with("HTTP/1.1 501 "), "{answer}");
    assert!(origin.received().is_empty());

    // Identical repeated Content-Length values are one length (RFC 9112 section 6.3 allows
    // either; documented): accepted and sent upstream as a single field.
    let mut c = TcpStream::connect(web).expect("connect");
    c.write_all(post("content-length: 5\r\ncontent-length: 5\r\n", "hello").as_bytes())
        .expect("send");
    let answer = read_until(&mut c, b"ok");
    assert!(answer.starts_with(b"HTTP/1.1 200 "));
    let got = String::from_utf8_lossy(&origin.received()).into_owned();
    assert_eq!(got.matches("Content-Length: 5\r\n").count(), 1, "{got}");
    assert!(
        !got.to_ascii_lowercase()
            .contains("content-length: 5\r\ncontent-length")
    );
    assert!(got.ends_with("\r\n\r\nhello"), "{got}");
    let m = mg.metrics();
    assert!(
        metric_sum(
            &m,
            "meshgate_http_requests_total",
            &[("listener", "web"), ("code_class", "4xx")]
        ) >= cases.len() as f64,
        "{m}"
    );
}

/// `n` header fields in all (Host and Connection included) over HTTP/1.1: the status line.
fn h1_with_fields(web: SocketAddr, n: usize) -> String {
    let extra: String = (2..n).map(|i| format!("x-h{i}: v\r\n")).collect();
    let request = format!("GET /n HTTP/1.1\r\nhost: 127.0.0.1\r\n{extra}connection: close\r\n\r\n");
    let (answer, _) = raw(web, request.as_bytes());
    answer.lines().next().unwrap_or_default().to_owned()
}

/// `n` header fields in all (`:authority` as Host included) over h2c: curl's status.
fn h2_with_fields(web: SocketAddr, n: usize) -> String {
    let mut args = vec![
        "-sS".to_owned(),
        "-o".to_owned(),
        "/dev/null".to_owned(),
        "-w".to_owned(),
        "%{http_code} %{http_version}".to_owned(),
        "--http2-prior-knowledge".to_owned(),
        "-H".to_owned(),
        "User-Agent:".to_owned(),
        "-H".to_owned(),
        "Accept:".to_owned(),
    ];
    for i in 1..n {
        args.extend(["-H".to_owned(), format!("x-h{i}: v")]);
    }
    args.push(format!("http://{web}/n"));
    let out = Command::new("curl").args(&args).output().expect("curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn header_limits_431_on_http1_and_http2() {
    let origin = HttpUpstream::start("origin");
    let (mg, web) = one_origin(origin.addr);
    // HTTP/1.1: 100 fields pass, 101 get 431, and so does a 70 KiB head.
    assert!(
        h1_with_fields(web, 100).starts_with("HTTP/1.1 200 "),
        "{}",
        mg.log()
    );
    assert!(h1_with_fields(web, 101).starts_with("HTTP/1.1 431 "));
    let big = format!(
        "GET / HTTP/1.1\r\nhost: 127.0.0.1\r\nx-big: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    assert!(raw(web, big.as_bytes()).0.starts_with("HTTP/1.1 431 "));
    // HTTP/2 (prior knowledge): the same limits.
    assert_eq!(h2_with_fields(web, 100), "200 2");
    assert_eq!(h2_with_fields(web, 101), "431 2");
    // A 70 KiB header list from a client that ignores the advertised limit (curl refuses to
    // send it): 431 on that stream.
    let py = script("h2clients.py");
    let (ok, out, err) = python(&[s(&py), "big", "127.0.0.1", &web.port().to_string(), "70"]);
    assert!(ok, "{out}\n{err}\n{NEEDS}");
    assert_eq!(out.trim(), "431", "{err}");
    assert_eq!(
        origin.requests.load(Ordering::Acquire),
        2,
        "only the two 100-field requests reach the origin"
    );
}

fn split_config(
    admin: SocketAddr,
    web: SocketAddr,
    a: SocketAddr,
    b: SocketAddr,
    canary: u32,
) -> String {
    let routes = format!(
        "[[routes]]\nname = \"split\"\nlistener = \"web\"\nweighted_clusters = [{{ cluster = \"stable\", weight = {} }}, {{ cluster = \"canary\", weight = {canary} }}]\n",
        100 - canary
    );
    let clusters = format!(
        "[[clusters]]\nname = \"stable\"\nendpoints = [\"{a}\"]\n[[clusters]]\nname = \"canary\"\nendpoints = [\"{b}\"]\n"
    );
    upstream_config(admin, web, &routes, &clusters)
}

/// `n` keep-alive GETs on one connection; the bodies' origin names counted (stable, canary),
/// or the first error.
fn keep_alive_gets(web: SocketAddr, n: usize) -> Result<(usize, usize), String> {
    let mut c = TcpStream::connect(web).map_err(|e| e.to_string())?;
    c.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let mut counts = (0, 0);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    for _ in 0..n {
        c.write_all(b"GET /s HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
            .map_err(|e| e.to_string())?;
        loop {
            if buf.starts_with(b"HTTP/1.1 200 ") {
                if let Some(at) = buf.windows(6).position(|w| w == b"stable") {
                    counts.0 += 1;
                    buf.drain(..at + 6);
                    break;
                }
                if let Some(at) = buf.windows(6).position(|w| w == b"canary") {
                    counts.1 += 1;
                    buf.drain(..at + 6);
                    break;
                }
            } else if buf.len() >= 13 {
                return Err(String::from_utf8_lossy(&buf).into_owned());
            }
            match c.read(&mut chunk) {
                Ok(0) => return Err("closed".into()),
                Ok(k) => buf.extend_from_slice(&chunk[..k]),
                Err(e) => return Err(e.to_string()),
            }
        }
    }
    Ok(counts)
}

#[test]
fn split_98_2_over_10000_requests_and_changed_by_sighup_under_load() {
    let (stable, canary) = (HttpUpstream::start("stable"), HttpUpstream::start("canary"));
    let (admin, web) = (addr(free_port()), addr(free_port()));
    let mg = Meshgate::start(
        bin(),
        &split_config(admin, web, stable.addr, canary.addr, 2),
        admin,
    )
    .expect("gateway starts");
    // 10,000 requests: 8 connections of 1,250 (spread over both shards by the kernel).
    let workers: Vec<_> = (0..8)
        .map(|_| thread::spawn(move || keep_alive_gets(web, 1250)))
        .collect();
    let mut total = (0, 0);
    for w in workers {
        let (s, c) = w.join().expect("worker").expect("requests");
        total = (total.0 + s, total.1 + c);
    }
    assert_eq!(total.0 + total.1, 10_000);
    // Counted at the origins too.
    let at_stable = stable.requests.load(Ordering::Acquire);
    let at_canary = canary.requests.load(Ordering::Acquire);
    assert_eq!((at_stable, at_canary), total);
    let share = at_canary as f64 / 10_000.0 * 100.0;
    eprintln!("canary share over 10,000 requests: {share:.2}%");
    assert!((share - 2.0).abs() <= 0.5, "canary got {share:.2}%");

    // Now reload to 50/50 with SIGHUP while 4 clients keep sending (fresh and keep-alive
    // connections): every request gets its 200, and the new split shows.
    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = (0..4)
        .map(|i| {
            let stop = stop.clone();
            thread::spawn(move || {
                let (mut n, mut errors) = (0usize, Vec::new());
                while !stop.load(Ordering::Acquire) {
                    let per_connection = if i % 2 == 0 { 1 } else { 50 };
                    match keep_alive_gets(web, per_connection) {
                        Ok((s, c)) => n += s + c,
                        Err(e) => errors.push(e),
                    }
                }
                (n, errors)
            })
        })
        .collect();
    let generation = || metric_sum(&mg.metrics(), "meshgate_config_generation", &[]);
    let before = generation();
    wait_until(Duration::from_secs(5), || {
        stable.requests.load(Ordering::Acquire) > at_stable + 500
    });
    std::fs::write(
        &mg.config_path,
        split_config(admin, web, stable.addr, canary.addr, 50),
    )
    .expect("write config");
    mg.signal(libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(10), || generation() > before),
        "{}",
        mg.log()
    );
    let canary_at_reload = canary.requests.load(Ordering::Acquire);
    assert!(
        wait_until(Duration::from_secs(10), || {
            canary.requests.load(Ordering::Acquire) > canary_at_reload + 200
        }),
        "the new split does not show"
    );
    stop.store(true, Ordering::Release);
    let mut sent = 0;
    for t in load {
        let (n, errors) = t.join().expect("load thread");
        assert!(
            errors.is_empty(),
            "{} failed: {:?}",
            errors.len(),
            &errors[..errors.len().min(5)]
        );
        sent += n;
    }
    eprintln!("{sent} requests under the reload, none failed");
    let (s, c) = keep_alive_gets(web, 1000).expect("after the reload");
    assert!((400..=600).contains(&c), "50/50 after the reload: {s}/{c}");
}

#[test]
fn python_h2_and_httpx_clients_work_through_the_gateway() {
    let origin = HttpUpstream::start("origin");
    let Gateway {
        mg,
        web,
        secure,
        root,
        _pki,
    } = Gateway::start(
        "60s",
        &format!(
            "[[routes]]\nname = \"web\"\nlistener = \"web\"\ncluster = \"o\"\n\
             [[routes]]\nname = \"secure\"\nlistener = \"secure\"\ncluster = \"o\"\n\
             [[clusters]]\nname = \"o\"\nendpoints = [\"{}\"]\n",
            origin.addr
        ),
    );
    let py = script("h2clients.py");
    let py = s(&py);
    let expect = |what: &str, (ok, out, err): (bool, String, String), n: usize| {
        assert!(ok, "{what}: {out}\n{err}\n{NEEDS}\n{}", mg.log());
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), n, "{what}: {out}");
        assert!(lines.iter().all(|l| *l == "200 origin"), "{what}: {out}");
    };
    // h2: 20 streams on one h2c connection, a POST with a body among them.
    expect(
        "h2",
        python(&[py, "h2", "127.0.0.1", &web.port().to_string(), "/h2", "20"]),
        20,
    );
    // httpx, HTTP/2 by ALPN over TLS (verified), and by prior knowledge in clear text.
    expect(
        "httpx https",
        python(&[
            py,
            "httpx",
            &format!("https://127.0.0.1:{}/x", secure.port()),
            "10",
            s(&root),
            "gateway.example.test",
        ]),
        10,
    );
    expect(
        "httpx h2c",
        python(&[py, "httpx", &format!("http://{web}/x"), "10"]),
        10,
    );
    assert_eq!(origin.requests.load(Ordering::Acquire), 40);
}

#[test]
fn slowloris_trickling_a_head_is_cut_at_the_header_read_timeout() {
    let origin = HttpUpstream::start("origin");
    let (_mg, web) = one_origin(origin.addr);
    // One byte every 100 ms, forever: the 2 s request_timeout counts from accept, not from
    // the last byte, so the trickle does not keep the connection.
    let mut c = TcpStream::connect(web).expect("connect");
    c.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let head = b"GET /slow HTTP/1.1\r\nhost: 127.0.0.1\r\nx-slow: "
        .iter()
        .chain(std::iter::repeat(&b'a'));
    let started = Instant::now();
    let mut answer = Vec::new();
    let mut chunk = [0u8; 1024];
    let mut sent = 0;
    for &b in head {
        if c.write_all(&[b]).is_err() {
            break;
        }
        sent += 1;
        match c.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break,
        }
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "still open after {sent} bytes"
        );
    }
    let elapsed = started.elapsed();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert!(
        (Duration::from_millis(1800)..Duration::from_secs(5)).contains(&elapsed),
        "{elapsed:?}"
    );
    assert!(sent > 10, "the client was trickling: {sent} bytes");
    assert_eq!(origin.requests.load(Ordering::Acquire), 0);
}
