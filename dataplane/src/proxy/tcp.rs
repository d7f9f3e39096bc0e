//! L4 forwarding for `tcp`, `tls-passthrough` and `tls` listeners:
//! `listen::accept` -> (`tls::secure` | ClientHello peek) -> `route::resolve` -> `balance::pick`
//! -> `upstream::connect` (+ TLS origination for clusters with `[clusters.tls]`) -> relay ->
//! access log.
//!
//! - `tcp`: the listener's single route.
//! - `tls-passthrough`: the ClientHello is read (never decrypted), routes match on its SNI, and
//!   the bytes read so far go to the upstream first, untouched.
//! - `tls`: TLS is terminated here; routes match on SNI and the verified peer SPIFFE ID; the
//!   plaintext is relayed.

use std::cell::Cell;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use meshgate_config::{Protocol, RouteAction};

use crate::accesslog::Record;
use crate::authz;
use crate::error::ProxyError;
use crate::listen::ConnGuard;
use crate::metrics::ConnectionRecord;
use crate::proxy::relay::{self, Down, Idle, Meters, Up};
use crate::rt;
use crate::shard::ShardGen;
use crate::tls;
use crate::tls::setup::select_route;
use crate::tls::spiffe::SpiffeId;
use crate::upstream;

/// What was learnt about a connection before routing.
#[derive(Debug, Default)]
struct Seen {
    sni: Option<String>,
    peer: Option<SpiffeId>,
    tls_version: Option<&'static str>,
    /// Bytes already read from the client that the upstream must get first (passthrough).
    prefix: Vec<u8>,
}

