//! SPIFFE federation end to end, across real processes with real TLS.
//!
//! Two trust domains on loopback, each with its own CA state directory and bundle endpoint:
//! `a.test` serves its bundle with the `https_spiffe` profile (`meshgate bundle serve`), `b.test`
//! with `https_web` (an operator certificate for `localhost`). Each federates with the other
//! (`meshgate trust add`). A workload holding an a.test SVID calls A's egress gateway over mTLS;
//! A originates mTLS with its own a.test SVID and SNI `web.default.cluster-b` to B's ingress
//! gateway (requiring B's ingress SPIFFE ID), which trusts a.test through the federated bundle
//! (`trust_bundles = [{ federated = true }]`) and routes by that SNI and peer trust domain to
//! the service. A c.test client is refused at both gateways. Then cluster A rotates
//! its CA (prepare, wait for B to fetch, activate, re-issue, wait out the old SVIDs, retire) while
//! the cross-cluster call repeats: zero failures.
//!
//! A second test points a gateway's federation at an endpoint (`openssl s_server -WWW`) that
//! serves garbage, another domain's bundle, a lower sequence, then goes away: the last good
//! bundle stays in force, and `trust list -o json` and `/metrics` show the failure.
//!
//! The exported SPIFFE bundle is also checked with Python's `spiffe` package (py-spiffe) plus
//! PyJWT: the JWKS keys parse and match their `x5c` certificates, and issued SVIDs pass
//! py-spiffe's X509-SVID checks and chain to an authority of the bundle.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use meshgate_testkit::cli::{eventually, s};
use meshgate_testkit::pki::TrustDomainCa;
use meshgate_testkit::{Meshgate, free_port, http_origin, metric_sum, wait_until};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_meshgate"))
}

fn run(args: &[&str]) -> Output {
    meshgate_testkit::cli::run(bin(), args)
}

fn ok(args: &[&str]) -> String {
    meshgate_testkit::cli::ok(bin(), args)
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `meshgate bundle serve ...`: returns the process and its URL (from the first stdout line).
fn bundle_serve(args: &[&str], host: &str) -> (Proc, String) {
    let mut child = Command::new(bin())
        .args(["bundle", "serve", "--listen", "127.0.0.1:0"])
        .args(args)
        .env_remove("MESHGATE_STATE_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn bundle serve");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).expect("read");
    // "listening on https://127.0.0.1:PORT[ as ID]"
    let url = line
        .split_whitespace()
        .nth(2)
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    let port = url.rsplit(':').next().expect("port").to_owned();
    (Proc(child), format!("https://{host}:{port}"))
}

fn ca_init(state: &Path, td: &str, extra: &[&str]) {
    let mut args = vec!["ca", "init", "--trust-domain", td, "--state-dir", s(state)];
    args.extend_from_slice(extra);
    ok(&args);
}

/// `cert issue` into `<dir>/<name>.pem` and `<name>-key.pem`.
fn issue(state: &Path, id: &str, dir: &Path, name: &str, extra: &[&str]) -> (PathBuf, PathBuf) {
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}-key.pem"));
    let mut args = vec![
        "cert",
        "issue",
        "--state-dir",
        s(state),
        "--spiffe-id",
        id,
        "--cert",
        s(&cert),
        "--key",
        s(&key),
    ];
    args.extend_from_slice(extra);
    ok(&args);
    (cert, key)
}

fn trust_list(state: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(&[
        "trust",
        "list",
        "--state-dir",
        s(state),
        "-o",
        "json",
    ]))
    .expect("trust list json")
}

fn peer(state: &Path, td: &str) -> serde_json::Value {
    trust_list(state)
        .as_array()
        .expect("array")
        .iter()
        .find(|p| p["trust_domain"] == td)
        .cloned()
        .unwrap_or_else(|| panic!("{td} not in trust list"))
}

fn generation(mg: &Meshgate) -> u64 {
    mg.get("/status")
        .ok()
        .and_then(|(_, b)| serde_json::from_str::<serde_json::Value>(&b).ok())
        .and_then(|v| v["config_generation"].as_u64())
        .unwrap_or(0)
}

