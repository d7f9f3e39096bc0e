//! Access logs: one JSON record per TCP connection, Envoy flags, reopen on SIGUSR1.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use meshgate_testkit::{EchoServer, Meshgate, free_port, metric_sum, tcp_config, wait_until};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_meshgate"))
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The complete records in the log: a line the writer has not finished yet (no newline) is
/// left for the next read.
fn lines(p: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .split_inclusive('\n')
        .filter_map(|l| l.strip_suffix('\n'))
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect()
}

#[test]
fn tcp_connections_are_logged_as_json_and_log_reopens_on_sigusr1() {
    let echo = EchoServer::start();
    let admin = addr(free_port());
    let listen = addr(free_port());
    let dead = addr(free_port());
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("access.log");
    // Two listeners: one to the echo server, one to an endpoint that refuses.
    let cfg = tcp_config(admin, listen, &[echo.addr], "")
        + &format!(
            "\n[[listeners]]\nname = \"dead\"\naddress = \"{}\"\nprotocol = \"tcp\"\n\n[[routes]]\nname = \"to-dead\"\nlistener = \"dead\"\ncluster = \"nowhere\"\n\n[[clusters]]\nname = \"nowhere\"\nendpoints = [\"{dead}\"]\n",
            addr(free_port())
        );
    let mg = Meshgate::start_with_args(
        bin(),
        &cfg,
        admin,
        &["--access-log", log.to_str().expect("utf8")],
    )
    .expect("start");
    let dead_listener = {
        let st: serde_json::Value =
            serde_json::from_str(&mg.get("/status").expect("status").1).expect("json");
        st["listeners"][1]["address"]
            .as_str()
            .expect("address")
            .parse::<SocketAddr>()
            .expect("addr")
    };

    let mut s = TcpStream::connect(listen).expect("connect");
    s.write_all(&[1u8; 1000]).expect("write");
    let mut back = [0u8; 1000];
    s.read_exact(&mut back).expect("echo");
    drop(s);
    let mut d = TcpStream::connect(dead_listener).expect("connect");
    let mut b = [0u8; 1];
    let _ = d.read(&mut b);

    assert!(
        wait_until(Duration::from_secs(5), || lines(&log).len() == 2),
        "{}",
        mg.log()
    );
    let recs = lines(&log);
    let ok = recs
        .iter()
        .find(|r| r["listener"] == "in")
        .expect("record for `in`");
    assert_eq!(ok["protocol"], "TCP");
    assert_eq!(ok["response_flags"], "-");
    assert_eq!(ok["bytes_received"], 1000);
    assert_eq!(ok["bytes_sent"], 1000);
    assert_eq!(ok["upstream_host"], echo.addr.to_string());
    assert_eq!(ok["upstream_cluster"], "up");
    assert_eq!(ok["route_name"], "default");
    assert!(ok["start_time"].as_str().expect("time").ends_with('Z'));
    assert!(
        ok["downstream_remote_address"]
            .as_str()
            .expect("addr")
            .starts_with("127.0.0.1:")
    );
    let failed = recs
        .iter()
        .find(|r| r["listener"] == "dead")
        .expect("record for `dead`");
    assert_eq!(failed["response_flags"], "UF");
    assert_eq!(failed["upstream_cluster"], "nowhere");

    // logrotate: move the file, SIGUSR1, new records land in a new file.
    std::fs::rename(&log, dir.path().join("access.log.1")).expect("rotate");
    mg.signal(libc::SIGUSR1);
    assert!(wait_until(Duration::from_secs(5), || mg
        .log()
        .contains("reopening the access log")));
    let mut s = TcpStream::connect(listen).expect("connect");
    s.write_all(b"x").expect("write");
    let _ = s.read(&mut b);
    drop(s);
    assert!(
        wait_until(Duration::from_secs(5), || lines(&log).len() == 1),
        "new file gets the new record"
    );
    assert_eq!(lines(&dir.path().join("access.log.1")).len(), 2);
    let m = mg.metrics();
    assert_eq!(
        metric_sum(
            &m,
            "meshgate_access_log_records_total",
            &[("outcome", "dropped")]
        ),
        0.0
    );
    assert_eq!(
        metric_sum(
            &m,
            "meshgate_access_log_records_total",
            &[("outcome", "written")]
        ),
        3.0
    );
}

#[test]
fn access_log_from_the_config_file() {
    let echo = EchoServer::start();
    let admin = addr(free_port());
    let listen = addr(free_port());
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("from-config.log");
    let cfg = tcp_config(admin, listen, &[echo.addr], "")
        + &format!(
            "\n[access_log]\npath = \"{}\"\nformat = \"json\"\n",
            log.display()
        );
    let mg = Meshgate::start(bin(), &cfg, admin).expect("start");
    let mut s = TcpStream::connect(listen).expect("connect");
    s.write_all(b"hi").expect("write");
    let mut b = [0u8; 2];
    s.read_exact(&mut b).expect("echo");
    drop(s);
    assert!(
        wait_until(Duration::from_secs(5), || lines(&log).len() == 1),
        "{}",
        mg.log()
    );
    assert_eq!(lines(&log)[0]["bytes_received"], 2);
    // Regression: with an access log, SIGTERM still ends the process (the writer thread must
    // not wait for every handle of the log to be dropped).
    let mut mg = mg;
    let status = mg
        .terminate(Duration::from_secs(10))
        .expect("exits after SIGTERM");
    assert!(status.success(), "{status}");
}

