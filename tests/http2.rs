//! HTTP/2 downstream through the real binary: h2c with prior knowledge on an `http` listener
//! (curl, h2load), nginx as the HTTP/1.1 origin, bodies both ways, the header-list limit, and
//! rapid-reset protection (a raw client opening and resetting 10,000 streams is cut off with
//! GOAWAY while curl on another connection keeps being answered).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use meshgate_testkit::http::{BIG, Nginx, curl, curl_version, field, nginx_or_skip, tool};
use meshgate_testkit::{Fnv, Meshgate, free_port};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_meshgate"))
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

struct Gateway {
    mg: Meshgate,
    web: SocketAddr,
}

impl Gateway {
    fn start(ng: &Nginx) -> Gateway {
        let admin = addr(free_port());
        let web = addr(free_port());
        let config = format!(
            r#"version = 1
[admin]
address = "{admin}"
[runtime]
cores = 2
drain_timeout = "2s"

[[listeners]]
name = "web"
address = "{web}"
protocol = "http"

[[routes]]
name = "healthz"
listener = "web"
match = {{ path = {{ exact = "/healthz" }} }}
direct_response = {{ status = 200, body = "ok\n" }}
response_headers = {{ set = {{ x-health = "yes" }} }}

[[routes]]
name = "canary"
listener = "web"
match = {{ headers = [{{ name = "x-canary", exact = "1" }}] }}
cluster = "canary"
response_headers = {{ remove = ["x-secret"] }}

[[routes]]
name = "rest"
listener = "web"
cluster = "stable"

[[clusters]]
name = "stable"
endpoints = ["{stable}"]

[[clusters]]
name = "canary"
endpoints = ["{canary}"]
"#,
            stable = ng.stable,
            canary = ng.canary,
        );
        let mg = Meshgate::start(bin(), &config, admin).expect("gateway starts");
        Gateway { mg, web }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.web)
    }
}

#[test]
fn h2c_prior_knowledge_through_the_http_path() {
    let Some(nginx) = nginx_or_skip("h2c_prior_knowledge_through_the_http_path") else {
        return;
    };
    let ng = Nginx::start(&nginx);
    let gw = Gateway::start(&ng);
    let h2 = "--http2-prior-knowledge";

    // The same routes, headers and edits as HTTP/1.
    let (code, version, body) = curl_version(&[h2, &gw.url("/hello?a=1")]);
    assert_eq!(
        (code, version.as_str()),
        (0, "2"),
        "{body}\n{}",
        gw.mg.log()
    );
    assert_eq!(field(&body, "origin"), "stable", "{body}");
    assert_eq!(field(&body, "uri"), "/hello?a=1");
    assert_eq!(field(&body, "host"), gw.web.to_string());
    assert_eq!(field(&body, "xfp"), "http");
    assert!(!field(&body, "rid").is_empty(), "{body}");
    // `Upgrade: h2c` (curl --http2 on http://) is not honoured, nor forwarded: HTTP/1.1.
    let (code, version, body) = curl_version(&["--http2", &gw.url("/upgrade")]);
    assert_eq!((code, version.as_str()), (0, "1.1"), "{body}");
    assert_eq!(field(&body, "uri"), "/upgrade");
    let r = curl(&[h2, "-H", "x-canary: 1", &gw.url("/c")]);
    assert_eq!(field(&r.body, "origin"), "canary", "{r:?}");
    assert!(!r.headers.contains_key("x-secret"), "{r:?}");
    assert!(!r.headers.contains_key("connection"), "{r:?}");
    let r = curl(&[h2, &gw.url("/healthz")]);
    assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
    assert_eq!(r.headers.get("x-health").map(String::as_str), Some("yes"));

    // Bodies: 8 MiB down (length and chunked from the origin) and 8 MiB up (no length: sent
    // upstream chunked).
    let tmp = tempfile::tempdir().expect("tempdir");
    for path in ["/files/big.bin", "/chunked/big.bin"] {
        let out = tmp.path().join("down.bin");
        let (code, version, _) =
            curl_version(&[h2, "-o", out.to_str().expect("utf8"), &gw.url(path)]);
        assert_eq!((code, version.as_str()), (0, "2"), "{path}");
        let data = std::fs::read(&out).expect("download");
        let mut sum = Fnv::default();
        sum.update(&data);
        assert_eq!((data.len(), sum.0), (BIG, ng.big_sum), "{path}");
    }
    let src = ng.dir.path().join("files/big.bin");
    let r = curl(&[
        h2,
        "-T",
        src.to_str().expect("utf8"),
        &gw.url("/put/up.bin"),
    ]);
    assert!(matches!(r.status, 201 | 204), "{r:?}");
    let mut sum = Fnv::default();
    sum.update(&std::fs::read(ng.dir.path().join("put/up.bin")).expect("uploaded"));
    assert_eq!(sum.0, ng.big_sum);
    // Streamed from stdin: no content-length, so chunked upstream.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "head -c 300000 /dev/zero | curl -sS {h2} -o /dev/null -w '%{{http_code}}' -T - {}",
            gw.url("/put/stdin.bin")
        ))
        .output()
        .expect("sh");
    let code = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(code == "201" || code == "204", "{code}");
    assert_eq!(
        std::fs::metadata(ng.dir.path().join("put/stdin.bin"))
            .expect("stdin upload")
            .len(),
        300_000
    );

    // A 70 KiB header list: 431 on that stream.
    let big = format!("x-big: {}", "a".repeat(70 * 1024));
    let (code, _, _) = curl_version(&[h2, "-o", "/dev/null", "-H", &big, &gw.url("/big")]);
    let out = Command::new("curl")
        .args([
            "-sS",
            h2,
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            &big,
            &gw.url("/big"),
        ])
        .output()
        .expect("curl");
    let status = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        status == "431" || code != 0,
        "70 KiB header list got {status}"
    );

    // h2load: many streams on few connections.
    if let Some(h2load) = tool("h2load") {
        let out = Command::new(h2load)
            .args(["-n", "4000", "-c", "4", "-m", "20", &gw.url("/load")])
            .output()
            .expect("h2load");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("4000 succeeded, 0 failed, 0 errored"),
            "h2load: {text}"
        );
        assert!(text.contains("h2"), "{text}");
    } else {
        eprintln!("h2load not installed (apt-get install nghttp2-client); skipping that part");
    }
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Frames in `buf`: (type, flags, stream, payload).
fn frames(buf: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
    let mut out = Vec::new();
    let mut at = 0;
    while buf.len() >= at + 9 {
        let len = u32::from_be_bytes([0, buf[at], buf[at + 1], buf[at + 2]]) as usize;
        if buf.len() < at + 9 + len {
            break;
        }
        let stream =
            u32::from_be_bytes([buf[at + 5], buf[at + 6], buf[at + 7], buf[at + 8]]) & 0x7fff_ffff;
        out.push((
            buf[at + 3],
            buf[at + 4],
            stream,
            buf[at + 9..at + 9 + len].to_vec(),
        ));
        at += 9 + len;
    }
    out
}

