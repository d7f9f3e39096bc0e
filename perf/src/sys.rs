//! Linux plumbing the harness measures with: CPU affinity, per-process CPU time from
//! `/proc/PID/stat`, per-core busy time from `/proc/stat`, syscall counts via `perf stat`, and
//! facts about the machine for the report.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Serialize;

/// The CPU set holding only `cpu`.
pub fn cpu_set(cpu: usize) -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is plain data and all-zero is the empty set; CPU_SET bounds-checks
    // `cpu` against the set's size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        set
    }
}

/// Pins the calling thread (and every thread or child it creates afterwards) to `cpu`.
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    let set = cpu_set(cpu);
    // SAFETY: sched_setaffinity(0, ..) only reads the set we pass.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// CPUs online on the machine (not limited by this process's affinity mask, which the
/// harness narrows to the load core).
pub fn online_cpus() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if n > 0 { n as usize } else { 1 }
}

/// Clock ticks per second, the unit of utime/stime in `/proc/PID/stat`.
pub fn clk_tck() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

/// An ephemeral loopback port that was free a moment ago.
pub fn free_port() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0 to find a free port")?;
    Ok(l.local_addr()?)
}

/// Fields of `/proc/PID/stat` we need, CPU times in clock ticks. The process-level file
/// already sums all threads, live and exited.
#[derive(Debug, Clone)]
struct PidStat {
    comm: String,
    ppid: u32,
    /// utime + stime.
    own: u64,
    /// cutime + cstime: children that exited and were reaped.
    children: u64,
}

fn read_pid_stat(pid: u32) -> Option<PidStat> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm (field 2) may contain spaces and parentheses: parse after the last ')'.
    let open = s.find('(')?;
    let close = s.rfind(')')?;
    let comm = s.get(open + 1..close)?.to_string();
    let f: Vec<&str> = s.get(close + 2..)?.split_ascii_whitespace().collect();
    // f[0] is field 3 (state); field N is f[N - 3].
    let num = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    Some(PidStat {
        comm,
        ppid: num(4)? as u32,
        own: num(14)? + num(15)?,
        children: num(16)? + num(17)?,
    })
}

/// CPU ticks of every process on the machine at one moment.
#[derive(Debug, Clone, Default)]
pub struct ProcSnapshot {
    procs: HashMap<u32, PidStat>,
}

impl ProcSnapshot {
    pub fn take() -> Self {
        let mut procs = HashMap::new();
        if let Ok(dir) = fs::read_dir("/proc") {
            for e in dir.flatten() {
                if let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok())
                    && let Some(st) = read_pid_stat(pid)
                {
                    procs.insert(pid, st);
                }
            }
        }
        Self { procs }
    }

    /// `root` and all its descendants (nginx workers, helper processes).
    pub fn tree(&self, root: u32) -> BTreeSet<u32> {
        let mut tree = BTreeSet::from([root]);
        loop {
            let before = tree.len();
            for (&pid, st) in &self.procs {
                if tree.contains(&st.ppid) {
                    tree.insert(pid);
                }
            }
            if tree.len() == before {
                return tree;
            }
        }
    }

    /// CPU ticks of `root`'s tree: every process's own time plus what its reaped children
    /// used. A child that exits during a window moves from its own line into its parent's
    /// children time, so nothing is lost or counted twice.
    pub fn tree_ticks(&self, root: u32) -> u64 {
        self.tree(root)
            .iter()
            .filter_map(|p| self.procs.get(p))
            .map(|s| s.own + s.children)
            .sum()
    }

    /// Processes outside `exclude` that used at least `min_secs` of CPU between `self` and
    /// `later`, busiest first, as "comm (pid) 1.23 s".
    pub fn busy_others(&self, later: &Self, exclude: &BTreeSet<u32>, min_secs: f64) -> Vec<String> {
        let tck = clk_tck() as f64;
        let mut v: Vec<(f64, String)> = later
            .procs
            .iter()
            .filter(|(pid, _)| !exclude.contains(pid))
            .filter_map(|(pid, b)| {
                let a = self.procs.get(pid).map_or(0, |a| a.own);
                let secs = b.own.saturating_sub(a) as f64 / tck;
                (secs >= min_secs).then(|| (secs, format!("{} ({pid}) {secs:.2} s", b.comm)))
            })
            .collect();
        v.sort_by(|x, y| y.0.total_cmp(&x.0));
        v.into_iter().map(|x| x.1).collect()
    }
}

/// `root` and all its descendants.
pub fn process_tree(root: u32) -> Vec<u32> {
    ProcSnapshot::take().tree(root).into_iter().collect()
}

