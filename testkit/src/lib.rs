//! meshgate-testkit: what the integration tests and benchmarks share.
//!
//! - [`free_port`]: a loopback port nobody uses right now (outside the ephemeral range).
//! - [`EchoServer`]: a threaded TCP echo upstream that honours half-close.
//! - [`Meshgate`]: the real `meshgate run` binary as a child process with its own config and
//!   admin API, killed on drop; [`Meshgate::terminate`] for graceful-shutdown tests.
//! - [`http_get`]: a tiny blocking HTTP client for admin endpoints.
//! - [`http_origin`]: a tiny HTTP/1.1 origin that answers every request with a fixed body.
//! - [`HttpUpstream`]: a keep-alive HTTP/1.1 origin that answers every request with its name.
//! - [`RawOrigin`]: an origin that records every byte it receives and answers with fixed bytes
//!   (smuggling tests: "the origin received nothing"; trailers: what exactly arrived).
//! - [`prometheus_parse`]: /metrics parsed by the real Prometheus parser (`prometheus_client`).
//! - [`wait_until`]: poll with a deadline instead of sleeping.
//! - [`rss_bytes`], [`fd_count`], [`raise_nofile_limit`]: what a process holds, for leak tests.
//! - [`cli`]: run the `meshgate` binary and other tools as an operator's script would.
//! - [`web`]: the gateway with an `http` listener and a JSON access log, as the HTTP proxy
//!   tests start it.
//! - [`pki`]: test PKI over several SPIFFE trust domains and the bad-certificate matrix.
//! - `h2origin` (feature `grpc`): an h2c origin that answers with its name or misbehaves on
//!   demand (stream resets, REFUSED_STREAM, GOAWAY, a status, a stall).

pub mod cli;
#[cfg(feature = "grpc")]
pub mod grpc;
#[cfg(feature = "grpc")]
pub mod h2origin;
pub mod http;
pub mod pki;
pub mod tlsload;
pub mod web;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Resident memory of process `pid`, in bytes (0 if it cannot be read).
pub fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// Open file descriptors of process `pid` (entries of `/proc/PID/fd`; 0 if unreadable).
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Raise this process's soft `RLIMIT_NOFILE` to its hard limit (children inherit it); returns
/// the soft limit now in force.
pub fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on this process with a valid struct on our stack.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                lim = want;
            }
        }
    }
    lim.rlim_cur
}

