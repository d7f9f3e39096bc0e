//! `meshgate check`: can this host run this config? Each line passes, warns or fails with a
//! hint: io_uring (and the ring mode the shards will use), CPUs, the memlock and open-file
//! limits, the config, its ports, and the expiry of the certificates and bundle roots it names.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};

use clap::Args;
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use meshgate_config::Config;
use meshgate_dataplane::rt;
use serde::Serialize;

use super::{Output, exit};

/// A certificate expiring sooner than this is a warning.
const EXPIRY_WARNING_SECS: i64 = 7 * 86_400;
/// Descriptors the process needs besides its connections (rings, files, admin, log).
const FD_BASE: u64 = 256;

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Config file to check (its ports, certificates, limits); without it, the embedded
    /// default.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Output,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
enum Verdict {
    Pass,
    Warn,
    Fail,
}

#[derive(Debug, Serialize)]
struct Item {
    check: String,
    result: Verdict,
    detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    hint: Option<String>,
}

impl Item {
    fn new(check: impl Into<String>, result: Verdict, detail: impl Into<String>) -> Item {
        Item {
            check: check.into(),
            result,
            detail: detail.into(),
            hint: None,
        }
    }

    fn hint(mut self, hint: impl Into<String>) -> Item {
        self.hint = Some(hint.into());
        self
    }
}

pub fn run(args: CheckArgs) -> u8 {
    let mut items = Vec::new();
    let host_ok = host(&mut items);
    let config = config(args.config.as_deref(), &mut items);
    if let Some(config) = &config {
        open_files(config, &mut items);
        ports(config, &mut items);
        certificates(config, &mut items);
    }
    let worst = items
        .iter()
        .map(|i| i.result)
        .max()
        .unwrap_or(Verdict::Pass);
    match args.output {
        Output::Json => {
            let doc = serde_json::json!({
                "ok": worst != Verdict::Fail,
                "ring_mode": rt::check().ok().map(|f| f.to_string()),
                "cpus": rt::allowed_cpus(),
                "memlock_kib": memlock_kib(),
                "checks": items,
            });
            println!("{doc}");
        }
        Output::Table => {
            let mut t = Table::new();
            t.load_preset(UTF8_FULL_CONDENSED);
            t.set_header(["check", "result", "detail"]);
            for i in &items {
                let result = match i.result {
                    Verdict::Pass => "ok",
                    Verdict::Warn => "WARN",
                    Verdict::Fail => "FAIL",
                };
                let detail = match &i.hint {
                    Some(h) => format!("{}\nfix: {h}", i.detail),
                    None => i.detail.clone(),
                };
                t.add_row([i.check.as_str(), result, detail.as_str()]);
            }
            println!("{t}");
        }
    }
    if !host_ok {
        exit::HOST
    } else if config.is_none() {
        exit::CONFIG
    } else if worst == Verdict::Fail {
        exit::FAILURE
    } else {
        exit::OK
    }
}

/// io_uring, CPUs, memlock; false when the dataplane cannot start here.
fn host(items: &mut Vec<Item>) -> bool {
    let ring = rt::check();
    match &ring {
        Ok(f) => items.push(Item::new(
            "io_uring",
            Verdict::Pass,
            format!("ring mode: {f}"),
        )),
        Err(e) => items.push(Item::new("io_uring", Verdict::Fail, e.to_string())),
    }
    let cpus = rt::allowed_cpus();
    items.push(Item::new(
        "CPUs",
        Verdict::Pass,
        format!("{} usable {:?}: one shard each", cpus.len(), cpus),
    ));
    let memlock = memlock_kib();
    let need = rt::MEMLOCK_NEED / 1024;
    items.push(match memlock {
        None => Item::new("memlock limit", Verdict::Pass, "unlimited"),
        Some(k) if k >= need => Item::new("memlock limit", Verdict::Pass, format!("{k} KiB")),
        Some(k) => Item::new(
            "memlock limit",
            Verdict::Fail,
            format!("{k} KiB; the rings need at least {need} KiB"),
        )
        .hint("LimitMEMLOCK=64M in the systemd unit, or `ulimit -l 65536`"),
    });
    ring.is_ok() && memlock.is_none_or(|k| k >= need)
}

fn config(path: Option<&Path>, items: &mut Vec<Item>) -> Option<Config> {
    let (loaded, name) = match path {
        Some(p) => (meshgate_config::load(p), p.display().to_string()),
        None => (
            meshgate_config::parse(
                meshgate_config::EMBEDDED_DEFAULT,
                meshgate_config::EMBEDDED_DEFAULT_ORIGIN,
            ),
            meshgate_config::EMBEDDED_DEFAULT_ORIGIN.to_string(),
        ),
    };
    match loaded {
        Ok(c) => {
            items.push(Item::new(
                "config",
                Verdict::Pass,
                format!(
                    "{name}: {} listener(s), {} route(s), {} cluster(s)",
                    c.listeners.len(),
                    c.routes.len(),
                    c.clusters.len()
                ),
            ));
            Some(c)
        }
        Err(e) => {
            items.push(
                Item::new("config", Verdict::Fail, e.to_string())
                    .hint("`meshgate config validate FILE` lists every error with its fix"),
            );
            None
        }
    }
}

