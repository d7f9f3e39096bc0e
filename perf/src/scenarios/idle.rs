//! Idle connections: memory per idle plain TCP and TLS connection at 10,000 connections (see
//! [`crate::special::measure_idle`]).

use std::net::SocketAddr;

use anyhow::{Result, bail};

use super::{Env, Kind, Listener, Scenario, WorkUnit};
use crate::load::Load;
use crate::origin::OriginMode;

#[derive(Debug)]
pub struct Idle {
    name: &'static str,
    about: &'static str,
    tls: bool,
}

pub const IDLE_TCP: Idle = Idle {
    name: "idle-tcp",
    about: "10,000 idle TCP connections (one HTTP/1.1 request each through the TCP proxy, from 4 source addresses): proxy memory per connection",
    tls: false,
};

pub const IDLE_TLS: Idle = Idle {
    name: "idle-tls",
    about: "10,000 idle TLS 1.3 connections (full handshake + one HTTP/1.1 request each, TLS terminated, TCP upstream): proxy memory per connection",
    tls: true,
};

impl Scenario for Idle {
    fn name(&self) -> &'static str {
        self.name
    }
    fn about(&self) -> &'static str {
        self.about
    }
    fn listener(&self) -> Listener {
        if self.tls {
            Listener::Tls
        } else {
            Listener::Tcp
        }
    }
    fn origin(&self) -> OriginMode {
        OriginMode::Http
    }
    fn unit(&self) -> WorkUnit {
        WorkUnit {
            name: "KiB",
            one: "connection",
            scale: 1.0,
        }
    }
    fn kind(&self) -> Kind {
        Kind::IdleMemory { tls: self.tls }
    }
    fn start_load(&self, _target: SocketAddr, _env: &Env) -> Result<Box<dyn Load>> {
        bail!("{} opens its own connections", self.name)
    }
}
