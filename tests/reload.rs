//! Hot reload: a new config becomes a new generation on every shard without dropping a
//! connection; an invalid one is refused and the running generation stays.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

use meshgate_testkit::{EchoServer, Meshgate, free_port, metric_sum, tcp_config, wait_until};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_meshgate"))
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn round_trip(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    s.write_all(msg)?;
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got)?;
    assert_eq!(got, msg);
    Ok(())
}

fn connect(a: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(a).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s
}

fn reload_cmd(mg: &Meshgate) -> (i32, String, String) {
    let out = Command::new(bin())
        .args(["reload", "--wait", "--admin", &mg.admin.to_string()])
        .output()
        .expect("run meshgate reload");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn generation(mg: &Meshgate) -> f64 {
    metric_sum(&mg.metrics(), "meshgate_config_generation", &[])
}

#[test]
fn reload_switches_new_connections_and_keeps_open_ones() {
    let (a, b) = (EchoServer::start(), EchoServer::start());
    let admin = addr(free_port());
    let listen = addr(free_port());
    let mg =
        Meshgate::start(bin(), &tcp_config(admin, listen, &[a.addr], ""), admin).expect("start");
    let mut old = connect(listen);
    round_trip(&mut old, b"on generation 1").expect("works");
    assert_eq!(a.accepted.load(Ordering::Acquire), 1);

    std::fs::write(&mg.config_path, tcp_config(admin, listen, &[b.addr], ""))
        .expect("rewrite config");
    let (code, out, err) = reload_cmd(&mg);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(out.contains("generation 2"), "{out}");
    assert_eq!(generation(&mg), 2.0);

    // The open connection still runs on generation 1's upstream...
    round_trip(&mut old, b"still on generation 1").expect("open connection survives reload");
    // ...new connections use generation 2.
    let mut new = connect(listen);
    round_trip(&mut new, b"on generation 2").expect("works");
    assert_eq!(
        b.accepted.load(Ordering::Acquire),
        1,
        "new connection went to the new endpoint"
    );
    assert_eq!(
        a.accepted.load(Ordering::Acquire),
        1,
        "nothing new reached the old endpoint"
    );
}

#[test]
fn invalid_reload_is_refused_and_running_config_stays() {
    let a = EchoServer::start();
    let admin = addr(free_port());
    let listen = addr(free_port());
    let good = tcp_config(admin, listen, &[a.addr], "");
    let mg = Meshgate::start(bin(), &good, admin).expect("start");
    std::fs::write(
        &mg.config_path,
        good.replace(&a.addr.to_string(), "not-an-address"),
    )
    .expect("write");
    let (code, _, err) = reload_cmd(&mg);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("clusters[0].endpoints[0]"), "{err}");
    assert_eq!(generation(&mg), 1.0);
    assert_eq!(
        metric_sum(
            &mg.metrics(),
            "meshgate_config_reloads_total",
            &[("result", "error")]
        ),
        1.0
    );
    let mut s = connect(listen);
    round_trip(&mut s, b"still serving").expect("running generation stays");
}

#[test]
fn reload_adds_and_removes_listeners_and_sighup_reloads() {
    let a = EchoServer::start();
    let admin = addr(free_port());
    let (l1, l2) = (addr(free_port()), addr(free_port()));
    let base = tcp_config(admin, l1, &[a.addr], "");
    let mut mg = Meshgate::start(bin(), &base, admin).expect("start");
    let mut on_l1 = connect(l1);
    round_trip(&mut on_l1, b"l1").expect("works");

    // Replace listener `in` (on l1) by listener `in2` (on l2), via SIGHUP.
    let moved = base
        .replace(
            &format!("name = \"in\"\naddress = \"{l1}\""),
            &format!("name = \"in2\"\naddress = \"{l2}\""),
        )
        .replace("listener = \"in\"", "listener = \"in2\"");
    assert_ne!(moved, base);
    std::fs::write(&mg.config_path, moved).expect("write");
    mg.signal(libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(10), || generation(&mg) == 2.0),
        "{}",
        mg.log()
    );

    let mut on_l2 = connect(l2);
    round_trip(&mut on_l2, b"l2").expect("new listener serves");
    assert!(
        wait_until(Duration::from_secs(5), || TcpStream::connect(l1).is_err()),
        "removed listener still accepting"
    );
    round_trip(&mut on_l1, b"l1 after removal")
        .expect("connection of a removed listener continues");
    let status = mg.terminate(Duration::from_secs(10)).expect("exit");
    assert!(status.success());
}