/// curl with a client certificate; returns (exit code, body).
fn curl(args: &[&str]) -> (i32, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5"])
        .args(args)
        .output()
        .expect("curl is installed");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

const PY_CHECK: &str = r#"
import base64, json, sys
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from jwt import PyJWK
from spiffe import TrustDomain, X509Bundle, X509Svid

td, bundle_path = sys.argv[1], sys.argv[2]
doc = json.load(open(bundle_path))
assert isinstance(doc["spiffe_sequence"], int) and doc["spiffe_sequence"] >= 1, doc
assert isinstance(doc["spiffe_refresh_hint"], int), doc
authorities = set()
for k in doc["keys"]:
    assert k["use"] == "x509-svid", k
    assert len(k["x5c"]) == 1, k
    cert = x509.load_der_x509_certificate(base64.b64decode(k["x5c"][0]))
    jwk = PyJWK({kk: vv for kk, vv in k.items() if kk not in ("x5c", "use")})
    # The JWK's key is the certificate's key.
    assert jwk.key.public_numbers() == cert.public_key().public_numbers(), k
    authorities.add(cert)
bundle = X509Bundle(TrustDomain(td), authorities)
for pair in sys.argv[3:]:
    cert_path, key_path = pair.split(",")
    svid = X509Svid.load(cert_path, key_path, Encoding.PEM)
    assert str(svid.spiffe_id.trust_domain) == td, svid.spiffe_id
    leaf = svid.leaf
    assert any(
        leaf.issuer == a.subject and not leaf.verify_directly_issued_by(a)
        for a in bundle.x509_authorities
    ), "the SVID does not chain to the bundle"
print("ok", len(authorities))
"#;

/// Check a SPIFFE bundle file and SVIDs with py-spiffe (installed by .ci/run).
fn py_spiffe_check(td: &str, bundle: &Path, svids: &[(&Path, &Path)]) -> usize {
    let mut cmd = Command::new(meshgate_testkit::spiffe_python());
    cmd.args(["-c", PY_CHECK, td, s(bundle)]);
    for (c, k) in svids {
        cmd.arg(format!("{},{}", s(c), s(k)));
    }
    let out = cmd.output().expect("python3");
    assert!(
        out.status.success(),
        "py-spiffe check failed (pip install spiffe==0.3.2; .ci/run does, in a virtualenv): {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .strip_prefix("ok ")
        .and_then(|n| n.parse().ok())
        .expect("ok N")
}

#[test]
fn east_west_federation_and_ca_rotation_with_zero_failures() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let t = tmp.path();
    let (a, b, c) = (t.join("a"), t.join("b"), t.join("c"));
    // A: short SVIDs so that "wait out the old root's SVIDs" takes seconds; peers poll every 1 s.
    ca_init(
        &a,
        "a.test",
        &[
            "--default-ttl",
            "12s",
            "--max-ttl",
            "1m",
            "--bundle-refresh-hint",
            "1s",
        ],
    );
    ca_init(&b, "b.test", &["--bundle-refresh-hint", "1s"]);
    ca_init(&c, "c.test", &[]);

    // Bundle endpoints: A https_spiffe, B https_web (an operator certificate for localhost).
    let (_a_ep, a_url) = bundle_serve(
        &["--state-dir", s(&a), "--profile", "https-spiffe"],
        "127.0.0.1",
    );
    let web_ca = TrustDomainCa::new("web.test", false).expect("web ca");
    let (web_cert, web_key) = web_ca
        .server(&["localhost"])
        .expect("web cert")
        .write_pem(t, "b-web")
        .expect("write");
    let web_ca_pem = web_ca.write_bundle(t, "web-ca").expect("web ca pem");
    let (_b_ep, b_url) = bundle_serve(
        &[
            "--state-dir",
            s(&b),
            "--profile",
            "https-web",
            "--cert",
            s(&web_cert),
            "--key",
            s(&web_key),
        ],
        "localhost",
    );

    // The SPIFFE bundle endpoint answers with JSON (content type checked with curl).
    let a_root = t.join("a-root.pem");
    ok(&[
        "bundle",
        "export",
        "--state-dir",
        s(&a),
        "--format",
        "pem",
        "--out",
        s(&a_root),
    ]);
    let out = Command::new("curl")
        .args(["-sS", "-D", "-", "-k", &a_url])
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(text.contains("content-type: application/json"), "{text}");
    assert!(text.contains("\"x509-svid\""), "{text}");

    // Federate: B trusts a.test (https_spiffe, bootstrapped out of band); A trusts b.test.
    let a_json = t.join("a-bundle.json");
    ok(&[
        "bundle",
        "export",
        "--state-dir",
        s(&a),
        "--format",
        "spiffe",
        "--out",
        s(&a_json),
    ]);
    ok(&[
        "trust",
        "add",
        "--state-dir",
        s(&b),
        "--trust-domain",
        "a.test",
        "--endpoint",
        &a_url,
        "--profile",
        "https_spiffe",
        "--bootstrap-bundle",
        s(&a_json),
    ]);
    ok(&[
        "trust",
        "add",
        "--state-dir",
        s(&a),
        "--trust-domain",
        "b.test",
        "--endpoint",
        &b_url,
        "--profile",
        "https_web",
        "--web-ca",
        s(&web_ca_pem),
    ]);
    let pa = peer(&b, "a.test");
    assert_eq!(pa["sequence"], 1, "{pa}");
    assert!(pa["last_refresh"].is_string(), "{pa}");
    assert_eq!(pa["profile"], "https_spiffe");
    assert_eq!(peer(&a, "b.test")["authorities"], 1);
    // The own trust domain cannot be federated, and an endpoint of another domain is refused.
    let own = run(&[
        "trust",
        "add",
        "--state-dir",
        s(&a),
        "--trust-domain",
        "a.test",
        "--endpoint",
        &b_url,
        "--profile",
        "https_web",
    ]);
    assert_eq!(own.status.code(), Some(64));

    // Identities.
    let (b_cert, b_key) = issue(
        &b,
        "spiffe://b.test/ingress",
        t,
        "b-ingress",
        &["--dns", "web.default.cluster-b", "--ttl", "1h"],
    );
    // A's egress gateway: one SVID both serves the workloads' listener and authenticates to B.
    let egress = |n: u32| {
        issue(
            &a,
            "spiffe://a.test/egress",
            t,
            &format!("a-egress-{n}"),
            &["--dns", "egress.a.local"],
        )
    };
    // The first SVIDs (old root) live 30 s: retire must wait that long after them.
    let (e_cert, e_key) = issue(
        &a,
        "spiffe://a.test/egress",
        t,
        "a-egress-0",
        &["--ttl", "30s", "--dns", "egress.a.local"],
    );
    let workload = |n: u32, ttl: &str| {
        issue(
            &a,
            "spiffe://a.test/workload",
            t,
            &format!("wl-{n}"),
            &["--ttl", ttl],
        )
    };
    let current_wl = Arc::new(std::sync::Mutex::new(workload(0, "30s")));
    // A's own trust domain bundle for its workload-facing listener (re-exported at each
    // rotation step that changes it, then A reloads).
    let a_local = t.join("a-local.pem");
    let export_a_local = || {
        ok(&[
            "bundle",
            "export",
            "--state-dir",
            s(&a),
            "--format",
            "pem",
            "--out",
            s(&a_local),
        ]);
    };
    export_a_local();
    // Stable paths the A gateway reads; re-issued (and A reloaded) like an agent would.
    let a_id_cert = t.join("a-egress.pem");
    let a_id_key = t.join("a-egress-key.pem");
    std::fs::copy(&e_key, &a_id_key).expect("copy");
    std::fs::copy(&e_cert, &a_id_cert).expect("copy");
    let (c_cert, c_key) = issue(&c, "spiffe://c.test/intruder", t, "c-client", &[]);

    // The exported SPIFFE bundle, checked by py-spiffe, with an SVID of A.
    assert_eq!(py_spiffe_check("a.test", &a_json, &[(&e_cert, &e_key)]), 1);

    // B ingress: mTLS, trusts a.test through federation, routes by SNI + peer trust domain.
    let origin = http_origin("hello from b.test");
    let (b_admin, b_in) = (addr(free_port()), addr(free_port()));
    let b_cfg = format!(
        r#"version = 1
[admin]
address = "{b_admin}"

[[listeners]]
name = "ingress"
address = "{b_in}"
protocol = "tls"
[listeners.tls]
certificates = [{{ cert = "{}", key = "{}" }}]
client_auth = "required"
trust_bundles = [{{ trust_domain = "a.test", federated = true }}]

[[routes]]
name = "web"
listener = "ingress"
cluster = "web"
match = {{ sni = ["web.default.cluster-b"], peer = {{ trust_domains = ["a.test"] }} }}

[[clusters]]
name = "web"
endpoints = ["{origin}"]
"#,
        s(&b_cert),
        s(&b_key)
    );
    let gw_b = Meshgate::start_with_args(bin(), &b_cfg, b_admin, &["--state-dir", s(&b)])
        .expect("gateway B");

    // A egress: mTLS from the workload (an a.test SVID required), mTLS to B with SNI naming the
    // target service and B's ingress identity required.
    let (a_admin, a_out) = (addr(free_port()), addr(free_port()));
    let a_cfg = format!(
        r#"version = 1
[admin]
address = "{a_admin}"

[[listeners]]
name = "egress"
address = "{a_out}"
protocol = "tls"
[listeners.tls]
certificates = [{{ cert = "{id_cert}", key = "{id_key}" }}]
client_auth = "required"
trust_bundles = [{{ trust_domain = "a.test", bundle = "{a_local}" }}]

[[routes]]
name = "to-cluster-b"
listener = "egress"
cluster = "cluster-b-web"
match = {{ peer = {{ trust_domains = ["a.test"] }} }}

[[clusters]]
name = "cluster-b-web"
endpoints = ["{b_in}"]
[clusters.tls]
sni = "web.default.cluster-b"
verify = {{ spiffe_ids = ["spiffe://b.test/ingress"] }}
trust_bundle = "{b_bundle}"
identity = {{ cert = "{id_cert}", key = "{id_key}" }}
"#,
        b_bundle = s(&a.join("trust/b.test/bundle.pem")),
        id_cert = s(&a_id_cert),
        id_key = s(&a_id_key),
        a_local = s(&a_local),
    );
    let gw_a = Meshgate::start_with_args(bin(), &a_cfg, a_admin, &["--state-dir", s(&a)])
        .expect("gateway A");

    let url = format!("https://egress.a.local:{}/", a_out.port());
    let a_resolve = format!("egress.a.local:{}:127.0.0.1", a_out.port());
    let call_as = |cert: &Path, key: &Path| {
        curl(&[
            "--resolve",
            &a_resolve,
            "--cacert",
            s(&a_local),
            "--cert",
            s(cert),
            "--key",
            s(key),
            &url,
        ])
    };
    let (wl_cert, wl_key) = current_wl.lock().expect("lock").clone();
    let (code, body) = call_as(&wl_cert, &wl_key);
    assert_eq!(
        (code, body.as_str()),
        (0, "hello from b.test"),
        "{}",
        gw_b.log()
    );

    // Directly at B: an a.test client passes the mTLS listener, a c.test client is refused.
    let b_root = t.join("b-root.pem");
    ok(&[
        "bundle",
        "export",
        "--state-dir",
        s(&b),
        "--format",
        "pem",
        "--out",
        s(&b_root),
    ]);
    let resolve = format!("web.default.cluster-b:{}:127.0.0.1", b_in.port());
    let direct = format!("https://web.default.cluster-b:{}/", b_in.port());
    let (code, body) = curl(&[
        "--resolve",
        &resolve,
        "--cacert",
        s(&b_root),
        "--cert",
        s(&e_cert),
        "--key",
        s(&e_key),
        &direct,
    ]);
    assert_eq!((code, body.as_str()), (0, "hello from b.test"));
    let (code, _) = curl(&[
        "--resolve",
        &resolve,
        "--cacert",
        s(&b_root),
        "--cert",
        s(&c_cert),
        "--key",
        s(&c_key),
        &direct,
    ]);
    assert_ne!(code, 0, "a c.test client must be refused");
    // ... and so is a c.test workload at A's egress.
    let (code, _) = call_as(&c_cert, &c_key);
    assert_ne!(code, 0, "a c.test workload must be refused at A's egress");
    assert!(
        metric_sum(
            &gw_b.metrics(),
            "meshgate_federation_bundle_sequence",
            &[("trust_domain", "a.test")]
        ) == 1.0,
        "{}",
        gw_b.metrics()
    );

    // The cross-cluster call repeats through the whole rotation.
    let stop = Arc::new(AtomicBool::new(false));
    let (calls, failures) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let caller = {
        let (stop, calls, failures, url, wl, resolve, a_local) = (
            stop.clone(),
            calls.clone(),
            failures.clone(),
            url.clone(),
            current_wl.clone(),
            a_resolve.clone(),
            a_local.clone(),
        );
        std::thread::spawn(move || {
            let mut errors = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                // The workload's current SVID (its agent swaps cert and key together).
                let (cert, key) = wl.lock().expect("lock").clone();
                let (code, body) = curl(&[
                    "--resolve",
                    &resolve,
                    "--cacert",
                    s(&a_local),
                    "--cert",
                    s(&cert),
                    "--key",
                    s(&key),
                    &url,
                ]);
                calls.fetch_add(1, Ordering::SeqCst);
                if code != 0 || body != "hello from b.test" {
                    failures.fetch_add(1, Ordering::SeqCst);
                    errors.push(format!("curl exit {code}: {body:?}"));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            errors
        })
    };
    let reload_a = || {
        let out = Command::new(bin())
            .args(["reload", "--admin", &a_admin.to_string()])
            .output()
            .expect("reload");
        assert!(
            out.status.success(),
            "reload A: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let mut n = 0;
    let renew = |n: &mut u32| {
        *n += 1;
        let (c, k) = egress(*n);
        std::fs::copy(&k, &a_id_key).expect("copy");
        std::fs::copy(&c, &a_id_cert).expect("copy");
        reload_a();
        *current_wl.lock().expect("lock") = workload(*n, "12s");
    };
    let wait_b_sequence = |seq: u64| {
        let before = generation(&gw_b);
        eventually(Duration::from_secs(20), "B to fetch A's new bundle", || {
            (peer(&b, "a.test")["sequence"] == seq).then_some(())
        });
        // ... and to put it in force on every shard (the poller's reload).
        eventually(Duration::from_secs(20), "B to reload", || {
            (generation(&gw_b) > before
                && metric_sum(
                    &gw_b.metrics(),
                    "meshgate_federation_bundle_sequence",
                    &[("trust_domain", "a.test")],
                ) == seq as f64)
                .then_some(())
        });
    };
    // Calls are flowing on the old material before the rotation starts.
    assert!(
        wait_until(Duration::from_secs(20), || calls.load(Ordering::SeqCst)
            >= 5),
        "no cross-cluster call before the rotation"
    );

    // 1. prepare: the new root is published next to the old one.
    ok(&["ca", "rotate", "prepare", "--state-dir", s(&a)]);
    let prepared = Instant::now();
    wait_b_sequence(2);
    assert_eq!(peer(&b, "a.test")["authorities"], 2);
    // A's own listener trusts both roots too.
    export_a_local();
    reload_a();
    // 2. activate once one refresh hint (1 s) has passed since prepare (B already has the new
    // root; `activate` refuses earlier without --force), then re-issue the egress SVID with the
    // new key.
    if let Some(left) = Duration::from_millis(1100).checked_sub(prepared.elapsed()) {
        std::thread::sleep(left);
    }
    ok(&["ca", "rotate", "activate", "--state-dir", s(&a)]);
    renew(&mut n);
    // 3. retire is refused while SVIDs of the old root are unexpired...
    let refused = run(&["ca", "rotate", "retire", "--state-dir", s(&a)]);
    assert_eq!(refused.status.code(), Some(64));
    let msg = String::from_utf8_lossy(&refused.stderr);
    assert!(
        msg.contains("unexpired SVID") && msg.contains("expires at"),
        "{msg}"
    );
    // ... so wait them out (renewing the egress SVID as an agent would), then retire.
    let start = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(500));
        if run(&["ca", "rotate", "retire", "--state-dir", s(&a)])
            .status
            .success()
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "retire never allowed"
        );
        renew(&mut n);
    }
    wait_b_sequence(3);
    assert_eq!(peer(&b, "a.test")["authorities"], 1);
    export_a_local();
    renew(&mut n);
    // And on the new material only, after retire.
    let after_retire = calls.load(Ordering::SeqCst);
    assert!(
        wait_until(Duration::from_secs(20), || calls.load(Ordering::SeqCst)
            >= after_retire + 5),
        "no cross-cluster call after retire"
    );
    stop.store(true, Ordering::SeqCst);
    let errors = caller.join().expect("caller");
    let total = calls.load(Ordering::SeqCst);
    eprintln!(
        "cross-cluster calls during the rotation: {total}, failures: {}",
        errors.len()
    );
    assert!(total >= 50, "only {total} calls");
    assert!(
        errors.is_empty(),
        "failed calls: {errors:?}\nA:\n{}\nB:\n{}",
        gw_a.log(),
        gw_b.log()
    );

    // After the rotation: A's bundle holds only the new root; an SVID of it checks with
    // py-spiffe; the old SVID is refused by B.
    let a_json2 = t.join("a-bundle-2.json");
    ok(&[
        "bundle",
        "export",
        "--state-dir",
        s(&a),
        "--format",
        "spiffe",
        "--out",
        s(&a_json2),
    ]);
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&a_json2).expect("read")).expect("json");
    assert_eq!(doc["spiffe_sequence"], 3);
    assert_eq!(
        py_spiffe_check("a.test", &a_json2, &[(&a_id_cert, &a_id_key)]),
        1
    );
    let (code, _) = curl(&[
        "--resolve",
        &resolve,
        "--cacert",
        s(&b_root),
        "--cert",
        s(&e_cert),
        "--key",
        s(&e_key),
        &direct,
    ]);
    assert_ne!(code, 0, "an SVID of the retired root must be refused");
}

