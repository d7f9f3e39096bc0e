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
    /// Authorization policies (`[[policies]]`), in file order.
    pub policies: Vec<Policy>,
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
    /// `http` listeners: every entry must match a parameter of the query string.
    pub query: Vec<QueryMatch>,
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

/// One query-parameter condition of a route match (`[[routes.match.query]]`). Names and
/// values are compared percent-decoded (`+` read as a space, as in HTML forms); with several
/// parameters of that name, any of them may match. A parameter without `=` has an empty value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QueryMatch {
    /// Parameter name, case-sensitive.
    pub name: String,
    /// The same conditions as a header entry: exact value, regex, present or absent.
    #[serde(flatten)]
    pub value: HeaderValueMatch,
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
    /// `[routes.retry]`: when a failed attempt is tried again (forward routes).
    pub retry: RetryPolicy,
    /// Protocols an HTTP/1.1 `Upgrade` request may switch to through this route (lowercase
    /// tokens; default `["websocket"]`). Others go upstream as plain requests, without Upgrade.
    pub upgrades: Vec<String>,
}

/// `[routes.retry]`: Envoy's retry policy. Without the table: 2 attempts on connect failure
/// and reset (what the gateway always did), Envoy's backoff.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RetryPolicy {
    /// Total tries, the first one included (`1`: never retry); 1..=10.
    pub attempts: u32,
    /// The conditions that allow a retry, as written (deduplicated, file order).
    pub on: Vec<RetryOn>,
    /// Statuses retried with `retriable-status-codes`; 400..=599.
    pub status_codes: Vec<u16>,
    /// Each attempt's limit, from the request sent in full until the response head;
    /// `None`: only the route's `timeout`.
    #[serde(serialize_with = "crate::duration::serialize_option")]
    pub per_try_timeout: Option<Duration>,
    /// Retry n waits a uniform random time in `[0, min(backoff_max, backoff_base * 2^(n-1)))`.
    #[serde(serialize_with = "crate::duration::serialize")]
    pub backoff_base: Duration,
    #[serde(serialize_with = "crate::duration::serialize")]
    pub backoff_max: Duration,
}

impl RetryPolicy {
    /// Whether `on` lists `what`.
    pub fn on(&self, what: RetryOn) -> bool {
        self.on.contains(&what)
    }
}

/// One `[routes.retry] on` condition (Envoy's `retry_on` names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RetryOn {
    /// The connection (or TLS handshake) failed or timed out: nothing was sent.
    ConnectFailure,
    /// The upstream closed or reset the connection, or sent nothing within
    /// `per_try_timeout`, before a response head.
    Reset,
    /// Any 5xx response, plus everything `connect-failure` and `reset` cover.
    #[serde(rename = "5xx")]
    FiveXx,
    /// 502, 503 and 504 responses, plus everything `connect-failure` and `reset` cover.
    GatewayError,
    /// The statuses listed in `status_codes`.
    RetriableStatusCodes,
}

impl RetryOn {
    pub const ALL: [RetryOn; 5] = [
        RetryOn::ConnectFailure,
        RetryOn::Reset,
        RetryOn::FiveXx,
        RetryOn::GatewayError,
        RetryOn::RetriableStatusCodes,
    ];

    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            RetryOn::ConnectFailure => "connect-failure",
            RetryOn::Reset => "reset",
            RetryOn::FiveXx => "5xx",
            RetryOn::GatewayError => "gateway-error",
            RetryOn::RetriableStatusCodes => "retriable-status-codes",
        }
    }
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

/// Who may call what through one listener (`[[policies]]`), in the manner of Istio's
/// AuthorizationPolicy: any matching `deny` policy refuses; otherwise, when the listener has
/// `allow` policies, one of them must match; `audit` policies only log what they match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Policy {
    /// Unique among policies.
    pub name: String,
    /// Name of the listener the policy guards.
    pub listener: String,
    /// Index of that listener in [`Config::listeners`].
    pub listener_index: usize,
    pub action: PolicyAction,
    /// The policy matches a request (or connection) when any rule does; a rule matches when
    /// every part given in it does (an empty rule matches everything). Never empty.
    pub rules: Vec<RouteMatch>,
}

/// What a matching [`Policy`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyAction {
    Allow,
    Deny,
    /// Logs the decision (target `meshgate::audit`) and changes nothing.
    Audit,
}

impl PolicyAction {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyAction::Allow => "allow",
            PolicyAction::Deny => "deny",
            PolicyAction::Audit => "audit",
        }
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
    /// Relative weight of each endpoint (same index as `endpoints`), `1..=10000`; 1 when the
    /// entry is a plain address.
    pub endpoint_weights: Vec<u32>,
    /// Time allowed for the upstream TCP connect; `> 0`.
    #[serde(serialize_with = "crate::duration::serialize")]
    pub connect_timeout: Duration,
    pub balance: Balance,
    /// What `maglev` hashes; `Some` exactly when `balance` is `maglev`.
    pub hash_on: Option<HashOn>,
    /// Upstream TLS origination; `None`: plain TCP to the endpoints.
    pub tls: Option<ClusterTls>,
    /// Active health checking; `None`: endpoints are healthy unless ejected.
    pub health_check: Option<HealthCheck>,
    /// Passive outlier detection; `None`: no ejection.
    pub outlier_detection: Option<OutlierDetection>,
    /// `[clusters.circuit_breakers]`: process-wide limits (HTTP routes); unlimited when absent.
    pub circuit_breakers: CircuitBreakers,
    /// `[clusters.retry_budget]`: how many retries may run at once (HTTP routes).
    pub retry_budget: RetryBudget,
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

