//! `/metrics` as Prometheus sees it: scraped from a running gateway after HTTP and TCP
//! traffic, parsed by the reference parser (Python `prometheus_client`), checked for the
//! families, their types and bounded label sets; the Istio-compatible names with
//! `[telemetry] istio_compat = true`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use meshgate_testkit::{
    EchoServer, Family, HttpUpstream, Meshgate, free_port, http_get, http_tcp_config,
    prometheus_parse,
};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_meshgate"))
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

struct Setup {
    mg: Meshgate,
    http: SocketAddr,
    tcp: SocketAddr,
    _web: HttpUpstream,
    _echo: EchoServer,
}

fn start(extra: &str) -> Setup {
    let web = HttpUpstream::start("web");
    let echo = EchoServer::start();
    let (admin, http, tcp) = (addr(free_port()), addr(free_port()), addr(free_port()));
    let cfg = http_tcp_config(admin, http, tcp, (web.addr, web.addr, 0), echo.addr, extra);
    let mg = Meshgate::start(bin(), &cfg, admin).expect("start");
    Setup {
        mg,
        http,
        tcp,
        _web: web,
        _echo: echo,
    }
}

/// Requests with several paths (the raw paths must not become labels) and statuses, and two
/// TCP connections.
fn traffic(s: &Setup) {
    for i in 0..20 {
        let (code, body) = http_get(s.http, &format!("/app/item/{i}?q={i}")).expect("get");
        assert_eq!((code, body.as_str()), (200, "web"));
    }
    assert_eq!(http_get(s.http, "/healthz").expect("get").0, 200);
    assert_eq!(http_get(s.http, "/nowhere/abc").expect("get").0, 404);
    for _ in 0..2 {
        let mut c = TcpStream::connect(s.tcp).expect("connect");
        c.write_all(&[7u8; 3000]).expect("write");
        let mut back = [0u8; 3000];
        c.read_exact(&mut back).expect("echo");
    }
}

fn family<'a>(fams: &'a [Family], name: &str) -> &'a Family {
    fams.iter()
        .find(|f| f.name == name)
        .unwrap_or_else(|| panic!("no family {name}"))
}

fn label_keys(f: &Family, sample: &str) -> BTreeSet<String> {
    f.samples
        .iter()
        .filter(|s| s.name == sample)
        .flat_map(|s| s.labels.keys().cloned())
        .filter(|k| k != "le")
        .collect()
}

fn scrape(s: &Setup) -> Vec<Family> {
    // The counters are bumped as each exchange ends; wait for the last TCP connection's.
    let ok = meshgate_testkit::wait_until(Duration::from_secs(5), || {
        meshgate_testkit::metric_sum(
            &s.mg.metrics(),
            "meshgate_tcp_connection_duration_seconds_count",
            &[],
        ) == 2.0
    });
    assert!(ok, "{}", s.mg.metrics());
    let (code, text) = s.mg.get("/metrics").expect("scrape");
    assert_eq!(code, 200);
    prometheus_parse(&text).unwrap_or_else(|e| panic!("{e:#}\n{text}"))
}

