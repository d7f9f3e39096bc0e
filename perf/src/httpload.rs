//! HTTP load: external tools (wrk, h2load) counted at the origin, and our own rustls client
//! (TLS handshakes per request, resumed handshakes, client certificates, fixed cipher suite),
//! which Debian's tools cannot do.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ClientConfig, Resumption};
use rustls::crypto::{CryptoProvider, ring};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConnection, DigitallySignedStruct, HandshakeKind, SignatureScheme};

use crate::certs::{Certs, SERVER_NAME};
use crate::http_origin::HttpOrigin;
use crate::load::Load;
use crate::proxy::{Running, which};

/// Total length (head + body) of the HTTP/1.1 response at the start of `buf`, once its head is
/// complete; `Ok(None)` while it is not. Only `Content-Length` framing (what nginx sends for
/// static files).
pub fn response_len(buf: &[u8]) -> Result<Option<usize>> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > 16 * 1024 {
            bail!("response head over 16 KiB");
        }
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..end]).context("response head is not UTF-8")?;
    let status = head.split(' ').nth(1).unwrap_or("");
    if status != "200" {
        bail!(
            "status {status}: {}",
            head.lines().next().unwrap_or_default()
        );
    }
    for line in head.split("\r\n").skip(1) {
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            let n: usize = value.trim().parse().context("bad Content-Length")?;
            return Ok(Some(end + 4 + n));
        }
    }
    bail!("response without Content-Length")
}

/// `GET /path` with the benchmark's Host.
pub fn request(path: &str) -> Vec<u8> {
    format!("GET /{path} HTTP/1.1\r\nHost: {SERVER_NAME}\r\n\r\n").into_bytes()
}

// ---------------------------------------------------------------------------------------------
// External tools: work is the origin's request counter (times `scale` for byte units).

#[derive(Debug)]
pub struct External {
    proc: Running,
    log: std::path::PathBuf,
    origin: Arc<HttpOrigin>,
    base: u64,
    scale: u64,
}

impl External {
    /// Runs `cmd` (pinned to `cpu`) until stopped; work = origin requests since now x `scale`.
    pub fn start(
        cmd: Command,
        cpu: usize,
        log: &Path,
        origin: Arc<HttpOrigin>,
        scale: u64,
    ) -> Result<Self> {
        let base = origin.requests();
        let proc = Running::spawn(cmd, cpu, log)?;
        Ok(Self {
            proc,
            log: log.to_path_buf(),
            origin,
            base,
            scale,
        })
    }

    /// `wrk -t1 -c<conns>` for an hour (stopped by the runner) against `url`.
    pub fn wrk(
        url: &str,
        conns: usize,
        cpu: usize,
        log: &Path,
        origin: Arc<HttpOrigin>,
        scale: u64,
    ) -> Result<Self> {
        let mut cmd = Command::new(which("wrk").context("wrk is not installed")?);
        cmd.args(["-t1", &format!("-c{conns}"), "-d3600s", url]);
        Self::start(cmd, cpu, log, origin, scale)
    }

    /// `h2load -t1 -c<conns> -m<streams>` for an hour against `url`.
    pub fn h2load(
        url: &str,
        conns: usize,
        streams: usize,
        cpu: usize,
        log: &Path,
        origin: Arc<HttpOrigin>,
    ) -> Result<Self> {
        let mut cmd = Command::new(which("h2load").context("h2load is not installed")?);
        cmd.args([
            "-t1",
            &format!("-c{conns}"),
            &format!("-m{streams}"),
            "-D3600",
            url,
        ]);
        Self::start(cmd, cpu, log, origin, 1)
    }
}

