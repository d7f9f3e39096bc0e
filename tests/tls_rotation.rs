//! Certificate and trust-bundle rotation without restart, under load: the real binary, real
//! rustls clients with client certificates (testkit's load generator), files replaced
//! atomically and picked up by the file watch or by SIGHUP.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use meshgate_control::state::write_atomic;
use meshgate_testkit::pki::{Leaf, TrustDomainCa};
use meshgate_testkit::tlsload::{self, SharedConfig, TlsLoad, Versions};
use meshgate_testkit::{EchoServer, Meshgate, free_port, metric_sum, wait_until};
use rustls::client::Resumption;
use rustls::pki_types::CertificateDer;

const NAME: &str = "gateway.example.test";

/// The tests of this file run one at a time: the rate one measures handshakes per second, and
/// must not share the cores with the other.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial_guard() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_meshgate"))
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The files the gateway's config names.
struct Files {
    cert: PathBuf,
    key: PathBuf,
    bundle: PathBuf,
}

impl Files {
    fn new(dir: &Path) -> Files {
        Files {
            cert: dir.join("server.pem"),
            key: dir.join("server-key.pem"),
            bundle: dir.join("bundle.pem"),
        }
    }

    /// Replace the server certificate and key, each by write-to-temp + rename.
    fn write_server(&self, leaf: &Leaf) {
        write_atomic(&self.cert, leaf.chain_pem.as_bytes(), 0o644).expect("write cert");
        write_atomic(&self.key, leaf.key_pem.as_bytes(), 0o600).expect("write key");
    }

    /// Replace the trust bundle of example.test with these roots.
    fn write_bundle(&self, roots: &[&TrustDomainCa]) {
        let pem: String = roots.iter().map(|ca| ca.root_pem()).collect();
        write_atomic(&self.bundle, pem.as_bytes(), 0o644).expect("write bundle");
    }
}

fn config(admin: SocketAddr, listen: SocketAddr, echo: SocketAddr, files: &Files) -> String {
    format!(
        r#"version = 1
[admin]
address = "{admin}"
[runtime]
cores = 2
[[listeners]]
name = "mtls"
address = "{listen}"
protocol = "tls"
[listeners.tls]
certificates = [{{ cert = "{}", key = "{}" }}]
client_auth = "required"
trust_bundles = [{{ trust_domain = "example.test", bundle = "{}" }}]
[[routes]]
name = "clients"
listener = "mtls"
cluster = "echo"
match = {{ peer = {{ trust_domains = ["example.test"] }} }}
[[clusters]]
name = "echo"
endpoints = ["{echo}"]
"#,
        files.cert.display(),
        files.key.display(),
        files.bundle.display()
    )
}

/// Full handshakes only (no session reuse), presenting `identity`.
fn full_handshakes(
    roots: &[CertificateDer<'static>],
    identity: &Leaf,
    v: Versions,
) -> SharedConfig {
    SharedConfig::new(
        tlsload::client_config(roots, Some(identity), v, Resumption::disabled()).expect("config"),
    )
}

/// The certificate the gateway serves now, seen through a handshake with `identity`.
fn served(
    listen: SocketAddr,
    roots: &[CertificateDer<'static>],
    identity: &Leaf,
) -> Option<CertificateDer<'static>> {
    let config = tlsload::client_config(
        roots,
        Some(identity),
        Versions::Both,
        Resumption::disabled(),
    )
    .ok()?;
    let mut tls = tlsload::connect(listen, config, NAME).ok()?;
    tlsload::echo(&mut tls, b"probe\n").ok()?;
    let cert = tls.conn.peer_certificates()?.first()?.clone();
    tlsload::close(tls);
    Some(cert)
}

/// CPU time (user + system) of process `pid` so far, from /proc.
fn cpu_of(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the `(comm)`: state is field 3; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis(f.iter().sum::<u64>() * 1000 / hz)
}

/// Serials of the bundle roots `GET /certs` lists.
fn bundle_serials(mg: &Meshgate) -> Vec<String> {
    let Ok((200, body)) = mg.get("/certs") else {
        return Vec::new();
    };
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    v.as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["kind"] == "bundle_root")
        .filter_map(|c| c["serial"].as_str().map(str::to_owned))
        .collect()
}

fn serial(ca: &TrustDomainCa) -> String {
    meshgate_config::pem::summarize(&ca.root_der())
        .expect("root parses")
        .serial
}

