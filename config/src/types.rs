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

use crate::spiffe::{SpiffeId, TrustDomain};

/// A validated meshgate configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Config {
    /// The file format version; always 1 in this release.
    pub version: u32,
    pub admin: AdminConfig,
    pub runtime: RuntimeConfig,
    /// `None`: no `[access_log]` table, no access log.
    pub access_log: Option<AccessLogConfig>,
    /// `None`: no `[control]` table; the daemon runs no control-plane services.
    pub control: Option<ControlConfig>,
    /// Metric options (`[telemetry]`).
    pub telemetry: TelemetryConfig,
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
    /// Reload when a certificate, key, trust bundle or CRL file named by the config changes.
    pub watch_files: bool,
}

/// The control plane inside the daemon (`[control]`): the local CA in the state directory
/// (`--state-dir`) and the services built on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ControlConfig {
    /// The trust domain to initialise the CA with when the state directory has none yet
    /// (`None`: `meshgate.local`). An existing CA of another trust domain is an error.
    pub trust_domain: Option<TrustDomain>,
    /// `None`: no enrollment server.
    pub enrollment: Option<ControlEnrollmentConfig>,
    /// `None`: no Workload API socket.
    pub workload_api: Option<ControlWorkloadApiConfig>,
}

/// The SPIFFE Workload API (`[control.workload_api]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ControlWorkloadApiConfig {
    /// Absolute path of the Unix socket.
    pub socket: PathBuf,
    /// TTL of the SVIDs it issues; `None`: the CA's default TTL.
    #[serde(serialize_with = "crate::duration::serialize_option")]
    pub svid_ttl: Option<Duration>,
}

/// The enrollment server (`[control.enrollment]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ControlEnrollmentConfig {
    /// HTTPS listener of the enrollment server (its own socket, not a `[[listeners]]` entry).
    pub address: SocketAddr,
    /// DNS names clients use in the server URL (SANs of its certificate).
    pub dns_names: Vec<String>,
    /// TTL of the SVIDs it issues; `None`: the CA's default TTL.
    #[serde(serialize_with = "crate::duration::serialize_option")]
    pub svid_ttl: Option<Duration>,
    /// How long after expiry an SVID may still renew itself; zero: never.
    #[serde(serialize_with = "crate::duration::serialize")]
    pub renewal_grace: Duration,
}

/// Metric options (`[telemetry]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TelemetryConfig {
    /// Also export Istio's standard metrics (`istio_requests_total`, ...) with Istio's label
    /// names, so existing Istio dashboards work.
    pub istio_compat: bool,
}

/// The access log (`[access_log]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AccessLogConfig {
    /// Where the records go.
    pub target: AccessLogTarget,
    pub format: AccessLogFormat,
    /// Records buffered between the shards and the writer; `1..=1048576`.
    pub queue: usize,
}

/// Where the access log is written.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessLogTarget {
    /// Standard output (`path = "stdout"`).
    Stdout,
    /// A file: absolute, or relative to the config file's directory (to the working directory
    /// when the config was parsed from text). Not checked at validation: its directory need not
    /// exist yet; the file is opened (created if missing) when the log starts.
    File(PathBuf),
}

impl fmt::Display for AccessLogTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AccessLogTarget::Stdout => f.write_str("stdout"),
            AccessLogTarget::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// How each access log record is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessLogFormat {
    /// One JSON object per line, with the keys of Istio's default JSON access log.
    Json,
    /// One line per record in Envoy's default text format.
    Text,
}

impl AccessLogFormat {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            AccessLogFormat::Json => "json",
            AccessLogFormat::Text => "text",
        }
    }
}

