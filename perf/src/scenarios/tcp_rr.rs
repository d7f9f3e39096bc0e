//! `tcp-rr`: many small request/response round trips over long-lived TCP connections through
//! the proxy. Measures the per-message cost of the proxy's event loop (wake-ups, reads, writes).

use std::net::SocketAddr;

use anyhow::Result;

use super::Env;
use super::{Listener, Scenario, WorkUnit};
use crate::load::{Load, RoundTrips};
use crate::origin::OriginMode;

/// Concurrent connections, each with one request in flight (closed loop).
const CONNECTIONS: usize = 64;
/// Request size; the origin echoes it back.
const MESSAGE: usize = 64;

#[derive(Debug)]
pub struct TcpRr;

impl Scenario for TcpRr {
    fn name(&self) -> &'static str {
        "tcp-rr"
    }
    fn about(&self) -> &'static str {
        "TCP proxy, 64 connections x 64-byte echo round trips (closed loop): round trips per proxy-CPU-second"
    }
    fn listener(&self) -> Listener {
        Listener::Tcp
    }
    fn origin(&self) -> OriginMode {
        OriginMode::Echo
    }
    fn unit(&self) -> WorkUnit {
        WorkUnit {
            name: "round trips",
            one: "round trip",
            scale: 1.0,
        }
    }
    fn start_load(&self, target: SocketAddr, _env: &Env) -> Result<Box<dyn Load>> {
        Ok(Box::new(RoundTrips::start(target, CONNECTIONS, MESSAGE)?))
    }
}
