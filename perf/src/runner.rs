//! The measurement method: for each scenario, start its origin on the load core; then for each
//! round, for each proxy (order rotated every round), start the proxy pinned to the proxy core,
//! wait until ready, start load, discard a warm-up, measure one window (work done, proxy CPU
//! time over its whole process tree, both cores' busy time, latency), optionally count syscalls
//! in a short extra window, stop everything. Results are medians over rounds.

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::certs::Certs;
use crate::load::{Latency, Load};
use crate::proxy::{Proxy, ProxySpec, Running};
use crate::scenarios::{Env, Kind, Scenario};
use crate::sys::{self, SyscallCount};

#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub warmup_secs: f64,
    pub window_secs: f64,
    pub rounds: usize,
    /// Length of the syscall-counting window (last round only); None to skip.
    pub syscall_window_secs: Option<f64>,
    pub proxy_cpu: usize,
    pub load_cpu: usize,
    /// Windows tried per round when other processes disturb one.
    pub attempts: usize,
    /// Longest wait for a quiet machine between attempts.
    pub max_wait_secs: f64,
    #[serde(skip)]
    pub out: PathBuf,
}

/// One measured window of one proxy.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub round: usize,
    pub secs: f64,
    /// Work in the scenario's counted unit (round trips, bytes).
    pub work: u64,
    pub proxy_cpu_secs: f64,
    /// Fraction of the proxy core busy (all causes, including softirq not charged to the proxy).
    pub proxy_core_busy: f64,
    /// Fraction of the load core busy (generator + origin + their kernel work).
    pub load_core_busy: f64,
    /// Fraction of the proxy core used by anything but the proxy (other processes, kernel
    /// threads, softirq not charged to the proxy).
    pub proxy_core_foreign: f64,
    /// Fraction of the load core used by anything but this harness.
    pub load_core_foreign: f64,
    /// Other processes that used CPU during the window ("comm (pid) secs").
    pub others: Vec<String>,
    /// Windows measured to get this one (a disturbed window is measured again).
    pub attempts: usize,
    pub proxy_threads: usize,
    pub errors: u64,
    pub latency: Option<Latency>,
    pub syscalls: Option<SyscallSample>,
    /// Rescheduling interrupts the proxy core took in the window (/proc/interrupts `RES`).
    pub res_irqs: Option<u64>,
    /// Scenario-specific figures (idle memory, latency), by key; see [`ScenarioResult::metrics`].
    pub metrics: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SyscallSample {
    pub counts: SyscallCount,
    /// Work done while perf counted (estimated from the rate around the perf run).
    pub work: f64,
}

