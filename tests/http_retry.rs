//! Retries, retry budgets and circuit breakers of the HTTP gateway, end to end: the real
//! `meshgate` binary in front of real origins on 127.0.0.1 (testkit's `HttpUpstream`, healthy
//! or failing: resetting connections with SO_LINGER 0, or answering a fixed status, optionally
//! after a delay), driven over real sockets. HTTP/2 clusters (`protocol = "http2"`) get the
//! same retries, circuit breakers and outlier ejection, against testkit's `H2Origin` (stream
//! resets, REFUSED_STREAM, GOAWAY before processing, 503, a stalled TLS handshake).

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use meshgate_testkit::h2origin::{H2Fault, H2Origin};
use meshgate_testkit::http::curl;
use meshgate_testkit::pki::TestPki;
use meshgate_testkit::web::{WebGateway, cluster, loopback, prefix_route};
use meshgate_testkit::{Fault, HttpUpstream, free_port, http_get, http_request, wait_until};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_meshgate"))
}

/// The gateway with its `http` listener `web`; `body` holds its routes and clusters.
fn gateway(cores: u32, body: &str) -> WebGateway {
    WebGateway::start(bin(), cores, body)
}

#[test]
fn a_resetting_endpoint_is_retried_for_get_but_not_for_a_post_that_was_sent() {
    let reset = HttpUpstream::start_failing(Fault::Reset, Duration::ZERO);
    let healthy = HttpUpstream::start("healthy");
    let dead = loopback(free_port());
    // No [routes.retry]: the default policy (2 attempts on connect-failure and reset).
    let gw = gateway(
        2,
        &format!(
            r#"
[[routes]]
name = "refused"
listener = "web"
match = {{ path = {{ prefix = "/refused" }} }}
cluster = "half-dead"

[[routes]]
name = "mixed"
listener = "web"
cluster = "mixed"

[[clusters]]
name = "mixed"
endpoints = ["{reset}", "{healthy}"]

[[clusters]]
name = "half-dead"
endpoints = ["{dead}", "{healthy}"]
"#,
            reset = reset.addr,
            healthy = healthy.addr,
        ),
    );

    for i in 0..20 {
        let (status, body) = gw.get(&format!("/get/{i}"));
        assert_eq!((status, body.as_str()), (200, "healthy"), "GET {i}");
    }
    let resets = reset.count();
    assert!(
        resets >= 5,
        "round robin sent GETs to the resetting endpoint: {resets}"
    );
    assert_eq!(
        gw.metric(
            "meshgate_http_retries_total",
            &[("cluster", "mixed"), ("reason", "reset")]
        ),
        resets as f64,
        "every reset was retried once"
    );
    let retried: Vec<_> = (0..20)
        .flat_map(|i| gw.records(&format!("/get/{i}"), 1))
        .filter(|r| r["upstream_request_attempt_count"] == 2)
        .collect();
    assert_eq!(retried.len(), resets, "attempt counts in the access log");
    assert!(
        retried
            .iter()
            .all(|r| r["response_code"] == 200 && r["response_flags"] == "-"),
        "{retried:?}"
    );

    // HTTP/2 clients' requests take the same attempt loop.
    h2_clients_get_the_healthy_answer(&gw, "/h2/", || reset.count());

    // A POST whose head and body went to the resetting endpoint is not sent again.
    let (resets_before, healthy_before) = (reset.count(), healthy.count());
    let (ok, failed) = posts_not_retried(&gw, "/post/", 8);
    assert_eq!(reset.count() - resets_before, failed);
    assert_eq!(
        healthy.count() - healthy_before,
        ok,
        "the healthy origin received nothing of the POSTs that failed"
    );

    // A POST refused at connect reached nobody: it goes to the next endpoint.
    for i in 0..6 {
        let (status, body) =
            http_request(gw.web, "POST", &format!("/refused/{i}"), Some(b"order=2"))
                .unwrap_or_else(|e| panic!("POST {i}: {e:#}"));
        assert_eq!(
            (status, body.as_str()),
            (200, "healthy"),
            "POST /refused/{i}"
        );
    }
    assert!(
        gw.metric(
            "meshgate_http_retries_total",
            &[("cluster", "half-dead"), ("reason", "connect-failure")]
        ) >= 1.0
    );
}

