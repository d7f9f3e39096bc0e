//! `https` listeners through the real binary: TLS terminated with the listener's certificates
//! (or the local CA's identity), client certificates verified per trust domain, HTTP/1.1 over
//! the session with nginx as the origin, driven by curl. Routes match the peer's SPIFFE ID;
//! the origin gets `x-forwarded-proto: https` and the gateway's own `x-forwarded-client-cert`
//! (never the client's); a Host other than the SNI on an mTLS listener gets 421.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use meshgate_testkit::http::{Nginx, curl, field, nginx_or_skip};
use meshgate_testkit::pki::{LeafSpec, TestPki};
use meshgate_testkit::{Meshgate, free_port, metric_sum, wait_until};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_meshgate"))
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

struct Gateway {
    mg: Meshgate,
    mtls: SocketAddr,
    open: SocketAddr,
    plain: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Gateway {
    fn start(pki: &TestPki, ng: &Nginx) -> Gateway {
        let (cert, key) = pki.gateway();
        let bundle = pki.bundle(&pki.example, "example-bundle");
        let admin = addr(free_port());
        let (mtls, open, plain) = (addr(free_port()), addr(free_port()), addr(free_port()));
        let config = format!(
            r#"version = 1
[admin]
address = "{admin}"
[runtime]
cores = 2
drain_timeout = "2s"

[[listeners]]
name = "mtls"
address = "{mtls}"
protocol = "https"
[listeners.tls]
certificates = [{{ cert = "{cert}", key = "{key}" }}]
client_auth = "required"
trust_bundles = [{{ trust_domain = "example.test", bundle = "{bundle}" }}]

# No [listeners.tls]: the gateway's identity from its local CA, no client auth.
[[listeners]]
name = "open"
address = "{open}"
protocol = "https"

[[listeners]]
name = "plain"
address = "{plain}"
protocol = "http"

[[routes]]
name = "healthz"
listener = "mtls"
match = {{ path = {{ exact = "/healthz" }} }}
direct_response = {{ status = 200, body = "ok\n" }}

[[routes]]
name = "admins"
listener = "mtls"
match = {{ path = {{ prefix = "/admin/" }}, peer = {{ spiffe_ids = ["spiffe://example.test/admin"] }} }}
cluster = "canary"

[[routes]]
name = "by-sni"
listener = "mtls"
match = {{ sni = ["gateway.example.test"] }}
cluster = "stable"

[[routes]]
name = "open-all"
listener = "open"
cluster = "stable"

[[routes]]
name = "plain-all"
listener = "plain"
cluster = "stable"

[[clusters]]
name = "stable"
endpoints = ["{stable}"]

[[clusters]]
name = "canary"
endpoints = ["{canary}"]
"#,
            cert = s(&cert),
            key = s(&key),
            bundle = s(&bundle),
            stable = ng.stable,
            canary = ng.canary,
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("access.log");
        let mg = Meshgate::start_with_args(bin(), &config, admin, &["--access-log", s(&log)])
            .expect("gateway starts");
        Gateway {
            mg,
            mtls,
            open,
            plain,
            log,
            _dir: dir,
        }
    }

    fn records(&self) -> Vec<serde_json::Value> {
        meshgate_testkit::access_log_records(&self.log)
    }

    fn record(&self, path: &str) -> serde_json::Value {
        let mut found = None;
        wait_until(Duration::from_secs(5), || {
            found = self.records().into_iter().find(|r| r["path"] == path);
            found.is_some()
        });
        found.unwrap_or_else(|| panic!("no access-log record for {path}: {:?}", self.records()))
    }
}

/// curl arguments that reach the mTLS listener as `gateway.example.test`, trusting the
/// example.test root, with the client certificate `(cert, key)`.
fn mtls_args(gw: &Gateway, root: &Path, client: Option<&(PathBuf, PathBuf)>) -> Vec<String> {
    let mut args = vec![
        "--resolve".to_owned(),
        format!("gateway.example.test:{}:127.0.0.1", gw.mtls.port()),
        "--cacert".to_owned(),
        s(root).to_owned(),
    ];
    if let Some((cert, key)) = client {
        args.extend(["--cert".to_owned(), s(cert).to_owned()]);
        args.extend(["--key".to_owned(), s(key).to_owned()]);
    }
    args
}

fn url(gw: &Gateway, path: &str) -> String {
    format!("https://gateway.example.test:{}{path}", gw.mtls.port())
}

fn run(args: &[String], extra: &[&str]) -> meshgate_testkit::http::Resp {
    let all: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .chain(extra.iter().copied())
        .collect();
    curl(&all)
}

#[test]
fn https_mtls_routes_by_peer_and_forwards_the_client_identity() {
    let Some(nginx) = nginx_or_skip("https_mtls_routes_by_peer_and_forwards_the_client_identity")
    else {
        return;
    };
    let ng = Nginx::start(&nginx);
    let pki = TestPki::new();
    let gw = Gateway::start(&pki, &ng);
    let root = pki.bundle(&pki.example, "root");
    let client = pki.svid(&pki.example, "client", "/client");
    let admin = pki.svid(&pki.example, "admin", "/admin");
    let base = mtls_args(&gw, &root, Some(&client));

    // HTTP/1.1 over TLS, the gateway's own fields; the client's XFCC never reaches the origin.
    let r = run(
        &base,
        &[
            "--http1.1",
            "-H",
            "x-forwarded-client-cert: By=spiffe://evil/x;URI=spiffe://evil/y",
            &url(&gw, "/hello?x=1"),
        ],
    );
    assert_eq!(r.status, 200, "{r:?}\n{}", gw.mg.log());
    assert_eq!(field(&r.body, "origin"), "stable", "{}", r.body);
    assert_eq!(field(&r.body, "xfp"), "https", "{}", r.body);
    assert_eq!(field(&r.body, "uri"), "/hello?x=1");
    let xfcc = field(&r.body, "xfcc");
    assert!(!xfcc.contains("evil"), "client XFCC forwarded: {xfcc}");
    let parts: Vec<&str> = xfcc.split(';').collect();
    assert_eq!(parts.len(), 3, "{xfcc}");
    assert_eq!(parts[0], "By=spiffe://example.test/gateway");
    let hash = parts[1].strip_prefix("Hash=").expect("Hash=");
    assert_eq!(hash.len(), 64, "{xfcc}");
    assert!(hash.bytes().all(|b| b.is_ascii_hexdigit()), "{xfcc}");
    assert_eq!(parts[2], "URI=spiffe://example.test/client");

    // The hash is the SHA-256 of the client's certificate (DER), as openssl computes it.
    let der = Command::new("openssl")
        .args(["x509", "-in", s(&client.0), "-outform", "DER"])
        .output()
        .expect("openssl");
    let digest = Command::new("openssl")
        .args(["dgst", "-sha256", "-r"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write as _;
            c.stdin.take().expect("stdin").write_all(&der.stdout)?;
            c.wait_with_output()
        })
        .expect("openssl dgst");
    let want = String::from_utf8_lossy(&digest.stdout);
    assert_eq!(want.split_whitespace().next(), Some(hash));

    // HTTP/2 by ALPN over the same listener: the same routing, identity and headers.
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "--http2",
            "-w",
            "\n%{http_version}",
        ])
        .args(&base)
        .args([
            "-H",
            "x-forwarded-client-cert: URI=spiffe://evil/y",
            &url(&gw, "/h2?x=2"),
        ])
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, version) = text.rsplit_once('\n').expect("version line");
    assert_eq!(version, "2", "{text}");
    assert_eq!(field(body, "xfp"), "https", "{body}");
    assert_eq!(field(body, "xfcc"), xfcc, "{body}");
    let admin_h2 = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--http2"])
        .args(mtls_args(&gw, &root, Some(&admin)))
        .arg(url(&gw, "/admin/h2"))
        .output()
        .expect("curl");
    assert_eq!(
        field(&String::from_utf8_lossy(&admin_h2.stdout), "origin"),
        "canary"
    );
    let r = run(
        &base,
        &[
            "--http2",
            "-H",
            "host: other.example.test",
            &url(&gw, "/misdirected-h2"),
        ],
    );
    assert_eq!(r.status, 421, "{r:?}");

    // Direct response on the TLS listener.
    let r = run(&base, &[&url(&gw, "/healthz")]);
    assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));

    // Routing by peer identity: only the admin SVID reaches the canary route.
    let r = run(&base, &[&url(&gw, "/admin/x")]);
    assert_eq!(field(&r.body, "origin"), "stable", "{}", r.body);
    let admin_args = mtls_args(&gw, &root, Some(&admin));
    let r = run(&admin_args, &[&url(&gw, "/admin/x")]);
    assert_eq!(field(&r.body, "origin"), "canary", "{}", r.body);

    // Host other than the SNI on an mTLS listener: 421.
    let r = run(
        &base,
        &["-H", "host: other.example.test", &url(&gw, "/misdirected")],
    );
    assert_eq!(r.status, 421, "{r:?}");

    // Keep-alive over one TLS session: three requests, one handshake.
    let handshakes = |gw: &Gateway| {
        ["full", "resumed"]
            .iter()
            .map(|r| {
                metric_sum(
                    &gw.mg.metrics(),
                    "meshgate_tls_handshakes_total",
                    &[("listener", "mtls"), ("result", r)],
                )
            })
            .sum::<f64>()
    };
    let before = handshakes(&gw);
    let r = run(
        &base,
        &[&url(&gw, "/k1"), &url(&gw, "/k2"), &url(&gw, "/k3")],
    );
    assert_eq!(r.status, 200);
    let after = handshakes(&gw);
    assert_eq!(after - before, 1.0, "one handshake for three requests");

    // Refusals: no client certificate, or one from another trust domain.
    let (code, _) = curl_code(&mtls_args(&gw, &root, None), &url(&gw, "/nocert"));
    assert_ne!(code, 0);
    let wrong = pki.svid(&pki.other, "wrong", "/client");
    let (code, _) = curl_code(&mtls_args(&gw, &root, Some(&wrong)), &url(&gw, "/wrong"));
    assert_ne!(code, 0);

    // Access log: TLS facts of the connection.
    let rec = gw.record("/hello?x=1");
    assert_eq!(rec["tls_version"], "TLSv1.3", "{rec}");
    assert_eq!(
        rec["downstream_peer_spiffe_id"],
        "spiffe://example.test/client"
    );
    assert_eq!(rec["requested_server_name"], "gateway.example.test");
    assert_eq!(rec["response_code"], 200);
    let rec = gw.record("/misdirected");
    assert_eq!(rec["response_code"], 421, "{rec}");
    let rec = gw.record("/h2?x=2");
    assert_eq!(rec["protocol"], "HTTP/2", "{rec}");
    assert_eq!(
        rec["downstream_peer_spiffe_id"],
        "spiffe://example.test/client"
    );
}

