//! HTTP/2 to upstreams (`[[clusters]] protocol = "http2"`): the per-shard pool of multiplexed
//! h2 client connections and the forwarding of one request over a stream, trailers included
//! (gRPC's `grpc-status` lives there).
//!
//! Where it sits: `proxy::http::forward` picks the cluster and runs the attempt loop (retries,
//! budget, circuit breakers, outlier reports: the same steps as for HTTP/1.1 clusters); for an
//! HTTP/2 cluster each attempt is [`attempt`] on the endpoint the loop picked, instead of the
//! HTTP/1.1 keep-alive pool, and returns how it ended ([`Tried`]). The request arrives as the same
//! HTTP/1 head every request becomes (route edits applied, `x-forwarded-*` set), is turned into
//! an `http::Request` (hop-by-hop fields were removed by the codec; `te: trailers` is added for
//! gRPC), and its body is decoded from its HTTP/1 framing into DATA frames within the upstream's
//! flow-control window. The response goes back through the same `ClientOut` as an HTTP/1
//! response: HEADERS/DATA/trailers to an HTTP/2 client, a chunked body (trailers in the last
//! chunk) to an HTTP/1.1 client.
//!
//! The pool ([`H2Pool`], one per shard, `Shard::h2_pool`): connections are keyed like the
//! HTTP/1 pool ([`PoolKey`]: endpoint + TLS client settings + SNI), so a connection is never
//! shared across upstream identities. A request takes the first connection of its key with a
//! free stream (below the peer's `SETTINGS_MAX_CONCURRENT_STREAMS`); when every connection is
//! full another is opened, up to [`MAX_CONNS_PER_KEY`], after which h2 queues the stream until
//! one frees. A connection is opened by its own task (connect timeout, TLS with ALPN `h2`,
//! the h2 handshake), which then drives it; requests that arrive meanwhile wait for that
//! connection instead of opening their own, and all see its failure at once. The cluster's
//! circuit breakers: opening needs `max_connections` room (past it, streams queue on a busy
//! connection of the key, or the request overflows when there is none), and every waiting
//! request holds a `max_pending_requests` slot. A stream refused unprocessed (REFUSED_STREAM,
//! above a GOAWAY's last stream ID) is [`Tried::Refused`]: retried whatever the method, as
//! long as the gateway still holds every request body byte it took (a copy of up to
//! [`MAX_REPLAY_BODY`] is kept per request, so small bodies such as gRPC unary calls can be
//! sent again). A connection that
//! received GOAWAY (or failed) takes no new requests; its open streams finish. A connection
//! idle (no open stream) for [`IDLE_TIMEOUT`] is closed.
//!
//! gRPC (`content-type: application/grpc*`): `grpc-timeout` is the request's deadline over all
//! its attempts, capped by the route timeout; a deadline that passes mid-response ends it with `grpc-status: 4`.
//! The gateway's own failures reach gRPC clients as trailers-only responses (`proxy::h2`).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::{Future, poll_fn};
use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::SendStream;
use h2::client::{ResponseFuture, SendRequest};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Uri};
use meshgate_config::CircuitBreakers;

use crate::error::ProxyErrorKind;
use crate::http1::{
    BodyDecoder, H1Error, HeadProgress, Limits, Method, Parsed, RequestHead, ResponseHead, Version,
    parse_request, parse_response_resumable,
};
use crate::metrics::ClusterStats;
use crate::pool::PoolKey;
use crate::proxy::h2::TokioIo;
use crate::proxy::http::{
    ClientOut, Conn, Exchange, FailedAt, Meters, Next, ReqInfo, RespCtx, Tried, UpFail,
    decode_payload, local,
};
use crate::proxy::http_io::HttpRead;
use crate::retry::{Attempts, Breaker, Failure, Limit, Slot};
use crate::rt;
use crate::tls::setup::ClusterTlsState;

/// Connections opened per key before streams queue on the existing ones.
pub const MAX_CONNS_PER_KEY: usize = 4;
/// An upstream HTTP/2 connection with no open stream for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a connection's task looks at its idle time.
const TICK: Duration = Duration::from_secs(1);
/// While the request body is still arriving the response wait re-checks its deadline this
/// often (the route timeout starts when the request has been sent in full).
const WAIT_SLICE: Duration = Duration::from_secs(1);
/// Largest DATA frame payload handed to h2 at once.
const MAX_DATA_CHUNK: usize = 16 * 1024;
/// The request body bytes taken from the client are also kept (one copy) up to this size, so
/// that a stream the upstream refuses unprocessed can be sent again on another attempt; past
/// it the copy is dropped and such a request is not retried.
const MAX_REPLAY_BODY: usize = 64 * 1024;

/// One upstream HTTP/2 connection, shared by the requests multiplexed on it.
#[derive(Debug)]
pub struct H2Conn {
    send: SendRequest<Bytes>,
    /// Streams of ours open on it.
    active: Cell<usize>,
    /// GOAWAY received, the connection failed or it was closed: no new streams.
    draining: Cell<bool>,
    idle_since: Cell<Instant>,
    /// Streams ever opened on it (for tests and debugging).
    pub streams: Cell<u64>,
}

impl H2Conn {
    fn has_room(&self) -> bool {
        !self.draining.get() && self.active.get() < self.send.current_max_send_streams().max(1)
    }
}

/// One stream's hold on its connection: counted as active while it lives.
struct StreamSlot(Rc<H2Conn>);

impl StreamSlot {
    fn new(conn: Rc<H2Conn>) -> Self {
        conn.active.set(conn.active.get() + 1);
        conn.streams.set(conn.streams.get() + 1);
        StreamSlot(conn)
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let c = &self.0;
        c.active.set(c.active.get().saturating_sub(1));
        if c.active.get() == 0 {
            c.idle_since.set(Instant::now());
        }
    }
}

/// Why no connection could be had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnectFail {
    Refused,
    TimedOut,
}

