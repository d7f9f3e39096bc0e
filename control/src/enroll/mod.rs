//! The enrollment server: VMs and bare-metal hosts trade a join token (once) or their current
//! SVID (every renewal) for an X509-SVID signed by the local CA, over HTTPS.
//!
//! Where it sits: beside the dataplane, never on its shards. Plain blocking std threads: one
//! acceptor, a small pool of connection workers fed through a bounded queue, and one maintenance
//! thread (rotates the server's own certificate at half-life, republishes the CRL at half its
//! validity, reloads `crl.pem` when it changes).
//! Enrollment is rare and each request does a CA signature and an fsync'd ledger append, so
//! there is nothing to gain from async here, and nothing it does can stall the proxy.
//!
//! One request per connection: accept -> TLS handshake ([`tls`]; a refused client certificate
//! is audited here) -> request head ([`http::parse_head`], size caps) -> rate limit
//! ([`ratelimit`]; 429 + Retry-After) -> body -> route -> [`crate::Ca`] -> JSON response
//! ([`api`]) -> one audit line ([`audit`]) -> close. Each connection has one deadline
//! ([`EnrollmentConfig::io_timeout`]) for all of it.
//!
//! Start it with [`EnrollmentServer::start`]; the returned [`EnrollmentHandle`] stops it.
//! `meshgate ca serve` runs it in the foreground; `meshgate run` runs it in its control plane
//! with `[control.enrollment]` (`src/cli/control.rs`).

pub mod api;
pub mod audit;
pub mod http;
pub mod ratelimit;
pub mod tls;

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustls::ServerConnection;
use time::OffsetDateTime;

use crate::ca::{Ca, IssueRequest, RenewOptions, SignedSvid};
use crate::clock::rfc3339;
use crate::error::CaError;
use crate::inspect::inspect_der;
use crate::ledger::{AuthorisedBy, LedgerEntry};
use crate::spiffe::SpiffeId;
use crate::tokens::JoinToken;

use api::{BundleResponse, EnrollRequest, Reason, RenewRequest, SvidResponse};
use audit::{AuditEvent, AuditFile, AuditLog};
use http::{Head, Limits, Method, Response};
use ratelimit::{RateLimiter, RateLimits, retry_after_secs};
use tls::{ClientVerifier, ServingCert};

/// The path of the server's own SPIFFE ID: `spiffe://<td>/meshgate/enrollment`. Agents expect
/// exactly this identity from the server.
pub const SERVER_ID_PATH: &str = "/meshgate/enrollment";

/// Default renewal grace: how long after expiry an SVID may still renew (see
/// [`crate::Ca::renew_with`]).
pub const DEFAULT_RENEWAL_GRACE: Duration = Duration::from_secs(24 * 3600);

/// Where audit lines go besides `tracing`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditTarget {
    /// `<state-dir>/audit/enrollment.jsonl`.
    StateDir,
    File(PathBuf),
    /// Only the `meshgate::audit` tracing target.
    TracingOnly,
}

/// Settings of the enrollment server.
#[derive(Debug, Clone)]
pub struct EnrollmentConfig {
    pub listen: SocketAddr,
    /// DNS SANs of the serving certificate (the names clients use in the URL).
    pub dns_names: Vec<String>,
    /// IP SANs of the serving certificate; the listen address is added when it is not the
    /// unspecified address.
    pub ip_addresses: Vec<IpAddr>,
    /// Lifetime of the serving certificate (rotated at half of it) [default: the CA's default
    /// SVID TTL].
    pub serving_ttl: Option<Duration>,
    /// TTL of the SVIDs issued to clients [default: the CA's default TTL].
    pub svid_ttl: Option<Duration>,
    pub renewal_grace: Duration,
    pub rate_limits: RateLimits,
    pub http_limits: Limits,
    pub workers: usize,
    /// Accepted connections waiting for a worker; past it new connections are closed at once.
    pub queue: usize,
    /// Deadline for a whole connection (handshake, request, response).
    pub io_timeout: Duration,
    pub audit: AuditTarget,
    pub audit_max_bytes: u64,
}

