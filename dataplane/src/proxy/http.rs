//! The HTTP/1.1 proxy pipeline for `http` listeners, one request at a time per connection:
//!
//! `listen::accept` -> read head (`http1::parse_request_resumable`, header-read timeout) ->
//! normalise path -> `route::resolve` ([`crate::http_route`]) -> direct response / redirect, or
//! `balance::pick` (weighted cluster, endpoint by the cluster's policy) -> `upstream::connect` (the shard's
//! keep-alive [`crate::pool`], else a new connection) -> send head, stream the request body and
//! the response both ways at once -> access log + metrics -> next request (keep-alive) or close.
//!
//! Memory: the head buffer grows only as the head arrives and is released whenever the
//! connection waits for its next request, so an idle keep-alive connection holds no buffer
//! (the receive waits on the shard's provided-buffer ring, which selects a buffer only when
//! data arrives). Bodies stream through in the ring's fixed buffers: a received buffer whose
//! bytes all belong to the body is sent on as is (no copy); only partial framing is copied.
//!
//! Strict framing comes from the codec: anything it refuses gets its status (400, 413, 414,
//! 431, 501, 505) with `connection: close`. A chunked body is checked as far as it was received
//! before anything goes upstream, so a malformed request that arrives in one piece reaches no
//! origin. Requests go upstream as HTTP/1.1 with the normalised path; a request body is sent
//! with the framing it arrived with (validated wire bytes); a chunked response to an HTTP/1.0
//! client is de-chunked and close-delimited. An HTTP/1.1 upgrade the route allows (WebSocket)
//! keeps its Upgrade field; after the upstream's 101 the connection is a byte relay
//! ([`upgrade`]).
//!
//! Failures before any response byte: connect refused 502 `UF`, connect timeout 504 `UF,UT`,
//! upstream closed 502 `UC`, bad response 502 `UPE`, no response within the route timeout 504
//! `UT`, a circuit breaker's limit 503 `UO`. Retries follow the route's `[routes.retry]` and
//! the cluster's retry budget ([`crate::retry`]): a connect failure may be retried for any
//! request (nothing was sent); once the head went out, only an idempotent request without a
//! body, and never after the response head reached the client. The last failure of several
//! attempts gets `URX`. HTTP/2 clusters run the same loop: each attempt is
//! [`h2_upstream::attempt`], whose outcome ([`Tried`]) goes through the same steps.

use std::borrow::Cow;
use std::cell::Cell;
use std::future::{Future, poll_fn};
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::ops::Deref;
use std::pin::{Pin, pin};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime};

use meshgate_config::{ClientAuth, RouteAction, UpstreamProtocol};
use smallvec::SmallVec;

use crate::accesslog::Record;
use crate::authz;
use crate::bufpool;
use crate::error::ProxyErrorKind;
use crate::http_route::{CompiledRoute, Edits, ListenerRoutes, RequestView, host_without_port};
use crate::http1::{
    BodyDecoder, ConnectionHeader, Framing, H1Error, HeadProgress, HeaderEdits, Limits, Method,
    Parsed, RequestEdits, RequestHead, ResponseEdits, ResponseHead, TargetForm, Version, Violation,
    encode_request, encode_response, normalize_path, parse_request_resumable,
    parse_response_resumable, split_query,
};
use crate::listen::ConnGuard;
use crate::metrics::{ClusterStats, ListenerStats, RequestRecord};
use crate::pool::{self, PoolKey, UpConn};
use crate::proxy::h2_upstream;
use crate::proxy::http_io::{HttpRead, HttpWrite, tls_split};
use crate::retry::{Attempts, Failure, Limit};
use crate::rt;
use crate::rt::IoBuf;
use crate::shard::ShardGen;
use crate::tls;
use crate::tls::spiffe::{SpiffeId, svid_identity};

mod upgrade;

/// Header edits per list: the config's 32 plus the gateway's own fields.
const MAX_EDITS: usize = 37;
/// Longest `x-request-id` kept from a client.
const MAX_REQUEST_ID: usize = 128;
/// After a response with `connection: close`, how long (and how many bytes) the client's
/// remaining input is read and dropped, so that closing does not reset the connection before
/// the client read the response.
const LINGER_TIME: Duration = Duration::from_secs(1);
const LINGER_BYTES: u64 = 256 * 1024;
/// While the request body is still arriving the response wait re-checks its deadline this
/// often (the route timeout starts when the request has been sent in full).
const RESPONSE_WAIT_SLICE: Duration = Duration::from_secs(1);
/// A keep-alive connection waiting for its next request notices a drain this quickly.
const IDLE_WAIT_SLICE: Duration = Duration::from_secs(1);

/// Serve one downstream connection of an `http` listener.
///
/// Not an `async fn`: the task's future is the request loop itself, with nothing around it
/// (an idle connection's memory is that future).
pub fn serve(
    guard: ConnGuard,
    stream: rt::TcpStream,
    peer: SocketAddr,
) -> impl Future<Output = ()> + 'static {
    let (rd, wr) = stream.into_split();
    serve_conn(guard, rd, wr, peer, None, Some(h2c))
}

/// h2c with prior knowledge: the connection started with the HTTP/2 preface. Boxed, so an
/// HTTP/1 connection's future stays as small as without HTTP/2.
fn h2c(
    guard: ConnGuard,
    rd: rt::ReadHalf,
    wr: rt::WriteHalf,
    buf: Vec<u8>,
    peer: SocketAddr,
) -> Pin<Box<dyn Future<Output = ()>>> {
    Box::pin(super::h2::serve(
        guard,
        super::h2::Pair { rd, wr },
        buf,
        peer,
        None,
    ))
}

/// Takes over a plain connection that starts with the HTTP/2 preface.
type H2cHandoff<R, W> =
    fn(ConnGuard, R, W, Vec<u8>, SocketAddr) -> Pin<Box<dyn Future<Output = ()>>>;

/// Serve one downstream connection of an `https` listener: `tls::secure` (the same handshake
/// as `tls` listeners: certificate by SNI, client auth, local-CA identity), then the same
/// request loop as `http` over the TLS session.
pub async fn serve_tls(guard: ConnGuard, stream: rt::TcpStream, peer: SocketAddr) {
    let snap = guard.snap.clone();
    let idx = guard.listener;
    let listener = &snap.config.listeners[idx];
    let lstats = &snap.listeners[idx].stats;
    let Some(state) = snap.listener_tls.get(idx).and_then(|s| s.clone()) else {
        tracing::error!(listener = %listener.name, "https listener without TLS state; closing");
        return;
    };
    let secured = match rt::timeout(listener.handshake_timeout, tls::secure(stream, &state)).await {
        Ok(Ok(secured)) => secured,
        Ok(Err(e)) => {
            e.count(&lstats.tls);
            tracing::debug!(listener = %listener.name, %peer, error = %e, reason = e.reason(), "TLS handshake failed");
            return;
        }
        Err(rt::Elapsed) => {
            lstats.tls.failed(tls::TIMEOUT_REASON, "unknown");
            tracing::debug!(listener = %listener.name, %peer, "TLS handshake timed out");
            return;
        }
    };
    secured.count(&lstats.tls, &state);
    let mtls = listener
        .tls
        .as_ref()
        .is_some_and(|t| t.client_auth != ClientAuth::None);
    let xfcc = secured.peer.as_ref().map(|id| {
        let conn = secured.stream.get_ref().1;
        let by = state
            .certs
            .select(secured.sni.as_deref())
            .and_then(|c| c.certified.cert.first())
            .and_then(|leaf| svid_identity(leaf).ok());
        let hash = conn
            .peer_certificates()
            .and_then(|chain| chain.first())
            .map(|leaf| ring::digest::digest(&ring::digest::SHA256, leaf.as_ref()));
        let mut out = String::with_capacity(200);
        if let Some(by) = by {
            let _ = std::fmt::Write::write_fmt(&mut out, format_args!("By={};", by.as_str()));
        }
        if let Some(hash) = hash {
            out.push_str("Hash=");
            for b in hash.as_ref() {
                let _ = std::fmt::Write::write_fmt(&mut out, format_args!("{b:02x}"));
            }
            out.push(';');
        }
        out.push_str("URI=");
        out.push_str(id.as_str());
        out
    });
    let alpn_h2 = secured.alpn.as_deref() == Some(b"h2");
    let info = TlsInfo {
        sni: secured.sni,
        version: secured.version.map(version_str),
        peer: secured.peer,
        xfcc,
        mtls,
    };
    let info = Rc::new(info);
    if alpn_h2 {
        Box::pin(super::h2::serve(
            guard,
            secured.stream,
            Vec::new(),
            peer,
            Some(info),
        ))
        .await;
        return;
    }
    let (rd, wr) = tls_split(secured.stream);
    serve_conn(guard, rd, wr, peer, Some(info), None).await;
}

fn version_str(v: rustls::ProtocolVersion) -> &'static str {
    match v {
        rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3",
        rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2",
        _ => "TLS",
    }
}

/// What the TLS handshake of an `https` connection learnt, for routing, headers and the log.
#[derive(Debug)]
pub(crate) struct TlsInfo {
    /// Lowercase, as the client sent it.
    sni: Option<String>,
    version: Option<&'static str>,
    /// The verified client identity.
    pub(crate) peer: Option<SpiffeId>,
    /// `x-forwarded-client-cert` for requests of this connection (with a verified peer).
    xfcc: Option<String>,
    /// The listener verifies clients: a request must name the host it connected for (SNI).
    mtls: bool,
}