/// The Python with py-spiffe (PyPI `spiffe`, which brings PyJWT and cryptography) that the
/// SPIFFE interop tests run: `MESHGATE_TEST_PYTHON` (.ci/run points it at its virtualenv), else
/// `python3`.
pub fn spiffe_python() -> String {
    std::env::var("MESHGATE_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// A loopback port nobody uses right now, for a server a test starts next (meshgate, openssl
/// s_server, nginx). It is taken below the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`), so no outgoing connection of this or any other process can
/// grab it between this check and the server's `bind`; ports are handed out in turn from a
/// per-process random start, so parallel tests (and test binaries) do not collide.
pub fn free_port() -> u16 {
    use std::sync::atomic::AtomicU32;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (lo, hi) = (10_000u32, ephemeral_low().saturating_sub(1).max(10_001));
    let span = hi - lo;
    let _ = NEXT.compare_exchange(
        0,
        std::process::id().wrapping_mul(2_654_435_761) % span + 1,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..span {
        let port = (lo + NEXT.fetch_add(1, Ordering::Relaxed) % span) as u16;
        // Free on 127.0.0.1 and on the wildcard (servers like openssl bind `*:port`).
        let v4 = TcpListener::bind(("127.0.0.1", port)).is_ok();
        let any = v4 && TcpListener::bind(("::", port)).is_ok();
        if any {
            return port;
        }
    }
    panic!("no free loopback port in {lo}..{hi}")
}

/// The first port of the kernel's ephemeral range (32768 when it cannot be read).
fn ephemeral_low() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// A listener on 127.0.0.1:0 with a deep accept queue (std's default is shallow, and a test
/// that opens a thousand connections at once through the gateway must not see SYNs dropped).
pub fn listen_loopback(backlog: i32) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    s.listen(backlog)?;
    Ok(s.into())
}

/// Poll `f` every 10 ms until it returns true or `timeout` passes. Returns whether it did.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// A TCP echo server on 127.0.0.1, one thread per connection. When the client half-closes, the
/// server finishes echoing and half-closes too.
#[derive(Debug)]
pub struct EchoServer {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// Connections accepted so far.
    pub accepted: Arc<AtomicUsize>,
}

impl EchoServer {
    pub fn start() -> EchoServer {
        let l = listen_loopback(4096).expect("bind echo server");
        let addr = l.local_addr().expect("local addr");
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (st, acc) = (stop.clone(), accepted.clone());
        thread::Builder::new()
            .name("echo-accept".into())
            .spawn(move || {
                for conn in l.incoming() {
                    if st.load(Ordering::Acquire) {
                        break;
                    }
                    let Ok(mut c) = conn else { continue };
                    acc.fetch_add(1, Ordering::AcqRel);
                    let _ = thread::Builder::new().stack_size(64 * 1024).spawn(move || {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            match c.read(&mut buf) {
                                Ok(0) => {
                                    let _ = c.shutdown(Shutdown::Write);
                                    break;
                                }
                                Ok(n) => {
                                    if c.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                                Err(_) => break,
                            }
                        }
                    });
                }
            })
            .expect("spawn echo accept thread");
        EchoServer {
            addr,
            stop,
            accepted,
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = TcpStream::connect(self.addr); // wake the accept loop
    }
}

/// An HTTP/1.1 origin on 127.0.0.1: every request (bodies are not expected) gets `200` (or
/// the status set with [`HttpUpstream::set_status`]) with the server's `name` as body;
/// connections are kept alive. One thread per connection.
#[derive(Debug)]
pub struct HttpUpstream {
    pub addr: SocketAddr,
    pub name: String,
    /// Requests answered so far.
    pub requests: Arc<AtomicUsize>,
    /// The status answered now (200, or a failure's; see [`HttpUpstream::set_status`]).
    status: Arc<std::sync::atomic::AtomicU16>,
    stop: Arc<AtomicBool>,
}

/// How an [`HttpUpstream`] fails every request instead of answering 200.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Reset the connection (SO_LINGER 0, then close) once the head arrived: the client sees
    /// ECONNRESET and no response byte.
    Reset,
    /// Answer with this status (body: the status as text), keeping the connection alive.
    Status(u16),
}

impl HttpUpstream {
    pub fn start(name: &str) -> HttpUpstream {
        Self::start_with_delay(name, Duration::ZERO)
    }

    /// Like [`HttpUpstream::start`], answering each request `delay` after its head arrived
    /// (`requests` counts it on arrival).
    pub fn start_with_delay(name: &str, delay: Duration) -> HttpUpstream {
        Self::spawn(name, delay, None)
    }

    /// An origin that fails every request as `fault` says, `delay` after its head arrived.
    pub fn start_failing(fault: Fault, delay: Duration) -> HttpUpstream {
        Self::spawn("failing", delay, Some(fault))
    }

    fn spawn(name: &str, delay: Duration, fault: Option<Fault>) -> HttpUpstream {
        let l = listen_loopback(4096).expect("bind http upstream");
        let addr = l.local_addr().expect("local addr");
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicUsize::new(0));
        let initial = match fault {
            Some(Fault::Status(code)) => code,
            _ => 200,
        };
        let status = Arc::new(std::sync::atomic::AtomicU16::new(initial));
        let reset = fault == Some(Fault::Reset);
        let (st, reqs, body, code) = (
            stop.clone(),
            requests.clone(),
            name.to_string(),
            status.clone(),
        );
        thread::Builder::new()
            .name("http-upstream".into())
            .spawn(move || {
                for conn in l.incoming() {
                    if st.load(Ordering::Acquire) {
                        break;
                    }
                    let Ok(c) = conn else { continue };
                    let (reqs, body, code) = (reqs.clone(), body.clone(), code.clone());
                    let _ = thread::Builder::new()
                        .stack_size(64 * 1024)
                        .spawn(move || serve_http(c, &reqs, &body, delay, reset, &code));
                }
            })
            .expect("spawn http upstream");
        HttpUpstream {
            addr,
            name: name.to_string(),
            requests,
            status,
            stop,
        }
    }

    /// Answer every request from now on with `status` (e.g. 500 to fail health checks; 200
    /// answers with the name again).
    pub fn set_status(&self, status: u16) {
        self.status.store(status, Ordering::Release);
    }

    /// Requests received so far.
    pub fn count(&self) -> usize {
        self.requests.load(Ordering::Acquire)
    }
}

fn serve_http(
    mut c: TcpStream,
    requests: &AtomicUsize,
    body: &str,
    delay: Duration,
    reset: bool,
    status: &std::sync::atomic::AtomicU16,
) {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.drain(..end + 4);
            requests.fetch_add(1, Ordering::AcqRel);
            if !delay.is_zero() {
                thread::sleep(delay);
            }
            if reset {
                let _ = socket2::SockRef::from(&c).set_linger(Some(Duration::ZERO));
                return;
            }
            let resp = match status.load(Ordering::Acquire) {
                200 => format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                ),
                code => format!("HTTP/1.1 {code} Failing\r\ncontent-length: 4\r\n\r\n{code}\n"),
            };
            if c.write_all(resp.as_bytes()).is_err() {
                return;
            }
        }
        match c.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

