//! The scenario registry. A scenario says what the proxies listen as, which origin it needs,
//! how to drive load, and in which unit its work is counted; the runner does the rest (proxy
//! start-up, pinning, warm-up, windows, CPU accounting, rounds, report).
//!
//! Adding a scenario: a new module with a unit struct implementing [`Scenario`], and one line
//! in [`all`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};

use crate::certs::Certs;
use crate::http_origin::HttpOrigin;
use crate::load::Load;
use crate::origin::{Origin, OriginMode};

mod http;
mod idle;
mod latency;
mod tcp_bulk;
mod tcp_rr;
mod tls;

/// What the proxy's listener does with a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// Plain TCP forwarding (meshgate `protocol = "tcp"`, haproxy `mode tcp`, nginx `stream`).
    Tcp,
    /// HTTP/1.1 reverse proxy with upstream keep-alive (meshgate `http`, haproxy `mode http`,
    /// nginx `proxy_pass` + `keepalive`).
    Http,
    /// Route by the ClientHello's SNI, forward the TLS bytes untouched (meshgate
    /// `tls-passthrough`, haproxy `mode tcp` + `req.ssl_sni`, nginx stream `ssl_preread`).
    TlsPassthrough,
    /// Terminate TLS 1.3, forward the plaintext as TCP (meshgate `tls`, haproxy `mode tcp` with
    /// `bind ... ssl`, nginx stream `listen ... ssl`).
    Tls,
    /// Terminate TLS 1.3 with a required client certificate and forward over mTLS to the
    /// origin's TLS port (TCP level).
    Mtls,
    /// HTTP/1.1 over TLS 1.3 terminated by the proxy (meshgate `https`).
    Https,
    /// HTTP/2 with prior knowledge, cleartext, downstream; HTTP/1.1 upstream.
    H2c,
    /// HTTP/2 over TLS (ALPN h2) downstream; HTTP/1.1 upstream.
    H2,
}

impl Listener {
    pub fn tls(self) -> bool {
        matches!(self, Self::Tls | Self::Mtls | Self::Https | Self::H2)
    }
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

/// How a scenario is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Work per proxy-CPU-second under saturating load (the runner's windows).
    Throughput,
    /// Memory per idle connection (`tls`: connections finish a handshake first).
    IdleMemory { tls: bool },
    /// Added latency at fixed fractions of nginx's saturation rate.
    Latency,
}

/// What a scenario's load may use: the origin it asked for, the run's certificates, and where
/// to put logs.
#[derive(Debug)]
pub struct Env {
    pub tcp: Option<Origin>,
    pub http: Option<Arc<HttpOrigin>>,
    pub certs: Arc<Certs>,
    pub dir: PathBuf,
    pub load_cpu: usize,
}

impl Env {
    pub fn start(
        mode: OriginMode,
        certs: Arc<Certs>,
        dir: PathBuf,
        load_cpu: usize,
    ) -> Result<Self> {
        let (tcp, http) = match mode {
            OriginMode::Http => (
                None,
                Some(Arc::new(
                    HttpOrigin::start(&dir, &certs, load_cpu)
                        .context("starting the nginx origin")?,
                )),
            ),
            m => (Some(Origin::start(m)?), None),
        };
        Ok(Self {
            tcp,
            http,
            certs,
            dir,
            load_cpu,
        })
    }

    /// Where a proxy with `listener` forwards to.
    pub fn upstream(&self, listener: Listener) -> Result<SocketAddr> {
        match (&self.tcp, &self.http) {
            (Some(o), _) => Ok(o.addr),
            (None, Some(h)) if listener == Listener::Mtls => Ok(h.tls_addr),
            (None, Some(h)) => Ok(h.addr),
            (None, None) => anyhow::bail!("no origin"),
        }
    }

    pub fn tcp(&self) -> Result<&Origin> {
        self.tcp.as_ref().context("this scenario has no TCP origin")
    }

    pub fn http(&self) -> Result<Arc<HttpOrigin>> {
        self.http
            .clone()
            .context("this scenario has no HTTP origin")
    }
}

pub trait Scenario: Sync {
    fn name(&self) -> &'static str;
    /// One line for `--help` and the report.
    fn about(&self) -> &'static str;
    fn listener(&self) -> Listener;
    fn origin(&self) -> OriginMode;
    fn unit(&self) -> WorkUnit;
    fn kind(&self) -> Kind {
        Kind::Throughput
    }
    /// Starts load against the proxy at `target`; the origin is running behind it.
    fn start_load(&self, target: SocketAddr, env: &Env) -> Result<Box<dyn Load>>;
}

/// Every scenario, in the order `all` runs them.
pub fn all() -> Vec<&'static dyn Scenario> {
    vec![
        &tcp_rr::TcpRr,
        &tcp_bulk::TcpBulk,
        &http::HTTP_12,
        &http::HTTP_16K,
        &tls::PASSTHROUGH_BULK,
        &tls::HANDSHAKE_FULL,
        &tls::HANDSHAKE_RESUMED,
        &tls::TLS_BULK_1K,
        &tls::TLS_BULK_64K,
        &tls::HTTPS_12,
        &tls::HTTPS_16K,
        &tls::MTLS_HANDSHAKE,
        &tls::MTLS_KEEPALIVE,
        &http::H2C,
        &http::H2,
        &idle::IDLE_TCP,
        &idle::IDLE_TLS,
        &latency::Latency,
    ]
}

/// The HTTP/1.1 12-byte scenario (the latency scenario calibrates with it).
pub fn http_12() -> &'static dyn Scenario {
    &http::HTTP_12
}

pub fn find(name: &str) -> Option<&'static dyn Scenario> {
    all().into_iter().find(|s| s.name() == name)
}