/// The request loop of one downstream connection (plain or TLS).
/// `h2c`: where a connection that starts with the HTTP/2 preface goes (plain `http` only).
async fn serve_conn<R: HttpRead, W: ClientOut>(
    guard: ConnGuard,
    rd: R,
    wr: W,
    peer: SocketAddr,
    tls: Option<Rc<TlsInfo>>,
    h2c: Option<H2cHandoff<R, W>>,
) {
    let mut conn = Conn {
        rd,
        wr,
        buf: Vec::new(),
        progress: HeadProgress::default(),
        peer,
        served: 0,
        tls,
        proto: "HTTP/1.1",
    };
    let draining = &guard.shard.shared.draining;
    let linger = loop {
        // Waiting for a request is all an idle connection does: this future stays small. The
        // work on a request (and its state across awaits) is boxed, for that request only.
        let read = {
            let snap = guard.request_snap();
            let Some(routes) = snap.http.listener(guard.listener) else {
                tracing::error!(listener = %snap.listener_names[guard.listener], "http listener without compiled routes; closing");
                break false;
            };
            let lstats = &*snap.listeners[guard.listener].stats;
            let head_deadline =
                (conn.served == 0).then(|| guard.accepted_at + routes.request_timeout);
            read_head(&mut conn, routes, head_deadline, draining, lstats).await
        };
        if matches!(read.result, Err(HeadError::H2Preface))
            && let Some(h2c) = h2c
        {
            // Nothing of the HTTP/1 loop stays alive in its state while HTTP/2 runs.
            drop(read);
            h2c(guard, conn.rd, conn.wr, conn.buf, peer).await;
            return;
        }
        // Each request takes the generation current when its head arrived: route, cluster
        // and policy changes apply to open connections too (see `ConnGuard::request_snap`).
        let snap = guard.request_snap();
        let Some(routes) = snap.http.listener(guard.listener) else {
            break false;
        };
        // Written straight into its box: built on the stack and moved, the request's
        // future (several KiB) cost a copy per request.
        let fut = Box::write(
            Box::new_uninit(),
            request(&guard, &snap, routes, &mut conn, read),
        );
        match Box::into_pin(fut).await {
            Next::KeepAlive => {}
            Next::Close { linger } => break linger,
        }
    };
    if linger {
        lingering_close(&mut conn).await;
    }
    drop(conn);
    drop(guard);
}

/// The client side of a connection (HTTP/1), or of one HTTP/2 stream.
pub(crate) struct Conn<R, W> {
    pub(crate) rd: R,
    pub(crate) wr: W,
    /// Bytes received and not yet used: a head being read, or the start of a body or of the
    /// next (pipelined) request. Empty, and without capacity, while the connection is idle.
    pub(crate) buf: Vec<u8>,
    pub(crate) progress: HeadProgress,
    pub(crate) peer: SocketAddr,
    /// Requests read so far.
    pub(crate) served: u64,
    /// `https`: the session's facts; `None` on plain `http`.
    pub(crate) tls: Option<Rc<TlsInfo>>,
    /// For the access log: `HTTP/1.1` or `HTTP/2`.
    pub(crate) proto: &'static str,
}

/// What the connection does after a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    KeepAlive,
    /// `linger`: the client may still be sending (an unread body, a refused head), so its
    /// input is drained for a moment before the socket closes.
    Close {
        linger: bool,
    },
}

/// One request's record, for the access log and the counters. Shared by the stages of the
/// request (and the two directions of an exchange), so what changes is in cells.
pub(crate) struct Exchange {
    /// The access log's start time is derived from this at the end (`SystemTime::now() -
    /// elapsed`): one clock read per request less when no log is configured.
    pub(crate) started: Instant,
    status: Cell<u16>,
    flags: Cell<&'static str>,
    received: Cell<u64>,
    sent: Cell<u64>,
    route: Cell<Option<usize>>,
    cluster: Cell<Option<usize>>,
    pub(crate) upstream_host: Cell<Option<SocketAddr>>,
    /// Upstream attempts made (0: none).
    attempts: Cell<u32>,
    /// The gRPC status the client was given (HTTP/2 gRPC requests).
    grpc_status: Cell<Option<u16>>,
    /// Filled only when an access log is configured.
    log: Option<LogFields>,
}

#[derive(Default)]
struct LogFields {
    method: String,
    path: String,
    authority: Option<String>,
    user_agent: Option<String>,
    x_forwarded_for: Option<String>,
    request_id: Option<String>,
    /// Why the gateway answered itself, in Envoy's words (e.g. an RBAC refusal).
    response_code_details: Option<String>,
}

impl Exchange {
    fn new() -> Exchange {
        Exchange {
            started: rt::now(),
            status: Cell::new(0),
            flags: Cell::new("-"),
            received: Cell::new(0),
            sent: Cell::new(0),
            route: Cell::new(None),
            cluster: Cell::new(None),
            upstream_host: Cell::new(None),
            attempts: Cell::new(0),
            grpc_status: Cell::new(None),
            log: None,
        }
    }

    pub(crate) fn answer(&self, status: u16, flags: &'static str) {
        self.status.set(status);
        self.flags.set(flags);
    }
}

/// Byte counters of one request: the listener's, the cluster's and the exchange's own.
pub(crate) struct Meters<'a> {
    listener: &'a ListenerStats,
    cluster: Option<&'a ClusterStats>,
    ex: &'a Exchange,
}

impl Meters<'_> {
    pub(crate) fn client_in(&self, n: usize) {
        self.listener.bytes_in.add(n as u64);
        self.ex.received.set(self.ex.received.get() + n as u64);
    }
    pub(crate) fn client_out(&self, n: usize) {
        self.listener.bytes_out.add(n as u64);
        self.ex.sent.set(self.ex.sent.get() + n as u64);
    }
    pub(crate) fn upstream_out(&self, n: usize) {
        if let Some(c) = self.cluster {
            c.bytes_sent.add(n as u64);
        }
    }
    pub(crate) fn upstream_in(&self, n: usize) {
        if let Some(c) = self.cluster {
            c.bytes_received.add(n as u64);
        }
    }
}

/// Route and answer one request whose head was read.
pub(crate) async fn request<R: HttpRead, W: ClientOut>(
    guard: &ConnGuard,
    snap: &Rc<ShardGen>,
    routes: &ListenerRoutes,
    conn: &mut Conn<R, W>,
    read: HeadRead,
) -> Next {
    let lstats = &*snap.listeners[guard.listener].stats;
    let draining = &guard.shard.shared.draining;
    let mut ex = Exchange::new();
    ex.received.set(read.bytes);
    let meters = Meters {
        listener: lstats,
        cluster: None,
        ex: &ex,
    };
    let (head, head_len) = match read.result {
        Ok(x) => x,
        Err(HeadError::Closed | HeadError::H2Preface) => return Next::Close { linger: false },
        Err(HeadError::Timeout) => {
            ex.answer(408, "-");
            local(conn, &meters, Version::Http11, false, None).await;
            finish(
                guard,
                snap,
                routes,
                None,
                &ex,
                conn.peer,
                conn.tls.as_deref(),
                conn.proto,
            );
            return Next::Close { linger: true };
        }
        Err(HeadError::Invalid(e)) => {
            tracing::debug!(listener = %snap.listener_names[guard.listener], peer = %conn.peer, error = %e, "request refused");
            ex.answer(e.status(), e.response_flag().unwrap_or("-"));
            local(conn, &meters, Version::Http11, false, None).await;
            ex.grpc_status.set(conn.wr.grpc_status());
            finish(
                guard,
                snap,
                routes,
                None,
                &ex,
                conn.peer,
                conn.tls.as_deref(),
                conn.proto,
            );
            return Next::Close { linger: true };
        }
    };
    conn.served += 1;
    let log_on = guard.shard.access_log.is_some();
    let planned = plan(
        snap,
        guard.listener,
        routes,
        conn,
        &head,
        log_on,
        draining,
        &mut ex,
    );
    // A consistent-hash cluster's key, read while the head is still there.
    let header_hash = match &planned {
        Plan::Forward { route, .. } => snap.route_hash_header[route.index]
            .as_deref()
            .and_then(|h| head.header(&conn.buf, h))
            .map(crate::balance::hash_bytes),
        Plan::Local { .. } => None,
    };
    // The head's bytes are no longer needed: what follows is body or the next request.
    conn.buf.drain(..head_len);
    let body_done = head_body_done(&head);
    let meters = Meters {
        listener: lstats,
        cluster: None,
        ex: &ex,
    };
    let (next, route) = match planned {
        Plan::Local {
            route,
            flags,
            response,
            keep_alive,
        } => {
            ex.route.set(route.map(|r| r.index));
            ex.answer(response.status, flags);
            let ok = write_client(conn, &meters, &response).await;
            let next = if ok && keep_alive {
                Next::KeepAlive
            } else {
                Next::Close {
                    linger: ok && !body_done,
                }
            };
            (next, route)
        }
        Plan::Forward {
            route,
            upstream_head,
            upgrade,
        } => {
            ex.route.set(Some(route.index));
            let req = ReqInfo {
                method: head.method(),
                version: head.version(),
                keep_alive: head.keep_alive(),
                decoder: head.body_decoder(&Limits::default()),
                header_hash,
                upgrade,
            };
            let next = forward(guard, snap, routes, route, conn, req, upstream_head, &ex).await;
            (next, Some(route))
        }
    };
    ex.grpc_status.set(conn.wr.grpc_status());
    finish(
        guard,
        snap,
        routes,
        route,
        &ex,
        conn.peer,
        conn.tls.as_deref(),
        conn.proto,
    );
    if next == Next::KeepAlive && conn.buf.is_empty() {
        // Idle from here: hold no buffer (the shard keeps it for the next request).
        bufpool::give(std::mem::take(&mut conn.buf));
    }
    next
}

fn head_body_done(head: &RequestHead) -> bool {
    matches!(head.framing(), Framing::None | Framing::Length(0))
}

pub(crate) enum HeadError {
    /// The client closed (or reset) the connection, or stayed idle: close quietly.
    Closed,
    /// A head was started but not finished in time: 408.
    Timeout,
    Invalid(H1Error),
    /// The first bytes of a plain connection are the HTTP/2 connection preface.
    H2Preface,
}

pub(crate) struct HeadRead {
    pub(crate) result: Result<(RequestHead, usize), HeadError>,
    pub(crate) bytes: u64,
}

/// The HTTP/2 connection preface (RFC 9113 section 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// `buf` is a strict prefix of the preface (more bytes decide).
fn is_preface_prefix(buf: &[u8]) -> bool {
    buf.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(buf)
}