impl EnrollmentConfig {
    pub fn new(listen: SocketAddr) -> EnrollmentConfig {
        EnrollmentConfig {
            listen,
            dns_names: Vec::new(),
            ip_addresses: Vec::new(),
            serving_ttl: None,
            svid_ttl: None,
            renewal_grace: DEFAULT_RENEWAL_GRACE,
            rate_limits: RateLimits::default(),
            http_limits: Limits::default(),
            workers: 4,
            queue: 64,
            io_timeout: Duration::from_secs(10),
            audit: AuditTarget::StateDir,
            audit_max_bytes: audit::DEFAULT_MAX_BYTES,
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error(
        "cannot listen on {addr}: {source} (is another process using the port? pick another with --listen)"
    )]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot issue the enrollment server's certificate: {0}")]
    ServingCert(#[source] CaError),
    #[error("cannot set up TLS: {0}")]
    Tls(String),
    #[error("cannot open the audit file {path}: {source}")]
    Audit {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start a thread: {0}")]
    Spawn(#[source] io::Error),
    #[error("invalid setting: {0}")]
    Config(String),
}

/// Counters, for status and tests.
#[derive(Debug, Default)]
pub struct Stats {
    pub issued: AtomicU64,
    pub refused: AtomicU64,
    pub rate_limited: AtomicU64,
    pub handshake_failures: AtomicU64,
    pub dropped_overload: AtomicU64,
    pub serving_rotations: AtomicU64,
}

struct Shared {
    ca: Arc<Ca>,
    cfg: EnrollmentConfig,
    server_id: SpiffeId,
    tls: Arc<rustls::ServerConfig>,
    serving: Arc<ServingCert>,
    verifier: Arc<ClientVerifier>,
    limiter: RateLimiter,
    audit: AuditLog,
    stats: Stats,
    stopping: AtomicBool,
}

/// A running server. Dropping it stops it too.
pub struct EnrollmentHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    /// Dropping the sender wakes the maintenance thread.
    maint_stop: Option<SyncSender<()>>,
}

impl std::fmt::Debug for EnrollmentHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollmentHandle")
            .field("addr", &self.addr)
            .field("server_id", &self.shared.server_id)
            .finish()
    }
}

/// The enrollment server (see the module docs).
#[derive(Debug)]
pub struct EnrollmentServer;

struct Serving {
    entry: LedgerEntry,
}

fn issue_serving(
    ca: &Ca,
    id: &SpiffeId,
    cfg: &EnrollmentConfig,
    ips: &[IpAddr],
) -> Result<(Arc<rustls::sign::CertifiedKey>, Serving), EnrollError> {
    let svid = ca
        .issue_with_ips(
            &IssueRequest {
                spiffe_id: id.clone(),
                dns_names: cfg.dns_names.clone(),
                ttl: cfg.serving_ttl,
                authorised_by: AuthorisedBy::Operator("enrollment-server".into()),
            },
            ips,
        )
        .map_err(EnrollError::ServingCert)?;
    let key = tls::certified_key(&svid).map_err(EnrollError::Tls)?;
    Ok((key, Serving { entry: svid.entry }))
}

/// When to rotate a certificate: half-way between issuance and expiry.
fn half_life(entry: &LedgerEntry) -> OffsetDateTime {
    entry.issued_at + (entry.not_after - entry.issued_at) / 2
}

impl EnrollmentServer {
    /// Bind, issue the serving certificate, start the threads. Returns once the listener is
    /// bound (so `local_addr` is known and connections queue in the kernel backlog).
    pub fn start(ca: Arc<Ca>, cfg: EnrollmentConfig) -> Result<EnrollmentHandle, EnrollError> {
        if cfg.workers == 0 || cfg.queue == 0 {
            return Err(EnrollError::Config(
                "workers and queue must be at least 1".into(),
            ));
        }
        for d in &cfg.dns_names {
            crate::ca::validate_dns_name(d).map_err(EnrollError::ServingCert)?;
        }
        if let Some(t) = cfg.svid_ttl
            && (t.is_zero() || t > ca.max_ttl())
        {
            return Err(EnrollError::Config(format!(
                "the SVID TTL {} must be between 1s and the CA's maximum {} (set at `meshgate ca init --max-ttl`)",
                crate::duration::format(t),
                crate::duration::format(ca.max_ttl())
            )));
        }
        let server_id = SpiffeId::parse(&format!(
            "{}{SERVER_ID_PATH}",
            ca.trust_domain().id_string()
        ))
        .map_err(|e| EnrollError::ServingCert(e.into()))?;
        let listener = TcpListener::bind(cfg.listen).map_err(|source| EnrollError::Bind {
            addr: cfg.listen,
            source,
        })?;
        let addr = listener.local_addr().map_err(|source| EnrollError::Bind {
            addr: cfg.listen,
            source,
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| EnrollError::Bind { addr, source })?;

        let mut ips = cfg.ip_addresses.clone();
        if !addr.ip().is_unspecified() && !ips.contains(&addr.ip()) {
            ips.push(addr.ip());
        }
        let (key, serving) = issue_serving(&ca, &server_id, &cfg, &ips)?;
        let serving_cert = Arc::new(ServingCert::new(key));

        let provider = tls::provider();
        let bundle = ca.bundle().map_err(EnrollError::ServingCert)?;
        let crl = ca.crl_pem().map_err(EnrollError::ServingCert)?;
        let verifier = Arc::new(
            ClientVerifier::new(
                &bundle.x509_authorities,
                crl.as_bytes(),
                cfg.renewal_grace,
                &provider,
            )
            .map_err(EnrollError::Tls)?,
        );
        let tls_cfg = tls::server_config(provider, serving_cert.clone(), verifier.clone())
            .map_err(|e| EnrollError::Tls(e.to_string()))?;

        let audit = match &cfg.audit {
            AuditTarget::TracingOnly => AuditLog::tracing_only(),
            target => {
                let path = match target {
                    AuditTarget::File(p) => p.clone(),
                    _ => ca.state_dir().join("audit").join("enrollment.jsonl"),
                };
                AuditLog::with_file(AuditFile {
                    path: path.clone(),
                    max_bytes: cfg.audit_max_bytes,
                })
                .map_err(|source| EnrollError::Audit { path, source })?
            }
        };

        tracing::info!(
            address = %addr,
            spiffe_id = %server_id,
            dns = ?cfg.dns_names,
            ips = ?ips,
            serving_serial = %serving.entry.serial,
            serving_not_after = %rfc3339(serving.entry.not_after),
            audit = ?audit.path(),
            "enrollment server listening"
        );

        let shared = Arc::new(Shared {
            limiter: RateLimiter::new(cfg.rate_limits, Instant::now()),
            ca,
            server_id,
            tls: tls_cfg,
            serving: serving_cert,
            verifier,
            audit,
            stats: Stats::default(),
            stopping: AtomicBool::new(false),
            cfg,
        });

        let mut threads = Vec::new();
        let (work_tx, work_rx) = mpsc::sync_channel::<(TcpStream, SocketAddr)>(shared.cfg.queue);
        let work_rx = Arc::new(Mutex::new(work_rx));
        let spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name)
                .spawn(f)
                .map_err(EnrollError::Spawn)
        };
        let started = || -> Result<SyncSender<()>, EnrollError> {
            for i in 0..shared.cfg.workers {
                let (sh, rx) = (shared.clone(), work_rx.clone());
                threads.push(spawn(
                    format!("enroll-worker-{i}"),
                    Box::new(move || worker(&sh, &rx)),
                )?);
            }
            let (stop_tx, stop_rx) = mpsc::sync_channel::<()>(1);
            let sh = shared.clone();
            threads.push(spawn(
                "enroll-maint".into(),
                Box::new(move || maintenance(&sh, &stop_rx, serving, ips)),
            )?);
            let sh = shared.clone();
            threads.push(spawn(
                "enroll-accept".into(),
                Box::new(move || acceptor(&sh, &listener, work_tx)),
            )?);
            Ok(stop_tx)
        };
        match started() {
            Ok(stop_tx) => Ok(EnrollmentHandle {
                addr,
                shared,
                threads,
                maint_stop: Some(stop_tx),
            }),
            Err(e) => {
                shared.stopping.store(true, Ordering::SeqCst);
                Err(e)
            }
        }
    }
}

