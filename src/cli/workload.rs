//! `meshgate workload register|list|remove`: which local processes get which SPIFFE ID from
//! the Workload API (`[control.workload_api]` of `meshgate run`). Registrations live in
//! `<state-dir>/workloads.json`; the running daemon reads them at every request.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use meshgate_control::workload::registry::{self, Registration, Selector};

use super::ca::{StateDirArg, open, parse_spiffe_id, print_json, usage};
use super::{Output, exit};

#[derive(Debug, Subcommand)]
pub enum WorkloadCmd {
    /// Give processes of a Unix uid, or of one executable, a SPIFFE ID on the Workload API.
    Register(RegisterArgs),
    /// List the registrations.
    List(ListArgs),
    /// Remove the registrations of a SPIFFE ID (all, or only the one with --uid/--exe).
    Remove(RemoveArgs),
}

#[derive(Debug, Args)]
#[group(id = "selector", required = true, multiple = false)]
pub struct SelectorArgs {
    /// The caller's Unix uid (from the socket's peer credentials).
    #[arg(long, group = "selector", value_name = "N")]
    pub uid: Option<u32>,
    /// The caller's executable, an absolute path as /proc/<pid>/exe resolves it (symlinks
    /// resolved).
    #[arg(long, group = "selector", value_name = "PATH")]
    pub exe: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RegisterArgs {
    #[command(flatten)]
    pub state: StateDirArg,
    /// The identity to issue, in the CA's trust domain.
    #[arg(long, value_name = "ID")]
    pub spiffe_id: String,
    #[command(flatten)]
    pub selector: SelectorArgs,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub state: StateDirArg,
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct RemoveArgs {
    #[command(flatten)]
    pub state: StateDirArg,
    #[arg(long, value_name = "ID")]
    pub spiffe_id: String,
    #[arg(long, value_name = "N", conflicts_with = "exe")]
    pub uid: Option<u32>,
    #[arg(long, value_name = "PATH")]
    pub exe: Option<PathBuf>,
}

pub fn run(cmd: WorkloadCmd) -> u8 {
    match cmd {
        WorkloadCmd::Register(a) => register(a),
        WorkloadCmd::List(a) => list(a),
        WorkloadCmd::Remove(a) => remove(a),
    }
}

fn selector(uid: Option<u32>, exe: Option<PathBuf>) -> Result<Option<Selector>, u8> {
    match (uid, exe) {
        (Some(u), _) => Ok(Some(Selector::Uid(u))),
        (None, Some(p)) if !p.is_absolute() => Err(usage(format!(
            "--exe {}: give the absolute path of the executable (as /proc/<pid>/exe shows it)",
            p.display()
        ))),
        // The kernel reports the resolved path; resolve ours the same way when we can.
        (None, Some(p)) => Ok(Some(Selector::Exe(std::fs::canonicalize(&p).unwrap_or(p)))),
        (None, None) => Ok(None),
    }
}

fn register(a: RegisterArgs) -> u8 {
    let id = match parse_spiffe_id(&a.spiffe_id) {
        Ok(id) => id,
        Err(code) => return code,
    };
    let sel = match selector(a.selector.uid, a.selector.exe) {
        Ok(Some(s)) => s,
        Ok(None) => return usage("give --uid N or --exe PATH"),
        Err(code) => return code,
    };
    // The CA must exist and the ID be in its trust domain (and not reserved for meshgate).
    let ca = match open(&a.state.state_dir) {
        Ok(ca) => ca,
        Err(code) => return code,
    };
    if let Err(e) = ca.check_member(&id) {
        return usage(e);
    }
    if id.path().starts_with("/meshgate/") {
        return usage(format!(
            "{id}: IDs under /meshgate/ are reserved for meshgate's own components"
        ));
    }
    let reg = Registration {
        spiffe_id: id,
        selector: sel,
    };
    match registry::add(&a.state.state_dir, reg.clone()) {
        Ok(true) => {
            println!("registered {} for {}", reg.spiffe_id, reg.selector);
            exit::OK
        }
        Ok(false) => {
            println!("already registered: {} for {}", reg.spiffe_id, reg.selector);
            exit::OK
        }
        Err(e) => {
            eprintln!("error: {e}");
            exit::FAILURE
        }
    }
}

fn list(a: ListArgs) -> u8 {
    let regs = match registry::list(&a.state.state_dir) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::FAILURE;
        }
    };
    match a.output {
        Output::Json => print_json(&regs),
        Output::Table => {
            let mut t = Table::new();
            t.load_preset(UTF8_FULL_CONDENSED)
                .set_header(["SPIFFE ID", "SELECTOR"]);
            for r in &regs {
                t.add_row([r.spiffe_id.to_string(), r.selector.to_string()]);
            }
            println!("{t}");
            exit::OK
        }
    }
}

fn remove(a: RemoveArgs) -> u8 {
    let id = match parse_spiffe_id(&a.spiffe_id) {
        Ok(id) => id,
        Err(code) => return code,
    };
    let sel = match selector(a.uid, a.exe) {
        Ok(s) => s,
        Err(code) => return code,
    };
    match registry::remove(&a.state.state_dir, &id, sel.as_ref()) {
        Ok(0) => usage(format!("no registration of {id} matches")),
        Ok(n) => {
            println!("removed {n} registration(s) of {id}");
            exit::OK
        }
        Err(e) => {
            eprintln!("error: {e}");
            exit::FAILURE
        }
    }
}