impl Sample {
    pub fn per_cpu_sec(&self, scale: f64) -> Option<f64> {
        (self.proxy_cpu_secs > 0.0).then(|| self.work as f64 * scale / self.proxy_cpu_secs)
    }
    pub fn per_sec(&self, scale: f64) -> f64 {
        self.work as f64 * scale / self.secs
    }
    pub fn proxy_util(&self) -> f64 {
        self.proxy_cpu_secs / self.secs
    }
    /// The larger share of either core taken by work that is not ours.
    pub fn disturbance(&self) -> f64 {
        self.proxy_core_foreign.max(self.load_core_foreign)
    }
    /// Whether other work stayed under [`MAX_FOREIGN`] on both cores.
    pub fn clean(&self) -> bool {
        self.disturbance() <= MAX_FOREIGN
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ProxyResult {
    pub proxy: String,
    pub version: String,
    /// "ran" or "not run: <reason>".
    pub status: String,
    pub samples: Vec<Sample>,
    pub notes: Vec<String>,
}

impl ProxyResult {
    pub fn ran(&self) -> bool {
        !self.samples.is_empty()
    }
    /// The samples medians are taken over: the undisturbed ones if there are any, else all.
    pub fn counted(&self) -> Vec<&Sample> {
        let clean: Vec<&Sample> = self.samples.iter().filter(|s| s.clean()).collect();
        if clean.is_empty() {
            self.samples.iter().collect()
        } else {
            clean
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ScenarioResult {
    pub scenario: String,
    pub about: String,
    pub unit: String,
    #[serde(skip)]
    pub unit_one: String,
    #[serde(skip)]
    pub scale: f64,
    pub proxies: Vec<ProxyResult>,
    /// For scenarios that are not work per CPU-second: the rows of the table, in order, as
    /// (key in [`Sample::metrics`], label, which way is better).
    pub metrics: Vec<(String, String, crate::report::Better)>,
    /// Facts about the scenario as a whole (calibration, direct-to-origin figures).
    pub notes: Vec<String>,
}

/// Runs one scenario against every proxy (`selected` filters by name; the others are listed as
/// not selected so the report keeps its columns).
pub fn run_scenario(
    sc: &dyn Scenario,
    proxies: &[Box<dyn Proxy>],
    selected: &[String],
    st: &Settings,
    certs: &Arc<Certs>,
) -> Result<ScenarioResult> {
    let runs_dir = st.out.join("runs");
    fs::create_dir_all(&runs_dir).with_context(|| format!("creating {}", runs_dir.display()))?;
    let env = Env::start(sc.origin(), certs.clone(), runs_dir.clone(), st.load_cpu)
        .context("starting the origin")?;
    let mut results: Vec<ProxyResult> = proxies
        .iter()
        .map(|p| {
            let status = if !selected.iter().any(|s| s == p.name()) {
                "not run: not selected (--proxies)".to_string()
            } else if !p.supports(sc.listener()) {
                format!(
                    "not run: no {:?} listener support in the harness",
                    sc.listener()
                )
            } else {
                match p.check() {
                    Ok(()) => "ran".to_string(),
                    Err(why) => format!("not run: {why}"),
                }
            };
            ProxyResult {
                proxy: p.name().to_string(),
                version: if status == "ran" {
                    p.version()
                } else {
                    String::new()
                },
                status,
                samples: Vec::new(),
                notes: Vec::new(),
            }
        })
        .collect();

    let mut scenario_notes = Vec::new();
    let metrics = match sc.kind() {
        Kind::Throughput => Vec::new(),
        Kind::IdleMemory { .. } => crate::special::idle_metrics(),
        Kind::Latency => {
            let m = crate::special::run_latency(
                proxies,
                &mut results,
                &env,
                st,
                &runs_dir,
                &mut scenario_notes,
            )?;
            return Ok(ScenarioResult {
                scenario: sc.name().to_string(),
                about: sc.about().to_string(),
                unit: sc.unit().name.to_string(),
                unit_one: sc.unit().one.to_string(),
                scale: sc.unit().scale,
                proxies: results,
                metrics: m,
                notes: scenario_notes,
            });
        }
    };
    let n = proxies.len();
    // Memory per idle connection barely drifts; three rounds are plenty.
    let rounds = match sc.kind() {
        Kind::IdleMemory { .. } => st.rounds.min(3),
        _ => st.rounds,
    };
    for round in 1..=rounds {
        for k in 0..n {
            // Rotate the order each round so drift (thermal, noisy neighbours) spreads evenly.
            let i = (k + round - 1) % n;
            if results[i].status != "ran" {
                continue;
            }
            let p = proxies[i].as_ref();
            let count_syscalls = if round == rounds {
                st.syscall_window_secs
            } else {
                None
            };
            let stem = format!("{}-{}-r{round}", sc.name(), p.name());
            let measured = match sc.kind() {
                Kind::IdleMemory { tls } => {
                    crate::special::measure_idle(sc, p, &env, st, &runs_dir, &stem, round, tls)
                }
                _ => measure(sc, p, &env, st, &runs_dir, &stem, round, count_syscalls),
            };
            match measured {
                Ok((sample, notes)) => {
                    let scale = sc.unit().scale;
                    if sc.kind() == Kind::Throughput {
                        eprintln!(
                            "[{} r{round}/{}] {:<9} {:>12.1} {}/proxy-CPU-s  {:>12.1} {}/s  proxy CPU {:>5.1}%  load core {:>5.1}%",
                            sc.name(),
                            rounds,
                            p.name(),
                            sample.per_cpu_sec(scale).unwrap_or(0.0),
                            sc.unit().name,
                            sample.per_sec(scale),
                            sc.unit().name,
                            sample.proxy_util() * 100.0,
                            sample.load_core_busy * 100.0,
                        );
                    }
                    results[i].notes.extend(notes);
                    results[i].samples.push(sample);
                }
                Err(e) => {
                    let why = format!("{e:#}");
                    eprintln!(
                        "[{} r{round}/{}] {:<9} FAILED: {why}",
                        sc.name(),
                        st.rounds,
                        p.name()
                    );
                    if results[i].samples.is_empty() {
                        // It never worked: skip its remaining rounds.
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
    drop(env);
    Ok(ScenarioResult {
        scenario: sc.name().to_string(),
        about: sc.about().to_string(),
        unit: sc.unit().name.to_string(),
        unit_one: sc.unit().one.to_string(),
        scale: sc.unit().scale,
        proxies: results,
        metrics,
        notes: scenario_notes,
    })
}

#[derive(Debug, Clone)]
struct Snap {
    at: Instant,
    work: u64,
    procs: sys::ProcSnapshot,
    proxy_core: sys::CoreTimes,
    load_core: sys::CoreTimes,
    res: Option<u64>,
}

impl Snap {
    fn take(load: &dyn Load, st: &Settings) -> Self {
        Self {
            res: sys::res_interrupts(st.proxy_cpu),
            at: Instant::now(),
            work: load.work(),
            procs: sys::ProcSnapshot::take(),
            proxy_core: sys::core_times(st.proxy_cpu),
            load_core: sys::core_times(st.load_cpu),
        }
    }
}

#[expect(
    clippy::too_many_arguments,
    reason = "one call site; a struct would only rename them"
)]
fn measure(
    sc: &dyn Scenario,
    p: &dyn Proxy,
    env: &Env,
    st: &Settings,
    dir: &std::path::Path,
    stem: &str,
    round: usize,
    syscall_window: Option<f64>,
) -> Result<(Sample, Vec<String>)> {
    let (spec, mut proxy) = start_proxy(sc, p, env, st, dir, stem)?;
    let load = sc.start_load(spec.listen, env).context("starting load")?;
    let mut notes = Vec::new();

    let result = (|| -> Result<Sample> {
        std::thread::sleep(Duration::from_secs_f64(st.warmup_secs));
        proxy.check_alive()?;
        if load.work() == 0 {
            bail!(
                "no traffic passed through in the {}s warm-up ({} load errors) {}",
                st.warmup_secs,
                load.errors(),
                load.notes().join("; ")
            );
        }
        let mut best: Option<Sample> = None;
        let mut tried = 0;
        for attempt in 1..=st.attempts {
            tried = attempt;
            let s = window(&mut proxy, load.as_ref(), st, round)?;
            let clean = s.disturbance() <= MAX_FOREIGN;
            if !clean {
                eprintln!(
                    "[{stem}] window {attempt}/{} disturbed: other work took {:.0}% of the proxy \
                     core and {:.0}% of the load core ({}){}",
                    st.attempts,
                    s.proxy_core_foreign * 100.0,
                    s.load_core_foreign * 100.0,
                    others(&s.others),
                    if attempt < st.attempts {
                        "; measuring again"
                    } else {
                        ""
                    }
                );
            }
            if best
                .as_ref()
                .is_none_or(|b| s.disturbance() < b.disturbance())
            {
                best = Some(s);
            }
            if clean {
                break;
            }
            if attempt < st.attempts {
                wait_quiet(&mut proxy, load.as_ref(), st, stem)?;
            }
        }
        let unpinned = sys::threads_not_pinned(proxy.pid(), st.proxy_cpu);
        if !unpinned.is_empty() {
            notes.push(format!(
                "threads not confined to CPU {} (they may have run on the load core): {}",
                st.proxy_cpu,
                unpinned.join(", ")
            ));
        }
        let mut sample = best.context("no window measured")?;
        sample.attempts = tried;
        if let Some(secs) = syscall_window {
            match count_syscalls(&proxy, load.as_ref(), secs, dir) {
                Ok(c) => sample.syscalls = Some(c),
                Err(e) => notes.push(format!("syscalls not counted: {e:#}")),
            }
        }
        Ok(sample)
    })();
    if round == 1 || result.is_err() {
        notes.extend(
            load.notes()
                .into_iter()
                .map(|n| format!("round {round}: {n}")),
        );
    }
    if let Err(e) = load.stop() {
        notes.push(format!("load generator: {e:#}"));
    }
    if let Err(e) = proxy.stop() {
        notes.push(format!("stopping {}: {e:#}", p.name()));
    }
    result.map(|s| (s, notes))
}

/// The busy processes of a disturbed window, for a message.
pub fn others(list: &[String]) -> String {
    if list.is_empty() {
        "short-lived processes or kernel threads".into()
    } else {
        list.join(", ")
    }
}

/// A window counts as disturbed when work other than the proxy (on the proxy core) or the
/// harness (on the load core) took more than this fraction of either core.
pub const MAX_FOREIGN: f64 = 0.10;

/// One measurement window with the proxy and load already running.
fn window(proxy: &mut Running, load: &dyn Load, st: &Settings, round: usize) -> Result<Sample> {
    let errors0 = load.errors();
    load.begin_window();
    let a = Snap::take(load, st);
    std::thread::sleep(Duration::from_secs_f64(st.window_secs));
    let b = Snap::take(load, st);
    let latency = load.end_window();
    proxy.check_alive()?;

    let secs = b.at.duration_since(a.at).as_secs_f64();
    let proxy_cpu_secs = b
        .procs
        .tree_ticks(proxy.pid())
        .saturating_sub(a.procs.tree_ticks(proxy.pid())) as f64
        / sys::clk_tck() as f64;
    let f = Foreign::between(&a, &b, proxy.pid());
    Ok(Sample {
        round,
        secs,
        work: b.work - a.work,
        proxy_cpu_secs,
        proxy_core_busy: sys::core_busy(a.proxy_core, b.proxy_core),
        load_core_busy: sys::core_busy(a.load_core, b.load_core),
        proxy_core_foreign: f.proxy_core,
        load_core_foreign: f.load_core,
        others: f.others,
        attempts: 1,
        proxy_threads: proxy.threads(),
        errors: load.errors() - errors0,
        latency,
        syscalls: None,
        res_irqs: a.res.zip(b.res).map(|(a, b)| b.saturating_sub(a)),
        metrics: BTreeMap::new(),
    })
}

/// Writes the proxy's config, starts it pinned to the proxy core and waits until it is ready.
pub fn start_proxy(
    sc: &dyn Scenario,
    p: &dyn Proxy,
    env: &Env,
    st: &Settings,
    dir: &std::path::Path,
    stem: &str,
) -> Result<(ProxySpec, Running)> {
    let spec = ProxySpec {
        listener: sc.listener(),
        listen: sys::free_port()?,
        upstream: env.upstream(sc.listener())?,
        admin: sys::free_port()?,
        dir: dir.to_path_buf(),
        stem: stem.to_string(),
        certs: env.certs.clone(),
    };
    let cmd = p.prepare(&spec)?;
    let mut proxy = Running::spawn(cmd, st.proxy_cpu, &dir.join(format!("{stem}.log")))?;
    proxy.wait_ready(p, &spec, Duration::from_secs(15))?;
    Ok((spec, proxy))
}

/// Work that is neither the proxy's (on the proxy core) nor the harness's (on the load core).
#[derive(Debug)]
struct Foreign {
    proxy_core: f64,
    load_core: f64,
    others: Vec<String>,
}

impl Foreign {
    fn between(a: &Snap, b: &Snap, proxy_pid: u32) -> Self {
        let me = std::process::id();
        let secs = b.at.duration_since(a.at).as_secs_f64().max(1e-3);
        let tck = sys::clk_tck() as f64;
        let proxy = b
            .procs
            .tree_ticks(proxy_pid)
            .saturating_sub(a.procs.tree_ticks(proxy_pid)) as f64
            / tck;
        // The harness's whole tree (origins, load tools) minus the proxy, which is its child.
        let harness = (b
            .procs
            .tree_ticks(me)
            .saturating_sub(a.procs.tree_ticks(me)) as f64
            / tck
            - proxy)
            .max(0.0);
        let mut ours = b.procs.tree(me);
        ours.extend(b.procs.tree(proxy_pid));
        Self {
            proxy_core: (sys::core_busy(a.proxy_core, b.proxy_core) - proxy / secs).max(0.0),
            load_core: (sys::core_busy(a.load_core, b.load_core) - harness / secs).max(0.0),
            others: a.procs.busy_others(&b.procs, &ours, 0.05 * secs),
        }
    }

    fn level(&self) -> f64 {
        self.proxy_core.max(self.load_core)
    }
}

/// After a disturbed window: probe in 1 s steps until other work drops below the threshold,
/// for at most `max_wait_secs`.
fn wait_quiet(proxy: &mut Running, load: &dyn Load, st: &Settings, stem: &str) -> Result<()> {
    let start = Instant::now();
    let mut busy = Vec::new();
    while start.elapsed().as_secs_f64() < st.max_wait_secs {
        let a = Snap::take(load, st);
        std::thread::sleep(Duration::from_secs(1));
        let b = Snap::take(load, st);
        proxy.check_alive()?;
        let f = Foreign::between(&a, &b, proxy.pid());
        if f.level() <= MAX_FOREIGN {
            if start.elapsed().as_secs_f64() > 1.5 {
                eprintln!("[{stem}] quiet after {:.0}s", start.elapsed().as_secs_f64());
            }
            return Ok(());
        }
        if busy.is_empty() {
            eprintln!(
                "[{stem}] waiting up to {:.0}s for a quiet machine",
                st.max_wait_secs
            );
        }
        for o in f.others {
            let name = o.split(" (").next().unwrap_or(&o).to_string();
            if !busy.contains(&name) {
                busy.push(name);
            }
        }
    }
    eprintln!(
        "[{stem}] still busy after {:.0}s ({}); measuring anyway",
        start.elapsed().as_secs_f64(),
        if busy.is_empty() {
            "short-lived processes".into()
        } else {
            busy.join(", ")
        }
    );
    Ok(())
}

fn count_syscalls(
    proxy: &Running,
    load: &dyn crate::load::Load,
    secs: f64,
    dir: &std::path::Path,
) -> Result<SyscallSample> {
    let (w0, t0) = (load.work(), Instant::now());
    let perf = sys::PerfStat::start(&proxy.pids(), Duration::from_secs_f64(secs), dir)?;
    let counts = perf.finish()?;
    let (w1, t1) = (load.work(), Instant::now());
    // perf counts for `secs` inside [t0, t1] (the rest is its start-up); the load is steady, so
    // scale the work done over [t0, t1] down to `secs`.
    let work = (w1 - w0) as f64 * secs / t1.duration_since(t0).as_secs_f64();
    Ok(SyscallSample { counts, work })
}

/// Median of the values (mean of the middle two for an even count).
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn medians() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }
}
