//! `meshgate status`: a readable summary of the running gateway (or `-o json`).

use clap::Args;
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use meshgate_dataplane::admin::Status;

use super::admin_client::{self, AdminAddr};
use super::{DEFAULT_ADMIN, Output, exit};

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Admin API of the gateway: `127.0.0.1:15000` or `unix:/run/meshgate/admin.sock`.
    #[arg(long, env = "MESHGATE_ADMIN", default_value = DEFAULT_ADMIN)]
    pub admin: String,
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Output,
}

pub fn run(args: StatusArgs) -> u8 {
    let addr = AdminAddr::parse(&args.admin);
    let body = match admin_client::fetch(&addr, "/status") {
        Ok(b) => b,
        Err(code) => return code,
    };
    if args.output == Output::Json {
        print!("{body}");
        return exit::OK;
    }
    let st: Status = match serde_json::from_str(&body) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot read the status document: {e}");
            return exit::FAILURE;
        }
    };
    println!(
        "meshgate {}  pid {}  up {}  {}",
        st.version,
        st.pid,
        human_duration(st.uptime_seconds),
        if st.draining {
            "DRAINING"
        } else if st.ready {
            "ready"
        } else {
            "NOT READY"
        }
    );
    println!("shards: {}  ring: {}", st.shards, st.ring_mode);
    for s in &st.shard_stats {
        let total = s.busy_seconds + s.idle_seconds;
        let busy = if total > 0.0 {
            100.0 * s.busy_seconds / total
        } else {
            0.0
        };
        println!(
            "  shard {}: {} connection(s), {busy:.1}% busy since start",
            s.shard, s.connections
        );
    }
    println!(
        "config: {} (generation {})",
        st.config_source, st.config_generation
    );

    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header([
        "listener",
        "address",
        "protocol",
        "active",
        "limit",
        "accepted",
        "rejected",
        "bytes in",
        "bytes out",
    ]);
    for l in &st.listeners {
        t.add_row([
            l.name.clone(),
            l.address.to_string(),
            l.protocol.clone(),
            l.active.to_string(),
            l.max_connections.to_string(),
            l.accepted.to_string(),
            l.limit_rejected.to_string(),
            human_bytes(l.bytes_in),
            human_bytes(l.bytes_out),
        ]);
    }
    println!("{t}");
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header([
        "cluster",
        "endpoints",
        "active",
        "connects",
        "connect failures",
        "sent",
        "received",
    ]);
    for c in &st.clusters {
        t.add_row([
            c.name.clone(),
            c.endpoints
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            c.active.to_string(),
            c.connects.to_string(),
            c.connect_failures.to_string(),
            human_bytes(c.bytes_sent),
            human_bytes(c.bytes_received),
        ]);
    }
    println!("{t}");
    let tls: Vec<_> = st
        .listeners
        .iter()
        .filter_map(|l| l.tls.map(|t| (l, t)))
        .collect();
    if !tls.is_empty() {
        let mut t = Table::new();
        t.load_preset(UTF8_FULL_CONDENSED);
        t.set_header([
            "tls listener",
            "handshakes/s (avg since start)",
            "full",
            "resumed",
            "failed",
            "TLS 1.3",
            "TLS 1.2",
        ]);
        let secs = st.uptime_seconds.max(1) as f64;
        for (l, h) in tls {
            t.add_row([
                l.name.clone(),
                format!("{:.1}", (h.full + h.resumed + h.failed) as f64 / secs),
                h.full.to_string(),
                h.resumed.to_string(),
                h.failed.to_string(),
                percent(h.tls13, h.tls13 + h.tls12),
                percent(h.tls12, h.tls13 + h.tls12),
            ]);
        }
        println!("{t}");
    }
    certificates(&addr);
    exit::OK
}

/// One line on the loaded certificates and bundle roots: how many, and the first to expire
/// (`meshgate proxy-config secrets` lists them all).
fn certificates(addr: &AdminAddr) {
    let Ok((200, body)) = admin_client::get(addr, "/certs") else {
        return;
    };
    let Ok(certs) = serde_json::from_str::<Vec<serde_json::Value>>(&body) else {
        return;
    };
    let Some(first) = certs
        .iter()
        .min_by_key(|c| c["not_after"].as_i64().unwrap_or(i64::MAX))
    else {
        return;
    };
    let not_after = first["not_after"].as_i64().unwrap_or_default();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let left = not_after - now;
    let name = first["uris"]
        .get(0)
        .and_then(|u| u.as_str())
        .or_else(|| first["subject"].as_str())
        .unwrap_or("?");
    let when = meshgate_config::pem::format_timestamp(not_after);
    let warn = if left <= 0 {
        "  EXPIRED".to_string()
    } else {
        format!("  (in {})", human_duration(left as u64))
    };
    println!(
        "certificates: {} loaded (certificates and bundle roots); first to expire: {name} ({}) at {when}{warn}",
        certs.len(),
        first["kind"].as_str().unwrap_or("cert"),
    );
}

fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        "-".to_owned()
    } else {
        format!("{part} ({:.0}%)", part as f64 * 100.0 / whole as f64)
    }
}

fn human_duration(s: u64) -> String {
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86400 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
    }
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