#[test]
fn rotating_cert_and_bundle_twenty_times_under_load_drops_nothing() {
    let _serial = serial_guard();
    const ROTATIONS: usize = 20;
    // One CA per bundle generation; the bundle always holds the previous and the current
    // root, so clients can move to the new CA one rotation after the gateway trusts it.
    let cas: Vec<TrustDomainCa> = (0..=ROTATIONS)
        .map(|_| TrustDomainCa::new("example.test", false).expect("ca"))
        .collect();
    let roots: Vec<CertificateDer<'static>> = cas.iter().map(|c| c.root_der()).collect();
    let clients: Vec<Leaf> = cas.iter().map(|c| c.svid("/load").expect("svid")).collect();
    let servers: Vec<Leaf> = cas
        .iter()
        .map(|c| c.server(&[NAME]).expect("server"))
        .collect();

    let dir = tempfile::tempdir().expect("tempdir");
    let files = Files::new(dir.path());
    files.write_server(&servers[0]);
    files.write_bundle(&[&cas[0]]);
    let echo = EchoServer::start();
    let admin = addr(free_port());
    let listen = addr(free_port());
    let mg =
        Meshgate::start(bin(), &config(admin, listen, echo.addr, &files), admin).expect("start");

    // Long-lived connections over both versions, open across every rotation.
    let mut long_lived: Vec<_> = [Versions::Both, Versions::Tls12Only]
        .into_iter()
        .cycle()
        .take(6)
        .map(|v| {
            let config = full_handshakes(&roots, &clients[0], v).get();
            tlsload::connect(listen, config, NAME).expect("long-lived connection")
        })
        .collect();
    for (i, c) in long_lived.iter_mut().enumerate() {
        tlsload::echo(c, format!("long {i} before\n").as_bytes()).expect("long-lived echo");
    }

    // 8 threads x 40 full handshakes per second: TLS 1.3 and TLS 1.2, all with client certs.
    let versions = [Versions::Both, Versions::Tls12Only].repeat(4);
    let configs: Vec<SharedConfig> = versions
        .iter()
        .map(|v| full_handshakes(&roots, &clients[0], *v))
        .collect();
    let cpu_before = (cpu_of(mg.pid()), cpu_of(std::process::id()));
    let load = TlsLoad::start(listen, NAME, configs.clone(), 40.0);
    // Under way before the first rotation: a few dozen handshakes done.
    assert!(
        wait_until(Duration::from_secs(10), || load.counts.ok() >= 50),
        "the load generator did not get going"
    );

    let mut waits = Vec::new();
    for i in 1..=ROTATIONS {
        let begun = Instant::now();
        // The bundle first (old + new root), then the server certificate of the new CA.
        files.write_bundle(&[&cas[i - 1], &cas[i]]);
        files.write_server(&servers[i]);
        let by_signal = i % 2 == 0;
        if by_signal {
            mg.signal(libc::SIGHUP);
        }
        // Applied: the new certificate is served and the new root is trusted. The probe uses
        // the previous identity, valid before and after, so it never fails a handshake.
        let want_root = serial(&cas[i]);
        assert!(
            wait_until(Duration::from_secs(15), || {
                served(listen, &roots, &clients[i - 1]).as_ref() == Some(servers[i].cert())
                    && bundle_serials(&mg).contains(&want_root)
            }),
            "rotation {i} ({}) not applied:\n{}",
            if by_signal { "SIGHUP" } else { "file watch" },
            mg.log()
        );
        waits.push(begun.elapsed());
        // Now move the clients to the new CA's identity.
        for (c, v) in configs.iter().zip(&versions) {
            c.set(full_handshakes(&roots, &clients[i], *v).get());
        }
        for (n, c) in long_lived.iter_mut().enumerate() {
            tlsload::echo(c, format!("long {n} after rotation {i}\n").as_bytes()).unwrap_or_else(
                |e| panic!("long-lived connection {n} broke at rotation {i}: {e:#}"),
            );
        }
    }
    // Some load on the last material too.
    let at_last = load.counts.ok();
    assert!(
        wait_until(Duration::from_secs(10), || load.counts.ok() >= at_last + 50),
        "no handshakes on the last material"
    );
    let (counts, ran) = load.stop();
    let rate = counts.ok() as f64 / ran.as_secs_f64();
    let per = |d: Duration| d.as_secs_f64() * 1e6 / counts.ok().max(1) as f64;
    eprintln!(
        "{} full handshakes in {ran:?} ({rate:.0}/s), {} failed; CPU per handshake: gateway {:.0} us, clients {:.0} us; rotation applied after {:?}",
        counts.ok(),
        counts.failed(),
        per(cpu_of(mg.pid()) - cpu_before.0),
        per(cpu_of(std::process::id()) - cpu_before.1),
        waits
    );
    assert_eq!(
        counts.failed(),
        0,
        "failed connections: {:#?}\n{}",
        counts.errors(),
        mg.log()
    );
    // The issue's bar. On a machine known to be oversubscribed (other builds and tests
    // competing for the cores), MESHGATE_TEST_MIN_HANDSHAKE_RATE lowers it explicitly; the
    // figures above say what the gateway and the clients cost per handshake.
    let min_rate: f64 = std::env::var("MESHGATE_TEST_MIN_HANDSHAKE_RATE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200.0);
    assert!(
        rate >= min_rate,
        "only {rate:.0} full handshakes/s (need {min_rate}); load average: {}",
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default()
    );
    for (n, c) in long_lived.iter_mut().enumerate() {
        tlsload::echo(c, format!("long {n} at the end\n").as_bytes()).expect("long-lived echo");
    }
    for c in long_lived {
        tlsload::close(c);
    }

    // The gateway saw the same: no failed handshake at all, and at least the odd rotations
    // came from the file watch (the even ones may have been seen by both triggers).
    let m = mg.metrics();
    assert_eq!(
        metric_sum(
            &m,
            "meshgate_tls_handshakes_total",
            &[("listener", "mtls"), ("result", "failed")]
        ),
        0.0,
        "{m}"
    );
    assert!(
        metric_sum(&m, "meshgate_tls_handshakes_total", &[("result", "full")])
            >= counts.ok() as f64
    );
    assert!(
        metric_sum(&m, "meshgate_tls_file_reloads_total", &[("result", "ok")])
            >= (ROTATIONS / 2) as f64,
        "{m}"
    );
    assert_eq!(
        metric_sum(
            &m,
            "meshgate_tls_file_reloads_total",
            &[("result", "error")]
        ),
        0.0
    );
    assert!(metric_sum(&m, "meshgate_config_generation", &[]) >= (ROTATIONS + 1) as f64);
}

#[test]
fn a_bad_new_file_is_refused_logged_and_counted_and_the_old_material_stays() {
    let _serial = serial_guard();
    let ca = TrustDomainCa::new("example.test", false).expect("ca");
    let roots = vec![ca.root_der()];
    let client = ca.svid("/client").expect("svid");
    let first = ca.server(&[NAME]).expect("server");
    let dir = tempfile::tempdir().expect("tempdir");
    let files = Files::new(dir.path());
    files.write_server(&first);
    files.write_bundle(&[&ca]);
    let echo = EchoServer::start();
    let admin = addr(free_port());
    let listen = addr(free_port());
    let mg =
        Meshgate::start(bin(), &config(admin, listen, echo.addr, &files), admin).expect("start");
    let errors = |mg: &Meshgate| {
        metric_sum(
            &mg.metrics(),
            "meshgate_tls_file_reloads_total",
            &[("result", "error")],
        )
    };

    // A certificate that is not PEM, put in place by rename.
    write_atomic(&files.cert, b"not a certificate\n", 0o644).expect("write");
    assert!(
        wait_until(Duration::from_secs(10), || errors(&mg) >= 1.0),
        "{}",
        mg.log()
    );
    let log = mg.log();
    assert!(
        log.lines()
            .any(|l| l.contains("ERROR") && l.contains(&*files.cert.to_string_lossy())),
        "the error names the file:\n{log}"
    );
    assert_eq!(
        served(listen, &roots, &client).as_ref(),
        Some(first.cert()),
        "the old certificate is still served"
    );

    // A key that does not match the certificate: refused too (the pair is checked).
    let other = ca.server(&[NAME]).expect("server");
    write_atomic(&files.cert, first.chain_pem.as_bytes(), 0o644).expect("write");
    write_atomic(&files.key, other.key_pem.as_bytes(), 0o600).expect("write");
    assert!(
        wait_until(Duration::from_secs(10), || errors(&mg) >= 2.0),
        "{}",
        mg.log()
    );
    assert_eq!(served(listen, &roots, &client).as_ref(), Some(first.cert()));

    // Fixed: the next change is applied.
    files.write_server(&other);
    assert!(
        wait_until(Duration::from_secs(10), || served(listen, &roots, &client)
            .as_ref()
            == Some(other.cert())),
        "{}",
        mg.log()
    );
    assert_eq!(errors(&mg), 2.0);
}
