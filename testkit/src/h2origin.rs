//! [`H2Origin`]: an HTTP/2 (h2c prior knowledge) origin that answers every request with its
//! name, or misbehaves on demand ([`H2Fault`]): resets or refuses streams, sends GOAWAY before
//! processing anything, answers a fixed status, or stalls. It counts what it saw (connections,
//! streams, request body bytes), so a test can tell which origin a request reached and whether
//! a request was sent twice.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::grpc::ServerThread;

/// How an [`H2Origin`] treats what arrives instead of answering 200.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum H2Fault {
    /// Read the request (body included), then reset the stream with `INTERNAL_ERROR`: the
    /// client sees a reset before any response head.
    Reset,
    /// Reset each stream with `REFUSED_STREAM` as soon as its head arrives (body unread): the
    /// request was not processed.
    Refuse,
    /// On each new connection, send SETTINGS and `GOAWAY` with last stream ID 0 (nothing
    /// processed) and keep the connection open until the client closes it.
    GoAway,
    /// Read the request, answer this status (body: the status as text).
    Status(u16),
    /// Accept connections and never answer a byte (a TLS client's handshake stalls).
    Stall,
}

#[derive(Debug, Default)]
struct Counts {
    connections: AtomicUsize,
    streams: AtomicUsize,
    body_bytes: AtomicUsize,
}

#[derive(Debug)]
struct State {
    name: String,
    delay: Duration,
    fault: Mutex<Option<H2Fault>>,
    counts: Counts,
}

impl State {
    fn fault(&self) -> Option<H2Fault> {
        *self.fault.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// An h2c origin on 127.0.0.1 on its own thread and tokio runtime; stopped on drop.
#[derive(Debug)]
pub struct H2Origin {
    pub addr: SocketAddr,
    state: Arc<State>,
    _runtime: ServerThread,
}

impl H2Origin {
    /// Answers every request `200` with `name` as body.
    pub fn start(name: &str) -> H2Origin {
        Self::spawn(name, Duration::ZERO, None)
    }

    /// Like [`H2Origin::start`], answering each request `delay` after its head arrived.
    pub fn start_with_delay(name: &str, delay: Duration) -> H2Origin {
        Self::spawn(name, delay, None)
    }

    /// Misbehaves as `fault` says from the start.
    pub fn start_failing(fault: H2Fault) -> H2Origin {
        Self::spawn("failing", Duration::ZERO, Some(fault))
    }

    fn spawn(name: &str, delay: Duration, fault: Option<H2Fault>) -> H2Origin {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind h2 origin");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(State {
            name: name.to_owned(),
            delay,
            fault: Mutex::new(fault),
            counts: Counts::default(),
        });
        let st = state.clone();
        let runtime = ServerThread::spawn(move |mut stopped| async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    accepted = listener.accept() => {
                        let Ok((tcp, _)) = accepted else { continue };
                        st.counts.connections.fetch_add(1, Ordering::SeqCst);
                        tokio::spawn(serve(tcp, st.clone()));
                    }
                }
            }
        });
        H2Origin {
            addr,
            state,
            _runtime: runtime,
        }
    }

    /// Misbehave as `fault` says from now on (`None`: answer 200 again).
    pub fn set_fault(&self, fault: Option<H2Fault>) {
        *self.state.fault.lock().unwrap_or_else(|e| e.into_inner()) = fault;
    }

    /// Request heads (streams) received so far, refused ones included.
    pub fn count(&self) -> usize {
        self.state.counts.streams.load(Ordering::SeqCst)
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.counts.connections.load(Ordering::SeqCst)
    }

    /// Request body bytes received so far.
    pub fn body_bytes(&self) -> usize {
        self.state.counts.body_bytes.load(Ordering::SeqCst)
    }
}

async fn serve(mut tcp: tokio::net::TcpStream, state: Arc<State>) {
    match state.fault() {
        Some(H2Fault::Stall) => {
            let mut sink = [0u8; 4096];
            while matches!(tcp.read(&mut sink).await, Ok(n) if n > 0) {}
            return;
        }
        Some(H2Fault::GoAway) => {
            // An empty SETTINGS frame, then GOAWAY(last stream 0, NO_ERROR).
            let mut frames = vec![0, 0, 0, 0x4, 0, 0, 0, 0, 0];
            frames.extend_from_slice(&[0, 0, 8, 0x7, 0, 0, 0, 0, 0]);
            frames.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
            let mut sink = [0u8; 4096];
            if tcp.read(&mut sink).await.is_err() || tcp.write_all(&frames).await.is_err() {
                return;
            }
            while matches!(tcp.read(&mut sink).await, Ok(n) if n > 0) {}
            return;
        }
        _ => {}
    }
    let Ok(mut conn) = h2::server::handshake(tcp).await else {
        return;
    };
    while let Some(Ok((req, respond))) = conn.accept().await {
        state.counts.streams.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(stream(req, respond, state.clone()));
    }
}

async fn stream(
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    state: Arc<State>,
) {
    let fault = state.fault();
    if fault == Some(H2Fault::Refuse) {
        respond.send_reset(h2::Reason::REFUSED_STREAM);
        return;
    }
    let mut body = req.into_body();
    while let Some(Ok(chunk)) = body.data().await {
        let _ = body.flow_control().release_capacity(chunk.len());
        state
            .counts
            .body_bytes
            .fetch_add(chunk.len(), Ordering::SeqCst);
    }
    if !state.delay.is_zero() {
        tokio::time::sleep(state.delay).await;
    }
    let (status, text) = match fault {
        Some(H2Fault::Reset) => {
            respond.send_reset(h2::Reason::INTERNAL_ERROR);
            return;
        }
        Some(H2Fault::Status(code)) => (code, format!("{code}\n")),
        _ => (200, state.name.clone()),
    };
    let resp = http::Response::builder()
        .status(status)
        .header("content-type", "text/plain")
        .header("content-length", text.len())
        .body(())
        .expect("response");
    if let Ok(mut send) = respond.send_response(resp, false) {
        let _ = send.send_data(Bytes::from(text), true);
    }
}