impl fmt::Display for AccessLogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
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
    /// Exactly one for a `tcp` listener; for `tls` and `tls-passthrough` listeners the first
    /// whose [`Route::matcher`] matches wins.
    pub routes: Vec<usize>,
    /// Time a `tls` or `tls-passthrough` connection gets to send its ClientHello and (for
    /// `tls`) finish the handshake; then it is closed. `> 0`.
    #[serde(serialize_with = "crate::duration::serialize")]
    pub handshake_timeout: Duration,
    /// Index into [`Config::routes`] of the route used when no route matches (no SNI, unknown
    /// SNI, or a peer no route accepts); `None`: such connections are closed.
    pub default_route: Option<usize>,
    /// TLS termination settings; `Some` exactly for `tls` listeners.
    pub tls: Option<ListenerTls>,
    /// HTTP settings; `Some` exactly for `http` listeners (defaults filled in).
    pub http: Option<ListenerHttp>,
}

/// `[listeners.http]`: limits of an `http` listener's downstream side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ListenerHttp {
    /// Largest request head (request line + header fields) in bytes; larger -> 431.
    /// `1024..=1048576`.
    pub max_request_head: u32,
    /// Time a client gets to send a complete request head once it started one (and, on a new
    /// connection, from accept); then 408 and close. `> 0`.
    #[serde(serialize_with = "crate::duration::serialize")]
    pub request_timeout: Duration,
}

/// `[listeners.tls]`: how a `tls` listener terminates TLS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ListenerTls {
    /// Chosen by SNI: exact name, then `*.` wildcard, then the default (the one with
    /// [`ServerCertificate::default`] set). Empty: the config gave none, and the daemon serves
    /// the gateway's own identity from its local CA (filled in before the dataplane sees it).
    pub certificates: Vec<ServerCertificate>,
    pub min_version: TlsVersion,
    /// ALPN protocols offered, in preference order; empty: no ALPN.
    pub alpn: Vec<String>,
    pub client_auth: ClientAuth,
    /// Roots per trust domain for client certificates; non-empty unless `client_auth` is
    /// `none`. Trust domains are unique.
    pub trust_bundles: Vec<TrustBundle>,
}

/// One server certificate of a `tls` listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServerCertificate {
    /// PEM chain, leaf first (absolute path, or relative to the working directory when the
    /// config was parsed from text).
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// Lowercase names (`a.example.test`) and wildcards (`*.example.test`) it serves.
    pub sni: Vec<String>,
    /// Served when no name matches: the first certificate without `sni`, else the first.
    pub default: bool,
}

/// Root certificates of one trust domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TrustBundle {
    pub trust_domain: TrustDomain,
    /// PEM file of the domain's CA certificates. For a federated domain, empty after parsing;
    /// `meshgate run` sets it to the trust store's `<state-dir>/trust/<td>/bundle.pem`.
    pub bundle: PathBuf,
    /// The bundle comes from the state directory's trust store (SPIFFE federation: `meshgate
    /// trust add`), kept fresh by the federation poller.
    pub federated: bool,
    /// Optional PEM CRL file of the CA that signs the domain's leaves.
    pub crl: Option<PathBuf>,
}

/// Lowest TLS version accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum TlsVersion {
    #[serde(rename = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    Tls13,
}

impl TlsVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsVersion::Tls12 => "1.2",
            TlsVersion::Tls13 => "1.3",
        }
    }
}

/// Client certificate policy of a `tls` listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// No certificate is requested.
    None,
    /// Requested; a client without one connects with no identity, a bad one is refused.
    Optional,
    /// A valid X509-SVID from a configured trust domain is required.
    Required,
}

impl ClientAuth {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientAuth::None => "none",
            ClientAuth::Optional => "optional",
            ClientAuth::Required => "required",
        }
    }
}

/// What a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// Plain TCP proxying: bytes are copied unchanged to the route's cluster.
    Tcp,
    /// TLS terminated here (see [`Listener::tls`]); routes match on SNI and peer identity,
    /// the decrypted bytes go to the cluster.
    Tls,
    /// TLS not terminated: the ClientHello is read for its SNI, routes match on it, and the
    /// original bytes go to the cluster untouched.
    #[serde(rename = "tls-passthrough")]
    TlsPassthrough,
    /// Cleartext HTTP/1.1: each request is routed on host, path, method and headers (see
    /// [`RouteMatch`]) and proxied, or answered by the route ([`RouteAction`]).
    Http,
    /// HTTP over TLS terminated here (the listener's [`ListenerTls`]): HTTP/1.1 (and HTTP/2 by
    /// ALPN), routed per request like `http`, with the verified client identity available to
    /// routes (`peer`) and forwarded in `x-forwarded-client-cert`.
    Https,
}

