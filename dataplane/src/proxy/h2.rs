//! HTTP/2 downstream: `https` connections that chose `h2` by ALPN and plain `http` connections
//! that start with the HTTP/2 preface (h2c prior knowledge).
//!
//! Where it sits: after `listen::accept` (and `tls::secure`), in place of the HTTP/1 request
//! loop of `proxy::http`. The h2 crate does the framing, HPACK, flow control and the
//! protocol's limits; it runs on the shard's own executor (no tokio runtime: tokio is a
//! dependency only for the `AsyncRead`/`AsyncWrite` traits h2 takes, adapted here over the
//! runtime's streams by [`TokioIo`]).
//!
//! One request model: each stream's head is written as an HTTP/1.1 head and parsed by the
//! same strict codec, then goes through the very same `proxy::http::request` (route, plan,
//! forward with retries, access log, metrics) as an HTTP/1 request. The stream is the
//! request's connection: [`H2Body`] is its `HttpRead` (DATA frames, chunk-framed when the
//! request has no content-length; flow-control credit returned as bytes go upstream) and
//! [`H2Out`] its `ClientOut` (response HEADERS, DATA within the peer's window, END_STREAM).
//! Upstreams stay HTTP/1.1.
//!
//! Limits: at most [`MAX_CONCURRENT_STREAMS`] open streams, a header list of at most 60 KiB
//! (larger: 431 on that stream), and rapid-reset protection: h2's own caps on streams reset
//! before they were accepted and on streams we had to reset, plus a count here of streams the
//! client reset before their response was sent; past [`MAX_CLIENT_RESETS`] (and more resets
//! than completed streams) the connection gets GOAWAY `ENHANCE_YOUR_CALM`. A stream already
//! reset when its task starts costs no upstream work.

use std::cell::Cell;
use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::ops::Deref;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{Reason, RecvStream, SendStream};
use http::{HeaderName, HeaderValue, Response, StatusCode};

use crate::http1::{
    H1Error, HeadProgress, Parsed, ResponseHead, Violation, parse_request_resumable,
};
use crate::listen::ConnGuard;
use crate::proxy::http::{
    ClientOut, Conn, HeadError, HeadRead, LocalResp, RespCtx, TlsInfo, request,
};
use crate::proxy::http_io::HttpRead;
use crate::rt::{self, IoBuf};

/// Streams a client may have open at once.
pub const MAX_CONCURRENT_STREAMS: u32 = 100;
/// Largest header list (HPACK-decoded) a request may carry; larger gets 431.
pub const MAX_HEADER_LIST_SIZE: u32 = 60 * 1024;
/// Streams the client may reset before the gateway accepted them (h2's own counter).
const MAX_PENDING_ACCEPT_RESETS: usize = 50;
/// Streams the gateway may reset for the client's protocol errors.
const MAX_LOCAL_ERROR_RESETS: usize = 1024;
/// Streams the client may reset before their response, beyond the streams it completed.
pub const MAX_CLIENT_RESETS: u32 = 200;
/// Time to finish the connection preface and settings exchange.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the accept loop looks at idle time and drains.
const TICK: Duration = Duration::from_secs(1);

