//! `meshgate reload`: ask the running gateway to re-read its config file and apply it as a new
//! generation; report the outcome. Exit 0 applied, 64 refused (invalid config; every error
//! listed), 1 other refusal, 69 gateway unreachable.

use std::time::Duration;

use clap::Args;
use meshgate_dataplane::admin::ReloadFailure;

use super::admin_client::{self, AdminAddr, Unreachable};
use super::{DEFAULT_ADMIN, Output, exit, report};

#[derive(Debug, Args)]
pub struct ReloadArgs {
    /// Admin API of the gateway: `127.0.0.1:15000` or `unix:/run/meshgate/admin.sock`.
    #[arg(long, env = "MESHGATE_ADMIN", default_value = DEFAULT_ADMIN)]
    pub admin: String,
    /// Wait for the outcome (always done; kept for scripts that pass it).
    #[arg(long)]
    pub wait: bool,
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Output,
}

pub fn run(args: ReloadArgs) -> u8 {
    post_and_report(&args.admin, "/reload", args.output)
}

/// POST a control action (`/reload`, `/config/rollback`) and report its outcome.
pub fn post_and_report(admin: &str, path: &str, output: Output) -> u8 {
    let addr = AdminAddr::parse(admin);
    let (code, body) = match admin_client::post(&addr, path, Duration::from_secs(40)) {
        Ok(r) => r,
        Err(e) => {
            report(&e);
            return if e.downcast_ref::<Unreachable>().is_some() {
                exit::UNAVAILABLE
            } else {
                exit::FAILURE
            };
        }
    };
    if output == Output::Json {
        print!("{body}");
    }
    match code {
        200 => {
            if output == Output::Table {
                let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                println!(
                    "applied: generation {} is in force (history #{}): {}",
                    v["generation"],
                    v["history_id"],
                    v["summary"].as_str().unwrap_or("")
                );
                for (key, what) in [
                    ("listeners_added", "added"),
                    ("listeners_removed", "removed"),
                ] {
                    if let Some(list) = v[key].as_array().filter(|l| !l.is_empty()) {
                        let names: Vec<&str> = list.iter().filter_map(|n| n.as_str()).collect();
                        println!("  listeners {what}: {}", names.join(", "));
                    }
                }
                if let Some(list) = v["needs_restart"].as_array().filter(|l| !l.is_empty()) {
                    let names: Vec<&str> = list.iter().filter_map(|n| n.as_str()).collect();
                    println!(
                        "  changed but only applied after a restart: {}",
                        names.join(", ")
                    );
                }
            }
            exit::OK
        }
        400 => {
            let failure: Option<ReloadFailure> = serde_json::from_str(&body).ok();
            if output == Output::Table {
                match &failure {
                    Some(f) => {
                        eprintln!("reload refused: {}", f.reason);
                        for e in &f.errors {
                            let line = e.line.map(|l| format!("line {l}: ")).unwrap_or_default();
                            eprintln!("  {line}{}: {}", e.path, e.message);
                            if let Some(h) = &e.hint {
                                eprintln!("    hint: {h}");
                            }
                        }
                    }
                    None => eprintln!("reload refused: {}", body.trim()),
                }
            }
            if failure.is_some_and(|f| !f.errors.is_empty()) {
                exit::CONFIG
            } else {
                exit::FAILURE
            }
        }
        _ => {
            eprintln!("error: admin API answered {code}: {}", body.trim());
            exit::FAILURE
        }
    }
}