#[test]
fn rapid_reset_is_cut_off_and_others_keep_working() {
    let Some(nginx) = nginx_or_skip("rapid_reset_is_cut_off_and_others_keep_working") else {
        return;
    };
    let ng = Nginx::start(&nginx);
    let gw = Gateway::start(&ng);

    // A well-behaved client on its own connections the whole time.
    let stop = Arc::new(AtomicBool::new(false));
    let good = {
        let stop = stop.clone();
        let url = gw.url("/good");
        std::thread::spawn(move || {
            let mut worst = Duration::ZERO;
            let mut done = 0;
            while !stop.load(Ordering::Acquire) || done < 5 {
                let t = Instant::now();
                let (code, version, body) = curl_version(&["--http2-prior-knowledge", &url]);
                assert_eq!((code, version.as_str()), (0, "2"), "{body}");
                assert!(body.starts_with("origin=stable"), "{body}");
                worst = worst.max(t.elapsed());
                done += 1;
            }
            (done, worst)
        })
    };

    let mut s = TcpStream::connect(gw.web).expect("connect");
    s.set_nodelay(true).expect("nodelay");
    let mut reader = s.try_clone().expect("clone");
    let got = std::thread::spawn(move || {
        reader
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let mut all = Vec::new();
        let mut chunk = [0u8; 65536];
        loop {
            match reader.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => all.extend_from_slice(&chunk[..n]),
            }
        }
        all
    });
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend(frame(0x4, 0, 0, &[]));
    s.write_all(&hello).expect("preface");
    // :method GET, :scheme http, :path /, :authority localhost (literal, not indexed).
    let mut block = vec![0x82, 0x86, 0x84, 0x01, 9];
    block.extend_from_slice(b"localhost");
    let mut sent = 0u32;
    'attack: for batch in 0..100u32 {
        let mut buf = Vec::new();
        for i in 0..100u32 {
            let id = 2 * (batch * 100 + i) + 1;
            buf.extend(frame(0x1, 0x5, id, &block));
            buf.extend(frame(0x3, 0, id, &8u32.to_be_bytes())); // RST_STREAM CANCEL
        }
        if s.write_all(&buf).is_err() {
            break 'attack;
        }
        sent += 100;
    }
    let _ = s.shutdown(std::net::Shutdown::Write);
    let answer = got.join().expect("reader");
    let goaway = frames(&answer)
        .into_iter()
        .find(|(kind, _, _, _)| *kind == 0x7)
        .unwrap_or_else(|| panic!("no GOAWAY after {sent} reset streams\n{}", gw.mg.log()));
    let code = u32::from_be_bytes([goaway.3[4], goaway.3[5], goaway.3[6], goaway.3[7]]);
    let last =
        u32::from_be_bytes([goaway.3[0], goaway.3[1], goaway.3[2], goaway.3[3]]) & 0x7fff_ffff;
    assert!(
        code == 0xb || code == 0x1,
        "GOAWAY code {code:#x} (want ENHANCE_YOUR_CALM)"
    );
    assert!(
        last < 2 * 10_000,
        "cut off before all 10,000 streams: last id {last}"
    );

    stop.store(true, Ordering::Release);
    let (done, worst) = good.join().expect("good client");
    assert!(done >= 5);
    assert!(
        worst < Duration::from_secs(2),
        "good client's worst latency {worst:?}"
    );
    eprintln!(
        "rapid reset: GOAWAY code {code:#x} last stream {last} after {sent} streams written; \
         good client: {done} requests, worst {worst:?}"
    );
}
