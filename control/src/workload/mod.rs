//! The SPIFFE Workload API: local workloads fetch X509-SVIDs and trust bundles over gRPC on a
//! Unix socket, with the standard SPIFFE client libraries (go-spiffe, py-spiffe, the `spiffe`
//! crate) unchanged.
//!
//! Where it sits: the daemon's control plane (`[control.workload_api]` in `meshgate run`),
//! beside the CA it issues from; one `meshgate-workload` thread running a current-thread tokio
//! runtime with the `h2` server (never on the dataplane shards, which do not use tokio).
//!
//! Per connection: the caller's uid and pid come from the socket (SO_PEERCRED), its executable
//! from `/proc/<pid>/exe`; each request is matched against the registrations in
//! `<state-dir>/workloads.json` ([`registry`]; read per request, so `meshgate workload
//! register` applies at once). Requests without the `workload.spiffe.io: true` metadata get
//! `InvalidArgument`; a caller no registration matches gets `PermissionDenied` ("no identity
//! issued"), as SPIRE answers.
//!
//! `FetchX509SVID` streams one response per rotation: SVIDs (keys made by the CA, as SPIRE's
//! agent does, never written to disk; each issuance is in the ledger as
//! `operator:workload-api`) are cached per SPIFFE ID and reissued at half their lifetime.
//! `FetchX509Bundles` streams the trust domain's roots, again whenever they change.

pub mod authority;
pub mod proto;
pub mod registry;

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use crate::ca::{Ca, IssueRequest};
use crate::ledger::AuthorisedBy;
use crate::spiffe::SpiffeId;
use proto::X509Svid;
use registry::Caller;

/// The metadata every Workload API request must carry (SPIFFE Workload Endpoint spec).
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

const FETCH_X509_SVID: &str = "/SpiffeWorkloadAPI/FetchX509SVID";
const FETCH_X509_BUNDLES: &str = "/SpiffeWorkloadAPI/FetchX509Bundles";
/// How often an open bundle stream checks whether the roots changed.
const BUNDLE_POLL: Duration = Duration::from_secs(30);

/// gRPC status codes used here.
mod code {
    pub const OK: u32 = 0;
    pub const INVALID_ARGUMENT: u32 = 3;
    pub const PERMISSION_DENIED: u32 = 7;
    pub const UNIMPLEMENTED: u32 = 12;
    pub const UNAVAILABLE: u32 = 14;
}

/// Settings of the Workload API server.
#[derive(Debug, Clone)]
pub struct WorkloadApiConfig {
    /// The Unix socket path (created 0666: callers are told apart by their credentials).
    pub socket: PathBuf,
    /// TTL of the SVIDs it issues [default: the CA's default TTL].
    pub svid_ttl: Option<Duration>,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkloadApiError {
    #[error("cannot listen on {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{0} is in use by another process (a running meshgate?); stop it or choose another control.workload_api.socket"
    )]
    InUse(PathBuf),
    #[error("cannot start the Workload API thread: {0}")]
    Spawn(#[source] io::Error),
}

struct Cached {
    svid: X509Svid,
    refresh_at: OffsetDateTime,
}

struct Shared {
    ca: Arc<Ca>,
    svid_ttl: Option<Duration>,
    cache: Mutex<HashMap<String, Arc<Cached>>>,
}

/// A running server; [`WorkloadApiHandle::stop`] (or drop) stops it and removes the socket.
#[derive(Debug)]
pub struct WorkloadApiHandle {
    socket: PathBuf,
    stop: Option<tokio::sync::watch::Sender<bool>>,
    thread: Option<JoinHandle<()>>,
}

impl WorkloadApiHandle {
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(true);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
            let _ = std::fs::remove_file(&self.socket);
            tracing::info!(socket = %self.socket.display(), "Workload API stopped");
        }
    }
}

impl Drop for WorkloadApiHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Bind the socket and start serving.
pub fn start(ca: Arc<Ca>, cfg: WorkloadApiConfig) -> Result<WorkloadApiHandle, WorkloadApiError> {
    let path = cfg.socket.clone();
    let bind_err = |source| WorkloadApiError::Bind {
        path: path.clone(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(bind_err)?;
    }
    if path.exists() {
        // A socket nobody answers on is left over from a crash: replace it.
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            return Err(WorkloadApiError::InUse(path));
        }
        std::fs::remove_file(&path).map_err(bind_err)?;
    }
    let listener = std::os::unix::net::UnixListener::bind(&path).map_err(bind_err)?;
    listener.set_nonblocking(true).map_err(bind_err)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).map_err(bind_err)?;

    let shared = Arc::new(Shared {
        ca,
        svid_ttl: cfg.svid_ttl,
        cache: Mutex::new(HashMap::new()),
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let thread = std::thread::Builder::new()
        .name("meshgate-workload".into())
        .spawn(move || run(shared, listener, stop_rx))
        .map_err(WorkloadApiError::Spawn)?;
    tracing::info!(socket = %path.display(), "Workload API listening");
    Ok(WorkloadApiHandle {
        socket: path,
        stop: Some(stop_tx),
        thread: Some(thread),
    })
}

fn run(
    sh: Arc<Shared>,
    listener: std::os::unix::net::UnixListener,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the Workload API runtime");
            return;
        }
    };
    rt.block_on(async move {
        let listener = match tokio::net::UnixListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot use the Workload API socket");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        tokio::spawn(connection(sh.clone(), stream, stop.clone()));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "Workload API accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
    });
    rt.shutdown_timeout(Duration::from_millis(500));
}