fn meshgate_out(args: &[&str]) -> (i32, String, String) {
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

#[test]
fn history_diff_and_one_command_rollback() {
    let (a, b) = (EchoServer::start(), EchoServer::start());
    let admin = addr(free_port());
    let listen = addr(free_port());
    let first = tcp_config(admin, listen, &[a.addr], "");
    let mg = Meshgate::start(bin(), &first, admin).expect("start");
    let admin_s = admin.to_string();

    // Generation 2 sends traffic to b.
    let second = tcp_config(admin, listen, &[b.addr], "");
    std::fs::write(&mg.config_path, &second).expect("write");
    assert_eq!(reload_cmd(&mg).0, 0);

    let (code, out, err) = meshgate_out(&["config", "history", "--admin", &admin_s, "-o", "json"]);
    assert_eq!(code, 0, "{err}");
    let entries: Vec<serde_json::Value> = serde_json::from_str(&out).expect("json");
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0]["summary"], "started");
    assert_eq!(entries[1]["summary"], "clusters ~up");
    let (code, out, _) = meshgate_out(&["config", "history", "--admin", &admin_s]);
    assert_eq!(code, 0);
    assert!(
        out.contains("clusters ~up") && out.contains("in force: #2"),
        "{out}"
    );

    let (code, out, err) = meshgate_out(&["config", "diff", "1", "2", "--admin", &admin_s]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("-endpoints = [\"{}\"]", a.addr)),
        "{out}"
    );
    assert!(
        out.contains(&format!("+endpoints = [\"{}\"]", b.addr)),
        "{out}"
    );

    // A bad edit is refused; rollback (to the entry before the newest) restores generation 1's
    // config in the file and in force, and keeps the bad edit.
    std::fs::write(
        &mg.config_path,
        second.replace("version = 1", "version = 9"),
    )
    .expect("bad edit");
    assert_eq!(reload_cmd(&mg).0, 64);
    let (code, out, err) = meshgate_out(&["config", "rollback", "--admin", &admin_s]);
    assert_eq!(code, 0, "stdout {out}\nstderr {err}");
    assert!(out.contains("generation 3"), "{out}");
    assert_eq!(
        std::fs::read_to_string(&mg.config_path).expect("read"),
        first
    );
    let saved: Vec<_> = std::fs::read_dir(mg.dir.path().join("state/config-history"))
        .expect("history dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("unapplied-"))
        .collect();
    assert_eq!(saved.len(), 1, "the unapplied edit is kept");
    let before = a.accepted.load(Ordering::Acquire);
    let mut s = connect(listen);
    round_trip(&mut s, b"after rollback").expect("works");
    assert_eq!(
        a.accepted.load(Ordering::Acquire),
        before + 1,
        "traffic is back on the first endpoint"
    );
}

/// Load that runs until `stop`: fresh HTTP connections, one keep-alive HTTP connection, fresh
/// TCP connections and one long-lived TCP connection. Every failure is recorded.
struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<(u64, Vec<String>)>>,
}

