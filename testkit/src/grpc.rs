//! gRPC peers for the gateway tests (feature `grpc`): a tonic server ([`GrpcServer`], service
//! `test.Echo`) and client ([`GrpcClient`]), both on their own tokio runtime, plus
//! [`raw_call`], one gRPC request over the h2 crate that shows exactly what came back (status
//! line, `grpc-status` in the head or the trailers, timing) without a client library's own
//! deadline handling in the way.
//!
//! No protobuf: messages are raw bytes (a pass-through codec), so a test can check payloads
//! byte for byte. Methods:
//! - `Unary`: echoes the payload; `status:<code>:<message>` answers that status instead;
//!   `sleep:<ms>` waits that long, then echoes.
//! - `ServerStream`: `<count>,<size>` answers `count` messages of `size` bytes, message `i`
//!   filled with byte `i % 251`.
//! - `Bidi`: answers each message as it arrives, with its bytes reversed.
//! - anything else: `UNIMPLEMENTED` (12).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes};
use tokio_stream::{Stream, StreamExt};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{BoxFuture, Context, Poll, Service, http};
use tonic::server::{NamedService, ServerStreamingService, StreamingService, UnaryService};
use tonic::transport::{Channel, Endpoint};
pub use tonic::{Code, Status};
use tonic::{Request, Response, Streaming};

/// Messages as bytes, unchanged.
#[derive(Debug, Default, Clone, Copy)]
pub struct RawCodec;

#[derive(Debug)]
pub struct RawEncoder;

#[derive(Debug)]
pub struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let n = src.remaining();
        Ok(Some(src.copy_to_bytes(n).to_vec()))
    }
}

/// Message `i` of a server stream of `size`-byte messages.
pub fn stream_message(i: usize, size: usize) -> Vec<u8> {
    vec![(i % 251) as u8; size]
}

#[derive(Debug, Clone, Copy)]
struct Unary;

impl UnaryService<Vec<u8>> for Unary {
    type Response = Vec<u8>;
    type Future = BoxFuture<Response<Vec<u8>>, Status>;
    fn call(&mut self, req: Request<Vec<u8>>) -> Self::Future {
        Box::pin(async move {
            let payload = req.into_inner();
            let text = String::from_utf8_lossy(&payload).into_owned();
            if let Some(rest) = text.strip_prefix("status:") {
                let (code, message) = rest.split_once(':').unwrap_or((rest, ""));
                let code = Code::from_i32(code.parse().unwrap_or(2));
                return Err(Status::new(code, message.to_owned()));
            }
            if let Some(ms) = text.strip_prefix("sleep:") {
                let ms = ms.parse().unwrap_or(0);
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            Ok(Response::new(payload))
        })
    }
}

type MsgStream = std::pin::Pin<Box<dyn Stream<Item = Result<Vec<u8>, Status>> + Send>>;

#[derive(Debug, Clone, Copy)]
struct ServerStream;

impl ServerStreamingService<Vec<u8>> for ServerStream {
    type Response = Vec<u8>;
    type ResponseStream = MsgStream;
    type Future = BoxFuture<Response<MsgStream>, Status>;
    fn call(&mut self, req: Request<Vec<u8>>) -> Self::Future {
        Box::pin(async move {
            let text = String::from_utf8_lossy(req.get_ref()).into_owned();
            let (count, size) = text
                .split_once(',')
                .and_then(|(c, s)| Some((c.parse::<usize>().ok()?, s.parse::<usize>().ok()?)))
                .ok_or_else(|| Status::invalid_argument("want <count>,<size>"))?;
            let stream = tokio_stream::iter((0..count).map(move |i| Ok(stream_message(i, size))));
            Ok(Response::new(Box::pin(stream) as MsgStream))
        })
    }
}

#[derive(Debug, Clone, Copy)]
struct Bidi;

impl StreamingService<Vec<u8>> for Bidi {
    type Response = Vec<u8>;
    type ResponseStream = MsgStream;
    type Future = BoxFuture<Response<MsgStream>, Status>;
    fn call(&mut self, req: Request<Streaming<Vec<u8>>>) -> Self::Future {
        Box::pin(async move {
            let input = req.into_inner();
            let out = input.map(|m| {
                m.map(|mut v| {
                    v.reverse();
                    v
                })
            });
            Ok(Response::new(Box::pin(out) as MsgStream))
        })
    }
}

/// The `test.Echo` service as tonic's router takes it.
#[derive(Debug, Clone, Copy)]
struct Echo;

impl NamedService for Echo {
    const NAME: &'static str = "test.Echo";
}

impl Service<http::Request<tonic::body::Body>> for Echo {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(RawCodec);
            Ok(match req.uri().path() {
                "/test.Echo/Unary" => grpc.unary(Unary, req).await,
                "/test.Echo/ServerStream" => grpc.server_streaming(ServerStream, req).await,
                "/test.Echo/Bidi" => grpc.streaming(Bidi, req).await,
                _ => Status::unimplemented("no such method").into_http(),
            })
        })
    }
}