#[test]
fn a_503_is_retried_only_when_the_policy_lists_it() {
    let failing = HttpUpstream::start_failing(Fault::Status(503), Duration::ZERO);
    let healthy = HttpUpstream::start("healthy");
    let gw = gateway(
        1,
        &format!(
            r#"
[[routes]]
name = "with-5xx"
listener = "web"
match = {{ path = {{ prefix = "/retry/" }} }}
cluster = "flaky"
retry = {{ on = ["5xx"] }}

[[routes]]
name = "codes"
listener = "web"
match = {{ path = {{ prefix = "/codes/" }} }}
cluster = "always-503"
retry = {{ attempts = 3, on = ["retriable-status-codes"], status_codes = [503], backoff_base = "1ms" }}

[[routes]]
name = "default"
listener = "web"
cluster = "flaky"

[[clusters]]
name = "flaky"
endpoints = ["{failing}", "{healthy}"]

[[clusters]]
name = "always-503"
endpoints = ["{failing}"]
"#,
            failing = failing.addr,
            healthy = healthy.addr,
        ),
    );
    for i in 0..10 {
        let (status, body) = gw.get(&format!("/retry/{i}"));
        assert_eq!((status, body.as_str()), (200, "healthy"), "GET /retry/{i}");
    }
    let seen = failing.count();
    assert!(seen >= 4, "{seen}");
    assert_eq!(
        gw.metric(
            "meshgate_http_retries_total",
            &[("cluster", "flaky"), ("reason", "status")]
        ),
        seen as f64
    );

    // The default policy does not retry statuses: the 503 reaches the client as it is.
    let before = failing.count();
    let mut passed = 0;
    for i in 0..10 {
        match gw.get(&format!("/plain/{i}")) {
            (200, _) => {}
            (503, body) => {
                assert_eq!(body, "503\n", "the origin's own response");
                passed += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(passed, 5, "round robin over two endpoints on one shard");
    assert_eq!(failing.count() - before, passed);

    // Retries run out: the last 503 goes to the client, flagged URX.
    let before = failing.count();
    let (status, body) = gw.get("/codes/1");
    assert_eq!((status, body.as_str()), (503, "503\n"));
    assert_eq!(failing.count() - before, 3, "three attempts");
    let rec = &gw.records("/codes/1", 1)[0];
    assert_eq!(rec["response_flags"], "URX", "{rec}");
    assert_eq!(rec["upstream_request_attempt_count"], 3, "{rec}");
}

#[test]
fn a_per_try_timeout_moves_the_request_to_the_fast_endpoint() {
    let slow = HttpUpstream::start_with_delay("slow", Duration::from_secs(3));
    let fast = HttpUpstream::start("fast");
    let gw = gateway(
        1,
        &format!(
            r#"
[[routes]]
name = "app"
listener = "web"
cluster = "app"
timeout = "5s"

[routes.retry]
on = ["reset"]
per_try_timeout = "300ms"

[[clusters]]
name = "app"
endpoints = ["{slow}", "{fast}"]
"#,
            slow = slow.addr,
            fast = fast.addr,
        ),
    );
    for i in 0..6 {
        let started = Instant::now();
        let (status, body) = gw.get(&format!("/t/{i}"));
        let took = started.elapsed();
        assert_eq!((status, body.as_str()), (200, "fast"), "GET {i}");
        assert!(took < Duration::from_millis(1500), "GET {i} took {took:?}");
    }
    // Round robin: each retry takes the fast endpoint's turn, so every request tries the slow
    // one first.
    let slow_seen = slow.count();
    assert!(slow_seen >= 3, "{slow_seen}");
    assert_eq!(
        gw.metric(
            "meshgate_http_retries_total",
            &[("cluster", "app"), ("reason", "per-try-timeout")]
        ),
        slow_seen as f64
    );
}

#[test]
fn the_retry_budget_bounds_concurrent_retries() {
    // Every answer is a 503 after 500 ms, so the first failures of 20 concurrent requests
    // arrive together, long before any retry ends.
    let failing = HttpUpstream::start_failing(Fault::Status(503), Duration::from_millis(500));
    let gw = gateway(
        1,
        &format!(
            r#"
[[routes]]
name = "app"
listener = "web"
cluster = "app"
retry = {{ on = ["5xx"], backoff_base = "1ms" }}

[[clusters]]
name = "app"
endpoints = ["{failing}"]
retry_budget = {{ budget_percent = 25, min_retry_concurrency = 1 }}
"#,
            failing = failing.addr,
        ),
    );
    let web = gw.web;
    let clients: Vec<_> = (0..20)
        .map(|i| {
            thread::spawn(move || {
                http_get(web, &format!("/b/{i}"))
                    .unwrap_or_else(|e| panic!("GET {i}: {e:#}"))
                    .0
            })
        })
        .collect();
    for c in clients {
        assert_eq!(c.join().expect("client"), 503);
    }
    let labels = [("cluster", "app")];
    let retries = gw.metric("meshgate_http_retries_total", &labels);
    let refused = gw.metric("meshgate_http_retry_budget_exhausted_total", &labels);
    // 25 % of 20 requests in flight: 5 retries at once.
    assert!((1.0..=5.0).contains(&retries), "retries {retries}");
    assert_eq!(
        retries + refused,
        20.0,
        "each first failure was retried or refused"
    );
    assert_eq!(failing.count() as f64, 20.0 + retries);
}

#[test]
fn circuit_breakers_answer_503_uo_at_once() {
    let slow = HttpUpstream::start_with_delay("slow", Duration::from_secs(2));
    let slow2 = HttpUpstream::start_with_delay("slow2", Duration::from_secs(2));
    let gw = gateway(
        2,
        &format!(
            r#"
[[routes]]
name = "requests"
listener = "web"
match = {{ path = {{ prefix = "/r/" }} }}
cluster = "limited"

[[routes]]
name = "connections"
listener = "web"
match = {{ path = {{ prefix = "/c/" }} }}
cluster = "one-conn"

[[clusters]]
name = "limited"
endpoints = ["{slow}"]
circuit_breakers = {{ max_requests = 2 }}

[[clusters]]
name = "one-conn"
endpoints = ["{slow2}"]
circuit_breakers = {{ max_connections = 1 }}
"#,
            slow = slow.addr,
            slow2 = slow2.addr,
        ),
    );
    check_max_requests(&gw, || slow.count());
    check_max_connections(&gw, || slow2.count());
}

/// Four GETs from curl over HTTP/2 (prior knowledge) to `prefix` + `0..4`, each answered by
/// the healthy origin, and at least one of them met the failing one first (`failing_seen`).
fn h2_clients_get_the_healthy_answer(
    gw: &WebGateway,
    prefix: &str,
    failing_seen: impl Fn() -> usize,
) {
    let before = failing_seen();
    for i in 0..4 {
        let r = curl(&[
            "--http2-prior-knowledge",
            &format!("http://{}{prefix}{i}", gw.web),
        ]);
        assert_eq!((r.status, r.body.as_str()), (200, "healthy"), "{r:?}");
    }
    assert!(
        failing_seen() > before,
        "HTTP/2 requests met the failing endpoint too"
    );
}

/// POSTs `order=1` (7 bytes) to `prefix` + `0..n`: (answered 200, answered 502). Some went to
/// an endpoint that failed them after their body was sent; each of those is a 502 `UC` after
/// one attempt: it was not sent again.
fn posts_not_retried(gw: &WebGateway, prefix: &str, n: usize) -> (usize, usize) {
    let (mut ok, mut failed) = (0, 0);
    for i in 0..n {
        let path = format!("{prefix}{i}");
        let (status, _) = http_request(gw.web, "POST", &path, Some(b"order=1"))
            .unwrap_or_else(|e| panic!("POST {path}: {e:#}"));
        match status {
            200 => ok += 1,
            502 => failed += 1,
            other => panic!("POST {path}: status {other}"),
        }
    }
    assert!(failed >= 1, "some POSTs went to the failing endpoint");
    let failed_records: Vec<_> = (0..n)
        .flat_map(|i| gw.records(&format!("{prefix}{i}"), 1))
        .filter(|r| r["response_code"] == 502)
        .collect();
    assert_eq!(failed_records.len(), failed);
    assert!(
        failed_records
            .iter()
            .all(|r| r["response_flags"] == "UC" && r["upstream_request_attempt_count"] == 1),
        "{failed_records:?}"
    );
    (ok, failed)
}

/// Cluster `limited` (`max_requests = 2`, paths under `/r/`) over an origin answering after
/// 2 s (`seen`: requests it received): two requests hold both places, a third gets 503 `UO` at
/// once and reaches nobody, and there is room again once they are done.
fn check_max_requests(gw: &WebGateway, seen: impl Fn() -> usize) {
    let web = gw.web;
    let held: Vec<_> = (0..2)
        .map(|i| thread::spawn(move || http_get(web, &format!("/r/{i}")).map(|r| r.0).ok()))
        .collect();
    assert!(wait_until(Duration::from_secs(5), || seen() == 2));
    let started = Instant::now();
    let (status, _) = gw.get("/r/over");
    assert_eq!(status, 503);
    assert!(started.elapsed() < Duration::from_millis(500), "at once");
    let rec = &gw.records("/r/over", 1)[0];
    assert_eq!(rec["response_flags"], "UO", "{rec}");
    assert_eq!(overflow(gw, "limited", "max_requests"), 1.0);
    for h in held {
        assert_eq!(h.join().expect("client"), Some(200));
    }
    assert_eq!(seen(), 2, "the refused request reached nobody");
    assert_eq!(gw.get("/r/after").0, 200, "room again once they finished");
}

/// Cluster `one-conn` (`max_connections = 1`, paths under `/c/`) over origins answering after
/// 2 s: the first request holds the one connection (`first_seen`: what its origin received);
/// the next one would need a second connection: 503 `UO`.
fn check_max_connections(gw: &WebGateway, first_seen: impl Fn() -> usize) {
    let web = gw.web;
    let first = thread::spawn(move || http_get(web, "/c/1").map(|r| r.0).ok());
    assert!(wait_until(Duration::from_secs(5), || first_seen() == 1));
    let (status, _) = gw.get("/c/2");
    assert_eq!(
        status, 503,
        "a second connection would pass max_connections"
    );
    assert_eq!(gw.records("/c/2", 1)[0]["response_flags"], "UO");
    assert_eq!(overflow(gw, "one-conn", "max_connections"), 1.0);
    assert_eq!(first.join().expect("client"), Some(200));
}

fn overflow(gw: &WebGateway, cluster: &str, limit: &str) -> f64 {
    gw.metric(
        "meshgate_cluster_upstream_overflow_total",
        &[("cluster", cluster), ("limit", limit)],
    )
}

/// Access-log records of `path` + `0..n` whose attempt count is 2, once all `n` are written.
fn retried_records(gw: &WebGateway, prefix: &str, n: usize) -> Vec<serde_json::Value> {
    (0..n)
        .flat_map(|i| gw.records(&format!("{prefix}{i}"), 1))
        .filter(|r| r["upstream_request_attempt_count"] == 2)
        .collect()
}

#[test]
fn http2_endpoints_retry_resets_refused_streams_goaway_connect_failures_5xx_and_slow_heads() {
    let healthy = H2Origin::start("healthy");
    let reset = H2Origin::start_failing(H2Fault::Reset);
    let refuse = H2Origin::start_failing(H2Fault::Refuse);
    let goaway = H2Origin::start_failing(H2Fault::GoAway);
    let failing = H2Origin::start_failing(H2Fault::Status(503));
    let slow = H2Origin::start_with_delay("slow", Duration::from_secs(3));
    let dead = loopback(free_port());
    // One core: strict round robin over each cluster's two endpoints. Refused streams and
    // GOAWAY are retried although `on` lists neither reset nor connect failures.
    const H2: &str = "protocol = \"http2\"";
    let policy = r#"retry = { on = ["retriable-status-codes"], status_codes = [429] }"#;
    let config = [
        prefix_route("/reset/", "reset", ""),
        prefix_route("/refuse/", "refuse", policy),
        prefix_route("/goaway/", "goaway", policy),
        prefix_route("/dead/", "dead", ""),
        prefix_route("/5xx/", "5xx", r#"retry = { on = ["5xx"] }"#),
        prefix_route(
            "/slow/",
            "slow",
            "timeout = \"5s\"\nretry = { on = [\"reset\"], per_try_timeout = \"300ms\" }",
        ),
        cluster("reset", &[reset.addr, healthy.addr], H2),
        cluster("refuse", &[refuse.addr, healthy.addr], H2),
        cluster("goaway", &[goaway.addr, healthy.addr], H2),
        cluster("dead", &[dead, healthy.addr], H2),
        cluster("5xx", &[failing.addr, healthy.addr], H2),
        cluster("slow", &[slow.addr, healthy.addr], H2),
    ];
    let gw = gateway(1, &config.concat());
    let retries = |cluster: &str, reason: &str| {
        gw.metric(
            "meshgate_http_retries_total",
            &[("cluster", cluster), ("reason", reason)],
        )
    };
    for prefix in ["/reset/", "/refuse/", "/goaway/", "/dead/", "/5xx/"] {
        for i in 0..10 {
            let (status, body) = gw.get(&format!("{prefix}{i}"));
            assert_eq!(
                (status, body.as_str()),
                (200, "healthy"),
                "GET {prefix}{i}\n{}",
                gw.mg.log()
            );
        }
    }
    // Every request that met the failing endpoint was tried once more, on the healthy one.
    let seen = reset.count();
    assert!(
        seen >= 3,
        "round robin sent GETs to the resetting endpoint: {seen}"
    );
    assert_eq!(retries("reset", "reset"), seen as f64);
    assert_eq!(retried_records(&gw, "/reset/", 10).len(), seen);
    let seen = refuse.count();
    assert!(seen >= 3, "{seen}");
    assert_eq!(retries("refuse", "refused-stream"), seen as f64);
    let refused_goaway = retries("goaway", "refused-stream");
    assert!(refused_goaway >= 3.0, "{refused_goaway}");
    assert_eq!(goaway.count(), 0, "GOAWAY before any stream was processed");
    assert_eq!(
        retried_records(&gw, "/goaway/", 10).len() as f64,
        refused_goaway
    );
    assert!(retries("dead", "connect-failure") >= 3.0);
    let seen = failing.count();
    assert!(seen >= 3, "{seen}");
    assert_eq!(retries("5xx", "status"), seen as f64);
    let rec = retried_records(&gw, "/5xx/", 10);
    assert_eq!(rec.len(), seen);
    assert!(
        rec.iter()
            .all(|r| r["response_code"] == 200 && r["response_flags"] == "-"),
        "{rec:?}"
    );

    // The per-try timeout moves a request on from an endpoint that sends no response head.
    for i in 0..4 {
        let started = Instant::now();
        assert_eq!(gw.get(&format!("/slow/{i}")), (200, "healthy".to_owned()));
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(1500),
            "GET /slow/{i} took {took:?}"
        );
    }
    let seen = slow.count();
    assert!(seen >= 2, "{seen}");
    assert_eq!(retries("slow", "per-try-timeout"), seen as f64);

    // An HTTP/2 client's requests take the same loop.
    h2_clients_get_the_healthy_answer(&gw, "/reset/h2-", || reset.count());

    // A POST whose body went to the resetting endpoint is not sent again: 502 UC, and the
    // healthy origin receives nothing of it.
    let (body_before, healthy_before) = (reset.body_bytes(), healthy.count());
    let (ok, failed) = posts_not_retried(&gw, "/reset/post-", 8);
    assert_eq!(
        reset.body_bytes() - body_before,
        failed * 7,
        "their bodies were sent"
    );
    assert_eq!(healthy.count() - healthy_before, ok);

    // A POST whose stream was refused was not processed: its body (small, and all there) is
    // sent again to the next endpoint.
    let (refused_before, healthy_bytes) = (refuse.count(), healthy.body_bytes());
    for i in 0..6 {
        let path = format!("/refuse/post-{i}");
        let (status, body) = http_request(gw.web, "POST", &path, Some(b"order=3"))
            .unwrap_or_else(|e| panic!("POST {path}: {e:#}"));
        assert_eq!((status, body.as_str()), (200, "healthy"), "POST {path}");
    }
    assert!(refuse.count() - refused_before >= 2);
    assert_eq!(
        healthy.body_bytes() - healthy_bytes,
        6 * 7,
        "each body arrived once"
    );
    assert_eq!(refuse.body_bytes(), 0);

    // A POST refused at connect reached nobody: it goes to the next endpoint, body and all.
    let healthy_bytes = healthy.body_bytes();
    for i in 0..4 {
        let (status, body) =
            http_request(gw.web, "POST", &format!("/dead/post-{i}"), Some(b"order=2"))
                .unwrap_or_else(|e| panic!("POST {i}: {e:#}"));
        assert_eq!(
            (status, body.as_str()),
            (200, "healthy"),
            "POST /dead/post-{i}"
        );
    }
    assert_eq!(healthy.body_bytes() - healthy_bytes, 4 * 7);
}

#[test]
fn http2_clusters_keep_their_circuit_breakers_and_eject_outliers() {
    let slow = H2Origin::start_with_delay("slow", Duration::from_secs(2));
    let slow_a = H2Origin::start_with_delay("a", Duration::from_secs(2));
    let slow_b = H2Origin::start_with_delay("b", Duration::from_secs(2));
    let stall = H2Origin::start_failing(H2Fault::Stall);
    let failing = H2Origin::start_failing(H2Fault::Status(503));
    let healthy = H2Origin::start("healthy");
    let pki = TestPki::new();
    let ca = pki.bundle(&pki.example, "ca");
    let h2 = |limits: &str| format!("protocol = \"http2\"\ncircuit_breakers = {{ {limits} }}");
    let tls = format!(
        "{}\nconnect_timeout = \"2s\"\n[clusters.tls]\n\
         verify = {{ dns_names = [\"origin.example.test\"] }}\ntrust_bundle = \"{}\"",
        h2("max_pending_requests = 1"),
        ca.display()
    );
    let outlier = "protocol = \"http2\"\n[clusters.outlier_detection]\nconsecutive_5xx = 3\n\
                   base_ejection_time = \"30s\"\nmax_ejection_percent = 50";
    let config = [
        prefix_route("/r/", "limited", ""),
        prefix_route("/c/", "one-conn", ""),
        prefix_route("/p/", "stalled", "retry = { attempts = 1 }"),
        prefix_route("/o/", "outlier", ""),
        cluster("limited", &[slow.addr], &h2("max_requests = 2")),
        cluster(
            "one-conn",
            &[slow_a.addr, slow_b.addr],
            &h2("max_connections = 1"),
        ),
        cluster("stalled", &[stall.addr], &tls),
        cluster("outlier", &[failing.addr, healthy.addr], outlier),
    ];
    let gw = gateway(1, &config.concat());
    let web = gw.web;
    // max_requests: two requests multiplexed on one connection hold both places.
    check_max_requests(&gw, || slow.count());
    // max_connections: the first request holds the one connection (to a); the next one goes
    // to b, which would need a second connection.
    check_max_connections(&gw, || slow_a.count());
    assert_eq!(slow_b.connections(), 0);

    // max_pending_requests: the first request waits for a connection whose TLS handshake
    // never ends; a second one may not wait too.
    let first = thread::spawn(move || http_get(web, "/p/1").map(|r| r.0).ok());
    assert!(wait_until(Duration::from_secs(5), || stall.connections() == 1));
    let started = Instant::now();
    let (status, _) = gw.get("/p/2");
    assert_eq!(status, 503);
    assert!(started.elapsed() < Duration::from_millis(500), "at once");
    assert_eq!(gw.records("/p/2", 1)[0]["response_flags"], "UO");
    assert_eq!(overflow(&gw, "stalled", "max_pending_requests"), 1.0);
    assert_eq!(
        first.join().expect("client"),
        Some(504),
        "the connect timed out"
    );
    assert_eq!(stall.connections(), 1, "one connection was opened");

    // Outlier detection: the endpoint answering 503 is ejected after its third, and every
    // request after that goes to the healthy one.
    let statuses: Vec<u16> = (0..30).map(|i| gw.get(&format!("/o/{i}")).0).collect();
    assert_eq!(
        statuses.iter().filter(|&&s| s == 503).count(),
        3,
        "{statuses:?}"
    );
    assert_eq!(failing.count(), 3);
    let (_, clusters) = gw.mg.get("/clusters").expect("/clusters");
    let v: serde_json::Value = serde_json::from_str(&clusters).expect("json");
    let entry = |addr: std::net::SocketAddr| {
        v.as_array()
            .and_then(|a| a.iter().find(|e| e["endpoint"] == addr.to_string()))
            .cloned()
            .unwrap_or_else(|| panic!("{addr} in {v}"))
    };
    assert_eq!(entry(failing.addr)["ejected"], true, "{v}");
    assert_eq!(entry(healthy.addr)["ejected"], false, "{v}");
    assert_eq!(
        gw.metric(
            "meshgate_endpoint_ejections_total",
            &[("endpoint", &failing.addr.to_string())]
        ),
        1.0
    );
}
