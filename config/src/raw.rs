//! The file model: serde structs that mirror the TOML file, field for field. They never leave
//! this crate; `TryFrom<raw::Config> for Config` (in `validate`) turns them into the public types.
//!
//! Every field is optional here (required fields are `Option`, checked in `validate`), and
//! integers are `i64` (TOML's integer type; ranges are checked in `validate`), so a table with
//! some fields removed still deserializes. The loader relies on that: it deserializes each field
//! on its own first, reports the bad ones, and drops them before deserializing the table.
//!
//! The accepted field names come from serde itself ([`fields`]), so the loader's unknown-field
//! check, the reference-doc test and `deny_unknown_fields` can never disagree.

use serde::Deserialize;
use serde::de::{self, DeserializeOwned, Visitor};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Config {
    pub version: Option<i64>,
    pub admin: Option<Admin>,
    pub runtime: Option<Runtime>,
    pub access_log: Option<AccessLog>,
    pub control: Option<Control>,
    pub telemetry: Option<Telemetry>,
    #[serde(default)]
    pub listeners: Vec<Listener>,
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub clusters: Vec<Cluster>,
    #[serde(default)]
    pub policies: Vec<Policy>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Admin {
    pub address: Option<String>,
    pub unix_socket: Option<String>,
    pub danger_allow_non_loopback: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Runtime {
    pub cores: Option<i64>,
    pub pin: Option<bool>,
    pub drain_timeout: Option<Duration>,
    pub ring_entries: Option<i64>,
    pub watch_files: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AccessLog {
    pub path: Option<String>,
    pub format: Option<String>,
    pub queue: Option<i64>,
}

/// `[control]`: the control plane inside `meshgate run`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Control {
    pub trust_domain: Option<String>,
    pub enrollment: Option<ControlEnrollment>,
    pub workload_api: Option<ControlWorkloadApi>,
}

/// `[control.workload_api]`: the SPIFFE Workload API socket.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ControlWorkloadApi {
    pub socket: Option<String>,
    pub svid_ttl: Option<Duration>,
}

/// `[control.enrollment]`: the enrollment server.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ControlEnrollment {
    pub address: Option<String>,
    pub dns_names: Option<Vec<String>>,
    pub svid_ttl: Option<Duration>,
    pub renewal_grace: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Telemetry {
    pub istio_compat: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Listener {
    pub name: Option<String>,
    pub address: Option<String>,
    pub protocol: Option<String>,
    pub max_connections: Option<i64>,
    pub idle_timeout: Option<Duration>,
    pub backlog: Option<i64>,
    pub handshake_timeout: Option<Duration>,
    pub default_route: Option<String>,
    pub tls: Option<ListenerTls>,
    pub http: Option<ListenerHttp>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListenerHttp {
    pub max_request_head: Option<i64>,
    pub request_timeout: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListenerTls {
    pub certificates: Option<Vec<Certificate>>,
    pub min_version: Option<String>,
    pub alpn: Option<Vec<String>>,
    pub client_auth: Option<String>,
    pub trust_bundles: Option<Vec<TrustBundle>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Certificate {
    pub cert: Option<String>,
    pub key: Option<String>,
    pub sni: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TrustBundle {
    pub trust_domain: Option<String>,
    pub bundle: Option<String>,
    pub crl: Option<String>,
    pub federated: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Route {
    pub name: Option<String>,
    pub listener: Option<String>,
    pub cluster: Option<String>,
    pub weighted_clusters: Option<Vec<WeightedCluster>>,
    #[serde(rename = "match")]
    pub matcher: Option<RouteMatch>,
    pub direct_response: Option<DirectResponse>,
    pub redirect: Option<Redirect>,
    pub request_headers: Option<HeaderOps>,
    pub response_headers: Option<HeaderOps>,
    pub prefix_rewrite: Option<String>,
    pub host_rewrite: Option<String>,
    pub timeout: Option<Duration>,
    pub retry: Option<RouteRetry>,
    pub upgrades: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RouteRetry {
    pub attempts: Option<i64>,
    pub on: Option<Vec<String>>,
    pub status_codes: Option<Vec<i64>>,
    pub per_try_timeout: Option<Duration>,
    pub backoff_base: Option<Duration>,
    pub backoff_max: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RouteMatch {
    pub sni: Option<Vec<String>>,
    pub peer: Option<PeerMatch>,
    pub hosts: Option<Vec<String>>,
    pub path: Option<PathMatch>,
    pub methods: Option<Vec<String>>,
    pub headers: Option<Vec<HeaderMatch>>,
    pub query: Option<Vec<QueryMatch>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PathMatch {
    pub prefix: Option<String>,
    pub exact: Option<String>,
    pub regex: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HeaderMatch {
    pub name: Option<String>,
    pub exact: Option<String>,
    pub regex: Option<String>,
    pub present: Option<bool>,
}

/// `[[routes.match.query]]`: the same value conditions as a header entry.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct QueryMatch {
    pub name: Option<String>,
    pub exact: Option<String>,
    pub regex: Option<String>,
    pub present: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DirectResponse {
    pub status: Option<i64>,
    pub body: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Redirect {
    pub location: Option<String>,
    pub status: Option<i64>,
}

/// `add` and `set` map header names to values; kept in name order.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HeaderOps {
    pub add: Option<std::collections::BTreeMap<String, String>>,
    pub set: Option<std::collections::BTreeMap<String, String>>,
    pub remove: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Policy {
    pub name: Option<String>,
    pub listener: Option<String>,
    pub action: Option<String>,
    pub rules: Option<Vec<RouteMatch>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PeerMatch {
    pub spiffe_ids: Option<Vec<String>>,
    pub trust_domains: Option<Vec<String>>,
    pub path_prefixes: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WeightedCluster {
    pub cluster: Option<String>,
    pub weight: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Cluster {
    pub name: Option<String>,
    pub endpoints: Option<Vec<Endpoint>>,
    pub connect_timeout: Option<Duration>,
    pub balance: Option<String>,
    pub hash_on: Option<HashOn>,
    pub tls: Option<ClusterTls>,
    pub health_check: Option<HealthCheck>,
    pub outlier_detection: Option<OutlierDetection>,
    pub circuit_breakers: Option<CircuitBreakers>,
    pub retry_budget: Option<RetryBudget>,
    pub protocol: Option<String>,
}

/// An entry of `endpoints`: `"IP:PORT"` or `{ address = "IP:PORT", weight = 3 }`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Endpoint {
    Address(String),
    Weighted {
        address: Option<String>,
        weight: Option<i64>,
    },
}

impl<'de> Deserialize<'de> for Endpoint {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EndpointVisitor;
        impl<'de> Visitor<'de> for EndpointVisitor {
            type Value = Endpoint;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string or a table { address, weight }")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Endpoint, E> {
                Ok(Endpoint::Address(v.to_owned()))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Endpoint, A::Error> {
                let (mut address, mut weight) = (None, None);
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "address" => address = Some(map.next_value::<String>()?),
                        "weight" => weight = Some(map.next_value::<i64>()?),
                        other => {
                            return Err(de::Error::unknown_field(other, &["address", "weight"]));
                        }
                    }
                }
                Ok(Endpoint::Weighted { address, weight })
            }
        }
        deserializer.deserialize_any(EndpointVisitor)
    }
}

/// `hash_on`: `"peer_identity"`, `"source_ip"` or `{ header = "x-user" }`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub(crate) enum HashOn {
    Name(String),
    Header { header: String },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HealthCheck {
    pub kind: Option<String>,
    pub path: Option<String>,
    pub host: Option<String>,
    pub expected_statuses: Option<Vec<i64>>,
    pub interval: Option<Duration>,
    pub timeout: Option<Duration>,
    pub healthy_threshold: Option<i64>,
    pub unhealthy_threshold: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CircuitBreakers {
    pub max_connections: Option<i64>,
    pub max_pending_requests: Option<i64>,
    pub max_requests: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct OutlierDetection {
    pub consecutive_5xx: Option<i64>,
    pub consecutive_gateway_failures: Option<i64>,
    pub base_ejection_time: Option<Duration>,
    pub max_ejection_time: Option<Duration>,
    pub max_ejection_percent: Option<i64>,
    pub interval: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RetryBudget {
    pub budget_percent: Option<i64>,
    pub min_retry_concurrency: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ClusterTls {
    pub sni: Option<String>,
    pub alpn: Option<Vec<String>>,
    pub min_version: Option<String>,
    pub verify: Option<Verify>,
    pub trust_bundle: Option<String>,
    pub identity: Option<Identity>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Verify {
    pub spiffe_ids: Option<Vec<String>>,
    pub trust_domains: Option<Vec<String>>,
    pub dns_names: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Identity {
    pub cert: Option<String>,
    pub key: Option<String>,
}

/// A duration as written. Numbers are accepted here so `validate` can reject them with a hint
/// that shows the string form, instead of a bare "expected a string".
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Duration {
    Text(String),
    Integer(i64),
    Float(f64),
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DurationVisitor;
        impl Visitor<'_> for DurationVisitor {
            type Value = Duration;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a duration string such as \"30s\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
                Ok(Duration::Text(v.to_owned()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
                Ok(Duration::Integer(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
                Ok(Duration::Integer(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
                Ok(Duration::Float(v))
            }
        }
        deserializer.deserialize_any(DurationVisitor)
    }
}

/// The field names serde accepts for `T` (a struct deriving `Deserialize`), in declaration order.
///
/// Works by handing `T::deserialize` a deserializer that records the field list serde passes to
/// `deserialize_struct` and then fails.
pub(crate) fn fields<T: DeserializeOwned>() -> &'static [&'static str] {
    let mut out: &'static [&'static str] = &[];
    // The probe always fails by design; only the recorded field list matters.
    let _ = T::deserialize(FieldProbe(&mut out));
    out
}

struct FieldProbe<'a>(&'a mut &'static [&'static str]);

impl<'de> de::Deserializer<'de> for FieldProbe<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("field probe: not a struct"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = fields;
        Err(de::Error::custom("field probe: done"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

/// A table of the file, for error messages and the reference-doc test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Section {
    Top,
    Admin,
    Runtime,
    Listeners,
    Routes,
    WeightedClusters,
    Clusters,
    ListenerTls,
    Certificates,
    TrustBundles,
    RouteMatch,
    PeerMatch,
    ClusterTls,
    Verify,
    Identity,
    HealthCheck,
    OutlierDetection,
    ListenerHttp,
    PathMatch,
    HeaderMatch,
    QueryMatch,
    DirectResponse,
    Redirect,
    HeaderOps,
    AccessLog,
    Control,
    ControlEnrollment,
    Telemetry,
    ControlWorkloadApi,
    Policies,
    PolicyRules,
    RouteRetry,
    CircuitBreakers,
    RetryBudget,
}

impl Section {
    pub(crate) const ALL: [Section; 34] = [
        Section::Top,
        Section::Admin,
        Section::Runtime,
        Section::AccessLog,
        Section::Control,
        Section::ControlEnrollment,
        Section::Telemetry,
        Section::ControlWorkloadApi,
        Section::Listeners,
        Section::ListenerTls,
        Section::Certificates,
        Section::TrustBundles,
        Section::ListenerHttp,
        Section::Routes,
        Section::WeightedClusters,
        Section::RouteMatch,
        Section::PeerMatch,
        Section::PathMatch,
        Section::HeaderMatch,
        Section::QueryMatch,
        Section::DirectResponse,
        Section::Redirect,
        Section::HeaderOps,
        Section::RouteRetry,
        Section::Clusters,
        Section::ClusterTls,
        Section::Verify,
        Section::Identity,
        Section::Policies,
        Section::PolicyRules,
        Section::HealthCheck,
        Section::OutlierDetection,
        Section::CircuitBreakers,
        Section::RetryBudget,
    ];

    /// The accepted field names.
    pub(crate) fn fields(self) -> &'static [&'static str] {
        match self {
            Section::Top => fields::<Config>(),
            Section::Admin => fields::<Admin>(),
            Section::Runtime => fields::<Runtime>(),
            Section::Listeners => fields::<Listener>(),
            Section::Routes => fields::<Route>(),
            Section::WeightedClusters => fields::<WeightedCluster>(),
            Section::Clusters => fields::<Cluster>(),
            Section::ListenerTls => fields::<ListenerTls>(),
            Section::Certificates => fields::<Certificate>(),
            Section::TrustBundles => fields::<TrustBundle>(),
            Section::RouteMatch => fields::<RouteMatch>(),
            Section::PeerMatch => fields::<PeerMatch>(),
            Section::ClusterTls => fields::<ClusterTls>(),
            Section::Verify => fields::<Verify>(),
            Section::Identity => fields::<Identity>(),
            Section::HealthCheck => fields::<HealthCheck>(),
            Section::OutlierDetection => fields::<OutlierDetection>(),
            Section::ListenerHttp => fields::<ListenerHttp>(),
            Section::PathMatch => fields::<PathMatch>(),
            Section::HeaderMatch => fields::<HeaderMatch>(),
            Section::QueryMatch => fields::<QueryMatch>(),
            Section::DirectResponse => fields::<DirectResponse>(),
            Section::Redirect => fields::<Redirect>(),
            Section::HeaderOps => fields::<HeaderOps>(),
            Section::AccessLog => fields::<AccessLog>(),
            Section::Control => fields::<Control>(),
            Section::ControlEnrollment => fields::<ControlEnrollment>(),
            Section::Telemetry => fields::<Telemetry>(),
            Section::ControlWorkloadApi => fields::<ControlWorkloadApi>(),
            Section::Policies => fields::<Policy>(),
            Section::PolicyRules => fields::<RouteMatch>(),
            Section::RouteRetry => fields::<RouteRetry>(),
            Section::CircuitBreakers => fields::<CircuitBreakers>(),
            Section::RetryBudget => fields::<RetryBudget>(),
        }
    }

    /// How the section is written in the file (and titled in the reference).
    pub(crate) fn title(self) -> &'static str {
        match self {
            Section::Top => "the top level",
            Section::Admin => "[admin]",
            Section::Runtime => "[runtime]",
            Section::Listeners => "[[listeners]]",
            Section::Routes => "[[routes]]",
            Section::WeightedClusters => "weighted_clusters entries",
            Section::Clusters => "[[clusters]]",
            Section::ListenerTls => "[listeners.tls]",
            Section::Certificates => "[listeners.tls] certificates entries",
            Section::TrustBundles => "[listeners.tls] trust_bundles entries",
            Section::RouteMatch => "[routes.match]",
            Section::PeerMatch => "[routes.match.peer]",
            Section::ClusterTls => "[clusters.tls]",
            Section::Verify => "[clusters.tls.verify]",
            Section::Identity => "[clusters.tls.identity]",
            Section::HealthCheck => "[clusters.health_check]",
            Section::OutlierDetection => "[clusters.outlier_detection]",
            Section::ListenerHttp => "[listeners.http]",
            Section::PathMatch => "[routes.match.path]",
            Section::HeaderMatch => "[routes.match] headers entries",
            Section::QueryMatch => "[[routes.match.query]]",
            Section::DirectResponse => "[routes.direct_response]",
            Section::Redirect => "[routes.redirect]",
            Section::HeaderOps => "[routes.request_headers] / [routes.response_headers]",
            Section::AccessLog => "[access_log]",
            Section::Control => "[control]",
            Section::ControlEnrollment => "[control.enrollment]",
            Section::Telemetry => "[telemetry]",
            Section::ControlWorkloadApi => "[control.workload_api]",
            Section::Policies => "[[policies]]",
            Section::PolicyRules => "[[policies.rules]]",
            Section::RouteRetry => "[routes.retry]",
            Section::CircuitBreakers => "[clusters.circuit_breakers]",
            Section::RetryBudget => "[clusters.retry_budget]",
        }
    }

    /// A valid `field = value` line for `field`, shown in hints when a value has the wrong type.
    pub(crate) fn example(self, field: &str) -> Option<&'static str> {
        if self == Section::PolicyRules {
            return Section::RouteMatch.example(field);
        }
        Some(match (self, field) {
            (Section::Top, "version") => "version = 1",
            (Section::Top, "admin") => {
                "[admin] followed by its fields, e.g. address = \"127.0.0.1:15000\""
            }
            (Section::Top, "runtime") => {
                "put the runtime settings under a [runtime] header, e.g. [runtime] then cores = 2 on the next line"
            }
            (Section::Top, "access_log") => {
                "put the access log settings under an [access_log] header, e.g. [access_log] then path = \"/var/log/meshgate/access.log\" on the next line"
            }
            (Section::Top, "telemetry") => {
                "put the telemetry settings under a [telemetry] header, e.g. [telemetry] then istio_compat = true on the next line"
            }
            (Section::Top, "listeners") => {
                "declare each listener under its own [[listeners]] header (double brackets), with its fields on the lines below"
            }
            (Section::Top, "routes") => {
                "declare each route under its own [[routes]] header (double brackets), with its fields on the lines below"
            }
            (Section::Top, "clusters") => {
                "declare each cluster under its own [[clusters]] header (double brackets), with its fields on the lines below"
            }
            (Section::Top, "control") => {
                "put the control-plane settings under a [control] header, e.g. [control.enrollment] then address = \"127.0.0.1:15012\" on the next line"
            }
            (Section::Top, "policies") => {
                "declare each policy under its own [[policies]] header (double brackets), with its fields on the lines below"
            }
            (Section::Policies, "name") => "name = \"only-frontends\"",
            (Section::Policies, "listener") => "listener = \"ingress\"",
            (Section::Policies, "action") => "action = \"allow\"",
            (Section::Policies, "rules") => {
                "rules = [{ peer = { trust_domains = [\"example.test\"] }, methods = [\"GET\"] }]"
            }
            (Section::Control, "trust_domain") => "trust_domain = \"example.org\"",
            (Section::Control, "enrollment") => {
                "put the enrollment server under a [control.enrollment] header, e.g. address = \"127.0.0.1:15012\" on the next line"
            }
            (Section::Control, "workload_api") => {
                "put the Workload API under a [control.workload_api] header, e.g. socket = \"/run/meshgate/workload.sock\" on the next line"
            }
            (Section::ControlWorkloadApi, "socket") => "socket = \"/run/meshgate/workload.sock\"",
            (Section::ControlWorkloadApi, "svid_ttl") => "svid_ttl = \"1h\"",
            (Section::ControlEnrollment, "address") => "address = \"127.0.0.1:15012\"",
            (Section::ControlEnrollment, "dns_names") => "dns_names = [\"ca.example.org\"]",
            (Section::ControlEnrollment, "svid_ttl") => "svid_ttl = \"1h\"",
            (Section::ControlEnrollment, "renewal_grace") => "renewal_grace = \"24h\"",
            (Section::Admin, "address") => "address = \"127.0.0.1:15000\"",
            (Section::Admin, "unix_socket") => "unix_socket = \"/run/meshgate/admin.sock\"",
            (Section::Admin, "danger_allow_non_loopback") => "danger_allow_non_loopback = false",
            (Section::Runtime, "cores") => "cores = 2",
            (Section::Runtime, "pin") => "pin = true",
            (Section::Runtime, "drain_timeout") => "drain_timeout = \"30s\"",
            (Section::Runtime, "ring_entries") => "ring_entries = 1024",
            (Section::Runtime, "watch_files") => "watch_files = true",
            (Section::AccessLog, "path") => "path = \"/var/log/meshgate/access.log\"",
            (Section::AccessLog, "format") => "format = \"json\"",
            (Section::AccessLog, "queue") => "queue = 65536",
            (Section::Telemetry, "istio_compat") => "istio_compat = true",
            (Section::Listeners, "name") => "name = \"tcp-in\"",
            (Section::Listeners, "address") => "address = \"127.0.0.1:15001\"",
            (Section::Listeners, "protocol") => "protocol = \"tcp\"",
            (Section::Listeners, "max_connections") => "max_connections = 100000",
            (Section::Listeners, "idle_timeout") => "idle_timeout = \"1h\"",
            (Section::Listeners, "backlog") => "backlog = 1024",
            (Section::Routes, "name") => "name = \"default\"",
            (Section::Routes, "listener") => "listener = \"tcp-in\"",
            (Section::Routes, "cluster") => "cluster = \"echo\"",
            (Section::Routes, "weighted_clusters") => {
                "weighted_clusters = [{ cluster = \"stable\", weight = 98 }, { cluster = \"canary\", weight = 2 }]"
            }
            (Section::WeightedClusters, "cluster") => "cluster = \"stable\"",
            (Section::WeightedClusters, "weight") => "weight = 98",
            (Section::Clusters, "name") => "name = \"echo\"",
            (Section::Clusters, "endpoints") => "endpoints = [\"127.0.0.1:15002\", \"[::1]:8080\"]",
            (Section::Clusters, "connect_timeout") => "connect_timeout = \"5s\"",
            (Section::Clusters, "balance") => "balance = \"round_robin\"",
            (Section::Clusters, "hash_on") => "hash_on = { header = \"x-user\" }",
            (Section::Clusters, "health_check") => {
                "health_check = { kind = \"http\", path = \"/healthz\", interval = \"5s\" }"
            }
            (Section::Clusters, "outlier_detection") => {
                "outlier_detection = { consecutive_5xx = 5, base_ejection_time = \"30s\" }"
            }
            (Section::HealthCheck, "kind") => "kind = \"http\"",
            (Section::HealthCheck, "path") => "path = \"/healthz\"",
            (Section::HealthCheck, "host") => "host = \"backend.example.test\"",
            (Section::HealthCheck, "expected_statuses") => "expected_statuses = [200, 204]",
            (Section::HealthCheck, "interval") => "interval = \"5s\"",
            (Section::HealthCheck, "timeout") => "timeout = \"1s\"",
            (Section::HealthCheck, "healthy_threshold") => "healthy_threshold = 2",
            (Section::HealthCheck, "unhealthy_threshold") => "unhealthy_threshold = 3",
            (Section::OutlierDetection, "consecutive_5xx") => "consecutive_5xx = 5",
            (Section::OutlierDetection, "consecutive_gateway_failures") => {
                "consecutive_gateway_failures = 5"
            }
            (Section::OutlierDetection, "base_ejection_time") => "base_ejection_time = \"30s\"",
            (Section::OutlierDetection, "max_ejection_time") => "max_ejection_time = \"5m\"",
            (Section::OutlierDetection, "max_ejection_percent") => "max_ejection_percent = 10",
            (Section::OutlierDetection, "interval") => "interval = \"10s\"",
            (Section::Clusters, "protocol") => "protocol = \"http2\"",
            (Section::Listeners, "default_route") => "default_route = \"fallback\"",
            (Section::Listeners, "handshake_timeout") => "handshake_timeout = \"10s\"",
            (Section::Listeners, "tls") => {
                "tls = { certificates = [{ cert = \"/etc/meshgate/server.pem\", key = \"/etc/meshgate/server-key.pem\" }] }"
            }
            (Section::ListenerTls, "certificates") => {
                "certificates = [{ cert = \"/etc/meshgate/server.pem\", key = \"/etc/meshgate/server-key.pem\", sni = [\"gateway.example.test\"] }]"
            }
            (Section::ListenerTls, "min_version") => "min_version = \"1.2\"",
            (Section::ListenerTls, "alpn") => "alpn = [\"h2\", \"http/1.1\"]",
            (Section::ListenerTls, "client_auth") => "client_auth = \"required\"",
            (Section::ListenerTls, "trust_bundles") => {
                "trust_bundles = [{ trust_domain = \"example.test\", bundle = \"/etc/meshgate/example.test.pem\" }]"
            }
            (Section::Certificates, "cert") => "cert = \"/etc/meshgate/server.pem\"",
            (Section::Certificates, "key") => "key = \"/etc/meshgate/server-key.pem\"",
            (Section::Certificates, "sni") => {
                "sni = [\"gateway.example.test\", \"*.example.test\"]"
            }
            (Section::TrustBundles, "trust_domain") => "trust_domain = \"example.test\"",
            (Section::TrustBundles, "bundle") => "bundle = \"/etc/meshgate/example.test.pem\"",
            (Section::TrustBundles, "crl") => "crl = \"/etc/meshgate/example.test.crl.pem\"",
            (Section::TrustBundles, "federated") => "federated = true",
            (Section::Routes, "match") => {
                "match = { sni = [\"api.example.test\"], peer = { trust_domains = [\"example.test\"] } }"
            }
            (Section::RouteMatch, "sni") => "sni = [\"api.example.test\", \"*.apps.example.test\"]",
            (Section::RouteMatch, "peer") => "peer = { trust_domains = [\"example.test\"] }",
            (Section::PeerMatch, "spiffe_ids") => "spiffe_ids = [\"spiffe://example.test/client\"]",
            (Section::PeerMatch, "trust_domains") => "trust_domains = [\"example.test\"]",
            (Section::PeerMatch, "path_prefixes") => "path_prefixes = [\"/ns/prod\"]",
            (Section::Clusters, "tls") => {
                "tls = { verify = { spiffe_ids = [\"spiffe://example.test/backend\"] } }"
            }
            (Section::ClusterTls, "sni") => "sni = \"backend.example.test\"",
            (Section::ClusterTls, "alpn") => "alpn = [\"h2\"]",
            (Section::ClusterTls, "min_version") => "min_version = \"1.2\"",
            (Section::ClusterTls, "verify") => {
                "verify = { spiffe_ids = [\"spiffe://example.test/backend\"] }"
            }
            (Section::ClusterTls, "trust_bundle") => {
                "trust_bundle = \"/etc/meshgate/example.test.pem\""
            }
            (Section::ClusterTls, "identity") => {
                "identity = { cert = \"/etc/meshgate/gateway.pem\", key = \"/etc/meshgate/gateway-key.pem\" }"
            }
            (Section::Verify, "spiffe_ids") => "spiffe_ids = [\"spiffe://example.test/backend\"]",
            (Section::Verify, "trust_domains") => "trust_domains = [\"example.test\"]",
            (Section::Verify, "dns_names") => "dns_names = [\"backend.example.test\"]",
            (Section::Identity, "cert") => "cert = \"/etc/meshgate/gateway.pem\"",
            (Section::Identity, "key") => "key = \"/etc/meshgate/gateway-key.pem\"",
            (Section::Listeners, "http") => {
                "http = { max_request_head = 65536, request_timeout = \"30s\" }"
            }
            (Section::ListenerHttp, "max_request_head") => "max_request_head = 65536",
            (Section::ListenerHttp, "request_timeout") => "request_timeout = \"30s\"",
            (Section::Routes, "direct_response") => {
                "direct_response = { status = 200, body = \"ok\\n\" }"
            }
            (Section::Routes, "redirect") => {
                "redirect = { location = \"https://example.test/\", status = 301 }"
            }
            (Section::Routes, "request_headers") => {
                "request_headers = { add = { x-env = \"prod\" }, set = { x-team = \"web\" }, remove = [\"x-debug\"] }"
            }
            (Section::Routes, "response_headers") => {
                "response_headers = { set = { cache-control = \"no-store\" }, remove = [\"server\"] }"
            }
            (Section::Routes, "prefix_rewrite") => "prefix_rewrite = \"/v2/\"",
            (Section::Routes, "host_rewrite") => "host_rewrite = \"backend.internal\"",
            (Section::Routes, "timeout") => "timeout = \"15s\"",
            (Section::Routes, "upgrades") => "upgrades = [\"websocket\"]",
            (Section::RouteMatch, "hosts") => "hosts = [\"api.example.test\", \"*.example.test\"]",
            (Section::RouteMatch, "path") => "path = { prefix = \"/api/\" }",
            (Section::RouteMatch, "methods") => "methods = [\"GET\", \"HEAD\"]",
            (Section::RouteMatch, "headers") => {
                "headers = [{ name = \"x-canary\", exact = \"1\" }]"
            }
            (Section::RouteMatch, "query") => "query = [{ name = \"debug\", present = true }]",
            (Section::PathMatch, "prefix") => "prefix = \"/api/\"",
            (Section::PathMatch, "exact") => "exact = \"/healthz\"",
            (Section::PathMatch, "regex") => "regex = \"^/v[0-9]+/\"",
            (Section::HeaderMatch, "name") => "name = \"x-canary\"",
            (Section::HeaderMatch, "exact") => "exact = \"1\"",
            (Section::HeaderMatch, "regex") => "regex = \"^(alpha|beta)$\"",
            (Section::HeaderMatch, "present") => "present = true",
            (Section::QueryMatch, "name") => "name = \"version\"",
            (Section::QueryMatch, "exact") => "exact = \"2\"",
            (Section::QueryMatch, "regex") => "regex = \"^v[0-9]+$\"",
            (Section::QueryMatch, "present") => "present = true",
            (Section::DirectResponse, "status") => "status = 200",
            (Section::DirectResponse, "body") => "body = \"ok\\n\"",
            (Section::Redirect, "location") => "location = \"https://example.test/\"",
            (Section::Redirect, "status") => "status = 301",
            (Section::HeaderOps, "add") => "add = { x-env = \"prod\" }",
            (Section::HeaderOps, "set") => "set = { x-team = \"web\" }",
            (Section::HeaderOps, "remove") => "remove = [\"x-debug\"]",
            (Section::Routes, "retry") => {
                "retry = { attempts = 3, on = [\"connect-failure\", \"reset\", \"gateway-error\"] }"
            }
            (Section::RouteRetry, "attempts") => "attempts = 3",
            (Section::RouteRetry, "on") => "on = [\"connect-failure\", \"reset\", \"5xx\"]",
            (Section::RouteRetry, "status_codes") => "status_codes = [503, 429]",
            (Section::RouteRetry, "per_try_timeout") => "per_try_timeout = \"2s\"",
            (Section::RouteRetry, "backoff_base") => "backoff_base = \"25ms\"",
            (Section::RouteRetry, "backoff_max") => "backoff_max = \"250ms\"",
            (Section::Clusters, "circuit_breakers") => {
                "circuit_breakers = { max_requests = 1024, max_pending_requests = 1024 }"
            }
            (Section::Clusters, "retry_budget") => {
                "retry_budget = { budget_percent = 20, min_retry_concurrency = 3 }"
            }
            (Section::CircuitBreakers, "max_connections") => "max_connections = 1024",
            (Section::CircuitBreakers, "max_pending_requests") => "max_pending_requests = 1024",
            (Section::CircuitBreakers, "max_requests") => "max_requests = 1024",
            (Section::RetryBudget, "budget_percent") => "budget_percent = 20",
            (Section::RetryBudget, "min_retry_concurrency") => "min_retry_concurrency = 3",
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_read_from_serde() {
        assert_eq!(
            fields::<Cluster>(),
            [
                "name",
                "endpoints",
                "connect_timeout",
                "balance",
                "hash_on",
                "tls",
                "health_check",
                "outlier_detection",
                "circuit_breakers",
                "retry_budget",
                "protocol"
            ]
        );
        assert_eq!(fields::<Route>()[4], "match");
        assert_eq!(
            fields::<Config>(),
            [
                "version",
                "admin",
                "runtime",
                "access_log",
                "control",
                "telemetry",
                "listeners",
                "routes",
                "clusters",
                "policies"
            ]
        );
    }

    /// Each leaf field's example is valid for its struct, so type-error hints never lie.
    #[test]
    fn every_leaf_field_has_a_valid_example() {
        fn check<T: DeserializeOwned>(section: Section) {
            for field in section.fields() {
                let example = section
                    .example(field)
                    .unwrap_or_else(|| panic!("no example for {}.{field}", section.title()));
                let parsed: Result<T, _> = toml::from_str(example);
                assert!(
                    parsed.is_ok(),
                    "example for {}.{field} does not parse: {example}",
                    section.title()
                );
            }
        }
        check::<Admin>(Section::Admin);
        check::<Runtime>(Section::Runtime);
        check::<AccessLog>(Section::AccessLog);
        check::<Telemetry>(Section::Telemetry);
        check::<Listener>(Section::Listeners);
        check::<Route>(Section::Routes);
        check::<WeightedCluster>(Section::WeightedClusters);
        check::<Cluster>(Section::Clusters);
        check::<ListenerTls>(Section::ListenerTls);
        check::<Certificate>(Section::Certificates);
        check::<TrustBundle>(Section::TrustBundles);
        check::<RouteMatch>(Section::RouteMatch);
        check::<PeerMatch>(Section::PeerMatch);
        check::<ClusterTls>(Section::ClusterTls);
        check::<Verify>(Section::Verify);
        check::<Identity>(Section::Identity);
        check::<HealthCheck>(Section::HealthCheck);
        check::<OutlierDetection>(Section::OutlierDetection);
        check::<ListenerHttp>(Section::ListenerHttp);
        check::<PathMatch>(Section::PathMatch);
        check::<HeaderMatch>(Section::HeaderMatch);
        check::<QueryMatch>(Section::QueryMatch);
        check::<DirectResponse>(Section::DirectResponse);
        check::<Redirect>(Section::Redirect);
        check::<HeaderOps>(Section::HeaderOps);
        check::<Policy>(Section::Policies);
        check::<RouteMatch>(Section::PolicyRules);
        check::<RouteRetry>(Section::RouteRetry);
        check::<CircuitBreakers>(Section::CircuitBreakers);
        check::<RetryBudget>(Section::RetryBudget);
        for field in Section::Top.fields() {
            assert!(
                Section::Top.example(field).is_some(),
                "no example for {field}"
            );
        }
    }

    // ---- docs/config-reference.md is checked against the code ----

    fn reference() -> String {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/config-reference.md");
        std::fs::read_to_string(path).unwrap_or_else(|err| panic!("read {path}: {err}"))
    }

    /// The heading of each section in the reference.
    fn heading(section: Section) -> &'static str {
        match section {
            Section::Top => "## Top level",
            Section::Admin => "## `[admin]`",
            Section::Runtime => "## `[runtime]`",
            Section::Listeners => "## `[[listeners]]`",
            Section::Routes => "## `[[routes]]`",
            Section::WeightedClusters => "### `weighted_clusters` entries",
            Section::Clusters => "## `[[clusters]]`",
            Section::ListenerTls => "### `[listeners.tls]`",
            Section::Certificates => "#### `certificates` entries",
            Section::TrustBundles => "#### `trust_bundles` entries",
            Section::RouteMatch => "### `[routes.match]`",
            Section::PeerMatch => "#### `peer`",
            Section::ClusterTls => "### `[clusters.tls]`",
            Section::Verify => "#### `verify`",
            Section::Identity => "#### `identity`",
            Section::HealthCheck => "### `[clusters.health_check]`",
            Section::OutlierDetection => "### `[clusters.outlier_detection]`",
            Section::ListenerHttp => "### `[listeners.http]`",
            Section::PathMatch => "#### `path`",
            Section::HeaderMatch => "#### `headers` entries",
            Section::QueryMatch => "#### `query` entries",
            Section::DirectResponse => "### `direct_response`",
            Section::Redirect => "### `redirect`",
            Section::HeaderOps => "### `request_headers` and `response_headers`",
            Section::AccessLog => "## `[access_log]`",
            Section::Control => "## `[control]`",
            Section::ControlEnrollment => "### `[control.enrollment]`",
            Section::Telemetry => "## `[telemetry]`",
            Section::ControlWorkloadApi => "### `[control.workload_api]`",
            Section::Policies => "## `[[policies]]`",
            Section::PolicyRules => "### `[[policies.rules]]`",
            Section::RouteRetry => "### `[routes.retry]`",
            Section::CircuitBreakers => "### `[clusters.circuit_breakers]`",
            Section::RetryBudget => "### `[clusters.retry_budget]`",
        }
    }

    /// Fenced blocks: (info string, first line number, body).
    fn fenced_blocks(doc: &str) -> Vec<(String, usize, String)> {
        let mut blocks = Vec::new();
        let mut open: Option<(String, usize, String)> = None;
        for (number, line) in doc.lines().enumerate() {
            match (line.strip_prefix("```"), open.take()) {
                (Some(_), Some(block)) => blocks.push(block),
                (Some(info), None) => {
                    open = Some((info.trim().to_owned(), number + 1, String::new()))
                }
                (None, Some(mut block)) => {
                    block.2.push_str(line);
                    block.2.push('\n');
                    open = Some(block);
                }
                (None, None) => {}
            }
        }
        assert!(open.is_none(), "unterminated code block in the reference");
        blocks
    }

    /// The lines of `section` outside code blocks, up to the next heading.
    fn section_lines(doc: &str, section: Section) -> Vec<String> {
        let mut in_fence = false;
        let mut inside = false;
        let mut found = false;
        let mut out = Vec::new();
        for line in doc.lines() {
            if line.starts_with("```") {
                in_fence = !in_fence;
                continue;
            }
            if in_fence {
                continue;
            }
            if line.starts_with('#') {
                inside = line.trim() == heading(section);
                found |= inside;
                continue;
            }
            if inside {
                out.push(line.to_owned());
            }
        }
        assert!(found, "the reference has no heading {:?}", heading(section));
        out
    }

    /// Field table rows of a section: (field, default cell).
    fn field_rows(doc: &str, section: Section) -> Vec<(String, String)> {
        section_lines(doc, section)
            .iter()
            .filter(|line| line.starts_with("| `"))
            .map(|line| {
                let cells: Vec<&str> = line.split('|').map(str::trim).collect();
                let field = cells[1].trim_matches('`').to_owned();
                let default = cells.get(3).copied().unwrap_or_default().to_owned();
                (field, default)
            })
            .collect()
    }

    #[test]
    fn reference_toml_blocks_are_valid() {
        let doc = reference();
        let blocks = fenced_blocks(&doc);
        let mut complete = 0;
        for (info, line, body) in &blocks {
            let origin = format!("config-reference.md block at line {line}");
            match info.as_str() {
                "toml" => {
                    complete += 1;
                    if let Err(err) = crate::parse(body, &origin) {
                        panic!("{err}");
                    }
                }
                "toml fragment" => {
                    // Fragments may name things defined elsewhere, but their syntax, field
                    // names and value types must be right.
                    if let Err(err) = crate::parse(body, &origin) {
                        for error in &err.errors {
                            assert!(
                                !(error.message.starts_with("TOML syntax")
                                    || error.message.starts_with("unknown field")
                                    || error.message.starts_with("expected ")),
                                "{origin}: {error}"
                            );
                        }
                    }
                }
                "text" | "" => {}
                other => panic!("{origin}: unexpected code block type {other:?}"),
            }
        }
        assert!(complete >= 2, "the reference lost its complete examples");
    }

    #[test]
    fn reference_documents_exactly_the_accepted_fields() {
        let doc = reference();
        for section in Section::ALL {
            let documented: Vec<String> = field_rows(&doc, section)
                .into_iter()
                .map(|(f, _)| f)
                .collect();
            for field in section.fields() {
                assert!(
                    documented.iter().any(|d| d == field),
                    "`{field}` of {} is accepted by the loader but has no row under {:?} in \
                     docs/config-reference.md",
                    section.title(),
                    heading(section)
                );
            }
            for field in &documented {
                assert!(
                    section.fields().contains(&field.as_str()),
                    "docs/config-reference.md documents `{field}` under {:?}, but the loader \
                     does not accept it",
                    heading(section)
                );
            }
        }
    }

    #[test]
    fn reference_defaults_match_the_loader() {
        const MINIMAL: &str = r#"
            version = 1
            [[listeners]]
            name = "l"
            address = "127.0.0.1:0"
            protocol = "tcp"
            [[routes]]
            name = "r"
            listener = "l"
            cluster = "c"
            [[clusters]]
            name = "c"
            endpoints = ["127.0.0.1:1"]
        "#;
        let config = crate::parse(MINIMAL, "minimal").unwrap_or_else(|err| panic!("{err}"));
        let json = serde_json::to_value(&config).unwrap_or_default();
        let http = MINIMAL.replace("\"tcp\"", "\"http\"");
        let http = crate::parse(&http, "minimal http").unwrap_or_else(|err| panic!("{err}"));
        let http_json = serde_json::to_value(&http).unwrap_or_default();
        let logged = format!("{MINIMAL}\n[access_log]\npath = \"stdout\"\n");
        let logged =
            crate::parse(&logged, "minimal access log").unwrap_or_else(|err| panic!("{err}"));
        let logged_json = serde_json::to_value(&logged).unwrap_or_default();
        let control_json = |extra: &str| {
            let text = format!("{MINIMAL}\n[control]\n{extra}");
            let control =
                crate::parse(&text, "minimal control").unwrap_or_else(|err| panic!("{err}"));
            serde_json::to_value(&control).unwrap_or_default()
        };
        let checks = format!("{MINIMAL}\n[clusters.health_check]\n[clusters.outlier_detection]\n");
        let checks = crate::parse(&checks, "minimal checks").unwrap_or_else(|err| panic!("{err}"));
        let checks_json = serde_json::to_value(&checks).unwrap_or_default();
        let (control, enrollment, workload) = (
            control_json(""),
            control_json("[control.enrollment]\n"),
            control_json("[control.workload_api]\n"),
        );
        let doc = reference();
        let mut checked = 0;
        for section in Section::ALL {
            let object = match section {
                Section::Top => &json,
                Section::Admin => &json["admin"],
                Section::Runtime => &json["runtime"],
                Section::Listeners => &json["listeners"][0],
                Section::Clusters => &json["clusters"][0],
                Section::ListenerHttp => &http_json["listeners"][0]["http"],
                Section::AccessLog => &logged_json["access_log"],
                Section::Control => &control["control"],
                Section::ControlEnrollment => &enrollment["control"]["enrollment"],
                Section::Telemetry => &json["telemetry"],
                Section::ControlWorkloadApi => &workload["control"]["workload_api"],
                Section::HealthCheck => &checks_json["clusters"][0]["health_check"],
                Section::OutlierDetection => &checks_json["clusters"][0]["outlier_detection"],
                Section::RouteRetry => &http_json["routes"][0]["http"]["retry"],
                Section::CircuitBreakers => &json["clusters"][0]["circuit_breakers"],
                Section::RetryBudget => &json["clusters"][0]["retry_budget"],
                Section::Routes
                | Section::WeightedClusters
                | Section::ListenerTls
                | Section::Certificates
                | Section::TrustBundles
                | Section::RouteMatch
                | Section::PeerMatch
                | Section::ClusterTls
                | Section::Verify
                | Section::Identity
                | Section::PathMatch
                | Section::HeaderMatch
                | Section::QueryMatch
                | Section::DirectResponse
                | Section::Redirect
                | Section::HeaderOps
                | Section::Policies
                | Section::PolicyRules => continue,
            };
            for (field, default) in field_rows(&doc, section) {
                let actual = &object[field.as_str()];
                if default.starts_with("none") {
                    assert!(
                        actual.is_null(),
                        "{field}: documented none, loader gives {actual}"
                    );
                    checked += 1;
                } else if let Some(literal) = default
                    .strip_prefix('`')
                    .and_then(|rest| rest.split('`').next())
                {
                    let parsed: toml::Table = toml::from_str(&format!("v = {literal}"))
                        .unwrap_or_else(|err| panic!("{field}: default {literal}: {err}"));
                    let want = serde_json::to_value(&parsed["v"]).unwrap_or_default();
                    assert_eq!(
                        actual,
                        &want,
                        "{} `{field}`: documented default {literal}, loader default {actual}",
                        section.title()
                    );
                    checked += 1;
                }
            }
        }
        assert!(checked >= 12, "only {checked} defaults were checked");
    }
}