/// Serve one downstream connection of a `tcp`, `tls-passthrough` or `tls` listener.
pub async fn serve(guard: ConnGuard, stream: rt::TcpStream, peer: SocketAddr) {
    let snap = guard.snap.clone();
    let idx = guard.listener;
    let listener = &snap.config.listeners[idx];
    let lstats = &snap.listeners[idx].stats;
    let (down, mut seen) = match listener.protocol {
        Protocol::Tcp => (Down::Plain(stream), Seen::default()),
        Protocol::Http | Protocol::Https => {
            tracing::error!(listener = %listener.name, "http listener handed to the L4 path; closing");
            return;
        }
        Protocol::TlsPassthrough => {
            let mut stream = stream;
            let mut buf = Vec::new();
            match rt::timeout(
                listener.handshake_timeout,
                Box::pin(tls::stream::peek_client_hello(&mut stream, &mut buf)),
            )
            .await
            {
                Ok(Ok(hello)) => {
                    let sni = hello.server_name.as_deref().map(|n| n.to_ascii_lowercase());
                    (
                        Down::Plain(stream),
                        Seen {
                            sni,
                            prefix: buf,
                            ..Seen::default()
                        },
                    )
                }
                Ok(Err(e)) => {
                    tracing::debug!(listener = %listener.name, %peer, error = %e, "no usable ClientHello; closing");
                    log(&guard, peer, None, "-", None, &Seen::default(), 0, 0, None);
                    return;
                }
                Err(rt::Elapsed) => {
                    tracing::debug!(listener = %listener.name, %peer, "ClientHello timed out; closing");
                    return;
                }
            }
        }
        Protocol::Tls => {
            let Some(state) = snap.listener_tls.get(idx).and_then(|s| s.clone()) else {
                tracing::error!(listener = %listener.name, "tls listener without TLS state; closing");
                return;
            };
            // Boxed: the handshake's state is large and must not size every connection's task.
            match rt::timeout(
                listener.handshake_timeout,
                Box::pin(tls::secure(stream, &state)),
            )
            .await
            {
                Ok(Ok(secured)) => {
                    secured.count(&lstats.tls, &state);
                    let seen = Seen {
                        sni: secured.sni,
                        peer: secured.peer,
                        tls_version: secured.version.map(|v| tls::version_label(Some(v))),
                        prefix: Vec::new(),
                    };
                    (Down::Tls(Box::new(secured.stream)), seen)
                }
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
            }
        }
    };

    // authz::check
    if let Some(policies) = &snap.listeners[guard.listener].policies {
        let caller = authz::Caller {
            client: peer,
            peer: seen.peer.as_ref(),
            sni: seen.sni.as_deref(),
        };
        if let Err(denied) = policies.check_connection(&caller) {
            tracing::debug!(listener = %listener.name, %peer, policy = ?denied.policy, "refused by policy; closing");
            let details = denied.details();
            log(&guard, peer, None, "-", None, &seen, 0, 0, Some(details));
            close(down).await;
            return;
        }
    }

    // route::resolve
    let route_idx = match listener.protocol {
        Protocol::Tcp => listener.routes.first().copied(),
        _ => select_route(
            &snap.config.routes,
            &listener.routes,
            listener.default_route,
            seen.sni.as_deref(),
            seen.peer.as_ref(),
        ),
    };
    let Some(route_idx) = route_idx else {
        lstats.no_route.inc();
        tracing::debug!(listener = %listener.name, %peer, sni = ?seen.sni, peer_id = ?seen.peer, "no route; closing");
        log(&guard, peer, None, "NR", None, &seen, 0, 0, None);
        close(down).await;
        return;
    };
    // L4 routes only forward (the config refuses other actions on L4 listeners).
    let RouteAction::Forward { clusters } = &snap.config.routes[route_idx].action else {
        close(down).await;
        return;
    };
    // balance::pick
    let Some(target) = clusters.get(snap.route_pickers[route_idx].pick()) else {
        return;
    };
    let cluster = target.cluster_index;
    let peer_id = seen.peer.as_ref().map(|p| p.as_str());
    let tcp_stats = snap.route_tcp[route_idx]
        .iter()
        .find(|t| t.cluster == cluster);
    if let Some(t) = tcp_stats {
        t.opened(peer_id);
    }
    let received = Cell::new(0);
    let sent = Cell::new(0);
    let mut upstream_host = None;
    // Ok(Some): a plain relay to hand to a task of its own.
    let outcome: Result<Option<Relayed>, ProxyError> = async {
        let key = snap.balancers[cluster].hash_key(None, peer, seen.peer.as_ref());
        let up = upstream::connect(&snap, cluster, key).await?;
        upstream_host = Some(up.endpoint);
        let guard_up = up.guard;
        let mut up_conn = match snap.cluster_tls.get(cluster).and_then(|s| s.clone()) {
            None => Up::Plain(up.stream),
            Some(tls_state) => {
                let timeout = snap.config.clusters[cluster].connect_timeout;
                let handshake = Box::pin(tls::stream::connect(
                    up.stream,
                    tls_state.client_config.clone(),
                    tls_state.server_name.clone(),
                ));
                match rt::timeout(timeout, handshake).await {
                    Ok(Ok(s)) => Up::Tls(Box::new(s)),
                    Ok(Err(e)) => {
                        snap.clusters[cluster].connect_failures.inc();
                        return Err(ProxyError::upstream_connect(
                            up.endpoint,
                            std::io::Error::other(format!("TLS: {e}")),
                        ));
                    }
                    Err(rt::Elapsed) => {
                        snap.clusters[cluster].connect_failures.inc();
                        snap.clusters[cluster].connect_timeouts.inc();
                        return Err(ProxyError::upstream_connect(
                            up.endpoint,
                            std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                "TLS handshake timed out",
                            ),
                        ));
                    }
                }
            }
        };
        if !seen.prefix.is_empty() {
            // Taken, not cloned: the ClientHello must not stay allocated for the connection's
            // lifetime.
            let prefix = std::mem::take(&mut seen.prefix);
            let len = prefix.len() as u64;
            write_prefix(&mut up_conn, prefix)
                .await
                .map_err(|e| ProxyError::io(crate::error::Blame::Upstream, e))?;
            lstats.bytes_in.add(len);
            snap.clusters[cluster].bytes_sent.add(len);
            received.set(len);
        }
        let idle = Idle::new(listener.idle_timeout);
        let (down, up_conn) = match (down, up_conn) {
            (Down::Plain(d), Up::Plain(u)) => {
                // Hand the connection to a task of its own that holds only what relaying and
                // the end of the connection need (see `Relayed`).
                return Ok(Some(Relayed {
                    relay: relay::PlainRelay::new(d, u, &idle),
                    idle,
                    received: received.get(),
                    sent: 0,
                    up_guard: guard_up,
                    route: route_idx,
                    sni: seen.sni.take(),
                }));
            }
            other => other,
        };
        let meters = meters(&snap, idx, cluster, &received, &sent);
        let r = relay::relay(down, up_conn, &meters, &idle).await;
        count_idle_timeout(&snap, idx, &r);
        drop(guard_up);
        r.map(|()| None)
    }
    .await;
    let outcome = match outcome {
        Ok(Some(relayed)) => {
            rt::spawn(RelayTask {
                relayed,
                guard,
                peer,
            });
            return;
        }
        Ok(None) => Ok(()),
        Err(e) => Err(e),
    };
    finish(
        &guard,
        peer,
        (route_idx, cluster),
        upstream_host,
        &seen,
        received.get(),
        sent.get(),
        &outcome,
    );
}

