//! The CI regression guard for the hot path. It times nothing: it counts the heap allocations
//! and the syscalls meshgate's shard makes per proxied HTTP/1.1 request and per TCP round trip
//! on a fixed small workload, and fails when either exceeds the budgets in
//! `perf/budgets.toml` by more than their margin.
//!
//! How: the gateway runs in this process (`meshgate_dataplane::Gateway`, one shard, the same
//! code `meshgate run` starts) so that a counting global allocator sees its allocations. The
//! origin and the client are plain blocking threads that allocate nothing per request (fixed
//! buffers), so every allocation counted while the workload runs is the gateway's. Syscalls are
//! counted on the shard thread only, by `strace -c -p <tid>` (ptrace sees every syscall;
//! io_uring operations are not syscalls and are not counted). Each workload runs a warm-up
//! first (pools, buffers, first-use allocations), then the counted requests, one at a time
//! (closed loop, one connection after another), so the figures do not depend on timing.
//!
//! `harness = false`: no libtest threads allocating next to the gateway. Run it with
//! `cargo test -p meshgate-perf --test budget` (also part of `.ci/run`). Without strace the
//! syscall half fails unless `MESHGATE_BUDGET_NO_STRACE=1` says to skip it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Connections per workload, and requests (round trips) per connection.
const CONNECTIONS: usize = 4;
const WARMUP_PER_CONN: usize = 100;
const COUNTED_PER_CONN: usize = 500;

const RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\nContent-Type: text/plain\r\n\r\nhello world\n";
const REQUEST: &[u8] =
    b"GET /budget HTTP/1.1\r\nHost: budget.test\r\nUser-Agent: meshgate-budget\r\n\r\n";
const MESSAGE: usize = 64;

/// Origin: one thread per connection; HTTP answers each request head with [`RESPONSE`], TCP
/// echoes. Fixed buffers, no allocation per request.
fn origin(http: bool) -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    std::thread::Builder::new()
        .name("budget-origin".into())
        .spawn(move || {
            for s in l.incoming() {
                let mut s = match s {
                    Ok(s) => s,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => return,
                };
                let _ = s.set_nodelay(true);
                let _ = std::thread::Builder::new()
                    .name("budget-origin-conn".into())
                    .spawn(move || {
                        let mut buf = [0u8; 8192];
                        let mut have = 0;
                        loop {
                            let n = match s.read(&mut buf[have..]) {
                                // strace attaching to the shard thread can interrupt a read.
                                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if !http {
                                if s.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                                continue;
                            }
                            have += n;
                            // One request at a time (the client does not pipeline).
                            while let Some(end) =
                                buf[..have].windows(4).position(|w| w == b"\r\n\r\n")
                            {
                                if s.write_all(RESPONSE).is_err() {
                                    return;
                                }
                                buf.copy_within(end + 4..have, 0);
                                have -= end + 4;
                            }
                            if have == buf.len() {
                                return;
                            }
                        }
                    });
            }
        })?;
    Ok(addr)
}

fn config(origin_http: SocketAddr, origin_tcp: SocketAddr) -> String {
    format!(
        r#"version = 1
[runtime]
cores = 1
pin = false

[[listeners]]
name = "http"
address = "127.0.0.1:0"
protocol = "http"

[[listeners]]
name = "tcp"
address = "127.0.0.1:0"
protocol = "tcp"

[[routes]]
name = "http"
listener = "http"
cluster = "http"

[[routes]]
name = "tcp"
listener = "tcp"
cluster = "tcp"

[[clusters]]
name = "http"
endpoints = ["{origin_http}"]

[[clusters]]
name = "tcp"
endpoints = ["{origin_tcp}"]
"#
    )
}

