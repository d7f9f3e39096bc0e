//! `uring-floor` ([`crate::floor`]): a protocol-less io_uring byte relay run from this harness's
//! own binary, reported beside the real proxies as the floor of what any of them can cost here.
//! Not run unless named in `--proxies`.

use std::process::Command;

use anyhow::{Context, Result};

use super::{Proxy, ProxySpec};
use crate::scenarios::Listener;

#[derive(Debug)]
pub struct Floor;

pub const NAME: &str = "uring-floor";

impl Proxy for Floor {
    fn name(&self) -> &'static str {
        NAME
    }

    fn check(&self) -> Result<(), String> {
        std::env::current_exe()
            .map(|_| ())
            .map_err(|e| format!("cannot find this program's own binary: {e}"))
    }

    fn version(&self) -> String {
        "io_uring byte relay, no protocol work (reference)".into()
    }

    /// Plain TCP, and HTTP/1.1 keep-alive relayed as bytes (one upstream connection per client).
    fn supports(&self, listener: Listener) -> bool {
        matches!(listener, Listener::Tcp | Listener::Http)
    }

    fn prepare(&self, spec: &ProxySpec) -> Result<Command> {
        let exe = std::env::current_exe().context("locating meshgate-perf's binary")?;
        let mut cmd = Command::new(exe);
        cmd.arg(crate::floor::ARG)
            .arg(spec.listen.to_string())
            .arg(spec.upstream.to_string());
        Ok(cmd)
    }
}