fn curl_code(args: &[String], url: &str) -> (i32, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .arg(url)
        .output()
        .expect("curl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn https_bodies_stream_both_ways_and_local_identity_serves() {
    let Some(nginx) = nginx_or_skip("https_bodies_stream_both_ways_and_local_identity_serves")
    else {
        return;
    };
    let ng = Nginx::start(&nginx);
    let pki = TestPki::new();
    let gw = Gateway::start(&pki, &ng);
    let root = pki.bundle(&pki.example, "root");
    let client = pki.svid(&pki.example, "client", "/client");
    let base = mtls_args(&gw, &root, Some(&client));
    let tmp = tempfile::tempdir().expect("tempdir");

    // 8 MiB down (content-length and chunked), 8 MiB up, through TLS.
    for (path, proto) in [
        ("/files/big.bin", "--http1.1"),
        ("/chunked/big.bin", "--http1.1"),
        ("/files/big.bin", "--http2"),
        ("/chunked/big.bin", "--http2"),
    ] {
        let out = tmp.path().join("down.bin");
        let (code, err) = curl_code(
            &[
                base.clone(),
                vec![proto.to_owned(), "-o".to_owned(), s(&out).to_owned()],
            ]
            .concat(),
            &url(&gw, path),
        );
        assert_eq!(code, 0, "{err}");
        let data = std::fs::read(&out).expect("download");
        let mut sum = meshgate_testkit::Fnv::default();
        sum.update(&data);
        assert_eq!(
            (data.len(), sum.0),
            (meshgate_testkit::http::BIG, ng.big_sum),
            "{path}"
        );
    }
    let up = ng.dir.path().join("files/big.bin");
    for proto in ["--http1.1", "--http2"] {
        let name = format!("/put/up{proto}.bin");
        let r = run(&base, &[proto, "-T", s(&up), &url(&gw, &name)]);
        assert!(matches!(r.status, 201 | 204), "{proto}: {r:?}");
        let stored = std::fs::read(ng.dir.path().join(&name[1..])).expect("uploaded");
        let mut sum = meshgate_testkit::Fnv::default();
        sum.update(&stored);
        assert_eq!(sum.0, ng.big_sum, "{proto}");
    }

    // The listener without certificates serves the local CA's identity (verified against the
    // root in the state directory is the operator's step; here: the TLS and HTTP work).
    let r = curl(&["-k", &format!("https://{}/local", gw.open)]);
    assert_eq!(r.status, 200, "{r:?}\n{}", gw.mg.log());
    assert_eq!(field(&r.body, "xfp"), "https");
    assert_eq!(field(&r.body, "xfcc"), "", "no client certificate, no XFCC");

    // Plain http: a client's XFCC is removed too.
    let r = curl(&[
        "-H",
        "x-forwarded-client-cert: URI=spiffe://evil/y",
        &format!("http://{}/plain", gw.plain),
    ]);
    assert_eq!(r.status, 200);
    assert_eq!(field(&r.body, "xfcc"), "", "{}", r.body);
    assert_eq!(field(&r.body, "xfp"), "http");
}

/// nginx serving HTTPS at a fresh port with `cert`/`key`, requiring a client certificate
/// from `client_ca`, answering with what it verified.
struct TlsOrigin {
    child: std::process::Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl TlsOrigin {
    fn start(nginx: &Path, cert: &Path, key: &Path, client_ca: &Path) -> TlsOrigin {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        std::fs::create_dir_all(d.join("tmp")).expect("mkdir");
        let addr = addr(free_port());
        let conf = format!(
            r#"daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {d}/tmp/body;
  proxy_temp_path {d}/tmp/proxy;
  fastcgi_temp_path {d}/tmp/fastcgi;
  uwsgi_temp_path {d}/tmp/uwsgi;
  scgi_temp_path {d}/tmp/scgi;
  server {{
    listen {addr} ssl;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_client_certificate {ca};
    ssl_verify_client on;
    location / {{
      return 200 "tls-origin verify=$ssl_client_verify sni=$ssl_server_name conn=$connection uri=$request_uri\n";
    }}
  }}
}}
"#,
            d = d.display(),
            cert = cert.display(),
            key = key.display(),
            ca = client_ca.display(),
        );
        std::fs::write(d.join("nginx.conf"), conf).expect("write conf");
        let child = Command::new(nginx)
            .arg("-p")
            .arg(d)
            .arg("-c")
            .arg(d.join("nginx.conf"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn nginx");
        let mut o = TlsOrigin {
            child,
            addr,
            _dir: dir,
        };
        if !wait_until(Duration::from_secs(10), || {
            std::net::TcpStream::connect(o.addr).is_ok()
        }) {
            let _ = o.child.kill();
            panic!("TLS nginx did not start");
        }
        o
    }
}

impl Drop for TlsOrigin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn http_routes_to_tls_clusters_originate_mtls_and_pool_per_identity() {
    let Some(nginx) =
        nginx_or_skip("http_routes_to_tls_clusters_originate_mtls_and_pool_per_identity")
    else {
        return;
    };
    let pki = TestPki::new();
    let mut spec = LeafSpec::svid("spiffe://example.test/origin");
    spec.dns = vec!["origin.example.test".to_owned()];
    let (ocert, okey) = pki
        .example
        .leaf(&spec)
        .expect("origin cert")
        .write_pem(pki.dir.path(), "origin")
        .expect("write");
    let ca = pki.bundle(&pki.example, "ca");
    let origin = TlsOrigin::start(&nginx, &ocert, &okey, &ca);
    let (gcert, gkey) = pki.svid(&pki.example, "gateway-id", "/gateway");
    let admin = addr(free_port());
    let web = addr(free_port());
    let config = format!(
        r#"version = 1
[admin]
address = "{admin}"
[runtime]
cores = 1
[[listeners]]
name = "web"
address = "{web}"
protocol = "http"
[[routes]]
name = "by-spiffe"
listener = "web"
match = {{ path = {{ prefix = "/spiffe/" }} }}
cluster = "by-spiffe"
[[routes]]
name = "by-dns"
listener = "web"
match = {{ path = {{ prefix = "/dns/" }} }}
cluster = "by-dns"
[[routes]]
name = "wrong-id"
listener = "web"
match = {{ path = {{ prefix = "/wrong/" }} }}
cluster = "wrong-id"
[[routes]]
name = "no-identity"
listener = "web"
match = {{ path = {{ prefix = "/anon/" }} }}
cluster = "no-identity"
[[clusters]]
name = "by-spiffe"
endpoints = ["{o}"]
[clusters.tls]
sni = "origin.example.test"
alpn = ["http/1.1"]
verify = {{ spiffe_ids = ["spiffe://example.test/origin"] }}
trust_bundle = "{ca}"
identity = {{ cert = "{gcert}", key = "{gkey}" }}
[[clusters]]
name = "by-dns"
endpoints = ["{o}"]
[clusters.tls]
verify = {{ dns_names = ["origin.example.test"] }}
trust_bundle = "{ca}"
identity = {{ cert = "{gcert}", key = "{gkey}" }}
[[clusters]]
name = "wrong-id"
endpoints = ["{o}"]
[clusters.tls]
verify = {{ spiffe_ids = ["spiffe://example.test/someone-else"] }}
trust_bundle = "{ca}"
identity = {{ cert = "{gcert}", key = "{gkey}" }}
[[clusters]]
name = "no-identity"
endpoints = ["{o}"]
[clusters.tls]
verify = {{ spiffe_ids = ["spiffe://example.test/origin"] }}
trust_bundle = "{ca}"
"#,
        o = origin.addr,
        ca = s(&ca),
        gcert = s(&gcert),
        gkey = s(&gkey),
    );
    let mg = Meshgate::start(bin(), &config, admin).expect("gateway starts");
    let get = |path: &str| curl(&["--http1.1", &format!("http://{web}{path}")]);

    // Verified by SPIFFE ID, with the gateway's identity; SNI as configured.
    for i in 0..3 {
        let r = get(&format!("/spiffe/{i}"));
        assert_eq!(r.status, 200, "{r:?}\n{}", mg.log());
        assert!(r.body.contains("verify=SUCCESS"), "{}", r.body);
        assert!(r.body.contains("sni=origin.example.test"), "{}", r.body);
    }
    // Verified by DNS name (SNI from it).
    let r = get("/dns/x");
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.contains("verify=SUCCESS"), "{}", r.body);
    // Upstream with another identity than expected: 502 UF, nothing sent in clear.
    let r = get("/wrong/x");
    assert_eq!(r.status, 502, "{r:?}");
    // Without the gateway's certificate the origin refuses the handshake (nginx answers 400
    // "No required SSL certificate"): the request never reaches its location.
    let r = get("/anon/x");
    assert!(!r.body.contains("tls-origin"), "{r:?}");

    // Keep-alive reuse within one identity: three requests on the by-spiffe cluster reuse
    // pooled connections (connection numbers repeat), and a cluster with another identity
    // to the same endpoint never gets them.
    let conns: Vec<String> = (0..3)
        .map(|i| {
            let r = get(&format!("/spiffe/again{i}"));
            field_after(&r.body, "conn=")
        })
        .collect();
    assert!(
        conns.windows(2).any(|w| w[0] == w[1]),
        "pooled connection not reused: {conns:?}"
    );
    let dns_conn = field_after(&get("/dns/again").body, "conn=");
    assert!(
        !conns.contains(&dns_conn),
        "connection shared across identities"
    );
}

fn field_after(body: &str, key: &str) -> String {
    body.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .unwrap_or_default()
        .to_owned()
}
