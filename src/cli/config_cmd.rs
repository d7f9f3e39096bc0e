//! `meshgate config validate|show|default`.

use std::path::PathBuf;

use clap::Subcommand;

use super::{Output, exit};

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
