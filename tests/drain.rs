//! Drain: admin `POST /drain` / `meshgate drain` (stop accepting, /ready 503, open
//! connections finish, the process stays up as with Envoy's /drain_listeners) and SIGTERM
//! with HTTP requests in flight (they complete; exit 0 within the drain deadline).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use meshgate_testkit::{
    EchoServer, HttpUpstream, Meshgate, free_port, http_get, http_tcp_config, wait_until,
};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_meshgate"))
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn meshgate(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin())
        .args(args)
        .output()
        .expect("run meshgate");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Send one keep-alive request on `s` and read its response head and body; returns the head.
fn keep_alive_get(s: &mut TcpStream, path: &str) -> String {
    meshgate_testkit::keep_alive_get(s, path, &[]).1
}

#[test]
fn drain_stops_accepting_and_open_connections_finish() {
    let web = HttpUpstream::start("web");
    let echo = EchoServer::start();
    let (admin, http, tcp) = (addr(free_port()), addr(free_port()), addr(free_port()));
    let cfg = http_tcp_config(admin, http, tcp, (web.addr, web.addr, 0), echo.addr, "");
    let mut mg = Meshgate::start(bin(), &cfg, admin).expect("start");
    let admin_s = admin.to_string();

    let mut open_tcp = TcpStream::connect(tcp).expect("connect");
    open_tcp
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    open_tcp.write_all(b"before").expect("write");
    let mut b6 = [0u8; 6];
    open_tcp.read_exact(&mut b6).expect("echo");
    let mut open_http = TcpStream::connect(http).expect("connect");
    open_http
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let head = keep_alive_get(&mut open_http, "/app/1");
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(!head.contains("connection: close"), "{head}");

    let (code, out, err) = meshgate(&["drain", "--admin", &admin_s]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("draining"), "{out}");
    assert_eq!(mg.get("/ready").expect("ready").0, 503);
    assert_eq!(mg.get("/live").expect("live").0, 200);
    // New connections are refused on both listeners.
    assert!(
        wait_until(Duration::from_secs(5), || TcpStream::connect(tcp).is_err()
            && TcpStream::connect(http).is_err()),
        "listeners still accepting after POST /drain"
    );
    // Open connections keep working; the HTTP one is told to close after this request.
    open_tcp.write_all(b"during").expect("write");
    open_tcp.read_exact(&mut b6).expect("echo while draining");
    assert_eq!(&b6, b"during");
    let head = keep_alive_get(&mut open_http, "/app/2");
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    let mut rest = [0u8; 1];
    assert_eq!(open_http.read(&mut rest).expect("read"), 0, "closed after");

    // A reload is refused while draining, with the reason.
    let (code, _, err) = meshgate(&["reload", "--admin", &admin_s]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("draining"), "{err}");

    // --wait returns once the last connection closed.
    drop(open_tcp);
    let (code, out, err) = meshgate(&[
        "drain",
        "--wait",
        "--timeout",
        "10s",
        "--admin",
        &admin_s,
        "-o",
        "json",
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["draining"], true);
    assert_eq!(v["open_connections"], 0);
    let status: serde_json::Value =
        serde_json::from_str(&mg.get("/status").expect("status").1).expect("json");
    assert_eq!(status["draining"], true);
    // Still running (as Envoy after /drain_listeners) until SIGTERM, which exits 0.
    let st = mg.terminate(Duration::from_secs(10)).expect("exits");
    assert!(st.success(), "{st}");
}

#[test]
fn sigterm_lets_requests_in_flight_complete_and_exits_zero() {
    // Each response takes 1 s; the drain deadline (5 s) leaves room for them.
    let slow = HttpUpstream::start_with_delay("slow", Duration::from_secs(1));
    let echo = EchoServer::start();
    let (admin, http, tcp) = (addr(free_port()), addr(free_port()), addr(free_port()));
    let cfg = http_tcp_config(admin, http, tcp, (slow.addr, slow.addr, 0), echo.addr, "");
    let mut mg = Meshgate::start(bin(), &cfg, admin).expect("start");

    let clients: Vec<_> = (0..8)
        .map(|i| std::thread::spawn(move || http_get(http, &format!("/app/{i}"))))
        .collect();
    assert!(
        wait_until(Duration::from_secs(5), || slow
            .requests
            .load(Ordering::Acquire)
            == 8),
        "requests did not reach the upstream"
    );
    let t = Instant::now();
    mg.signal(libc::SIGTERM);
    for c in clients {
        let (code, body) = c.join().expect("client").expect("response");
        assert_eq!((code, body.as_str()), (200, "slow"));
    }
    let st = mg.wait(Duration::from_secs(10)).expect("exits");
    assert!(st.success(), "{st}");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "exited when the requests were done, not at the deadline: {:?}",
        t.elapsed()
    );
    assert!(mg.log().contains("closed_at_deadline=0"), "{}", mg.log());
}

/// Datagrams sent to a fake `NOTIFY_SOCKET`, as systemd would receive them.
fn notifications(sock: &std::os::unix::net::UnixDatagram, until: Duration) -> Vec<String> {
    let mut got = Vec::new();
    let end = Instant::now() + until;
    let mut buf = [0u8; 512];
    while Instant::now() < end {
        if let Ok(n) = sock.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    got
}

#[test]
fn systemd_notify_ready_watchdog_reloading_stopping() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    let web = HttpUpstream::start("web");
    let echo = EchoServer::start();
    let (admin, http, tcp) = (addr(free_port()), addr(free_port()), addr(free_port()));
    let cfg = http_tcp_config(admin, http, tcp, (web.addr, web.addr, 0), echo.addr, "");
    let mut mg = Meshgate::start_with_env(
        bin(),
        &cfg,
        admin,
        &[],
        &[
            ("NOTIFY_SOCKET", path.to_str().expect("utf8")),
            // 400 ms: a ping every 200 ms while every shard answers.
            ("WATCHDOG_USEC", "400000"),
        ],
    )
    .expect("start");
    let first = notifications(&sock, Duration::from_millis(1500));
    assert_eq!(
        first.first().map(String::as_str),
        Some("READY=1"),
        "{first:?}"
    );
    let pings = first.iter().filter(|m| *m == "WATCHDOG=1").count();
    assert!(pings >= 4, "{first:?}");

    let (code, out, err) = meshgate(&["reload", "--admin", &admin.to_string()]);
    assert_eq!(code, 0, "{out}{err}");
    let reload = notifications(&sock, Duration::from_millis(500));
    let at = reload
        .iter()
        .position(|m| m.starts_with("RELOADING=1\nMONOTONIC_USEC="))
        .unwrap_or_else(|| panic!("no RELOADING=1: {reload:?}"));
    assert!(reload[at..].iter().any(|m| m == "READY=1"), "{reload:?}");

    mg.signal(libc::SIGTERM);
    let st = mg.wait(Duration::from_secs(10)).expect("exits");
    assert!(st.success());
    let last = notifications(&sock, Duration::from_millis(200));
    assert!(last.iter().any(|m| m == "STOPPING=1"), "{last:?}");
}
