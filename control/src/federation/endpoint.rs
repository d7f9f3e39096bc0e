//! The SPIFFE bundle endpoint server: `GET /` (or `GET /bundle`) returns the local trust
//! domain's bundle in SPIFFE format (`application/json`), over HTTPS without client
//! authentication.
//!
//! Profiles: `https_spiffe` presents an SVID of the local CA (`spiffe://<td>/meshgate/
//! bundle-endpoint`, key in memory only, re-issued at half-life and as soon as a CA rotation
//! switches the signing key); `https_web` presents an operator certificate and key from files
//! (re-read when they change, e.g. after certbot renews them).
//!
//! Plain blocking std threads beside everything else (never on a dataplane shard): one acceptor,
//! a thread per connection up to [`EndpointConfig::max_connections`], one maintenance thread.
//! Each request reads the bundle through [`Ca::bundle`], so a rotation's new root (and its
//! sequence bump) is served at once. Mount it anywhere with [`BundleEndpoint::start`].

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use rustls::{ServerConfig, ServerConnection};
use time::OffsetDateTime;

use super::ENDPOINT_ID_PATH;
use crate::ca::{Ca, IssueRequest};
use crate::enroll::http::{Limits, Method, Response, parse_head};
use crate::enroll::tls::{ServingCert, certified_key, provider};
use crate::ledger::AuthorisedBy;
use crate::spiffe::SpiffeId;

/// How the server authenticates itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointProfile {
    /// An SVID of the local CA.
    HttpsSpiffe,
    /// Operator files (PEM chain, PEM PKCS#8/SEC1/RSA key).
    HttpsWeb { cert: PathBuf, key: PathBuf },
}

/// Settings of the bundle endpoint.
#[derive(Debug, Clone)]
pub struct EndpointConfig {
    pub listen: SocketAddr,
    pub profile: EndpointProfile,
    /// `https_spiffe`: DNS SANs added to the SVID (not needed by SPIFFE clients, handy for curl).
    pub dns_names: Vec<String>,
    /// `https_spiffe`: IP SANs; the listen address is added unless unspecified.
    pub ip_addresses: Vec<IpAddr>,
    /// `https_spiffe`: lifetime of the server's SVID [default: the CA's default TTL].
    pub serving_ttl: Option<Duration>,
    pub max_connections: usize,
    /// Deadline for a whole connection.
    pub io_timeout: Duration,
}

