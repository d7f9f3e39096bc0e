//! Retries, retry budgets and circuit breakers of the HTTP gateway, end to end: the real
//! `meshgate` binary in front of real origins on 127.0.0.1 (testkit's `HttpUpstream`, healthy
//! or failing: resetting connections with SO_LINGER 0, or answering a fixed status, optionally
//! after a delay), driven over real sockets.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use meshgate_testkit::http::curl;
use meshgate_testkit::{
    Fault, HttpUpstream, Meshgate, access_log_records, free_port, http_get, http_request,
    metric_sum, wait_until,
};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_meshgate"))
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A gateway with an `http` listener `web`; `body` holds its routes and clusters.
struct Gw {
    mg: Meshgate,
    web: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Gw {
    fn start(cores: u32, body: &str) -> Gw {
        let admin = addr(free_port());
        let web = addr(free_port());
        let config = format!(
            "version = 1\n[admin]\naddress = \"{admin}\"\n[runtime]\ncores = {cores}\n\
             drain_timeout = \"1s\"\n[[listeners]]\nname = \"web\"\naddress = \"{web}\"\n\
             protocol = \"http\"\n{body}"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("access.log");
        let mg = Meshgate::start_with_args(
            bin(),
            &config,
            admin,
            &["--access-log", log.to_str().expect("utf-8 path")],
        )
        .expect("gateway starts");
        Gw {
            mg,
            web,
            log,
            _dir: dir,
        }
    }

    fn get(&self, path: &str) -> (u16, String) {
        http_get(self.web, path).unwrap_or_else(|e| panic!("GET {path}: {e:#}"))
    }

    /// Access-log records of `path`, once `n` of them are written.
    fn records(&self, path: &str, n: usize) -> Vec<serde_json::Value> {
        let read = || -> Vec<serde_json::Value> {
            let mut all = access_log_records(&self.log);
            all.retain(|r| r["path"] == path);
            all
        };
        wait_until(Duration::from_secs(5), || read().len() >= n);
        read()
    }

    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_sum(&self.mg.metrics(), name, labels)
    }
}

#[test]
fn a_resetting_endpoint_is_retried_for_get_but_not_for_a_post_that_was_sent() {
    let reset = HttpUpstream::start_failing(Fault::Reset, Duration::ZERO);
    let healthy = HttpUpstream::start("healthy");
    let dead = addr(free_port());
    // No [routes.retry]: the default policy (2 attempts on connect-failure and reset).
    let gw = Gw::start(
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
    let url = format!("http://{}/h2/1", gw.web);
    let before = reset.count();
    for _ in 0..4 {
        let r = curl(&["--http2-prior-knowledge", &url]);
        assert_eq!((r.status, r.body.as_str()), (200, "healthy"), "{r:?}");
    }
    assert!(
        reset.count() > before,
        "HTTP/2 requests met the resetting endpoint too"
    );

    // A POST whose head and body went to the resetting endpoint is not sent again.
    let (resets_before, healthy_before) = (reset.count(), healthy.count());
    let (mut ok, mut failed) = (0, 0);
    for i in 0..8 {
        let (status, _) = http_request(gw.web, "POST", &format!("/post/{i}"), Some(b"order=1"))
            .unwrap_or_else(|e| panic!("POST {i}: {e:#}"));
        match status {
            200 => ok += 1,
            502 => failed += 1,
            other => panic!("POST {i}: status {other}"),
        }
    }
    assert!(failed >= 1, "some POSTs went to the resetting endpoint");
    assert_eq!(reset.count() - resets_before, failed);
    assert_eq!(
        healthy.count() - healthy_before,
        ok,
        "the healthy origin received nothing of the POSTs that failed"
    );
    let failed_records: Vec<_> = (0..8)
        .flat_map(|i| gw.records(&format!("/post/{i}"), 1))
        .filter(|r| r["response_code"] == 502)
        .collect();
    assert!(
        failed_records
            .iter()
            .all(|r| r["response_flags"] == "UC" && r["upstream_request_attempt_count"] == 1),
        "{failed_records:?}"
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
    let gw = Gw::start(
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
    let gw = Gw::start(
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
    let gw = Gw::start(
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
    let gw = Gw::start(
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
    let web = gw.web;
    let held: Vec<_> = (0..2)
        .map(|i| thread::spawn(move || http_get(web, &format!("/r/{i}")).map(|r| r.0).ok()))
        .collect();
    assert!(wait_until(Duration::from_secs(5), || slow.count() == 2));
    let started = Instant::now();
    let (status, _) = gw.get("/r/over");
    assert_eq!(status, 503);
    assert!(started.elapsed() < Duration::from_millis(500), "at once");
    let rec = &gw.records("/r/over", 1)[0];
    assert_eq!(rec["response_flags"], "UO", "{rec}");
    assert_eq!(
        gw.metric(
            "meshgate_cluster_upstream_overflow_total",
            &[("cluster", "limited"), ("limit", "max_requests")]
        ),
        1.0
    );
    for h in held {
        assert_eq!(h.join().expect("client"), Some(200));
    }
    assert_eq!(slow.count(), 2, "the refused request reached nobody");
    // Room again once they finished.
    let (status, _) = gw.get("/r/after");
    assert_eq!(status, 200);

    let first = thread::spawn(move || http_get(web, "/c/1").map(|r| r.0).ok());
    assert!(wait_until(Duration::from_secs(5), || slow2.count() == 1));
    let (status, _) = gw.get("/c/2");
    assert_eq!(
        status, 503,
        "a second connection would pass max_connections"
    );
    assert_eq!(
        gw.metric(
            "meshgate_cluster_upstream_overflow_total",
            &[("cluster", "one-conn"), ("limit", "max_connections")]
        ),
        1.0
    );
    assert_eq!(first.join().expect("client"), Some(200));
}