impl Drop for HttpUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = TcpStream::connect(self.addr); // wake the accept loop
    }
}

/// One sample of a parsed exposition.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub value: f64,
}

/// One metric family of a parsed exposition.
#[derive(Debug, Clone)]
pub struct Family {
    pub name: String,
    /// `counter`, `gauge`, `histogram`, ...
    pub kind: String,
    pub samples: Vec<Sample>,
}

/// A Python interpreter that has the `prometheus_client` package (Debian's
/// python3-prometheus-client installs it for /usr/bin/python3).
fn python_with_prometheus_client() -> Option<&'static str> {
    ["/usr/bin/python3", "python3"].into_iter().find(|py| {
        Command::new(py)
            .args(["-c", "import prometheus_client.openmetrics.parser"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// Parse an OpenMetrics text exposition with the reference Python parser
/// (`prometheus_client.openmetrics.parser`), which rejects anything malformed: bad names,
/// labels or values, a family declared twice, non-cumulative or unsorted histogram buckets, a
/// histogram without `+Inf`, a missing `# EOF`.
pub fn prometheus_parse(text: &str) -> Result<Vec<Family>> {
    const SCRIPT: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = []
for f in text_string_to_metric_families(sys.stdin.read()):
    out.append({"name": f.name, "type": f.type,
                "samples": [{"name": s.name, "labels": s.labels, "value": s.value} for s in f.samples]})
print(json.dumps(out))
"#;
    let py = python_with_prometheus_client().context(
        "no python3 with the prometheus_client package: apt-get install python3-prometheus-client",
    )?;
    let mut child = Command::new(py)
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("run python3")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "the Prometheus parser refused the exposition: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let mut families = Vec::new();
    for f in v.as_array().context("a list")? {
        let samples = f["samples"]
            .as_array()
            .context("samples")?
            .iter()
            .map(|s| Sample {
                name: s["name"].as_str().unwrap_or_default().to_string(),
                labels: s["labels"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                            .collect()
                    })
                    .unwrap_or_default(),
                value: s["value"].as_f64().unwrap_or(f64::NAN),
            })
            .collect();
        families.push(Family {
            name: f["name"].as_str().unwrap_or_default().to_string(),
            kind: f["type"].as_str().unwrap_or_default().to_string(),
            samples,
        });
    }
    Ok(families)
}

/// GET `path` from `addr` over HTTP/1.1; returns (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    http_request(addr, "GET", path, None)
}

/// `method` `path` to `addr` over HTTP/1.1 on a new connection, with `body` (sent with a
/// content-length, in the same write as the head); returns (status, body).
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n").into_bytes();
    if let Some(body) = body {
        write!(req, "content-length: {}\r\n", body.len())?;
    }
    req.extend_from_slice(b"\r\n");
    req.extend_from_slice(body.unwrap_or_default());
    s.write_all(&req)?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").context("no header end")?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no status code")?;
    Ok((code, body.to_string()))
}

/// Send one keep-alive `GET path` with `headers` on `s` and read its response (framed by
/// content-length); returns (status, lowercase head, body).
pub fn keep_alive_get(
    s: &mut TcpStream,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String, String) {
    let mut req = format!("GET {path} HTTP/1.1\r\nhost: t\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).expect("write");
    let mut got = Vec::new();
    let mut b = [0u8; 4096];
    loop {
        let n = s.read(&mut b).expect("read");
        assert!(
            n > 0,
            "closed before a response: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&b[..n]);
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let head = head.to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap_or(0))
                })
                .unwrap_or(0);
            if body.len() >= len {
                let status = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(0);
                return (status, head, body[..len].to_owned());
            }
        }
    }
}