impl EnrollmentHandle {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `spiffe://<td>/meshgate/enrollment`.
    pub fn server_id(&self) -> &SpiffeId {
        &self.shared.server_id
    }

    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// Stop accepting, let the connections in progress finish, join every thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.maint_stop.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        tracing::info!(address = %self.addr, "enrollment server stopped");
    }
}

impl Drop for EnrollmentHandle {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.shutdown();
        }
    }
}

/// Wait until `fd` is readable or `timeout` passes.
fn wait_readable(fd: std::os::fd::RawFd, timeout: Duration) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `pfd` is a valid pollfd for the duration of the call and nfds is 1.
    let _ = unsafe { libc::poll(&mut pfd, 1, ms) };
}

fn acceptor(sh: &Shared, listener: &TcpListener, work: SyncSender<(TcpStream, SocketAddr)>) {
    let mut last_overload_log: Option<Instant> = None;
    while !sh.stopping.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, peer)) => match work.try_send((stream, peer)) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    sh.stats.dropped_overload.fetch_add(1, Ordering::Relaxed);
                    if last_overload_log.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                        last_overload_log = Some(Instant::now());
                        tracing::warn!(
                            %peer,
                            queue = sh.cfg.queue,
                            "enrollment server overloaded; closing new connections"
                        );
                    }
                }
                Err(TrySendError::Disconnected(_)) => break,
            },
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                wait_readable(listener.as_raw_fd(), Duration::from_millis(200));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    // Dropping `work` lets the workers drain the queue and exit.
}

fn worker(sh: &Shared, rx: &Mutex<Receiver<(TcpStream, SocketAddr)>>) {
    loop {
        let next = {
            let rx = rx.lock().unwrap_or_else(|p| p.into_inner());
            rx.recv()
        };
        let Ok((stream, peer)) = next else {
            return;
        };
        // A bug in one request must not cost a worker for the life of the server.
        let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            serve_connection(sh, stream, peer);
        }));
        if served.is_err() {
            tracing::error!(%peer, "internal error while serving a connection (panic); closed it");
        }
    }
}