/// A tonic server for `test.Echo` on 127.0.0.1, on its own thread and runtime; stopped on drop.
#[derive(Debug)]
pub struct GrpcServer {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    _runtime: ServerThread,
}

impl GrpcServer {
    pub fn start() -> GrpcServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind gRPC server");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("local addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let runtime = ServerThread::spawn(move |stopped| async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(
                move |s: std::io::Result<tokio::net::TcpStream>| {
                    count.fetch_add(1, Ordering::SeqCst);
                    s
                },
            );
            let _ = tonic::transport::Server::builder()
                .add_service(Echo)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await;
        });
        GrpcServer {
            addr,
            accepted,
            _runtime: runtime,
        }
    }

    /// TCP connections the server accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// A server's own thread and current-thread tokio runtime, running the future `spawn` was given
/// until it ends; dropping this signals the future (the receiver it got) and joins the thread.
#[derive(Debug)]
pub(crate) struct ServerThread {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ServerThread {
    pub(crate) fn spawn<F, Fut>(serve: F) -> ServerThread
    where
        F: FnOnce(tokio::sync::oneshot::Receiver<()>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()>,
    {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(serve(stopped));
        });
        ServerThread {
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A tonic client (HTTP/2 with prior knowledge) to `addr`, blocking calls.
#[derive(Debug)]
pub struct GrpcClient {
    rt: tokio::runtime::Runtime,
    channel: Channel,
}

impl GrpcClient {
    pub fn connect(addr: SocketAddr) -> anyhow::Result<GrpcClient> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))?;
        let channel = rt.block_on(endpoint.connect())?;
        Ok(GrpcClient { rt, channel })
    }

    fn grpc(&self) -> tonic::client::Grpc<Channel> {
        tonic::client::Grpc::new(self.channel.clone())
    }

    pub fn unary(&self, payload: Vec<u8>) -> Result<Vec<u8>, Status> {
        self.rt.block_on(async {
            let mut grpc = self.grpc();
            grpc.ready()
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
            let path = http::uri::PathAndQuery::from_static("/test.Echo/Unary");
            let resp = grpc.unary(Request::new(payload), path, RawCodec).await?;
            Ok(resp.into_inner())
        })
    }

    /// A method the server does not have.
    pub fn missing(&self) -> Result<Vec<u8>, Status> {
        self.rt.block_on(async {
            let mut grpc = self.grpc();
            grpc.ready()
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
            let path = http::uri::PathAndQuery::from_static("/test.Missing/Call");
            let resp = grpc.unary(Request::new(Vec::new()), path, RawCodec).await?;
            Ok(resp.into_inner())
        })
    }

