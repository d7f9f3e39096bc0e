//! The two scenarios that are not work per CPU-second:
//!
//! - idle memory: open 10,000 connections through the proxy (from several 127.0.0.x source
//!   addresses), each completing one round trip (and, for TLS, a full handshake first), leave
//!   them idle, and divide the growth of the proxy's RSS and PSS by the connection count;
//! - latency: find nginx's saturation rate for HTTP/1.1 keep-alive (wrk, closed loop), then
//!   drive each proxy and the origin directly with the open-loop generator at 25%, 50% and 75%
//!   of it, and report the latency each proxy adds over the direct path.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rustls::ClientConnection;
use rustls::pki_types::ServerName;
use socket2::{Domain, Socket, Type};

use crate::certs::SERVER_NAME;
use crate::httpload::{client_config, read_response, request};
use crate::openloop;
use crate::proxy::Proxy;
use crate::report::{Better, fmt_num};
use crate::runner::{ProxyResult, Sample, Settings, median, start_proxy};
use crate::scenarios::{self, Env, Scenario};
use crate::sys;

/// Idle connections per proxy.
pub const IDLE_CONNECTIONS: usize = 10_000;
/// Source addresses the idle connections come from (127.0.0.2 ..).
const IDLE_SOURCES: u8 = 4;

impl Sample {
    /// A sample with no throughput figures (metrics only).
    pub fn bare(round: usize, secs: f64) -> Self {
        Sample {
            round,
            secs,
            work: 0,
            proxy_cpu_secs: 0.0,
            proxy_core_busy: 0.0,
            load_core_busy: 0.0,
            proxy_core_foreign: 0.0,
            load_core_foreign: 0.0,
            others: Vec::new(),
            attempts: 1,
            proxy_threads: 0,
            errors: 0,
            latency: None,
            syscalls: None,
            res_irqs: None,
            metrics: BTreeMap::new(),
        }
    }
}

pub fn idle_metrics() -> Vec<(String, String, Better)> {
    vec![
        (
            "rss_kib".into(),
            "RSS growth, KiB / idle connection".into(),
            Better::Lower,
        ),
        (
            "pss_kib".into(),
            "PSS growth, KiB / idle connection".into(),
            Better::Lower,
        ),
        ("conns".into(), "idle connections held".into(), Better::Info),
        (
            "rss_mib".into(),
            "proxy RSS with them open, MiB".into(),
            Better::Info,
        ),
    ]
}

/// One idle connection, left open after one HTTP/1.1 request and response through the proxy
/// (so the upstream side is connected too): only the socket is kept (the client's TLS state is
/// dropped; the proxy cannot tell).
fn open_idle(
    target: SocketAddr,
    src: Ipv4Addr,
    tls: Option<&std::sync::Arc<rustls::ClientConfig>>,
    buf: &mut [u8],
) -> Result<TcpStream> {
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    sock.bind(&SocketAddr::V4(SocketAddrV4::new(src, 0)).into())
        .with_context(|| format!("binding {src}"))?;
    sock.connect_timeout(&target.into(), Duration::from_secs(5))?;
    let mut s: TcpStream = sock.into();
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let req = request("12");
    match tls {
        None => {
            s.write_all(&req)?;
            read_response(&mut s, buf)?;
        }
        Some(cfg) => {
            let mut conn = ClientConnection::new(cfg.clone(), ServerName::try_from(SERVER_NAME)?)?;
            let mut t = rustls::Stream::new(&mut conn, &mut s);
            t.write_all(&req)?;
            read_response(&mut t, buf)?;
        }
    }
    Ok(s)
}

