//! TLS scenarios. Passthrough: a real ClientHello (SNI `bench.test`) and then a stream of TLS
//! application-data records into a sink; the proxy routes by SNI and copies bytes.
//! Termination: our rustls client (TLS 1.3, TLS_AES_128_GCM_SHA256 only, so all three proxies
//! negotiate the same suite; ECDSA P-256 certificate from [`crate::certs`]) speaks HTTP/1.1
//! through the proxy to the nginx origin: full and resumed handshakes with one request per
//! connection, bulk responses over kept-alive connections, HTTPS (meshgate `https`) and mTLS
//! both ways.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use rustls::ClientConnection;
use rustls::pki_types::ServerName;

use super::{Env, Listener, Scenario, WorkUnit};
use crate::certs::SERVER_NAME;
use crate::httpload::{Count, TlsClients, TlsMode, client_config};
use crate::load::{BulkUpload, Load};
use crate::origin::OriginMode;

const REQUESTS: WorkUnit = WorkUnit {
    name: "requests",
    one: "request",
    scale: 1.0,
};
const HANDSHAKES: WorkUnit = WorkUnit {
    name: "handshakes",
    one: "handshake",
    scale: 1.0,
};
const MB: WorkUnit = WorkUnit {
    name: "MB",
    one: "MB",
    scale: 1e-6,
};

#[derive(Debug)]
pub struct TlsScenario {
    name: &'static str,
    about: &'static str,
    listener: Listener,
    mode: TlsMode,
    resume: bool,
    path: &'static str,
    body: usize,
    /// Client threads (one connection each at a time).
    threads: usize,
    unit: WorkUnit,
    count: Count,
}

pub const HANDSHAKE_FULL: TlsScenario = TlsScenario {
    name: "tls-handshake",
    about: "TLS 1.3 termination, new connection per request (full handshakes, ECDSA P-256), 12-byte response: handshakes per proxy-CPU-second",
    listener: Listener::Tls,
    mode: TlsMode::ConnPerRequest,
    resume: false,
    path: "12",
    body: 12,
    threads: 16,
    unit: HANDSHAKES,
    count: Count::Requests,
};

pub const HANDSHAKE_RESUMED: TlsScenario = TlsScenario {
    name: "tls-resume",
    about: "TLS 1.3 termination, new connection per request resuming with a session ticket: handshakes per proxy-CPU-second",
    resume: true,
    ..HANDSHAKE_FULL
};

pub const TLS_BULK_1K: TlsScenario = TlsScenario {
    name: "tls-bulk-1k",
    about: "TLS 1.3 termination, 32 kept-alive connections, 1 KiB responses: response MB per proxy-CPU-second",
    mode: TlsMode::KeepAlive,
    path: "1k",
    body: 1024,
    threads: 32,
    unit: MB,
    count: Count::BodyBytes,
    ..HANDSHAKE_FULL
};

pub const TLS_BULK_64K: TlsScenario = TlsScenario {
    name: "tls-bulk-64k",
    about: "TLS 1.3 termination, 32 kept-alive connections, 64 KiB responses: response MB per proxy-CPU-second",
    path: "64k",
    body: 64 * 1024,
    ..TLS_BULK_1K
};

pub const HTTPS_12: TlsScenario = TlsScenario {
    name: "https-12",
    about: "HTTPS termination (HTTP/1.1 over TLS 1.3, meshgate `https`), 32 kept-alive connections, 12-byte responses: requests per proxy-CPU-second",
    listener: Listener::Https,
    path: "12",
    body: 12,
    unit: REQUESTS,
    count: Count::Requests,
    ..TLS_BULK_1K
};

pub const HTTPS_16K: TlsScenario = TlsScenario {
    name: "https-16k",
    about: "HTTPS termination, 32 kept-alive connections, 16 KiB responses: response MB per proxy-CPU-second",
    path: "16k",
    body: 16 * 1024,
    unit: MB,
    count: Count::BodyBytes,
    ..HTTPS_12
};

pub const MTLS_HANDSHAKE: TlsScenario = TlsScenario {
    name: "mtls-handshake",
    about: "mTLS termination (client SVID required) + mTLS origination to the origin, new connection per request: handshakes per proxy-CPU-second",
    listener: Listener::Mtls,
    ..HANDSHAKE_FULL
};

pub const MTLS_KEEPALIVE: TlsScenario = TlsScenario {
    name: "mtls-keepalive",
    about: "mTLS termination + mTLS origination, 32 kept-alive connections, 12-byte responses: requests per proxy-CPU-second",
    listener: Listener::Mtls,
    mode: TlsMode::KeepAlive,
    threads: 32,
    unit: REQUESTS,
    ..HANDSHAKE_FULL
};

impl Scenario for TlsScenario {
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
        self.unit
    }
    fn start_load(&self, target: SocketAddr, env: &Env) -> Result<Box<dyn Load>> {
        let mtls = self.listener == Listener::Mtls;
        // One config (and session store) per client thread: see `TlsClients`.
        let cfgs = (0..self.threads)
            .map(|_| client_config(&env.certs, mtls, self.resume, &[]))
            .collect::<Result<Vec<_>>>()?;
        Ok(Box::new(TlsClients::start(
            target, cfgs, self.mode, self.path, self.body, self.count,
        )?))
    }
}

/// Connections of the passthrough scenario.
const PT_CONNECTIONS: usize = 8;
/// TLS application-data records per write buffer (each 16 KiB of payload).
const PT_RECORDS: usize = 16;

#[derive(Debug)]
pub struct PassthroughBulk;

pub const PASSTHROUGH_BULK: PassthroughBulk = PassthroughBulk;

/// A real TLS 1.3 ClientHello for `bench.test`, as rustls sends it.
fn client_hello(env: &Env) -> Result<Vec<u8>> {
    let cfg = client_config(&env.certs, false, false, &[])?;
    let mut conn = ClientConnection::new(cfg, ServerName::try_from(SERVER_NAME)?)?;
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).context("ClientHello")?;
    }
    Ok(out)
}

/// `n` TLS 1.2/1.3 application-data records of 16 KiB each (content is not encrypted: a
/// passthrough proxy never looks past the ClientHello, and the sink does not decrypt).
fn records(n: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(n * (5 + 16384));
    for _ in 0..n {
        v.extend_from_slice(&[0x17, 0x03, 0x03, 0x40, 0x00]);
        v.resize(v.len() + 16384, 0xa5);
    }
    v
}

impl Scenario for PassthroughBulk {
    fn name(&self) -> &'static str {
        "tls-passthrough"
    }
    fn about(&self) -> &'static str {
        "TLS passthrough routed by SNI, 8 connections streaming TLS records into a sink: MB per proxy-CPU-second"
    }
    fn listener(&self) -> Listener {
        Listener::TlsPassthrough
    }
    fn origin(&self) -> OriginMode {
        OriginMode::Sink
    }
    fn unit(&self) -> WorkUnit {
        MB
    }
    fn start_load(&self, target: SocketAddr, env: &Env) -> Result<Box<dyn Load>> {
        Ok(Box::new(BulkUpload::start_with(
            target,
            PT_CONNECTIONS,
            &client_hello(env)?,
            records(PT_RECORDS),
            env.tcp()?.counters.clone(),
        )?))
    }
}