impl Protocol {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Tls => "tls",
            Protocol::TlsPassthrough => "tls-passthrough",
            Protocol::Http => "http",
            Protocol::Https => "https",
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
    /// Which connections the route takes (`tls` and `tls-passthrough` listeners only);
    /// `None`: all of them.
    #[serde(rename = "match")]
    pub matcher: Option<RouteMatch>,
    pub action: RouteAction,
    /// Request handling of routes of `http` listeners; `Some` exactly for those.
    pub http: Option<RouteHttp>,
}

/// `[routes.match]`: every part given must match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouteMatch {
    /// Lowercase exact names and `*.` wildcards (one label deep); empty: any SNI, or none.
    pub sni: Vec<String>,
    /// The verified client identity (`tls` listeners with client auth only).
    pub peer: Option<PeerMatch>,
    /// `http` listeners: lowercase host names (or IP literals) and `*.` wildcards (one label
    /// deep), compared with the request's host without its port; empty: any host.
    pub hosts: Vec<String>,
    /// `http` listeners: the normalised request path (no query) must match.
    pub path: Option<PathMatch>,
    /// `http` listeners: the method must be one of these (case-sensitive); empty: any.
    pub methods: Vec<String>,
    /// `http` listeners: every entry must match.
    pub headers: Vec<HeaderMatch>,
}

/// How a route matches the request path (the normalised path, without the query).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PathMatch {
    /// The path starts with this string (plain string prefix, as in Envoy: `/api` also
    /// matches `/apis`; write `/api/` to match whole segments).
    Prefix(String),
    /// The path is exactly this.
    Exact(String),
    /// The regular expression (Rust `regex` syntax, unanchored unless `^`/`$`) matches.
    Regex(String),
}

/// One header condition of a route match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HeaderMatch {
    /// Lowercase field name.
    pub name: String,
    #[serde(flatten)]
    pub value: HeaderValueMatch,
}

/// What a [`HeaderMatch`] requires of the named field. With several fields of that name, any
/// of them may match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HeaderValueMatch {
    /// A field with exactly this value (case-sensitive).
    Exact(String),
    /// A field whose value the regular expression matches.
    Regex(String),
    /// `true`: the field is present (any value); `false`: it is absent.
    Present(bool),
}

/// How a route of an `http` listener edits the requests and responses it forwards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouteHttp {
    /// Edits to the request sent upstream.
    pub request_headers: HeaderOps,
    /// Edits to the response sent to the client (also applied to direct responses and
    /// redirects).
    pub response_headers: HeaderOps,
    /// Replaces the part of the path matched by `match.path.prefix` (or the whole path, with
    /// `match.path.exact`); forward routes only.
    pub prefix_rewrite: Option<String>,
    /// Replaces the Host sent upstream; forward routes only.
    pub host_rewrite: Option<String>,
    /// Time the upstream gets to deliver the whole response (all attempts); then 504.
    #[serde(serialize_with = "crate::duration::serialize")]
    pub timeout: Duration,
}

/// Header edits: names are lowercase tokens, never a field the proxy manages itself (Host,
/// framing and connection fields); values are valid field values. Applied in the order
/// remove, set, add.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct HeaderOps {
    /// Fields appended (existing ones of the same name are kept).
    pub add: Vec<(String, String)>,
    /// Fields replaced (existing ones of the same name are dropped first).
    pub set: Vec<(String, String)>,
    /// Fields dropped.
    pub remove: Vec<String>,
}

impl HeaderOps {
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.set.is_empty() && self.remove.is_empty()
    }
}

impl RouteMatch {
    /// Whether a connection with SNI `sni` and verified peer `peer` takes this route.
    pub fn matches(&self, sni: Option<&str>, peer: Option<&SpiffeId>) -> bool {
        let sni_ok = self.sni.is_empty() || sni.is_some_and(|name| sni_matches(&self.sni, name));
        let peer_ok = match &self.peer {
            None => true,
            Some(want) => peer.is_some_and(|id| want.matches(id)),
        };
        sni_ok && peer_ok
    }
}

