//! Latency at fixed rates: added p50/p99/p99.9 over hitting the origin directly, at 25%, 50%
//! and 75% of nginx's saturation rate, open loop (see [`crate::special::run_latency`] and
//! [`crate::openloop`]).

use std::net::SocketAddr;

use anyhow::{Result, bail};

use super::{Env, Kind, Listener, Scenario, WorkUnit};
use crate::load::Load;
use crate::origin::OriginMode;

#[derive(Debug)]
pub struct Latency;

impl Scenario for Latency {
    fn name(&self) -> &'static str {
        "latency"
    }
    fn about(&self) -> &'static str {
        "HTTP/1.1 open-loop load at 25/50/75% of nginx's saturation rate: added p50/p99/p99.9 latency vs the origin directly"
    }
    fn listener(&self) -> Listener {
        Listener::Http
    }
    fn origin(&self) -> OriginMode {
        OriginMode::Http
    }
    fn unit(&self) -> WorkUnit {
        WorkUnit {
            name: "µs",
            one: "request",
            scale: 1.0,
        }
    }
    fn kind(&self) -> Kind {
        Kind::Latency
    }
    fn start_load(&self, _target: SocketAddr, _env: &Env) -> Result<Box<dyn Load>> {
        bail!("latency drives its own open-loop load")
    }
}