/// Read until a complete head is in `conn.buf`. `deadline`: on a new connection, the time the
/// whole first head must have arrived by; otherwise the wait for the first byte is the
/// keep-alive idle wait, and the head must be complete `request_timeout` after that byte.
async fn read_head<R: HttpRead, W>(
    conn: &mut Conn<R, W>,
    routes: &ListenerRoutes,
    deadline: Option<Instant>,
    draining: &AtomicBool,
    lstats: &ListenerStats,
) -> HeadRead {
    let mut bytes = 0u64;
    let mut started = !conn.buf.is_empty();
    let mut deadline = match (started, deadline) {
        (true, None) => Some(rt::now() + routes.request_timeout),
        (_, d) => d,
    };
    let idle_until = rt::now() + routes.idle_timeout;
    loop {
        if started && conn.served == 0 && conn.tls.is_none() && conn.buf.starts_with(H2_PREFACE) {
            return HeadRead {
                result: Err(HeadError::H2Preface),
                bytes,
            };
        }
        if started && !(conn.served == 0 && conn.tls.is_none() && is_preface_prefix(&conn.buf)) {
            match parse_request_resumable(&conn.buf, &routes.limits, &mut conn.progress) {
                Ok(Parsed::Complete { head, consumed }) => {
                    return HeadRead {
                        result: Ok((head, consumed)),
                        bytes,
                    };
                }
                Ok(Parsed::Partial) => {}
                Err(e) => {
                    return HeadRead {
                        result: Err(HeadError::Invalid(e)),
                        bytes,
                    };
                }
            }
        }
        let now = rt::now();
        let wait = match deadline {
            Some(d) => d.saturating_duration_since(now),
            None => idle_until
                .saturating_duration_since(now)
                .min(IDLE_WAIT_SLICE),
        };
        if wait.is_zero() {
            let result = Err(if started {
                HeadError::Timeout
            } else {
                HeadError::Closed
            });
            return HeadRead { result, bytes };
        }
        match rt::timeout(wait, conn.rd.recv_buf()).await {
            Err(rt::Elapsed) => {
                // Idle between requests: give up at a drain; else re-check the deadlines.
                if !started && deadline.is_none() && draining.load(Ordering::Acquire) {
                    return HeadRead {
                        result: Err(HeadError::Closed),
                        bytes,
                    };
                }
            }
            Ok(Ok(Some(rb))) => {
                bytes += rb.len() as u64;
                lstats.bytes_in.add(rb.len() as u64);
                if conn.buf.capacity() == 0 {
                    conn.buf = bufpool::take(rb.len().max(1024));
                }
                conn.buf.extend_from_slice(&rb);
                if !started {
                    started = true;
                    deadline.get_or_insert_with(|| rt::now() + routes.request_timeout);
                }
            }
            Ok(Ok(None)) | Ok(Err(_)) => {
                return HeadRead {
                    result: Err(HeadError::Closed),
                    bytes,
                };
            }
        }
    }
}

/// What to do with a parsed request.
enum Plan<'r> {
    /// Answer from the gateway (no route, direct response, redirect, refused request).
    Local {
        route: Option<&'r CompiledRoute>,
        flags: &'static str,
        response: LocalResp<'r>,
        keep_alive: bool,
    },
    Forward {
        route: &'r CompiledRoute,
        upstream_head: Vec<u8>,
        /// The protocol the request switches to, when its Upgrade is forwarded.
        upgrade: Option<&'r str>,
    },
}

/// Route the request in `conn.buf` and prepare its answer or its upstream head. Synchronous:
/// nothing here waits, so the head's borrows of the buffer end before any I/O.
#[allow(clippy::too_many_arguments)] // one request's context; a struct would only rename it
fn plan<'r, R, W>(
    snap: &'r ShardGen,
    listener: usize,
    routes: &'r ListenerRoutes,
    conn: &Conn<R, W>,
    head: &RequestHead,
    log_on: bool,
    draining: &AtomicBool,
    ex: &mut Exchange,
) -> Plan<'r> {
    let buf = &conn.buf[..];
    let version = head.version();
    let keep_alive = head.keep_alive() && head_body_done(head) && !draining.load(Ordering::Acquire);
    let target = head.path(buf);
    if log_on {
        ex.log = Some(LogFields {
            method: head.method_str(buf).to_owned(),
            path: target.to_owned(),
            authority: head.host(buf).map(str::to_owned),
            user_agent: head
                .header(buf, "user-agent")
                .map(|v| String::from_utf8_lossy(v).into_owned()),
            ..LogFields::default()
        });
    }
    let refuse = |status: u16, flags: &'static str| Plan::Local {
        route: None,
        flags,
        response: LocalResp::status(status, version, false),
        keep_alive: false,
    };
    if head.method() == Method::Connect {
        return refuse(405, "-");
    }
    let normalized: Cow<'_, str> = if head.target_form() == TargetForm::Asterisk {
        Cow::Borrowed("*")
    } else {
        match normalize_path(target.as_bytes()) {
            Ok(p) => p,
            Err(e) => return refuse(e.status(), e.response_flag().unwrap_or("-")),
        }
    };
    let tls = conn.tls.as_deref();
    let view = RequestView {
        host: head.host(buf).map(host_without_port),
        path: &normalized,
        method: head.method_str(buf),
        head,
        buf,
        sni: tls.and_then(|t| t.sni.as_deref()),
        peer: tls.and_then(|t| t.peer.as_ref()),
    };
    let head_only = head.method() == Method::Head;
    // A client verified for one name must not reuse its connection for another host (the
    // certificate chosen by SNI, and the client's authorisation, were for that name).
    if let Some(t) = tls
        && t.mtls
        && let (Some(sni), Some(host)) = (t.sni.as_deref(), view.host)
        && !host.eq_ignore_ascii_case(sni)
    {
        return Plan::Local {
            route: None,
            flags: "-",
            response: LocalResp {
                head_only,
                ..LocalResp::status(421, version, keep_alive)
            },
            keep_alive,
        };
    }
    if let Some(policies) = &routes.policies
        && let Err(denied) = policies.check_request(&view, conn.peer)
    {
        if let Some(log) = ex.log.as_mut() {
            log.response_code_details = Some(denied.details());
        }
        return Plan::Local {
            route: None,
            flags: "-",
            response: LocalResp {
                head_only,
                body: authz::DENIED_BODY,
                ..LocalResp::status(403, version, keep_alive)
            },
            keep_alive,
        };
    }
    let Some(route) = routes.select(&view) else {
        return Plan::Local {
            route: None,
            flags: "NR",
            response: LocalResp {
                head_only,
                ..LocalResp::status(404, version, keep_alive)
            },
            keep_alive,
        };
    };
    let answer = |status: u16, body: &'r [u8], location: Option<&'r [u8]>| Plan::Local {
        route: Some(route),
        flags: "-",
        response: LocalResp {
            status,
            version,
            keep_alive,
            head_only,
            body,
            location,
            edits: Some(&route.response_edits),
        },
        keep_alive,
    };
    match &snap.config.routes[route.index].action {
        RouteAction::DirectResponse { status, body } => {
            return answer(*status, body.as_bytes(), None);
        }
        RouteAction::Redirect { location, status } => {
            return answer(*status, b"", Some(location.as_bytes()));
        }
        RouteAction::Forward { .. } => {}
    }

    // The path sent upstream: rewritten, or normalised, with the query as received.
    let (_, query) = split_query(target.as_bytes());
    let new_path = match (route.rewrite(&normalized), &normalized) {
        (Some(p), _) => Some(p),
        (None, Cow::Owned(p)) => Some(p.clone()),
        (None, Cow::Borrowed(_)) => None,
    }
    .map(|mut p| {
        if let Some(q) = query {
            p.push('?');
            p.push_str(&String::from_utf8_lossy(q));
        }
        p
    });

    // The gateway's own fields: x-forwarded-for gets the peer appended, x-request-id is kept
    // when sane and made up otherwise.
    let mut xff = bufpool::take(64);
    for (name, value) in head.headers(buf) {
        if name.eq_ignore_ascii_case("x-forwarded-for") {
            if !xff.is_empty() {
                xff.extend_from_slice(b", ");
            }
            xff.extend_from_slice(value);
        }
    }
    if !xff.is_empty() {
        xff.extend_from_slice(b", ");
    }
    push_ip(&mut xff, conn.peer.ip().to_canonical());
    let kept_id = head.header(buf, "x-request-id").filter(|v| {
        !v.is_empty() && v.len() <= MAX_REQUEST_ID && v.iter().all(|b| (0x21..=0x7e).contains(b))
    });
    let new_id = kept_id.is_none().then(request_id);
    if let Some(log) = ex.log.as_mut() {
        log.x_forwarded_for = Some(String::from_utf8_lossy(&xff).into_owned());
        let id: &[u8] = match (&new_id, kept_id) {
            (Some(id), _) => id,
            (None, id) => id.unwrap_or_default(),
        };
        log.request_id = Some(String::from_utf8_lossy(id).into_owned());
    }

    let mut edits = EditSet::new(&route.request_edits);
    if !route.overrides.forwarded_for {
        edits.set("x-forwarded-for", &xff);
    }
    if !route.overrides.forwarded_proto {
        edits.set(
            "x-forwarded-proto",
            if tls.is_some() { b"https" } else { b"http" },
        );
    }
    // Never the client's own: only the gateway states what it verified.
    if !route.overrides.client_cert {
        match tls.and_then(|t| t.xfcc.as_deref()) {
            Some(xfcc) => edits.set("x-forwarded-client-cert", xfcc.as_bytes()),
            None => edits.remove("x-forwarded-client-cert"),
        }
    }
    if !route.overrides.request_id
        && let Some(id) = &new_id
    {
        edits.set("x-request-id", id);
    }
    // WebSocket and other upgrades the route allows (HTTP/1.1 clients only).
    let upgrade = if head.is_upgrade() && conn.proto == "HTTP/1.1" {
        upgrade::allowed(&route.upgrades, head, buf)
    } else {
        None
    };
    // An HTTP/1.0 request may come without Host; upstreams want one: the address the client
    // connected to.
    let fallback_host = (route.host_rewrite.is_none() && head.host(buf).is_none())
        .then(|| snap.config.listeners[listener].address.to_string());
    let mut upstream_head = bufpool::take(buf.len() / 2 + 256);
    let encoded = encode_request(
        head,
        buf,
        &RequestEdits {
            headers: edits.headers(),
            path: new_path.as_deref().map(str::as_bytes),
            host: route
                .host_rewrite
                .as_deref()
                .or(fallback_host.as_deref().map(str::as_bytes)),
            framing: None,
            connection: Some(if upgrade.is_some() {
                ConnectionHeader::Upgrade
            } else {
                ConnectionHeader::Persist
            }),
        },
        &mut upstream_head,
    );
    drop(edits);
    bufpool::give(xff);
    match encoded {
        Ok(()) => Plan::Forward {
            route,
            upstream_head,
            upgrade,
        },
        // A path that cannot be sent (a raw '#' in the query) is the client's fault; an edit
        // that cannot be written is ours.
        Err(e @ H1Error::Edit(Violation::InvalidPath)) => {
            tracing::debug!(error = %e, "request path cannot be forwarded");
            refuse(400, "DPE")
        }
        Err(e) => {
            tracing::error!(route = %snap.route_names[route.index], error = %e, "cannot encode the upstream request");
            Plan::Local {
                route: Some(route),
                flags: "-",
                response: LocalResp::status(500, version, false),
                keep_alive: false,
            }
        }
    }
}

