//! Endpoint choice, health checks and outlier detection, through the real gateway process:
//! weighted round robin, least request, Maglev on a header (and across a reload), HTTP and TCP
//! health checks, ejection of an endpoint answering 5xx, and 503 `UH` when nothing is left.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use meshgate_testkit::{
    EchoServer, HttpUpstream, Meshgate, free_port, http_request, keep_alive_get, metric_sum,
    wait_until,
};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_meshgate"))
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// An `http` listener routing everything to cluster `app`, whose table body is `cluster`
/// (endpoints and policy lines); `extra` is appended.
fn config(admin: SocketAddr, http: SocketAddr, cluster: &str, extra: &str) -> String {
    format!(
        r#"version = 1

[admin]
address = "{admin}"

[runtime]
cores = 2
drain_timeout = "2s"

[[listeners]]
name = "web"
address = "{http}"
protocol = "http"

[[routes]]
name = "all"
listener = "web"
cluster = "app"

[[clusters]]
name = "app"
connect_timeout = "1s"
{cluster}
{extra}"#
    )
}

fn start(cluster: &str, extra: &str) -> (Meshgate, SocketAddr) {
    let (admin, http) = (addr(free_port()), addr(free_port()));
    let mg = Meshgate::start(bin(), &config(admin, http, cluster, extra), admin).expect("start");
    (mg, http)
}

fn connect(a: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(a).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s
}

/// Which upstream (by body) answered `n` requests on one keep-alive connection.
fn counts(http: SocketAddr, n: usize, headers: &[(&str, &str)]) -> HashMap<String, usize> {
    let mut s = connect(http);
    let mut out = HashMap::new();
    for _ in 0..n {
        let (_, _, body) = keep_alive_get(&mut s, "/", headers);
        *out.entry(body).or_default() += 1;
    }
    out
}

fn healthy(mg: &Meshgate, endpoint: SocketAddr) -> f64 {
    metric_sum(
        &mg.metrics(),
        "meshgate_endpoint_healthy",
        &[("endpoint", &endpoint.to_string())],
    )
}

#[test]
fn endpoint_weights_split_1_to_3() {
    let (a, b) = (HttpUpstream::start("a"), HttpUpstream::start("b"));
    let (mg, http) = start(
        &format!(
            "endpoints = [\"{}\", {{ address = \"{}\", weight = 3 }}]",
            a.addr, b.addr
        ),
        "",
    );
    // Several connections, so both shards balance.
    let mut total: HashMap<String, usize> = HashMap::new();
    for _ in 0..8 {
        for (k, v) in counts(http, 500, &[]) {
            *total.entry(k).or_default() += v;
        }
    }
    let b_share = total.get("b").copied().unwrap_or(0) as f64 / 4000.0;
    assert!(
        (b_share - 0.75).abs() < 0.02,
        "b got {b_share} of 4000 ({total:?})"
    );
    let (_, clusters) = mg.get("/clusters").expect("/clusters");
    let v: serde_json::Value = serde_json::from_str(&clusters).expect("json");
    assert_eq!(v[1]["weight"], 3, "{v}");
    assert_eq!(v[1]["healthy"], true, "{v}");
}

#[test]
fn least_request_sends_most_requests_away_from_a_slow_endpoint() {
    let fast = HttpUpstream::start("fast");
    let slow = HttpUpstream::start_with_delay("slow", Duration::from_millis(150));
    let (_mg, http) = start(
        &format!(
            "endpoints = [\"{}\", \"{}\"]\nbalance = \"least_request\"",
            fast.addr, slow.addr
        ),
        "",
    );
    let clients: Vec<_> = (0..8)
        .map(|_| std::thread::spawn(move || counts(http, 40, &[])))
        .collect();
    let mut total: HashMap<String, usize> = HashMap::new();
    for c in clients {
        for (k, v) in c.join().expect("client") {
            *total.entry(k).or_default() += v;
        }
    }
    let slow_n = total.get("slow").copied().unwrap_or(0);
    assert_eq!(total.values().sum::<usize>(), 320, "{total:?}");
    // Round robin would give the slow endpoint half (160); here it gets a request only when
    // it has none in flight (about one per 150 ms per shard).
    assert!(slow_n < 80, "slow endpoint got {slow_n} of 320 ({total:?})");
}