/// `openssl s_server -WWW` serving `<dir>/bundle.json` with `cert`/`key`; None if it exits
/// (port taken meanwhile) or does not listen within 20 s.
fn s_server(dir: &Path, port: u16, cert: &Path, key: &Path) -> Option<Proc> {
    let child = Command::new("openssl")
        .args(["s_server", "-quiet", "-WWW", "-accept", &port.to_string()])
        .arg("-cert")
        .arg(cert)
        .arg("-key")
        .arg(key)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl s_server");
    let mut p = Proc(child);
    let up = wait_until(Duration::from_secs(20), || {
        matches!(p.0.try_wait(), Ok(Some(_))) || TcpStream::connect(addr(port)).is_ok()
    });
    (up && matches!(p.0.try_wait(), Ok(None))).then_some(p)
}

#[test]
fn a_bad_peer_endpoint_keeps_the_last_good_bundle() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let t = tmp.path();
    let (a, c, g) = (t.join("a"), t.join("c"), t.join("g"));
    ca_init(&a, "a.test", &[]);
    ca_init(&c, "c.test", &[]);
    let www = t.join("www");
    std::fs::create_dir(&www).expect("mkdir");
    let bundle_doc = |state: &Path, seq: u64| -> String {
        let mut v: serde_json::Value = serde_json::from_str(&ok(&[
            "bundle",
            "export",
            "--state-dir",
            s(state),
            "--format",
            "spiffe",
        ]))
        .expect("json");
        v["spiffe_sequence"] = seq.into();
        v["spiffe_refresh_hint"] = 1.into();
        v.to_string()
    };
    let serve = |text: &str| std::fs::write(www.join("bundle.json"), text).expect("write");
    serve(&bundle_doc(&a, 5));
    let good = t.join("good.json");
    std::fs::write(&good, bundle_doc(&a, 5)).expect("write");
    let (ep_cert, ep_key) = issue(&a, "spiffe://a.test/meshgate/bundle-endpoint", t, "ep", &[]);
    // free_port can race with other tests' ephemeral ports: retry with another one.
    let (port, server) = (0..5)
        .find_map(|_| {
            let port = free_port();
            s_server(&www, port, &ep_cert, &ep_key).map(|p| (port, p))
        })
        .expect("openssl s_server listening");
    let endpoint = format!("https://127.0.0.1:{port}/bundle.json");
    ok(&[
        "trust",
        "add",
        "--state-dir",
        s(&g),
        "--trust-domain",
        "a.test",
        "--endpoint",
        &endpoint,
        "--profile",
        "https_spiffe",
        "--bootstrap-bundle",
        s(&good),
    ]);
    assert_eq!(peer(&g, "a.test")["sequence"], 5);
    let pem_path = g.join("trust/a.test/bundle.pem");
    let good_pem = std::fs::read(&pem_path).expect("pem");

    // A gateway that trusts a.test through the store, to see /metrics and the verifier.
    let (gw_cert, gw_key) = issue(
        &a,
        "spiffe://a.test/gateway",
        t,
        "gw",
        &["--dns", "localhost"],
    );
    let (cl_cert, cl_key) = issue(&a, "spiffe://a.test/client", t, "client", &[]);
    let a_root = t.join("a-root.pem");
    ok(&[
        "bundle",
        "export",
        "--state-dir",
        s(&a),
        "--format",
        "pem",
        "--out",
        s(&a_root),
    ]);
    let origin = http_origin("still trusted");
    let (admin, listen) = (addr(free_port()), addr(free_port()));
    let cfg = format!(
        r#"version = 1
[admin]
address = "{admin}"
[[listeners]]
name = "in"
address = "{listen}"
protocol = "tls"
[listeners.tls]
certificates = [{{ cert = "{}", key = "{}" }}]
client_auth = "required"
trust_bundles = [{{ trust_domain = "a.test", federated = true }}]
[[routes]]
name = "r"
listener = "in"
cluster = "o"
match = {{ peer = {{ trust_domains = ["a.test"] }} }}
[[clusters]]
name = "o"
endpoints = ["{origin}"]
"#,
        s(&gw_cert),
        s(&gw_key)
    );
    let gw =
        Meshgate::start_with_args(bin(), &cfg, admin, &["--state-dir", s(&g)]).expect("gateway");
    let call = || {
        curl(&[
            "--resolve",
            &format!("localhost:{}:127.0.0.1", listen.port()),
            "--cacert",
            s(&a_root),
            "--cert",
            s(&cl_cert),
            "--key",
            s(&cl_key),
            &format!("https://localhost:{}/", listen.port()),
        ])
    };
    assert_eq!(call(), (0, "still trusted".to_owned()));

    let mut server = Some(server);
    let cases: Vec<(&str, Option<String>, &str)> = vec![
        (
            "garbage",
            Some("this is not a bundle".into()),
            "not a SPIFFE bundle",
        ),
        (
            "wrong trust domain",
            Some(bundle_doc(&c, 9)),
            "another trust domain",
        ),
        ("lower sequence", Some(bundle_doc(&a, 3)), "lower than 5"),
        ("gone", None, "unreachable"),
    ];
    for (what, content, expect) in cases {
        let failures_before = metric_sum(
            &gw.metrics(),
            "meshgate_federation_refresh_failures_total",
            &[("trust_domain", "a.test")],
        );
        match content {
            Some(text) => serve(&text),
            None => drop(server.take()),
        }
        let p = eventually(Duration::from_secs(20), what, || {
            let p = peer(&g, "a.test");
            p["last_error"]
                .as_str()
                .is_some_and(|e| e.contains(expect))
                .then_some(p)
        });
        assert_eq!(p["sequence"], 5, "{what}: {p}");
        assert!(p["last_refresh"].is_string(), "{what}: {p}");
        assert!(
            p["consecutive_failures"].as_u64().unwrap_or(0) >= 1,
            "{what}: {p}"
        );
        eventually(Duration::from_secs(10), "the failure on /metrics", || {
            let m = gw.metrics();
            (metric_sum(
                &m,
                "meshgate_federation_refresh_failures_total",
                &[("trust_domain", "a.test")],
            ) > failures_before
                && metric_sum(
                    &m,
                    "meshgate_federation_refresh_ok",
                    &[("trust_domain", "a.test")],
                ) == 0.0
                && metric_sum(
                    &m,
                    "meshgate_federation_bundle_sequence",
                    &[("trust_domain", "a.test")],
                ) == 5.0)
                .then_some(())
        });
        assert_eq!(std::fs::read(&pem_path).expect("pem"), good_pem, "{what}");
        assert_eq!(call(), (0, "still trusted".to_owned()), "{what}");
        // `trust refresh` reports the failure too (exit 1).
        let out = run(&["trust", "refresh", "--state-dir", s(&g)]);
        assert_eq!(out.status.code(), Some(1), "{what}");
        assert!(
            gw.log().contains("the last good bundle stays in force"),
            "{what}"
        );
    }
    // The endpoint comes back with a higher sequence: accepted, the error clears.
    serve(&bundle_doc(&a, 6));
    let _server = eventually(Duration::from_secs(30), "s_server back on its port", || {
        s_server(&www, port, &ep_cert, &ep_key)
    });
    eventually(Duration::from_secs(20), "recovery", || {
        let p = peer(&g, "a.test");
        (p["sequence"] == 6 && p["last_error"].is_null()).then_some(())
    });
    eventually(Duration::from_secs(10), "recovery on /metrics", || {
        (metric_sum(
            &gw.metrics(),
            "meshgate_federation_refresh_ok",
            &[("trust_domain", "a.test")],
        ) == 1.0)
            .then_some(())
    });
}