fn maintenance(sh: &Shared, stop: &Receiver<()>, mut serving: Serving, ips: Vec<IpAddr>) {
    let crl_path = crate::layout::StateDir::new(sh.ca.state_dir()).crl();
    let mut crl_seen = std::fs::read(&crl_path).ok();
    let mut failures: u64 = 0;
    let mut crl_failures: u64 = 0;
    loop {
        match stop.recv_timeout(Duration::from_secs(1)) {
            Err(RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        let now = sh.ca.clock().now();
        if now >= half_life(&serving.entry) {
            match issue_serving(&sh.ca, &sh.server_id, &sh.cfg, &ips) {
                Ok((key, next)) => {
                    sh.serving.replace(key);
                    sh.stats.serving_rotations.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        serial = %next.entry.serial,
                        not_after = %rfc3339(next.entry.not_after),
                        "rotated the enrollment server's certificate"
                    );
                    serving = next;
                    failures = 0;
                }
                Err(e) => {
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(60) {
                        tracing::error!(
                            error = %e,
                            not_after = %rfc3339(serving.entry.not_after),
                            "cannot rotate the enrollment server's certificate; still serving the current one"
                        );
                    }
                }
            }
        }
        match sh.ca.republish_crl_if_due() {
            Ok(Some(n)) => {
                tracing::info!(crl_number = n, "republished the CRL before its nextUpdate")
            }
            Ok(None) => crl_failures = 0,
            Err(e) => {
                crl_failures += 1;
                if crl_failures == 1 || crl_failures.is_multiple_of(60) {
                    tracing::error!(error = %e, "cannot republish the CRL");
                }
            }
        }
        match std::fs::read(&crl_path) {
            Ok(bytes) if crl_seen.as_deref() != Some(bytes.as_slice()) => {
                match sh.verifier.set_crl(&bytes) {
                    Ok(()) => tracing::info!(path = %crl_path.display(), "loaded the new CRL"),
                    Err(e) => tracing::error!(
                        path = %crl_path.display(),
                        error = %e,
                        "cannot use the new CRL; keeping the previous one"
                    ),
                }
                crl_seen = Some(bytes);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(path = %crl_path.display(), error = %e, "cannot read the CRL"),
        }
    }
}

/// A connection's stream with a deadline for the whole exchange.
struct Conn {
    tcp: TcpStream,
    tls: ServerConnection,
    deadline: Instant,
}

impl Conn {
    fn arm(&self) -> io::Result<()> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "connection deadline",
            ));
        }
        self.tcp.set_read_timeout(Some(left))?;
        self.tcp.set_write_timeout(Some(left))
    }

    fn handshake(&mut self) -> io::Result<()> {
        while self.tls.is_handshaking() {
            self.arm()?;
            self.tls.complete_io(&mut self.tcp)?;
        }
        Ok(())
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.arm()?;
        rustls::Stream::new(&mut self.tls, &mut self.tcp).read(buf)
    }

    fn respond(&mut self, resp: &Response) {
        if self.arm().is_err() {
            return;
        }
        let mut s = rustls::Stream::new(&mut self.tls, &mut self.tcp);
        if s.write_all(&resp.encode())
            .and_then(|()| s.flush())
            .is_err()
        {
            return;
        }
        self.tls.send_close_notify();
        while self.tls.wants_write() {
            if self.tls.write_tls(&mut self.tcp).is_err() {
                break;
            }
        }
    }
}

/// The rustls error inside an io::Error from `complete_io`, if any.
fn rustls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()?.downcast_ref::<rustls::Error>()
}

fn event_name(path: &str) -> &'static str {
    match path {
        "/v1/enroll" => "enroll",
        "/v1/renew" => "renew",
        "/v1/bundle" => "bundle",
        _ => "http",
    }
}

fn serve_connection(sh: &Shared, tcp: TcpStream, peer: SocketAddr) {
    let _ = tcp.set_nonblocking(false);
    let _ = tcp.set_nodelay(true);
    let tls = match ServerConnection::new(sh.tls.clone()) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "cannot create a TLS session");
            return;
        }
    };
    let mut conn = Conn {
        tcp,
        tls,
        deadline: Instant::now() + sh.cfg.io_timeout,
    };
    if let Err(e) = conn.handshake() {
        // Port scans and clients that hang up are not attempts; refused certificates are.
        if let Some(err) = rustls_error(&e) {
            sh.stats.handshake_failures.fetch_add(1, Ordering::Relaxed);
            let mut ev = AuditEvent::new("tls", peer, sh.ca.clock().now());
            ev.outcome = "refused";
            ev.reason = Some(tls::handshake_reason(err));
            ev.detail = Some(err.to_string());
            sh.audit.record(&ev);
        }
        return;
    }

    let mut ev = AuditEvent::new("http", peer, sh.ca.clock().now());
    let peer_leaf = conn
        .tls
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.as_ref().to_vec());
    let peer_info = peer_leaf.as_deref().and_then(|d| inspect_der(d, 0).ok());
    if let Some(info) = &peer_info {
        ev.peer_serial = Some(info.serial.clone());
        ev.spiffe_id = info.spiffe_id.clone();
    }

    let (resp, outcome) = match read_request(&mut conn, &sh.cfg.http_limits) {
        Err(ReadError::Gone) => return,
        Err(ReadError::Refused(e)) => (
            Response::refusal(e.reason, e.message),
            Outcome::refused(e.reason, e.message),
        ),
        Ok((head, body)) => {
            ev.event = event_name(&head.path);
            match sh.limiter.check(peer.ip(), Instant::now()) {
                Err(wait) => {
                    sh.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
                    let secs = retry_after_secs(wait);
                    (
                        Response::refusal(
                            Reason::RateLimited,
                            format!("too many requests; retry in {secs}s"),
                        )
                        .header("retry-after", secs.to_string()),
                        Outcome::refused(Reason::RateLimited, "rate limited"),
                    )
                }
                Ok(()) => route(sh, &head, &body, peer_leaf.as_deref(), &mut ev),
            }
        }
    };
    let resp = match &peer_info {
        Some(info) => match &info.spiffe_id {
            Some(id) => resp.header("meshgate-peer-spiffe-id", id.clone()),
            None => resp,
        },
        None => resp,
    };
    ev.status = resp.status;
    ev.outcome = outcome.outcome;
    ev.reason = outcome.reason.map(Reason::as_str);
    ev.detail = outcome.detail;
    match ev.outcome {
        "issued" => sh.stats.issued.fetch_add(1, Ordering::Relaxed),
        "refused" | "error" => sh.stats.refused.fetch_add(1, Ordering::Relaxed),
        _ => 0,
    };
    if ev.event != "http" || ev.outcome != "served" {
        sh.audit.record(&ev);
    }
    conn.respond(&resp);
}