/// Serve one HTTP/2 connection. `prefix`: bytes already read from `io` (the preface, when the
/// HTTP/1 loop recognised it).
pub(crate) async fn serve<T>(
    guard: ConnGuard,
    io: T,
    prefix: Vec<u8>,
    peer: SocketAddr,
    tls: Option<Rc<TlsInfo>>,
) where
    T: futures_io::AsyncRead + futures_io::AsyncWrite + Unpin + 'static,
{
    let guard = Rc::new(guard);
    let snap = guard.snap.clone();
    let Some(routes) = snap.http.listener(guard.listener) else {
        return;
    };
    let mut builder = h2::server::Builder::new();
    builder
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESETS)
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
        .max_send_buffer_size(256 * 1024)
        .initial_window_size(256 * 1024)
        .initial_connection_window_size(1024 * 1024);
    let io = TokioIo { io, prefix, at: 0 };
    let mut conn = match rt::timeout(HANDSHAKE_TIMEOUT, builder.handshake::<_, Bytes>(io)).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "HTTP/2 handshake failed");
            return;
        }
        Err(rt::Elapsed) => {
            tracing::debug!(%peer, "HTTP/2 handshake timed out");
            return;
        }
    };
    let state = Rc::new(ConnState::default());
    let draining = &guard.shard.shared.draining;
    let mut idle_since = Some(Instant::now());
    let mut shutting_down = false;
    loop {
        let next = rt::timeout(TICK, poll_fn(|cx| conn.poll_accept(cx))).await;
        match next {
            Ok(Some(Ok((req, respond)))) => {
                idle_since = None;
                state.open.set(state.open.get() + 1);
                state.accepted.set(state.accepted.get() + 1);
                // The stream's future (several KiB) is written straight into a box, and the
                // task holds only the pointer: spawning it by value copied it twice.
                let task = Box::write(
                    Box::new_uninit(),
                    stream(
                        guard.clone(),
                        req,
                        respond,
                        peer,
                        tls.clone(),
                        state.clone(),
                    ),
                );
                drop(rt::spawn(Box::into_pin(task)));
            }
            Ok(Some(Err(e))) => {
                tracing::debug!(%peer, error = %e, "HTTP/2 connection error");
                break;
            }
            Ok(None) => break,
            Err(rt::Elapsed) => {}
        }
        if state.open.get() == 0 {
            idle_since.get_or_insert_with(Instant::now);
        }
        let resets = state.client_resets.get();
        if !shutting_down && resets > MAX_CLIENT_RESETS && u64::from(resets) > state.completed.get()
        {
            tracing::info!(%peer, resets, "HTTP/2 client keeps resetting streams; GOAWAY");
            conn.abrupt_shutdown(Reason::ENHANCE_YOUR_CALM);
            shutting_down = true;
        }
        let idle = idle_since.is_some_and(|t| t.elapsed() >= routes.idle_timeout);
        if !shutting_down && (idle || draining.load(std::sync::atomic::Ordering::Acquire)) {
            conn.graceful_shutdown();
            shutting_down = true;
        }
    }
    // Open streams hold the guard; the connection itself is done.
}

/// What the accept loop and the stream tasks of one connection share.
#[derive(Debug, Default)]
struct ConnState {
    open: Cell<u32>,
    accepted: Cell<u64>,
    completed: Cell<u64>,
    client_resets: Cell<u32>,
}

/// One stream: its request through `proxy::http::request`, as an HTTP/1 request would go.
async fn stream(
    guard: Rc<ConnGuard>,
    req: http::Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    peer: SocketAddr,
    tls: Option<Rc<TlsInfo>>,
    state: Rc<ConnState>,
) {
    struct Open(Rc<ConnState>);
    impl Drop for Open {
        fn drop(&mut self) {
            self.0.open.set(self.0.open.get().saturating_sub(1));
        }
    }
    let _open = Open(state.clone());
    // Reset before we got to it (rapid reset): no work for it at all.
    let mut cx = Context::from_waker(std::task::Waker::noop());
    if respond.poll_reset(&mut cx).is_ready() {
        state.client_resets.set(state.client_resets.get() + 1);
        return;
    }
    // Each stream takes the current generation's routes, clusters and policies.
    let snap = guard.request_snap();
    let Some(routes) = snap.http.listener(guard.listener) else {
        return;
    };
    let (parts, body) = req.into_parts();
    let grpc = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| super::h2_upstream::is_grpc_content_type(v.as_bytes()));
    let grpc_timeout = parts
        .headers
        .get("grpc-timeout")
        .filter(|_| grpc)
        .and_then(|v| super::h2_upstream::parse_grpc_timeout(v.as_bytes()));
    let mut buf = Vec::with_capacity(256);
    let chunked = write_head(&parts, !body.is_end_stream(), &mut buf);
    let mut conn = Conn {
        rd: H2Body {
            recv: body,
            chunked,
            done: false,
            trailers: None,
        },
        wr: H2Out {
            respond,
            send: None,
            started: false,
            peer_reset: false,
            grpc,
            grpc_status: None,
            grpc_timeout,
        },
        buf,
        progress: HeadProgress::default(),
        peer,
        served: 0,
        tls,
        proto: "HTTP/2",
    };
    let result = match parse_request_resumable(&conn.buf, &routes.limits, &mut conn.progress) {
        Ok(Parsed::Complete { head, consumed }) => Ok((head, consumed)),
        Ok(Parsed::Partial) => Err(HeadError::Invalid(H1Error::Request(
            Violation::InvalidRequestLine,
        ))),
        Err(e) => Err(HeadError::Invalid(e)),
    };
    let bytes = conn.buf.len() as u64;
    let read = HeadRead { result, bytes };
    request(&guard, &snap, routes, &mut conn, read).await;
    if conn.wr.peer_reset {
        state.client_resets.set(state.client_resets.get() + 1);
    } else {
        state.completed.set(state.completed.get() + 1);
        // Whatever was not sent completely ends the stream here (a cut-off response).
        if let Some(send) = conn.wr.send.as_mut() {
            send.send_reset(Reason::INTERNAL_ERROR);
        } else if !conn.wr.started && conn.wr.respond_open() {
            conn.wr.respond.send_reset(Reason::INTERNAL_ERROR);
        }
    }
}