/// A connection being opened: its outcome, for every request waiting on it.
#[derive(Debug, Default)]
struct Opening {
    done: RefCell<Option<Result<Rc<H2Conn>, ConnectFail>>>,
    waiters: RefCell<Vec<Waker>>,
}

#[derive(Debug, Default)]
struct Entry {
    conns: Vec<Rc<H2Conn>>,
    opening: Option<Rc<Opening>>,
}

type Map = RefCell<HashMap<PoolKey, Entry>>;

/// A shard's HTTP/2 upstream connections.
#[derive(Debug, Default)]
pub struct H2Pool {
    map: Rc<Map>,
}

/// What it takes to open a connection for a key, and the cluster's circuit breakers.
pub(crate) struct Target<'a> {
    pub(crate) endpoint: SocketAddr,
    pub(crate) connect_timeout: Duration,
    pub(crate) stats: &'a Arc<ClusterStats>,
    pub(crate) tls: Option<&'a ClusterTlsState>,
    pub(crate) breaker: &'a Breaker,
    pub(crate) limits: &'a CircuitBreakers,
}

/// Why no connection could be had for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AcquireFail {
    Connect(ConnectFail),
    /// A circuit breaker refused (`max_connections` with no connection of the key to queue
    /// on, or `max_pending_requests`).
    Overflow(Limit),
}

enum Pick<'a> {
    Use(Rc<H2Conn>),
    /// Wait for a connection being opened, counted in `max_pending_requests` meanwhile.
    Wait(Rc<Opening>, Slot<'a>),
}

impl H2Pool {
    pub fn new() -> Self {
        H2Pool::default()
    }

    /// A connection for `key` with a free stream, or a new one. Past the per-key cap or the
    /// cluster's `max_connections`, streams queue on the least busy connection of the key.
    async fn acquire<'t>(&self, key: &PoolKey, t: &Target<'t>) -> Result<Rc<H2Conn>, AcquireFail> {
        let pending = || t.breaker.pending(t.limits).map_err(AcquireFail::Overflow);
        let pick = {
            let mut map = self.map.borrow_mut();
            let entry = map.entry(key.clone()).or_default();
            entry.conns.retain(|c| !c.draining.get());
            if let Some(c) = entry.conns.iter().find(|c| c.has_room()) {
                Pick::Use(c.clone())
            } else if let Some(o) = &entry.opening {
                Pick::Wait(o.clone(), pending()?)
            } else if entry.conns.len() < MAX_CONNS_PER_KEY && t.breaker.may_open(t.limits).is_ok()
            {
                let slot = pending()?;
                let opening = Rc::new(Opening::default());
                entry.opening = Some(opening.clone());
                let task = open(
                    Rc::downgrade(&self.map),
                    key.clone(),
                    opening.clone(),
                    t.endpoint,
                    t.connect_timeout,
                    t.stats.clone(),
                    t.tls.cloned(),
                );
                drop(rt::spawn(task));
                Pick::Wait(opening, slot)
            } else {
                // Every connection is full: h2 queues the stream on the least busy one.
                let least = entry.conns.iter().min_by_key(|c| c.active.get());
                Pick::Use(
                    least
                        .cloned()
                        .ok_or(AcquireFail::Overflow(Limit::Connections))?,
                )
            }
        };
        match pick {
            Pick::Use(c) => Ok(c),
            Pick::Wait(opening, _pending) => {
                poll_fn(|cx| match &*opening.done.borrow() {
                    Some(r) => Poll::Ready(r.clone().map_err(AcquireFail::Connect)),
                    None => {
                        opening.waiters.borrow_mut().push(cx.waker().clone());
                        Poll::Pending
                    }
                })
                .await
            }
        }
    }
}

/// The task of one upstream connection: open it (TCP, TLS with ALPN `h2`, the h2 handshake),
/// publish it to the pool and to the requests waiting for it, then drive it until it ends or
/// stays idle for [`IDLE_TIMEOUT`].
async fn open(
    map: Weak<Map>,
    key: PoolKey,
    opening: Rc<Opening>,
    endpoint: SocketAddr,
    timeout: Duration,
    stats: Arc<ClusterStats>,
    tls: Option<ClusterTlsState>,
) {
    let finish = |result: Result<Rc<H2Conn>, ConnectFail>| {
        if let Some(map) = map.upgrade()
            && let Some(entry) = map.borrow_mut().get_mut(&key)
        {
            entry.opening = None;
            if let Ok(c) = &result {
                entry.conns.push(c.clone());
            }
        }
        *opening.done.borrow_mut() = Some(result);
        for w in opening.waiters.borrow_mut().drain(..) {
            w.wake();
        }
    };
    let deadline = Instant::now() + timeout;
    let up = match crate::pool::connect_io(endpoint, timeout, &stats, tls.as_ref(), b"h2").await {
        Ok(up) => up,
        Err(e) => {
            let timed_out = matches!(&e.kind, ProxyErrorKind::UpstreamConnect { source, .. } if source.kind() == io::ErrorKind::TimedOut);
            finish(Err(if timed_out {
                ConnectFail::TimedOut
            } else {
                ConnectFail::Refused
            }));
            return;
        }
    };
    let mut builder = h2::client::Builder::new();
    builder
        .initial_window_size(256 * 1024)
        .initial_connection_window_size(1024 * 1024)
        .max_send_buffer_size(256 * 1024)
        .enable_push(false);
    let left = deadline.saturating_duration_since(Instant::now());
    let io = TokioIo::new(up);
    let (send, mut conn) = match rt::timeout(left, builder.handshake::<_, Bytes>(io)).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => {
            stats.connect_failures.inc();
            tracing::debug!(%endpoint, error = %e, "upstream HTTP/2 handshake failed");
            finish(Err(ConnectFail::Refused));
            return;
        }
        Err(rt::Elapsed) => {
            stats.connect_failures.inc();
            stats.connect_timeouts.inc();
            tracing::debug!(%endpoint, "upstream HTTP/2 handshake timed out");
            finish(Err(ConnectFail::TimedOut));
            return;
        }
    };
    stats.connects.inc();
    stats.active.inc();
    let h2c = Rc::new(H2Conn {
        send,
        active: Cell::new(0),
        draining: Cell::new(false),
        idle_since: Cell::new(Instant::now()),
        streams: Cell::new(0),
    });
    finish(Ok(h2c.clone()));
    drop(opening);
    loop {
        match rt::timeout(TICK, &mut conn).await {
            Ok(Ok(())) => break,
            Ok(Err(e)) => {
                tracing::debug!(%endpoint, error = %e, "upstream HTTP/2 connection ended");
                break;
            }
            Err(rt::Elapsed) => {}
        }
        if h2c.active.get() == 0 && h2c.idle_since.get().elapsed() >= IDLE_TIMEOUT {
            // No stream of ours is open: closing loses nothing.
            break;
        }
    }
    h2c.draining.set(true);
    stats.active.dec();
    if let Some(map) = map.upgrade() {
        let mut map = map.borrow_mut();
        if let Some(entry) = map.get_mut(&key) {
            entry.conns.retain(|c| !Rc::ptr_eq(c, &h2c));
            if entry.conns.is_empty() && entry.opening.is_none() {
                map.remove(&key);
            }
        }
    }
}