    /// `ServerStream` with `count` messages of `size` bytes.
    pub fn server_stream(&self, count: usize, size: usize) -> Result<Vec<Vec<u8>>, Status> {
        self.rt.block_on(async {
            let mut grpc = self.grpc();
            grpc.ready()
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
            let path = http::uri::PathAndQuery::from_static("/test.Echo/ServerStream");
            let req = Request::new(format!("{count},{size}").into_bytes());
            let mut stream = grpc
                .server_streaming(req, path, RawCodec)
                .await?
                .into_inner();
            let mut out = Vec::new();
            while let Some(m) = stream.message().await? {
                out.push(m);
            }
            Ok(out)
        })
    }

    /// `Bidi`, one message at a time: each is sent only after the answer to the previous one
    /// arrived, so both directions are open at once. Returns the answers.
    pub fn bidi(&self, messages: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, Status> {
        self.rt.block_on(async {
            let mut grpc = self.grpc();
            grpc.ready()
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
            let path = http::uri::PathAndQuery::from_static("/test.Echo/Bidi");
            let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(1);
            let outbound = tokio_stream::wrappers::ReceiverStream::new(rx);
            let mut messages = messages.into_iter();
            let first = messages.next();
            if let Some(m) = first {
                tx.send(m)
                    .await
                    .map_err(|_| Status::internal("request stream closed"))?;
            }
            let mut inbound = grpc
                .streaming(Request::new(outbound), path, RawCodec)
                .await?
                .into_inner();
            let mut out = Vec::new();
            let mut tx = Some(tx);
            while let Some(m) = inbound.message().await? {
                out.push(m);
                match messages.next() {
                    Some(next) => {
                        if let Some(tx) = &tx {
                            tx.send(next)
                                .await
                                .map_err(|_| Status::internal("request stream closed"))?;
                        }
                    }
                    None => tx = None, // half-close: the server ends its side
                }
            }
            Ok(out)
        })
    }
}

/// What [`raw_call`] saw.
#[derive(Debug, Clone)]
pub struct RawReply {
    pub status: u16,
    /// From the response head (trailers-only) or the trailers.
    pub grpc_status: Option<String>,
    pub grpc_message: Option<String>,
    /// The status was in the response head (a trailers-only response).
    pub trailers_only: bool,
    pub body: Vec<u8>,
    pub elapsed: Duration,
}

/// One gRPC call over plain HTTP/2 (prior knowledge) with the h2 crate: `payload` as one
/// length-prefixed message, `headers` added (e.g. `grpc-timeout`). No deadline of its own.
pub fn raw_call(
    addr: SocketAddr,
    path: &str,
    payload: &[u8],
    headers: &[(&str, &str)],
) -> anyhow::Result<RawReply> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let (mut send, conn) = h2::client::handshake(tcp).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = http::Request::builder()
            .method("POST")
            .uri(format!("http://{addr}{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        for (n, v) in headers {
            req = req.header(*n, *v);
        }
        let req = req.body(())?;
        let started = Instant::now();
        let (resp, mut stream) = send.send_request(req, false)?;
        let mut frame = Vec::with_capacity(payload.len() + 5);
        frame.push(0);
        frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        frame.extend_from_slice(payload);
        stream.send_data(Bytes::from(frame), true)?;
        let resp = resp.await?;
        let (parts, mut body) = resp.into_parts();
        let head_status = parts.headers.get("grpc-status").cloned();
        let head_message = parts.headers.get("grpc-message").cloned();
        let mut data = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk?;
            let _ = body.flow_control().release_capacity(chunk.len());
            data.extend_from_slice(&chunk);
        }
        let trailers = body.trailers().await?;
        let elapsed = started.elapsed();
        let text = |v: Option<&http::HeaderValue>| {
            v.map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        };
        let (grpc_status, grpc_message, trailers_only) = match (&head_status, &trailers) {
            (Some(s), _) => (text(Some(s)), text(head_message.as_ref()), true),
            (None, Some(t)) => (
                text(t.get("grpc-status")),
                text(t.get("grpc-message")),
                false,
            ),
            (None, None) => (None, None, false),
        };
        Ok(RawReply {
            status: parts.status.as_u16(),
            grpc_status,
            grpc_message,
            trailers_only,
            body: data,
            elapsed,
        })
    })
}