/// One closed-loop exchange on `s`; `buf` is reused.
fn exchange(s: &mut TcpStream, http: bool, buf: &mut [u8]) -> Result<()> {
    if http {
        s.write_all(REQUEST)?;
        let mut got = 0;
        while got < RESPONSE.len() {
            let n = match s.read(&mut buf[got..]) {
                // strace attaching to the shard thread can interrupt a read.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => r?,
            };
            if n == 0 {
                bail!("gateway closed the connection");
            }
            got += n;
        }
        if !buf[..got].starts_with(b"HTTP/1.1 200") {
            bail!(
                "unexpected response: {:?}",
                String::from_utf8_lossy(&buf[..got.min(80)])
            );
        }
    } else {
        s.write_all(&buf[..MESSAGE])?;
        s.read_exact(&mut buf[MESSAGE..2 * MESSAGE])?;
    }
    Ok(())
}

/// Runs `per_conn` exchanges on each of the connections, one connection after the other.
fn workload(conns: &mut [TcpStream], http: bool, per_conn: usize) -> Result<()> {
    let mut buf = [b'm'; 4096];
    for c in conns.iter_mut() {
        for _ in 0..per_conn {
            exchange(c, http, &mut buf)?;
        }
    }
    Ok(())
}

fn shard_tid() -> Result<u32> {
    for e in std::fs::read_dir("/proc/self/task")? {
        let e = e?;
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if comm.trim().starts_with("meshgate-shard") {
            return e.file_name().to_string_lossy().parse().context("task id");
        }
    }
    bail!("no meshgate-shard thread in this process")
}

/// `strace -c` attached to one thread; counts every syscall it makes until stopped.
struct Strace {
    child: Child,
    out: std::path::PathBuf,
    tid: u32,
}