/// An HTTP/2 request prepared once for all its attempts.
pub(crate) struct Prepared {
    /// The first attempt's request; later attempts build theirs again from the head.
    first: Option<Built>,
    /// What of the request body earlier attempts took from the client.
    replay: Replay,
    expect_continue: bool,
    /// A gRPC request's deadline (`grpc-timeout`, capped by the route timeout), over every
    /// attempt.
    deadline: Option<Instant>,
    tls: bool,
}

impl Prepared {
    /// Err: the status for a head that cannot be sent as HTTP/2.
    pub(crate) fn new(head: &[u8], tls: bool) -> Result<Prepared, u16> {
        let first = build_request(head, tls)?;
        Ok(Prepared {
            expect_continue: first.expect_continue,
            replay: Replay::default(),
            deadline: None,
            first: Some(first),
            tls,
        })
    }

    /// A gRPC request's deadline: the client's `grpc-timeout` (an HTTP/2 client's, taken from
    /// its HEADERS) or the head's, capped by `route_timeout`, from the start of the exchange.
    /// No attempt starts past it ([`Attempts::limit`]).
    pub(crate) fn with_deadline(
        mut self,
        client: Option<Duration>,
        ex: &Exchange,
        route_timeout: Duration,
        attempts: &Attempts<'_>,
    ) -> Prepared {
        let grpc = client.or(self.first.as_ref().and_then(|b| b.grpc_timeout));
        self.deadline = grpc.map(|t| ex.started + t.min(route_timeout));
        if let Some(d) = self.deadline {
            attempts.limit(d);
        }
        self
    }

    fn request(&mut self, head: &[u8]) -> Result<Built, u16> {
        match self.first.take() {
            Some(b) => Ok(b),
            None => build_request(head, self.tls),
        }
    }
}

/// One attempt of the attempt loop in `proxy::http::forward` on an HTTP/2 endpoint: a
/// connection from the pool (or a new one, within the circuit breakers), a stream, the body
/// and the response. What the loop does next (retry, answer) is decided there, from the
/// returned [`Tried`], as for HTTP/1.1 endpoints.
#[allow(clippy::too_many_arguments)] // one attempt's context
pub(crate) async fn attempt<R: HttpRead, W: ClientOut>(
    pool: &H2Pool,
    key: PoolKey,
    target: &Target<'_>,
    prepared: &mut Prepared,
    head: &[u8],
    conn: &mut Conn<R, W>,
    req: &mut ReqInfo<'_>,
    rctx: &RespCtx<'_>,
    client_idle: Duration,
    ex: &Exchange,
    meters: &Meters<'_>,
) -> Tried {
    let acquired = match prepared.deadline {
        Some(d) => {
            let left = d.saturating_duration_since(Instant::now());
            match rt::timeout(left, pool.acquire(&key, target)).await {
                Ok(r) => r,
                // The gRPC deadline passed while the connection was being opened.
                Err(rt::Elapsed) => return Tried::Failed(UpFail::Timeout, FailedAt::default()),
            }
        }
        None => pool.acquire(&key, target).await,
    };
    let h2c = match acquired {
        Ok(c) => c,
        Err(AcquireFail::Connect(f)) => {
            return Tried::ConnectFailed {
                timed_out: f == ConnectFail::TimedOut,
            };
        }
        Err(AcquireFail::Overflow(limit)) => return Tried::Overflow(limit),
    };
    let Ok(built) = prepared.request(head) else {
        // The same head was built for the first attempt.
        return Tried::Failed(UpFail::Protocol, FailedAt::default());
    };
    let (expect_continue, deadline) = (prepared.expect_continue, prepared.deadline);
    // Only the first attempt may answer `100 Continue`.
    prepared.expect_continue = false;
    exchange(
        h2c,
        built.request,
        &mut prepared.replay,
        expect_continue,
        conn,
        req,
        rctx,
        client_idle,
        deadline,
        ex,
        meters,
    )
    .await
}

/// The request body bytes (payload, without HTTP/1 framing) taken from the client so far, and
/// its trailers once it ended, kept while they fit in [`MAX_REPLAY_BODY`].
#[derive(Debug, Default)]
struct Replay {
    data: Vec<u8>,
    trailers: Option<HeaderMap>,
    /// The whole body was taken.
    ended: bool,
    /// Bytes were taken that are not kept: the request cannot be sent again.
    lost: bool,
}

impl Replay {
    fn keep(&mut self, payload: &[u8]) {
        if self.lost {
            return;
        }
        if self.data.len() + payload.len() > MAX_REPLAY_BODY {
            self.lost = true;
            self.data = Vec::new();
        } else {
            self.data.extend_from_slice(payload);
        }
    }

