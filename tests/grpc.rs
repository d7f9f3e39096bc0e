//! HTTP/2 to upstreams and gRPC end to end through the real binary.
//!
//! - A tonic server behind a `protocol = "http2"` cluster, a tonic client in front: unary,
//!   server-streaming and bidirectional-streaming calls with their payloads intact, a server
//!   status (NOT_FOUND with its message) unchanged, the gateway's own failures as gRPC statuses
//!   (no route: UNIMPLEMENTED, upstream down: UNAVAILABLE), a `grpc-timeout` of 200 ms against
//!   a handler that sleeps 2 s answered DEADLINE_EXCEEDED by the gateway after about 200 ms,
//!   the grpc-status in the access log, and one upstream connection per shard carrying every
//!   call of many client connections.
//! - nginx with `listen ... http2` (h2c) and `listen ... ssl http2` (ALPN h2) as origins: curl
//!   (HTTP/2 and HTTP/1.1 downstream) and h2load through the gateway, nginx logging
//!   `HTTP/2.0` for every request over a few reused connections; with nginx's
//!   `keepalive_requests 10` (GOAWAY after 10 requests) no request fails and new connections
//!   take over.
//! - A `protocol = "http2"` cluster where one endpoint refuses every stream (REFUSED_STREAM):
//!   gRPC calls are sent again, message and all, to the other endpoint; a call's
//!   `grpc-timeout` runs over all its attempts.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use meshgate_testkit::grpc::{Code, GrpcClient, GrpcServer, raw_call, stream_message};
use meshgate_testkit::h2origin::{H2Fault, H2Origin};
use meshgate_testkit::http::{NginxH2, curl, curl_version, nginx_or_skip, tool};
use meshgate_testkit::pki::{LeafSpec, TestPki};
use meshgate_testkit::web::{WebGateway, cluster, loopback, prefix_route};
use meshgate_testkit::{access_log_record, fill_pseudo_random, free_port, metric_sum};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_meshgate"))
}

/// The gateway of the gRPC test: `web` routes `test.Echo` to `upstream` over HTTP/2; a second
/// listener (returned) routes to a port nobody listens on.
fn grpc_gateway(upstream: SocketAddr) -> (WebGateway, SocketAddr) {
    let down = loopback(free_port());
    let nothing = loopback(free_port());
    let body = format!(
        r#"
[[listeners]]
name = "down"
address = "{down}"
protocol = "http"

# The deadline test: the tonic server would enforce grpc-timeout itself, so it does not get
# to see it; the gateway still has the client's.
[[routes]]
name = "deadline"
listener = "web"
match = {{ headers = [{{ name = "x-deadline-test", exact = "1" }}] }}
cluster = "grpc"
request_headers = {{ remove = ["grpc-timeout"] }}

[[routes]]
name = "echo"
listener = "web"
match = {{ path = {{ prefix = "/test.Echo/" }} }}
cluster = "grpc"

[[routes]]
name = "down"
listener = "down"
cluster = "nothing"

[[clusters]]
name = "grpc"
endpoints = ["{upstream}"]
protocol = "http2"

[[clusters]]
name = "nothing"
endpoints = ["{nothing}"]
protocol = "http2"
connect_timeout = "1s"
"#
    );
    (WebGateway::start(bin(), 2, &body), down)
}