/// What the forwarding stage needs of the request once its head bytes are gone.
pub(crate) struct ReqInfo<'r> {
    pub(crate) method: Method,
    pub(crate) version: Version,
    pub(crate) keep_alive: bool,
    pub(crate) decoder: BodyDecoder,
    /// Hash of the header a `maglev` cluster of the route hashes on, when present.
    pub(crate) header_hash: Option<u64>,
    /// Forwarded with its Upgrade field (to this protocol).
    upgrade: Option<&'r str>,
}

/// Why an upstream attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UpFail {
    ConnectRefused,
    ConnectTimeout,
    /// Closed or reset before the response was complete.
    Closed,
    /// No (complete) response within the route timeout.
    Timeout,
    /// A response the codec refuses.
    Protocol,
    /// Every endpoint of the cluster is unhealthy or ejected.
    NoHealthy,
    /// No response head within the route's `per_try_timeout`.
    PerTryTimeout,
    /// A response whose status the retry policy retries, and a retry was granted (the
    /// response is dropped, never relayed).
    RetryStatus,
    /// A circuit breaker of the cluster refused the request.
    Overflow,
}

impl UpFail {
    pub(crate) fn status(self) -> u16 {
        match self {
            UpFail::ConnectTimeout | UpFail::Timeout | UpFail::PerTryTimeout => 504,
            UpFail::ConnectRefused | UpFail::Closed | UpFail::Protocol | UpFail::RetryStatus => 502,
            UpFail::NoHealthy | UpFail::Overflow => 503,
        }
    }

    /// Envoy flags; `retried`: a retry was made and this is how the last attempt failed.
    pub(crate) fn flags(self, retried: bool) -> &'static str {
        match (self, retried) {
            (UpFail::ConnectRefused, false) => "UF",
            (UpFail::ConnectRefused, true) => "UF,URX",
            (UpFail::ConnectTimeout, false) => "UF,UT",
            (UpFail::ConnectTimeout, true) => "UF,UT,URX",
            (UpFail::Closed, false) => "UC",
            (UpFail::Closed, true) => "UC,URX",
            (UpFail::Timeout, false) => "UT",
            (UpFail::Timeout, true) => "UT,URX",
            (UpFail::Protocol, false) => "UPE",
            (UpFail::Protocol, true) => "UPE,URX",
            (UpFail::NoHealthy, false) => "UH",
            (UpFail::NoHealthy, true) => "UH,URX",
            (UpFail::PerTryTimeout, false) => "UT",
            (UpFail::PerTryTimeout, true) => "UT,URX",
            (UpFail::RetryStatus, _) => "URX",
            (UpFail::Overflow, _) => "UO",
        }
    }
}

/// The policy of routes without `http` settings (none reach here; a safe fallback).
static DEFAULT_RETRY: std::sync::LazyLock<meshgate_config::RetryPolicy> =
    std::sync::LazyLock::new(meshgate_config::RetryPolicy::default_policy);

/// A circuit breaker refused the request: 503 `UO`, nothing sent upstream.
async fn overflow<R: HttpRead, W: ClientOut>(
    conn: &mut Conn<R, W>,
    meters: &Meters<'_>,
    cstats: &ClusterStats,
    limit: Limit,
    req: &ReqInfo<'_>,
    body_done: bool,
) -> Next {
    cstats.overflow[limit as usize].inc();
    meters
        .ex
        .answer(UpFail::Overflow.status(), UpFail::Overflow.flags(false));
    let keep = req.keep_alive && body_done;
    let ok = local(conn, meters, req.version, keep, None).await;
    if ok && keep {
        Next::KeepAlive
    } else {
        Next::Close {
            linger: ok && !body_done,
        }
    }
}

