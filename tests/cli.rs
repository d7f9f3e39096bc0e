//! The operator's CLI: config validation exit codes and messages, status, version, completions.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};

use meshgate_testkit::{EchoServer, Meshgate, free_port, tcp_config};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_meshgate"))
}

fn meshgate(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .output()
        .expect("run meshgate")
}

fn validate(toml: &str) -> (i32, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = dir.path().join("bad.toml");
    std::fs::write(&f, toml).expect("write");
    let out = meshgate(&["config", "validate", f.to_str().expect("utf8 path")]);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const GOOD: &str = r#"version = 1
[[listeners]]
name = "in"
address = "127.0.0.1:15001"
protocol = "tcp"
[[routes]]
name = "r"
listener = "in"
cluster = "c"
[[clusters]]
name = "c"
endpoints = ["127.0.0.1:15002"]
"#;

#[test]
fn valid_config_exits_zero() {
    let (code, err) = validate(GOOD);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn every_bad_config_case_exits_64_naming_the_field() {
    let cases: &[(&str, String, &[&str])] = &[
        (
            "unknown field",
            GOOD.replace("protocol = \"tcp\"", "protocol = \"tcp\"\nprotocl = 1"),
            &["listeners[0]", "protocl"],
        ),
        (
            "bad address",
            GOOD.replace("127.0.0.1:15002", "10.0.0.1"),
            &["clusters[0].endpoints[0]"],
        ),
        (
            "duplicate names",
            format!("{GOOD}[[clusters]]\nname = \"c\"\nendpoints = [\"127.0.0.1:1\"]\n"),
            &["clusters[1].name", "c"],
        ),
        (
            "missing cluster",
            GOOD.replace("cluster = \"c\"", "cluster = \"nope\""),
            &["routes[0].cluster", "nope"],
        ),
        (
            "empty cluster",
            GOOD.replace("endpoints = [\"127.0.0.1:15002\"]", "endpoints = []"),
            &["clusters[0].endpoints"],
        ),
        (
            "zero weight",
            GOOD.replace(
                "cluster = \"c\"",
                "weighted_clusters = [{ cluster = \"c\", weight = 0 }]",
            ),
            &["routes[0].weighted_clusters[0].weight"],
        ),
    ];
    for (what, toml, needles) in cases {
        let (code, err) = validate(toml);
        assert_eq!(code, 64, "{what}: exit code; stderr:\n{err}");
        assert!(
            err.contains("bad.toml"),
            "{what}: message names the file:\n{err}"
        );
        for n in *needles {
            assert!(
                err.contains(n),
                "{what}: message should contain {n:?}:\n{err}"
            );
        }
    }
}

#[test]
fn all_errors_are_reported_together() {
    let toml = GOOD
        .replace("127.0.0.1:15002", "nonsense")
        .replace("cluster = \"c\"", "cluster = \"missing\"");
    let (code, err) = validate(&toml);
    assert_eq!(code, 64);
    assert!(
        err.contains("clusters[0].endpoints[0]") && err.contains("routes[0].cluster"),
        "{err}"
    );
}

#[test]
fn run_with_bad_config_exits_64_and_starts_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = dir.path().join("bad.toml");
    std::fs::write(&f, GOOD.replace("version = 1", "version = 7")).expect("write");
    let out = meshgate(&["run", "--config", f.to_str().expect("utf8")]);
    assert_eq!(
        out.status.code(),
        Some(64),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("version"));
}

#[test]
fn shipped_examples_and_default_are_valid() {
    // The TLS examples need their certificates: make them with the shipped script into a temp
    // copy of the examples directory, as an operator would.
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples");
    let dir = tempfile::tempdir().expect("tempdir");
    let status = Command::new("sh")
        .arg(examples.join("certs/make.sh"))
        .arg(dir.path().join("certs"))
        .status()
        .expect("run make.sh (needs openssl)");
    assert!(status.success(), "config/examples/certs/make.sh failed");
    let mut checked = 0;
    for e in std::fs::read_dir(&examples).expect("examples dir") {
        let p = e.expect("entry").path();
        if p.extension().is_none_or(|x| x != "toml") {
            continue;
        }
        let copy = dir.path().join(p.file_name().expect("file name"));
        std::fs::copy(&p, &copy).expect("copy");
        let out = meshgate(&["config", "validate", copy.to_str().expect("utf8")]);
        assert!(
            out.status.success(),
            "{}: {}",
            p.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        checked += 1;
    }
    assert!(checked >= 4, "only {checked} examples found");
    let out = meshgate(&["config", "default"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("[[listeners]]"));
}

#[test]
fn version_and_completions() {
    let out = meshgate(&["version", "-o", "json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    let out = meshgate(&["completions", "bash"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("meshgate"));
}

#[test]
fn status_unreachable_exits_69() {
    let port = free_port();
    let out = meshgate(&["status", "--admin", &format!("127.0.0.1:{port}")]);
    assert_eq!(
        out.status.code(),
        Some(69),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the admin API"));
}

#[test]
fn admin_endpoints_and_status_command() {
    let echo = EchoServer::start();
    let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let listen: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let mg =
        Meshgate::start(bin(), &tcp_config(admin, listen, &[echo.addr], ""), admin).expect("start");

    assert_eq!(mg.get("/live").expect("live").0, 200);
    assert_eq!(mg.get("/ready").expect("ready").0, 200);
    assert_eq!(mg.get("/nope").expect("404").0, 404);
    let (code, metrics) = mg.get("/metrics").expect("metrics");
    assert_eq!(code, 200);
    for name in [
        "meshgate_build_info",
        "meshgate_listener_connections_accepted_total",
        "meshgate_listener_connections_active",
        "meshgate_listener_received_bytes_total",
        "meshgate_listener_connection_limit_rejections_total",
        "meshgate_cluster_upstream_connect_failures_total",
    ] {
        assert!(metrics.contains(name), "missing {name} in:\n{metrics}");
    }
    let (code, dump) = mg.get("/config_dump").expect("config_dump");
    assert_eq!(code, 200);
    let dump: serde_json::Value = serde_json::from_str(&dump).expect("json");
    assert_eq!(dump["listeners"][0]["name"], "in");
    assert_eq!(dump["clusters"][0]["endpoints"][0], echo.addr.to_string());

    let admin_arg = admin.to_string();
    let out = meshgate(&["status", "--admin", &admin_arg, "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(st["ready"], true);
    assert_eq!(st["shards"], 2);
    assert_eq!(st["listeners"][0]["address"], listen.to_string());
    assert_eq!(st["shard_stats"].as_array().map(Vec::len), Some(2));
    // Idle time is counted when a shard wakes from a park: give both shards a moment.
    let idle_both = || {
        let out = meshgate(&["status", "--admin", &admin_arg, "-o", "json"]);
        let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        (0..2).all(|i| st["shard_stats"][i]["idle_seconds"].as_f64() > Some(0.0))
    };
    assert!(
        meshgate_testkit::wait_until(std::time::Duration::from_secs(5), idle_both),
        "a shard never reported idle time: {st}"
    );
    let out = meshgate(&["status", "--admin", &admin_arg]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("ready") && text.contains("in") && text.contains(&listen.to_string()),
        "{text}"
    );
    assert!(text.contains("shard 1: 0 connection(s)"), "{text}");
}

#[test]
fn admin_over_unix_socket() {
    let echo = EchoServer::start();
    let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let listen: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let sock_dir = tempfile::tempdir().expect("tempdir");
    let sock = sock_dir.path().join("admin.sock");
    let cfg = tcp_config(admin, listen, &[echo.addr], "").replace(
        &format!("address = \"{admin}\"\n"),
        &format!(
            "address = \"{admin}\"\nunix_socket = \"{}\"\n",
            sock.display()
        ),
    );
    assert!(cfg.contains("unix_socket"));
    let mut mg = Meshgate::start(bin(), &cfg, admin).expect("start");
    let out = meshgate(&[
        "status",
        "--admin",
        &format!("unix:{}", sock.display()),
        "-o",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(st["ready"], true);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&sock)
        .expect("socket exists")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o660);
    assert!(
        mg.terminate(std::time::Duration::from_secs(10))
            .expect("exit")
            .success()
    );
    assert!(!sock.exists(), "socket file removed at exit");
}

/// The README's first command: `meshgate run` with no config is a working HTTPS gateway with
/// its own local CA.
#[test]
fn embedded_default_serves_https_from_its_local_ca() {
    let state = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(bin())
        .args(["run", "--state-dir"])
        .arg(state.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let admin: SocketAddr = ([127, 0, 0, 1], 15000).into();
    let ready = meshgate_testkit::wait_until(std::time::Duration::from_secs(20), || {
        matches!(meshgate_testkit::http_get(admin, "/ready"), Ok((200, _)))
    });
    let root = state.path().join("ca/root.pem");
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(&root)
        .arg("https://localhost:15443/")
        .output()
        .expect("curl");
    // What the gateway loaded, as an operator reads it (default admin address).
    let pc = |args: &[&str]| {
        let mut all = vec!["proxy-config"];
        all.extend_from_slice(args);
        meshgate(&all)
    };
    let listeners = pc(&["listeners", "-o", "json"]);
    let routes = pc(&["routes", "--name", "welcome", "-o", "json"]);
    let endpoints = pc(&["endpoints", "--name", "echo", "-o", "json"]);
    let secrets = pc(&["secrets", "-o", "json"]);
    let secrets_table = pc(&["secrets"]);
    let unknown = pc(&["clusters", "--name", "no-such-cluster"]);
    let status_cmd = meshgate(&["status"]);
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let status = child.wait().expect("wait");
    let json = |o: &Output| -> serde_json::Value {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).expect("proxy-config -o json")
    };
    let names: Vec<_> = json(&listeners)
        .as_array()
        .expect("array")
        .iter()
        .map(|l| l["name"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(names, ["https", "http", "tcp-in"]);
    let routes = json(&routes);
    assert_eq!(routes.as_array().map(Vec::len), Some(1), "{routes}");
    assert_eq!(routes[0]["action"]["direct_response"]["status"], 200);
    assert_eq!(json(&endpoints)[0]["endpoint"], "127.0.0.1:15002");
    assert_eq!(json(&endpoints)[0]["healthy"], true);
    assert_eq!(json(&endpoints)[0]["weight"], 1);
    let secrets = json(&secrets);
    assert_eq!(secrets[0]["kind"], "cert", "{secrets}");
    assert_eq!(secrets[0]["uris"][0], "spiffe://meshgate.local/gateway");
    let table = String::from_utf8_lossy(&secrets_table.stdout);
    assert!(table.contains("spiffe://meshgate.local/gateway"), "{table}");
    let status_text = String::from_utf8_lossy(&status_cmd.stdout);
    assert!(
        status_text.contains("first to expire: spiffe://meshgate.local/gateway (cert)"),
        "{status_text}"
    );
    assert_eq!(unknown.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no-such-cluster"));
    let mut log = String::new();
    use std::io::Read;
    let _ = child.stderr.take().map(|mut e| e.read_to_string(&mut log));
    assert!(ready, "not ready:\n{log}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "meshgate is running\n",
        "{}\n{log}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(status.success(), "{log}");
}

#[test]
fn check_names_busy_ports_and_soon_expiring_certificates_with_fixes() {
    use meshgate_testkit::pki::TrustDomainCa;
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TrustDomainCa::new("example.test", false).expect("ca");
    // A valid SVID lives a day: inside the 7-day warning window.
    let (cert, key) = ca
        .svid("/gateway")
        .expect("svid")
        .write_pem(dir.path(), "gw")
        .expect("write");
    let bundle = ca.write_bundle(dir.path(), "bundle.pem").expect("bundle");
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy_addr = busy.local_addr().expect("addr");
    let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let config = format!(
        r#"version = 1
[admin]
address = "{admin}"
[[listeners]]
name = "in"
address = "{busy_addr}"
protocol = "tls"
[listeners.tls]
certificates = [{{ cert = "{}", key = "{}" }}]
client_auth = "required"
trust_bundles = [{{ trust_domain = "example.test", bundle = "{}" }}]
[[routes]]
name = "r"
listener = "in"
cluster = "c"
[[clusters]]
name = "c"
endpoints = ["127.0.0.1:9"]
"#,
        cert.display(),
        key.display(),
        bundle.display()
    );
    let path = dir.path().join("meshgate.toml");
    std::fs::write(&path, config).expect("write config");
    let path = path.to_str().expect("utf-8");

    let out = meshgate(&["check", "--config", path, "-o", "json"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(doc["ok"], false);
    let item = |check: &str| -> serde_json::Value {
        doc["checks"]
            .as_array()
            .expect("checks")
            .iter()
            .find(|i| i["check"] == check)
            .cloned()
            .unwrap_or_else(|| panic!("no `{check}` in {doc}"))
    };
    let port = item(&format!("port {busy_addr}"));
    assert_eq!(port["result"], "fail", "{port}");
    assert!(
        port["hint"]
            .as_str()
            .unwrap_or_default()
            .contains("ss -ltnp"),
        "{port}"
    );
    assert_eq!(item(&format!("port {admin}"))["result"], "pass");
    let leaf = item("listener in certificate");
    assert_eq!(leaf["result"], "warn", "{leaf}");
    assert!(
        leaf["hint"].as_str().unwrap_or_default().contains("renew"),
        "{leaf}"
    );
    assert_eq!(item("listener in bundle example.test")["result"], "pass");
    assert_eq!(item("config")["result"], "pass");

    // Once the port is free only the warning is left: exit 0, and the table says WARN + fix.
    drop(busy);
    let out = meshgate(&["check", "--config", path]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{table}");
    assert!(
        table.contains("WARN") && table.contains("fix: renew"),
        "{table}"
    );

    // A config that does not load: exit 64 with the errors.
    std::fs::write(
        dir.path().join("bad.toml"),
        "version = 1\n[[listeners]]\nname = 1\n",
    )
    .expect("write");
    let bad = dir.path().join("bad.toml");
    let out = meshgate(&["check", "--config", bad.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stdout).contains("listeners[0].name"));
}