/// Whether `name` (case-insensitive, one trailing dot ignored) matches one of `patterns`
/// (lowercase exact names or `*.parent` wildcards matching exactly one more label).
pub fn sni_matches(patterns: &[String], name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    patterns
        .iter()
        .any(|pattern| match pattern.strip_prefix("*.") {
            Some(parent) => name.split_once('.').is_some_and(|(label, rest)| {
                !label.is_empty() && rest.eq_ignore_ascii_case(parent)
            }),
            None => name.eq_ignore_ascii_case(pattern),
        })
}

/// `[routes.match.peer]`: each non-empty list must match (any entry of it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerMatch {
    pub spiffe_ids: Vec<SpiffeId>,
    pub trust_domains: Vec<TrustDomain>,
    /// Path prefixes, segment-wise (`/ns/prod` matches `/ns/prod/sa/web`).
    pub path_prefixes: Vec<String>,
}

impl PeerMatch {
    pub fn matches(&self, id: &SpiffeId) -> bool {
        (self.spiffe_ids.is_empty() || self.spiffe_ids.contains(id))
            && (self.trust_domains.is_empty()
                || self
                    .trust_domains
                    .iter()
                    .any(|d| d.as_str() == id.trust_domain_name()))
            && (self.path_prefixes.is_empty()
                || self.path_prefixes.iter().any(|p| id.path_has_prefix(p)))
    }
}

/// What a route does with a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteAction {
    /// Forward to one of `clusters`, picked in proportion to the weights. A route written with
    /// `cluster = "x"` has a single entry of weight 1. Never empty; names are unique; the sum of
    /// the weights fits in a `u32`.
    Forward { clusters: Vec<WeightedCluster> },
    /// `http` listeners: answer with this status and body; nothing goes upstream.
    DirectResponse { status: u16, body: String },
    /// `http` listeners: answer with a redirect to `location`.
    Redirect { location: String, status: u16 },
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
    /// Upstream TLS origination; `None`: plain TCP to the endpoints.
    pub tls: Option<ClusterTls>,
    /// What `http`/`https` routes speak to the endpoints (`tcp`/`tls` routes copy bytes and
    /// ignore it).
    pub protocol: UpstreamProtocol,
}

/// The HTTP version spoken to a cluster's endpoints (`[[clusters]] protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum UpstreamProtocol {
    /// HTTP/1.1 over a per-shard keep-alive pool.
    #[serde(rename = "http1")]
    Http1,
    /// HTTP/2: prior knowledge (h2c) on plain TCP, ALPN `h2` with `[clusters.tls]`; a few
    /// multiplexed connections per endpoint and identity.
    #[serde(rename = "http2")]
    Http2,
}

impl UpstreamProtocol {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamProtocol::Http1 => "http1",
            UpstreamProtocol::Http2 => "http2",
        }
    }
}

/// `[clusters.tls]`: TLS (or mTLS, with `identity`) to the endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterTls {
    /// SNI sent; `None`: none (rustls sends none for IP endpoints).
    pub sni: Option<String>,
    pub alpn: Vec<String>,
    pub min_version: TlsVersion,
    pub verify: UpstreamVerify,
    /// PEM roots the upstream chain must lead to.
    pub trust_bundle: PathBuf,
    /// The gateway's client certificate for mTLS.
    pub identity: Option<TlsIdentity>,
}

/// What the upstream certificate must prove.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamVerify {
    /// An X509-SVID with one of these IDs (all in one trust domain, whose roots are
    /// `trust_bundle`).
    SpiffeIds(Vec<SpiffeId>),
    /// An X509-SVID of this trust domain (one, whose roots are `trust_bundle`).
    TrustDomains(Vec<TrustDomain>),
    /// A certificate valid for one of these DNS names (web PKI rules).
    DnsNames(Vec<String>),
}

/// A certificate chain and its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TlsIdentity {
    pub cert: PathBuf,
    pub key: PathBuf,
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
