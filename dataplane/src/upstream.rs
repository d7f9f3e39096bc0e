//! `upstream::connect`: open a connection to an endpoint of the chosen cluster.
//!
//! Round robin over the cluster's endpoints; a refused or timed-out attempt moves on to the next
//! endpoint, up to one attempt per endpoint (at most [`MAX_ATTEMPTS`]), each bounded by the
//! cluster's `connect_timeout`. Failures are counted per cluster; a connection that is open
//! holds a [`UpstreamGuard`] so the active gauge is right however the connection ends.

use std::io;
use std::net::SocketAddr;
use std::rc::Rc;

use crate::error::ProxyError;
use crate::rt;
use crate::shard::ShardGen;

/// Upper bound on endpoints tried for one downstream connection.
pub const MAX_ATTEMPTS: usize = 3;

/// An open upstream connection and its bookkeeping.
#[derive(Debug)]
pub struct Upstream {
    pub stream: rt::TcpStream,
    pub endpoint: SocketAddr,
    pub guard: UpstreamGuard,
}

#[derive(Debug)]
pub struct UpstreamGuard {
    snap: Rc<ShardGen>,
    pub cluster: usize,
}

impl Drop for UpstreamGuard {
    fn drop(&mut self) {
        self.snap.clusters[self.cluster].active.dec();
    }
}

/// Connect to cluster `cluster`, trying endpoints in round-robin order.
pub async fn connect(snap: &Rc<ShardGen>, cluster: usize) -> Result<Upstream, ProxyError> {
    let cfg = &snap.config.clusters[cluster];
    let stats = &snap.clusters[cluster];
    let attempts = cfg.endpoints.len().clamp(1, MAX_ATTEMPTS);
    let mut last = None;
    for _ in 0..attempts {
        let Some(&endpoint) = cfg.endpoints.get(snap.endpoint_rr[cluster].pick()) else {
            break;
        };
        match rt::timeout(cfg.connect_timeout, rt::TcpStream::connect(endpoint)).await {
            Ok(Ok(stream)) => {
                stats.connects.inc();
                stats.active.inc();
                return Ok(Upstream {
                    stream,
                    endpoint,
                    guard: UpstreamGuard {
                        snap: snap.clone(),
                        cluster,
                    },
                });
            }
            Ok(Err(e)) => {
                stats.connect_failures.inc();
                tracing::debug!(cluster = %cfg.name, %endpoint, error = %e, "upstream connect failed");
                last = Some(ProxyError::upstream_connect(endpoint, e));
            }
            Err(rt::Elapsed) => {
                stats.connect_failures.inc();
                stats.connect_timeouts.inc();
                tracing::debug!(cluster = %cfg.name, %endpoint, "upstream connect timed out");
                last = Some(ProxyError::upstream_connect(
                    endpoint,
                    io::Error::new(io::ErrorKind::TimedOut, "connect timed out"),
                ));
            }
        }
    }
    Err(last.unwrap_or_else(|| ProxyError::internal("cluster has no endpoints")))
}