impl Load {
    fn start(http: SocketAddr, tcp: SocketAddr) -> Load {
        use std::sync::Arc;
        use std::sync::atomic::AtomicBool;
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for t in 0..2 {
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                let (mut ok, mut errors) = (0u64, Vec::new());
                while !stop.load(Ordering::Acquire) {
                    match meshgate_testkit::http_get(http, &format!("/app/{t}")) {
                        Ok((200, body)) if body == "stable" || body == "canary" => ok += 1,
                        other => errors.push(format!("http: {other:?}")),
                    }
                }
                (ok, errors)
            }));
        }
        let s = stop.clone();
        threads.push(std::thread::spawn(move || {
            let (mut ok, mut errors) = (0u64, Vec::new());
            let mut c = connect(http);
            while !s.load(Ordering::Acquire) {
                let r = c
                    .write_all(b"GET /app/ka HTTP/1.1\r\nhost: t\r\n\r\n")
                    .and_then(|()| {
                        let mut got = Vec::new();
                        let mut b = [0u8; 1024];
                        while !got.ends_with(b"stable") && !got.ends_with(b"canary") {
                            let n = c.read(&mut b)?;
                            if n == 0 {
                                return Err(std::io::ErrorKind::UnexpectedEof.into());
                            }
                            got.extend_from_slice(&b[..n]);
                        }
                        Ok(got)
                    });
                match r {
                    Ok(got) if got.starts_with(b"HTTP/1.1 200") => ok += 1,
                    other => {
                        errors.push(format!("keep-alive: {other:?}"));
                        c = connect(http);
                    }
                }
            }
            (ok, errors)
        }));
        for t in 0..2 {
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                let (mut ok, mut errors) = (0u64, Vec::new());
                let mut long = connect(tcp);
                let mut i = 0u64;
                while !stop.load(Ordering::Acquire) {
                    i += 1;
                    let msg = format!("tcp {t} {i}");
                    let r = TcpStream::connect(tcp).and_then(|mut s| {
                        s.set_read_timeout(Some(Duration::from_secs(5)))?;
                        round_trip(&mut s, msg.as_bytes())
                    });
                    match r {
                        Ok(()) => ok += 1,
                        Err(e) => errors.push(format!("tcp connection: {e}")),
                    }
                    if i.is_multiple_of(10) {
                        match round_trip(&mut long, msg.as_bytes()) {
                            Ok(()) => ok += 1,
                            Err(e) => errors.push(format!("long-lived tcp: {e}")),
                        }
                    }
                }
                (ok, errors)
            }));
        }
        Load { stop, threads }
    }

    /// Stop and return (successful exchanges, failures).
    fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Release);
        let mut total = (0, Vec::new());
        for t in self.threads {
            let (ok, mut errors) = t.join().expect("load thread");
            total.0 += ok;
            total.1.append(&mut errors);
        }
        total
    }
}

fn http_reload(admin: SocketAddr) -> (i32, String) {
    let (code, out, err) = meshgate_out(&["reload", "--admin", &admin.to_string()]);
    (code, format!("{out}{err}"))
}

/// Which upstream answers 40 fresh requests: (stable, canary).
fn split(http: SocketAddr) -> (usize, usize) {
    let mut n = (0, 0);
    for _ in 0..40 {
        match meshgate_testkit::http_get(http, "/app/probe") {
            Ok((200, b)) if b == "stable" => n.0 += 1,
            Ok((200, b)) if b == "canary" => n.1 += 1,
            other => panic!("probe: {other:?}"),
        }
    }
    n
}

#[test]
fn hundred_reloads_under_http_and_tcp_load_drop_nothing_and_rollback_restores() {
    use meshgate_testkit::{HttpUpstream, http_tcp_config};
    let (stable, canary) = (HttpUpstream::start("stable"), HttpUpstream::start("canary"));
    let echo = EchoServer::start();
    let (admin, http, tcp) = (addr(free_port()), addr(free_port()), addr(free_port()));
    // A: everything to `stable`; B: a 20% canary.
    let a = http_tcp_config(
        admin,
        http,
        tcp,
        (stable.addr, canary.addr, 0),
        echo.addr,
        "",
    );
    let b = http_tcp_config(
        admin,
        http,
        tcp,
        (stable.addr, canary.addr, 20),
        echo.addr,
        "",
    );
    let invalid = b.replace(&canary.addr.to_string(), "canary.invalid:80");
    let mg = Meshgate::start(bin(), &a, admin).expect("start");
    assert_eq!(split(http), (40, 0));

    let load = Load::start(http, tcp);
    let mut refused = 0;
    for i in 1..=100u64 {
        if i.is_multiple_of(30) {
            // An invalid config in the middle: refused with its error, nothing changes.
            std::fs::write(&mg.config_path, &invalid).expect("write");
            let (code, out) = http_reload(admin);
            assert_eq!(code, 64, "{out}");
            assert!(out.contains("clusters[1].endpoints[0]"), "{out}");
            assert_eq!(generation(&mg), i as f64);
            refused += 1;
        }
        let next = if i.is_multiple_of(2) { &a } else { &b };
        std::fs::write(&mg.config_path, next).expect("write");
        let (code, out) = http_reload(admin);
        assert_eq!(code, 0, "reload {i}: {out}\n{}", mg.log());
        assert!(out.contains(&format!("generation {}", i + 1)), "{out}");
    }
    assert_eq!(generation(&mg), 101.0);
    // The last reload applied A (all to stable); the one before it B (the canary).
    assert_eq!(split(http).1, 0);

    // One command restores the previous generation's config (B), still under load.
    let (code, out, err) = meshgate_out(&["config", "rollback", "--admin", &admin.to_string()]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("generation 102"), "{out}");
    assert_eq!(std::fs::read_to_string(&mg.config_path).expect("read"), b);
    let (ok, errors) = load.finish();
    let (s, c) = split(http);
    assert!(
        c > 0 && s > c,
        "after the rollback the canary takes its 20% again: {s}/{c}"
    );
    let m = mg.metrics();
    assert_eq!(
        metric_sum(&m, "meshgate_config_reloads_total", &[("result", "error")]),
        refused as f64
    );
    eprintln!(
        "{ok} exchanges under 100 reloads + rollback, {} failed",
        errors.len()
    );
    assert!(ok > 500, "the load ran: {ok}");
    assert!(
        errors.is_empty(),
        "{} failures: {:?}",
        errors.len(),
        &errors[..errors.len().min(10)]
    );
    assert!(canary.requests.load(Ordering::Acquire) > 0);
}