/// The byte counters a relay of listener `listener` to cluster `cluster` bumps.
fn meters<'a>(
    snap: &'a ShardGen,
    listener: usize,
    cluster: usize,
    received: &'a Cell<u64>,
    sent: &'a Cell<u64>,
) -> Meters<'a> {
    let lstats = &snap.listeners[listener].stats;
    let cstats = &snap.clusters[cluster];
    Meters {
        up: [&lstats.bytes_in, &cstats.bytes_sent],
        down: [&cstats.bytes_received, &lstats.bytes_out],
        received,
        sent,
    }
}

fn count_idle_timeout(snap: &ShardGen, listener: usize, r: &Result<(), ProxyError>) {
    if let Err(e) = r
        && matches!(e.kind, crate::error::ProxyErrorKind::IdleTimeout)
    {
        snap.listeners[listener].stats.idle_timeouts.inc();
    }
}

/// A relayed connection's end: metrics, debug log, access log.
#[allow(clippy::too_many_arguments)] // one access-log record's worth of fields
fn finish(
    guard: &ConnGuard,
    peer: SocketAddr,
    (route_idx, cluster): (usize, usize),
    upstream_host: Option<SocketAddr>,
    seen: &Seen,
    received: u64,
    sent: u64,
    outcome: &Result<(), ProxyError>,
) {
    let snap = &guard.snap;
    let flags = match outcome {
        Ok(()) => "-",
        Err(e) => {
            let listener = &snap.config.listeners[guard.listener].name;
            tracing::debug!(%listener, generation = snap.generation, %peer, upstream = ?upstream_host, error = %e, flag = e.response_flag(), "connection ended");
            e.response_flag()
        }
    };
    let peer_id = seen.peer.as_ref().map(|p| p.as_str());
    if let Some(t) = snap.route_tcp[route_idx]
        .iter()
        .find(|t| t.cluster == cluster)
    {
        t.closed(&ConnectionRecord {
            elapsed: guard.accepted_at.elapsed(),
            received,
            sent,
            flags,
            peer: peer_id,
        });
    }
    log(
        guard,
        peer,
        Some((route_idx, cluster)),
        flags,
        upstream_host,
        seen,
        received,
        sent,
        None,
    );
}

/// A plain <-> plain connection (`tcp`, or `tls-passthrough` after its ClientHello) once its
/// upstream is connected: all an idle relayed connection holds. It runs as a task of its own so
/// that the state of the stages before it (handshake timers, routing, the upstream connect) is
/// freed rather than kept, and its future stays small enough for async-task to keep it inside
/// the task's one allocation.
struct RelayTask {
    relayed: Relayed,
    guard: ConnGuard,
    peer: SocketAddr,
}

/// What [`RelayTask`] carries besides the connection's guard and peer address.
struct Relayed {
    relay: relay::PlainRelay,
    idle: Idle,
    /// Bytes from the client (including a passthrough ClientHello) and to the client.
    received: u64,
    sent: u64,
    /// The upstream endpoint's slot in its cluster's counts and balancer (names the endpoint).
    up_guard: upstream::UpstreamGuard,
    route: usize,
    /// The passthrough SNI, for the access log.
    sni: Option<String>,
}

