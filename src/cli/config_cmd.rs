//! `meshgate config validate|show|default`.

use std::path::PathBuf;

use clap::Subcommand;

use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use meshgate_control::history::Entry;

use super::admin_client::{self, AdminAddr, Unreachable};
use super::{Output, exit, report};

#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Validate configuration files: exit 0 if all are valid, 64 with every error listed if not.
    Validate {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Print the validated configuration (defaults filled in) as JSON.
    Show {
        /// Config file; without it, the embedded default.
        file: Option<PathBuf>,
    },
    /// Print the embedded default configuration (a starting point for your own).
    Default,
    /// List the configs the running gateway applied (kept in its state directory).
    History {
        #[command(flatten)]
        admin: AdminArg,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Show what changed between two configs: history ids (`3`) or files.
    Diff {
        /// Older side: a history id or a file.
        a: String,
        /// Newer side: a history id or a file.
        b: String,
        #[command(flatten)]
        admin: AdminArg,
    },
    /// Put an earlier config back in force in one step: writes it to the gateway's config file
    /// (keeping any unapplied edits in the history directory) and applies it.
    Rollback {
        /// History id to roll back to; default: the config before the current one.
        id: Option<u64>,
        #[command(flatten)]
        admin: AdminArg,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
}

/// `--admin`, shared by the commands that talk to a running gateway.
#[derive(Debug, clap::Args)]
pub struct AdminArg {
    /// Admin API of the gateway: `127.0.0.1:15000` or `unix:/run/meshgate/admin.sock`.
    #[arg(long, env = "MESHGATE_ADMIN", default_value = super::DEFAULT_ADMIN)]
    pub admin: String,
}

pub fn run(cmd: ConfigCmd) -> u8 {
    match cmd {
        ConfigCmd::Validate { files, output } => validate(&files, output),
        ConfigCmd::Show { file } => {
            let loaded = match &file {
                Some(p) => meshgate_config::load(p),
                None => {
                    meshgate_config::parse(meshgate_config::EMBEDDED_DEFAULT, "<embedded default>")
                }
            };
            match loaded {
                Ok(c) => match serde_json::to_string_pretty(&c) {
                    Ok(s) => {
                        println!("{s}");
                        exit::OK
                    }
                    Err(e) => {
                        eprintln!("error: {e}");
                        exit::FAILURE
                    }
                },
                Err(e) => {
                    eprint!("{e}");
                    exit::CONFIG
                }
            }
        }
        ConfigCmd::History { admin, output } => history(&admin.admin, output),
        ConfigCmd::Diff { a, b, admin } => diff(&admin.admin, &a, &b),
        ConfigCmd::Rollback { id, admin, output } => {
            let path = match id {
                Some(id) => format!("/config/rollback?to={id}"),
                None => "/config/rollback".to_string(),
            };
            super::reload::post_and_report(&admin.admin, &path, output)
        }
        ConfigCmd::Default => {
            print!("{}", meshgate_config::EMBEDDED_DEFAULT);
            exit::OK
        }
    }
}

fn validate(files: &[PathBuf], output: Output) -> u8 {
    let mut bad = 0;
    let mut report = Vec::new();
    for f in files {
        match meshgate_config::load(f) {
            Ok(_) => {
                if output == Output::Table {
                    println!("{}: ok", f.display());
                }
                report.push(
                    serde_json::json!({"file": f.display().to_string(), "ok": true, "errors": []}),
                );
            }
            Err(e) => {
                bad += 1;
                if output == Output::Table {
                    eprint!("{e}");
                }
                report.push(serde_json::json!({"file": f.display().to_string(), "ok": false, "errors": e.errors}));
            }
        }
    }
    if output == Output::Json {
        println!("{}", serde_json::Value::Array(report));
    } else if bad > 0 {
        eprintln!("{bad} of {} file(s) invalid", files.len());
    }
    if bad > 0 { exit::CONFIG } else { exit::OK }
}

fn admin_get(admin: &str, path: &str) -> Result<String, u8> {
    let addr = AdminAddr::parse(admin);
    match admin_client::get(&addr, path) {
        Ok((200, body)) => Ok(body),
        Ok((code, body)) => {
            eprintln!("error: admin API answered {code}: {}", body.trim());
            Err(exit::FAILURE)
        }
        Err(e) => {
            report(&e);
            Err(if e.downcast_ref::<Unreachable>().is_some() {
                exit::UNAVAILABLE
            } else {
                exit::FAILURE
            })
        }
    }
}

fn history(admin: &str, output: Output) -> u8 {
    let body = match admin_get(admin, "/config/history") {
        Ok(b) => b,
        Err(code) => return code,
    };
    if output == Output::Json {
        print!("{body}");
        return exit::OK;
    }
    let entries: Vec<Entry> = match serde_json::from_str(&body) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("error: cannot read the history: {e}");
            return exit::FAILURE;
        }
    };
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header([
        "id",
        "applied (UTC)",
        "generation",
        "sha256",
        "source",
        "change",
    ]);
    for e in &entries {
        let when = time::OffsetDateTime::from_unix_timestamp(e.applied_unix as i64)
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_else(|| e.applied_unix.to_string());
        t.add_row([
            e.id.to_string(),
            when,
            e.generation.to_string(),
            e.sha256.chars().take(12).collect(),
            e.source.clone(),
            e.summary.clone(),
        ]);
    }
    println!("{t}");
    if let Some(last) = entries.last() {
        println!(
            "in force: #{}; roll back with `meshgate config rollback [ID]`",
            last.id
        );
    }
    exit::OK
}

fn side(admin: &str, s: &str) -> Result<(String, String), u8> {
    if let Ok(id) = s.trim_start_matches('#').parse::<u64>() {
        return admin_get(admin, &format!("/config/history/{id}")).map(|t| (t, format!("#{id}")));
    }
    std::fs::read_to_string(s)
        .map(|t| (t, s.to_string()))
        .map_err(|e| {
            eprintln!("error: {s} is neither a history id nor a readable file: {e}");
            exit::FAILURE
        })
}

fn diff(admin: &str, a: &str, b: &str) -> u8 {
    let ((ta, na), (tb, nb)) = match (side(admin, a), side(admin, b)) {
        (Ok(x), Ok(y)) => (x, y),
        (Err(c), _) | (_, Err(c)) => return c,
    };
    let d = similar::TextDiff::from_lines(&ta, &tb);
    print!("{}", d.unified_diff().context_radius(3).header(&na, &nb));
    exit::OK
}
