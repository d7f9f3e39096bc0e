//! Turns measured samples into the comparison table (markdown + JSON) and SVG bar charts.

use std::fmt::Write as _;
use std::fs;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::runner::{ProxyResult, Sample, ScenarioResult, Settings, median, others};
use crate::sys::Machine;

/// Which way a metric is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Better {
    Higher,
    Lower,
    /// Context, not a score.
    Info,
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub scenario: String,
    pub metric: String,
    pub better: Better,
    /// One value per proxy in column order; None where the proxy did not run.
    pub values: Vec<Option<f64>>,
}

/// The table columns besides meshgate, whose ratios we print.
const BASELINES: [&str; 2] = ["haproxy", "nginx"];

/// Median over the rounds that count (undisturbed ones when there are any).
fn med(p: &ProxyResult, f: impl Fn(&Sample) -> Option<f64>) -> Option<f64> {
    median(p.counted().into_iter().filter_map(f).collect())
}

/// Median over every round: for counts per unit of work (syscalls), which other processes do
/// not change, and which only the last round measures.
fn med_all(p: &ProxyResult, f: impl Fn(&Sample) -> Option<f64>) -> Option<f64> {
    median(p.samples.iter().filter_map(f).collect())
}

/// The metric rows of one scenario, medians over rounds.
pub fn rows(r: &ScenarioResult) -> Vec<Row> {
    let unit = &r.unit;
    let s = r.scale;
    let one = &r.unit_one;
    let mut out = Vec::new();
    let mut row = |metric: String, better: Better, f: &dyn Fn(&ProxyResult) -> Option<f64>| {
        let values: Vec<Option<f64>> = r.proxies.iter().map(f).collect();
        if values.iter().any(Option::is_some) || better != Better::Info {
            out.push(Row {
                scenario: r.scenario.clone(),
                metric,
                better,
                values,
            });
        }
    };
    if !r.metrics.is_empty() {
        for (key, label, better) in &r.metrics {
            row(label.clone(), *better, &|p| {
                med(p, |x| x.metrics.get(key.as_str()).copied())
            });
        }
        return out;
    }
    row(format!("{unit} / proxy-CPU-second"), Better::Higher, &|p| {
        med(p, |x| x.per_cpu_sec(s))
    });
    row(
        format!("{unit} / second (throughput)"),
        Better::Higher,
        &|p| med(p, |x| Some(x.per_sec(s))),
    );
    let has_res = r
        .proxies
        .iter()
        .any(|p| p.samples.iter().any(|x| x.res_irqs.is_some()));
    if has_res {
        row(
            format!("rescheduling interrupts on the proxy core / {one} (lower is better)"),
            Better::Lower,
            &|p| {
                med(p, |x| {
                    x.res_irqs
                        .filter(|_| x.work > 0)
                        .map(|r| r as f64 / (x.work as f64 * s))
                })
            },
        );
    }
    row("proxy CPU, % of one core".into(), Better::Info, &|p| {
        med(p, |x| Some(x.proxy_util() * 100.0))
    });
    let has_syscalls = r
        .proxies
        .iter()
        .any(|p| p.samples.iter().any(|x| x.syscalls.is_some()));
    if has_syscalls {
        row(
            format!("syscalls / {one} (lower is better)"),
            Better::Lower,
            &|p| {
                med_all(p, |x| {
                    x.syscalls
                        .as_ref()
                        .filter(|c| c.work > 0.0)
                        .map(|c| c.counts.syscalls as f64 / (c.work * s))
                })
            },
        );
        let has_uring = r.proxies.iter().any(|p| {
            p.samples
                .iter()
                .any(|x| x.syscalls.as_ref().is_some_and(|c| c.counts.uring_ops > 0))
        });
        if has_uring {
            row(
                format!("io_uring ops / {one} (lower is better)"),
                Better::Lower,
                &|p| {
                    med_all(p, |x| {
                        x.syscalls
                            .as_ref()
                            .filter(|c| c.work > 0.0)
                            .map(|c| c.counts.uring_ops as f64 / (c.work * s))
                    })
                },
            );
        }
    }
    let has_latency = r
        .proxies
        .iter()
        .any(|p| p.samples.iter().any(|x| x.latency.is_some()));
    if has_latency {
        row(
            "p50 round-trip latency, µs (closed loop)".into(),
            Better::Info,
            &|p| med(p, |x| x.latency.map(|l| l.p50_us)),
        );
        row(
            "p99 round-trip latency, µs (closed loop)".into(),
            Better::Info,
            &|p| med(p, |x| x.latency.map(|l| l.p99_us)),
        );
    }
    row(
        "proxy core busy incl. softirq, %".into(),
        Better::Info,
        &|p| med(p, |x| Some(x.proxy_core_busy * 100.0)),
    );
    row("load-generator core busy, %".into(), Better::Info, &|p| {
        med(p, |x| Some(x.load_core_busy * 100.0))
    });
    out
}

