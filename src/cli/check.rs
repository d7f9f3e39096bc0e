//! `meshgate check`: can this host run the dataplane? (io_uring, setup flags, memlock, CPUs)

use clap::Args;
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use meshgate_dataplane::rt;

use super::{Output, exit};

#[derive(Debug, Args)]
pub struct CheckArgs {
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Output,
}

pub fn run(args: CheckArgs) -> u8 {
    let cpus = rt::allowed_cpus();
    let memlock_kib = memlock_kib();
    let result = rt::check();
    match args.output {
        Output::Json => {
            let doc = serde_json::json!({
                "ok": result.is_ok(),
                "io_uring": match &result { Ok(f) => serde_json::to_value(f).unwrap_or_default(), Err(_) => serde_json::Value::Null },
                "ring_mode": result.as_ref().map(|f| f.to_string()).ok(),
                "error": result.as_ref().err().map(|e| e.to_string()),
                "cpus": cpus,
                "memlock_kib": memlock_kib,
            });
            println!("{doc}");
        }
        Output::Table => {
            let mut t = Table::new();
            t.load_preset(UTF8_FULL_CONDENSED);
            t.set_header(["check", "result"]);
            match &result {
                Ok(f) => {
                    t.add_row(["io_uring", "ok"]);
                    t.add_row(["ring mode", &f.to_string()]);
                }
                Err(e) => {
                    t.add_row(["io_uring", &format!("FAILED: {e}")]);
                }
            }
            t.add_row(["CPUs usable", &format!("{} ({:?})", cpus.len(), cpus)]);
            t.add_row([
                "memlock limit",
                &memlock_kib
                    .map(|k| format!("{k} KiB"))
                    .unwrap_or_else(|| "unlimited".into()),
            ]);
            println!("{t}");
        }
    }
    if result.is_ok() { exit::OK } else { exit::HOST }
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