/// Number of threads across the process tree (reported so a reader can see what ran).
pub fn tree_threads(root: u32) -> usize {
    process_tree(root)
        .into_iter()
        .map(|p| fs::read_dir(format!("/proc/{p}/task")).map_or(0, |d| d.count()))
        .sum()
}

/// Threads of `root`'s tree whose affinity allows more than `cpu` (a proxy that re-pins
/// itself elsewhere would share the load core), as "comm/tid: allowed LIST".
pub fn threads_not_pinned(root: u32, cpu: usize) -> Vec<String> {
    let want = cpu.to_string();
    let mut out = Vec::new();
    for pid in process_tree(root) {
        let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let Ok(status) = fs::read_to_string(t.path().join("status")) else {
                continue;
            };
            let field = |k: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(k))
                    .map(|v| v.trim().to_string())
                    .unwrap_or_default()
            };
            let allowed = field("Cpus_allowed_list:");
            if allowed != want {
                out.push(format!(
                    "{}/{}: allowed CPUs {allowed}",
                    field("Name:"),
                    t.file_name().to_string_lossy()
                ));
            }
        }
    }
    out
}

/// Busy and total jiffies of one CPU from `/proc/stat`.
#[derive(Debug, Clone, Copy, Default)]
pub struct CoreTimes {
    pub busy: u64,
    pub total: u64,
}

pub fn core_times(cpu: usize) -> CoreTimes {
    let Ok(s) = fs::read_to_string("/proc/stat") else {
        return CoreTimes::default();
    };
    let tag = format!("cpu{cpu} ");
    let Some(line) = s.lines().find(|l| l.starts_with(&tag)) else {
        return CoreTimes::default();
    };
    let v: Vec<u64> = line
        .split_ascii_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal guest guest_nice; guest is already
    // included in user.
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    CoreTimes {
        busy: total.saturating_sub(idle),
        total,
    }
}

/// Fraction (0..=1) of the interval between `a` and `b` that the core was busy.
pub fn core_busy(a: CoreTimes, b: CoreTimes) -> f64 {
    let total = b.total.saturating_sub(a.total);
    if total == 0 {
        return 0.0;
    }
    b.busy.saturating_sub(a.busy) as f64 / total as f64
}

/// Syscalls (and io_uring submissions) counted by `perf stat` over a window.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct SyscallCount {
    pub syscalls: u64,
    /// `io_uring:io_uring_submit_req` events: operations submitted through io_uring, which do
    /// not show up as syscalls.
    pub uring_ops: u64,
}

