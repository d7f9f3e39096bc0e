//! The scenario registry. A scenario says what the proxies listen as, which origin it needs,
//! how to drive load, and in which unit its work is counted; the runner does the rest (proxy
//! start-up, pinning, warm-up, windows, CPU accounting, rounds, report).
//!
//! Adding a scenario: a new module with a unit struct implementing [`Scenario`], and one line
//! in [`all`].

use std::net::SocketAddr;

use anyhow::Result;

use crate::load::Load;
use crate::origin::{Origin, OriginMode};

mod tcp_bulk;
mod tcp_rr;

/// What the proxy's listener does with a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// Plain TCP forwarding (meshgate `protocol = "tcp"`, haproxy `mode tcp`, nginx `stream`).
    Tcp,
}

/// The unit a scenario counts and how the report shows it.
#[derive(Debug, Clone, Copy)]
pub struct WorkUnit {
    /// Shown unit, e.g. "round trips" or "MB".
    pub name: &'static str,
    /// One of it, for "per" rows: "round trip", "MB".
    pub one: &'static str,
    /// Shown value = counted work * scale (bytes -> MB is 1e-6).
    pub scale: f64,
}

pub trait Scenario: Sync {
    fn name(&self) -> &'static str;
    /// One line for `--help` and the report.
    fn about(&self) -> &'static str;
    fn listener(&self) -> Listener;
    fn origin(&self) -> OriginMode;
    fn unit(&self) -> WorkUnit;
    /// Starts load against the proxy at `target`; the origin is running behind it.
    fn start_load(&self, target: SocketAddr, origin: &Origin) -> Result<Box<dyn Load>>;
}

/// Every scenario, in the order `all` runs them.
pub fn all() -> Vec<&'static dyn Scenario> {
    vec![&tcp_rr::TcpRr, &tcp_bulk::TcpBulk]
}

pub fn find(name: &str) -> Option<&'static dyn Scenario> {
    all().into_iter().find(|s| s.name() == name)
}
