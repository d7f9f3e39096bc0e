//! `[[policies]]` through the real binary: who may call what, decided before routing.
//!
//! - an `https` mTLS listener trusting two trust domains: only `example.test` callers are
//!   allowed; `/admin/` (however the path is spelled) and DELETE are denied; `/audit/` is
//!   audited. curl over HTTP/1.1 and HTTP/2; the origin counts what reaches it.
//! - a `tls` listener (L4): a connection of the wrong trust domain is closed after the
//!   handshake without an upstream connection.
//! - the refusals show in `meshgate_authz_denied_total`, in the access log
//!   (`response_code_details`) and, for audit policies, in the `meshgate::audit` log; a reload
//!   that drops the deny policy lets `/admin/` through.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

use meshgate_testkit::http::{Resp, curl};
use meshgate_testkit::pki::{Leaf, TestPki};
use meshgate_testkit::tlsload::{self, Versions};
use meshgate_testkit::{EchoServer, HttpUpstream, Meshgate, free_port, metric_sum, wait_until};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_meshgate"))
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

const DENY_ADMIN: &str = r#"
[[policies]]
name = "no-admin"
listener = "web"
action = "deny"
[[policies.rules]]
path = { prefix = "/admin/" }
[[policies.rules]]
methods = ["DELETE"]
"#;

struct Setup {
    pki: TestPki,
    origin: HttpUpstream,
    echo: EchoServer,
    admin: SocketAddr,
    web: SocketAddr,
    l4: SocketAddr,
    log: PathBuf,
    config_head: String,
}

impl Setup {
    fn new() -> Setup {
        let pki = TestPki::new();
        let (cert, key) = pki.gateway();
        let example = pki.bundle(&pki.example, "example-bundle");
        let other = pki.bundle(&pki.other, "other-bundle");
        let origin = HttpUpstream::start("origin");
        let echo = EchoServer::start();
        let (admin, web, l4) = (addr(free_port()), addr(free_port()), addr(free_port()));
        let log = pki.dir.path().join("access.log");
        let tls = format!(
            r#"[listeners.tls]
certificates = [{{ cert = "{}", key = "{}" }}]
client_auth = "required"
trust_bundles = [{{ trust_domain = "example.test", bundle = "{}" }}, {{ trust_domain = "other.test", bundle = "{}" }}]
"#,
            s(&cert),
            s(&key),
            s(&example),
            s(&other)
        );
        let config_head = format!(
            r#"version = 1
[admin]
address = "{admin}"
[access_log]
path = "{log}"

[[listeners]]
name = "web"
address = "{web}"
protocol = "https"
{tls}
[[listeners]]
name = "l4"
address = "{l4}"
protocol = "tls"
{tls}
[[routes]]
name = "web"
listener = "web"
cluster = "origin"

[[routes]]
name = "l4"
listener = "l4"
cluster = "echo"

[[clusters]]
name = "origin"
endpoints = ["{origin}"]

[[clusters]]
name = "echo"
endpoints = ["{echo}"]

[[policies]]
name = "example-only"
listener = "web"
action = "allow"
rules = [{{ peer = {{ trust_domains = ["example.test"] }} }}]

[[policies]]
name = "example-only-l4"
listener = "l4"
action = "allow"
rules = [{{ peer = {{ trust_domains = ["example.test"] }} }}]

[[policies]]
name = "audit-audit"
listener = "web"
action = "audit"
rules = [{{ path = {{ prefix = "/audit/" }} }}]
"#,
            log = s(&log),
            origin = origin.addr,
            echo = echo.addr,
        );
        Setup {
            pki,
            origin,
            echo,
            admin,
            web,
            l4,
            log,
            config_head,
        }
    }

    /// curl to the web listener as `gateway.example.test` with client `(cert, key)`.
    fn call(&self, client: &(PathBuf, PathBuf), extra: &[&str], path: &str) -> Resp {
        let root = self.pki.dir.path().join("example-bundle.pem");
        let resolve = format!("gateway.example.test:{}:127.0.0.1", self.web.port());
        let url = format!("https://gateway.example.test:{}{path}", self.web.port());
        let mut args = vec![
            "--path-as-is",
            "--resolve",
            &resolve,
            "--cacert",
            s(&root),
            "--cert",
            s(&client.0),
            "--key",
            s(&client.1),
        ];
        args.extend_from_slice(extra);
        args.push(&url);
        curl(&args)
    }