    /// Something is kept to send before the rest of the body.
    fn has_some(&self) -> bool {
        !self.lost && (self.ended || !self.data.is_empty())
    }
}

/// An upstream request and what its fields ask of the gateway.
#[derive(Debug)]
struct Built {
    request: Request<()>,
    /// A gRPC request's `grpc-timeout`.
    grpc_timeout: Option<Duration>,
    /// The client sent `expect: 100-continue` (answered by the gateway, not forwarded).
    expect_continue: bool,
}

/// The upstream request from the HTTP/1 head the route produced. Err: the status for a head
/// that cannot be sent as HTTP/2.
fn build_request(head_bytes: &[u8], tls: bool) -> Result<Built, u16> {
    let limits = Limits::default();
    let head = match parse_request(head_bytes, &limits) {
        Ok(Parsed::Complete { head, .. }) => head,
        _ => return Err(500),
    };
    to_h2_request(&head, head_bytes, tls)
}

fn to_h2_request(head: &RequestHead, buf: &[u8], tls: bool) -> Result<Built, u16> {
    let method = http::Method::from_bytes(head.method_str(buf).as_bytes()).map_err(|_| 400u16)?;
    let authority = head.host(buf).ok_or(400u16)?;
    let uri = Uri::builder()
        .scheme(if tls { "https" } else { "http" })
        .authority(authority)
        .path_and_query(head.path(buf))
        .build()
        .map_err(|_| 400u16)?;
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = http::Version::HTTP_2;
    let headers = request.headers_mut();
    let mut grpc = false;
    let mut grpc_timeout = None;
    let mut expect_continue = false;
    for (name, value) in head.headers(buf) {
        if name.eq_ignore_ascii_case("host") || hop_by_hop(name) {
            continue;
        }
        if name.eq_ignore_ascii_case("expect") {
            expect_continue |= value.eq_ignore_ascii_case(b"100-continue");
            continue;
        }
        if name.eq_ignore_ascii_case("content-type") && is_grpc_content_type(value) {
            grpc = true;
        }
        if name.eq_ignore_ascii_case("grpc-timeout") {
            grpc_timeout = parse_grpc_timeout(value);
        }
        let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value),
        ) else {
            return Err(400);
        };
        headers.append(n, v);
    }
    if grpc {
        // gRPC servers may refuse a request whose client does not announce trailers.
        headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
    }
    Ok(Built {
        request,
        grpc_timeout: grpc_timeout.filter(|_| grpc),
        expect_continue,
    })
}

/// Fields that belong to one HTTP/1 connection (RFC 9113 section 8.2.2); the codec removed
/// them already, this keeps h2 from refusing anything that slipped through.
fn hop_by_hop(name: &str) -> bool {
    [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "te",
        "trailer",
    ]
    .iter()
    .any(|n| name.eq_ignore_ascii_case(n))
}

/// `application/grpc`, `application/grpc+proto`, `application/grpc;...` (not grpc-web).
pub(crate) fn is_grpc_content_type(value: &[u8]) -> bool {
    let Some(rest) = value.strip_prefix(b"application/grpc") else {
        return false;
    };
    matches!(rest.first(), None | Some(b'+' | b';'))
}

/// `grpc-timeout`: up to 8 digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`).
pub(crate) fn parse_grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The gRPC status for a response the gateway answers itself with HTTP `status`, and its
/// message (as Envoy maps them; a timeout is `DEADLINE_EXCEEDED`).
pub(crate) fn grpc_status_for(status: u16) -> (u16, &'static str) {
    match status {
        400 | 405 | 411 | 414 | 505 => (13, "request refused by the gateway"),
        401 => (16, "unauthenticated"),
        403 => (7, "permission denied"),
        404 | 501 => (12, "no route for this method"),
        408 | 504 => (4, "deadline exceeded"),
        413 | 431 => (8, "request too large"),
        421 => (14, "misdirected request"),
        429 | 502 | 503 => (14, "upstream unavailable"),
        _ => (2, "gateway error"),
    }
}

/// State both directions of a stream see.
#[derive(Default)]
struct Shared {
    req_done_at: Cell<Option<Instant>>,
    responded: Cell<bool>,
    status: Cell<u16>,
}

enum PumpEnd {
    Complete,
    UpstreamGone,
}

enum PumpFail {
    Body(H1Error),
    ClientGone,
}

enum RespEnd {
    Ok {
        keep_down: bool,
    },
    Upstream(UpFail),
    /// The stream was refused before the upstream processed it (GOAWAY, REFUSED_STREAM).
    Refused,
    ClientGone,
}