impl EndpointConfig {
    pub fn new(listen: SocketAddr, profile: EndpointProfile) -> EndpointConfig {
        EndpointConfig {
            listen,
            profile,
            dns_names: Vec::new(),
            ip_addresses: Vec::new(),
            serving_ttl: None,
            max_connections: 64,
            io_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("cannot listen on {addr}: {source} (pick another address)")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot issue the bundle endpoint's SVID: {0}")]
    Svid(String),
    #[error("https_web certificate: {0}")]
    WebCert(String),
    #[error("cannot set up TLS: {0}")]
    Tls(String),
    #[error("cannot start a thread: {0}")]
    Spawn(#[source] io::Error),
}

/// Counters.
#[derive(Debug, Default)]
pub struct EndpointStats {
    pub served: AtomicU64,
    pub failed: AtomicU64,
    pub rotations: AtomicU64,
}

struct Shared {
    ca: Arc<Ca>,
    cfg: EndpointConfig,
    tls: Arc<ServerConfig>,
    serving: Arc<ServingCert>,
    stopping: AtomicBool,
    active: AtomicUsize,
    stats: EndpointStats,
}

/// A running bundle endpoint; dropping it stops it.
pub struct EndpointHandle {
    addr: SocketAddr,
    spiffe_id: Option<SpiffeId>,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for EndpointHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointHandle")
            .field("addr", &self.addr)
            .field("spiffe_id", &self.spiffe_id)
            .finish()
    }
}

/// The bundle endpoint server (see the module docs).
#[derive(Debug)]
pub struct BundleEndpoint;

/// What the `https_spiffe` serving SVID was issued under.
struct Issued {
    signing_der: Vec<u8>,
    renew_at: OffsetDateTime,
}

fn issue_svid(
    ca: &Ca,
    id: &SpiffeId,
    cfg: &EndpointConfig,
    ips: &[IpAddr],
) -> Result<(Arc<CertifiedKey>, Issued), EndpointError> {
    let signing_der = ca.signing_cert_der();
    let svid = ca
        .issue_with_ips(
            &IssueRequest {
                spiffe_id: id.clone(),
                dns_names: cfg.dns_names.clone(),
                ttl: cfg.serving_ttl,
                authorised_by: AuthorisedBy::Operator("bundle-endpoint".into()),
            },
            ips,
        )
        .map_err(|e| EndpointError::Svid(e.to_string()))?;
    let key = certified_key(&svid).map_err(EndpointError::Svid)?;
    let e = &svid.entry;
    Ok((
        key,
        Issued {
            signing_der,
            renew_at: e.issued_at + (e.not_after - e.issued_at) / 2,
        },
    ))
}

fn load_web_cert(cert: &PathBuf, key: &PathBuf) -> Result<Arc<CertifiedKey>, EndpointError> {
    let bad = |p: &PathBuf, e: &dyn std::fmt::Display| {
        EndpointError::WebCert(format!("{}: {e}", p.display()))
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad(cert, &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(cert, &e))?;
    if chain.is_empty() {
        return Err(bad(cert, &"no certificate"));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(key, &e))?;
    let signer =
        rustls::crypto::ring::sign::any_supported_type(&key_der).map_err(|e| bad(key, &e))?;
    let ck = CertifiedKey::new(chain, signer);
    ck.keys_match().map_err(|e| {
        EndpointError::WebCert(format!("the key does not match the certificate: {e}"))
    })?;
    Ok(Arc::new(ck))
}

fn mtimes(cert: &PathBuf, key: &PathBuf) -> Option<(SystemTime, SystemTime)> {
    let m = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    Some((m(cert)?, m(key)?))
}

impl BundleEndpoint {
    /// Bind and start serving `ca`'s bundle. Returns once the listener is bound.
    pub fn start(ca: Arc<Ca>, cfg: EndpointConfig) -> Result<EndpointHandle, EndpointError> {
        let listener = TcpListener::bind(cfg.listen).map_err(|source| EndpointError::Bind {
            addr: cfg.listen,
            source,
        })?;
        let addr = listener
            .local_addr()
            .map_err(|source| EndpointError::Bind {
                addr: cfg.listen,
                source,
            })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| EndpointError::Bind { addr, source })?;
        let mut ips = cfg.ip_addresses.clone();
        if !addr.ip().is_unspecified() && !ips.contains(&addr.ip()) {
            ips.push(addr.ip());
        }
        let (spiffe_id, key, issued) = match &cfg.profile {
            EndpointProfile::HttpsSpiffe => {
                let id = SpiffeId::parse(&format!(
                    "{}{ENDPOINT_ID_PATH}",
                    ca.trust_domain().id_string()
                ))
                .map_err(|e| EndpointError::Svid(e.to_string()))?;
                let (key, issued) = issue_svid(&ca, &id, &cfg, &ips)?;
                (Some(id), key, Some(issued))
            }
            EndpointProfile::HttpsWeb { cert, key } => (None, load_web_cert(cert, key)?, None),
        };
        let serving = Arc::new(ServingCert::new(key));
        let mut tls = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| EndpointError::Tls(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(serving.clone());
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        tracing::info!(
            address = %addr,
            profile = match cfg.profile { EndpointProfile::HttpsSpiffe => "https_spiffe", EndpointProfile::HttpsWeb { .. } => "https_web" },
            spiffe_id = ?spiffe_id.as_ref().map(ToString::to_string),
            trust_domain = %ca.trust_domain(),
            "bundle endpoint listening"
        );
        let shared = Arc::new(Shared {
            ca,
            cfg,
            tls: Arc::new(tls),
            serving,
            stopping: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            stats: EndpointStats::default(),
        });
        let mut threads = Vec::new();
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map_err(EndpointError::Spawn)
        };
        let sh = shared.clone();
        let id = spiffe_id.clone();
        let maint = spawn(
            "bundle-maint",
            Box::new(move || maintenance(&sh, id, issued, ips)),
        );
        let sh = shared.clone();
        let accept = maint.and_then(|m| {
            threads.push(m);
            spawn("bundle-accept", Box::new(move || acceptor(&sh, &listener)))
        });
        match accept {
            Ok(a) => {
                threads.push(a);
                Ok(EndpointHandle {
                    addr,
                    spiffe_id,
                    shared,
                    threads,
                })
            }
            Err(e) => {
                shared.stopping.store(true, Ordering::SeqCst);
                for t in threads {
                    let _ = t.join();
                }
                Err(e)
            }
        }
    }
}

impl EndpointHandle {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The SPIFFE ID the server presents (`https_spiffe`).
    pub fn spiffe_id(&self) -> Option<&SpiffeId> {
        self.spiffe_id.as_ref()
    }

    pub fn stats(&self) -> &EndpointStats {
        &self.shared.stats
    }

    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for EndpointHandle {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.shutdown();
        }
    }
}

fn maintenance(sh: &Shared, id: Option<SpiffeId>, mut issued: Option<Issued>, ips: Vec<IpAddr>) {
    let web = match &sh.cfg.profile {
        EndpointProfile::HttpsWeb { cert, key } => Some((cert.clone(), key.clone())),
        EndpointProfile::HttpsSpiffe => None,
    };
    let mut seen = web.as_ref().and_then(|(c, k)| mtimes(c, k));
    while !sh.stopping.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(250));
        if let (Some(id), Some(cur)) = (&id, &issued) {
            // Refresh the CA's view (follows a rotation), then compare signing keys.
            let _ = sh.ca.bundle();
            let rotated = sh.ca.signing_cert_der() != cur.signing_der;
            if rotated || sh.ca.clock().now() >= cur.renew_at {
                match issue_svid(&sh.ca, id, &sh.cfg, &ips) {
                    Ok((key, next)) => {
                        sh.serving.replace(key);
                        sh.stats.rotations.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(ca_rotated = rotated, "bundle endpoint: new serving SVID");
                        issued = Some(next);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "bundle endpoint: cannot renew the serving SVID; retrying");
                    }
                }
            }
        }
        if let Some((c, k)) = &web {
            let now = mtimes(c, k);
            if now.is_some() && now != seen {
                match load_web_cert(c, k) {
                    Ok(key) => {
                        sh.serving.replace(key);
                        sh.stats.rotations.fetch_add(1, Ordering::Relaxed);
                        tracing::info!("bundle endpoint: reloaded the https_web certificate");
                        seen = now;
                    }
                    // Half-written by a renewal tool: try again on the next tick.
                    Err(e) => {
                        tracing::warn!(error = %e, "bundle endpoint: cannot reload the https_web certificate")
                    }
                }
            }
        }
    }
}

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