    fn records(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

/// A TLS connection to the l4 listener presenting `client`; `Ok` when it echoed.
fn l4_ping(setup: &Setup, client: &Leaf) -> anyhow::Result<()> {
    let config = tlsload::client_config(
        &[setup.pki.example.root_der()],
        Some(client),
        Versions::Both,
        rustls::client::Resumption::disabled(),
    )?;
    let mut tls = tlsload::connect(setup.l4, config, "gateway.example.test")?;
    tlsload::echo(&mut tls, b"ping")
}

#[test]
fn policies_allow_deny_and_audit_requests_and_connections() {
    let setup = Setup::new();
    let config = format!("{}{DENY_ADMIN}", setup.config_head);
    let mg = Meshgate::start(bin(), &config, setup.admin).expect("gateway starts");
    let alice_leaf = setup.pki.example.svid("/ns/web/sa/alice").expect("svid");
    let mallory_leaf = setup.pki.other.svid("/ns/x/sa/mallory").expect("svid");
    let alice = alice_leaf
        .write_pem(setup.pki.dir.path(), "alice")
        .expect("write");
    let mallory = mallory_leaf
        .write_pem(setup.pki.dir.path(), "mallory")
        .expect("write");
    let reached = || setup.origin.requests.load(Ordering::SeqCst);

    // Allowed: an example.test caller, HTTP/1.1 and HTTP/2.
    for proto in ["--http1.1", "--http2"] {
        let r = setup.call(&alice, &[proto], "/hello");
        assert_eq!(r.status, 200, "{proto}: {r:?}\n{}", mg.log());
    }
    assert_eq!(reached(), 2);

    // Denied by the deny policy, however the path is spelled, on both protocols.
    for proto in ["--http1.1", "--http2"] {
        for path in [
            "/admin/users",
            "/%61dmin/users",
            "/x/../admin/users",
            "//admin//users",
        ] {
            let r = setup.call(&alice, &[proto], path);
            assert_eq!(r.status, 403, "{proto} {path}: {r:?}");
            assert_eq!(r.body, "RBAC: access denied", "{proto} {path}");
        }
        let r = setup.call(&alice, &[proto, "-X", "DELETE"], "/hello");
        assert_eq!(r.status, 403, "{proto} DELETE: {r:?}");
    }
    // Not an admin path: the prefix is matched on the normalised path, not as a substring.
    assert_eq!(
        setup.call(&alice, &["--http1.1"], "/administrator").status,
        200
    );
    assert_eq!(reached(), 3, "a refused request reached the origin");

    // Refused because no allow policy matched: a caller of the other trust domain.
    let r = setup.call(&mallory, &["--http1.1"], "/hello");
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(reached(), 3);

    // Audit: logged with the decision, and the request still goes through.
    assert_eq!(setup.call(&alice, &["--http1.1"], "/audit/x").status, 200);
    assert_eq!(setup.call(&mallory, &["--http1.1"], "/audit/y").status, 403);
    let audited = |decision: &str, peer: &str, path: &str| {
        mg.log().lines().any(|l| {
            l.contains("meshgate::audit")
                && l.contains("policy=audit-audit")
                && l.contains(&format!("decision=\"{decision}\""))
                && l.contains(&format!("peer=\"{peer}\""))
                && l.contains(&format!("path=\"{path}\""))
        })
    };
    assert!(
        wait_until(Duration::from_secs(5), || {
            audited("allow", "spiffe://example.test/ns/web/sa/alice", "/audit/x")
                && audited("deny", "spiffe://other.test/ns/x/sa/mallory", "/audit/y")
        }),
        "audit lines missing:\n{}",
        mg.log()
    );
    assert!(!audited(
        "allow",
        "spiffe://example.test/ns/web/sa/alice",
        "/hello"
    ));

    // L4: the other trust domain's connection is closed before an upstream is chosen.
    let before = setup.echo.accepted.load(Ordering::SeqCst);
    l4_ping(&setup, &alice_leaf).expect("alice's connection echoes");
    assert!(
        l4_ping(&setup, &mallory_leaf).is_err(),
        "mallory's connection was served"
    );
    assert_eq!(setup.echo.accepted.load(Ordering::SeqCst), before + 1);

    // Counted per policy, and in the access log with Envoy's details.
    let metrics = mg.metrics();
    let denied = |listener: &str, policy: &str| {
        metric_sum(
            &metrics,
            "meshgate_authz_denied_total",
            &[("listener", listener), ("policy", policy)],
        )
    };
    assert_eq!(denied("web", "no-admin"), 10.0, "{metrics}");
    assert_eq!(denied("web", "-"), 2.0, "{metrics}");
    assert_eq!(denied("l4", "-"), 1.0, "{metrics}");
    let mut records = Vec::new();
    assert!(wait_until(Duration::from_secs(5), || {
        records = setup.records();
        records
            .iter()
            .filter(|r| r["response_code_details"].is_string())
            .count()
            >= 13
    }));
    let details: Vec<&str> = records
        .iter()
        .filter_map(|r| r["response_code_details"].as_str())
        .collect();
    assert_eq!(
        details
            .iter()
            .filter(|d| **d == "rbac_access_denied_matched_policy[no-admin]")
            .count(),
        10,
        "{details:?}"
    );
    assert_eq!(
        details
            .iter()
            .filter(|d| **d == "rbac_access_denied_matched_policy[none]")
            .count(),
        3,
        "{details:?}"
    );

    // A reload without the deny policy lets /admin/ through, on new connections.
    std::fs::write(&mg.config_path, &setup.config_head).expect("write config");
    let out = Command::new(bin())
        .args(["reload", "--wait", "--admin", &mg.admin.to_string()])
        .output()
        .expect("meshgate reload");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        wait_until(Duration::from_secs(10), || setup
            .call(&alice, &["--http1.1"], "/admin/users")
            .status
            == 200),
        "the reloaded config did not let /admin/ through"
    );
}
