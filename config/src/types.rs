//! The validated configuration: what the daemon runs on. Built only by `TryFrom<raw::Config>`,
//! so every value here has passed the checks documented in `docs/config-reference.md`.
//!
//! Serializes (for the admin `/config_dump` and `meshgate config validate --json`) with durations
//! as the same human strings the file uses, e.g. `"30s"`.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

/// A validated meshgate configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Config {
    /// The file format version; always 1 in this release.
    pub version: u32,
    pub admin: AdminConfig,
    pub runtime: RuntimeConfig,
    /// In file order.
    pub listeners: Vec<Listener>,
    /// In file order; [`Listener::routes`] and [`Route::listener_index`] index into these.
    pub routes: Vec<Route>,
    /// In file order; [`WeightedCluster::cluster_index`] indexes into these.
    pub clusters: Vec<Cluster>,
}

impl Config {
    /// The listener called `name`.
    pub fn listener(&self, name: &str) -> Option<&Listener> {
        self.listeners.iter().find(|listener| listener.name == name)
    }

    /// The route called `name`.
    pub fn route(&self, name: &str) -> Option<&Route> {
        self.routes.iter().find(|route| route.name == name)
    }

    /// The cluster called `name`.
    pub fn cluster(&self, name: &str) -> Option<&Cluster> {
        self.clusters.iter().find(|cluster| cluster.name == name)
    }

    /// The routes of `listener`, in declared order.
    pub fn routes_of<'a>(&'a self, listener: &'a Listener) -> impl Iterator<Item = &'a Route> + 'a {
        listener
            .routes
            .iter()
            .filter_map(|&index| self.routes.get(index))
    }
}

/// The admin API (`[admin]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AdminConfig {
    /// TCP address of the admin API. Loopback unless `danger_allow_non_loopback`.
    /// Always `Some` in this release (default `127.0.0.1:15000`).
    pub address: Option<SocketAddr>,
    /// Optional Unix socket for the admin API (absolute path).
    pub unix_socket: Option<PathBuf>,
    /// Allows a non-loopback `address`. The admin API has no authentication.
    pub danger_allow_non_loopback: bool,
}

/// Threads and io_uring settings (`[runtime]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuntimeConfig {
    /// Number of shards (one per core); `None`: all CPUs the process may run on.
    pub cores: Option<usize>,
    /// Pin each shard to its CPU.
    pub pin: bool,
    /// How long open connections may finish after shutdown or reload begins.
    #[serde(serialize_with = "crate::duration::serialize")]
    pub drain_timeout: Duration,
    /// io_uring submission queue size per shard: a power of two in `2..=32768`.
    pub ring_entries: u32,
}

/// A listening socket (`[[listeners]]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Listener {
    /// Unique among listeners; `[A-Za-z0-9_.-]{1,64}`.
    pub name: String,
    /// IP and port; port 0 picks an ephemeral port.
    pub address: SocketAddr,
    pub protocol: Protocol,
    /// Open downstream connections allowed on this listener, summed over all shards; `>= 1`.
    pub max_connections: u32,
    /// A connection with no traffic in either direction for this long is closed; `> 0`.
    #[serde(serialize_with = "crate::duration::serialize")]
    pub idle_timeout: Duration,
    /// `listen(2)` backlog, `1..=65535`.
    pub backlog: u32,
    /// Indices into [`Config::routes`] of the routes bound to this listener, in declared order.
    /// Exactly one for a `tcp` listener.
    pub routes: Vec<usize>,
}

/// What a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// Plain TCP proxying: bytes are copied unchanged to the route's cluster.
    Tcp,
}

impl Protocol {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Binds traffic on a listener to clusters (`[[routes]]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Route {
    /// Unique among routes.
    pub name: String,
    /// Name of the listener this route is bound to.
    pub listener: String,
    /// Index of that listener in [`Config::listeners`].
    pub listener_index: usize,
    pub action: RouteAction,
}

/// What a route does with a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteAction {
    /// Forward to one of `clusters`, picked in proportion to the weights. A route written with
    /// `cluster = "x"` has a single entry of weight 1. Never empty; names are unique; the sum of
    /// the weights fits in a `u32`.
    Forward { clusters: Vec<WeightedCluster> },
}

/// One destination of a route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WeightedCluster {
    /// Name of the cluster.
    pub cluster: String,
    /// Index of that cluster in [`Config::clusters`].
    pub cluster_index: usize,
    /// Relative weight, `>= 1`.
    pub weight: u32,
}

/// A set of upstream endpoints (`[[clusters]]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cluster {
    /// Unique among clusters.
    pub name: String,
    /// Non-empty, no duplicates, port != 0, not an unspecified or multicast IP.
    pub endpoints: Vec<SocketAddr>,
    /// Time allowed for the upstream TCP connect; `> 0`.
    #[serde(serialize_with = "crate::duration::serialize")]
    pub connect_timeout: Duration,
    pub balance: Balance,
}

/// How a cluster spreads connections over its endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    RoundRobin,
}

impl Balance {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::RoundRobin => "round_robin",
        }
    }
}

impl fmt::Display for Balance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