/// `balance::pick` -> `upstream::connect` -> exchange, retried as the route's
/// `[routes.retry]` and the cluster's retry budget allow (`crate::retry`).
#[allow(clippy::too_many_arguments)] // the stages of one request; a struct would only rename them
async fn forward<R: HttpRead, W: ClientOut>(
    guard: &ConnGuard,
    snap: &Rc<ShardGen>,
    routes: &ListenerRoutes,
    route: &CompiledRoute,
    conn: &mut Conn<R, W>,
    mut req: ReqInfo<'_>,
    upstream_head: Vec<u8>,
    ex: &Exchange,
) -> Next {
    let lstats = &*snap.listeners[guard.listener].stats;
    let mut meters = Meters {
        listener: lstats,
        cluster: None,
        ex,
    };
    let body_done = req.decoder.is_done();
    // The client connection after a local answer: usable only if the body was read.
    let keep_alive = req.keep_alive;
    let after_local = move |ok: bool, req_done: bool| answered(ok, keep_alive, req_done);
    let RouteAction::Forward { clusters } = &snap.config.routes[route.index].action else {
        ex.answer(500, "-");
        let ok = local(conn, &meters, req.version, false, None).await;
        return after_local(ok, false);
    };
    let Some(target) = clusters.get(snap.route_pickers[route.index].pick()) else {
        ex.answer(500, "-");
        let ok = local(conn, &meters, req.version, false, None).await;
        return after_local(ok, false);
    };
    let cluster = target.cluster_index;
    ex.cluster.set(Some(cluster));
    let ccfg = &snap.config.clusters[cluster];
    let cstats: &Arc<ClusterStats> = &snap.clusters[cluster];
    meters.cluster = Some(cstats);
    // TLS origination (verified, with the gateway's identity) for clusters with
    // [clusters.tls]; pooled apart from every other identity.
    let cluster_tls = snap.cluster_tls.get(cluster).and_then(Option::as_deref);
    // The part of the body that already arrived (all of a small request) is checked before
    // anything goes upstream: a malformed chunked body reaches no origin.
    let mut probe = req.decoder.clone();
    let mut at = 0;
    while !probe.is_done() && at < conn.buf.len() {
        match probe.decode(&conn.buf[at..]) {
            Ok(d) if d.consumed > 0 => at += d.consumed,
            Ok(_) => break,
            Err(e) => {
                tracing::debug!(peer = %conn.peer, error = %e, "request body refused");
                ex.answer(e.status(), e.response_flag().unwrap_or("-"));
                let ok = local(conn, &meters, req.version, false, None).await;
                return after_local(ok, false);
            }
        }
    }
    // Retries: a request whose head went upstream is sent again only when it is idempotent
    // and has no body (nothing to replay); one refused at connect always may be.
    let policy = snap.config.routes[route.index]
        .http
        .as_ref()
        .map_or(&*DEFAULT_RETRY, |h| &h.retry);
    let breaker = &*snap.breakers[cluster];
    let limits = &ccfg.circuit_breakers;
    let _in_flight = match breaker.request(limits) {
        Ok(slot) => slot,
        Err(limit) => return overflow(conn, &meters, cstats, limit, &req, body_done).await,
    };
    let attempts = Attempts::new(
        policy,
        ccfg.retry_budget,
        cstats,
        req.method.is_idempotent() && body_done,
    );
    // HTTP/2 clusters take the same attempt loop; only the exchange differs. Boxed, like the
    // HTTP/2 attempt itself: the connection's future (what an idle connection costs) keeps
    // the size the HTTP/1.1 path needs.
    let mut h2: Option<Box<h2_upstream::Prepared>> = None;
    if ccfg.protocol == UpstreamProtocol::Http2 {
        match h2_upstream::Prepared::new(&upstream_head, cluster_tls.is_some()) {
            Ok(p) => {
                let p = p.with_deadline(conn.wr.grpc_timeout(), ex, route.timeout, &attempts);
                h2 = Some(Box::new(p));
            }
            Err(status) => {
                ex.answer(status, "DPE");
                let ok = local(conn, &meters, req.version, false, None).await;
                return after_local(ok, false);
            }
        }
    }
    let mut head_bytes = upstream_head;
    let picker = &snap.balancers[cluster];
    let hash_key = picker.hash_key(
        req.header_hash,
        conn.peer,
        conn.tls.as_deref().and_then(|t| t.peer.as_ref()),
    );
    let fail = loop {
        // The balancer's choice; a retry goes to an endpoint not tried yet where there is one.
        let Some(index) = attempts.endpoint(picker, hash_key) else {
            break UpFail::NoHealthy;
        };
        let endpoint = ccfg.endpoints[index];
        let _in_flight = picker.begin(index);
        ex.attempts.set(attempts.made() as u32);
        ex.upstream_host.set(Some(endpoint));
        // The route timeout covers every attempt.
        let timeout = match attempts.time_left(Instant::now()) {
            None => route.timeout,
            Some(left) if left.is_zero() => break UpFail::Timeout,
            Some(left) => left,
        };
        let rctx = RespCtx {
            method: req.method,
            version: req.version,
            client_keep_alive: req.keep_alive,
            edits: &route.response_edits,
            timeout,
            draining: &guard.shard.shared.draining,
            per_try: attempts.per_try_timeout(),
            retry: Some(&attempts),
            upgrade: req.upgrade,
        };
        let key = PoolKey::new(endpoint, cluster_tls);
        if let Some(h2) = &mut h2 {
            let target = h2_upstream::Target {
                endpoint,
                connect_timeout: ccfg.connect_timeout,
                stats: cstats,
                tls: cluster_tls,
                breaker,
                limits,
            };
            let tried = h2_upstream::attempt(
                &guard.shard.h2_pool,
                key,
                &target,
                h2,
                &head_bytes,
                conn,
                &mut req,
                &rctx,
                routes.request_timeout,
                ex,
                &meters,
            );
            match Box::pin(tried).await {
                Tried::Responded { status, next } => {
                    responded(picker, index, status, &attempts, ex);
                    return next;
                }
                Tried::Answered(next) => return next,
                Tried::ConnectFailed { timed_out } => {
                    match connect_failed(&attempts, picker, index, timed_out).await {
                        Ok(()) => continue,
                        Err(f) => break f,
                    }
                }
                Tried::Overflow(limit) => {
                    cstats.overflow[limit as usize].inc();
                    break UpFail::Overflow;
                }
                Tried::Refused => {
                    if attempts.retry(Failure::Refused) {
                        attempts.backoff().await;
                        continue;
                    }
                    break UpFail::Closed;
                }
                Tried::Failed(f, at) => {
                    let failed =
                        upstream_failed(conn, &meters, &req, &attempts, picker, index, f, at);
                    match failed.await {
                        Some(next) => return next,
                        None => continue,
                    }
                }
            }
        }
        let mut up = match guard.shard.http_pool.take(&key, cstats) {
            Some(up) => up,
            None => {
                let pending = match breaker.connect(limits) {
                    Ok(slot) => slot,
                    Err(limit) => {
                        cstats.overflow[limit as usize].inc();
                        break UpFail::Overflow;
                    }
                };
                let connected =
                    // Boxed, like the other rare stages below: a future held inline is
                    // copied whole with every request's.
                    Box::pin(pool::connect(endpoint, ccfg.connect_timeout, cstats, cluster_tls))
                        .await;
                drop(pending);
                match connected {
                    Ok(up) => up,
                    Err(e) => {
                        let timed_out = matches!(&e.kind, ProxyErrorKind::UpstreamConnect { source, .. } if source.kind() == std::io::ErrorKind::TimedOut);
                        // Nothing was sent: any request may go to the next endpoint.
                        match connect_failed(&attempts, picker, index, timed_out).await {
                            Ok(()) => continue,
                            Err(f) => break f,
                        }
                    }
                }
            }
        };
        let (sent, back) = up.wr.write_all_owned(head_bytes).await;
        head_bytes = back;
        if sent.is_err() {
            drop(up);
            picker.report(index, crate::health::Outcome::GatewayFailure);
            if attempts.retry(Failure::Reset) {
                attempts.backoff().await;
                continue;
            }
            break UpFail::Closed;
        }
        meters.upstream_out(head_bytes.len());
        let shared = ExShared::default();
        if body_done {
            let now = rt::now();
            shared.req_done_at.set(Some(now));
            attempts.sent(now, route.timeout);
        }
        let joined = exchange(
            conn,
            &mut up,
            &mut req.decoder,
            // A client that stops sending its body holds an upstream connection: the gaps in a
            // body get what a head gets.
            routes.request_timeout,
            &rctx,
            &shared,
            &meters,
        )
        .await;
        match joined {
            Joined::Done { resp, req_complete } => {
                responded(picker, index, resp.status, &attempts, ex);
                bufpool::give(std::mem::take(&mut head_bytes));
                if resp.upgraded {
                    let relayed = Box::pin(upgrade::tunnel(
                        conn,
                        &mut up,
                        routes.idle_timeout,
                        cstats,
                        &meters,
                    ))
                    .await;
                    if let Err(e) = relayed {
                        tracing::debug!(peer = %conn.peer, error = %e, "upgraded connection ended");
                    }
                    return Next::Close { linger: false };
                }
                if req_complete && resp.upstream_reusable {
                    guard.shard.http_pool.put(key, up);
                } else {
                    drop(up);
                }
                return if resp.keep_down && req_complete {
                    Next::KeepAlive
                } else {
                    Next::Close {
                        linger: !req_complete,
                    }
                };
            }
            Joined::ReqFailed(PumpError::Body(e)) => {
                drop(up);
                tracing::debug!(peer = %conn.peer, error = %e, "request body refused");
                let flags = e.response_flag().unwrap_or("-");
                if shared.responded.get() {
                    ex.answer(shared.status.get(), flags);
                } else {
                    ex.answer(e.status(), flags);
                    local(conn, &meters, req.version, false, None).await;
                }
                return Next::Close { linger: true };
            }
            Joined::ReqFailed(PumpError::ClientGone) => {
                drop(up);
                ex.answer(shared.status.get(), "DC");
                return Next::Close { linger: false };
            }
            Joined::RespFailed(RespFail::ClientGone) => {
                drop(up);
                ex.answer(shared.status.get(), "DC");
                return Next::Close { linger: false };
            }
            Joined::RespFailed(RespFail::Upstream(f)) => {
                drop(up);
                let at = FailedAt {
                    responded: shared.responded.get(),
                    status: shared.status.get(),
                    req_done: shared.req_done_at.get().is_some(),
                };
                let failed = upstream_failed(conn, &meters, &req, &attempts, picker, index, f, at);
                match failed.await {
                    Some(next) => return next,
                    None => continue,
                }
            }
        }
    };
    // Nothing was received from any upstream: answer for it.
    ex.answer(fail.status(), fail.flags(attempts.retried()));
    let ok = local(
        conn,
        &meters,
        req.version,
        req.keep_alive && body_done,
        None,
    )
    .await;
    after_local(ok, body_done)
}

/// How one HTTP/2 attempt ended ([`h2_upstream::attempt`]), for the attempt loop of
/// [`forward`]; the HTTP/1.1 exchange's outcomes map to the same steps.
pub(crate) enum Tried {
    /// A response head came (its status, for outlier detection) and the response went to the
    /// client; what the client connection does next.
    Responded { status: u16, next: Next },
    /// The attempt answered the client itself (the client left, its body was refused).
    Answered(Next),
    /// No connection could be had: nothing was sent.
    ConnectFailed { timed_out: bool },
    /// A circuit breaker refused a new connection (or a wait for one).
    Overflow(Limit),
    /// The upstream did not process the request and it can be sent again
    /// ([`Failure::Refused`]).
    Refused,
    /// The upstream failed the attempt after the request (or part of it) went out.
    Failed(UpFail, FailedAt),
}

/// Where an attempt stood when its upstream failed.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct FailedAt {
    /// The response head had gone to the client: nothing but cutting it off is left.
    pub(crate) responded: bool,
    /// The status of that response head, or of the response a retry dropped.
    pub(crate) status: u16,
    /// The request had been sent in full.
    pub(crate) req_done: bool,
}

/// A response from endpoint `index` went to the client: outlier detection sees its status,
/// the access log the response (`URX` when retries ran out on a retriable status).
fn responded(
    picker: &crate::balance::EndpointPicker,
    index: usize,
    status: u16,
    attempts: &Attempts<'_>,
    ex: &Exchange,
) {
    picker.report(index, crate::health::Outcome::Status(status));
    ex.answer(status, if attempts.exhausted() { "URX" } else { "-" });
}

/// A connect to endpoint `index` failed (nothing was sent): `Ok` when the request is tried
/// again (the backoff waited), else the failure to answer with.
async fn connect_failed(
    attempts: &Attempts<'_>,
    picker: &crate::balance::EndpointPicker,
    index: usize,
    timed_out: bool,
) -> Result<(), UpFail> {
    picker.report(index, crate::health::Outcome::GatewayFailure);
    if attempts.retry(Failure::ConnectFailure) {
        attempts.backoff().await;
        return Ok(());
    }
    Err(if timed_out {
        UpFail::ConnectTimeout
    } else {
        UpFail::ConnectRefused
    })
}

/// Endpoint `index` failed an attempt with `f` after the request went out: `None` when the
/// request is tried again (the backoff waited), else the client was answered (or the response
/// cut off) and this is what its connection does next.
#[allow(clippy::too_many_arguments)] // one failed attempt's context
async fn upstream_failed<R: HttpRead, W: ClientOut>(
    conn: &mut Conn<R, W>,
    meters: &Meters<'_>,
    req: &ReqInfo<'_>,
    attempts: &Attempts<'_>,
    picker: &crate::balance::EndpointPicker,
    index: usize,
    f: UpFail,
    at: FailedAt,
) -> Option<Next> {
    let ex = meters.ex;
    picker.report(
        index,
        match f {
            // Decided by the relay, which saw the status.
            UpFail::RetryStatus => crate::health::Outcome::Status(at.status),
            _ => crate::health::Outcome::GatewayFailure,
        },
    );
    if at.responded {
        // The response had started: all that is left is to cut the connection.
        ex.answer(at.status, f.flags(attempts.retried()));
        return Some(Next::Close { linger: false });
    }
    let again = match f {
        UpFail::RetryStatus => true,
        UpFail::Closed => attempts.retry(Failure::Reset),
        UpFail::PerTryTimeout => attempts.retry(Failure::PerTryTimeout),
        _ => false,
    };
    if again {
        attempts.backoff().await;
        return None;
    }
    ex.answer(f.status(), f.flags(attempts.retried()));
    let keep = req.keep_alive && at.req_done;
    let ok = local(conn, meters, req.version, keep, None).await;
    Some(answered(ok, req.keep_alive, at.req_done))
}

/// What the client connection does after a local answer (`ok`: it was written): it is
/// usable only if the request was read in full.
pub(crate) fn answered(ok: bool, keep_alive: bool, req_done: bool) -> Next {
    if ok && keep_alive && req_done {
        Next::KeepAlive
    } else {
        Next::Close {
            linger: ok && !req_done,
        }
    }
}

/// State both directions of an exchange see.
#[derive(Default)]
struct ExShared {
    /// When the request (head and body) had been sent in full; the route timeout runs from
    /// here.
    req_done_at: Cell<Option<Instant>>,
    /// A byte of the response (even an interim one) arrived from the upstream.
    got_bytes: Cell<bool>,
    /// The final response head went to the client: no local answer is possible any more.
    responded: Cell<bool>,
    status: Cell<u16>,
}

