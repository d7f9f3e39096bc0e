//! `meshgate bundle export`: this trust domain's CA certificates as PEM or as a SPIFFE bundle
//! (JWKS with `spiffe_sequence` and `spiffe_refresh_hint`), to stdout or atomically to a file.

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use meshgate_control::state::{mode, write_atomic};

use super::ca::{StateDirArg, fail, open};
use super::exit;

#[derive(Debug, Subcommand)]
pub enum BundleCmd {
    /// Export the local trust bundle.
    Export(ExportArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Format {
    /// Concatenated PEM certificates (for `openssl verify -CAfile`, curl --cacert, ...).
    Pem,
    /// SPIFFE bundle format (JWKS), as served by a SPIFFE bundle endpoint.
    Spiffe,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub state: StateDirArg,
    #[arg(long, value_enum)]
    pub format: Format,
    /// Write here (atomically, mode 0644) instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

pub fn run(cmd: BundleCmd) -> u8 {
    match cmd {
        BundleCmd::Export(a) => export(a),
    }
}

fn export(a: ExportArgs) -> u8 {
    let ca = match open(&a.state.state_dir) {
        Ok(ca) => ca,
        Err(code) => return code,
    };
    let bundle = match ca.bundle() {
        Ok(b) => b,
        Err(e) => return fail(&e),
    };
    let text = match a.format {
        Format::Pem => bundle.to_pem(),
        Format::Spiffe => match bundle
            .to_spiffe_json()
            .map(|v| serde_json::to_string_pretty(&v))
        {
            Ok(Ok(s)) => s + "\n",
            Ok(Err(e)) => {
                eprintln!("error: cannot encode the bundle: {e}");
                return exit::FAILURE;
            }
            Err(e) => {
                eprintln!("error: cannot express a CA key as a JWK: {e}");
                return exit::FAILURE;
            }
        },
    };
    match a.out {
        None => {
            print!("{text}");
            exit::OK
        }
        Some(path) => match write_atomic(&path, text.as_bytes(), mode::PUBLIC) {
            Ok(()) => {
                eprintln!(
                    "wrote {} (bundle sequence {})",
                    path.display(),
                    bundle.sequence
                );
                exit::OK
            }
            Err(e) => {
                eprintln!("error: {e}");
                exit::FAILURE
            }
        },
    }
}