/// One attempt: open the stream, then the request body and the response at once.
#[allow(clippy::too_many_arguments)] // one attempt's context
async fn exchange<R: HttpRead, W: ClientOut>(
    h2c: Rc<H2Conn>,
    request: Request<()>,
    replay: &mut Replay,
    expect_continue: bool,
    conn: &mut Conn<R, W>,
    req: &mut ReqInfo<'_>,
    rctx: &RespCtx<'_>,
    client_idle: Duration,
    deadline: Option<Instant>,
    ex: &Exchange,
    meters: &Meters<'_>,
) -> Tried {
    let slot = StreamSlot::new(h2c.clone());
    // A body an earlier attempt took is sent again by the pump, from its copy.
    let body_done = req.decoder.is_done() && !replay.has_some();
    let mut send = h2c.send.clone();
    if let Err(e) = poll_fn(|cx| send.poll_ready(cx)).await {
        tracing::debug!(error = %e, "upstream HTTP/2 connection cannot take a stream");
        h2c.draining.set(true);
        return Tried::Refused;
    }
    let (response, mut stream) = match send.send_request(request, body_done) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "upstream HTTP/2 stream refused");
            h2c.draining.set(true);
            return Tried::Refused;
        }
    };
    drop(send);
    let shared = Shared::default();
    if body_done {
        let now = Instant::now();
        shared.req_done_at.set(Some(now));
        if let Some(attempts) = rctx.retry {
            attempts.sent(now, rctx.timeout);
        }
    }
    let (method, version) = (req.method, req.version);
    // The stream is open, so the body has somewhere to go: let the client send it.
    if expect_continue && !req.decoder.is_done() && version == Version::Http11 {
        match conn.wr.interim_continue().await {
            Ok(n) => meters.client_out(n),
            Err(_) => {
                ex.answer(0, "DC");
                return Tried::Answered(Next::Close { linger: false });
            }
        }
    }
    let mut pump_end: Option<PumpEnd> = if body_done {
        Some(PumpEnd::Complete)
    } else {
        None
    };
    let joined = {
        let Conn { rd, wr, buf, .. } = &mut *conn;
        let decoder = &mut req.decoder;
        let stream = &mut stream;
        let shared = &shared;
        let replay = &mut *replay;
        let pump = async move {
            let from_copy = replay.has_some();
            if from_copy && let Some(end) = resend(stream, replay, shared, meters).await {
                return Ok(end);
            }
            pump_request(
                rd,
                buf,
                decoder,
                stream,
                client_idle,
                shared,
                meters,
                replay,
            )
            .await
        };
        let relay = relay_response(
            response, wr, method, version, rctx, deadline, shared, meters, &h2c,
        );
        let mut pump = pin!(pump);
        let mut relay = pin!(relay);
        poll_fn(|cx| {
            if pump_end.is_none() {
                match pump.as_mut().poll(cx) {
                    Poll::Ready(Ok(end)) => pump_end = Some(end),
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {}
                }
            }
            relay.as_mut().poll(cx).map(Ok)
        })
        .await
    };
    let req_complete = matches!(pump_end, Some(PumpEnd::Complete));
    drop(slot);
    let at = FailedAt {
        responded: shared.responded.get(),
        status: shared.status.get(),
        req_done: shared.req_done_at.get().is_some(),
    };
    match joined {
        Ok(RespEnd::Ok { keep_down }) => Tried::Responded {
            status: at.status,
            next: if keep_down && req_complete {
                Next::KeepAlive
            } else {
                Next::Close {
                    linger: !req_complete,
                }
            },
        },
        // Not processed, and nothing of the body was consumed: any request may go again.
        Ok(RespEnd::Refused) if !replay.lost && !at.responded => Tried::Refused,
        Ok(RespEnd::Refused) => Tried::Failed(UpFail::Closed, at),
        Ok(RespEnd::Upstream(f)) => Tried::Failed(f, at),
        Ok(RespEnd::ClientGone) | Err(PumpFail::ClientGone) => {
            ex.answer(at.status, "DC");
            Tried::Answered(Next::Close { linger: false })
        }
        Err(PumpFail::Body(e)) => {
            let flags = e.response_flag().unwrap_or("-");
            if at.responded {
                ex.answer(at.status, flags);
            } else {
                ex.answer(e.status(), flags);
                local(conn, meters, req.version, false, None).await;
            }
            Tried::Answered(Next::Close { linger: true })
        }
    }
}

/// Send `data` within the peer's flow-control window; `end`: it ends the stream (an empty
/// DATA frame when there is no data).
pub(crate) async fn send_flow(
    send: &mut SendStream<Bytes>,
    mut data: Bytes,
    end: bool,
) -> Result<(), h2::Error> {
    if data.is_empty() && end {
        return send.send_data(data, true);
    }
    while !data.is_empty() {
        send.reserve_capacity(data.len().min(MAX_DATA_CHUNK));
        let granted = match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(n)) => n,
            Some(Err(e)) => return Err(e),
            None => return Err(h2::Error::from(h2::Reason::CANCEL)),
        };
        if granted == 0 {
            continue;
        }
        let chunk = data.split_to(granted.min(data.len()));
        send.send_data(chunk, end && data.is_empty())?;
    }
    Ok(())
}

/// Send again what an earlier attempt took of the body ([`Replay`]). `Some`: the pump is
/// over (the body ended with the copy, or the upstream is gone); `None`: go on with the rest
/// from the client.
async fn resend(
    stream: &mut SendStream<Bytes>,
    replay: &Replay,
    shared: &Shared,
    meters: &Meters<'_>,
) -> Option<PumpEnd> {
    let n = replay.data.len();
    let end = replay.ended && replay.trailers.is_none();
    if send_flow(stream, Bytes::copy_from_slice(&replay.data), end)
        .await
        .is_err()
    {
        return Some(PumpEnd::UpstreamGone);
    }
    meters.upstream_out(n);
    if !replay.ended {
        return None;
    }
    if let Some(t) = replay.trailers.clone()
        && stream.send_trailers(t).is_err()
    {
        return Some(PumpEnd::UpstreamGone);
    }
    shared.req_done_at.set(Some(Instant::now()));
    Some(PumpEnd::Complete)
}

/// The request body, decoded from its HTTP/1 framing, as DATA frames (and the client's
/// trailers, when it sent any over HTTP/2).
#[allow(clippy::too_many_arguments)] // both ends of the body and what is kept of it
async fn pump_request<R: HttpRead>(
    rd: &mut R,
    buf: &mut Vec<u8>,
    decoder: &mut BodyDecoder,
    stream: &mut SendStream<Bytes>,
    idle: Duration,
    shared: &Shared,
    meters: &Meters<'_>,
    replay: &mut Replay,
) -> Result<PumpEnd, PumpFail> {
    let mut payload = Vec::new();
    loop {
        payload.clear();
        let used = decode_payload(decoder, buf, &mut payload).map_err(PumpFail::Body)?;
        buf.drain(..used);
        let done = decoder.is_done();
        if !payload.is_empty() || done {
            replay.keep(&payload);
            let n = payload.len();
            let trailers = if done { rd.take_trailers() } else { None };
            if done && !replay.lost {
                replay.ended = true;
                replay.trailers = trailers.clone();
            }
            let data = Bytes::from(std::mem::take(&mut payload));
            let end = done && trailers.is_none();
            if (n > 0 || end) && send_flow(stream, data, end).await.is_err() {
                return Ok(PumpEnd::UpstreamGone);
            }
            if let Some(t) = trailers
                && stream.send_trailers(t).is_err()
            {
                return Ok(PumpEnd::UpstreamGone);
            }
            meters.upstream_out(n);
        }
        if done {
            shared.req_done_at.set(Some(Instant::now()));
            return Ok(PumpEnd::Complete);
        }
        let rb = match rt::timeout(idle, rd.recv_buf()).await {
            Ok(Ok(Some(rb))) => rb,
            Err(rt::Elapsed) | Ok(Ok(None)) | Ok(Err(_)) => return Err(PumpFail::ClientGone),
        };
        meters.client_in(rb.len());
        buf.extend_from_slice(&rb);
    }
}