#[test]
fn grpc_calls_statuses_and_deadlines_through_the_gateway() {
    let server = GrpcServer::start();
    let (gw, down) = grpc_gateway(server.addr);
    let client = GrpcClient::connect(gw.web).expect("client connects");

    // Unary, 200 KiB each way (past every initial flow-control window).
    let mut payload = vec![0u8; 200 * 1024];
    fill_pseudo_random(&mut 11u64, &mut payload);
    let echoed = client
        .unary(payload.clone())
        .unwrap_or_else(|s| panic!("unary: {s:?}\n{}", gw.mg.log()));
    assert!(echoed == payload, "unary payload changed");

    // Server streaming: 64 messages of 16 KiB (1 MiB), in order, intact.
    let messages = client.server_stream(64, 16 * 1024).expect("server stream");
    assert_eq!(messages.len(), 64);
    for (i, m) in messages.iter().enumerate() {
        assert!(*m == stream_message(i, 16 * 1024), "message {i} changed");
    }

    // Bidirectional: each message is sent only once the previous answer came back, so the
    // request stream is open while responses flow.
    let sent: Vec<Vec<u8>> = (0..20)
        .map(|i| {
            let mut m = vec![0u8; 1 + i * 3000];
            fill_pseudo_random(&mut (i as u64 + 1), &mut m);
            m
        })
        .collect();
    let answers = client.bidi(sent.clone()).expect("bidi");
    assert_eq!(answers.len(), sent.len());
    for (i, (a, s)) in answers.iter().zip(&sent).enumerate() {
        let mut want = s.clone();
        want.reverse();
        assert!(*a == want, "bidi answer {i} changed");
    }

    // The server's own status, with its message, reaches the client unchanged.
    let status = client
        .unary(b"status:5:no widget 42 here".to_vec())
        .expect_err("NOT_FOUND");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert_eq!(status.message(), "no widget 42 here");

    // No route: the gateway answers UNIMPLEMENTED (404 NR), as gRPC.
    let status = client.missing().expect_err("no route");
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    let rec = access_log_record(&gw.log, |r| r["path"] == "/test.Missing/Call")
        .expect("access-log record of the unrouted call");
    assert_eq!(rec["response_flags"], "NR", "{rec}");
    assert_eq!(rec["grpc_status"], 12, "{rec}");

    // Upstream down: UNAVAILABLE (502 UF), fast.
    let down = GrpcClient::connect(down).expect("client connects");
    let started = std::time::Instant::now();
    let status = down.unary(b"hello".to_vec()).expect_err("upstream down");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let rec = access_log_record(&gw.log, |r| r["listener"] == "down").expect("record");
    assert_eq!(rec["grpc_status"], 14, "{rec}");
    assert!(
        rec["response_flags"]
            .as_str()
            .unwrap_or("")
            .starts_with("UF"),
        "{rec}"
    );

    // Deadline: the client asks for 200 ms, the handler sleeps 2 s. The gateway answers
    // DEADLINE_EXCEEDED itself (a trailers-only response) after about 200 ms. The raw h2
    // client has no deadline of its own, so what it sees is the gateway's doing.
    let reply = raw_call(
        gw.web,
        "/test.Echo/Unary",
        b"sleep:2000",
        &[("grpc-timeout", "200m"), ("x-deadline-test", "1")],
    )
    .expect("raw call");
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.grpc_status.as_deref(), Some("4"), "{reply:?}");
    assert!(reply.trailers_only, "{reply:?}");
    assert!(
        reply.elapsed >= Duration::from_millis(190) && reply.elapsed < Duration::from_millis(1500),
        "answered after {:?}",
        reply.elapsed
    );
    let rec = access_log_record(&gw.log, |r| r["route_name"] == "deadline").expect("record");
    assert_eq!(rec["grpc_status"], 4, "{rec}");
    assert_eq!(rec["response_flags"], "UT", "{rec}");
    // Without the header the same call just works (the route timeout is 15 s).
    let reply = raw_call(gw.web, "/test.Echo/Unary", b"sleep:300", &[]).expect("raw call");
    assert_eq!(reply.grpc_status.as_deref(), Some("0"), "{reply:?}");
    assert!(!reply.trailers_only);
    assert_eq!(&reply.body[5..], b"sleep:300");

    // A successful call's status is logged too.
    let rec =
        access_log_record(&gw.log, |r| r["path"] == "/test.Echo/ServerStream").expect("record");
    assert_eq!(rec["grpc_status"], 0, "{rec}");
    assert_eq!(rec["response_code"], 200, "{rec}");
    assert_eq!(rec["protocol"], "HTTP/2", "{rec}");

    // Many client connections, one upstream connection per shard: calls are multiplexed.
    for i in 0..40 {
        let c = GrpcClient::connect(gw.web).expect("client connects");
        let m = format!("call {i}").into_bytes();
        assert_eq!(c.unary(m.clone()).expect("unary"), m);
    }
    assert!(
        server.accepted() <= 2,
        "the upstream accepted {} connections for 2 shards",
        server.accepted()
    );
    let metrics = gw.mg.metrics();
    let connects = metric_sum(
        &metrics,
        "meshgate_cluster_upstream_connections_total",
        &[("cluster", "grpc")],
    );
    assert!(
        (1.0..=2.0).contains(&connects),
        "{connects} upstream connections"
    );
}