enum ReadError {
    /// The client went away or timed out; nothing to answer.
    Gone,
    Refused(http::HttpError),
}

fn read_request(conn: &mut Conn, limits: &Limits) -> Result<(Head, Vec<u8>), ReadError> {
    let mut buf: Vec<u8> = Vec::with_capacity(2048);
    let mut chunk = [0u8; 4096];
    let head = loop {
        match http::parse_head(&buf, limits) {
            Ok(Some(h)) => break h,
            Ok(None) => {}
            Err(e) => return Err(ReadError::Refused(e)),
        }
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => {
                return if buf.is_empty() {
                    Err(ReadError::Gone)
                } else {
                    Err(ReadError::Refused(http::HttpError {
                        reason: Reason::BadRequest,
                        message: "incomplete request head",
                    }))
                };
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let mut body = buf.split_off(head.head_len.min(buf.len()));
    if head.expect_continue && body.len() < head.content_length {
        // curl waits a second for this before sending a body over 1 KiB.
        let mut s = rustls::Stream::new(&mut conn.tls, &mut conn.tcp);
        if s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").is_err() {
            return Err(ReadError::Gone);
        }
    }
    while body.len() < head.content_length {
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => {
                return Err(ReadError::Refused(http::HttpError {
                    reason: Reason::BadRequest,
                    message: "the body is shorter than Content-Length",
                }));
            }
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    body.truncate(head.content_length);
    Ok((head, body))
}

/// What the audit line says about a response.
struct Outcome {
    outcome: &'static str,
    reason: Option<Reason>,
    detail: Option<String>,
}

impl Outcome {
    fn ok(outcome: &'static str) -> Outcome {
        Outcome {
            outcome,
            reason: None,
            detail: None,
        }
    }
    fn refused(reason: Reason, detail: impl Into<String>) -> Outcome {
        Outcome {
            outcome: if reason.status() >= 500 {
                "error"
            } else {
                "refused"
            },
            reason: Some(reason),
            detail: Some(detail.into()),
        }
    }
}

fn refuse(reason: Reason, message: impl Into<String>) -> (Response, Outcome) {
    let message = message.into();
    (
        Response::refusal(reason, message.clone()),
        Outcome::refused(reason, message),
    )
}

/// A CA error as a response. Machine failures are logged in full and answered vaguely.
fn ca_refusal(e: &CaError) -> (Response, Outcome) {
    let reason = Reason::of(e);
    if reason == Reason::Internal {
        tracing::error!(error = %e, "enrollment failed");
        let (resp, _) = refuse(reason, "the CA could not complete the request; retry later");
        (resp, Outcome::refused(reason, e.to_string()))
    } else {
        refuse(reason, e.to_string())
    }
}

fn route(
    sh: &Shared,
    head: &Head,
    body: &[u8],
    peer_leaf: Option<&[u8]>,
    ev: &mut AuditEvent,
) -> (Response, Outcome) {
    match (head.path.as_str(), head.method) {
        ("/v1/enroll", Method::Post) => enroll(sh, body, ev),
        ("/v1/renew", Method::Post) => renew(sh, body, peer_leaf, ev),
        ("/v1/bundle", Method::Get) => bundle(sh, head),
        ("/healthz", Method::Get) => (
            Response::text(200, "text/plain", "ok\n"),
            Outcome::ok("served"),
        ),
        ("/v1/enroll" | "/v1/renew", _) => refuse(Reason::MethodNotAllowed, "use POST"),
        ("/v1/bundle" | "/healthz", _) => refuse(Reason::MethodNotAllowed, "use GET"),
        _ => refuse(
            Reason::NotFound,
            "no such endpoint; see POST /v1/enroll, POST /v1/renew, GET /v1/bundle",
        ),
    }
}

fn csr_der(pem: &str) -> Result<Vec<u8>, String> {
    use rustls::pki_types::CertificateSigningRequestDer;
    use rustls::pki_types::pem::PemObject;
    CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .map(|d| d.as_ref().to_vec())
        .map_err(|e| {
            format!("csr_pem must hold one \"-----BEGIN CERTIFICATE REQUEST-----\" block ({e})")
        })
}

fn svid_response(sh: &Shared, svid: &SignedSvid) -> Result<SvidResponse, CaError> {
    let bundle = sh.ca.bundle()?;
    let spiffe_bundle = bundle.to_spiffe_json().map_err(|e| {
        CaError::Store(crate::error::StoreError::Corrupt {
            path: sh.ca.state_dir().join("ca"),
            detail: e.to_string(),
        })
    })?;
    Ok(SvidResponse {
        spiffe_id: svid.entry.spiffe_id.to_string(),
        serial: svid.entry.serial.to_string(),
        svid_pem: svid.chain_pem.clone(),
        bundle_pem: bundle.to_pem(),
        spiffe_bundle,
        not_before: rfc3339(svid.entry.not_before),
        not_after: rfc3339(svid.entry.not_after),
        issued_at: rfc3339(svid.entry.issued_at),
    })
}

fn issued(sh: &Shared, svid: &SignedSvid, ev: &mut AuditEvent) -> (Response, Outcome) {
    ev.serial = Some(svid.entry.serial.to_string());
    ev.not_after = Some(rfc3339(svid.entry.not_after));
    ev.spiffe_id = Some(svid.entry.spiffe_id.to_string());
    match svid_response(sh, svid) {
        Ok(r) => (Response::json(200, &r), Outcome::ok("issued")),
        Err(e) => ca_refusal(&e),
    }
}

fn enroll(sh: &Shared, body: &[u8], ev: &mut AuditEvent) -> (Response, Outcome) {
    let req: EnrollRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return refuse(
                Reason::BadRequest,
                format!("the body must be JSON {{\"token\", \"spiffe_id\", \"csr_pem\"}}: {e}"),
            );
        }
    };
    let token = JoinToken::new(req.token);
    ev.token_id = token.id().map(str::to_owned);
    ev.spiffe_id = Some(req.spiffe_id.clone());
    let id = match SpiffeId::parse(&req.spiffe_id) {
        Ok(id) => id,
        Err(e) => return refuse(Reason::BadSpiffeId, format!("spiffe_id: {e}")),
    };
    let der = match csr_der(&req.csr_pem) {
        Ok(d) => d,
        Err(m) => return refuse(Reason::CsrMalformed, m),
    };
    match sh.ca.enroll(&token, &id, &der, sh.cfg.svid_ttl) {
        Ok(svid) => issued(sh, &svid, ev),
        Err(e) => ca_refusal(&e),
    }
}

