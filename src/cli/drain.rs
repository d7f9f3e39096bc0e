//! `meshgate drain`: put the running gateway out of service without stopping it (admin
//! `POST /drain`, as Envoy's `/drain_listeners`): `/ready` answers 503, every listener stops
//! accepting, open connections continue. With `--wait`, wait until they have all closed (or
//! `--timeout` passed). Exit 0 drained (or draining, without `--wait`), 1 connections still
//! open at the timeout or another failure, 69 gateway unreachable.

use std::time::{Duration, Instant};

use clap::Args;
use meshgate_dataplane::admin::DrainStatus;

use super::admin_client::{self, AdminAddr, Unreachable};
use super::{DEFAULT_ADMIN, Output, exit, report};

#[derive(Debug, Args)]
pub struct DrainArgs {
    /// Admin API of the gateway: `127.0.0.1:15000` or `unix:/run/meshgate/admin.sock`.
    #[arg(long, env = "MESHGATE_ADMIN", default_value = DEFAULT_ADMIN)]
    pub admin: String,
    /// Wait until every open connection has closed.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up (exit 1) after this long, e.g. `30s`, `2m`.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Output,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    meshgate_config::parse_duration(s).map_err(|e| e.to_string())
}

fn unreachable_or_failure(e: &anyhow::Error) -> u8 {
    report(e);
    if e.downcast_ref::<Unreachable>().is_some() {
        exit::UNAVAILABLE
    } else {
        exit::FAILURE
    }
}

pub fn run(args: DrainArgs) -> u8 {
    let addr = AdminAddr::parse(&args.admin);
    let (code, body) = match admin_client::post(&addr, "/drain", Duration::from_secs(40)) {
        Ok(r) => r,
        Err(e) => return unreachable_or_failure(&e),
    };
    if code != 200 {
        eprintln!("error: admin API answered {code}: {}", body.trim());
        return exit::FAILURE;
    }
    let mut status: DrainStatus = match serde_json::from_str(&body) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: unexpected answer from POST /drain ({e}): {body}");
            return exit::FAILURE;
        }
    };
    if args.output == Output::Table {
        println!(
            "draining: listeners closed, /ready answers 503; {} connection(s) open",
            status.open_connections
        );
    }
    if args.wait {
        let deadline = Instant::now() + args.timeout;
        while status.open_connections > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            match admin_client::get(&addr, "/drain") {
                Ok((200, body)) => {
                    if let Ok(s) = serde_json::from_str(&body) {
                        status = s;
                    }
                }
                Ok((code, body)) => {
                    eprintln!("error: admin API answered {code}: {}", body.trim());
                    return exit::FAILURE;
                }
                Err(e) => return unreachable_or_failure(&e),
            }
        }
    }
    match args.output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&status).unwrap_or_default()
        ),
        Output::Table if args.wait && status.open_connections == 0 => {
            println!("drained: no connection open")
        }
        Output::Table if args.wait => eprintln!(
            "error: {} connection(s) still open after {}",
            status.open_connections,
            meshgate_config::format_duration(args.timeout)
        ),
        Output::Table => {}
    }
    if args.wait && status.open_connections > 0 {
        exit::FAILURE
    } else {
        exit::OK
    }
}