/// Distinct nginx connection numbers in its log lines.
fn connections(lines: &[String]) -> std::collections::BTreeSet<String> {
    lines
        .iter()
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_owned))
        .collect()
}

#[test]
fn nginx_h2c_and_h2_over_tls_upstreams_reuse_and_survive_goaway() {
    let Some(nginx) = nginx_or_skip("nginx_h2c_and_h2_over_tls_upstreams_reuse_and_survive_goaway")
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
    let h2c = NginxH2::start(&nginx, None, 100_000);
    let goaway = NginxH2::start(&nginx, None, 10);
    let tls = NginxH2::start(&nginx, Some((&ocert, &okey)), 100_000);
    let body = format!(
        r#"
[[routes]]
name = "goaway"
listener = "web"
match = {{ path = {{ prefix = "/goaway/" }} }}
cluster = "goaway"
[[routes]]
name = "tls"
listener = "web"
match = {{ path = {{ prefix = "/tls/" }} }}
cluster = "tls"
[[routes]]
name = "h2c"
listener = "web"
cluster = "h2c"
[[clusters]]
name = "h2c"
endpoints = ["{h2c}"]
protocol = "http2"
[[clusters]]
name = "goaway"
endpoints = ["{goaway}"]
protocol = "http2"
[[clusters]]
name = "tls"
endpoints = ["{tls}"]
protocol = "http2"
[clusters.tls]
verify = {{ dns_names = ["origin.example.test"] }}
trust_bundle = "{ca}"
"#,
        h2c = h2c.addr,
        goaway = goaway.addr,
        tls = tls.addr,
        ca = ca.display(),
    );
    let gw = WebGateway::start(bin(), 2, &body);
    let (mg, web) = (&gw.mg, gw.web);

    // curl with prior knowledge to the gateway; nginx says the upstream side is HTTP/2 too.
    let (code, version, body) =
        curl_version(&["--http2-prior-knowledge", &format!("http://{web}/a?x=1")]);
    assert_eq!((code, version.as_str()), (0, "2"), "{body}\n{}", mg.log());
    assert!(body.starts_with("proto=HTTP/2.0 "), "{body}");
    assert!(body.contains("uri=/a?x=1"), "{body}");
    // An HTTP/1.1 client to the HTTP/2 upstream: a chunked body, the same answer.
    let r = curl(&["--http1.1", &format!("http://{web}/b")]);
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.starts_with("proto=HTTP/2.0 "), "{}", r.body);
    // h2 over TLS (ALPN h2, the origin verified by DNS name).
    let (code, version, body) =
        curl_version(&["--http2-prior-knowledge", &format!("http://{web}/tls/c")]);
    assert_eq!((code, version.as_str()), (0, "2"), "{body}\n{}", mg.log());
    assert!(body.starts_with("proto=HTTP/2.0 "), "{body}");

    // `expect: 100-continue` from an HTTP/2 client: the gateway answers 100 once the upstream
    // stream is open (curl would otherwise wait 10 s before sending the body), and the whole
    // body reaches the origin, which stores it before answering 201.
    let body_file = tempfile::NamedTempFile::new().expect("temp file");
    let sent: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
    std::fs::write(body_file.path(), &sent).expect("write body");
    let started = std::time::Instant::now();
    let out = Command::new("curl")
        .args(["-sS", "-v", "--max-time", "20", "--expect100-timeout", "10"])
        .args(["--http2-prior-knowledge", "-H", "expect: 100-continue"])
        .args(["-w", "%{http_code}", "-o", "/dev/null"])
        .args(["-T", &body_file.path().display().to_string()])
        .arg(format!("http://{web}/upload/expect.bin"))
        .output()
        .expect("curl");
    let verbose = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?} {verbose}", out.status);
    assert!(verbose.contains("< HTTP/2 100"), "{verbose}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "201", "{verbose}");
    let stored = std::fs::read(h2c.dir.path().join("upload/expect.bin")).expect("stored body");
    assert!(
        stored == sent,
        "origin stored {} of {} bytes",
        stored.len(),
        sent.len()
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    // Many requests, many downstream connections, few upstream connections.
    if let Some(h2load) = tool("h2load") {
        let out = Command::new(h2load)
            .args([
                "-n",
                "2000",
                "-c",
                "4",
                "-m",
                "10",
                &format!("http://{web}/load"),
            ])
            .output()
            .expect("h2load");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("2000 succeeded, 0 failed"),
            "{text}\n{}",
            mg.log()
        );
    }
    for i in 0..50 {
        let r = curl(&["--http1.1", &format!("http://{web}/seq/{i}")]);
        assert_eq!(r.status, 200, "{r:?}");
    }
    let lines = h2c.log_lines();
    assert!(lines.len() >= 53, "{} log lines", lines.len());
    assert!(
        lines.iter().all(|l| l.starts_with("HTTP/2.0 ")),
        "{lines:?}"
    );
    let conns = connections(&lines);
    assert!(
        conns.len() <= 2,
        "{} upstream connections (2 shards) for {} requests",
        conns.len(),
        lines.len()
    );

    // GOAWAY after every 10 requests: nothing fails, new connections take over.
    for i in 0..60 {
        let (code, version, body) = curl_version(&[
            "--http2-prior-knowledge",
            &format!("http://{web}/goaway/{i}"),
        ]);
        assert_eq!((code, version.as_str()), (0, "2"), "{body}\n{}", mg.log());
        assert!(body.starts_with("proto=HTTP/2.0 "), "request {i}: {body}");
    }
    let lines = goaway.log_lines();
    assert_eq!(lines.len(), 60, "{lines:?}");
    let conns = connections(&lines);
    assert!(conns.len() >= 6, "{} connections: {lines:?}", conns.len());
}

