//! HTTP scenarios driven by Debian's tools against the nginx origin: HTTP/1.1 keep-alive with
//! `wrk` (12-byte and 16 KiB responses) and HTTP/2 downstream with `h2load` (cleartext prior
//! knowledge and TLS with ALPN h2). Work is counted at the origin (requests served).

use std::net::SocketAddr;

use anyhow::Result;

use super::{Env, Listener, Scenario, WorkUnit};
use crate::httpload::External;
use crate::load::Load;
use crate::origin::OriginMode;

/// wrk connections (fixed, as in the measurements).
const WRK_CONNECTIONS: usize = 64;
/// h2load: connections x concurrent streams per connection.
const H2_CONNECTIONS: usize = 16;
const H2_STREAMS: usize = 16;

#[derive(Debug, Clone, Copy)]
enum Tool {
    Wrk,
    H2load,
}

#[derive(Debug)]
pub struct HttpScenario {
    name: &'static str,
    about: &'static str,
    listener: Listener,
    path: &'static str,
    tool: Tool,
}

pub const HTTP_12: HttpScenario = HttpScenario {
    name: "http-12",
    about: "HTTP/1.1 keep-alive proxy, wrk 64 connections, 12-byte responses: requests per proxy-CPU-second",
    listener: Listener::Http,
    path: "12",
    tool: Tool::Wrk,
};

pub const HTTP_16K: HttpScenario = HttpScenario {
    name: "http-16k",
    about: "HTTP/1.1 keep-alive proxy, wrk 64 connections, 16 KiB responses: requests per proxy-CPU-second",
    listener: Listener::Http,
    path: "16k",
    tool: Tool::Wrk,
};

pub const H2C: HttpScenario = HttpScenario {
    name: "h2c",
    about: "HTTP/2 cleartext downstream (h2load 16 connections x 16 streams, 12-byte responses), HTTP/1.1 upstream: requests per proxy-CPU-second",
    listener: Listener::H2c,
    path: "12",
    tool: Tool::H2load,
};

pub const H2: HttpScenario = HttpScenario {
    name: "h2",
    about: "HTTP/2 over TLS 1.3 downstream (h2load 16 connections x 16 streams, 12-byte responses), HTTP/1.1 upstream: requests per proxy-CPU-second",
    listener: Listener::H2,
    path: "12",
    tool: Tool::H2load,
};

impl Scenario for HttpScenario {
    fn name(&self) -> &'static str {
        self.name
    }
    fn about(&self) -> &'static str {
        self.about
    }
    fn listener(&self) -> Listener {
        self.listener
    }
    fn origin(&self) -> OriginMode {
        OriginMode::Http
    }
    fn unit(&self) -> WorkUnit {
        WorkUnit {
            name: "requests",
            one: "request",
            scale: 1.0,
        }
    }
    fn start_load(&self, target: SocketAddr, env: &Env) -> Result<Box<dyn Load>> {
        let scheme = if self.listener.tls() { "https" } else { "http" };
        let url = format!("{scheme}://{target}/{}", self.path);
        let log = env.dir.join(format!("{}-load.log", self.name));
        Ok(Box::new(match self.tool {
            Tool::Wrk => External::wrk(&url, WRK_CONNECTIONS, env.load_cpu, &log, env.http()?, 1)?,
            Tool::H2load => External::h2load(
                &url,
                H2_CONNECTIONS,
                H2_STREAMS,
                env.load_cpu,
                &log,
                env.http()?,
            )?,
        }))
    }
}
