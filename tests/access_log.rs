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

fn lines(p: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
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
