//! `upstream::connect`: open a connection to an endpoint of the chosen cluster.
//!
//! The cluster's [`EndpointPicker`](crate::balance::EndpointPicker) chooses (round robin, least
//! request or Maglev on `key`, skipping unhealthy and ejected endpoints); a refused or timed-out
//! attempt moves on to another endpoint, up to one attempt per endpoint (at most
//! [`MAX_ATTEMPTS`]), each bounded by the cluster's `connect_timeout`. No usable endpoint:
//! [`ProxyErrorKind::NoHealthyUpstream`](crate::error::ProxyErrorKind) (flag `UH`). Failures are counted per cluster; a connection that is open
//! holds a [`UpstreamGuard`] so the active gauge is right however the connection ends.

use std::io;
use std::net::SocketAddr;
use std::rc::Rc;

use crate::error::{ProxyError, ProxyErrorKind};
use crate::health::Outcome;
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
    /// Index of the endpoint in the cluster (counted in flight for `least_request`).
    pub endpoint_index: usize,
}

impl Drop for UpstreamGuard {
    fn drop(&mut self) {
        self.snap.clusters[self.cluster].active.dec();
        self.snap.balancers[self.cluster].end(self.endpoint_index);
    }
}

/// Connect to cluster `cluster`; `key`: the connection's hash key for a `maglev` cluster
/// ([`EndpointPicker::hash_key`](crate::balance::EndpointPicker::hash_key)).
pub async fn connect(
    snap: &Rc<ShardGen>,
    cluster: usize,
    key: Option<u64>,
) -> Result<Upstream, ProxyError> {
    let cfg = &snap.config.clusters[cluster];
    let stats = &snap.clusters[cluster];
    let picker = &snap.balancers[cluster];
    let attempts = cfg.endpoints.len().clamp(1, MAX_ATTEMPTS);
    let mut last = None;
    let mut tried = [usize::MAX; MAX_ATTEMPTS];
    for attempt in 0..attempts {
        let Some(index) = picker.pick_excluding(key, &tried[..attempt]) else {
            break;
        };
        tried[attempt] = index;
        let endpoint = cfg.endpoints[index];
        match rt::timeout(cfg.connect_timeout, rt::TcpStream::connect(endpoint)).await {
            Ok(Ok(stream)) => {
                stats.connects.inc();
                stats.active.inc();
                picker.begin_owned(index);
                picker.report(index, Outcome::Connected);
                return Ok(Upstream {
                    stream,
                    endpoint,
                    guard: UpstreamGuard {
                        snap: snap.clone(),
                        cluster,
                        endpoint_index: index,
                    },
                });
            }
            Ok(Err(e)) => {
                picker.report(index, Outcome::GatewayFailure);
                stats.connect_failures.inc();
                tracing::debug!(cluster = %cfg.name, %endpoint, error = %e, "upstream connect failed");
                last = Some(ProxyError::upstream_connect(endpoint, e));
            }
            Err(rt::Elapsed) => {
                picker.report(index, Outcome::GatewayFailure);
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
    Err(last.unwrap_or(ProxyError {
        kind: ProxyErrorKind::NoHealthyUpstream,
    }))
}