enum Joined {
    /// The response is complete; `req_complete`: so is the request.
    Done {
        resp: RespOk,
        req_complete: bool,
    },
    ReqFailed(PumpError),
    RespFailed(RespFail),
}

/// Run the request-body pump and the response relay at once (an upstream may answer before
/// the body is in, e.g. with 413, and `100-continue` needs the response side running while the
/// client waits). Ends when the response ends or either side fails.
async fn exchange<R: HttpRead, W: ClientOut>(
    conn: &mut Conn<R, W>,
    up: &mut UpConn,
    decoder: &mut BodyDecoder,
    client_idle: Duration,
    rctx: &RespCtx<'_>,
    shared: &ExShared,
    meters: &Meters<'_>,
) -> Joined {
    let Conn { rd, wr, buf, .. } = conn;
    let mut rbuf = bufpool::take(1024);
    let req = pump_request(rd, &mut up.wr, buf, decoder, client_idle, shared, meters);
    let resp = relay_response(&mut up.rd, wr, &mut rbuf, rctx, shared, meters);
    let mut req = pin!(req);
    let mut resp = pin!(resp);
    let mut req_end: Option<PumpEnd> = None;
    poll_fn(|cx| {
        if req_end.is_none() {
            match req.as_mut().poll(cx) {
                Poll::Ready(Ok(end)) => req_end = Some(end),
                Poll::Ready(Err(e)) => return Poll::Ready(Joined::ReqFailed(e)),
                Poll::Pending => {}
            }
        }
        match resp.as_mut().poll(cx) {
            Poll::Ready(Ok(resp)) => Poll::Ready(Joined::Done {
                resp,
                req_complete: req_end == Some(PumpEnd::Complete),
            }),
            Poll::Ready(Err(e)) => Poll::Ready(Joined::RespFailed(e)),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PumpEnd {
    Complete,
    /// Writing to the upstream failed; the response side decides what happens.
    UpstreamGone,
}

enum PumpError {
    /// The body broke the framing rules.
    Body(H1Error),
    /// The client closed, reset or went quiet for the idle timeout mid-body.
    ClientGone,
}

/// Forward the request body (with the framing it arrived in) from the client to the upstream.
async fn pump_request<R: HttpRead, U: HttpWrite>(
    rd: &mut R,
    wr: &mut U,
    buf: &mut Vec<u8>,
    decoder: &mut BodyDecoder,
    idle: Duration,
    shared: &ExShared,
    meters: &Meters<'_>,
) -> Result<PumpEnd, PumpError> {
    loop {
        let used = decode_run(decoder, buf).map_err(PumpError::Body)?;
        if used > 0 {
            if wr.write_all(&buf[..used]).await.is_err() {
                return Ok(PumpEnd::UpstreamGone);
            }
            meters.upstream_out(used);
            buf.drain(..used);
        }
        if decoder.is_done() {
            shared.req_done_at.set(Some(rt::now()));
            return Ok(PumpEnd::Complete);
        }
        let rb = match rt::timeout(idle, rd.recv_buf()).await {
            Ok(Ok(Some(rb))) => rb,
            Err(rt::Elapsed) | Ok(Ok(None)) | Ok(Err(_)) => return Err(PumpError::ClientGone),
        };
        meters.client_in(rb.len());
        if !buf.is_empty() {
            buf.extend_from_slice(&rb);
            continue;
        }
        // Nothing pending: decode straight from the received buffer and, when all of it is
        // body, send that very buffer on.
        let used = decode_run(decoder, &rb).map_err(PumpError::Body)?;
        if used == rb.len() {
            let (res, rb) = wr.write_all_owned(rb).await;
            drop(rb);
            if res.is_err() {
                return Ok(PumpEnd::UpstreamGone);
            }
            meters.upstream_out(used);
        } else {
            if used > 0 {
                if wr.write_all(&rb[..used]).await.is_err() {
                    return Ok(PumpEnd::UpstreamGone);
                }
                meters.upstream_out(used);
            }
            buf.extend_from_slice(&rb[used..]);
        }
    }
}

/// Decode as much of `input` as is body; the number of bytes (framing included) it took.
fn decode_run(decoder: &mut BodyDecoder, input: &[u8]) -> Result<usize, H1Error> {
    let mut used = 0;
    while !decoder.is_done() && used < input.len() {
        let d = decoder.decode(&input[used..])?;
        if d.consumed == 0 {
            break;
        }
        used += d.consumed;
    }
    Ok(used)
}

/// [`decode_run`] that also appends the de-chunked payload to `out`.
pub(crate) fn decode_payload(
    decoder: &mut BodyDecoder,
    input: &[u8],
    out: &mut Vec<u8>,
) -> Result<usize, H1Error> {
    let mut used = 0;
    while !decoder.is_done() && used < input.len() {
        let d = decoder.decode(&input[used..])?;
        if d.consumed == 0 {
            break;
        }
        out.extend_from_slice(d.payload);
        used += d.consumed;
    }
    Ok(used)
}

/// How the response goes to this client.
pub(crate) struct RespCtx<'a> {
    pub(crate) method: Method,
    pub(crate) version: Version,
    pub(crate) client_keep_alive: bool,
    pub(crate) edits: &'a Edits,
    pub(crate) timeout: Duration,
    pub(crate) draining: &'a AtomicBool,
    /// `[routes.retry] per_try_timeout`: the limit until the response head.
    pub(crate) per_try: Option<Duration>,
    /// Decides whether a response status is retried instead of relayed.
    pub(crate) retry: Option<&'a Attempts<'a>>,
    /// The request asked to switch to this protocol (HTTP/1.1 upgrade the route allows).
    pub(crate) upgrade: Option<&'a str>,
}

struct RespOk {
    status: u16,
    /// The client connection may carry another request.
    keep_down: bool,
    /// The upstream connection ended this response cleanly and may go back to the pool.
    upstream_reusable: bool,
    /// A 101 went to the client: both connections are a byte relay from here.
    upgraded: bool,
}

enum RespFail {
    Upstream(UpFail),
    /// Writing to the client failed.
    ClientGone,
}

/// Read the response from the upstream (forwarding `100 Continue`) and relay it to the client.
async fn relay_response<U: HttpRead, W: ClientOut>(
    up: &mut U,
    down: &mut W,
    rbuf: &mut Vec<u8>,
    cx: &RespCtx<'_>,
    shared: &ExShared,
    meters: &Meters<'_>,
) -> Result<RespOk, RespFail> {
    let limits = Limits::default();
    let mut progress = HeadProgress::default();
    let (head, consumed) = loop {
        if !rbuf.is_empty() {
            match parse_response_resumable(rbuf, &limits, cx.method, &mut progress) {
                Ok(Parsed::Complete { head, consumed }) if head.is_interim() => {
                    if head.status() == 100 && cx.version == Version::Http11 {
                        let n = down
                            .interim_continue()
                            .await
                            .map_err(|_| RespFail::ClientGone)?;
                        meters.client_out(n);
                    }
                    rbuf.drain(..consumed);
                    continue;
                }
                Ok(Parsed::Complete { head, consumed }) => {
                    if head.status() == 101 && cx.upgrade.is_some() {
                        return Box::pin(upgrade::switched(
                            down, &head, rbuf, consumed, cx, shared, meters,
                        ))
                        .await;
                    }
                    if head.status() == 101 || head.is_tunnel() {
                        // Never asked for: only upgrades the route allows go upstream.
                        return Err(RespFail::Upstream(UpFail::Protocol));
                    }
                    if let Some(attempts) = cx.retry
                        && head.status() >= 400
                        && attempts.retry(Failure::Status(head.status()))
                    {
                        // Dropped unread with its connection; the next attempt answers.
                        shared.status.set(head.status());
                        return Err(RespFail::Upstream(UpFail::RetryStatus));
                    }
                    break (head, consumed);
                }
                Ok(Parsed::Partial) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "upstream response refused");
                    return Err(RespFail::Upstream(UpFail::Protocol));
                }
            }
        }
        match read_upstream(up, cx, shared).await? {
            Some(rb) => {
                shared.got_bytes.set(true);
                meters.upstream_in(rb.len());
                rbuf.extend_from_slice(&rb);
            }
            None => return Err(RespFail::Upstream(UpFail::Closed)),
        }
    };
    let status = head.status();
    shared.status.set(status);
    // HTTP/1.0 clients cannot read chunked bodies: de-chunk and close-delimit.
    let dechunk = cx.version == Version::Http10 && head.framing() == Framing::Chunked;
    let req_complete = shared.req_done_at.get().is_some();
    let keep_down = cx.client_keep_alive
        && req_complete
        && !dechunk
        && head.framing() != Framing::CloseDelimited
        && !cx.draining.load(Ordering::Acquire);
    let prepared = match down.prepare_head(&head, rbuf, cx, dechunk, keep_down) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "cannot encode the response");
            return Err(RespFail::Upstream(UpFail::Protocol));
        }
    };
    // Payload only (no HTTP/1 framing) for HTTP/1.0 clients of chunked responses and for
    // clients that are not HTTP/1 at all.
    let payload_mode = dechunk || !W::FRAMED;
    let mut upstream_reusable = head.keep_alive() && head.framing() != Framing::CloseDelimited;
    let mut decoder = head.body_decoder(&limits);
    drop(head);
    rbuf.drain(..consumed);
    // Body bytes that came with the head go out in the same write (HTTP/1: appended to the
    // encoded head itself).
    let mut prepared = prepared;
    let mut first = Vec::new();
    let sink = W::head_buf(&mut prepared).unwrap_or(&mut first);
    let used = if payload_mode {
        decode_payload(&mut decoder, rbuf, sink)
    } else {
        decode_run(&mut decoder, rbuf).inspect(|&used| sink.extend_from_slice(&rbuf[..used]))
    }
    .map_err(|_| RespFail::Upstream(UpFail::Protocol))?;
    rbuf.drain(..used);
    shared.responded.set(true);
    let n = down
        .send_head(prepared, first, decoder.is_done())
        .await
        .map_err(|_| RespFail::ClientGone)?;
    meters.client_out(n);
    let mut payload = Vec::new();
    while !decoder.is_done() {
        let Some(rb) = read_upstream(up, cx, shared).await? else {
            // Close-delimited bodies end here; any other body is cut short.
            decoder
                .eof()
                .map_err(|_| RespFail::Upstream(UpFail::Closed))?;
            upstream_reusable = false;
            break;
        };
        meters.upstream_in(rb.len());
        if payload_mode {
            rbuf.extend_from_slice(&rb);
            payload.clear();
            let used = decode_payload(&mut decoder, rbuf, &mut payload)
                .map_err(|_| RespFail::Upstream(UpFail::Protocol))?;
            rbuf.drain(..used);
            if !payload.is_empty() {
                let n = down
                    .body(&payload, decoder.is_done())
                    .await
                    .map_err(|_| RespFail::ClientGone)?;
                meters.client_out(n);
            }
            continue;
        }
        if !rbuf.is_empty() {
            rbuf.extend_from_slice(&rb);
            let used =
                decode_run(&mut decoder, rbuf).map_err(|_| RespFail::Upstream(UpFail::Protocol))?;
            if used > 0 {
                let n = down
                    .body(&rbuf[..used], decoder.is_done())
                    .await
                    .map_err(|_| RespFail::ClientGone)?;
                meters.client_out(n);
                rbuf.drain(..used);
            }
            continue;
        }
        let used =
            decode_run(&mut decoder, &rb).map_err(|_| RespFail::Upstream(UpFail::Protocol))?;
        if used == rb.len() {
            let n = down
                .body_owned(rb, decoder.is_done())
                .await
                .map_err(|_| RespFail::ClientGone)?;
            meters.client_out(n);
        } else {
            if used > 0 {
                let n = down
                    .body(&rb[..used], decoder.is_done())
                    .await
                    .map_err(|_| RespFail::ClientGone)?;
                meters.client_out(n);
            }
            rbuf.extend_from_slice(&rb[used..]);
        }
    }
    down.end().await.map_err(|_| RespFail::ClientGone)?;
    // Bytes after the end of the body: the upstream does not frame its messages as it says.
    if !rbuf.is_empty() {
        upstream_reusable = false;
    }
    bufpool::give(std::mem::take(rbuf));
    Ok(RespOk {
        status,
        keep_down,
        upstream_reusable,
        upgraded: false,
    })
}