#[test]
fn metrics_parse_with_the_prometheus_parser_and_labels_stay_bounded() {
    let s = start("");
    traffic(&s);
    let fams = scrape(&s);
    let kinds: BTreeMap<&str, &str> = fams
        .iter()
        .map(|f| (f.name.as_str(), f.kind.as_str()))
        .collect();
    for (name, kind) in [
        ("meshgate_config_generation", "gauge"),
        ("meshgate_config_reloads", "counter"),
        ("meshgate_build_info", "gauge"),
        ("meshgate_listener_connections_accepted", "counter"),
        ("meshgate_listener_connections_active", "gauge"),
        ("meshgate_cluster_upstream_connections", "counter"),
        ("meshgate_http_requests", "counter"),
        ("meshgate_http_request_duration_seconds", "histogram"),
        ("meshgate_tcp_connection_duration_seconds", "histogram"),
        ("meshgate_tcp_connection_received_bytes", "histogram"),
        ("meshgate_tcp_connection_sent_bytes", "histogram"),
        ("meshgate_shard_busy_seconds", "counter"),
        ("meshgate_shard_idle_seconds", "counter"),
    ] {
        assert_eq!(kinds.get(name).copied(), Some(kind), "{name}: {kinds:?}");
    }
    assert!(
        !kinds.keys().any(|k| k.starts_with("istio_")),
        "istio names only with istio_compat"
    );

    // Bounded label sets: the label names are fixed, and no value is an address or a path.
    let req = family(&fams, "meshgate_http_requests");
    assert_eq!(
        label_keys(req, "meshgate_http_requests_total"),
        ["cluster", "code_class", "listener", "route", "shard"]
            .map(String::from)
            .into()
    );
    let dur = family(&fams, "meshgate_http_request_duration_seconds");
    assert_eq!(
        label_keys(dur, "meshgate_http_request_duration_seconds_bucket"),
        ["cluster", "code_class", "listener", "route"]
            .map(String::from)
            .into()
    );
    for f in &fams {
        for sample in &f.samples {
            for (k, v) in &sample.labels {
                // Endpoint series name the configured endpoint (bounded by the config).
                if k == "endpoint" && sample.name.starts_with("meshgate_endpoint_") {
                    continue;
                }
                assert!(
                    !v.contains("127.0.0.1") && !v.contains('/') && !v.contains('?'),
                    "{}{{{k}={v:?}}}: an address or a path as a label value",
                    sample.name
                );
            }
        }
    }

    // The values: 20 forwarded requests to `stable`, one direct response, one 404.
    let count = |f: &Family, sample: &str, labels: &[(&str, &str)]| -> f64 {
        f.samples
            .iter()
            .filter(|s| s.name == sample)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .sum()
    };
    let c = "meshgate_http_request_duration_seconds_count";
    assert_eq!(
        count(
            dur,
            c,
            &[
                ("route", "app"),
                ("cluster", "stable"),
                ("code_class", "2xx")
            ]
        ),
        20.0
    );
    assert_eq!(
        count(
            dur,
            c,
            &[
                ("route", "healthz"),
                ("cluster", "(none)"),
                ("code_class", "2xx")
            ]
        ),
        1.0
    );
    assert_eq!(
        count(dur, c, &[("route", "(none)"), ("code_class", "4xx")]),
        1.0
    );
    let inf = count(
        dur,
        "meshgate_http_request_duration_seconds_bucket",
        &[("route", "app"), ("le", "+Inf")],
    );
    assert_eq!(inf, 20.0);
    // Utilisation: one series per shard; an almost idle gateway spent most of its time parked.
    for name in ["meshgate_shard_busy_seconds", "meshgate_shard_idle_seconds"] {
        let shards: BTreeSet<&str> = family(&fams, name)
            .samples
            .iter()
            .filter(|s| s.name.ends_with("_total"))
            .filter_map(|s| s.labels.get("shard").map(String::as_str))
            .collect();
        assert_eq!(shards, ["0", "1"].into(), "{name}");
    }
    let busy = count(
        family(&fams, "meshgate_shard_busy_seconds"),
        "meshgate_shard_busy_seconds_total",
        &[],
    );
    let idle = count(
        family(&fams, "meshgate_shard_idle_seconds"),
        "meshgate_shard_idle_seconds_total",
        &[],
    );
    assert!(idle > 0.0 && busy >= 0.0, "busy {busy} idle {idle}");
    let tcp = family(&fams, "meshgate_tcp_connection_received_bytes");
    assert_eq!(
        count(
            tcp,
            "meshgate_tcp_connection_received_bytes_sum",
            &[("listener", "tcp-in"), ("cluster", "echo")]
        ),
        6000.0
    );
}

#[test]
fn istio_compat_exports_istio_names_and_labels() {
    let s = start("\n[telemetry]\nistio_compat = true\n");
    traffic(&s);
    let fams = scrape(&s);
    let kinds: BTreeMap<&str, &str> = fams
        .iter()
        .map(|f| (f.name.as_str(), f.kind.as_str()))
        .collect();
    for (name, kind) in [
        ("istio_requests", "counter"),
        ("istio_request_duration_milliseconds", "histogram"),
        ("istio_request_bytes", "histogram"),
        ("istio_response_bytes", "histogram"),
        ("istio_tcp_connections_opened", "counter"),
        ("istio_tcp_connections_closed", "counter"),
        ("istio_tcp_sent_bytes", "counter"),
        ("istio_tcp_received_bytes", "counter"),
        // The meshgate_* families stay.
        ("meshgate_http_requests", "counter"),
    ] {
        assert_eq!(kinds.get(name).copied(), Some(kind), "{name}: {kinds:?}");
    }
    let req = family(&fams, "istio_requests");
    let sample = req
        .samples
        .iter()
        .find(|s| {
            s.labels.get("destination_service").map(String::as_str) == Some("stable")
                && s.labels.get("response_code").map(String::as_str) == Some("200")
        })
        .expect("a series for the stable cluster");
    assert_eq!(sample.value, 20.0);
    for key in [
        "reporter",
        "source_workload",
        "source_principal",
        "destination_service",
        "destination_service_name",
        "destination_workload",
        "response_code",
        "response_flags",
        "request_protocol",
        "connection_security_policy",
    ] {
        assert!(
            sample.labels.contains_key(key),
            "{key}: {:?}",
            sample.labels
        );
    }
    assert_eq!(sample.labels["request_protocol"], "http");
    assert_eq!(sample.labels["connection_security_policy"], "none");
    let opened = family(&fams, "istio_tcp_connections_opened");
    let total: f64 = opened
        .samples
        .iter()
        .filter(|s| s.labels.get("destination_service").map(String::as_str) == Some("echo"))
        .map(|s| s.value)
        .sum();
    assert_eq!(total, 2.0);
    let received: f64 = family(&fams, "istio_tcp_received_bytes")
        .samples
        .iter()
        .map(|s| s.value)
        .sum();
    assert_eq!(received, 6000.0);
}