impl Load for External {
    fn work(&self) -> u64 {
        self.origin.requests().saturating_sub(self.base) * self.scale
    }
    fn errors(&self) -> u64 {
        0
    }
    fn notes(&self) -> Vec<String> {
        // The tool's own words when it stopped early (e.g. h2load: no protocol negotiated).
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        if lines.is_empty() {
            return Vec::new();
        }
        vec![format!(
            "load tool output: {}",
            lines[lines.len().saturating_sub(4)..].join(" | ")
        )]
    }
    fn stop(self: Box<Self>) -> Result<()> {
        let mut proc = self.proc;
        proc.check_alive().context("the load tool exited early")?;
        // They exit on SIGTERM without a summary; that is fine, the origin counted.
        let _ = proc.stop();
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Our rustls client.

/// Skips server certificate checks: the load generator talks to our own proxies on loopback, and
/// verifying would only add client CPU that wrk and h2load do not spend either. Used for load
/// only, never in meshgate.
#[derive(Debug)]
struct DangerNoServerVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for DangerNoServerVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// TLS 1.3 with TLS_AES_128_GCM_SHA256 only, so every proxy negotiates the same suite (key
/// exchange: rustls' default order, X25519 first, which all three accept).
pub fn client_config(
    certs: &Certs,
    client_cert: bool,
    resume: bool,
    alpn: &[&str],
) -> Result<Arc<ClientConfig>> {
    let mut provider = ring::default_provider();
    provider.cipher_suites = vec![ring::cipher_suite::TLS13_AES_128_GCM_SHA256];
    let provider = Arc::new(provider);
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(DangerNoServerVerify(provider)));
    let mut cfg = if client_cert {
        let (chain, key) = certs.client_identity();
        builder.with_client_auth_cert(chain, key)?
    } else {
        builder.with_no_client_auth()
    };
    cfg.resumption = if resume {
        Resumption::in_memory_sessions(1024)
    } else {
        Resumption::disabled()
    };
    cfg.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// What each client connection does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// One connection per thread, requests back to back.
    KeepAlive,
    /// A new connection (handshake) per request.
    ConnPerRequest,
}

/// What [`Load::work`] counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    Requests,
    BodyBytes,
}

#[derive(Debug, Default)]
struct TlsShared {
    stop: AtomicBool,
    requests: AtomicU64,
    body_bytes: AtomicU64,
    full: AtomicU64,
    resumed: AtomicU64,
    errors: AtomicU64,
    last_error: std::sync::Mutex<String>,
}

/// Blocking client threads (on the load core: the harness is pinned there), one per config.
///
/// Each thread is a separate client with its own config, hence its own session store: rustls'
/// in-memory store keeps at most 8 TLS 1.3 tickets per server name, and 16 threads sharing one
/// store drained it against servers that send one new ticket per resumed handshake (OpenSSL:
/// nginx, haproxy), so a quarter of their "resumed" handshakes were full ones, while rustls
/// servers (two tickets per handshake) kept it filled.
#[derive(Debug)]
pub struct TlsClients {
    shared: Arc<TlsShared>,
    threads: Vec<JoinHandle<()>>,
    count: Count,
}

impl TlsClients {
    pub fn start(
        target: SocketAddr,
        cfgs: Vec<Arc<ClientConfig>>,
        mode: TlsMode,
        path: &str,
        body: usize,
        count: Count,
    ) -> Result<Self> {
        let shared = Arc::new(TlsShared::default());
        let req = request(path);
        let mut handles = Vec::new();
        for (i, cfg) in cfgs.into_iter().enumerate() {
            let (shared, req) = (shared.clone(), req.clone());
            handles.push(
                std::thread::Builder::new()
                    .name(format!("tls-load-{i}"))
                    .spawn(move || tls_thread(target, &cfg, mode, &req, body, &shared))?,
            );
        }
        Ok(Self {
            shared,
            threads: handles,
            count,
        })
    }

    /// (full, resumed) handshakes so far.
    pub fn handshakes(&self) -> (u64, u64) {
        (
            self.shared.full.load(Ordering::Relaxed),
            self.shared.resumed.load(Ordering::Relaxed),
        )
    }
}