#[test]
fn bundle_import_never_merges_domains() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let t = tmp.path();
    let (a, b) = (t.join("a"), t.join("b"));
    ca_init(&a, "a.test", &[]);
    ca_init(&b, "b.test", &[]);
    let a_pem = t.join("a.pem");
    ok(&[
        "bundle",
        "export",
        "--state-dir",
        s(&a),
        "--format",
        "pem",
        "--out",
        s(&a_pem),
    ]);
    let a_json = t.join("a.json");
    ok(&[
        "bundle",
        "export",
        "--state-dir",
        s(&a),
        "--format",
        "spiffe",
        "--out",
        s(&a_json),
    ]);
    // The CA certificate names a.test: importing it as another domain is refused.
    let wrong = run(&[
        "bundle",
        "import",
        "--state-dir",
        s(&b),
        "--trust-domain",
        "x.test",
        s(&a_json),
    ]);
    assert_eq!(wrong.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("another trust domain"));
    // Importing into the CA's own domain is refused.
    let own = run(&[
        "bundle",
        "import",
        "--state-dir",
        s(&b),
        "--trust-domain",
        "b.test",
        s(&a_pem),
    ]);
    assert_eq!(own.status.code(), Some(64));
    // PEM and SPIFFE both import; the domain shows up as static.
    ok(&[
        "bundle",
        "import",
        "--state-dir",
        s(&b),
        "--trust-domain",
        "a.test",
        "--format",
        "pem",
        s(&a_pem),
    ]);
    let p = peer(&b, "a.test");
    assert_eq!(p["profile"], "static");
    assert_eq!(p["authorities"], 1);
    ok(&[
        "bundle",
        "import",
        "--state-dir",
        s(&b),
        "--trust-domain",
        "a.test",
        s(&a_json),
    ]);
    assert_eq!(peer(&b, "a.test")["sequence"], 1);
    assert_eq!(
        std::fs::read_to_string(b.join("trust/a.test/bundle.pem")).expect("pem"),
        std::fs::read_to_string(&a_pem).expect("pem")
    );
    // The local bundle is untouched: one authority, b.test's.
    let own: serde_json::Value = serde_json::from_str(&ok(&[
        "bundle",
        "export",
        "--state-dir",
        s(&b),
        "--format",
        "spiffe",
    ]))
    .expect("json");
    assert_eq!(own["keys"].as_array().expect("keys").len(), 1);
    ok(&["trust", "remove", "--state-dir", s(&b), "a.test"]);
    assert!(trust_list(&b).as_array().expect("array").is_empty());
}