/// A number with sensible precision: 1,234,567 / 12,345 / 123.4 / 1.23.
pub fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 {
        let s = format!("{:.0}", v.abs());
        let mut grouped = String::new();
        for (i, ch) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 {
                grouped.push(',');
            }
            grouped.push(ch);
        }
        if v < 0.0 {
            format!("-{grouped}")
        } else {
            grouped
        }
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => format!("{:.2}x", a / b),
        _ => "–".into(),
    }
}

/// The comparison table (markdown), one block of rows per scenario.
pub fn table(results: &[ScenarioResult]) -> String {
    let mut s = String::new();
    let names: Vec<String> = results
        .first()
        .map(|r| r.proxies.iter().map(|p| p.proxy.clone()).collect())
        .unwrap_or_default();
    let _ = write!(s, "| scenario | metric |");
    for n in &names {
        let _ = write!(s, " {n} |");
    }
    for b in BASELINES {
        let _ = write!(s, " meshgate/{b} |");
    }
    // The reference relay, when it ran: how far below nginx any proxy could go here.
    let floor = names.iter().any(|n| n == crate::proxy::FLOOR);
    if floor {
        let _ = write!(s, " {}/nginx |", crate::proxy::FLOOR);
    }
    s.push('\n');
    s.push_str("|---|---|");
    for _ in 0..names.len() + BASELINES.len() + usize::from(floor) {
        s.push_str("---:|");
    }
    s.push('\n');
    for r in results {
        let idx = |name: &str| r.proxies.iter().position(|p| p.proxy == name);
        for row in rows(r) {
            let _ = write!(s, "| {} | {} |", row.scenario, row.metric);
            for (p, v) in r.proxies.iter().zip(&row.values) {
                let cell = match v {
                    Some(v) => fmt_num(*v),
                    None if p.status.contains(crate::proxy::NOT_SUPPORTED) => {
                        "not supported by this build".into()
                    }
                    None if !p.ran() => "not run".into(),
                    None => "–".into(),
                };
                let _ = write!(s, " {cell} |");
            }
            let value = |name: &str| idx(name).and_then(|i| row.values[i]);
            let pairs = BASELINES.iter().map(|b| ("meshgate", *b));
            let floor_pair = floor.then_some((crate::proxy::FLOOR, "nginx"));
            for (a, b) in pairs.chain(floor_pair) {
                let cell = if row.better == Better::Info {
                    String::new()
                } else {
                    ratio(value(a), value(b))
                };
                let _ = write!(s, " {cell} |");
            }
            s.push('\n');
        }
    }
    s
}

#[derive(Debug, Serialize)]
struct JsonReport<'a> {
    stamp: &'a str,
    machine: &'a Machine,
    settings: &'a Settings,
    /// The proxies, in the order of every row's `values`.
    columns: Vec<String>,
    rows: Vec<Row>,
    scenarios: &'a [ScenarioResult],
    warnings: &'a [String],
}