impl std::fmt::Debug for RelayTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayTask")
            .field("relay", &self.relayed.relay)
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl Future for RelayTask {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let r = &mut this.relayed;
        let snap = &*this.guard.snap;
        let cluster = r.up_guard.cluster;
        let (received, sent) = (Cell::new(r.received), Cell::new(r.sent));
        let m = meters(snap, this.guard.listener, cluster, &received, &sent);
        let polled = r.relay.poll_relay(cx, &m, &r.idle);
        (r.received, r.sent) = (received.get(), sent.get());
        let Poll::Ready(outcome) = polled else {
            return Poll::Pending;
        };
        count_idle_timeout(snap, this.guard.listener, &outcome);
        let endpoint = snap.config.clusters[cluster]
            .endpoints
            .get(r.up_guard.endpoint_index)
            .copied();
        let seen = Seen {
            sni: r.sni.take(),
            ..Seen::default()
        };
        finish(
            &this.guard,
            this.peer,
            (r.route, cluster),
            endpoint,
            &seen,
            r.received,
            r.sent,
            &outcome,
        );
        Poll::Ready(())
    }
}

/// Close a downstream we will not serve (TLS: with close_notify), without waiting long.
async fn close(down: Down) {
    if let Down::Tls(mut s) = down {
        let _ = rt::timeout(
            Duration::from_secs(1),
            std::future::poll_fn(|cx| {
                futures_io::AsyncWrite::poll_close(std::pin::Pin::new(&mut *s), cx)
            }),
        )
        .await;
    }
}

async fn write_prefix(up: &mut Up, prefix: Vec<u8>) -> std::io::Result<()> {
    match up {
        Up::Plain(s) => s.write_all_owned(prefix).await.0,
        Up::Tls(s) => {
            let mut off = 0;
            while off < prefix.len() {
                let n = std::future::poll_fn(|cx| {
                    futures_io::AsyncWrite::poll_write(
                        std::pin::Pin::new(&mut **s),
                        cx,
                        &prefix[off..],
                    )
                })
                .await?;
                if n == 0 {
                    return Err(std::io::ErrorKind::WriteZero.into());
                }
                off += n;
            }
            Ok(())
        }
    }
}

#[allow(clippy::too_many_arguments)] // one access-log record's worth of fields
fn log(
    guard: &ConnGuard,
    peer: SocketAddr,
    target: Option<(usize, usize)>,
    flags: &'static str,
    upstream_host: Option<SocketAddr>,
    seen: &Seen,
    received: u64,
    sent: u64,
    details: Option<String>,
) {
    let Some(log) = &guard.shard.access_log else {
        return;
    };
    let snap = &guard.snap;
    log.log(Record {
        start_time: guard.start_time,
        duration: guard.accepted_at.elapsed(),
        protocol: "TCP",
        method: None,
        path: None,
        authority: None,
        response_code: 0,
        response_flags: flags,
        bytes_received: received,
        bytes_sent: sent,
        upstream_host,
        upstream_request_attempt_count: None,
        upstream_cluster: target.map(|(_, c)| snap.cluster_names[c].clone()),
        downstream_remote_address: peer,
        downstream_local_address: None,
        requested_server_name: seen.sni.clone(),
        route_name: target.map(|(r, _)| snap.route_names[r].clone()),
        listener: snap.listener_names[guard.listener].clone(),
        downstream_peer_spiffe_id: seen.peer.as_ref().map(|p| p.as_str().to_string()),
        tls_version: seen.tls_version,
        x_forwarded_for: None,
        user_agent: None,
        request_id: None,
        response_code_details: details,
        grpc_status: None,
        shard: guard.shard.id,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every idle relayed connection holds one [`RelayTask`] (in its task's allocation, next to
    /// async-task's header): keep it far below async-task's 2 KiB limit, past which the future
    /// is boxed apart, and below the 2 KiB per connection target as a whole.
    #[test]
    fn relay_task_stays_small() {
        let size = size_of::<RelayTask>();
        assert!(size <= 768, "RelayTask is {size} bytes");
    }
}