#[test]
fn ca_serve_mounts_the_bundle_endpoint() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let t = tmp.path();
    let (a, b) = (t.join("a"), t.join("b"));
    ca_init(&a, "a.test", &[]);
    let mut child = Command::new(bin())
        .args([
            "ca",
            "serve",
            "--state-dir",
            s(&a),
            "--listen",
            "127.0.0.1:0",
            "--bundle-listen",
            "127.0.0.1:0",
            "--no-audit-file",
        ])
        .env_remove("MESHGATE_STATE_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("ca serve");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let _server = Proc(child);
    let mut line = String::new();
    out.read_line(&mut line).expect("line 1");
    assert!(line.starts_with("listening on https://"), "{line}");
    line.clear();
    out.read_line(&mut line).expect("line 2");
    // "bundle endpoint on https://127.0.0.1:PORT as spiffe://a.test/meshgate/bundle-endpoint"
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        words.get(5),
        Some(&"spiffe://a.test/meshgate/bundle-endpoint"),
        "{line}"
    );
    let url = words[3].to_owned();
    let boot = t.join("a.json");
    ok(&[
        "bundle",
        "export",
        "--state-dir",
        s(&a),
        "--format",
        "spiffe",
        "--out",
        s(&boot),
    ]);
    ca_init(&b, "b.test", &[]);
    ok(&[
        "trust",
        "add",
        "--state-dir",
        s(&b),
        "--trust-domain",
        "a.test",
        "--endpoint",
        &url,
        "--profile",
        "https_spiffe",
        "--bootstrap-bundle",
        s(&boot),
    ]);
    let p = peer(&b, "a.test");
    assert_eq!(p["sequence"], 1, "{p}");
    assert!(p["last_error"].is_null(), "{p}");
    // A bootstrap bundle of the wrong domain cannot authenticate the endpoint: refused at add.
    let c = t.join("c");
    ca_init(&c, "c.test", &[]);
    let c_pem = t.join("c.pem");
    ok(&[
        "bundle",
        "export",
        "--state-dir",
        s(&c),
        "--format",
        "pem",
        "--out",
        s(&c_pem),
    ]);
    let bad = run(&[
        "trust",
        "add",
        "--state-dir",
        s(&c),
        "--trust-domain",
        "a.test",
        "--endpoint",
        &url,
        "--profile",
        "https_spiffe",
        "--bootstrap-bundle",
        s(&c_pem),
    ]);
    assert_eq!(
        bad.status.code(),
        Some(64),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}