#[test]
fn maglev_keeps_a_header_on_one_endpoint_and_a_removal_moves_about_one_nth() {
    let ups: Vec<HttpUpstream> = (0..4)
        .map(|i| HttpUpstream::start(&format!("u{i}")))
        .collect();
    let list = |ups: &[&HttpUpstream]| {
        format!(
            "endpoints = [{}]\nbalance = \"maglev\"\nhash_on = {{ header = \"x-user\" }}",
            ups.iter()
                .map(|u| format!("\"{}\"", u.addr))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let all: Vec<&HttpUpstream> = ups.iter().collect();
    let (admin, http) = (addr(free_port()), addr(free_port()));
    let mg = Meshgate::start(bin(), &config(admin, http, &list(&all), ""), admin).expect("start");
    let users: Vec<String> = (0..400).map(|i| format!("user-{i}")).collect();
    let map = |conns: usize| -> HashMap<String, String> {
        let mut streams: Vec<TcpStream> = (0..conns).map(|_| connect(http)).collect();
        users
            .iter()
            .enumerate()
            .map(|(i, u)| {
                let s = &mut streams[i % conns];
                let (status, _, body) = keep_alive_get(s, "/", &[("x-user", u)]);
                assert_eq!(status, 200);
                (u.clone(), body)
            })
            .collect()
    };
    let before = map(1);
    // The same keys from other connections (either shard) land on the same endpoints.
    assert_eq!(map(4), before);
    let mut per: HashMap<&str, usize> = HashMap::new();
    for v in before.values() {
        *per.entry(v.as_str()).or_default() += 1;
    }
    assert_eq!(per.len(), 4, "every endpoint gets keys: {per:?}");
    // Without the header: still served (round robin).
    assert_eq!(counts(http, 8, &[]).values().sum::<usize>(), 8);

    // Reload without u2: its keys move, almost no other key does.
    let rest: Vec<&HttpUpstream> = ups.iter().filter(|u| u.name != "u2").collect();
    std::fs::write(&mg.config_path, config(admin, http, &list(&rest), "")).expect("write");
    let (code, body) = http_request(admin, "POST", "/reload", Some(b"")).expect("reload");
    assert_eq!(code, 200, "{body}");
    let after = map(2);
    let on_removed = before.values().filter(|v| *v == "u2").count();
    let moved_others = users
        .iter()
        .filter(|u| before[*u] != "u2" && before[*u] != after[*u])
        .count();
    assert!(after.values().all(|v| v != "u2"));
    assert!(
        (60..=140).contains(&on_removed),
        "u2 had {on_removed} of 400 keys"
    );
    assert!(
        moved_others <= 400 / 20,
        "{moved_others} keys of the remaining endpoints moved"
    );
}

#[test]
fn http_health_check_takes_an_endpoint_out_and_back() {
    let (a, b) = (HttpUpstream::start("a"), HttpUpstream::start("b"));
    let (mg, http) = start(
        &format!("endpoints = [\"{}\", \"{}\"]", a.addr, b.addr),
        "[clusters.health_check]\nkind = \"http\"\npath = \"/healthz\"\ninterval = \"200ms\"\n\
         timeout = \"150ms\"\nunhealthy_threshold = 2\nhealthy_threshold = 2\n",
    );
    assert!(wait_until(Duration::from_secs(5), || {
        metric_sum(
            &mg.metrics(),
            "meshgate_endpoint_health_checks_total",
            &[("endpoint", &b.addr.to_string()), ("result", "passed")],
        ) >= 1.0
    }));
    assert_eq!(counts(http, 20, &[]).len(), 2);
    b.set_status(500);
    let failed_at = Instant::now();
    assert!(
        wait_until(Duration::from_secs(5), || healthy(&mg, b.addr) == 0.0),
        "b never marked unhealthy; log:\n{}",
        mg.log()
    );
    // interval x threshold = 400 ms, plus a check in progress and the scrape.
    let took = failed_at.elapsed();
    assert!(took < Duration::from_millis(1200), "took {took:?}");
    let seen = b.requests.load(std::sync::atomic::Ordering::Acquire);
    let got = counts(http, 100, &[]);
    assert_eq!(got.get("a"), Some(&100), "{got:?}");
    // Only health checks reached b meanwhile (at most a few).
    let (_, clusters) = mg.get("/clusters").expect("/clusters");
    let v: serde_json::Value = serde_json::from_str(&clusters).expect("json");
    assert_eq!(v[1]["healthy"], false, "{v}");
    assert_eq!(v[0]["healthy"], true, "{v}");
    let out = std::process::Command::new(bin())
        .args([
            "proxy-config",
            "endpoints",
            "--admin",
            &mg.admin.to_string(),
        ])
        .output()
        .expect("proxy-config");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("UNHEALTHY"), "{table}");
    assert!(b.requests.load(std::sync::atomic::Ordering::Acquire) < seen + 5);

    b.set_status(200);
    assert!(wait_until(Duration::from_secs(5), || healthy(&mg, b.addr) == 1.0));
    assert_eq!(counts(http, 20, &[]).get("b"), Some(&10));
}

#[test]
fn outlier_detection_ejects_an_endpoint_answering_5xx_and_brings_it_back() {
    let (a, b) = (HttpUpstream::start("a"), HttpUpstream::start("b"));
    let (mg, http) = start(
        &format!("endpoints = [\"{}\", \"{}\"]", a.addr, b.addr),
        "[clusters.outlier_detection]\nconsecutive_5xx = 3\nbase_ejection_time = \"1s\"\n\
         interval = \"100ms\"\nmax_ejection_percent = 50\n",
    );
    b.set_status(503);
    // One connection: one shard, strict alternation until b is out after its 3rd 503.
    let mut s = connect(http);
    let mut statuses = Vec::new();
    for _ in 0..40 {
        statuses.push(keep_alive_get(&mut s, "/", &[]).0);
    }
    assert_eq!(
        statuses.iter().filter(|&&c| c == 503).count(),
        3,
        "{statuses:?}"
    );
    let m = mg.metrics();
    assert_eq!(
        metric_sum(
            &m,
            "meshgate_endpoint_ejections_total",
            &[("endpoint", &b.addr.to_string())]
        ),
        1.0,
        "{m}"
    );
    assert_eq!(healthy(&mg, b.addr), 0.0);
    b.set_status(200);
    // Back after the 1 s ejection.
    let ejected_at = Instant::now();
    assert!(wait_until(Duration::from_secs(5), || healthy(&mg, b.addr) == 1.0));
    assert!(ejected_at.elapsed() < Duration::from_secs(2));
    assert_eq!(counts(http, 20, &[]).get("b"), Some(&10));
}

#[test]
fn no_healthy_endpoint_is_503_uh_and_tcp_skips_unhealthy_endpoints() {
    let (a, b) = (HttpUpstream::start("a"), HttpUpstream::start("b"));
    let echo = EchoServer::start();
    let dead = addr(free_port());
    let (admin, http, tcp) = (addr(free_port()), addr(free_port()), addr(free_port()));
    let log_dir = tempfile::tempdir().expect("tempdir");
    let log_path = log_dir.path().join("access.log");
    let text = config(
        admin,
        http,
        &format!("endpoints = [\"{}\", \"{}\"]", a.addr, b.addr),
        &format!(
            r#"[clusters.health_check]
path = "/"
interval = "200ms"
timeout = "150ms"
unhealthy_threshold = 1

[[listeners]]
name = "tcp"
address = "{tcp}"
protocol = "tcp"

[[routes]]
name = "tcp"
listener = "tcp"
cluster = "echo"

[[clusters]]
name = "echo"
endpoints = ["{dead}", "{}"]
balance = "least_request"

[clusters.health_check]
interval = "200ms"
timeout = "150ms"
unhealthy_threshold = 1

[access_log]
path = "{}"
"#,
            echo.addr,
            log_path.display()
        ),
    );
    let mg = Meshgate::start(bin(), &text, admin).expect("start");
    assert!(
        wait_until(Duration::from_secs(5), || healthy(&mg, dead) == 0.0),
        "{}",
        mg.log()
    );
    // TCP: every connection reaches the live endpoint; no connect is even tried on the dead one.
    let failures = |mg: &Meshgate| {
        metric_sum(
            &mg.metrics(),
            "meshgate_cluster_upstream_connect_failures_total",
            &[("cluster", "echo")],
        )
    };
    let before = failures(&mg);
    for i in 0..20u8 {
        let mut s = connect(tcp);
        s.write_all(&[i; 64]).expect("write");
        let mut back = [0u8; 64];
        s.read_exact(&mut back).expect("echo");
        assert_eq!(back, [i; 64]);
    }
    assert_eq!(failures(&mg), before);

    a.set_status(500);
    b.set_status(500);
    assert!(wait_until(Duration::from_secs(5), || {
        healthy(&mg, a.addr) == 0.0 && healthy(&mg, b.addr) == 0.0
    }));
    let (status, body) = http_request(http, "GET", "/x", None).expect("request");
    assert_eq!(status, 503, "{body}");
    assert!(
        wait_until(Duration::from_secs(5), || {
            std::fs::read_to_string(&log_path)
                .unwrap_or_default()
                .lines()
                .any(|l| l.contains("\"response_flags\":\"UH\"") && l.contains("\"/x\""))
        }),
        "no UH record in:\n{}",
        std::fs::read_to_string(&log_path).unwrap_or_default()
    );
}

#[test]
fn tls_clusters_are_health_checked_over_tls_with_their_verification() {
    use meshgate_testkit::http::{TlsOrigin, nginx_or_skip};
    use meshgate_testkit::pki::{LeafSpec, TestPki};
    let Some(nginx) =
        nginx_or_skip("tls_clusters_are_health_checked_over_tls_with_their_verification")
    else {
        return;
    };
    let pki = TestPki::new();
    let (ocert, okey) = pki
        .example
        .leaf(&LeafSpec::svid("spiffe://example.test/origin"))
        .expect("origin cert")
        .write_pem(pki.dir.path(), "origin")
        .expect("write");
    let ca = pki.bundle(&pki.example, "ca");
    let origin = TlsOrigin::start(&nginx, &ocert, &okey, &ca);
    let (gcert, gkey) = pki.svid(&pki.example, "gateway-id", "/gateway");
    let cluster = |name: &str, id: &str| {
        format!(
            r#"
[[clusters]]
name = "{name}"
endpoints = ["{o}"]
[clusters.tls]
verify = {{ spiffe_ids = ["spiffe://example.test/{id}"] }}
trust_bundle = "{ca}"
identity = {{ cert = "{gcert}", key = "{gkey}" }}
[clusters.health_check]
path = "/healthz"
interval = "200ms"
timeout = "150ms"
unhealthy_threshold = 1
"#,
            o = origin.addr,
            ca = ca.display(),
            gcert = gcert.display(),
            gkey = gkey.display(),
        )
    };
    let text = config(
        addr(free_port()),
        addr(free_port()),
        &format!("endpoints = [\"{}\"]", origin.addr),
        &(cluster("good", "origin") + &cluster("wrong", "someone-else")),
    );
    let admin: SocketAddr = text
        .lines()
        .find_map(|l| l.strip_prefix("address = \""))
        .and_then(|a| a.trim_end_matches('"').parse().ok())
        .expect("admin address");
    let mg = Meshgate::start(bin(), &text, admin).expect("start");
    let checks = |cluster: &str, result: &str| {
        metric_sum(
            &mg.metrics(),
            "meshgate_endpoint_health_checks_total",
            &[("cluster", cluster), ("result", result)],
        )
    };
    assert!(
        wait_until(Duration::from_secs(5), || checks("good", "passed") >= 2.0
            && checks("wrong", "failed") >= 2.0),
        "{}",
        mg.log()
    );
    // nginx answered the verified, client-authenticated check (any status but 200 fails).
    assert_eq!(checks("good", "failed"), 0.0);
    assert_eq!(checks("wrong", "passed"), 0.0);
    let m = mg.metrics();
    assert_eq!(
        metric_sum(&m, "meshgate_endpoint_healthy", &[("cluster", "good")]),
        1.0
    );
    assert_eq!(
        metric_sum(&m, "meshgate_endpoint_healthy", &[("cluster", "wrong")]),
        0.0
    );
}

#[test]
fn tcp_maglev_on_source_ip_keeps_a_client_on_one_endpoint() {
    let ups: Vec<HttpUpstream> = (0..3)
        .map(|i| HttpUpstream::start(&format!("u{i}")))
        .collect();
    let (admin, tcp) = (addr(free_port()), addr(free_port()));
    let eps: Vec<String> = ups.iter().map(|u| format!("\"{}\"", u.addr)).collect();
    let text = meshgate_testkit::tcp_config(admin, tcp, &[ups[0].addr], "").replace(
        &format!("endpoints = [\"{}\"]", ups[0].addr),
        &format!(
            "endpoints = [{}]\nbalance = \"maglev\"\nhash_on = \"source_ip\"",
            eps.join(", ")
        ),
    );
    let _mg = Meshgate::start(bin(), &text, admin).expect("start");
    // HTTP through the TCP listener: each upstream answers with its name. Fresh connections
    // (both shards) from one source IP all reach one endpoint; round robin would spread them.
    let mut seen = std::collections::HashSet::new();
    for _ in 0..20 {
        let mut s = connect(tcp);
        let (status, _, body) = keep_alive_get(&mut s, "/", &[]);
        assert_eq!(status, 200);
        seen.insert(body);
    }
    assert_eq!(seen.len(), 1, "{seen:?}");
}
