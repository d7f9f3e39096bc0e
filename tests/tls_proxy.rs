//! TLS through the whole gateway: the real binary, real handshakes with curl and openssl,
//! certificates from testkit's PKI (two trust domains).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use meshgate_testkit::pki::TestPki;
use meshgate_testkit::{EchoServer, Meshgate, free_port, http_origin, metric_sum, wait_until};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_meshgate"))
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn curl(args: &[&str]) -> (i32, String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .expect("curl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn mtls_config(pki: &TestPki, admin: SocketAddr, listen: SocketAddr, origin: SocketAddr) -> String {
    let (cert, key) = pki.server("server", &["gateway.example.test"]);
    let bundle = pki.bundle(&pki.example, "example-bundle");
    format!(
        r#"version = 1
[admin]
address = "{admin}"
[runtime]
cores = 2
[[listeners]]
name = "mtls"
address = "{listen}"
protocol = "tls"
[listeners.tls]
certificates = [{{ cert = "{}", key = "{}" }}]
client_auth = "required"
trust_bundles = [{{ trust_domain = "example.test", bundle = "{}" }}]
[[routes]]
name = "clients"
listener = "mtls"
cluster = "origin"
match = {{ peer = {{ trust_domains = ["example.test"] }} }}
[[clusters]]
name = "origin"
endpoints = ["{origin}"]
"#,
        cert.display(),
        key.display(),
        bundle.display()
    )
}

#[test]
fn curl_mtls_through_a_tls_listener_and_refusals_are_counted() {
    let pki = TestPki::new();
    let origin = http_origin("hello from origin");
    let admin = addr(free_port());
    let listen = addr(free_port());
    let mg =
        Meshgate::start(bin(), &mtls_config(&pki, admin, listen, origin), admin).expect("start");
    let root = pki.bundle(&pki.example, "root");
    let (ccert, ckey) = pki.svid(&pki.example, "client", "/client");
    let resolve = format!("gateway.example.test:{}:127.0.0.1", listen.port());
    let url = format!("https://gateway.example.test:{}/", listen.port());
    let base = [
        "--resolve",
        &resolve,
        "--cacert",
        root.to_str().expect("utf8"),
    ];

    let (code, out, err) = curl(
        &[
            &base[..],
            &[
                "--cert",
                ccert.to_str().expect("utf8"),
                "--key",
                ckey.to_str().expect("utf8"),
                &url,
            ],
        ]
        .concat(),
    );
    assert_eq!(code, 0, "{err}\n{}", mg.log());
    assert_eq!(out, "hello from origin");

    // No client certificate: refused.
    let (code, _, _) = curl(&[&base[..], &[&url]].concat());
    assert_ne!(code, 0);
    // A valid SVID of another trust domain: refused.
    let (wcert, wkey) = pki.svid(&pki.other, "wrong", "/client");
    let (code, _, _) = curl(
        &[
            &base[..],
            &[
                "--cert",
                wcert.to_str().expect("utf8"),
                "--key",
                wkey.to_str().expect("utf8"),
                &url,
            ],
        ]
        .concat(),
    );
    assert_ne!(code, 0);

    assert!(
        wait_until(Duration::from_secs(5), || {
            let m = mg.metrics();
            metric_sum(
                &m,
                "meshgate_tls_handshakes_total",
                &[("listener", "mtls"), ("result", "full")],
            ) >= 1.0
                && metric_sum(
                    &m,
                    "meshgate_tls_handshakes_total",
                    &[("listener", "mtls"), ("result", "failed")],
                ) >= 2.0
                && metric_sum(
                    &m,
                    "meshgate_tls_peer_verifications_total",
                    &[("name", "mtls"), ("result", "accepted")],
                ) >= 1.0
        }),
        "{}",
        mg.metrics()
    );
    let m = mg.metrics();
    let rejected: f64 = m
        .lines()
        .filter(|l| {
            l.starts_with("meshgate_tls_peer_verifications_total")
                && l.contains("name=\"mtls\"")
                && !l.contains("accepted")
        })
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum();
    assert!(rejected >= 2.0, "both refusals counted by reason:\n{m}");
    // Handshakes by version, peer trust domain and reason: the good client is counted under
    // its (configured) trust domain; the two refusals under their reasons.
    assert!(
        metric_sum(
            &m,
            "meshgate_tls_handshakes_total",
            &[
                ("listener", "mtls"),
                ("result", "full"),
                ("version", "TLSv1.3"),
                ("peer_trust_domain", "example.test"),
                ("reason", "none"),
            ],
        ) >= 1.0,
        "{m}"
    );
    for reason in ["no_certificate", "unknown_issuer"] {
        assert_eq!(
            metric_sum(
                &m,
                "meshgate_tls_handshakes_total",
                &[
                    ("listener", "mtls"),
                    ("result", "failed"),
                    ("reason", reason)
                ],
            ),
            1.0,
            "{reason}:\n{m}"
        );
    }
    // `meshgate status` shows the handshakes by result and version.
    let out = Command::new(bin())
        .args(["status", "--admin", &admin.to_string()])
        .output()
        .expect("status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("tls listener") && text.contains("TLS 1.3"),
        "{text}"
    );
    let out = Command::new(bin())
        .args(["status", "--admin", &admin.to_string(), "-o", "json"])
        .output()
        .expect("status");
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let tls = &st["listeners"][0]["tls"];
    assert!(tls["full"].as_u64() >= Some(1), "{st}");
    assert!(tls["failed"].as_u64() >= Some(2), "{st}");
    assert!(tls["tls13"].as_u64() >= Some(1), "{st}");
    // The served certificate and the bundle root are listed, each with its expiry exported as
    // a gauge.
    let (code, body) = mg.get("/certs").expect("certs");
    assert_eq!(code, 200);
    let certs: serde_json::Value = serde_json::from_str(&body).expect("json");
    let list = certs.as_array().expect("array");
    assert_eq!(list.len(), 2, "{body}");
    let served = &list[0];
    assert_eq!(served["kind"], "cert");
    assert_eq!(served["listener"], "mtls");
    assert!(
        served["dns_names"]
            .to_string()
            .contains("gateway.example.test"),
        "{body}"
    );
    let root_entry = &list[1];
    assert_eq!(root_entry["kind"], "bundle_root", "{body}");
    assert_eq!(root_entry["trust_domain"], "example.test", "{body}");
    assert!(
        root_entry["subject"]
            .as_str()
            .is_some_and(|s| !s.is_empty())
            && root_entry["serial"].as_str().is_some_and(|s| !s.is_empty()),
        "{body}"
    );
    for (entry, kind) in [(served, "cert"), (root_entry, "bundle_root")] {
        let not_after = entry["not_after"].as_i64().expect("not_after");
        assert_eq!(
            metric_sum(
                &m,
                "meshgate_cert_expiry_timestamp_seconds",
                &[
                    ("listener", "mtls"),
                    ("kind", kind),
                    ("serial", entry["serial"].as_str().expect("serial")),
                ]
            ),
            not_after as f64,
            "{kind}:\n{m}"
        );
    }
}

#[test]
fn openssl_s_client_round_trip_through_mtls() {
    let pki = TestPki::new();
    let echo = EchoServer::start();
    let admin = addr(free_port());
    let listen = addr(free_port());
    let mg =
        Meshgate::start(bin(), &mtls_config(&pki, admin, listen, echo.addr), admin).expect("start");
    let root = pki.bundle(&pki.example, "root");
    let (ccert, ckey) = pki.svid(&pki.example, "client", "/client");
    for version in ["-tls1_2", "-tls1_3"] {
        let mut child = Command::new("openssl")
            .args([
                "s_client",
                "-quiet",
                "-connect",
                &listen.to_string(),
                "-servername",
                "gateway.example.test",
                version,
            ])
            .args([
                "-CAfile",
                root.to_str().expect("utf8"),
                "-cert",
                ccert.to_str().expect("utf8"),
                "-key",
                ckey.to_str().expect("utf8"),
            ])
            .args(["-verify_return_error"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("openssl");
        child
            .stdin
            .as_mut()
            .expect("stdin")
            .write_all(b"ping through meshgate\n")
            .expect("write");
        let out = read_line_with_deadline(&mut child, Duration::from_secs(10));
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(
            out.trim(),
            "ping through meshgate",
            "{version}\n{}",
            mg.log()
        );
    }
}

fn read_line_with_deadline(child: &mut Child, d: Duration) -> String {
    let mut stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let mut b = [0u8; 1];
        while let Ok(1) = stdout.read(&mut b) {
            buf.push(b[0]);
            if b[0] == b'\n' {
                break;
            }
        }
        let _ = tx.send(String::from_utf8_lossy(&buf).into_owned());
    });
    rx.recv_timeout(d).unwrap_or_default()
}

/// `openssl s_server -WWW` serving `name.txt` (containing `name`) with a certificate for `dns`.
struct SServer {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

/// `openssl s_server -quiet -WWW` serving `dir`, on a free port, with `args` added; up when
/// it accepts connections. On a busy machine a port that was free a moment ago may be taken
/// by then (s_server binds the wildcard address, which clashes with any socket on that port,
/// even a client's): then try another port.
fn s_server(dir: &Path, args: impl Fn(&mut Command)) -> (Child, SocketAddr) {
    for _ in 0..10 {
        let port = free_port();
        let mut cmd = Command::new("openssl");
        cmd.args(["s_server", "-quiet", "-WWW", "-accept", &port.to_string()]);
        args(&mut cmd);
        let mut child = cmd
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl s_server");
        let up = wait_until(Duration::from_secs(10), || {
            TcpStream::connect(addr(port)).is_ok() || matches!(child.try_wait(), Ok(Some(_)))
        });
        if up && matches!(child.try_wait(), Ok(None)) {
            return (child, addr(port));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("openssl s_server did not start on any of 10 ports");
}

impl SServer {
    fn start(pki: &TestPki, name: &str, dns: &str) -> SServer {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("name.txt"), name).expect("write");
        let (cert, key) = pki.server(name, &[dns]);
        let (child, addr) = s_server(dir.path(), |cmd| {
            cmd.arg("-cert").arg(&cert).arg("-key").arg(&key);
        });
        SServer {
            child,
            addr,
            _dir: dir,
        }
    }
}

impl Drop for SServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn passthrough_routes_by_sni_to_three_upstreams_without_decrypting() {
    let pki = TestPki::new();
    let names = ["a", "b", "c"];
    let servers: Vec<SServer> = names
        .iter()
        .map(|n| SServer::start(&pki, n, &format!("{n}.example.test")))
        .collect();
    let admin = addr(free_port());
    let listen = addr(free_port());
    let mut cfg = format!(
        "version = 1\n[admin]\naddress = \"{admin}\"\n[[listeners]]\nname = \"pt\"\naddress = \"{listen}\"\nprotocol = \"tls-passthrough\"\n"
    );
    for (n, s) in names.iter().zip(&servers) {
        cfg += &format!(
            "[[routes]]\nname = \"to-{n}\"\nlistener = \"pt\"\ncluster = \"{n}\"\nmatch = {{ sni = [\"{n}.example.test\"] }}\n[[clusters]]\nname = \"{n}\"\nendpoints = [\"{}\"]\n",
            s.addr
        );
    }
    let mg = Meshgate::start(bin(), &cfg, admin).expect("start");
    let root = pki.bundle(&pki.example, "root");
    for n in names {
        let host = format!("{n}.example.test");
        let resolve = format!("{host}:{}:127.0.0.1", listen.port());
        let (code, out, err) = curl(&[
            "--resolve",
            &resolve,
            "--cacert",
            root.to_str().expect("utf8"),
            &format!("https://{host}:{}/name.txt", listen.port()),
        ]);
        assert_eq!(code, 0, "{host}: {err}\n{}", mg.log());
        assert_eq!(
            out, n,
            "SNI {host} reached upstream {n} (its own certificate verified end to end)"
        );
    }
    // Unknown SNI: no route, closed, counted.
    let resolve = format!("zzz.example.test:{}:127.0.0.1", listen.port());
    let (code, _, _) = curl(&[
        "--resolve",
        &resolve,
        "--cacert",
        root.to_str().expect("utf8"),
        &format!("https://zzz.example.test:{}/name.txt", listen.port()),
    ]);
    assert_ne!(code, 0);
    assert!(wait_until(Duration::from_secs(5), || metric_sum(
        &mg.metrics(),
        "meshgate_listener_no_route_total",
        &[("listener", "pt")]
    ) >= 1.0));
}

#[test]
fn tcp_listener_originates_mtls_verified_by_spiffe_id() {
    let pki = TestPki::new();
    // Upstream: openssl s_server with an SVID, requiring a client certificate from example.test.
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("name.txt"), "secured upstream").expect("write");
    let (ucert, ukey) = pki.svid(&pki.example, "upstream", "/ns/prod/web");
    let bundle = pki.bundle(&pki.example, "bundle");
    let (gcert, gkey) = pki.svid(&pki.example, "gateway", "/gateway");
    let (mut child, upstream) = s_server(dir.path(), |cmd| {
        cmd.args(["-Verify", "1", "-verify_return_error"])
            .arg("-cert")
            .arg(&ucert)
            .arg("-key")
            .arg(&ukey)
            .arg("-CAfile")
            .arg(&bundle);
    });
    let uport = upstream.port();
    let run = |expect_id: &str| {
        let admin = addr(free_port());
        let listen = addr(free_port());
        let cfg = format!(
            r#"version = 1
[admin]
address = "{admin}"
[[listeners]]
name = "egress"
address = "{listen}"
protocol = "tcp"
[[routes]]
name = "r"
listener = "egress"
cluster = "web"
[[clusters]]
name = "web"
endpoints = ["127.0.0.1:{uport}"]
[clusters.tls]
verify = {{ spiffe_ids = ["{expect_id}"] }}
trust_bundle = "{}"
identity = {{ cert = "{}", key = "{}" }}
"#,
            bundle.display(),
            gcert.display(),
            gkey.display()
        );
        let mg = Meshgate::start(bin(), &cfg, admin).expect("start");
        let (code, out, err) = curl(&[&format!("http://{listen}/name.txt")]);
        (mg, code, out, err)
    };
    let (mg, code, out, err) = run("spiffe://example.test/ns/prod/web");
    assert_eq!(code, 0, "{err}\n{}", mg.log());
    assert_eq!(out, "secured upstream");
    // The gateway's client certificate and the cluster's bundle root are listed and gauged.
    let (_, body) = mg.get("/certs").expect("certs");
    let certs: serde_json::Value = serde_json::from_str(&body).expect("json");
    let kinds: Vec<(String, String, String)> = certs
        .as_array()
        .expect("array")
        .iter()
        .map(|c| {
            (
                c["kind"].as_str().unwrap_or("").to_owned(),
                c["cluster"].as_str().unwrap_or("").to_owned(),
                c["trust_domain"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    let want = |k: &str| (k.to_owned(), "web".to_owned(), "example.test".to_owned());
    assert_eq!(kinds, vec![want("cert"), want("bundle_root")], "{body}");
    let m = mg.metrics();
    for kind in ["cert", "bundle_root"] {
        assert!(
            metric_sum(
                &m,
                "meshgate_cert_expiry_timestamp_seconds",
                &[("cluster", "web"), ("kind", kind)]
            ) > 0.0,
            "{kind}:\n{m}"
        );
    }
    // Expecting another identity: the upstream is refused, the client gets a closed connection.
    let (mg2, code, _, _) = run("spiffe://example.test/ns/prod/db");
    assert_ne!(code, 0);
    assert!(wait_until(Duration::from_secs(5), || metric_sum(
        &mg2.metrics(),
        "meshgate_cluster_upstream_connect_failures_total",
        &[("cluster", "web")]
    ) >= 1.0));
    drop(mg);
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn tls_listener_without_certificates_serves_the_local_ca_identity() {
    let origin = http_origin("served with the local CA");
    let admin = addr(free_port());
    let listen = addr(free_port());
    let cfg = format!(
        "version = 1\n[admin]\naddress = \"{admin}\"\n[[listeners]]\nname = \"https\"\naddress = \"{listen}\"\nprotocol = \"tls\"\n[[routes]]\nname = \"r\"\nlistener = \"https\"\ncluster = \"origin\"\n[[clusters]]\nname = \"origin\"\nendpoints = [\"{origin}\"]\n"
    );
    let mg = Meshgate::start(bin(), &cfg, admin).expect("start");
    let state = mg.dir.path().join("state");
    let root = state.join("ca/root.pem");
    assert!(
        root.exists(),
        "local CA initialised in the state dir:\n{}",
        mg.log()
    );
    let key = state.join("gateway/svid_key.pem");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).expect("key").permissions().mode() & 0o777,
        0o600
    );
    let resolve = format!("localhost:{}:127.0.0.1", listen.port());
    let (code, out, err) = curl(&[
        "--resolve",
        &resolve,
        "--cacert",
        root.to_str().expect("utf8"),
        &format!("https://localhost:{}/", listen.port()),
    ]);
    assert_eq!(code, 0, "{err}\n{}", mg.log());
    assert_eq!(out, "served with the local CA");
    // The serving certificate is an X509-SVID of the local trust domain.
    let out = Command::new(bin())
        .args(["cert", "inspect", "-o", "json"])
        .arg(state.join("gateway/svid.pem"))
        .output()
        .expect("inspect");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let text = v.to_string();
    assert!(text.contains("spiffe://meshgate.local/gateway"), "{text}");
}

/// Resumed handshakes per shard for one TLS version, from the gateway's metrics.
fn resumed_by_shard(mg: &Meshgate, version: &str) -> [f64; 2] {
    let m = mg.metrics();
    ["0", "1"].map(|shard| {
        metric_sum(
            &m,
            "meshgate_tls_handshakes_total",
            &[
                ("listener", "mtls"),
                ("result", "resumed"),
                ("version", version),
                ("shard", shard),
            ],
        )
    })
}

#[test]
fn sessions_resume_on_either_shard_with_tls13_tickets_tls12_tickets_and_session_ids() {
    use meshgate_testkit::tlsload::{self, Versions};
    use rustls::client::{Resumption, Tls12Resumption};

    let pki = TestPki::new();
    let echo = EchoServer::start();
    let admin = addr(free_port());
    let listen = addr(free_port());
    let mg =
        Meshgate::start(bin(), &mtls_config(&pki, admin, listen, echo.addr), admin).expect("start");
    let roots = [pki.example.root_der()];
    let client = pki.example.svid("/client").expect("svid");
    const CONNECTIONS: usize = 60;
    let modes = [
        (
            "TLS 1.3 tickets",
            Versions::Both,
            "TLSv1.3",
            Resumption::in_memory_sessions(256),
        ),
        (
            "TLS 1.2 tickets",
            Versions::Tls12Only,
            "TLSv1.2",
            Resumption::in_memory_sessions(256)
                .tls12_resumption(Tls12Resumption::SessionIdOrTickets),
        ),
        (
            "TLS 1.2 session IDs",
            Versions::Tls12Only,
            "TLSv1.2",
            Resumption::in_memory_sessions(256).tls12_resumption(Tls12Resumption::SessionIdOnly),
        ),
    ];
    for (mode, versions, label, resumption) in modes {
        // One client config = one session store, reused by every connection of this mode; the
        // kernel spreads the connections over both shards (SO_REUSEPORT).
        let config = tlsload::client_config(&roots, Some(&client), versions, resumption)
            .expect("client config");
        let before = resumed_by_shard(&mg, label);
        let mut resumed = 0;
        for n in 0..CONNECTIONS {
            let mut tls = tlsload::connect(listen, config.clone(), "gateway.example.test")
                .unwrap_or_else(|e| panic!("{mode}: connection {n}: {e:#}\n{}", mg.log()));
            tlsload::echo(&mut tls, format!("{mode} {n}\n").as_bytes())
                .unwrap_or_else(|e| panic!("{mode}: connection {n}: {e:#}"));
            if tlsload::resumed(&tls) {
                resumed += 1;
            }
            tlsload::close(tls);
        }
        // Every connection after the first offers a session; all of them must be taken.
        assert_eq!(
            resumed,
            CONNECTIONS - 1,
            "{mode}: client saw {resumed} resumed handshakes"
        );
        let mut after = [0.0; 2];
        assert!(
            wait_until(Duration::from_secs(5), || {
                after = resumed_by_shard(&mg, label);
                after[0] + after[1] - before[0] - before[1] >= (CONNECTIONS - 1) as f64
            }),
            "{mode}: gateway counted {after:?} (before {before:?})\n{}",
            mg.metrics()
        );
        for shard in 0..2 {
            assert!(
                after[shard] > before[shard],
                "{mode}: no resumed handshake on shard {shard}: {before:?} -> {after:?}"
            );
        }
    }
}