fn renew(
    sh: &Shared,
    body: &[u8],
    peer_leaf: Option<&[u8]>,
    ev: &mut AuditEvent,
) -> (Response, Outcome) {
    let Some(leaf) = peer_leaf else {
        return refuse(
            Reason::ClientCertificateRequired,
            "renewal is authenticated by the current SVID: connect with it as the TLS client certificate (or enroll with a join token)",
        );
    };
    let req: RenewRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return refuse(
                Reason::BadRequest,
                format!("the body must be JSON {{\"csr_pem\"}}: {e}"),
            );
        }
    };
    let der = match csr_der(&req.csr_pem) {
        Ok(d) => d,
        Err(m) => return refuse(Reason::CsrMalformed, m),
    };
    let opts = RenewOptions {
        ttl: sh.cfg.svid_ttl,
        grace: sh.cfg.renewal_grace,
    };
    match sh.ca.renew_with(leaf, &der, &opts) {
        Ok(r) => {
            ev.in_grace = r.in_grace;
            issued(sh, &r.svid, ev)
        }
        Err(e) => ca_refusal(&e),
    }
}

fn bundle(sh: &Shared, head: &Head) -> (Response, Outcome) {
    let b = match sh.ca.bundle() {
        Ok(b) => b,
        Err(e) => return ca_refusal(&e),
    };
    let doc = match b.to_spiffe_json() {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(error = %e, "cannot encode the SPIFFE bundle");
            return refuse(Reason::Internal, "cannot encode the bundle");
        }
    };
    let resp = match head.query_param("format") {
        None | Some("json") => Response::json(
            200,
            &BundleResponse {
                trust_domain: b.trust_domain.to_string(),
                sequence: b.sequence,
                bundle_pem: b.to_pem(),
                spiffe_bundle: doc,
            },
        ),
        Some("pem") => Response::text(200, "application/x-pem-file", b.to_pem()),
        Some("spiffe") => Response::json(200, &doc),
        Some(_) => {
            return refuse(Reason::BadRequest, "format must be json, pem or spiffe");
        }
    };
    (resp, Outcome::ok("served"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::client::{CallError, Client, ServerUrl};
    use crate::ca::InitOptions;
    use crate::clock::{Clock, FixedClock, SystemClock};
    use crate::spiffe::TrustDomain;
    use rcgen::string::Ia5String;
    use rcgen::{CertificateParams, KeyPair, SanType};

    struct Fixture {
        dir: tempfile::TempDir,
        ca: Arc<Ca>,
        bundle_pem: String,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = InitOptions::new(TrustDomain::parse("example.org").expect("td"));
        let ca = Arc::new(
            Ca::init(&dir.path().join("state"), &opts, Arc::new(SystemClock)).expect("init"),
        );
        let bundle_pem = ca.bundle().expect("bundle").to_pem();
        Fixture {
            dir,
            ca,
            bundle_pem,
        }
    }

    fn start(f: &Fixture, tweak: impl FnOnce(&mut EnrollmentConfig)) -> EnrollmentHandle {
        let mut cfg = EnrollmentConfig::new("127.0.0.1:0".parse().expect("addr"));
        tweak(&mut cfg);
        EnrollmentServer::start(f.ca.clone(), cfg).expect("start")
    }

    fn client(f: &Fixture, h: &EnrollmentHandle, identity: Option<(&str, &str)>) -> Client {
        let url: ServerUrl = format!("https://{}", h.local_addr()).parse().expect("url");
        Client::new(
            url,
            h.server_id().clone(),
            &[&f.bundle_pem],
            identity,
            Duration::from_secs(5),
        )
        .expect("client")
    }

    fn csr(id: &str) -> (KeyPair, String) {
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(Ia5String::try_from(id).expect("ia5"))];
        let pem = p
            .serialize_request(&key)
            .and_then(|c| c.pem())
            .expect("csr");
        (key, pem)
    }

    fn enroll_body(token: &str, id: &str, csr_pem: &str) -> Vec<u8> {
        serde_json::to_vec(&EnrollRequest {
            token: token.into(),
            spiffe_id: id.into(),
            csr_pem: csr_pem.into(),
        })
        .expect("json")
    }

    fn reason(e: &CallError) -> Option<Reason> {
        match e {
            CallError::Refused { reason, .. } => *reason,
            _ => None,
        }
    }

    #[test]
    fn enrolls_renews_and_refuses_with_reasons() {
        let f = fixture();
        let h = start(&f, |c| c.rate_limits.per_source.burst = 1000);
        let c = client(&f, &h, None);
        let vm = "spiffe://example.org/vm/1";
        let (token, rec) =
            f.ca.create_token(&SpiffeId::parse(vm).expect("id"), Duration::from_secs(600))
                .expect("token");

        // A CSR for another identity is refused and does not spend the token.
        let (_, other) = csr("spiffe://example.org/vm/2");
        let e = c
            .post("/v1/enroll", &enroll_body(token.expose(), vm, &other))
            .expect_err("other identity");
        assert_eq!(reason(&e), Some(Reason::CsrIdentityMismatch), "{e}");
        assert!(e.is_permanent());

        let (key, good) = csr(vm);
        let body = c
            .post("/v1/enroll", &enroll_body(token.expose(), vm, &good))
            .expect("enroll");
        let svid: SvidResponse = serde_json::from_slice(&body).expect("response");
        assert_eq!(svid.spiffe_id, vm);
        assert_eq!(svid.bundle_pem, f.bundle_pem);
        assert_eq!(svid.spiffe_bundle["keys"][0]["use"], "x509-svid");
        let (id, serial, _) =
            crate::agent::files::check_pair(&svid.svid_pem, &key.serialize_pem()).expect("pair");
        assert_eq!(
            (id.to_string(), serial.clone()),
            (vm.to_owned(), svid.serial.clone())
        );

        // Single use.
        let e = c
            .post("/v1/enroll", &enroll_body(token.expose(), vm, &good))
            .expect_err("reuse");
        assert_eq!(reason(&e), Some(Reason::TokenUsed), "{e}");
        assert!(matches!(e, CallError::Refused { status: 403, .. }));
        let e = c
            .post("/v1/enroll", &enroll_body("mgjt.00000000.nope", vm, &good))
            .expect_err("unknown");
        assert_eq!(reason(&e), Some(Reason::TokenUnknown));
        assert!(matches!(e, CallError::Refused { status: 401, .. }));

        // Garbage and wrong routes.
        let e = c.post("/v1/enroll", b"{not json").expect_err("garbage");
        assert!(matches!(e, CallError::Refused { status: 400, .. }), "{e}");
        let e = c
            .post(
                "/v1/enroll",
                &enroll_body("x", vm, "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"),
            )
            .expect_err("bad csr");
        assert_eq!(reason(&e), Some(Reason::CsrMalformed), "{e}");
        let e = c.get("/v1/enroll").expect_err("method");
        assert!(matches!(e, CallError::Refused { status: 405, .. }));
        let e = c.get("/nope").expect_err("404");
        assert!(matches!(e, CallError::Refused { status: 404, .. }));

        // Renewal needs the SVID as client certificate.
        let (_, renew_csr) = csr(vm);
        let renew_body = serde_json::to_vec(&RenewRequest { csr_pem: renew_csr }).expect("json");
        let e = c.post("/v1/renew", &renew_body).expect_err("no cert");
        assert_eq!(reason(&e), Some(Reason::ClientCertificateRequired));
        let key_pem = key.serialize_pem();
        let mtls = client(&f, &h, Some((&svid.svid_pem, &key_pem)));
        let renewed: SvidResponse =
            serde_json::from_slice(&mtls.post("/v1/renew", &renew_body).expect("renew"))
                .expect("response");
        assert_eq!(renewed.spiffe_id, vm);
        assert_ne!(renewed.serial, svid.serial);
        let ledger = f.ca.ledger().expect("ledger");
        let last = ledger.last().expect("entry");
        assert_eq!(last.authorised_by, format!("renewal:{}", svid.serial));
        assert!(
            ledger
                .iter()
                .any(|e| e.authorised_by == format!("token:{}", rec.id))
        );

        // Bundle, plain and over mTLS.
        let b: BundleResponse =
            serde_json::from_slice(&c.get("/v1/bundle").expect("bundle")).expect("json");
        assert_eq!(b.bundle_pem, f.bundle_pem);
        assert_eq!(
            c.get("/v1/bundle?format=pem").expect("pem"),
            f.bundle_pem.as_bytes()
        );

        // Revoked: the handshake itself is refused once the server has reloaded the CRL.
        f.ca.revoke(
            &svid.serial.parse().expect("serial"),
            crate::ca::RevocationReason::KeyCompromise,
        )
        .expect("revoke");
        let deadline = Instant::now() + Duration::from_secs(10);
        let refused = loop {
            match mtls.post("/v1/renew", &renew_body) {
                Err(e @ CallError::CertificateRefused(_)) => break e,
                other => {
                    assert!(Instant::now() < deadline, "still accepted: {other:?}");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        };
        assert!(refused.is_permanent());

        h.stop();
        let audit = std::fs::read_to_string(f.dir.path().join("state/audit/enrollment.jsonl"))
            .expect("audit");
        let lines: Vec<serde_json::Value> = audit
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect();
        let has = |k: &str, v: &str| lines.iter().any(|l| l[k] == v);
        assert!(has("reason", "token_used") && has("reason", "csr_identity_mismatch"));
        assert!(has("reason", "client_certificate_required"));
        assert!(has("reason", "client_certificate_revoked"));
        assert!(lines.iter().any(|l| l["outcome"] == "issued"
            && l["event"] == "enroll"
            && l["token_id"] == rec.id.as_str()
            && l["serial"] == svid.serial.as_str()));
        assert!(
            !audit.contains(token.expose()),
            "the token leaked into the audit"
        );
    }

    #[test]
    fn expired_svid_renews_within_grace_only_if_newest() {
        // The CA is created two hours in the past and issues an SVID that expired an hour ago;
        // the server runs on another handle with the system clock.
        let dir = tempfile::tempdir().expect("tempdir");
        let past = Arc::new(FixedClock::at_system_now());
        past.set(SystemClock.now() - time::Duration::hours(2));
        let opts = InitOptions::new(TrustDomain::parse("example.org").expect("td"));
        let old_ca = Ca::init(&dir.path().join("state"), &opts, past).expect("init");
        let ca = Arc::new(Ca::open(old_ca.state_dir()).expect("open"));
        let f = Fixture {
            bundle_pem: ca.bundle().expect("bundle").to_pem(),
            ca,
            dir,
        };
        let vm = SpiffeId::parse("spiffe://example.org/vm/g").expect("id");
        let old = old_ca
            .issue(&IssueRequest {
                spiffe_id: vm.clone(),
                dns_names: vec![],
                ttl: Some(Duration::from_secs(3600)),
                authorised_by: AuthorisedBy::Operator("test".into()),
            })
            .expect("issue");
        let (_, renew_csr) = csr(&vm.to_string());
        let body = serde_json::to_vec(&RenewRequest { csr_pem: renew_csr }).expect("json");

        // No grace: the handshake refuses the expired certificate.
        let strict = start(&f, |c| c.renewal_grace = Duration::ZERO);
        let e = client(&f, &strict, Some((&old.chain_pem, old.key_pem.expose())))
            .post("/v1/renew", &body)
            .expect_err("expired");
        assert!(matches!(e, CallError::CertificateRefused(_)), "{e:?}");
        strict.stop();

        // Default grace (24h): renews once; then it is no longer the newest and is refused.
        let h = start(&f, |_| {});
        let c = client(&f, &h, Some((&old.chain_pem, old.key_pem.expose())));
        let r: SvidResponse =
            serde_json::from_slice(&c.post("/v1/renew", &body).expect("grace")).expect("json");
        assert_eq!(r.spiffe_id, vm.to_string());
        let e = c.post("/v1/renew", &body).expect_err("superseded");
        assert_eq!(reason(&e), Some(Reason::RenewalRefused), "{e}");
        assert!(e.to_string().contains("newer certificate"), "{e}");
    }

    #[test]
    fn rate_limits_per_source_with_retry_after() {
        let f = fixture();
        let h = start(&f, |c| {
            c.rate_limits.per_source = ratelimit::Rate {
                burst: 2,
                per_minute: 6,
            };
            c.audit = AuditTarget::TracingOnly;
        });
        let c = client(&f, &h, None);
        c.get("/v1/bundle").expect("1");
        c.get("/v1/bundle").expect("2");
        let e = c.post("/v1/enroll", b"{}").expect_err("limited");
        assert_eq!(reason(&e), Some(Reason::RateLimited));
        assert_eq!(e.retry_after(), Some(Duration::from_secs(10)));
        assert!(!e.is_permanent());
        assert_eq!(h.stats().rate_limited.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn serving_certificate_names_the_server_and_rotates() {
        let f = fixture();
        let h = start(&f, |c| {
            c.dns_names = vec!["enroll.example.org".into()];
            c.serving_ttl = Some(Duration::from_secs(4));
            c.audit = AuditTarget::TracingOnly;
        });
        let first = h.shared.serving.current();
        let info = inspect_der(&first.cert[0], 0).expect("leaf");
        assert_eq!(
            info.spiffe_id.as_deref(),
            Some("spiffe://example.org/meshgate/enrollment")
        );
        assert_eq!(info.dns_names, vec!["enroll.example.org"]);
        assert_eq!(info.ip_addresses, vec!["127.0.0.1"]);
        // Rotated at half of 4s.
        let deadline = Instant::now() + Duration::from_secs(10);
        while h.stats().serving_rotations.load(Ordering::Relaxed) == 0 {
            assert!(Instant::now() < deadline, "not rotated");
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_ne!(h.shared.serving.current().cert[0], first.cert[0]);
        client(&f, &h, None)
            .get("/v1/bundle")
            .expect("served by the new cert");
    }
}