/// Decrements the active-connection count when the connection thread ends.
struct Slot<'a>(&'a AtomicUsize);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn acceptor(sh: &Arc<Shared>, listener: &TcpListener) {
    while !sh.stopping.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, peer)) => {
                if sh.active.fetch_add(1, Ordering::SeqCst) >= sh.cfg.max_connections {
                    sh.active.fetch_sub(1, Ordering::SeqCst);
                    tracing::warn!(%peer, "bundle endpoint: too many connections; closing");
                    continue;
                }
                let sh2 = sh.clone();
                let spawned = std::thread::Builder::new()
                    .name("bundle-conn".into())
                    .spawn(move || {
                        let _slot = Slot(&sh2.active);
                        let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            serve(&sh2, stream, peer)
                        }));
                        if served.is_err() {
                            tracing::error!(%peer, "bundle endpoint: internal error (panic); closed the connection");
                        }
                    });
                if spawned.is_err() {
                    sh.active.fetch_sub(1, Ordering::SeqCst);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                wait_readable(listener.as_raw_fd(), Duration::from_millis(200));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!(error = %e, "bundle endpoint: accept failed");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn serve(sh: &Shared, mut tcp: TcpStream, peer: SocketAddr) {
    let deadline = Instant::now() + sh.cfg.io_timeout;
    let _ = tcp.set_nonblocking(false);
    let Ok(mut tls) = ServerConnection::new(sh.tls.clone()) else {
        return;
    };
    let arm = |tcp: &TcpStream| -> io::Result<()> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline"));
        }
        tcp.set_read_timeout(Some(left))?;
        tcp.set_write_timeout(Some(left))
    };
    while tls.is_handshaking() {
        if let Err(e) = arm(&tcp).and_then(|()| tls.complete_io(&mut tcp).map(drop)) {
            tracing::debug!(%peer, error = %e, "bundle endpoint: handshake failed");
            sh.stats.failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
    let limits = Limits {
        max_body: 0,
        ..Limits::default()
    };
    let mut buf = Vec::new();
    let mut chunk = [0u8; 2048];
    let head = loop {
        match parse_head(&buf, &limits) {
            Ok(Some(h)) => break Ok(h),
            Ok(None) => {}
            Err(e) => break Err(Response::refusal(e.reason, e.message)),
        }
        let n = match arm(&tcp)
            .and_then(|()| rustls::Stream::new(&mut tls, &mut tcp).read(&mut chunk))
        {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
    };
    let resp = match head {
        Err(r) => r,
        Ok(h) => match (h.method, h.path.as_str()) {
            (Method::Get, "/" | "/bundle") => match bundle_body(sh) {
                Ok(body) => {
                    sh.stats.served.fetch_add(1, Ordering::Relaxed);
                    Response::text(200, "application/json", body)
                }
                Err(e) => {
                    tracing::error!(error = %e, "bundle endpoint: cannot read the bundle");
                    Response::text(500, "text/plain", "cannot read the bundle\n")
                }
            },
            (_, "/" | "/bundle") => {
                Response::text(405, "text/plain", "use GET\n").header("allow", "GET")
            }
            _ => Response::text(404, "text/plain", "the bundle is at GET /\n"),
        },
    };
    if arm(&tcp).is_err() {
        return;
    }
    let mut s = rustls::Stream::new(&mut tls, &mut tcp);
    if s.write_all(&resp.encode()).and_then(|()| s.flush()).is_ok() {
        tls.send_close_notify();
        while tls.wants_write() {
            if tls.write_tls(&mut tcp).is_err() {
                break;
            }
        }
    }
}

fn bundle_body(sh: &Shared) -> Result<Vec<u8>, String> {
    let b = sh.ca.bundle().map_err(|e| e.to_string())?;
    let doc = b.to_spiffe_json().map_err(|e| e.to_string())?;
    let mut body = serde_json::to_vec_pretty(&doc).map_err(|e| e.to_string())?;
    body.push(b'\n');
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::TrustBundle;
    use crate::ca::InitOptions;
    use crate::clock::SystemClock;
    use crate::federation::Profile;
    use crate::federation::client::fetch;
    use crate::federation::store::PeerConfig;
    use crate::spiffe::TrustDomain;

    #[test]
    fn serves_the_bundle_to_an_https_spiffe_client_and_follows_rotation() {
        let d = tempfile::tempdir().expect("tmp");
        let td = TrustDomain::parse("a.test").expect("td");
        let ca = Arc::new(
            Ca::init(
                &d.path().join("a"),
                &InitOptions::new(td.clone()),
                Arc::new(SystemClock),
            )
            .expect("init"),
        );
        let h = BundleEndpoint::start(
            ca.clone(),
            EndpointConfig::new(
                "127.0.0.1:0".parse().expect("addr"),
                EndpointProfile::HttpsSpiffe,
            ),
        )
        .expect("start");
        let peer = PeerConfig {
            version: 1,
            trust_domain: td.clone(),
            endpoint: Some(format!("https://{}", h.local_addr())),
            profile: Profile::HttpsSpiffe,
            endpoint_spiffe_id: h.spiffe_id().cloned(),
            web_ca_file: None,
            added_at: OffsetDateTime::now_utc(),
        };
        let boot = ca.bundle().expect("bundle");
        let got = fetch(&peer, Some(&boot), Duration::from_secs(5)).expect("fetch");
        assert_eq!(got, boot);

        // Another trust domain's bundle cannot authenticate the endpoint.
        let other = Ca::init(
            &d.path().join("c"),
            &InitOptions::new(TrustDomain::parse("c.test").expect("td")),
            Arc::new(SystemClock),
        )
        .expect("init");
        let mut foreign = other.bundle().expect("b");
        foreign.trust_domain = td.clone();
        let e = fetch(&peer, Some(&foreign), Duration::from_secs(5)).expect_err("untrusted");
        assert!(
            matches!(e, super::super::client::FetchError::Untrusted(_)),
            "{e}"
        );

        ca.rotate_prepare(None).expect("prepare");
        let two = fetch(&peer, Some(&boot), Duration::from_secs(5)).expect("fetch");
        assert_eq!(two.x509_authorities.len(), 2);
        assert_eq!(two.sequence, boot.sequence + 1);
        ca.rotate_activate(true).expect("activate");
        // The endpoint re-issues its SVID under the new key; verified with the new bundle only.
        let new_only = TrustBundle {
            x509_authorities: vec![two.x509_authorities[1].clone()],
            ..two.clone()
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match fetch(&peer, Some(&new_only), Duration::from_secs(5)) {
                Ok(_) => break,
                Err(e) if Instant::now() > deadline => panic!("never re-issued: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        assert!(h.stats().rotations.load(Ordering::Relaxed) >= 1);
        h.stop();
    }
}
