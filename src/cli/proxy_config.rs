//! `meshgate proxy-config listeners|routes|clusters|endpoints|secrets`: what the running gateway
//! has loaded (the generation in force, not the file on disk), as `istioctl proxy-config` shows
//! it for Envoy. Read from the admin API's `/config_dump`, `/status`, `/clusters` and `/certs`.

use clap::{Args, ValueEnum};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use serde_json::Value;

use super::admin_client::{self, AdminAddr};
use super::{DEFAULT_ADMIN, Output, exit};

#[derive(Debug, Args)]
pub struct ProxyConfigArgs {
    /// What to show.
    #[arg(value_enum)]
    pub what: What,
    /// Only the entry with this name (listener, route or cluster; for `secrets`, the listener
    /// or cluster that uses the certificate).
    #[arg(long)]
    pub name: Option<String>,
    /// Admin API of the gateway: `127.0.0.1:15000` or `unix:/run/meshgate/admin.sock`.
    #[arg(long, env = "MESHGATE_ADMIN", default_value = DEFAULT_ADMIN)]
    pub admin: String,
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Output,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum What {
    /// Listeners: address, protocol, TLS settings, routes.
    Listeners,
    /// Routes in match order per listener: match and action.
    Routes,
    /// Clusters: endpoints, balancing, upstream TLS.
    Clusters,
    /// Every endpoint of every cluster with its weight, health and ejection state, and its
    /// cluster's connection counters.
    Endpoints,
    /// Loaded certificates and trust-bundle roots: SPIFFE ID, serial, expiry.
    Secrets,
}

pub fn run(args: ProxyConfigArgs) -> u8 {
    let addr = AdminAddr::parse(&args.admin);
    let path = match args.what {
        What::Listeners | What::Routes | What::Clusters => "/config_dump",
        What::Endpoints => "/clusters",
        What::Secrets => "/certs",
    };
    let body = match admin_client::fetch(&addr, path) {
        Ok(b) => b,
        Err(code) => return code,
    };
    let doc: Value = match serde_json::from_str(&body) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: cannot read the admin API's {path} document: {e}");
            return exit::FAILURE;
        }
    };
    let rows = select(&doc, args.what, args.name.as_deref());
    if args.output == Output::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(&Value::Array(rows)).unwrap_or_default()
        );
        return exit::OK;
    }
    if rows.is_empty() {
        match &args.name {
            Some(n) => eprintln!("nothing named `{n}`"),
            None => eprintln!("none loaded"),
        }
        return exit::FAILURE;
    }
    print!("{}", table(args.what, &rows));
    exit::OK
}

/// The entries to show: one JSON object each (what `-o json` prints).
fn select(doc: &Value, what: What, name: Option<&str>) -> Vec<Value> {
    let named = |v: &&Value, key: &str| name.is_none_or(|n| v[key].as_str() == Some(n));
    let list = |key: &str| doc[key].as_array().cloned().unwrap_or_default();
    match what {
        What::Listeners => list("listeners"),
        What::Routes => list("routes"),
        What::Clusters => list("clusters"),
        What::Endpoints => {
            // `/clusters`: one object per endpoint.
            return doc
                .as_array()
                .into_iter()
                .flatten()
                .filter(|e| named(e, "cluster"))
                .cloned()
                .collect();
        }
        What::Secrets => {
            return doc
                .as_array()
                .into_iter()
                .flatten()
                .filter(|c| {
                    name.is_none_or(|n| {
                        c["listener"].as_str() == Some(n) || c["cluster"].as_str() == Some(n)
                    })
                })
                .cloned()
                .collect();
        }
    }
    .into_iter()
    .filter(|v| named(&v, "name"))
    .collect()
}