impl Strace {
    fn attach(tid: u32, out: &Path) -> Result<Self> {
        let child = Command::new("strace")
            .args(["-c", "-o"])
            .arg(out)
            .args(["-p", &tid.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("running strace (Debian package strace)")?;
        let s = Self {
            child,
            out: out.to_path_buf(),
            tid,
        };
        // Attached once the thread shows a tracer.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status"))?;
            let traced = status
                .lines()
                .find_map(|l| l.strip_prefix("TracerPid:"))
                .is_some_and(|v| v.trim() != "0");
            if traced {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!("strace did not attach to thread {tid} within 10 s (ptrace not allowed?)");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Detaches and returns the total syscall count.
    fn finish(mut self) -> Result<u64> {
        // SAFETY: kill has no memory-safety preconditions; the pid is our child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        self.child.wait()?;
        let text = std::fs::read_to_string(&self.out)?;
        let total = text
            .lines()
            .find(|l| l.trim_end().ends_with("total"))
            .with_context(|| format!("no total in strace output for {}:\n{text}", self.tid))?;
        // "100.00    0.000123           1       123         4 total": calls is the 4th column.
        let cols: Vec<&str> = total.split_ascii_whitespace().collect();
        cols.get(3)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("unexpected strace total line: {total}"))
    }
}

#[derive(Debug, Clone, Copy)]
struct Budget {
    allocs: f64,
    syscalls: f64,
}

fn budgets(path: &Path) -> Result<(f64, Budget, Budget)> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let v: toml::Table = text.parse().context("perf/budgets.toml")?;
    let num = |section: &str, key: &str| -> Result<f64> {
        v.get(section)
            .and_then(|s| s.get(key))
            .and_then(|x| x.as_float().or_else(|| x.as_integer().map(|i| i as f64)))
            .with_context(|| format!("perf/budgets.toml: missing number {section}.{key}"))
    };
    Ok((
        num("margin", "fraction")?,
        Budget {
            allocs: num("http1", "allocs_per_request")?,
            syscalls: num("http1", "syscalls_per_request")?,
        },
        Budget {
            allocs: num("tcp", "allocs_per_round_trip")?,
            syscalls: num("tcp", "syscalls_per_round_trip")?,
        },
    ))
}

/// Measured figures of one workload.
#[derive(Debug)]
struct Measured {
    allocs: f64,
    syscalls: Option<f64>,
}

fn measure(addr: SocketAddr, http: bool, strace: bool, dir: &Path) -> Result<Measured> {
    let mut conns: Vec<TcpStream> = (0..CONNECTIONS)
        .map(|_| -> Result<TcpStream> {
            let s = TcpStream::connect(addr)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            Ok(s)
        })
        .collect::<Result<_>>()?;
    workload(&mut conns, http, WARMUP_PER_CONN)?;
    let n = (CONNECTIONS * COUNTED_PER_CONN) as f64;

    let a0 = ALLOCS.load(Ordering::Relaxed);
    workload(&mut conns, http, COUNTED_PER_CONN)?;
    let allocs = (ALLOCS.load(Ordering::Relaxed) - a0) as f64 / n;

    let syscalls = if strace {
        let name = if http { "http1" } else { "tcp" };
        let tracer = Strace::attach(shard_tid()?, &dir.join(format!("strace-{name}.txt")))?;
        let r = workload(&mut conns, http, COUNTED_PER_CONN);
        let total = tracer.finish()?;
        r?;
        Some(total as f64 / n)
    } else {
        None
    };
    Ok(Measured { allocs, syscalls })
}

fn check(what: &str, unit: &str, m: &Measured, b: Budget, margin: f64, failures: &mut Vec<String>) {
    let limit = |budget: f64| budget * (1.0 + margin) + 0.05;
    println!(
        "{what}: {:.3} allocations / {unit} (budget {}, limit {:.3}); syscalls / {unit}: {} (budget {}, limit {:.3})",
        m.allocs,
        b.allocs,
        limit(b.allocs),
        m.syscalls
            .map_or("not counted".into(), |s| format!("{s:.3}")),
        b.syscalls,
        limit(b.syscalls)
    );
    if m.allocs > limit(b.allocs) {
        failures.push(format!(
            "{what}: {:.3} heap allocations per {unit}, budget {} (+{:.0}%)",
            m.allocs,
            b.allocs,
            margin * 100.0
        ));
    }
    if let Some(s) = m.syscalls
        && s > limit(b.syscalls)
    {
        failures.push(format!(
            "{what}: {s:.3} syscalls per {unit}, budget {} (+{:.0}%)",
            b.syscalls,
            margin * 100.0
        ));
    }
}

fn run() -> Result<()> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (margin, http_budget, tcp_budget) = budgets(&manifest.join("budgets.toml"))?;
    let strace = std::env::var_os("MESHGATE_BUDGET_NO_STRACE").is_none();
    let dir = tempfile::tempdir()?;

    let (oh, ot) = (origin(true)?, origin(false)?);
    let text = config(oh, ot);
    let cfg = meshgate_config::parse(&text, "budget.toml")
        .map_err(|e| anyhow::anyhow!("budget config: {e}"))?;
    let gw = meshgate_dataplane::Gateway::start(Arc::new(cfg), "budget.toml", None)
        .map_err(|e| anyhow::anyhow!("starting the gateway: {e}"))?;
    let addrs = gw.listener_addrs();
    let (http_addr, tcp_addr) = match addrs.as_slice() {
        [h, t, ..] => (*h, *t),
        _ => bail!("expected two listeners, got {addrs:?}"),
    };

    let mut failures = Vec::new();
    let h = measure(http_addr, true, strace, dir.path())?;
    check(
        "HTTP/1.1 keep-alive",
        "request",
        &h,
        http_budget,
        margin,
        &mut failures,
    );
    let t = measure(tcp_addr, false, strace, dir.path())?;
    check("TCP", "round trip", &t, tcp_budget, margin, &mut failures);
    gw.stop();
    if !failures.is_empty() {
        bail!(
            "over budget (perf/budgets.toml):\n  {}\nIf the increase is intended, raise the budget in the same commit and say why.",
            failures.join("\n  ")
        );
    }
    println!("budget: ok");
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("budget: FAILED: {e:#}");
        std::process::exit(1);
    }
}