#[test]
fn grpc_calls_refused_by_an_http2_endpoint_are_retried_within_their_deadline() {
    let server = GrpcServer::start();
    let refuse = H2Origin::start_failing(H2Fault::Refuse);
    let slow = H2Origin::start_with_delay("slow", Duration::from_secs(3));
    // One core: strict round robin, so every other call meets the refusing endpoint first.
    let config = [
        prefix_route("/test.Echo/", "grpc", ""),
        prefix_route("/slow.Svc/", "slow", ""),
        cluster("grpc", &[refuse.addr, server.addr], "protocol = \"http2\""),
        cluster("slow", &[refuse.addr, slow.addr], "protocol = \"http2\""),
    ];
    let gw = WebGateway::start(bin(), 1, &config.concat());
    for i in 0..6 {
        let message = format!("call {i}").into_bytes();
        let reply = raw_call(
            gw.web,
            "/test.Echo/Unary",
            &message,
            &[("grpc-timeout", "5S")],
        )
        .expect("raw call");
        assert_eq!(
            reply.grpc_status.as_deref(),
            Some("0"),
            "{reply:?}\n{}",
            gw.mg.log()
        );
        assert_eq!(
            &reply.body[5..],
            &message[..],
            "the message reached the server once"
        );
    }
    assert!(refuse.count() >= 3, "{}", refuse.count());
    assert_eq!(
        gw.metric(
            "meshgate_http_retries_total",
            &[("cluster", "grpc"), ("reason", "refused-stream")]
        ),
        refuse.count() as f64
    );

    // The deadline runs from the call's arrival over every attempt: a call refused by one
    // endpoint, then held by the other, ends when its 300 ms are over.
    let before = refuse.count();
    for _ in 0..2 {
        let reply = raw_call(gw.web, "/slow.Svc/Call", b"x", &[("grpc-timeout", "300m")])
            .expect("raw call");
        assert_eq!(reply.grpc_status.as_deref(), Some("4"), "{reply:?}");
        assert!(
            reply.elapsed >= Duration::from_millis(290)
                && reply.elapsed < Duration::from_millis(1500),
            "answered after {:?}",
            reply.elapsed
        );
    }
    assert_eq!(
        refuse.count() - before,
        2,
        "round robin: each retry takes the other endpoint's turn, so each call met it first"
    );
    let rec = access_log_record(&gw.log, |r| {
        r["path"] == "/slow.Svc/Call" && r["upstream_request_attempt_count"] == 2
    })
    .expect("the refused call's record");
    assert_eq!(rec["grpc_status"], 4, "{rec}");
    assert_eq!(rec["response_flags"], "UT,URX", "{rec}");
}
