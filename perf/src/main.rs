//! meshgate-perf: runs meshgate, haproxy and nginx on the same scenario in one run, each proxy
//! alone on one core with one worker, the load generator and origin on the other core, and
//! reports work per proxy-CPU-second and the ratios between them. See docs/performance.md.
//!
//! Layout: [`scenarios`] (what load, which origin, which unit: one module per scenario),
//! [`proxy`] (how to configure and run each proxy), [`runner`] (the measurement method),
//! [`report`] (tables, JSON, charts), [`load`]/[`origin`]/[`netio`] (the epoll load side),
//! [`sys`] (/proc, affinity, perf).

mod certs;
mod chart;
mod floor;
mod http_origin;
mod httpload;
mod load;
mod netio;
mod openloop;
mod origin;
mod proxy;
mod report;
mod runner;
mod scenarios;
mod special;
mod sys;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{CommandFactory, FromArgMatches, Parser};

use runner::Settings;

/// Compare meshgate with haproxy and nginx on the same scenario, per proxy-CPU-second.
#[derive(Debug, Parser)]
#[command(name = "meshgate-perf")]
struct Cli {
    /// Scenario name, several separated by commas, or `all`.
    scenario: String,
    /// Short run: 1 s warm-up, 3 s windows, 3 rounds (under a minute per scenario on an idle
    /// machine). Default: 2 s warm-up, 5 s windows, 7 rounds.
    #[arg(long)]
    quick: bool,
    /// meshgate binary [default: <workspace>/target/release/meshgate].
    #[arg(long, value_name = "PATH")]
    meshgate: Option<PathBuf>,
    /// Proxies to run (comma-separated); the others stay in the table as "not selected". Add
    /// `uring-floor` for a reference column: a protocol-less io_uring byte relay, the least any
    /// proxy can cost on this machine (scenarios with plain TCP or HTTP/1.1 listeners).
    #[arg(long, value_delimiter = ',', default_value = "meshgate,haproxy,nginx")]
    proxies: Vec<String>,
    /// Rounds per proxy (interleaved); the report shows medians.
    #[arg(long)]
    rounds: Option<usize>,
    /// Warm-up seconds discarded before each window.
    #[arg(long)]
    warmup: Option<f64>,
    /// Measurement window in seconds.
    #[arg(long)]
    duration: Option<f64>,
    /// Seconds of syscall counting with `perf stat` after the window of the last round.
    #[arg(long)]
    syscall_window: Option<f64>,
    /// Do not count syscalls.
    #[arg(long)]
    no_syscalls: bool,
    /// Windows tried when other processes disturb one (other work > 10% of either core).
    #[arg(long)]
    attempts: Option<usize>,
    /// Longest wait, in seconds, for a quiet machine before trying a disturbed window again.
    #[arg(long)]
    max_wait: Option<f64>,
    /// CPU the proxy is pinned to.
    #[arg(long, default_value_t = 0)]
    proxy_cpu: usize,
    /// CPU the load generator and origin are pinned to.
    #[arg(long, default_value_t = 1)]
    load_cpu: usize,
    /// Results directory [default: <workspace>/perf/results/<UTC timestamp>].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

fn scenario_help() -> String {
    let mut s = String::from("Scenarios:\n");
    for sc in scenarios::all() {
        s.push_str(&format!("  {:<16} {}\n", sc.name(), sc.about()));
    }
    s.push_str("  all              every scenario above, in order\n\n");
    s.push_str(&format!(
        "Needs (Debian 12): {}\nmeshgate: build it first with `cargo build --release`.",
        proxy::APT_LINE
    ));
    s
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(floor::ARG) {
        let (Some(listen), Some(upstream)) = (args.get(2), args.get(3)) else {
            eprintln!("usage: meshgate-perf {} LISTEN UPSTREAM", floor::ARG);
            std::process::exit(2);
        };
        if let Err(e) = floor::main(listen, upstream) {
            eprintln!("meshgate-perf {}: {e:#}", floor::ARG);
            std::process::exit(1);
        }
        return;
    }
    if let Err(e) = run() {
        eprintln!("meshgate-perf: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let matches = Cli::command().after_help(scenario_help()).get_matches();
    let cli = Cli::from_arg_matches(&matches)?;

    let chosen: Vec<&dyn scenarios::Scenario> = if cli.scenario == "all" {
        scenarios::all()
    } else {
        let mut v = Vec::new();
        for name in cli.scenario.split(',') {
            match scenarios::find(name) {
                Some(s) => v.push(s),
                None => bail!("unknown scenario {name:?}\n\n{}", scenario_help()),
            }
        }
        v
    };
    if cli.proxy_cpu == cli.load_cpu {
        bail!("--proxy-cpu and --load-cpu must differ");
    }
    let ncpu = sys::online_cpus();
    if cli.proxy_cpu.max(cli.load_cpu) >= ncpu {
        bail!(
            "this machine has {ncpu} CPU(s); the method needs two (proxy on CPU {}, load on CPU {})",
            cli.proxy_cpu,
            cli.load_cpu
        );
    }
    // Everything this process runs from here on (origin, generators, perf) stays on the load
    // core; proxies are moved to the proxy core between fork and exec.
    sys::pin_current_thread(cli.load_cpu).context("pinning the harness to the load CPU")?;

    // Many short interleaved rounds rather than a few long ones: on a shared VM the cost per
    // unit of work drifts by 10-30% over seconds to minutes, and a median over more rounds
    // taken in rotation is what cancels that (docs/performance.md).
    let (warmup, window, rounds, sys_window, attempts, max_wait) = if cli.quick {
        (1.0, 3.0, 3, 1.0, 2, 10.0)
    } else {
        (2.0, 5.0, 7, 2.0, 3, 60.0)
    };
    let syscall_window = if cli.no_syscalls {
        None
    } else {
        match sys::perf_syscalls_available() {
            Ok(()) => Some(cli.syscall_window.unwrap_or(sys_window)),
            Err(e) => {
                eprintln!("meshgate-perf: syscalls will not be counted: {e:#}");
                None
            }
        }
    };
    let stamp = sys::utc_stamp();
    let out = cli
        .out
        .clone()
        .unwrap_or_else(|| workspace_root().join("perf/results").join(&stamp));
    let settings = Settings {
        warmup_secs: cli.warmup.unwrap_or(warmup),
        window_secs: cli.duration.unwrap_or(window),
        rounds: cli.rounds.unwrap_or(rounds).max(1),
        syscall_window_secs: syscall_window,
        proxy_cpu: cli.proxy_cpu,
        load_cpu: cli.load_cpu,
        attempts: cli.attempts.unwrap_or(attempts).max(1),
        max_wait_secs: cli.max_wait.unwrap_or(max_wait),
        out: out.clone(),
    };

    let meshgate_bin = cli
        .meshgate
        .clone()
        .unwrap_or_else(|| workspace_root().join("target/release/meshgate"));
    let proxies = proxy::all(&meshgate_bin, &cli.proxies);
    let mut missing = false;
    for p in &proxies {
        match p.check() {
            Ok(()) => eprintln!("meshgate-perf: {:<9} {}", p.name(), p.version()),
            Err(why) => {
                missing |= p.name() != "meshgate";
                eprintln!("meshgate-perf: {:<9} NOT AVAILABLE: {why}", p.name());
            }
        }
    }
    if missing {
        eprintln!(
            "meshgate-perf: install the comparison proxies with:\n    {}",
            proxy::APT_LINE
        );
    }

    let machine = sys::Machine::read();
    // 10,000 idle connections need ~20,000 descriptors here (client and origin ends) and
    // ~20,000 in the proxy, which inherits the limit.
    let nofile = sys::raise_nofile(65_536);
    if nofile < 25_000 {
        eprintln!(
            "meshgate-perf: open-file limit is {nofile}; the idle-connection scenarios need ~25,000 (run as root or raise `ulimit -n`)"
        );
    }
    let certs = certs::Certs::generate(&out.join("certs")).context("generating certificates")?;
    let mut results = Vec::new();
    for sc in chosen {
        eprintln!("meshgate-perf: scenario {}: {}", sc.name(), sc.about());
        results.push(runner::run_scenario(
            sc,
            &proxies,
            &cli.proxies,
            &settings,
            &certs,
        )?);
    }
    let md = report::write_all(&out, &stamp, &machine, &settings, &results)?;
    println!("{md}");
    eprintln!("meshgate-perf: wrote {}", out.display());
    Ok(())
}