/// The stream's request as an HTTP/1.1 head for the codec. Connection-specific fields (not
/// allowed in HTTP/2, which h2 refuses anyway), `expect` other than `100-continue` (the one
/// interim response relayed) and `host` (the `:authority` stands for it) are left out. Returns whether a body without
/// content-length is sent chunked.
fn write_head(parts: &http::request::Parts, has_body: bool, out: &mut Vec<u8>) -> bool {
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(if target.is_empty() {
        b"/"
    } else {
        target.as_bytes()
    });
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let authority = parts.uri.authority();
    if let Some(a) = authority {
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(a.as_str().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let mut has_length = false;
    for (name, value) in &parts.headers {
        let n = name.as_str();
        if matches!(
            n,
            "connection"
                | "keep-alive"
                | "proxy-connection"
                | "transfer-encoding"
                | "upgrade"
                | "te"
                | "expect"
        ) && !(n == "expect" && value.as_bytes().eq_ignore_ascii_case(b"100-continue"))
            || (n == "host" && authority.is_some())
        {
            continue;
        }
        has_length |= n == "content-length";
        out.extend_from_slice(n.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let chunked = has_body && !has_length;
    if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    out.extend_from_slice(b"\r\n");
    chunked
}

/// A stream's request body as HTTP/1 body bytes.
struct H2Body {
    recv: RecvStream,
    /// Frame each DATA payload as a chunk and end with the last chunk.
    chunked: bool,
    done: bool,
    /// The client's trailer fields, once the body ended with them.
    trailers: Option<http::HeaderMap>,
}

impl HttpRead for H2Body {
    type Buf = Vec<u8>;

    async fn recv_buf(&mut self) -> io::Result<Option<Vec<u8>>> {
        loop {
            if self.done {
                return Ok(None);
            }
            match self.recv.data().await {
                Some(Ok(data)) => {
                    // The bytes are leaving this stream now: let the client send more.
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    if data.is_empty() {
                        continue;
                    }
                    if !self.chunked {
                        return Ok(Some(data.to_vec()));
                    }
                    let mut out = Vec::with_capacity(data.len() + 12);
                    out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
                    out.extend_from_slice(&data);
                    out.extend_from_slice(b"\r\n");
                    return Ok(Some(out));
                }
                Some(Err(e)) => return Err(io::Error::other(e)),
                None => {
                    self.done = true;
                    // Trailers (if any) follow the last DATA frame.
                    self.trailers = self.recv.trailers().await.ok().flatten();
                    if self.chunked {
                        return Ok(Some(b"0\r\n\r\n".to_vec()));
                    }
                    return Ok(None);
                }
            }
        }
    }

    fn take_trailers(&mut self) -> Option<http::HeaderMap> {
        self.trailers.take()
    }
}

/// A stream's response side.
struct H2Out {
    respond: SendResponse<Bytes>,
    /// After the response head: the body stream (`None` once ended).
    send: Option<SendStream<Bytes>>,
    /// The response head was sent.
    started: bool,
    /// The client reset the stream.
    peer_reset: bool,
    /// A gRPC request: the gateway's own errors go out as gRPC statuses.
    grpc: bool,
    /// The `grpc-status` sent (response head of a trailers-only response, or trailers).
    grpc_status: Option<u16>,
    /// The client's `grpc-timeout` (route edits may remove it from what goes upstream).
    grpc_timeout: Option<Duration>,
}

impl H2Out {
    fn respond_open(&mut self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        !self.peer_reset && self.respond.poll_reset(&mut cx).is_pending()
    }

    fn fail(&mut self, e: h2::Error) -> io::Error {
        if e.is_remote() || e.is_reset() {
            self.peer_reset = true;
        }
        io::Error::other(e)
    }

    fn start(&mut self, resp: Response<()>, end: bool) -> io::Result<()> {
        if let Some(code) = grpc_status_of(resp.headers()) {
            self.grpc_status = Some(code);
        }
        match self.respond.send_response(resp, end) {
            Ok(send) => {
                self.started = true;
                self.send = (!end).then_some(send);
                Ok(())
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Send `data` within the client's flow-control window.
    async fn data(&mut self, data: Bytes, end: bool) -> io::Result<usize> {
        let total = data.len();
        let Some(mut send) = self.send.take() else {
            return Err(io::ErrorKind::BrokenPipe.into());
        };
        if let Err(e) = super::h2_upstream::send_flow(&mut send, data, end).await {
            return Err(self.fail(e));
        }
        if !end {
            self.send = Some(send);
        }
        Ok(total)
    }
}

/// `name: value` into `headers`, skipping what HTTP/2 does not carry.
fn push_field(headers: &mut http::HeaderMap, name: &str, value: &[u8], append: bool) {
    let (Ok(name), Ok(value)) = (
        HeaderName::from_bytes(name.as_bytes()),
        HeaderValue::from_bytes(value),
    ) else {
        return;
    };
    if append {
        headers.append(name, value);
    } else {
        headers.insert(name, value);
    }
}

/// Connection-specific fields (RFC 9113 section 8.2.2).
fn connection_specific(name: &str) -> bool {
    [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
    ]
    .iter()
    .any(|n| name.eq_ignore_ascii_case(n))
}

impl ClientOut for H2Out {
    const FRAMED: bool = false;
    type Head = Response<()>;

    async fn local(&mut self, r: &LocalResp<'_>) -> io::Result<usize> {
        if self.grpc && r.status >= 400 {
            return self.grpc_local(r.status);
        }
        let body = r.body_or_reason();
        let no_body = matches!(r.status, 204 | 304);
        let mut resp = Response::new(());
        *resp.status_mut() =
            StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let headers = resp.headers_mut();
        let taken = |name: &str| r.edits.is_some_and(|e| e.takes_over(name));
        if !no_body {
            push_field(
                headers,
                "content-length",
                body.len().to_string().as_bytes(),
                false,
            );
            if !body.is_empty() && !taken("content-type") {
                push_field(headers, "content-type", b"text/plain", false);
            }
        }
        if let Some(location) = r.location
            && !taken("location")
        {
            push_field(headers, "location", location, false);
        }
        if let Some(edits) = r.edits {
            for (name, value) in edits.set.iter() {
                push_field(headers, name, value, false);
            }
            for (name, value) in edits.add.iter() {
                push_field(headers, name, value, true);
            }
        }
        let send_body = !r.head_only && !no_body && !body.is_empty();
        self.start(resp, !send_body)?;
        if send_body {
            self.data(Bytes::copy_from_slice(&body), true).await?;
        }
        Ok(body.len())
    }

    async fn interim_continue(&mut self) -> io::Result<usize> {
        let mut resp = Response::new(());
        *resp.status_mut() = StatusCode::CONTINUE;
        match self.respond.send_informational(resp) {
            Ok(()) => Ok(0),
            Err(e) => Err(self.fail(e)),
        }
    }

    fn prepare_head(
        &self,
        head: &ResponseHead,
        buf: &[u8],
        cx: &RespCtx<'_>,
        _dechunk: bool,
        _keep_down: bool,
    ) -> Result<Response<()>, H1Error> {
        let mut resp = Response::new(());
        *resp.status_mut() = StatusCode::from_u16(head.status())
            .map_err(|_| H1Error::Response(Violation::InvalidStatusLine))?;
        let edits = cx.edits;
        // Sized once: growing the map field by field cost allocations per response.
        *resp.headers_mut() =
            http::HeaderMap::with_capacity(head.header_count() + edits.set.len() + edits.add.len());
        let headers = resp.headers_mut();
        for (name, value) in head.headers(buf) {
            if connection_specific(name) || edits.takes_over(name) {
                continue;
            }
            push_field(headers, name, value, true);
        }
        for (name, value) in edits.set.iter() {
            push_field(headers, name, value, false);
        }
        for (name, value) in edits.add.iter() {
            push_field(headers, name, value, true);
        }
        Ok(resp)
    }

    fn head_buf(_: &mut Response<()>) -> Option<&mut Vec<u8>> {
        None
    }

    async fn send_head(
        &mut self,
        head: Response<()>,
        first: Vec<u8>,
        done: bool,
    ) -> io::Result<usize> {
        let end = done && first.is_empty();
        self.start(head, end)?;
        if !first.is_empty() {
            self.data(Bytes::from(first), done).await
        } else {
            Ok(0)
        }
    }

    async fn body(&mut self, b: &[u8], done: bool) -> io::Result<usize> {
        self.data(Bytes::copy_from_slice(b), done).await
    }

    async fn body_owned<B: IoBuf + Deref<Target = [u8]>>(
        &mut self,
        b: B,
        done: bool,
    ) -> io::Result<usize> {
        self.data(Bytes::copy_from_slice(&b), done).await
    }

    async fn end(&mut self) -> io::Result<()> {
        if self.send.is_some() {
            self.data(Bytes::new(), true).await?;
        }
        Ok(())
    }

    async fn trailers(&mut self, trailers: http::HeaderMap) -> io::Result<usize> {
        if let Some(code) = grpc_status_of(&trailers) {
            self.grpc_status = Some(code);
        }
        let Some(mut send) = self.send.take() else {
            return Err(io::ErrorKind::BrokenPipe.into());
        };
        match send.send_trailers(trailers) {
            Ok(()) => Ok(0),
            Err(e) => Err(self.fail(e)),
        }
    }

    fn grpc_status(&self) -> Option<u16> {
        self.grpc_status
    }

    fn grpc_timeout(&self) -> Option<Duration> {
        self.grpc_timeout
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl H2Out {
    /// The gateway's own error `status` as a gRPC client understands it (as Envoy answers):
    /// HTTP 200, `content-type: application/grpc`, and `grpc-status`/`grpc-message` in a
    /// trailers-only response.
    fn grpc_local(&mut self, status: u16) -> io::Result<usize> {
        let (code, message) = super::h2_upstream::grpc_status_for(status);
        let mut resp = Response::new(());
        let headers = resp.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert("grpc-status", HeaderValue::from(code));
        headers.insert("grpc-message", HeaderValue::from_static(message));
        self.start(resp, true)?;
        Ok(0)
    }
}

/// The `grpc-status` among `headers`, if any.
fn grpc_status_of(headers: &http::HeaderMap) -> Option<u16> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// tokio's `AsyncRead`/`AsyncWrite` (what h2 takes) over a runtime stream (`futures_io`),
/// serving `prefix` first.
pub(crate) struct TokioIo<T> {
    io: T,
    prefix: Vec<u8>,
    at: usize,
}

impl<T> TokioIo<T> {
    pub(crate) fn new(io: T) -> Self {
        TokioIo {
            io,
            prefix: Vec::new(),
            at: 0,
        }
    }
}

impl<T: futures_io::AsyncRead + Unpin> tokio::io::AsyncRead for TokioIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.at < this.prefix.len() {
            let n = (this.prefix.len() - this.at).min(buf.remaining());
            buf.put_slice(&this.prefix[this.at..this.at + n]);
            this.at += n;
            if this.at == this.prefix.len() {
                this.prefix = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        let dst = buf.initialize_unfilled();
        match Pin::new(&mut this.io).poll_read(cx, dst) {
            Poll::Ready(Ok(n)) => {
                buf.advance(n);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: futures_io::AsyncWrite + Unpin> tokio::io::AsyncWrite for TokioIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_close(cx)
    }
}

/// The two halves of a plain connection as one `futures_io` stream again (h2c after the
/// HTTP/1 loop recognised the preface).
#[derive(Debug)]
pub(crate) struct Pair<R, W> {
    pub rd: R,
    pub wr: W,
}

impl<R: futures_io::AsyncRead + Unpin, W: Unpin> futures_io::AsyncRead for Pair<R, W> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().rd).poll_read(cx, buf)
    }
}

impl<R: Unpin, W: futures_io::AsyncWrite + Unpin> futures_io::AsyncWrite for Pair<R, W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().wr).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().wr).poll_flush(cx)
    }
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().wr).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head_of(req: http::Request<()>, has_body: bool) -> (String, bool) {
        let (parts, ()) = req.into_parts();
        let mut out = Vec::new();
        let chunked = write_head(&parts, has_body, &mut out);
        (String::from_utf8(out).expect("utf-8 head"), chunked)
    }

    #[test]
    fn stream_heads_become_http1_heads_without_connection_fields() {
        let req = http::Request::builder()
            .method("POST")
            .uri("https://api.example.test:8443/v1/items?x=1")
            .header("host", "ignored.example.test")
            .header("te", "trailers")
            .header("expect", "100-continue")
            .header("x-a", "1")
            .header("x-a", "2")
            .body(())
            .expect("request");
        let (head, chunked) = head_of(req, true);
        assert!(chunked);
        assert_eq!(
            head,
            "POST /v1/items?x=1 HTTP/1.1\r\nhost: api.example.test:8443\r\n\
             expect: 100-continue\r\nx-a: 1\r\nx-a: 2\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        let req = http::Request::builder()
            .method("PUT")
            .uri("/up")
            .header("host", "h.example.test")
            .header("content-length", "3")
            .body(())
            .expect("request");
        let (head, chunked) = head_of(req, true);
        assert!(!chunked, "a length frames the body");
        assert_eq!(
            head,
            "PUT /up HTTP/1.1\r\nhost: h.example.test\r\ncontent-length: 3\r\n\r\n"
        );
        let (head, chunked) = head_of(
            http::Request::builder()
                .uri("http://a.example.test/")
                .body(())
                .expect("request"),
            false,
        );
        assert!(!chunked);
        assert_eq!(head, "GET / HTTP/1.1\r\nhost: a.example.test\r\n\r\n");
    }

    #[test]
    fn the_written_head_parses_with_the_http1_codec() {
        let req = http::Request::builder()
            .method("GET")
            .uri("https://api.example.test/a/../b")
            .header("x-forwarded-client-cert", "URI=spiffe://evil/x")
            .body(())
            .expect("request");
        let (parts, ()) = req.into_parts();
        let mut out = Vec::new();
        write_head(&parts, false, &mut out);
        let parsed = crate::http1::parse_request(&out, &crate::http1::Limits::default());
        let Ok(Parsed::Complete { head, consumed }) = parsed else {
            panic!("not parsed: {parsed:?}");
        };
        assert_eq!(consumed, out.len());
        assert_eq!(head.host(&out), Some("api.example.test"));
    }
}