fn table(what: What, rows: &[Value]) -> String {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    match what {
        What::Listeners => {
            t.set_header([
                "listener",
                "address",
                "protocol",
                "tls",
                "routes",
                "max conns",
            ]);
            for l in rows {
                t.add_row([
                    text(&l["name"]),
                    text(&l["address"]),
                    text(&l["protocol"]),
                    tls_summary(&l["tls"]),
                    l["routes"].as_array().map_or(0, Vec::len).to_string(),
                    text(&l["max_connections"]),
                ]);
            }
        }
        What::Routes => {
            t.set_header(["route", "listener", "match", "action"]);
            for r in rows {
                t.add_row([
                    text(&r["name"]),
                    text(&r["listener"]),
                    compact(&r["match"]),
                    action(&r["action"]),
                ]);
            }
        }
        What::Clusters => {
            t.set_header([
                "cluster",
                "endpoints",
                "balance",
                "connect timeout",
                "upstream tls",
            ]);
            for c in rows {
                t.add_row([
                    text(&c["name"]),
                    list(&c["endpoints"]),
                    text(&c["balance"]),
                    text(&c["connect_timeout"]),
                    if c["tls"].is_null() {
                        "-".into()
                    } else {
                        compact(&c["tls"]["verify"])
                    },
                ]);
            }
        }
        What::Endpoints => {
            t.set_header([
                "cluster",
                "endpoint",
                "weight",
                "health",
                "ejections",
                "checks passed/failed",
            ]);
            for e in rows {
                let health = match (e["healthy"].as_bool(), e["ejected"].as_bool()) {
                    (_, Some(true)) => format!(
                        "EJECTED ({}s left)",
                        e["ejected_for_seconds"]
                            .as_f64()
                            .map_or(0, |s| s.ceil() as u64)
                    ),
                    (Some(false), _) => "UNHEALTHY".into(),
                    _ => "healthy".into(),
                };
                t.add_row([
                    text(&e["cluster"]),
                    text(&e["endpoint"]),
                    text(&e["weight"]),
                    health,
                    if e["outlier_detection"].as_bool() == Some(true) {
                        text(&e["ejections"])
                    } else {
                        "-".into()
                    },
                    if e["health_checked"].as_bool() == Some(true) {
                        format!(
                            "{}/{}",
                            text(&e["health_checks_passed"]),
                            text(&e["health_checks_failed"])
                        )
                    } else {
                        "-".into()
                    },
                ]);
            }
        }
        What::Secrets => {
            t.set_header([
                "kind",
                "used by",
                "trust domain",
                "SPIFFE ID / subject",
                "serial",
                "expires",
            ]);
            for c in rows {
                let used_by = match (c["listener"].as_str(), c["cluster"].as_str()) {
                    (Some(l), _) => format!("listener {l}"),
                    (None, Some(cl)) => format!("cluster {cl}"),
                    _ => "-".into(),
                };
                let id = c["uris"]
                    .as_array()
                    .and_then(|u| u.first())
                    .map_or_else(|| text(&c["subject"]), text);
                t.add_row([
                    text(&c["kind"]),
                    used_by,
                    text(&c["trust_domain"]),
                    id,
                    text(&c["serial"]),
                    expiry(c["not_after"].as_i64()),
                ]);
            }
        }
    }
    format!("{t}\n")
}

/// A scalar as text; `-` for null.
fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn list(v: &Value) -> String {
    v.as_array()
        .map(|a| a.iter().map(text).collect::<Vec<_>>().join(", "))
        .unwrap_or_else(|| text(v))
}

/// JSON without nulls and empty lists, on one line (`-` when nothing is left).
fn compact(v: &Value) -> String {
    fn prune(v: &Value) -> Option<Value> {
        match v {
            Value::Null => None,
            Value::Array(a) if a.is_empty() => None,
            Value::Object(m) => {
                let m: serde_json::Map<_, _> = m
                    .iter()
                    .filter(|(k, _)| !k.ends_with("_index"))
                    .filter_map(|(k, v)| prune(v).map(|v| (k.clone(), v)))
                    .collect();
                (!m.is_empty()).then_some(Value::Object(m))
            }
            other => Some(other.clone()),
        }
    }
    prune(v).map_or_else(|| "-".into(), |v| v.to_string())
}

fn tls_summary(tls: &Value) -> String {
    if tls.is_null() {
        return "-".into();
    }
    let certs = tls["certificates"].as_array().map_or(0, Vec::len);
    let certs = if certs == 0 {
        "local CA identity".to_string()
    } else {
        format!("{certs} cert(s)")
    };
    let domains: Vec<String> = tls["trust_bundles"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| text(&b["trust_domain"]))
        .collect();
    let mut s = format!(
        "{certs}, min {}, client auth {}",
        text(&tls["min_version"]),
        text(&tls["client_auth"])
    );
    if !domains.is_empty() {
        s.push_str(&format!(" ({})", domains.join(", ")));
    }
    s
}

fn action(a: &Value) -> String {
    if let Some(f) = a.get("forward") {
        let clusters: Vec<String> = f["clusters"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                if f["clusters"].as_array().map_or(0, Vec::len) > 1 {
                    format!("{} ({})", text(&c["cluster"]), text(&c["weight"]))
                } else {
                    text(&c["cluster"])
                }
            })
            .collect();
        return format!("forward {}", clusters.join(", "));
    }
    compact(a)
}

fn expiry(unix: Option<i64>) -> String {
    let Some(t) = unix else { return "-".into() };
    let Ok(at) = time::OffsetDateTime::from_unix_timestamp(t) else {
        return t.to_string();
    };
    let left = t - time::OffsetDateTime::now_utc().unix_timestamp();
    let when = at
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string());
    if left <= 0 {
        format!("{when} (EXPIRED)")
    } else {
        format!(
            "{when} (in {})",
            meshgate_config::format_duration(std::time::Duration::from_secs(left as u64))
        )
    }
}