/// Wait for `fut` within the request's deadlines: the route timeout from the end of the
/// request, the gRPC deadline and, for the response head (`head`), the route's
/// `per_try_timeout` ([`UpFail::PerTryTimeout`]).
async fn within<F: Future>(
    fut: F,
    rctx: &RespCtx<'_>,
    shared: &Shared,
    deadline: Option<Instant>,
    head: bool,
) -> Result<F::Output, UpFail> {
    let mut fut = pin!(fut);
    loop {
        let now = Instant::now();
        let (mut wait, mut fail) = match shared.req_done_at.get() {
            Some(at) => (
                (at + rctx.timeout).saturating_duration_since(now),
                UpFail::Timeout,
            ),
            None => (WAIT_SLICE, UpFail::Timeout),
        };
        if let (true, Some(at), Some(per_try)) = (head, shared.req_done_at.get(), rctx.per_try) {
            let left = (at + per_try).saturating_duration_since(now);
            if left < wait {
                (wait, fail) = (left, UpFail::PerTryTimeout);
            }
        }
        if let Some(d) = deadline {
            let left = d.saturating_duration_since(now);
            if left <= wait {
                (wait, fail) = (left, UpFail::Timeout);
            }
        }
        if wait.is_zero() {
            return Err(fail);
        }
        if let Ok(out) = rt::timeout(wait, fut.as_mut()).await {
            return Ok(out);
        }
    }
}

/// What an h2 error on the response side means.
fn classify(e: &h2::Error) -> RespEnd {
    if e.is_go_away() && e.is_remote() || e.reason() == Some(h2::Reason::REFUSED_STREAM) {
        RespEnd::Refused
    } else {
        RespEnd::Upstream(UpFail::Closed)
    }
}

/// The upstream response to the client: head, body (flow-control credit returned as the bytes
/// leave), trailers.
#[allow(clippy::too_many_arguments)] // one response's context
async fn relay_response<W: ClientOut>(
    response: ResponseFuture,
    down: &mut W,
    method: Method,
    version: Version,
    rctx: &RespCtx<'_>,
    deadline: Option<Instant>,
    shared: &Shared,
    meters: &Meters<'_>,
    h2c: &H2Conn,
) -> RespEnd {
    let resp = match within(response, rctx, shared, deadline, true).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "upstream HTTP/2 stream failed");
            if e.is_go_away() {
                h2c.draining.set(true);
            }
            return classify(&e);
        }
        Err(f) => return RespEnd::Upstream(f),
    };
    let (parts, mut body) = resp.into_parts();
    let status = parts.status.as_u16();
    if status == 101 {
        return RespEnd::Upstream(UpFail::Protocol);
    }
    shared.status.set(status);
    if let Some(attempts) = rctx.retry
        && status >= 400
        && attempts.retry(Failure::Status(status))
    {
        // Dropped unread (the stream is reset); the next attempt answers.
        return RespEnd::Upstream(UpFail::RetryStatus);
    }
    let end = body.is_end_stream();
    let head_only = method == Method::Head || matches!(status, 204 | 304);
    // To an HTTP/1.1 client a body without a length goes chunked; to HTTP/1.0, close-delimited.
    let has_length = parts.headers.contains_key(http::header::CONTENT_LENGTH);
    let chunked = W::FRAMED && !end && !has_length && !head_only;
    let dechunk = chunked && version == Version::Http10;
    let mut text = Vec::with_capacity(256);
    text.extend_from_slice(b"HTTP/1.1 ");
    text.extend_from_slice(parts.status.as_str().as_bytes());
    text.push(b' ');
    text.extend_from_slice(crate::proxy::http::reason(status).as_bytes());
    text.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        if hop_by_hop(name.as_str()) {
            continue;
        }
        text.extend_from_slice(name.as_str().as_bytes());
        text.extend_from_slice(b": ");
        text.extend_from_slice(value.as_bytes());
        text.extend_from_slice(b"\r\n");
    }
    if W::FRAMED && end && !has_length && !head_only {
        text.extend_from_slice(b"content-length: 0\r\n");
    }
    if chunked {
        text.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    text.extend_from_slice(b"\r\n");
    let limits = Limits::default();
    let head: ResponseHead =
        match parse_response_resumable(&text, &limits, method, &mut HeadProgress::default()) {
            Ok(Parsed::Complete { head, .. }) => head,
            _ => return RespEnd::Upstream(UpFail::Protocol),
        };
    let req_complete = shared.req_done_at.get().is_some();
    let keep_down = rctx.client_keep_alive
        && req_complete
        && !dechunk
        && !rctx.draining.load(std::sync::atomic::Ordering::Acquire);
    let prepared = match down.prepare_head(&head, &text, rctx, dechunk, keep_down) {
        Ok(p) => p,
        Err(_) => return RespEnd::Upstream(UpFail::Protocol),
    };
    let framed_chunks = chunked && !dechunk;
    let done_now = end || (head_only && W::FRAMED);
    shared.responded.set(true);
    match down.send_head(prepared, Vec::new(), done_now).await {
        Ok(n) => meters.client_out(n),
        Err(_) => return RespEnd::ClientGone,
    }
    if done_now {
        return RespEnd::Ok { keep_down };
    }
    let mut out = Vec::new();
    loop {
        let next = match within(body.data(), rctx, shared, deadline, false).await {
            Ok(n) => n,
            Err(f) => {
                if f == UpFail::Timeout && is_grpc_response(&parts.headers) {
                    let _ = down.trailers(grpc_trailers(4, "deadline exceeded")).await;
                }
                return RespEnd::Upstream(f);
            }
        };
        match next {
            Some(Ok(data)) => {
                let n = data.len();
                meters.upstream_in(n);
                if n == 0 {
                    continue;
                }
                let sent = if framed_chunks {
                    out.clear();
                    crate::http1::write_chunk(&mut out, &data);
                    down.body(&out, false).await
                } else {
                    down.body(&data, false).await
                };
                match sent {
                    Ok(w) => meters.client_out(w),
                    Err(_) => return RespEnd::ClientGone,
                }
                let _ = body.flow_control().release_capacity(n);
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "upstream HTTP/2 response body failed");
                return RespEnd::Upstream(UpFail::Closed);
            }
            None => break,
        }
    }
    let trailers = match within(body.trailers(), rctx, shared, deadline, false).await {
        Ok(Ok(t)) => t,
        Ok(Err(_)) => return RespEnd::Upstream(UpFail::Closed),
        Err(f) => return RespEnd::Upstream(f),
    };
    let ended = match trailers {
        Some(t) if !W::FRAMED || framed_chunks => down.trailers(t).await,
        _ if framed_chunks => {
            out.clear();
            crate::http1::write_last_chunk(&mut out, None);
            down.body(&out, true).await
        }
        _ => down.body(&[], true).await,
    };
    match ended {
        Ok(n) => meters.client_out(n),
        Err(_) => return RespEnd::ClientGone,
    }
    if down.end().await.is_err() {
        return RespEnd::ClientGone;
    }
    RespEnd::Ok { keep_down }
}