/// A response the gateway writes itself (an error, a refusal, a direct response, a redirect).
#[derive(Debug, Clone, Copy)]
pub(crate) struct LocalResp<'a> {
    pub status: u16,
    /// The client's HTTP/1 version (for the connection field).
    pub version: Version,
    pub keep_alive: bool,
    pub head_only: bool,
    /// Empty with an error status: the reason phrase is sent.
    pub body: &'a [u8],
    pub location: Option<&'a [u8]>,
    pub edits: Option<&'a Edits>,
}

impl LocalResp<'_> {
    fn status(status: u16, version: Version, keep_alive: bool) -> LocalResp<'static> {
        LocalResp {
            status,
            version,
            keep_alive,
            head_only: false,
            body: b"",
            location: None,
            edits: None,
        }
    }

    /// The body actually sent: `body`, or the reason phrase for an error without one.
    pub(crate) fn body_or_reason(&self) -> Cow<'_, [u8]> {
        if self.body.is_empty() && self.status >= 400 {
            Cow::Owned(format!("{} {}\n", self.status, reason(self.status)).into_bytes())
        } else {
            Cow::Borrowed(self.body)
        }
    }
}

/// Where a response goes: an HTTP/1 connection (any [`HttpWrite`]) or an HTTP/2 stream
/// (`proxy::h2`). The relay decides framing and timing; this writes. Each call returns the
/// bytes it wrote, for the counters.
pub(crate) trait ClientOut {
    /// Body bytes pass with their HTTP/1 framing (chunked stays chunked); otherwise only
    /// payload is handed over.
    const FRAMED: bool;
    /// A prepared response head (encoded without waiting; the upstream buffer is released
    /// before it is sent).
    type Head;
    async fn local(&mut self, r: &LocalResp<'_>) -> io::Result<usize>;
    async fn interim_continue(&mut self) -> io::Result<usize>;
    fn prepare_head(
        &self,
        head: &ResponseHead,
        buf: &[u8],
        cx: &RespCtx<'_>,
        dechunk: bool,
        keep_down: bool,
    ) -> Result<Self::Head, H1Error>;
    /// Where the first body bytes go when they travel in the head's own buffer.
    fn head_buf(head: &mut Self::Head) -> Option<&mut Vec<u8>>;
    /// The head with the first body bytes; `done`: the body is complete with them.
    async fn send_head(
        &mut self,
        head: Self::Head,
        first: Vec<u8>,
        done: bool,
    ) -> io::Result<usize>;
    async fn body(&mut self, b: &[u8], done: bool) -> io::Result<usize>;
    async fn body_owned<B: IoBuf + Deref<Target = [u8]>>(
        &mut self,
        b: B,
        done: bool,
    ) -> io::Result<usize>;
    /// The response is complete.
    async fn end(&mut self) -> io::Result<()>;
    /// Bytes after a protocol switch (HTTP/1 only, where a 101 turns the connection into a
    /// byte relay).
    async fn raw_owned<B: IoBuf>(&mut self, b: B) -> (io::Result<()>, B) {
        let res = self.body(b.as_slice(), false).await.map(drop);
        (res, b)
    }
    /// End a response whose body went without a length with trailer fields (HTTP/2
    /// upstreams: gRPC's status). HTTP/1: the last chunk of a chunked body, with them.
    async fn trailers(&mut self, trailers: http::HeaderMap) -> io::Result<usize>;
    /// The gRPC status this client was given, for the access log.
    fn grpc_status(&self) -> Option<u16> {
        None
    }
    /// A gRPC request's `grpc-timeout`, as the client sent it.
    fn grpc_timeout(&self) -> Option<Duration> {
        None
    }
    /// Stop sending on the connection (HTTP/1 lingering close).
    async fn shutdown(&mut self) -> io::Result<()>;
}

impl<W: HttpWrite> ClientOut for W {
    const FRAMED: bool = true;
    type Head = Vec<u8>;

    async fn local(&mut self, r: &LocalResp<'_>) -> io::Result<usize> {
        let response = local_response(
            r.status,
            r.version,
            r.keep_alive,
            r.head_only,
            r.body,
            r.location,
            r.edits,
        );
        let n = response.len();
        self.write_all_owned(response).await.0.map(|()| n)
    }

    async fn interim_continue(&mut self) -> io::Result<usize> {
        const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
        self.write_all(CONTINUE).await.map(|()| CONTINUE.len())
    }

    fn prepare_head(
        &self,
        head: &ResponseHead,
        buf: &[u8],
        cx: &RespCtx<'_>,
        dechunk: bool,
        keep_down: bool,
    ) -> Result<Vec<u8>, H1Error> {
        encode_response_head(head, buf, cx, dechunk, keep_down)
    }

    fn head_buf(head: &mut Vec<u8>) -> Option<&mut Vec<u8>> {
        Some(head)
    }

    async fn send_head(&mut self, head: Vec<u8>, _: Vec<u8>, _: bool) -> io::Result<usize> {
        let n = head.len();
        let (res, head) = self.write_all_owned(head).await;
        bufpool::give(head);
        res.map(|()| n)
    }

    async fn body(&mut self, b: &[u8], _: bool) -> io::Result<usize> {
        self.write_all(b).await.map(|()| b.len())
    }

    async fn body_owned<B: IoBuf + Deref<Target = [u8]>>(
        &mut self,
        b: B,
        _: bool,
    ) -> io::Result<usize> {
        let n = b.len();
        self.write_all_owned(b).await.0.map(|()| n)
    }

    async fn end(&mut self) -> io::Result<()> {
        Ok(())
    }

    async fn raw_owned<B: IoBuf>(&mut self, b: B) -> (io::Result<()>, B) {
        self.write_all_owned(b).await
    }