fn tls_thread(
    target: SocketAddr,
    cfg: &Arc<ClientConfig>,
    mode: TlsMode,
    req: &[u8],
    body: usize,
    shared: &TlsShared,
) {
    let mut buf = vec![0u8; 256 * 1024];
    while !shared.stop.load(Ordering::Relaxed) {
        let r = tls_session(target, cfg, mode, req, body, shared, &mut buf);
        if let Err(e) = r {
            if shared.stop.load(Ordering::Relaxed) {
                return;
            }
            shared.errors.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut last) = shared.last_error.lock() {
                *last = format!("{e:#}");
            }
            // Do not spin on a proxy that refuses us.
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// One connection: handshake, then one request (ConnPerRequest) or requests until stopped.
fn tls_session(
    target: SocketAddr,
    cfg: &Arc<ClientConfig>,
    mode: TlsMode,
    req: &[u8],
    body: usize,
    shared: &TlsShared,
    buf: &mut [u8],
) -> Result<()> {
    let mut tcp = TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    let name = ServerName::try_from(SERVER_NAME)?;
    let mut conn = ClientConnection::new(cfg.clone(), name)?;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).context("handshake")?;
    }
    match conn.handshake_kind() {
        Some(HandshakeKind::Resumed) => shared.resumed.fetch_add(1, Ordering::Relaxed),
        _ => shared.full.fetch_add(1, Ordering::Relaxed),
    };
    let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
    loop {
        tls.write_all(req).context("request")?;
        read_response(&mut tls, buf)?;
        shared.requests.fetch_add(1, Ordering::Relaxed);
        shared.body_bytes.fetch_add(body as u64, Ordering::Relaxed);
        if mode == TlsMode::ConnPerRequest || shared.stop.load(Ordering::Relaxed) {
            break;
        }
    }
    tls.conn.send_close_notify();
    let _ = tls.conn.complete_io(tls.sock);
    Ok(())
}

/// Reads one whole response (into `buf`, reused); no pipelining, so nothing follows it.
pub fn read_response(s: &mut impl Read, buf: &mut [u8]) -> Result<()> {
    let mut got = 0;
    let mut total = None;
    loop {
        if let Some(t) = total
            && got >= t
        {
            return Ok(());
        }
        if got == buf.len() {
            bail!("response larger than {} bytes", buf.len());
        }
        let n = match s.read(&mut buf[got..]) {
            Ok(0) => bail!("connection closed mid-response"),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("reading the response"),
        };
        got += n;
        if total.is_none() {
            total = response_len(&buf[..got])?;
        }
    }
}

impl Load for TlsClients {
    fn work(&self) -> u64 {
        match self.count {
            Count::Requests => self.shared.requests.load(Ordering::Relaxed),
            Count::BodyBytes => self.shared.body_bytes.load(Ordering::Relaxed),
        }
    }
    fn errors(&self) -> u64 {
        self.shared.errors.load(Ordering::Relaxed)
    }
    fn stop(self: Box<Self>) -> Result<()> {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().map_err(|_| anyhow!("TLS load thread panicked"))?;
        }
        let errors = self.shared.errors.load(Ordering::Relaxed);
        if self.shared.requests.load(Ordering::Relaxed) == 0 && errors > 0 {
            let last = self
                .shared
                .last_error
                .lock()
                .map(|l| l.clone())
                .unwrap_or_default();
            bail!("no request succeeded ({errors} errors; last: {last})");
        }
        Ok(())
    }
    fn notes(&self) -> Vec<String> {
        let (full, resumed) = self.handshakes();
        let errors = self.errors();
        let mut n = vec![format!(
            "TLS client: {full} full and {resumed} resumed handshakes"
        )];
        if errors > 0 {
            let last = self
                .shared
                .last_error
                .lock()
                .map(|l| l.clone())
                .unwrap_or_default();
            n.push(format!("TLS client: {errors} errors, last: {last}"));
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_framing() -> Result<()> {
        assert_eq!(response_len(b"HTTP/1.1 200 OK\r\nContent-Len")?, None);
        let r = b"HTTP/1.1 200 OK\r\nServer: x\r\ncontent-length: 12\r\n\r\n";
        assert_eq!(response_len(r)?, Some(r.len() + 12));
        assert!(response_len(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").is_err());
        assert!(response_len(b"HTTP/1.1 200 OK\r\n\r\n").is_err());
        Ok(())
    }
}