/// One request on a keep-alive connection; the body (the upstream's name).
fn keepalive_get(s: &mut TcpStream, path: &str) -> String {
    write!(s, "GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").expect("write");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).expect("read");
        assert!(
            n > 0,
            "connection closed: {}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().expect("length"))
                })
                .expect("content-length");
            if body.len() >= len {
                assert!(head.starts_with("HTTP/1.1 200"), "{head}");
                return body[..len].to_owned();
            }
        }
    }
}

#[test]
fn open_http_connections_take_the_reloaded_routes_on_their_next_request() {
    use meshgate_testkit::{HttpUpstream, http_tcp_config};
    let (stable, canary) = (HttpUpstream::start("stable"), HttpUpstream::start("canary"));
    let echo = EchoServer::start();
    let (admin, http, tcp) = (addr(free_port()), addr(free_port()), addr(free_port()));
    let config = |canary_weight| {
        http_tcp_config(
            admin,
            http,
            tcp,
            (stable.addr, canary.addr, canary_weight),
            echo.addr,
            "",
        )
    };
    let mg = Meshgate::start(bin(), &config(0), admin).expect("start");
    let mut h1 = connect(http);
    assert_eq!(keepalive_get(&mut h1, "/app/x"), "stable");

    // All of the app's traffic to the canary (weight 99 of 100 is the most the helper
    // writes, so check the split over many requests on the same connection).
    std::fs::write(&mg.config_path, config(99)).expect("write");
    let (code, out, err) = reload_cmd(&mg);
    assert_eq!(code, 0, "{out}{err}");
    let to_canary = (0..100)
        .filter(|_| keepalive_get(&mut h1, "/app/x") == "canary")
        .count();
    assert_eq!(to_canary, 99, "the open connection kept the old routes");

    // HTTP/2 (h2c prior knowledge): h2load sends 20 requests, 5 a second, over one
    // connection (curl 7.88 cannot reuse an h2c connection); the config goes back to
    // all-stable while it runs, and that one connection's requests reach stable again.
    let (stable_before, canary_before) = (
        stable.requests.load(Ordering::SeqCst),
        canary.requests.load(Ordering::SeqCst),
    );
    let h2load = Command::new("h2load")
        .args(["-n", "20", "-c", "1", "-m", "1", "--rps", "5"])
        .arg(format!("http://{http}/app/x"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("h2load (nghttp2-client) is installed");
    // Reload once the canary has had a few of the connection's requests.
    assert!(wait_until(Duration::from_secs(10), || canary
        .requests
        .load(Ordering::SeqCst)
        >= canary_before + 3));
    std::fs::write(&mg.config_path, config(0)).expect("write");
    let (code, out, err) = reload_cmd(&mg);
    assert_eq!(code, 0, "{out}{err}");
    let out = h2load.wait_with_output().expect("h2load");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains("20 total, 20 started, 20 done, 20 succeeded"),
        "{report}"
    );
    assert!(report.contains("1 total client"), "{report}");
    let to_stable = stable.requests.load(Ordering::SeqCst) - stable_before;
    let to_canary = canary.requests.load(Ordering::SeqCst) - canary_before;
    assert_eq!(to_stable + to_canary, 20);
    assert!(
        to_stable >= 3 && to_canary >= 3,
        "one HTTP/2 connection did not follow the reload: {to_stable} to stable, {to_canary} to canary"
    );
    // The keep-alive connection opened before both reloads follows them too.
    assert_eq!(keepalive_get(&mut h1, "/app/x"), "stable");
}