fn caller_of(stream: &tokio::net::UnixStream) -> Option<Caller> {
    let cred = stream.peer_cred().ok()?;
    let pid = cred.pid();
    let exe = pid.and_then(|p| std::fs::read_link(format!("/proc/{p}/exe")).ok());
    Some(Caller {
        uid: cred.uid(),
        pid,
        exe,
    })
}

async fn connection(
    sh: Arc<Shared>,
    stream: tokio::net::UnixStream,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let Some(caller) = caller_of(&stream) else {
        tracing::warn!("Workload API: no peer credentials on a connection; closed it");
        return;
    };
    // The h2 server reads a pipe fed by the :authority fix-up (see [`authority`]); its output
    // is copied back to the client as is.
    let (client_read, mut client_write) = stream.into_split();
    let (server_io, proxy_io) = tokio::io::duplex(64 * 1024);
    let (mut proxy_read, proxy_write) = tokio::io::split(proxy_io);
    tokio::spawn(async move {
        if let Err(e) = authority::pump(client_read, proxy_write).await {
            tracing::debug!(error = %e, "Workload API: client stream ended");
        }
    });
    tokio::spawn(async move {
        let _ = tokio::io::copy(&mut proxy_read, &mut client_write).await;
    });
    let mut conn = match h2::server::handshake(server_io).await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "Workload API: HTTP/2 handshake failed");
            return;
        }
    };
    while let Some(next) = conn.accept().await {
        match next {
            Ok((req, respond)) => {
                tokio::spawn(request(
                    sh.clone(),
                    caller.clone(),
                    req,
                    respond,
                    stop.clone(),
                ));
            }
            Err(e) => {
                tracing::debug!(error = %e, "Workload API connection ended");
                return;
            }
        }
    }
}

fn grpc_headers(status: Option<(u32, &str)>) -> http::Response<()> {
    let mut b = http::Response::builder()
        .status(200)
        .header("content-type", "application/grpc");
    if let Some((code, message)) = status {
        b = b.header("grpc-status", code.to_string());
        if let Ok(v) = http::HeaderValue::from_str(message) {
            b = b.header("grpc-message", v);
        }
    }
    b.body(()).unwrap_or_default()
}

fn trailers(code: u32, message: &str) -> http::HeaderMap {
    let mut t = http::HeaderMap::new();
    if let Ok(v) = http::HeaderValue::from_str(&code.to_string()) {
        t.insert("grpc-status", v);
    }
    if !message.is_empty()
        && let Ok(v) = http::HeaderValue::from_str(message)
    {
        t.insert("grpc-message", v);
    }
    t
}

fn refuse(mut respond: SendResponse<Bytes>, code: u32, message: &str) {
    let _ = respond.send_response(grpc_headers(Some((code, message))), true);
}

async fn request(
    sh: Arc<Shared>,
    caller: Caller,
    req: http::Request<h2::RecvStream>,
    respond: SendResponse<Bytes>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let path = req.uri().path().to_owned();
    let secured = req
        .headers()
        .get(SECURITY_HEADER)
        .is_some_and(|v| v.as_bytes() == b"true");
    if !secured {
        tracing::warn!(uid = caller.uid, pid = ?caller.pid, %path, "Workload API: request without the workload.spiffe.io metadata refused");
        return refuse(
            respond,
            code::INVALID_ARGUMENT,
            "security header missing from request",
        );
    }
    let state_dir = sh.ca.state_dir().to_path_buf();
    let ids = match registry::list(&state_dir) {
        Ok(regs) => {
            let mut ids: Vec<SpiffeId> = Vec::new();
            for r in regs.into_iter().filter(|r| r.matches(&caller)) {
                if !ids.contains(&r.spiffe_id) {
                    ids.push(r.spiffe_id);
                }
            }
            ids
        }
        Err(e) => {
            tracing::error!(error = %e, "Workload API: cannot read the registrations");
            return refuse(respond, code::UNAVAILABLE, "registrations unreadable");
        }
    };
    let kind = match path.as_str() {
        FETCH_X509_SVID => Kind::Svid,
        FETCH_X509_BUNDLES => Kind::Bundles,
        _ => return refuse(respond, code::UNIMPLEMENTED, "method not implemented"),
    };
    if ids.is_empty() {
        tracing::warn!(uid = caller.uid, pid = ?caller.pid, exe = ?caller.exe, %path, "Workload API: no registration matches the caller");
        return refuse(respond, code::PERMISSION_DENIED, "no identity issued");
    }
    tracing::info!(uid = caller.uid, pid = ?caller.pid, exe = ?caller.exe, ids = ?ids.iter().map(ToString::to_string).collect::<Vec<_>>(), %path, "Workload API stream");
    stream(sh, ids, kind, respond, stop).await;
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Svid,
    Bundles,
}