fn is_grpc_response(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| is_grpc_content_type(v.as_bytes()))
}

/// `grpc-status` and `grpc-message` trailer fields.
pub(crate) fn grpc_trailers(code: u16, message: &'static str) -> HeaderMap {
    let mut t = HeaderMap::new();
    t.insert("grpc-status", HeaderValue::from(code));
    t.insert("grpc-message", HeaderValue::from_static(message));
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sleep-poll `f` on the shard for up to 5 s.
    async fn until(mut f: impl FnMut() -> bool) -> bool {
        let end = Instant::now() + Duration::from_secs(5);
        while !f() {
            if Instant::now() >= end {
                return false;
            }
            rt::sleep(Duration::from_millis(5)).await;
        }
        true
    }

    /// An HTTP/2 server on this shard allowing `max` concurrent streams per connection; it
    /// answers 200 once `release` is set. Counts the connections it accepted.
    fn h2_server(max: u32, accepted: Rc<Cell<usize>>, release: Rc<Cell<bool>>) -> SocketAddr {
        let opts = rt::ListenOptions {
            reuseport: false,
            backlog: 64,
        };
        let listener =
            rt::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)), &opts).expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(rt::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                accepted.set(accepted.get() + 1);
                let release = release.clone();
                drop(rt::spawn(async move {
                    let mut builder = h2::server::Builder::new();
                    builder.max_concurrent_streams(max);
                    let Ok(mut conn) = builder.handshake::<_, Bytes>(TokioIo::new(stream)).await
                    else {
                        return;
                    };
                    while let Some(Ok((_req, mut respond))) =
                        poll_fn(|cx| conn.poll_accept(cx)).await
                    {
                        let release = release.clone();
                        drop(rt::spawn(async move {
                            until(|| release.get()).await;
                            let _ = respond.send_response(http::Response::new(()), true);
                        }));
                    }
                }));
            }
        }));
        addr
    }

    #[test]
    fn streams_respect_the_peers_limit_then_queue_at_the_connection_cap() {
        rt::block_on(256, async {
            let accepted = Rc::new(Cell::new(0));
            let release = Rc::new(Cell::new(false));
            let addr = h2_server(2, accepted.clone(), release.clone());
            let stats = Arc::new(ClusterStats::default());
            let pool = H2Pool::new();
            let key = PoolKey::plain(addr);
            let breaker = Breaker::new(vec![stats.clone()].into());
            let limits = CircuitBreakers::default();
            let target = Target {
                endpoint: addr,
                connect_timeout: Duration::from_secs(2),
                stats: &stats,
                tls: None,
                breaker: &breaker,
                limits: &limits,
            };
            let mut open = Vec::new();
            for i in 0..12 {
                let c = pool.acquire(&key, &target).await.expect("connection");
                // The peer's SETTINGS (2 streams) have arrived before the next pick.
                assert!(until(|| c.send.current_max_send_streams() == 2).await);
                let mut send = c.send.clone();
                poll_fn(|cx| send.poll_ready(cx)).await.expect("ready");
                let req = Request::builder()
                    .uri(format!("http://{addr}/{i}"))
                    .body(())
                    .expect("request");
                let (resp, _) = send.send_request(req, true).expect("stream");
                open.push((StreamSlot::new(c), resp));
            }
            // 2 streams on each of the first connections, then another connection, up to the
            // cap of 4; past it, streams queue on the least busy one (3 each).
            assert!(until(|| accepted.get() == MAX_CONNS_PER_KEY).await);
            let mut conns: Vec<*const H2Conn> =
                open.iter().map(|(s, _)| Rc::as_ptr(&s.0)).collect();
            conns.sort();
            conns.dedup();
            assert_eq!(conns.len(), MAX_CONNS_PER_KEY);
            for (slot, _) in &open {
                assert_eq!(slot.0.streams.get(), 3);
            }
            assert_eq!(stats.connects.get(), MAX_CONNS_PER_KEY as u64);
            // Every stream, queued or not, is answered once the server lets go.
            release.set(true);
            for (slot, resp) in open {
                let resp = rt::timeout(Duration::from_secs(5), resp)
                    .await
                    .expect("answered in time")
                    .expect("response");
                assert_eq!(resp.status(), 200);
                drop(slot);
            }
            let c = pool.acquire(&key, &target).await.expect("connection");
            assert_eq!(
                c.active.get(),
                0,
                "finished streams leave the connection idle"
            );
            assert_eq!(
                accepted.get(),
                MAX_CONNS_PER_KEY,
                "no new connection when idle ones exist"
            );
        })
        .expect("ring");
    }

    #[test]
    fn connections_and_waits_stay_within_the_circuit_breakers() {
        rt::block_on(256, async {
            let accepted = Rc::new(Cell::new(0));
            let release = Rc::new(Cell::new(false));
            let a = h2_server(1, accepted.clone(), release.clone());
            let b = h2_server(1, accepted.clone(), release.clone());
            let stats = Arc::new(ClusterStats::default());
            let breaker = Breaker::new(vec![stats.clone()].into());
            let limits = CircuitBreakers {
                max_connections: Some(1),
                max_pending_requests: Some(1),
                max_requests: None,
            };
            let target = |endpoint| Target {
                endpoint,
                connect_timeout: Duration::from_secs(2),
                stats: &stats,
                tls: None,
                breaker: &breaker,
                limits: &limits,
            };
            let pool = H2Pool::new();
            let (ta, tb) = (target(a), target(b));
            let (ka, kb) = (PoolKey::plain(a), PoolKey::plain(b));
            // A second request while the first waits for the connection it opens: one pending
            // request at most.
            let mut first = pin!(pool.acquire(&ka, &ta));
            let polled = poll_fn(|cx| Poll::Ready(first.as_mut().poll(cx))).await;
            assert!(polled.is_pending(), "the connection is being opened");
            let second = pool.acquire(&ka, &ta).await;
            assert_eq!(
                second.err(),
                Some(AcquireFail::Overflow(Limit::PendingRequests))
            );
            let c = first.await.expect("connection");
            assert!(until(|| c.send.current_max_send_streams() == 1).await);
            let busy = StreamSlot::new(c.clone());
            // The connection is full and max_connections is reached: the stream queues on it.
            let again = pool
                .acquire(&ka, &ta)
                .await
                .expect("queued on the full connection");
            assert!(Rc::ptr_eq(&again, &c));
            // Another endpoint has no connection to queue on: overflow.
            let other = pool.acquire(&kb, &tb).await;
            assert_eq!(other.err(), Some(AcquireFail::Overflow(Limit::Connections)));
            assert_eq!(accepted.get(), 1);
            drop(busy);
        })
        .expect("ring");
    }

    #[test]
    fn a_body_is_kept_for_another_attempt_up_to_the_limit() {
        let mut r = Replay::default();
        assert!(!r.has_some());
        r.keep(b"hello");
        assert!(r.has_some() && !r.lost);
        r.keep(&vec![0u8; MAX_REPLAY_BODY - 5]);
        assert_eq!(r.data.len(), MAX_REPLAY_BODY, "exactly the limit is kept");
        r.keep(b"!");
        assert!(r.lost, "one byte more is not");
        assert!(!r.has_some());
        assert_eq!(r.data.capacity(), 0, "the copy is given back");
    }

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(
            parse_grpc_timeout(b"200m"),
            Some(Duration::from_millis(200))
        );
        assert_eq!(parse_grpc_timeout(b"1S"), Some(Duration::from_secs(1)));
        assert_eq!(parse_grpc_timeout(b"2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout(b"5u"), Some(Duration::from_micros(5)));
        assert_eq!(parse_grpc_timeout(b"123456789S"), None, "9 digits");
        assert_eq!(parse_grpc_timeout(b"S"), None);
        assert_eq!(parse_grpc_timeout(b"10x"), None);
        assert_eq!(parse_grpc_timeout(b"-1S"), None);
    }

    #[test]
    fn grpc_content_types() {
        assert!(is_grpc_content_type(b"application/grpc"));
        assert!(is_grpc_content_type(b"application/grpc+proto"));
        assert!(is_grpc_content_type(b"application/grpc;charset=x"));
        assert!(!is_grpc_content_type(b"application/grpc-web"));
        assert!(!is_grpc_content_type(b"application/json"));
    }

    #[test]
    fn h1_heads_become_h2_requests() {
        let head = b"POST /pkg.Svc/Call HTTP/1.1\r\nhost: api.example.test\r\n\
                     content-type: application/grpc\r\ngrpc-timeout: 200m\r\nx-a: 1\r\n\
                     transfer-encoding: chunked\r\n\r\n";
        let built = build_request(head, false).expect("request");
        let (req, timeout) = (built.request, built.grpc_timeout);
        assert_eq!(
            req.uri().to_string(),
            "http://api.example.test/pkg.Svc/Call"
        );
        assert_eq!(req.method(), http::Method::POST);
        assert_eq!(timeout, Some(Duration::from_millis(200)));
        assert_eq!(req.headers()["te"], "trailers");
        assert_eq!(req.headers()["x-a"], "1");
        assert!(!req.headers().contains_key("transfer-encoding"));
        assert!(!req.headers().contains_key("host"));
        let built = build_request(
            b"GET /x HTTP/1.1\r\nhost: h:8443\r\ngrpc-timeout: 1S\r\nexpect: 100-continue\r\n\r\n",
            true,
        )
        .expect("request");
        assert!(built.expect_continue);
        let (req, timeout) = (built.request, built.grpc_timeout);
        assert!(!req.headers().contains_key("expect"));
        assert_eq!(req.uri().to_string(), "https://h:8443/x");
        assert_eq!(timeout, None, "only gRPC requests get a deadline from it");
        assert!(!req.headers().contains_key("te"));
    }
}