/// Every connection holds a client and an upstream descriptor.
fn open_files(config: &Config, items: &mut Vec<Item>) {
    let conns: u64 = config
        .listeners
        .iter()
        .map(|l| u64::from(l.max_connections))
        .sum();
    let need = conns.saturating_mul(2).saturating_add(FD_BASE);
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    if rc != 0 {
        return;
    }
    let have = lim.rlim_cur;
    let item = if have == libc::RLIM_INFINITY || have >= need {
        Item::new("open files", Verdict::Pass, format!("limit {have}"))
    } else {
        Item::new(
            "open files",
            Verdict::Warn,
            format!(
                "limit {have}; the listeners' max_connections ({conns}) need about {need} \
                 (client + upstream per connection); beyond the limit new connections are refused"
            ),
        )
        .hint("LimitNOFILE=1048576 in the systemd unit (packaging/meshgate.service has it), or lower max_connections")
    };
    items.push(item);
}

fn ports(config: &Config, items: &mut Vec<Item>) {
    let mut addrs: Vec<(String, SocketAddr)> = config
        .listeners
        .iter()
        .map(|l| (format!("listener {}", l.name), l.address))
        .collect();
    if let Some(a) = config.admin.address {
        addrs.push(("admin".into(), a));
    }
    if let Some(c) = config.control.as_ref().and_then(|c| c.enrollment.as_ref()) {
        addrs.push(("enrollment server".into(), c.address));
    }
    for (what, addr) in addrs {
        if addr.port() == 0 {
            continue;
        }
        let check = format!("port {addr}");
        items.push(match TcpListener::bind(addr) {
            Ok(_) => Item::new(check, Verdict::Pass, format!("{what}: free")),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Item::new(
                check,
                Verdict::Fail,
                format!("{what}: in use by another process"),
            )
            .hint(format!("`ss -ltnp 'sport = :{}'` shows who; is meshgate already running?", addr.port())),
            Err(e) => Item::new(check, Verdict::Fail, format!("{what}: cannot bind: {e}"))
                .hint("a local address of this host, and a port this user may bind (below 1024 needs CAP_NET_BIND_SERVICE)"),
        });
    }
}

/// Served certificates, cluster identities and bundle roots the config names.
fn certificates(config: &Config, items: &mut Vec<Item>) {
    let mut files: Vec<(String, PathBuf)> = Vec::new();
    for l in &config.listeners {
        let Some(tls) = &l.tls else { continue };
        if tls.certificates.is_empty() && l.protocol != meshgate_config::Protocol::TlsPassthrough {
            items.push(Item::new(
                format!("listener {}", l.name),
                Verdict::Pass,
                "serves the local CA's identity (issued and renewed by meshgate run)",
            ));
        }
        for c in &tls.certificates {
            files.push((format!("listener {} certificate", l.name), c.cert.clone()));
        }
        for b in tls.trust_bundles.iter().filter(|b| !b.federated) {
            files.push((
                format!("listener {} bundle {}", l.name, b.trust_domain),
                b.bundle.clone(),
            ));
        }
    }
    for c in &config.clusters {
        let Some(tls) = &c.tls else { continue };
        if let Some(id) = &tls.identity {
            files.push((format!("cluster {} identity", c.name), id.cert.clone()));
        }
        files.push((
            format!("cluster {} trust bundle", c.name),
            tls.trust_bundle.clone(),
        ));
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    for (what, path) in files {
        if path.as_os_str().is_empty() {
            continue;
        }
        let certs = match meshgate_config::pem::read_certificates(&path) {
            Ok(c) => c,
            Err(e) => {
                items.push(Item::new(what, Verdict::Fail, e.to_string()));
                continue;
            }
        };
        // A chain or bundle is as good as its first certificate to expire.
        let soonest = certs
            .iter()
            .filter_map(meshgate_config::pem::summarize)
            .min_by_key(|s| s.not_after);
        let Some(s) = soonest else { continue };
        let left = s.not_after - now;
        let when = meshgate_config::pem::format_timestamp(s.not_after);
        let detail = format!("{}: {} expires {when}", path.display(), s.subject);
        items.push(if left <= 0 {
            Item::new(what, Verdict::Fail, format!("{detail} (EXPIRED)"))
                .hint("replace the file; meshgate reloads it (runtime.watch_files) or on `meshgate reload`")
        } else if left < EXPIRY_WARNING_SECS {
            Item::new(what, Verdict::Warn, format!("{detail} (in {} h)", left / 3600))
                .hint("renew it now; meshgate reloads it (runtime.watch_files) or on `meshgate reload`")
        } else {
            Item::new(what, Verdict::Pass, format!("{detail} (in {} days)", left / 86_400))
        });
    }
}

fn memlock_kib() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) };
    if rc != 0 || lim.rlim_cur == libc::RLIM_INFINITY {
        None
    } else {
        Some(lim.rlim_cur / 1024)
    }
}