/// One message and when to look again.
fn build(sh: &Shared, ids: &[SpiffeId], kind: Kind) -> Result<(Vec<u8>, Duration), String> {
    let crl = crl_der(sh);
    match kind {
        Kind::Svid => {
            let mut svids = Vec::with_capacity(ids.len());
            let mut next = OffsetDateTime::now_utc() + time::Duration::hours(1);
            for id in ids {
                let c = svid_for(sh, id)?;
                next = next.min(c.refresh_at);
                svids.push(c.svid.clone());
            }
            let wait = (next - OffsetDateTime::now_utc())
                .try_into()
                .unwrap_or(Duration::ZERO)
                .max(Duration::from_secs(1));
            Ok((proto::x509_svid_response(&svids, &crl), wait))
        }
        Kind::Bundles => {
            let b = sh.ca.bundle().map_err(|e| e.to_string())?;
            let roots = vec![(b.trust_domain.id_string(), b.x509_authorities.concat())];
            Ok((proto::x509_bundles_response(&roots, &crl), BUNDLE_POLL))
        }
    }
}

fn crl_der(sh: &Shared) -> Vec<Vec<u8>> {
    use rustls::pki_types::CertificateRevocationListDer;
    sh.ca
        .crl_pem()
        .ok()
        .and_then(|p| CertificateRevocationListDer::from_pem_slice(p.as_bytes()).ok())
        .map(|d| vec![d.as_ref().to_vec()])
        .unwrap_or_default()
}

/// The cached SVID of `id`, reissued past half its lifetime.
fn svid_for(sh: &Shared, id: &SpiffeId) -> Result<Arc<Cached>, String> {
    let mut cache = sh.cache.lock().unwrap_or_else(|p| p.into_inner());
    let now = OffsetDateTime::now_utc();
    if let Some(c) = cache.get(&id.to_string())
        && now < c.refresh_at
    {
        return Ok(c.clone());
    }
    let issued = sh
        .ca
        .issue(&IssueRequest {
            spiffe_id: id.clone(),
            dns_names: Vec::new(),
            ttl: sh.svid_ttl,
            authorised_by: AuthorisedBy::Operator("workload-api".into()),
        })
        .map_err(|e| format!("cannot issue {id}: {e}"))?;
    let chain: Vec<u8> = CertificateDer::pem_slice_iter(issued.chain_pem.as_bytes())
        .filter_map(Result::ok)
        .flat_map(|c| c.as_ref().to_vec())
        .collect();
    let key = PrivatePkcs8KeyDer::from_pem_slice(issued.key_pem.expose().as_bytes())
        .map_err(|e| format!("cannot encode the key of {id}: {e}"))?;
    let bundle = sh.ca.bundle().map_err(|e| e.to_string())?;
    let e = &issued.entry;
    let cached = Arc::new(Cached {
        svid: X509Svid {
            spiffe_id: id.to_string(),
            cert_chain: chain,
            key_pkcs8: key.secret_pkcs8_der().to_vec(),
            bundle: bundle.x509_authorities.concat(),
        },
        refresh_at: e.issued_at + (e.not_after - e.issued_at) / 2,
    });
    tracing::info!(spiffe_id = %id, serial = %e.serial, not_after = %crate::clock::rfc3339(e.not_after), "Workload API: issued an SVID");
    cache.insert(id.to_string(), cached.clone());
    Ok(cached)
}

async fn stream(
    sh: Arc<Shared>,
    ids: Vec<SpiffeId>,
    kind: Kind,
    mut respond: SendResponse<Bytes>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut send = match respond.send_response(grpc_headers(None), false) {
        Ok(s) => s,
        Err(_) => return,
    };
    let mut last: Option<Vec<u8>> = None;
    loop {
        let (s2, ids2) = (sh.clone(), ids.clone());
        let built = tokio::task::spawn_blocking(move || build(&s2, &ids2, kind)).await;
        let (msg, wait) = match built {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "Workload API: cannot build a response");
                let _ = send.send_trailers(trailers(
                    code::UNAVAILABLE,
                    "the CA cannot issue now; retry",
                ));
                return;
            }
            Err(_) => {
                let _ = send.send_trailers(trailers(code::UNAVAILABLE, "internal error"));
                return;
            }
        };
        if last.as_ref() != Some(&msg) {
            if send
                .send_data(Bytes::from(proto::grpc_frame(&msg)), false)
                .is_err()
            {
                return;
            }
            last = Some(msg);
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => {
                let _ = send.send_trailers(trailers(code::OK, ""));
                return;
            }
            _ = std::future::poll_fn(|cx| send.poll_reset(cx)) => return,
        }
    }
}