#[expect(clippy::too_many_arguments, reason = "mirrors runner::measure")]
pub fn measure_idle(
    sc: &dyn Scenario,
    p: &dyn Proxy,
    env: &Env,
    st: &Settings,
    dir: &Path,
    stem: &str,
    round: usize,
    tls: bool,
) -> Result<(Sample, Vec<String>)> {
    let (spec, mut proxy) = start_proxy(sc, p, env, st, dir, stem)?;
    let cfg = if tls {
        Some(client_config(&env.certs, false, false, &[])?)
    } else {
        None
    };
    let started = Instant::now();
    let src = |i: usize| Ipv4Addr::new(127, 0, 0, 2 + (i % IDLE_SOURCES as usize) as u8);
    let mut buf = vec![0u8; 16 * 1024];
    // Within the open-file limit (two descriptors per proxied connection).
    let count = IDLE_CONNECTIONS.min(sys::max_proxied_connections().saturating_sub(100) as usize);
    // Warm-up: let the proxy allocate what it allocates once (pools, caches, first TLS state).
    {
        let mut warm = Vec::new();
        for i in 0..64 {
            warm.push(
                open_idle(spec.listen, src(i), cfg.as_ref(), &mut buf)
                    .context("warm-up connection")?,
            );
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    proxy.check_alive()?;
    let (rss0, pss0) = sys::tree_memory_kib(proxy.pid());
    let mut held = Vec::with_capacity(count);
    let mut failed = 0usize;
    let mut last_err = String::new();
    for i in 0..count {
        match open_idle(spec.listen, src(i), cfg.as_ref(), &mut buf) {
            Ok(s) => held.push(s),
            Err(e) => {
                failed += 1;
                last_err = format!("{e:#}");
                if held.is_empty() && failed >= 20 {
                    bail!("idle connections fail: {last_err}");
                }
            }
        }
    }
    // Let deferred frees and buffer returns settle.
    std::thread::sleep(Duration::from_secs(1));
    proxy.check_alive()?;
    let (rss1, pss1) = sys::tree_memory_kib(proxy.pid());
    let n = held.len().max(1) as f64;
    let mut sample = Sample::bare(round, started.elapsed().as_secs_f64());
    sample.errors = failed as u64;
    sample.proxy_threads = proxy.threads();
    sample
        .metrics
        .insert("rss_kib".into(), rss1.saturating_sub(rss0) as f64 / n);
    sample
        .metrics
        .insert("pss_kib".into(), pss1.saturating_sub(pss0) as f64 / n);
    sample.metrics.insert("conns".into(), held.len() as f64);
    sample
        .metrics
        .insert("rss_mib".into(), rss1 as f64 / 1024.0);
    let mut notes = Vec::new();
    if failed > 0 {
        notes.push(format!(
            "round {round}: {failed} of {count} idle connections failed (last: {last_err})"
        ));
    }
    if round == 1 && count < IDLE_CONNECTIONS {
        notes.push(format!(
            "{count} connections instead of {IDLE_CONNECTIONS}: the open-file limit ({}) allows no more \
             through one proxy process (two descriptors each); raise the hard limit (`ulimit -Hn`, \
             needs CAP_SYS_RESOURCE) to measure at {IDLE_CONNECTIONS}",
            sys::nofile_limit()
        ));
    }
    eprintln!(
        "[{stem}] {} idle connections: RSS {} -> {} KiB ({:.2} KiB each), PSS {} -> {} KiB ({:.2} KiB each)",
        held.len(),
        rss0,
        rss1,
        (rss1.saturating_sub(rss0)) as f64 / n,
        pss0,
        pss1,
        (pss1.saturating_sub(pss0)) as f64 / n
    );
    drop(held);
    if let Err(e) = proxy.stop() {
        notes.push(format!("stopping {}: {e:#}", p.name()));
    }
    Ok((sample, notes))
}

/// Fractions of nginx's saturation rate the latency scenario runs at.
const LOAD_LEVELS: [u32; 3] = [25, 50, 75];
/// Connections of the open-loop generator.
const OPEN_LOOP_CONNECTIONS: usize = 64;

fn key(q: &str, pct: u32) -> String {
    format!("added_{q}_{pct}")
}

fn cpu_key(pct: u32) -> String {
    format!("cpu_us_per_request_{pct}")
}

/// Runs the latency scenario (see the module doc); fills `results` and returns the rows.
pub fn run_latency(
    proxies: &[Box<dyn Proxy>],
    results: &mut [ProxyResult],
    env: &Env,
    st: &Settings,
    dir: &Path,
    notes: &mut Vec<String>,
) -> Result<Vec<(String, String, Better)>> {
    let http = env.http()?;
    let sc = scenarios::http_12();
    let ran = |name: &str| {
        results
            .iter()
            .position(|r| r.proxy == name && r.status == "ran")
    };
    let cal = ran("nginx")
        .or_else(|| ran("haproxy"))
        .or_else(|| ran("meshgate"))
        .context("no proxy to calibrate the rate with")?;
    let cal_name = proxies[cal].name();
    // Saturation: the closed-loop HTTP/1.1 scenario's load through the calibration proxy.
    let rate = {
        let (spec, mut proxy) = start_proxy(
            sc,
            proxies[cal].as_ref(),
            env,
            st,
            dir,
            "latency-calibration",
        )?;
        let load = sc.start_load(spec.listen, env)?;
        std::thread::sleep(Duration::from_secs_f64(st.warmup_secs));
        let (w0, t0) = (load.work(), Instant::now());
        std::thread::sleep(Duration::from_secs_f64(st.window_secs));
        let (w1, t1) = (load.work(), Instant::now());
        proxy.check_alive()?;
        load.stop()?;
        let _ = proxy.stop();
        (w1 - w0) as f64 / t1.duration_since(t0).as_secs_f64()
    };
    if rate < 100.0 {
        bail!("{cal_name} saturated at only {rate:.0} requests/s; is the machine overloaded?");
    }
    notes.push(format!(
        "saturation: {cal_name} proxied {} requests/s (wrk, 64 connections, closed loop, 12-byte responses); \
         open-loop rates: {}",
        fmt_num(rate),
        LOAD_LEVELS
            .iter()
            .map(|p| format!("{p}% = {} req/s", fmt_num(rate * f64::from(*p) / 100.0)))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let rounds = if st.window_secs < 4.0 {
        1
    } else {
        st.rounds.min(3)
    };
    let warm = st.warmup_secs.min(1.0);
    let mut direct: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let n = proxies.len();
    for round in 1..=rounds {
        // The direct path first, every round, so "added" compares like with like.
        let mut base = BTreeMap::new();
        for pct in LOAD_LEVELS {
            let r = rate * f64::from(pct) / 100.0;
            let res = openloop::run(
                http.addr,
                "12",
                OPEN_LOOP_CONNECTIONS,
                r,
                warm,
                st.window_secs,
            )
            .context("open loop against the origin directly")?;
            for (q, v) in [
                ("p50", res.latency.p50_us),
                ("p99", res.latency.p99_us),
                ("p999", res.latency.p999_us),
            ] {
                base.insert(key(q, pct), v);
                direct.entry(format!("{q}_{pct}")).or_default().push(v);
            }
            eprintln!(
                "[latency r{round}/{rounds}] direct    {pct}%: p50 {:.0} µs, p99 {:.0} µs, p99.9 {:.0} µs",
                res.latency.p50_us, res.latency.p99_us, res.latency.p999_us
            );
        }
        for k in 0..n {
            let i = (k + round - 1) % n;
            if results[i].status != "ran" {
                continue;
            }
            let p = proxies[i].as_ref();
            let stem = format!("latency-{}-r{round}", p.name());
            let measured = (|| -> Result<Sample> {
                let (spec, mut proxy) = start_proxy(sc, p, env, st, dir, &stem)?;
                let mut sample = Sample::bare(round, 0.0);
                for pct in LOAD_LEVELS {
                    let r = rate * f64::from(pct) / 100.0;
                    let ticks = || sys::ProcSnapshot::take().tree_ticks(proxy.pid());
                    let cpu0 = ticks();
                    let res = openloop::run(
                        spec.listen,
                        "12",
                        OPEN_LOOP_CONNECTIONS,
                        r,
                        warm,
                        st.window_secs,
                    )?;
                    let cpu = ticks().saturating_sub(cpu0) as f64 / sys::clk_tck() as f64;
                    proxy.check_alive()?;
                    // CPU per request at a fixed rate, where every proxy does the same work per
                    // second: the warm-up's requests are in the CPU reading, so in the count.
                    if res.achieved >= r * 0.95 {
                        sample
                            .metrics
                            .insert(cpu_key(pct), cpu * 1e6 / (r * (warm + st.window_secs)));
                    }
                    for (q, v) in [
                        ("p50", res.latency.p50_us),
                        ("p99", res.latency.p99_us),
                        ("p999", res.latency.p999_us),
                    ] {
                        sample.metrics.insert(
                            key(q, pct),
                            v - base.get(&key(q, pct)).copied().unwrap_or(0.0),
                        );
                    }
                    if res.achieved < r * 0.95 || res.backlog > OPEN_LOOP_CONNECTIONS {
                        results[i].notes.push(format!(
                            "round {round}: at {pct}% it completed {} of {} req/s (backlog {} at the end): fell behind",
                            fmt_num(res.achieved),
                            fmt_num(r),
                            res.backlog
                        ));
                    }
                    eprintln!(
                        "[latency r{round}/{rounds}] {:<9} {pct}%: p50 {:.0} µs, p99 {:.0} µs, p99.9 {:.0} µs",
                        p.name(),
                        res.latency.p50_us,
                        res.latency.p99_us,
                        res.latency.p999_us
                    );
                }
                let _ = proxy.stop();
                Ok(sample)
            })();
            match measured {
                Ok(s) => results[i].samples.push(s),
                Err(e) => {
                    let why = format!("{e:#}");
                    eprintln!("[latency r{round}] {} FAILED: {why}", p.name());
                    if results[i].samples.is_empty() {
                        results[i].status = format!("not run: {why}");
                    } else {
                        results[i]
                            .notes
                            .push(format!("round {round} failed: {why}"));
                    }
                }
            }
        }
    }
    let med = |k: &str| median(direct.get(k).cloned().unwrap_or_default()).unwrap_or(0.0);
    notes.push(format!(
        "direct to the origin (median of {rounds} round(s)), p50 / p99 / p99.9 µs: {}",
        LOAD_LEVELS
            .iter()
            .map(|p| format!(
                "{p}%: {:.0} / {:.0} / {:.0}",
                med(&format!("p50_{p}")),
                med(&format!("p99_{p}")),
                med(&format!("p999_{p}"))
            ))
            .collect::<Vec<_>>()
            .join("; ")
    ));
    // The headline first: the target is added p99 at 50% load.
    let mut rows = vec![(
        key("p99", 50),
        format!(
            "added p99 latency at 50% ({} req/s), µs",
            fmt_num(rate * 0.5)
        ),
        Better::Lower,
    )];
    for pct in LOAD_LEVELS {
        let r = fmt_num(rate * f64::from(pct) / 100.0);
        for (q, label) in [("p50", "p50"), ("p99", "p99"), ("p999", "p99.9")] {
            if q == "p99" && pct == 50 {
                continue;
            }
            rows.push((
                key(q, pct),
                format!("added {label} latency at {pct}% ({r} req/s), µs"),
                Better::Lower,
            ));
        }
    }
    for pct in LOAD_LEVELS {
        let r = fmt_num(rate * f64::from(pct) / 100.0);
        rows.push((
            cpu_key(pct),
            format!("proxy CPU per request at {pct}% ({r} req/s, fixed rate), µs"),
            Better::Lower,
        ));
    }
    Ok(rows)
}