/// Warnings a reader must see next to the numbers.
pub fn warnings(results: &[ScenarioResult], st: &Settings) -> Vec<String> {
    let mut w = Vec::new();
    for r in results {
        for p in &r.proxies {
            let n = p.samples.len();
            // Disturbed windows are reported below; their load core was busy with other work.
            let hot: Vec<&Sample> = p
                .samples
                .iter()
                .filter(|x| x.load_core_busy > 0.95 && x.clean())
                .collect();
            if !hot.is_empty() {
                let proxy_util =
                    median(hot.iter().map(|x| x.proxy_util()).collect()).unwrap_or(0.0);
                let effect = if proxy_util < 0.9 {
                    "the load side, not the proxy, limited throughput (raw throughput ratios \
                     understate differences; per-proxy-CPU-second figures stay comparable)"
                } else {
                    "both cores were near saturation (balanced closed loop)"
                };
                w.push(format!(
                    "{}: load-generator core (CPU {}) was >95% busy in {} of {n} windows with {} \
                     (proxy at {:.0}% CPU): {effect}",
                    r.scenario,
                    st.load_cpu,
                    hot.len(),
                    p.proxy,
                    proxy_util * 100.0
                ));
            }
            for x in p.samples.iter().filter(|x| !x.clean()) {
                w.push(format!(
                    "{} / {} round {}: still disturbed after {} windows: other work took {:.0}% of \
                     the proxy core and {:.0}% of the load core ({}); {}",
                    r.scenario,
                    p.proxy,
                    x.round,
                    x.attempts,
                    x.proxy_core_foreign * 100.0,
                    x.load_core_foreign * 100.0,
                    others(&x.others),
                    if p.counted().len() < p.samples.len() {
                        "left out of the medians"
                    } else {
                        "no clean round, so the medians include it; rerun on an idle machine"
                    }
                ));
            }
            let errors: u64 = p.samples.iter().map(|x| x.errors).sum();
            if errors > 0 {
                w.push(format!(
                    "{}: {} connection errors with {} during measured windows",
                    r.scenario, errors, p.proxy
                ));
            }
        }
    }
    w
}