/// The keys every record has (Istio's, plus meshgate's).
const KEYS: [&str; 21] = [
    "start_time",
    "method",
    "path",
    "protocol",
    "response_code",
    "response_flags",
    "bytes_received",
    "bytes_sent",
    "duration",
    "upstream_host",
    "upstream_cluster",
    "downstream_remote_address",
    "requested_server_name",
    "x_forwarded_for",
    "user_agent",
    "request_id",
    "authority",
    "route_name",
    "downstream_peer_spiffe_id",
    "tls_version",
    "shard",
];

fn http_gateway(
    log: &str,
) -> (
    Meshgate,
    SocketAddr,
    meshgate_testkit::HttpUpstream,
    EchoServer,
) {
    let web = meshgate_testkit::HttpUpstream::start("web");
    let echo = EchoServer::start();
    let (admin, http, tcp) = (addr(free_port()), addr(free_port()), addr(free_port()));
    let cfg = meshgate_testkit::http_tcp_config(
        admin,
        http,
        tcp,
        (web.addr, web.addr, 0),
        echo.addr,
        &format!("\n[access_log]\npath = \"{log}\"\n"),
    );
    let mg = Meshgate::start(bin(), &cfg, admin).expect("start");
    (mg, http, web, echo)
}

/// Send the request mix: 20 forwarded (200), 5 answered by the gateway (200), 5 unrouted (404).
fn request_mix(http: SocketAddr) -> Duration {
    let t = std::time::Instant::now();
    for i in 0..20 {
        let r = meshgate_testkit::http_get(http, &format!("/app/{i}")).expect("get");
        assert_eq!(r.0, 200);
    }
    for _ in 0..5 {
        assert_eq!(
            meshgate_testkit::http_get(http, "/healthz").expect("get").0,
            200
        );
        assert_eq!(
            meshgate_testkit::http_get(http, "/nope").expect("get").0,
            404
        );
    }
    t.elapsed()
}

#[test]
fn http_records_match_the_requests_sent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("access.log");
    let (mg, http, _web, _echo) = http_gateway(log.to_str().expect("utf8"));
    request_mix(http);
    assert!(
        wait_until(Duration::from_secs(5), || lines(&log).len() == 30),
        "{} lines\n{}",
        lines(&log).len(),
        mg.log()
    );
    let recs = lines(&log);
    for r in &recs {
        for k in KEYS {
            assert!(r.get(k).is_some(), "{k} missing in {r}");
        }
        assert_eq!(r["protocol"], "HTTP/1.1");
        assert_eq!(r["method"], "GET");
    }
    let count = |f: &dyn Fn(&serde_json::Value) -> bool| recs.iter().filter(|r| f(r)).count();
    assert_eq!(
        count(&|r| r["response_code"] == 200 && r["upstream_cluster"] == "stable"),
        20
    );
    assert_eq!(
        count(&|r| r["response_code"] == 200 && r["route_name"] == "healthz"),
        5
    );
    assert_eq!(
        count(&|r| r["response_code"] == 404 && r["path"] == "/nope"),
        5
    );
}

#[test]
fn a_full_disk_loses_records_not_requests() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("access.log");
    let (ok_mg, ok_http, _w1, _e1) = http_gateway(file.to_str().expect("utf8"));
    let with_disk = request_mix(ok_http);
    drop(ok_mg);
    // /dev/full: every write fails with ENOSPC, as on a full filesystem.
    let (mg, http, _w2, _e2) = http_gateway("/dev/full");
    let full = request_mix(http);
    eprintln!("30 requests: {with_disk:?} with a working log, {full:?} with a full disk");
    let outcome = |o: &str| {
        metric_sum(
            &mg.metrics(),
            "meshgate_access_log_records_total",
            &[("outcome", o)],
        )
    };
    assert!(
        wait_until(Duration::from_secs(5), || outcome("failed") == 30.0),
        "{}",
        mg.metrics()
    );
    assert_eq!(outcome("written"), 0.0);
    assert_eq!(outcome("dropped"), 0.0);
    // Logged once, not per record.
    assert_eq!(
        mg.log().matches("access log write failed").count(),
        1,
        "{}",
        mg.log()
    );
    // Traffic keeps flowing after the failures.
    assert_eq!(
        meshgate_testkit::http_get(http, "/healthz").expect("get").0,
        200
    );
}
