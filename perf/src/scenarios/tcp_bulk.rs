//! `tcp-bulk`: a few connections upload as fast as they can through the proxy into a sink.
//! Measures the proxy's per-byte cost (copies, buffer sizes, syscalls per byte).

use std::net::SocketAddr;

use anyhow::Result;

use super::Env;
use super::{Listener, Scenario, WorkUnit};
use crate::load::{BulkUpload, Load};
use crate::origin::OriginMode;

const CONNECTIONS: usize = 8;
/// Size of each write by the load generator.
const CHUNK: usize = 256 * 1024;

#[derive(Debug)]
pub struct TcpBulk;

impl Scenario for TcpBulk {
    fn name(&self) -> &'static str {
        "tcp-bulk"
    }
    fn about(&self) -> &'static str {
        "TCP proxy, 8 connections streaming into a sink: bytes (MB) per proxy-CPU-second"
    }
    fn listener(&self) -> Listener {
        Listener::Tcp
    }
    fn origin(&self) -> OriginMode {
        OriginMode::Sink
    }
    fn unit(&self) -> WorkUnit {
        WorkUnit {
            name: "MB",
            one: "MB",
            scale: 1e-6,
        }
    }
    fn start_load(&self, target: SocketAddr, env: &Env) -> Result<Box<dyn Load>> {
        Ok(Box::new(BulkUpload::start(
            target,
            CONNECTIONS,
            CHUNK,
            env.tcp()?.counters.clone(),
        )?))
    }
}