    async fn trailers(&mut self, trailers: http::HeaderMap) -> io::Result<usize> {
        let mut fields = Vec::with_capacity(64);
        for (name, value) in &trailers {
            fields.extend_from_slice(name.as_str().as_bytes());
            fields.extend_from_slice(b": ");
            fields.extend_from_slice(value.as_bytes());
            fields.extend_from_slice(b"\r\n");
        }
        let mut out = Vec::with_capacity(fields.len() + 8);
        crate::http1::write_last_chunk(&mut out, Some(&fields));
        let n = out.len();
        self.write_all_owned(out).await.0.map(|()| n)
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        self.shutdown_write().await
    }
}

/// The client's response head (not awaited across: the edit lists live on the stack here).
fn encode_response_head(
    head: &ResponseHead,
    buf: &[u8],
    cx: &RespCtx<'_>,
    dechunk: bool,
    keep_down: bool,
) -> Result<Vec<u8>, H1Error> {
    let mut out = bufpool::take(head.head_len() + 128);
    // Most routes edit no response field: skip filling the edit lists (~3 KB on the stack).
    let plain = cx.edits.remove.is_empty() && cx.edits.set.is_empty() && cx.edits.add.is_empty();
    let edits = (!plain).then(|| EditSet::new(cx.edits));
    encode_response(
        head,
        buf,
        &ResponseEdits {
            headers: edits.as_ref().map(EditSet::headers).unwrap_or_default(),
            framing: dechunk.then_some(Framing::CloseDelimited),
            connection: Some(ConnectionHeader::for_peer(cx.version, keep_down)),
        },
        &mut out,
    )?;
    Ok(out)
}

/// The next bytes from the upstream within the route timeout (which starts once the request
/// was sent in full); `None` at EOF.
async fn read_upstream<U: HttpRead>(
    up: &mut U,
    cx: &RespCtx<'_>,
    shared: &ExShared,
) -> Result<Option<U::Buf>, RespFail> {
    loop {
        let (wait, fail) = match shared.req_done_at.get() {
            Some(at) => {
                let now = rt::now();
                let route = (at + cx.timeout).saturating_duration_since(now);
                match cx.per_try.filter(|_| !shared.responded.get()) {
                    Some(per_try) if at + per_try < at + cx.timeout => (
                        (at + per_try).saturating_duration_since(now),
                        UpFail::PerTryTimeout,
                    ),
                    _ => (route, UpFail::Timeout),
                }
            }
            None => (RESPONSE_WAIT_SLICE, UpFail::Timeout),
        };
        if wait.is_zero() {
            return Err(RespFail::Upstream(fail));
        }
        match rt::timeout(wait, up.recv_buf()).await {
            Err(rt::Elapsed) => {} // re-check the deadline
            Ok(Ok(rb)) => return Ok(rb),
            Ok(Err(_)) => return Err(RespFail::Upstream(UpFail::Closed)),
        }
    }
}

/// Answer the client with the exchange's status (an error or a refusal; no body but the
/// status line). Returns whether the write worked.
pub(crate) async fn local<R: HttpRead, W: ClientOut>(
    conn: &mut Conn<R, W>,
    meters: &Meters<'_>,
    version: Version,
    keep_alive: bool,
    edits: Option<&Edits>,
) -> bool {
    let status = meters.ex.status.get();
    let response = LocalResp {
        edits,
        ..LocalResp::status(status, version, keep_alive)
    };
    write_client(conn, meters, &response).await
}

async fn write_client<R, W: ClientOut>(
    conn: &mut Conn<R, W>,
    meters: &Meters<'_>,
    response: &LocalResp<'_>,
) -> bool {
    match conn.wr.local(response).await {
        Ok(n) => {
            meters.client_out(n);
            true
        }
        Err(_) => false,
    }
}

/// A complete response written by the gateway: `status`, `content-length`, a `text/plain`
/// body (the reason phrase when `body` is empty and the status is an error), `location`,
/// the route's response edits, and the connection field.
fn local_response(
    status: u16,
    version: Version,
    keep_alive: bool,
    head_only: bool,
    body: &[u8],
    location: Option<&[u8]>,
    edits: Option<&Edits>,
) -> Vec<u8> {
    let reason = reason(status);
    let generated;
    let body: &[u8] = if body.is_empty() && status >= 400 {
        generated = format!("{status} {reason}\n");
        generated.as_bytes()
    } else {
        body
    };
    let no_body = matches!(status, 204 | 304);
    let mut out = Vec::with_capacity(128 + body.len());
    let _ = write!(out, "HTTP/1.1 {status} {reason}\r\n");
    let taken = |name: &str| edits.is_some_and(|e| e.takes_over(name));
    if !no_body {
        let _ = write!(out, "content-length: {}\r\n", body.len());
        if !body.is_empty() && !taken("content-type") {
            out.extend_from_slice(b"content-type: text/plain\r\n");
        }
    }
    if let Some(location) = location
        && !taken("location")
    {
        out.extend_from_slice(b"location: ");
        out.extend_from_slice(location);
        out.extend_from_slice(b"\r\n");
    }
    if let Some(edits) = edits {
        for (name, value) in edits.set.iter().chain(edits.add.iter()) {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
    }
    match ConnectionHeader::for_peer(version, keep_alive) {
        ConnectionHeader::Close => out.extend_from_slice(b"connection: close\r\n"),
        ConnectionHeader::KeepAlive => out.extend_from_slice(b"connection: keep-alive\r\n"),
        ConnectionHeader::Persist | ConnectionHeader::Upgrade => {}
    }
    out.extend_from_slice(b"\r\n");
    if !head_only && !no_body {
        out.extend_from_slice(body);
    }
    out
}

pub(crate) fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        414 => "URI Too Long",
        421 => "Misdirected Request",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => match status / 100 {
            1 => "Informational",
            2 => "Success",
            3 => "Redirection",
            4 => "Client Error",
            _ => "Server Error",
        },
    }
}

/// A route's edits plus the gateway's own fields, as the borrowed lists the codec takes; on
/// the stack (no allocation within [`MAX_EDITS`] per list), and only the slots in use are
/// written.
struct EditSet<'a> {
    remove: SmallVec<[&'a str; MAX_EDITS]>,
    set: SmallVec<[(&'a str, &'a [u8]); MAX_EDITS]>,
    add: SmallVec<[(&'a str, &'a [u8]); MAX_EDITS]>,
}

impl<'a> EditSet<'a> {
    fn new(edits: &'a Edits) -> Self {
        EditSet {
            remove: edits.remove.iter().map(String::as_str).collect(),
            set: edits.set.iter().map(|(n, v)| (n.as_str(), &**v)).collect(),
            add: edits.add.iter().map(|(n, v)| (n.as_str(), &**v)).collect(),
        }
    }

    fn remove(&mut self, name: &'a str) {
        self.remove.push(name);
    }

    fn set(&mut self, name: &'a str, value: &'a [u8]) {
        self.set.push((name, value));
    }

    fn headers(&self) -> HeaderEdits<'_> {
        HeaderEdits {
            remove: &self.remove,
            set: &self.set,
            add: &self.add,
        }
    }
}

thread_local! {
    /// Per shard: a random prefix chosen at start and a counter.
    static REQUEST_IDS: (u64, Cell<u64>) = (random_u64(), Cell::new(0));
}

fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// Appends `ip` as text: IPv4 without the formatting machinery (it ran on every request, ~0.5 %
/// of an HTTP/1.1 request's CPU), IPv6 through `Display`.
fn push_ip(out: &mut Vec<u8>, ip: std::net::IpAddr) {
    match ip {
        std::net::IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                if octet >= 100 {
                    out.push(b'0' + octet / 100);
                }
                if octet >= 10 {
                    out.push(b'0' + octet / 10 % 10);
                }
                out.push(b'0' + octet % 10);
            }
        }
        std::net::IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

/// A new request ID, UUID-shaped (`8-4-4-4-12` hex digits): the shard's random prefix and its
/// counter. Unique per process run without coordination between shards.
fn request_id() -> [u8; 36] {
    let (prefix, n) = REQUEST_IDS.with(|(prefix, counter)| {
        let n = counter.get().wrapping_add(1);
        counter.set(n);
        (*prefix, n)
    });
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digits = (u128::from(prefix) << 64) | u128::from(n);
    let mut out = [b'-'; 36];
    let mut shift = 128;
    for (i, slot) in out.iter_mut().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            continue;
        }
        shift -= 4;
        *slot = HEX[((digits >> shift) & 0xf) as usize];
    }
    out
}

/// Counters and the access-log record of one request.
#[allow(clippy::too_many_arguments)] // one access-log record's worth of context
fn finish(
    guard: &ConnGuard,
    snap: &ShardGen,
    routes: &ListenerRoutes,
    route: Option<&CompiledRoute>,
    ex: &Exchange,
    peer: SocketAddr,
    tls: Option<&TlsInfo>,
    proto: &'static str,
) {
    let status = ex.status.get();
    let elapsed = ex.started.elapsed();
    if status != 0 {
        route
            .map_or(&routes.unrouted, |r| &r.stats)
            .record_request(&RequestRecord {
                cluster: ex.cluster.get(),
                status,
                elapsed,
                flags: ex.flags.get(),
                protocol: "http",
                peer: None,
                request_bytes: ex.received.get(),
                response_bytes: ex.sent.get(),
            });
    }
    let Some(log) = &guard.shard.access_log else {
        return;
    };
    let fields = ex.log.as_ref();
    let start_time = SystemTime::now()
        .checked_sub(elapsed)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    log.log(Record {
        start_time,
        duration: elapsed,
        protocol: proto,
        method: fields.map(|f| f.method.clone()),
        path: fields.map(|f| f.path.clone()),
        authority: fields.and_then(|f| f.authority.clone()),
        response_code: status,
        response_flags: ex.flags.get(),
        bytes_received: ex.received.get(),
        bytes_sent: ex.sent.get(),
        upstream_host: ex.upstream_host.get(),
        upstream_request_attempt_count: Some(ex.attempts.get()).filter(|&n| n > 0),
        upstream_cluster: ex.cluster.get().map(|c| snap.cluster_names[c].clone()),
        downstream_remote_address: peer,
        downstream_local_address: None,
        requested_server_name: tls.and_then(|t| t.sni.clone()),
        route_name: ex.route.get().map(|r| snap.route_names[r].clone()),
        listener: snap.listener_names[guard.listener].clone(),
        downstream_peer_spiffe_id: tls.and_then(|t| t.peer.as_ref().map(|p| p.as_str().to_owned())),
        tls_version: tls.and_then(|t| t.version),
        x_forwarded_for: fields.and_then(|f| f.x_forwarded_for.clone()),
        user_agent: fields.and_then(|f| f.user_agent.clone()),
        request_id: fields.and_then(|f| f.request_id.clone()),
        response_code_details: fields.and_then(|f| f.response_code_details.clone()),
        grpc_status: ex.grpc_status.get(),
        shard: guard.shard.id,
    });
}

/// After `connection: close`: stop sending, then read and drop what the client still sends
/// for a moment, so that closing a socket with unread input does not reset the connection
/// before the client read the response.
async fn lingering_close<R: HttpRead, W: ClientOut>(conn: &mut Conn<R, W>) {
    let _ = conn.wr.shutdown().await;
    let until = Instant::now() + LINGER_TIME;
    let mut drained = 0u64;
    while drained < LINGER_BYTES {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match rt::timeout(left, conn.rd.recv_buf()).await {
            Ok(Ok(Some(rb))) => drained += rb.len() as u64,
            _ => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use super::push_ip;

    #[test]
    fn ip_text_matches_display() {
        let mut ips: Vec<IpAddr> = vec![
            Ipv6Addr::LOCALHOST.into(),
            "2001:db8::1".parse().expect("valid"),
        ];
        for a in [0u8, 1, 9, 10, 99, 100, 199, 200, 255] {
            for b in [0u8, 7, 42, 255] {
                ips.push(Ipv4Addr::new(a, b, 255 - a, a / 2).into());
            }
        }
        for ip in ips {
            let mut out = b"x, ".to_vec();
            push_ip(&mut out, ip);
            assert_eq!(out, format!("x, {ip}").into_bytes(), "{ip}");
        }
    }
}