impl Cluster {
    /// True when any endpoint weight differs from the others.
    pub fn weighted(&self) -> bool {
        self.endpoint_weights.windows(2).any(|w| w[0] != w[1])
    }
}

/// What a consistent-hash cluster hashes to choose an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HashOn {
    /// The value of this request header (lowercase name); HTTP routes only.
    Header(String),
    /// The downstream peer's verified SPIFFE ID (mTLS listeners).
    PeerIdentity,
    /// The downstream client's IP address.
    SourceIp,
}

impl fmt::Display for HashOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HashOn::Header(h) => write!(f, "header {h}"),
            HashOn::PeerIdentity => f.write_str("peer_identity"),
            HashOn::SourceIp => f.write_str("source_ip"),
        }
    }
}

/// How an endpoint is probed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthCheckKind {
    /// A TCP connect (and, for TLS clusters, a verified handshake) succeeds.
    Tcp,
    /// `GET path` answers with one of `expected_statuses`.
    Http,
}

/// `[clusters.health_check]`: active health checking.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthCheck {
    pub kind: HealthCheckKind,
    /// Request path of `http` checks; starts with `/`.
    pub path: String,
    /// `Host` header of `http` checks; `None`: the endpoint's address.
    pub host: Option<String>,
    /// Statuses that count as healthy (`http`), each in `100..=599`.
    pub expected_statuses: Vec<u16>,
    /// Time between two checks of one endpoint; `> 0`.
    #[serde(serialize_with = "crate::duration::serialize")]
    pub interval: Duration,
    /// Time one check may take (connect, TLS, request and response); `> 0`.
    #[serde(serialize_with = "crate::duration::serialize")]
    pub timeout: Duration,
    /// Consecutive successes that make an unhealthy endpoint healthy.
    pub healthy_threshold: u32,
    /// Consecutive failures that make a healthy endpoint unhealthy.
    pub unhealthy_threshold: u32,
}

/// `[clusters.outlier_detection]`: passive ejection of failing endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OutlierDetection {
    /// Consecutive 5xx responses that eject an endpoint; 0: off.
    pub consecutive_5xx: u32,
    /// Consecutive gateway failures (connect failure, reset, 502/503/504) that eject; 0: off.
    pub consecutive_gateway_failures: u32,
    /// Ejection time of a first ejection; the n-th consecutive ejection lasts n times this.
    #[serde(serialize_with = "crate::duration::serialize")]
    pub base_ejection_time: Duration,
    /// Longest ejection.
    #[serde(serialize_with = "crate::duration::serialize")]
    pub max_ejection_time: Duration,
    /// At most this share of the cluster's endpoints is ejected at once (at least one always
    /// may be).
    pub max_ejection_percent: u32,
    /// How often ejections are reviewed: ejected endpoints whose time is up return, and an
    /// endpoint that stayed in for a whole interval has its ejection multiplier lowered.
    #[serde(serialize_with = "crate::duration::serialize")]
    pub interval: Duration,
}

/// `[clusters.circuit_breakers]`: Envoy's thresholds, counted for the whole process; a request
/// over a limit gets 503 with response flag `UO`. `None`: no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CircuitBreakers {
    /// Upstream connections open to the cluster (in use or idle in the pool).
    pub max_connections: Option<u32>,
    /// Requests waiting for a new upstream connection to be established.
    pub max_pending_requests: Option<u32>,
    /// Requests in flight to the cluster.
    pub max_requests: Option<u32>,
}

impl CircuitBreakers {
    pub fn any(&self) -> bool {
        self.max_connections.is_some()
            || self.max_pending_requests.is_some()
            || self.max_requests.is_some()
    }
}

/// `[clusters.retry_budget]`: Envoy's retry budget, applied by each shard to its own requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RetryBudget {
    /// Retries in progress may be at most this percentage of the requests in flight; 0..=100.
    pub budget_percent: u32,
    /// ... but at least this many retries may always run.
    pub min_retry_concurrency: u32,
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget {
            budget_percent: 20,
            min_retry_concurrency: 3,
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
    /// Round robin (smooth weighted round robin when endpoint weights differ).
    RoundRobin,
    /// Power of two choices on active requests per endpoint (per shard), divided by weight.
    LeastRequest,
    /// Consistent hashing (Maglev) on `hash_on`.
    Maglev,
}

impl Balance {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::RoundRobin => "round_robin",
            Balance::LeastRequest => "least_request",
            Balance::Maglev => "maglev",
        }
    }
}

impl fmt::Display for Balance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
