//! The TCP proxy pipeline: `listen::accept` -> `route::resolve` -> `balance::pick` ->
//! `upstream::connect` -> copy both ways.
//!
//! The copy loop is zero-copy in user space: each direction receives into a buffer the kernel
//! picked from the shard's provided-buffer ring and sends that same buffer on; the buffer goes
//! back to the ring when the send completes. Half-close is honoured (EOF on one side becomes
//! `shutdown(SHUT_WR)` on the other; the other direction keeps flowing). Both directions share
//! one idle clock: the connection closes only when *neither* side moved data for `idle_timeout`.

use std::cell::Cell;
use std::future::{Future, poll_fn};
use std::net::SocketAddr;
use std::pin::pin;
use std::task::Poll;
use std::time::{Duration, Instant};

use meshgate_config::RouteAction;

use crate::accesslog::Record;
use crate::error::{Blame, ProxyError};
use crate::listen::ConnGuard;
use crate::metrics::Counter;
use crate::rt;
use crate::upstream;

/// Serve one downstream connection of a `tcp` listener.
pub async fn serve(guard: ConnGuard, downstream: rt::TcpStream, peer: SocketAddr) {
    let snap = guard.snap.clone();
    let listener = &snap.config.listeners[guard.listener];
    // route::resolve: a tcp listener has exactly one route (validated by the config crate).
    let Some(&route_idx) = listener.routes.first() else {
        tracing::error!(listener = %listener.name, "tcp listener without a route; closing");
        return;
    };
    let RouteAction::Forward { clusters } = &snap.config.routes[route_idx].action;
    // balance::pick
    let Some(target) = clusters.get(snap.route_pickers[route_idx].pick()) else {
        return;
    };
    let moved = Moved::default();
    let mut upstream_host = None;
    // upstream::connect, then the copy loop.
    let outcome = match upstream::connect(&snap, target.cluster_index).await {
        Err(e) => Err(e),
        Ok(up) => {
            upstream_host = Some(up.endpoint);
            let lstats = &snap.listeners[guard.listener].stats;
            let cstats = &snap.clusters[target.cluster_index];
            let idle = Idle::new(listener.idle_timeout);
            let (down_rd, down_wr) = downstream.into_split();
            let (up_rd, up_wr) = up.stream.into_split();
            let to_upstream = pump(
                down_rd,
                up_wr,
                Blame::Downstream,
                [&lstats.bytes_in, &cstats.bytes_sent],
                &moved.received,
                &idle,
            );
            let to_downstream = pump(
                up_rd,
                down_wr,
                Blame::Upstream,
                [&cstats.bytes_received, &lstats.bytes_out],
                &moved.sent,
                &idle,
            );
            let r = both_or_first_error(to_upstream, to_downstream).await;
            if let Err(e) = &r
                && matches!(e.kind, crate::error::ProxyErrorKind::IdleTimeout)
            {
                lstats.idle_timeouts.inc();
            }
            drop(up.guard);
            r
        }
    };
    let flags = match &outcome {
        Ok(()) => "-",
        Err(e) => {
            tracing::debug!(listener = %listener.name, generation = snap.generation, %peer, upstream = ?upstream_host, error = %e, flag = e.response_flag(), "connection ended");
            e.response_flag()
        }
    };
    if let Some(log) = &guard.shard.access_log {
        log.log(Record {
            start_time: guard.start_time,
            duration: guard.accepted_at.elapsed(),
            protocol: "TCP",
            method: None,
            path: None,
            authority: None,
            response_code: 0,
            response_flags: flags,
            bytes_received: moved.received.get(),
            bytes_sent: moved.sent.get(),
            upstream_host,
            upstream_cluster: Some(snap.cluster_names[target.cluster_index].clone()),
            downstream_remote_address: peer,
            downstream_local_address: None,
            requested_server_name: None,
            route_name: Some(snap.route_names[route_idx].clone()),
            listener: snap.listener_names[guard.listener].clone(),
            downstream_peer_spiffe_id: None,
            tls_version: None,
            x_forwarded_for: None,
            user_agent: None,
            request_id: None,
            shard: guard.shard.id,
        });
    }
    drop(guard);
}

/// Bytes this connection moved, for its access-log record.
#[derive(Debug, Default)]
struct Moved {
    /// From the client.
    received: Cell<u64>,
    /// To the client.
    sent: Cell<u64>,
}

/// The idle clock both directions of a connection share.
#[derive(Debug)]
struct Idle {
    timeout: Duration,
    last: Cell<Instant>,
}

impl Idle {
    fn new(timeout: Duration) -> Self {
        Idle {
            timeout,
            last: Cell::new(Instant::now()),
        }
    }
    fn touch(&self) {
        self.last.set(Instant::now());
    }
    /// Time left before the connection counts as idle; None once it is.
    fn remaining(&self) -> Option<Duration> {
        self.timeout
            .checked_sub(self.last.get().elapsed())
            .filter(|d| !d.is_zero())
    }
}

/// Copy `from` -> `to` until EOF (then half-close `to`) or an error.
async fn pump(
    mut from: rt::ReadHalf,
    mut to: rt::WriteHalf,
    reader_blame: Blame,
    [read_counter, write_counter]: [&Counter; 2],
    moved: &Cell<u64>,
    idle: &Idle,
) -> Result<(), ProxyError> {
    let writer_blame = match reader_blame {
        Blame::Downstream => Blame::Upstream,
        _ => Blame::Downstream,
    };
    loop {
        let Some(left) = idle.remaining() else {
            return Err(ProxyError::idle());
        };
        let buf = match rt::timeout(left, from.recv_buf()).await {
            Err(rt::Elapsed) => continue, // re-check: the other direction may have moved data
            Ok(Err(e)) => return Err(ProxyError::io(reader_blame, e)),
            Ok(Ok(None)) => {
                // EOF: pass the half-close on; a peer that already went away is not an error.
                let _ = to.shutdown_write().await;
                return Ok(());
            }
            Ok(Ok(Some(buf))) => buf,
        };
        let n = buf.len() as u64;
        read_counter.add(n);
        idle.touch();
        let (res, buf) = to.write_all_owned(buf).await;
        drop(buf); // back to the provided-buffer ring
        res.map_err(|e| ProxyError::io(writer_blame, e))?;
        write_counter.add(n);
        moved.set(moved.get() + n);
        idle.touch();
    }
}

/// Run both directions; finish when both finished, or at the first error (dropping the other).
async fn both_or_first_error<A, B>(a: A, b: B) -> Result<(), ProxyError>
where
    A: Future<Output = Result<(), ProxyError>>,
    B: Future<Output = Result<(), ProxyError>>,
{
    let mut a = pin!(a);
    let mut b = pin!(b);
    let (mut a_done, mut b_done) = (false, false);
    poll_fn(|cx| {
        if !a_done && let Poll::Ready(r) = a.as_mut().poll(cx) {
            r?;
            a_done = true;
        }
        if !b_done && let Poll::Ready(r) = b.as_mut().poll(cx) {
            r?;
            b_done = true;
        }
        if a_done && b_done {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await
}