/// Whether `perf stat -e raw_syscalls:sys_enter` works here; the error says why not.
pub fn perf_syscalls_available() -> Result<()> {
    let out = Command::new("perf")
        .args(["stat", "-x,", "-e", "raw_syscalls:sys_enter", "--", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .context("`perf` not found (Debian package linux-perf)")?;
    let err = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || !err.contains("raw_syscalls:sys_enter") || err.contains("<not") {
        bail!(
            "`perf stat -e raw_syscalls:sys_enter` does not work here: {}",
            err.trim()
        );
    }
    Ok(())
}

/// Starts `perf stat` counting syscalls of `pids` (all their threads) for `window`; call
/// [`PerfStat::finish`] after it. The load keeps running meanwhile.
#[derive(Debug)]
pub struct PerfStat {
    child: std::process::Child,
}

impl PerfStat {
    pub fn start(pids: &[u32], window: Duration, log_dir: &Path) -> Result<Self> {
        let pid_list = pids
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let child = Command::new("perf")
            .args([
                "stat",
                "-x,",
                "-e",
                "raw_syscalls:sys_enter,io_uring:io_uring_submit_req",
                "-p",
                &pid_list,
                "--",
                "sleep",
                &format!("{:.3}", window.as_secs_f64()),
            ])
            .current_dir(log_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting perf stat")?;
        Ok(Self { child })
    }

    pub fn finish(self) -> Result<SyscallCount> {
        let out = self.child.wait_with_output().context("waiting for perf")?;
        let err = String::from_utf8_lossy(&out.stderr);
        let mut c = SyscallCount::default();
        let mut seen = false;
        for line in err.lines() {
            let f: Vec<&str> = line.split(',').collect();
            if f.len() < 3 {
                continue;
            }
            let v = f[0].trim().parse::<u64>().ok();
            match (f[2].trim(), v) {
                ("raw_syscalls:sys_enter", Some(v)) => {
                    c.syscalls = v;
                    seen = true;
                }
                ("io_uring:io_uring_submit_req", Some(v)) => c.uring_ops = v,
                _ => {}
            }
        }
        if !seen {
            bail!("perf stat printed no syscall count: {}", err.trim());
        }
        Ok(c)
    }
}

/// What the report says about the machine.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub os: String,
    pub clk_tck: u64,
}

impl Machine {
    pub fn read() -> Self {
        let cpu_model = fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        let os = fs::read_to_string("/etc/os-release")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                    .map(|v| v.trim_matches('"').to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        Self {
            nproc: online_cpus(),
            cpu_model,
            kernel,
            os,
            clk_tck: clk_tck(),
        }
    }
}

/// UTC timestamp `YYYYMMDDTHHMMSSZ` (no date crate needed).
pub fn utc_stamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
    }

    #[test]
    fn own_process_has_cpu_and_a_tree() {
        let me = std::process::id();
        assert!(process_tree(me).contains(&me));
        let st = read_pid_stat(me).expect("own stat");
        assert!(st.comm.starts_with("meshgate"));
        assert!(tree_threads(me) >= 1);
        let a = ProcSnapshot::take();
        let t0 = std::time::Instant::now();
        while t0.elapsed() < Duration::from_millis(50) {
            std::hint::black_box(0u64);
        }
        let b = ProcSnapshot::take();
        assert!(b.tree_ticks(me) >= a.tree_ticks(me));
        assert!(a.busy_others(&b, &BTreeSet::from([me]), 1000.0).is_empty());
    }
}

/// Rescheduling interrupts (the `RES` line of /proc/interrupts) taken by `cpu` so far: the
/// IPIs one core sends another to wake a task, e.g. an io_uring completion raised from the
/// other core. None where the line is missing (non-x86).
pub fn res_interrupts(cpu: usize) -> Option<u64> {
    let s = fs::read_to_string("/proc/interrupts").ok()?;
    parse_res(&s, cpu)
}

fn parse_res(interrupts: &str, cpu: usize) -> Option<u64> {
    let line = interrupts
        .lines()
        .find(|l| l.trim_start().starts_with("RES:"))?;
    line.trim_start()
        .strip_prefix("RES:")?
        .split_ascii_whitespace()
        .nth(cpu)?
        .parse()
        .ok()
}

/// Resident memory of a process tree, KiB: (RSS, PSS), summed from /proc/PID/smaps_rollup.
pub fn tree_memory_kib(root: u32) -> (u64, u64) {
    let mut rss = 0;
    let mut pss = 0;
    for pid in process_tree(root) {
        let Ok(s) = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) else {
            continue;
        };
        for line in s.lines() {
            let mut f = line.split_ascii_whitespace();
            let (key, val) = (f.next(), f.next().and_then(|v| v.parse::<u64>().ok()));
            match (key, val) {
                (Some("Rss:"), Some(v)) => rss += v,
                (Some("Pss:"), Some(v)) => pss += v,
                _ => {}
            }
        }
    }
    (rss, pss)
}

/// The open-file limit (soft) of this process, which the proxies inherit.
pub fn nofile_limit() -> u64 {
    let mut cur = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut cur) } != 0 {
        return 1024;
    }
    cur.rlim_cur
}

/// Connections a proxy can hold open at once within the open-file limit: each proxied
/// connection takes two descriptors (downstream and upstream), plus some for listeners, logs
/// and the event loop.
pub fn max_proxied_connections() -> u64 {
    nofile_limit().saturating_sub(200) / 2
}

/// Raises this process's open-file limit (soft and hard, as far as allowed) to `want`; the
/// proxies, origins and tools started afterwards inherit it. Returns the soft limit in force.
pub fn raise_nofile(want: u64) -> u64 {
    let mut cur = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut cur) != 0 {
            return 0;
        }
        if cur.rlim_cur >= want {
            return cur.rlim_cur;
        }
        let raised = libc::rlimit {
            rlim_cur: want,
            rlim_max: want.max(cur.rlim_max),
        };
        // Raising the hard limit needs CAP_SYS_RESOURCE; without it go up to the hard limit.
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
            return want;
        }
        let soft = libc::rlimit {
            rlim_cur: cur.rlim_max.min(want),
            rlim_max: cur.rlim_max,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &soft) == 0 {
            soft.rlim_cur
        } else {
            cur.rlim_cur
        }
    }
}

#[cfg(test)]
mod interrupt_tests {
    use super::parse_res;

    #[test]
    fn res_line() {
        let s = "           CPU0       CPU1\n  0:         40          0   IO-APIC    2-edge      timer\nRES:     559982    8432886   Rescheduling interrupts\n";
        assert_eq!(parse_res(s, 0), Some(559_982));
        assert_eq!(parse_res(s, 1), Some(8_432_886));
        assert_eq!(parse_res(s, 2), None);
    }
}