/// Writes results.md, results.json and one SVG chart per scenario into `dir`; returns the
/// markdown.
pub fn write_all(
    dir: &Path,
    stamp: &str,
    machine: &Machine,
    settings: &Settings,
    results: &[ScenarioResult],
) -> Result<String> {
    fs::create_dir_all(dir)?;
    let warns = warnings(results, settings);
    let mut md = String::new();
    let _ = writeln!(md, "# meshgate-perf results {stamp}\n");
    let _ = writeln!(
        md,
        "Machine: {} CPUs, {}, kernel {}, {}.  ",
        machine.nproc, machine.cpu_model, machine.kernel, machine.os
    );
    let _ = writeln!(
        md,
        "Method: each proxy alone on CPU {} with one worker thread; load generator and origin on \
         CPU {}; warm-up {}s discarded, then a {}s window; {} rounds, proxy order rotated each \
         round; medians. Proxy CPU = utime+stime of its whole process tree (/proc/PID/stat).\n",
        settings.proxy_cpu,
        settings.load_cpu,
        settings.warmup_secs,
        settings.window_secs,
        settings.rounds
    );
    md.push_str(&table(results));
    let _ = writeln!(md, "\n## Proxies\n");
    if let Some(r) = results.first() {
        for p in &r.proxies {
            let _ = writeln!(
                md,
                "- {}: {}",
                p.proxy,
                if p.version.is_empty() {
                    "-"
                } else {
                    &p.version
                }
            );
        }
    }
    for r in results {
        for p in r.proxies.iter().filter(|p| !p.ran()) {
            let _ = writeln!(md, "- {} / {}: {}", r.scenario, p.proxy, p.status);
        }
    }
    let _ = writeln!(md, "\n## Headline metric per round\n");
    let _ = writeln!(
        md,
        "Work per proxy-CPU-second (or the scenario's first row) in each round, in round order \
         (* = disturbed, left out of the median when the proxy has undisturbed rounds); spread = \
         max / min over the counted rounds.\n"
    );
    let _ = writeln!(
        md,
        "| scenario | proxy | unit | rounds | median | spread |\n|---|---|---|---|---:|---:|"
    );
    for r in results {
        // The headline: work per proxy-CPU-second, or a metric scenario's first row.
        let value = |x: &Sample| match r.metrics.first() {
            Some((key, _, _)) => x.metrics.get(key.as_str()).copied(),
            None => x.per_cpu_sec(r.scale),
        };
        let unit = r
            .metrics
            .first()
            .map_or(r.unit.clone(), |(_, label, _)| label.clone());
        for p in r.proxies.iter().filter(|p| p.ran()) {
            let v: Vec<String> = p
                .samples
                .iter()
                .map(|x| {
                    format!(
                        "{}{}",
                        value(x).map_or("–".into(), fmt_num),
                        if x.clean() { "" } else { "*" }
                    )
                })
                .collect();
            let counted: Vec<f64> = p.counted().iter().filter_map(|x| value(x)).collect();
            let (lo, hi) = counted
                .iter()
                .fold((f64::MAX, 0.0f64), |(lo, hi), &v| (lo.min(v), hi.max(v)));
            let spread = if counted.len() > 1 && lo > 0.0 {
                format!("{:.2}x", hi / lo)
            } else {
                "–".into()
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {spread} |",
                r.scenario,
                p.proxy,
                unit,
                v.join(", "),
                median(counted).map_or("–".into(), fmt_num),
            );
        }
    }
    let notes: Vec<String> = results
        .iter()
        .flat_map(|r| {
            r.notes
                .iter()
                .map(move |n| format!("{}: {n}", r.scenario))
                .chain(r.proxies.iter().flat_map(move |p| {
                    p.notes
                        .iter()
                        .map(move |n| format!("{} / {}: {n}", r.scenario, p.proxy))
                }))
        })
        .collect();
    if !warns.is_empty() || !notes.is_empty() {
        let _ = writeln!(md, "\n## Warnings and notes\n");
        for w in warns.iter().chain(&notes) {
            let _ = writeln!(md, "- {w}");
        }
    }
    let _ = writeln!(
        md,
        "\nSyscalls: `perf stat -e raw_syscalls:sys_enter,io_uring:io_uring_submit_req -p <proxy pids>` \
         over {} in the last round (a separate window, so its overhead does not touch the CPU \
         figures). io_uring operations are not syscalls; they are counted apart.\n\
         Configs and logs of every run: `runs/`.",
        settings
            .syscall_window_secs
            .map_or("no window (disabled)".to_string(), |s| format!(
                "a {s}s window"
            ))
    );
    fs::write(dir.join("results.md"), &md).context("writing results.md")?;

    let all_rows: Vec<Row> = results.iter().flat_map(rows).collect();
    let json = JsonReport {
        stamp,
        machine,
        settings,
        columns: results
            .first()
            .map(|r| r.proxies.iter().map(|p| p.proxy.clone()).collect())
            .unwrap_or_default(),
        rows: all_rows,
        scenarios: results,
        warnings: &warns,
    };
    fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&json)?,
    )
    .context("writing results.json")?;
    for r in results {
        fs::write(dir.join(format!("{}.svg", r.scenario)), svg_chart(r))?;
    }
    if let Err(e) = png_charts(dir, results) {
        eprintln!("meshgate-perf: PNG charts not drawn: {e:#}");
    }
    Ok(md)
}