/// A tiny HTTP/1.1 origin on 127.0.0.1: every connection gets a 200 with `body` and is closed.
pub fn http_origin(body: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let a = l.local_addr().expect("addr");
    thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = write!(
                    c,
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    a
}

/// The JSON records of an access log file so far (complete lines only: the writer may be
/// mid-record).
pub fn access_log_records(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |i| &text[..i]);
    complete
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// A TCP origin on 127.0.0.1 that records every byte any connection sends it and, each time
/// the bytes since its last answer contain `until`, writes `response` (keep-alive).
#[derive(Debug, Clone)]
pub struct RawOrigin {
    pub addr: SocketAddr,
    received: Arc<std::sync::Mutex<Vec<u8>>>,
}

impl RawOrigin {
    pub fn start(until: &'static [u8], response: &'static [u8]) -> RawOrigin {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let received = Arc::new(std::sync::Mutex::new(Vec::new()));
        let all = received.clone();
        thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { continue };
                let all = all.clone();
                thread::spawn(move || {
                    let mut pending = Vec::new();
                    let mut buf = [0u8; 16384];
                    loop {
                        match c.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if let Ok(mut a) = all.lock() {
                                    a.extend_from_slice(&buf[..n]);
                                }
                                pending.extend_from_slice(&buf[..n]);
                            }
                        }
                        while let Some(end) = pending.windows(until.len()).position(|w| w == until)
                        {
                            pending.drain(..end + until.len());
                            if c.write_all(response).is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        RawOrigin { addr, received }
    }

    /// Every byte received so far, from all connections, in arrival order per connection.
    pub fn received(&self) -> Vec<u8> {
        self.received.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

/// The first access-log record for which `want` holds, waiting up to 5 s for the writer.
pub fn access_log_record(
    path: &Path,
    mut want: impl FnMut(&serde_json::Value) -> bool,
) -> Option<serde_json::Value> {
    let mut found = None;
    wait_until(Duration::from_secs(5), || {
        found = access_log_records(path).into_iter().find(|r| want(r));
        found.is_some()
    });
    found
}

/// Read a counter or gauge value from Prometheus text: sum of all series of `name` whose
/// labels contain every `label=value` in `labels`.
pub fn metric_sum(metrics: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            if n != name {
                return None;
            }
            if labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
            {
                value.parse::<f64>().ok()
            } else {
                None
            }
        })
        .sum()
}

/// The real `meshgate run` as a child process.
#[derive(Debug)]
pub struct Meshgate {
    child: Option<Child>,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
}

impl Meshgate {
    /// Write `config` to a temp dir, start `bin run --config`, wait until `/ready` answers 200.
    /// `admin` must be the admin address the config names.
    pub fn start(bin: &Path, config: &str, admin: SocketAddr) -> Result<Meshgate> {
        Self::start_with_args(bin, config, admin, &[])
    }

    /// Like [`Meshgate::start`], with extra `meshgate run` arguments (`--state-dir DIR` replaces
    /// the default `<temp dir>/state`).
    pub fn start_with_args(
        bin: &Path,
        config: &str,
        admin: SocketAddr,
        extra: &[&str],
    ) -> Result<Meshgate> {
        Self::start_with_env(bin, config, admin, extra, &[])
    }

    /// Like [`Meshgate::start_with_args`], with extra environment variables.
    pub fn start_with_env(
        bin: &Path,
        config: &str,
        admin: SocketAddr,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Meshgate> {
        let dir = tempfile::tempdir()?;
        let config_path = dir.path().join("meshgate.toml");
        std::fs::write(&config_path, config)?;
        let log = std::fs::File::create(dir.path().join("meshgate.log"))?;
        let mut cmd = Command::new(bin);
        cmd.arg("run").arg("--config").arg(&config_path);
        // A test may bring its own state directory (a CA, a trust store) in `extra`.
        if !extra.contains(&"--state-dir") {
            cmd.arg("--state-dir").arg(dir.path().join("state"));
        }
        let child = cmd
            .args(extra)
            .env("MESHGATE_LOG", "info,meshgate_dataplane=debug")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        let mut mg = Meshgate {
            child: Some(child),
            admin,
            dir,
            config_path,
        };
        let ok = wait_until(Duration::from_secs(15), || {
            if let Some(c) = mg.child.as_mut()
                && let Ok(Some(_)) = c.try_wait()
            {
                return true;
            }
            matches!(http_get(admin, "/ready"), Ok((200, _)))
        });
        if let Some(c) = mg.child.as_mut()
            && let Ok(Some(status)) = c.try_wait()
        {
            bail!(
                "meshgate exited during start-up ({status}); log:\n{}",
                mg.log()
            );
        }
        if !ok {
            bail!("meshgate not ready after 15s; log:\n{}", mg.log());
        }
        Ok(mg)
    }

    /// The gateway's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("meshgate.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn get(&self, path: &str) -> Result<(u16, String)> {
        http_get(self.admin, path)
    }

    pub fn metrics(&self) -> String {
        self.get("/metrics").map(|(_, b)| b).unwrap_or_default()
    }

    /// Send a signal (e.g. `libc::SIGTERM`).
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.pid() as libc::pid_t, sig);
        }
    }

    /// SIGTERM, then wait up to `timeout` for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.signal(libc::SIGTERM);
        self.wait(timeout)
    }

    /// Wait up to `timeout` for the process to exit.
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let mut child = self.child.take().context("already waited")?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = child.try_wait()? {
                return Ok(st);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "meshgate did not exit within {timeout:?}; log:\n{}",
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Meshgate {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A minimal gateway config: one tcp listener -> one cluster.
pub fn tcp_config(
    admin: SocketAddr,
    listen: SocketAddr,
    endpoints: &[SocketAddr],
    extra_listener: &str,
) -> String {
    let eps: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    format!(
        r#"version = 1

[admin]
address = "{admin}"

[runtime]
cores = 2
drain_timeout = "5s"

[[listeners]]
name = "in"
address = "{listen}"
protocol = "tcp"
{extra_listener}

[[routes]]
name = "default"
listener = "in"
cluster = "up"

[[clusters]]
name = "up"
endpoints = [{}]
connect_timeout = "2s"
"#,
        eps.join(", ")
    )
}

/// A gateway config with an `http` listener and a `tcp` listener:
/// - `web-in` (`http`): route `healthz` (`/healthz`, answered by the gateway), route `app`
///   (`/app...`) to cluster `stable`, or split `stable`/`canary` by `canary_weight` out of 100
///   when it is not 0; anything else 404.
/// - `tcp-in` (`tcp`): route `tcp` to cluster `echo`.
///
/// `extra` is appended (e.g. a `[telemetry]` table).
pub fn http_tcp_config(
    admin: SocketAddr,
    http: SocketAddr,
    tcp: SocketAddr,
    (stable, canary, canary_weight): (SocketAddr, SocketAddr, u32),
    echo: SocketAddr,
    extra: &str,
) -> String {
    let app = if canary_weight == 0 {
        "cluster = \"stable\"".to_string()
    } else {
        format!(
            "weighted_clusters = [{{ cluster = \"stable\", weight = {} }}, {{ cluster = \"canary\", weight = {canary_weight} }}]",
            100 - canary_weight.min(99)
        )
    };
    format!(
        r#"version = 1

[admin]
address = "{admin}"

[runtime]
cores = 2
drain_timeout = "5s"

[[listeners]]
name = "web-in"
address = "{http}"
protocol = "http"

[[listeners]]
name = "tcp-in"
address = "{tcp}"
protocol = "tcp"

[[routes]]
name = "healthz"
listener = "web-in"
match = {{ path = {{ exact = "/healthz" }} }}
direct_response = {{ status = 200, body = "ok\n" }}

[[routes]]
name = "app"
listener = "web-in"
match = {{ path = {{ prefix = "/app" }} }}
{app}

[[routes]]
name = "tcp"
listener = "tcp-in"
cluster = "echo"

[[clusters]]
name = "stable"
endpoints = ["{stable}"]

[[clusters]]
name = "canary"
endpoints = ["{canary}"]

[[clusters]]
name = "echo"
endpoints = ["{echo}"]
{extra}"#
    )
}

/// A 64-bit FNV-1a running checksum.
#[derive(Debug, Clone, Copy)]
pub struct Fnv(pub u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn update(&mut self, data: &[u8]) {
        for &b in data {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift), so a transfer's content is not trivially
/// compressible or periodic.
pub fn fill_pseudo_random(seed: &mut u64, buf: &mut [u8]) {
    for chunk in buf.chunks_mut(8) {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        let bytes = seed.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
}