/// A bar chart of the headline metric (work per proxy-CPU-second), one bar per proxy that ran.
pub fn svg_chart(r: &ScenarioResult) -> String {
    let (subtitle, bars) = headline(r);
    let (w, h, left, top, bottom) = (560.0, 320.0, 60.0, 50.0, 40.0);
    let max = bars.iter().map(|b| b.1).fold(0.0f64, f64::max).max(1e-9);
    let slot = (w - left - 20.0) / bars.len().max(1) as f64;
    let mut s = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="13">
<rect width="100%" height="100%" fill="white"/>
<text x="{cx}" y="22" text-anchor="middle" font-size="15">{title}</text>
<text x="{cx}" y="40" text-anchor="middle" fill="#555">{subtitle}</text>
<line x1="{left}" y1="{base}" x2="{right}" y2="{base}" stroke="#333"/>
"##,
        cx = w / 2.0,
        title = r.scenario,
        base = h - bottom,
        right = w - 20.0,
    );
    for (i, (name, v)) in bars.iter().enumerate() {
        let bh = (h - top - bottom - 20.0) * v / max;
        let x = left + slot * i as f64 + slot * 0.2;
        let bw = slot * 0.6;
        let y = h - bottom - bh;
        let color = if name == "meshgate" {
            "#2b6cb0"
        } else {
            "#a0aec0"
        };
        let _ = write!(
            s,
            r#"<rect x="{x:.1}" y="{y:.1}" width="{bw:.1}" height="{bh:.1}" fill="{color}"/>
<text x="{tx:.1}" y="{vy:.1}" text-anchor="middle">{val}</text>
<text x="{tx:.1}" y="{ly:.1}" text-anchor="middle">{name}</text>
"#,
            tx = x + bw / 2.0,
            vy = y - 5.0,
            val = fmt_num(*v),
            ly = h - bottom + 18.0,
        );
    }
    s.push_str("</svg>\n");
    s
}

/// The headline of a scenario for charts: (subtitle, bars per proxy that has a value).
fn headline(r: &ScenarioResult) -> (String, Vec<(String, f64)>) {
    if let Some((key, label, better)) = r.metrics.first() {
        let bars = r
            .proxies
            .iter()
            .filter_map(|p| {
                med(p, |x| x.metrics.get(key.as_str()).copied()).map(|v| (p.proxy.clone(), v))
            })
            .collect();
        let way = if *better == Better::Lower {
            "lower is better"
        } else {
            "higher is better"
        };
        return (format!("{label} (median; {way})"), bars);
    }
    let bars = r
        .proxies
        .iter()
        .filter_map(|p| med(p, |x| x.per_cpu_sec(r.scale)).map(|v| (p.proxy.clone(), v)))
        .collect();
    (
        format!("{} per proxy-CPU-second (median; higher is better)", r.unit),
        bars,
    )
}

/// `<scenario>.png` per scenario and `overview.png` (meshgate's ratios on every headline).
fn png_charts(dir: &Path, results: &[ScenarioResult]) -> Result<()> {
    crate::chart::init_font()?;
    let mut heads = Vec::new();
    for r in results {
        let (subtitle, bars) = headline(r);
        if !bars.is_empty() {
            crate::chart::bars_png(
                &dir.join(format!("{}.png", r.scenario)),
                &r.scenario,
                &subtitle,
                &bars,
            )?;
        }
        if let Some(first) = rows(r).into_iter().next() {
            heads.push((first, 0));
        }
    }
    let columns: Vec<String> = results
        .first()
        .map(|r| r.proxies.iter().map(|p| p.proxy.clone()).collect())
        .unwrap_or_default();
    crate::chart::overview_png(&dir.join("overview.png"), &heads, &columns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        assert_eq!(fmt_num(1_234_567.4), "1,234,567");
        assert_eq!(fmt_num(123.45), "123.5");
        assert_eq!(fmt_num(1.234), "1.23");
        assert_eq!(fmt_num(0.1234), "0.123");
        assert_eq!(ratio(Some(3.0), Some(2.0)), "1.50x");
        assert_eq!(ratio(Some(3.0), None), "–");
    }
}
