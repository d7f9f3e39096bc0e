//! `TryFrom<raw::Config> for Config`: defaults, value checks and cross references.
//!
//! Each field is checked on its own and each problem recorded, so one pass reports everything;
//! the validated [`Config`] is assembled only when nothing was found.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::duration::{format_duration, parse_duration};
use crate::error::ConfigError;
use crate::load::nearest;
use crate::pem::{self, FileError};
use crate::raw;
use crate::spiffe::{SpiffeId, TrustDomain};
use crate::types::{
    AccessLogConfig, AccessLogFormat, AccessLogTarget, AdminConfig, ClientAuth, Cluster,
    ClusterTls, Config, Listener, ListenerTls, PeerMatch, Policy, Protocol, Route, RouteAction,
    RouteMatch, RuntimeConfig, ServerCertificate, TelemetryConfig, TlsIdentity, TlsVersion,
    TrustBundle, UpstreamProtocol, UpstreamVerify, WeightedCluster,
};

mod balance;
mod control;
mod http;
mod policy;
mod retry;

/// The only file format version this release reads.
pub(crate) const VERSION: u32 = 1;

pub(crate) const DEFAULT_ADMIN_ADDRESS: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15000);
pub(crate) const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
pub(crate) const DEFAULT_RING_ENTRIES: u32 = 1024;
pub(crate) const MAX_RING_ENTRIES: u32 = 32768;
pub(crate) const DEFAULT_MAX_CONNECTIONS: u32 = 100_000;
pub(crate) const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
pub(crate) const DEFAULT_BACKLOG: u32 = 1024;
pub(crate) const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub(crate) const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub(crate) const DEFAULT_MAX_REQUEST_HEAD: u32 = 64 * 1024;
/// The HTTP/1.1 codec's hard limit on a head.
pub(crate) const MAX_REQUEST_HEAD: u32 = 1 << 20;
pub(crate) const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
pub(crate) const DEFAULT_ROUTE_TIMEOUT: Duration = Duration::from_secs(15);
/// Compiled size limit of a route regex (path or header), so a config cannot make matching slow
/// or the gateway's memory large.
pub(crate) const REGEX_SIZE_LIMIT: usize = 1 << 20;
/// Entries per `add`, `set` or `remove` list of a route's header edits.
pub(crate) const MAX_HEADER_OPS: usize = 32;
/// Largest direct-response body.
pub(crate) const MAX_DIRECT_BODY: usize = 64 * 1024;
pub(crate) const MAX_NAME_LEN: usize = 64;
/// `sizeof(sockaddr_un.sun_path) - 1` on Linux.
pub(crate) const MAX_UNIX_SOCKET_PATH: usize = 107;
pub(crate) const DEFAULT_ACCESS_LOG_QUEUE: u32 = 65536;
pub(crate) const MAX_ACCESS_LOG_QUEUE: u32 = 1 << 20;

/// Access log formats this release writes.
const ACCESS_LOG_FORMATS: [&str; 2] = ["json", "text"];

/// Protocol names this release accepts.
const PROTOCOLS: [&str; 5] = ["tcp", "tls", "tls-passthrough", "http", "https"];
/// What validation needs besides the file: where relative paths start, and the time that
/// certificate validity is checked at.
#[derive(Debug, Clone)]
pub(crate) struct Context {
    /// Relative file paths resolve against this directory; `None`: the working directory.
    pub base_dir: Option<PathBuf>,
    pub now: SystemTime,
}

impl Default for Context {
    fn default() -> Self {
        Context {
            base_dir: None,
            now: SystemTime::now(),
        }
    }
}

impl TryFrom<raw::Config> for Config {
    type Error = Vec<ConfigError>;

    fn try_from(raw: raw::Config) -> Result<Config, Vec<ConfigError>> {
        validate(raw, &Context::default())
    }
}

/// Validates `raw` in `context`: files named by the config are read and checked now.
pub(crate) fn validate(raw: raw::Config, context: &Context) -> Result<Config, Vec<ConfigError>> {
    let mut validator = Validator {
        errors: Vec::new(),
        context: context.clone(),
    };
    match validator.config(raw) {
        Some(config) if validator.errors.is_empty() => Ok(config),
        _ if !validator.errors.is_empty() => Err(validator.errors),
        _ => Err(vec![ConfigError {
            path: String::new(),
            message: "internal error: config rejected without a reason".to_owned(),
            hint: Some("this is a meshgate bug; please report it with the config file".to_owned()),
            line: None,
            column: None,
        }]),
    }
}

struct Validator {
    errors: Vec<ConfigError>,
    context: Context,
}

/// Names declared in one array of tables: name -> index of the first declaration.
#[derive(Default)]
struct Names {
    first: HashMap<String, usize>,
    in_order: Vec<String>,
}

impl Names {
    fn index(&self, name: &str) -> Option<usize> {
        self.first.get(name).copied()
    }

    /// "did you mean ...? " plus the list of defined names, for hints.
    fn suggest(&self, name: &str, kind: &str) -> String {
        let candidates: Vec<&str> = self.in_order.iter().map(String::as_str).collect();
        let mut hint = String::new();
        if let Some(near) = nearest(name, &candidates) {
            hint.push_str(&format!("did you mean \"{near}\"? "));
        }
        if candidates.is_empty() {
            hint.push_str(&format!("no {kind}s are defined; add a [[{kind}s]] table"));
        } else {
            hint.push_str(&format!("{kind}s defined: {}", quoted_list(&candidates)));
        }
        hint
    }
}

fn quoted_list(names: &[&str]) -> String {
    const MAX: usize = 10;
    let mut list = names
        .iter()
        .take(MAX)
        .map(|n| format!("\"{n}\""))
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > MAX {
        list.push_str(&format!(" and {} more", names.len() - MAX));
    }
    list
}

impl Validator {
    fn error(
        &mut self,
        path: impl Into<String>,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) {
        self.errors.push(ConfigError {
            path: path.into(),
            message: message.into(),
            hint: Some(hint.into()),
            line: None,
            column: None,
        });
    }

    fn config(&mut self, raw: raw::Config) -> Option<Config> {
        let version = self.version(raw.version);
        let admin = self.admin(raw.admin.unwrap_or_default());
        let runtime = self.runtime(raw.runtime.unwrap_or_default());
        let access_log = match raw.access_log {
            None => Some(None),
            Some(raw) => self.access_log(raw).map(Some),
        };
        let control = match raw.control {
            None => Some(None),
            Some(raw) => self.control(raw).map(Some),
        };

        let listener_names = self.names(
            "listeners",
            "listener",
            raw.listeners.iter().map(|l| l.name.as_deref()),
        );
        // Listeners refer to route names through `default_route`.
        let route_names = self.names(
            "routes",
            "route",
            raw.routes.iter().map(|r| r.name.as_deref()),
        );
        let cluster_names = self.names(
            "clusters",
            "cluster",
            raw.clusters.iter().map(|c| c.name.as_deref()),
        );

        // Bindings are known even for listeners and routes that fail other checks, so a route
        // with a bad cluster does not also make its listener look route-less.
        let bindings = Bindings {
            listeners: raw
                .listeners
                .iter()
                .enumerate()
                .map(|(index, l)| BoundListener {
                    name: l.name.clone().unwrap_or_default(),
                    tcp: l.protocol.as_deref() == Some("tcp"),
                    protocol: l.protocol.clone(),
                    client_auth: l
                        .tls
                        .as_ref()
                        .and_then(|t| t.client_auth.clone())
                        .unwrap_or_else(|| "none".to_owned()),
                    default_route: l.default_route.clone(),
                    referable: l.name.as_deref().and_then(|n| listener_names.index(n))
                        == Some(index),
                })
                .collect(),
            routes: raw
                .routes
                .iter()
                .map(|r| BoundRoute {
                    name: r.name.clone().unwrap_or_default(),
                    listener: r.listener.as_deref().and_then(|n| listener_names.index(n)),
                    has_match: r.matcher.is_some(),
                })
                .collect(),
        };
        let mut listeners: Vec<Option<Listener>> = raw
            .listeners
            .into_iter()
            .enumerate()
            .map(|(index, listener)| self.listener(index, listener))
            .collect();
        let clusters: Vec<Option<Cluster>> = raw
            .clusters
            .into_iter()
            .enumerate()
            .map(|(index, cluster)| self.cluster(index, cluster))
            .collect();
        let routes: Vec<Option<Route>> = raw
            .routes
            .into_iter()
            .enumerate()
            .map(|(index, route)| {
                let listener = route
                    .listener
                    .as_deref()
                    .and_then(|n| listener_names.index(n))
                    .and_then(|i| bindings.listeners.get(i));
                self.route(index, route, &listener_names, &cluster_names, listener)
            })
            .collect();

        // Policies are not referred to by name; the check is for uniqueness and syntax.
        self.names(
            "policies",
            "policy",
            raw.policies.iter().map(|p| p.name.as_deref()),
        );
        let policies: Vec<Option<Policy>> = raw
            .policies
            .into_iter()
            .enumerate()
            .map(|(index, policy)| self.policy(index, policy, &listener_names, &bindings.listeners))
            .collect();

        self.route_hashing(&listeners, &routes, &clusters);
        self.bind_routes(&mut listeners, &bindings);
        self.default_routes(&mut listeners, &bindings, &route_names);
        self.listener_addresses(&listeners, admin.as_ref());

        let config = Config {
            version: version?,
            admin: admin?,
            runtime: runtime?,
            access_log: access_log?,
            control: control?,
            telemetry: TelemetryConfig {
                istio_compat: raw.telemetry.and_then(|t| t.istio_compat).unwrap_or(false),
            },
            listeners: listeners.into_iter().collect::<Option<_>>()?,
            routes: routes.into_iter().collect::<Option<_>>()?,
            clusters: clusters.into_iter().collect::<Option<_>>()?,
            policies: policies.into_iter().collect::<Option<_>>()?,
        };
        Some(config)
    }

    fn version(&mut self, version: Option<i64>) -> Option<u32> {
        match version {
            Some(v) if v == i64::from(VERSION) => Some(VERSION),
            Some(v) => {
                self.error(
                    "version",
                    format!(
                        "unsupported config version {v}; this release reads version {VERSION} only"
                    ),
                    format!(
                        "set `version = {VERSION}` and use the fields described in \
                         docs/config-reference.md"
                    ),
                );
                None
            }
            None => {
                self.error(
                    "version",
                    "missing `version`",
                    format!("add `version = {VERSION}` as the first line of the file"),
                );
                None
            }
        }
    }

    fn admin(&mut self, raw: raw::Admin) -> Option<AdminConfig> {
        let danger_allow_non_loopback = raw.danger_allow_non_loopback.unwrap_or(false);
        let address = match raw.address {
            None => Some(DEFAULT_ADMIN_ADDRESS),
            Some(text) => {
                let address = self.address("admin.address", &text, AddressUse::Admin)?;
                if !address.ip().to_canonical().is_loopback() && !danger_allow_non_loopback {
                    self.error(
                        "admin.address",
                        format!("admin address {address} is not a loopback address"),
                        "the admin API has no authentication: bind it to 127.0.0.1 or [::1], or \
                         set danger_allow_non_loopback = true under [admin] to expose it anyway",
                    );
                    return None;
                }
                Some(address)
            }
        };
        let unix_socket = match raw.unix_socket {
            None => None,
            Some(text) => Some(self.unix_socket(&text)?),
        };
        Some(AdminConfig {
            address,
            unix_socket,
            danger_allow_non_loopback,
        })
    }

    fn unix_socket(&mut self, text: &str) -> Option<PathBuf> {
        const PATH: &str = "admin.unix_socket";
        const EXAMPLE: &str = "e.g. unix_socket = \"/run/meshgate/admin.sock\"";
        let path = PathBuf::from(text);
        if text.is_empty() {
            self.error(
                PATH,
                "unix_socket is empty",
                format!("give an absolute path, {EXAMPLE}, or remove the field"),
            );
            None
        } else if !path.is_absolute() {
            self.error(
                PATH,
                format!("unix_socket {text:?} is not an absolute path"),
                format!("a relative path would depend on the working directory; {EXAMPLE}"),
            );
            None
        } else if text.len() > MAX_UNIX_SOCKET_PATH {
            self.error(
                PATH,
                format!(
                    "unix_socket path is {} bytes; Unix socket paths are limited to \
                     {MAX_UNIX_SOCKET_PATH} bytes",
                    text.len()
                ),
                format!("use a shorter path, {EXAMPLE}"),
            );
            None
        } else {
            Some(path)
        }
    }

    fn access_log(&mut self, raw: raw::AccessLog) -> Option<AccessLogConfig> {
        const EXAMPLE: &str = "e.g. path = \"/var/log/meshgate/access.log\", or path = \"stdout\"";
        let target = match raw.path {
            None => {
                self.error(
                    "access_log.path",
                    "missing `path`",
                    format!(
                        "say where the access log goes, {EXAMPLE}; remove the [access_log] table \
                         for no access log"
                    ),
                );
                None
            }
            Some(text) if text.trim().is_empty() => {
                self.error(
                    "access_log.path",
                    "`path` is empty",
                    format!(
                        "give a file path (relative paths start at the config file's directory), \
                         {EXAMPLE}"
                    ),
                );
                None
            }
            Some(text) if text == "stdout" => Some(AccessLogTarget::Stdout),
            Some(text)
                if text == "-"
                    || text.eq_ignore_ascii_case("stdout")
                    || text.eq_ignore_ascii_case("stderr") =>
            {
                self.error(
                    "access_log.path",
                    format!(
                        "`path` {text:?} is not a stream here: it would name a file in the config \
                         file's directory"
                    ),
                    format!(
                        "write path = \"stdout\" for standard output (the only stream supported), \
                         or path = \"./{text}\" for a file of that name"
                    ),
                );
                None
            }
            Some(text) if text.ends_with('/') => {
                self.error(
                    "access_log.path",
                    format!("`path` {text:?} names a directory, not a file"),
                    format!("name the log file in it, e.g. path = \"{text}access.log\""),
                );
                None
            }
            Some(text) => {
                let file = PathBuf::from(text);
                Some(AccessLogTarget::File(match &self.context.base_dir {
                    Some(base) if file.is_relative() => base.join(file),
                    _ => file,
                }))
            }
        };
        let format = match raw.format.as_deref() {
            None | Some("json") => Some(AccessLogFormat::Json),
            Some("text") => Some(AccessLogFormat::Text),
            Some(other) => {
                let mut hint = match nearest(other, &ACCESS_LOG_FORMATS) {
                    Some(near) => format!("did you mean \"{near}\"? "),
                    None => String::new(),
                };
                hint.push_str(
                    "write format = \"json\" (one JSON object per line, Istio's keys) or \
                     \"text\" (Envoy's default format)",
                );
                self.error(
                    "access_log.format",
                    format!(
                        "unknown access log format `{other}`; allowed values: {}",
                        quoted_list(&ACCESS_LOG_FORMATS)
                    ),
                    hint,
                );
                None
            }
        };
        let queue = self.integer(
            "access_log.queue",
            "queue",
            raw.queue,
            1,
            MAX_ACCESS_LOG_QUEUE,
            DEFAULT_ACCESS_LOG_QUEUE,
        );
        Some(AccessLogConfig {
            target: target?,
            format: format?,
            queue: usize::try_from(queue?).ok()?,
        })
    }

    fn runtime(&mut self, raw: raw::Runtime) -> Option<RuntimeConfig> {
        let cores = match raw.cores {
            None => Some(None),
            Some(cores) => match usize::try_from(cores) {
                Ok(cores) if cores >= 1 => Some(Some(cores)),
                _ => {
                    self.error(
                        "runtime.cores",
                        format!("`cores` must be at least 1, found {cores}"),
                        "e.g. cores = 2, or leave it out to use every CPU the process may run on",
                    );
                    None
                }
            },
        };
        let drain_timeout = self.duration(
            "runtime.drain_timeout",
            "drain_timeout",
            raw.drain_timeout,
            DEFAULT_DRAIN_TIMEOUT,
            false,
        );
        let ring_entries = match raw.ring_entries {
            None => Some(DEFAULT_RING_ENTRIES),
            Some(n) => match u32::try_from(n) {
                Ok(n) if (2..=MAX_RING_ENTRIES).contains(&n) && n.is_power_of_two() => Some(n),
                _ => {
                    let suggestion = match u32::try_from(n) {
                        Ok(n) if (3..MAX_RING_ENTRIES).contains(&n) => n.next_power_of_two(),
                        Ok(n) if n > MAX_RING_ENTRIES => MAX_RING_ENTRIES,
                        _ => DEFAULT_RING_ENTRIES,
                    };
                    self.error(
                        "runtime.ring_entries",
                        format!(
                            "`ring_entries` must be a power of two between 2 and \
                             {MAX_RING_ENTRIES}, found {n}"
                        ),
                        format!("e.g. ring_entries = {suggestion}"),
                    );
                    None
                }
            },
        };
        Some(RuntimeConfig {
            cores: cores?,
            pin: raw.pin.unwrap_or(true),
            drain_timeout: drain_timeout?,
            ring_entries: ring_entries?,
            watch_files: raw.watch_files.unwrap_or(true),
        })
    }

    /// Checks names (syntax, duplicates) and returns where each was first declared.
    fn names<'a>(
        &mut self,
        section: &str,
        kind: &str,
        names: impl Iterator<Item = Option<&'a str>>,
    ) -> Names {
        let mut out = Names::default();
        for (index, name) in names.enumerate() {
            let path = format!("{section}[{index}].name");
            let Some(name) = name else {
                self.error(
                    path,
                    "missing `name`",
                    format!(
                        "every {kind} needs a unique name, e.g. {}",
                        name_example(kind)
                    ),
                );
                continue;
            };
            self.name_syntax(&path, kind, name);
            match out.first.get(name) {
                Some(first) => self.error(
                    path,
                    format!("duplicate {kind} name \"{name}\" (first used by {section}[{first}])"),
                    format!("{kind} names must be unique; rename one of them"),
                ),
                None => {
                    out.first.insert(name.to_owned(), index);
                    out.in_order.push(name.to_owned());
                }
            }
        }
        out
    }

    /// `{path}.listener`: the index of the listener it names, or an error saying what is
    /// missing or which listeners exist. `what`: how the owner uses it, for the hint.
    fn listener_ref(
        &mut self,
        path: &str,
        name: Option<&str>,
        listeners: &Names,
        what: &str,
    ) -> Option<usize> {
        let Some(name) = name else {
            self.error(
                format!("{path}.listener"),
                "missing `listener`",
                format!(
                    "name the listener {what}; {}",
                    listeners.suggest("", "listener")
                ),
            );
            return None;
        };
        let found = listeners.index(name);
        if found.is_none() {
            self.error(
                format!("{path}.listener"),
                format!("no listener named \"{name}\""),
                listeners.suggest(name, "listener"),
            );
        }
        found
    }

    fn name_syntax(&mut self, path: &str, kind: &str, name: &str) {
        let problem = if name.is_empty() {
            "it is empty".to_owned()
        } else if name.chars().count() > MAX_NAME_LEN {
            format!(
                "it is {} characters long, the limit is {MAX_NAME_LEN}",
                name.chars().count()
            )
        } else if let Some(c) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
        {
            format!("character {c:?} is not allowed")
        } else {
            return;
        };
        self.error(
            path,
            format!("invalid {kind} name \"{name}\": {problem}"),
            format!(
                "use 1 to {MAX_NAME_LEN} characters from A-Z a-z 0-9 _ . -, e.g. {}",
                name_example(kind)
            ),
        );
    }

    fn listener(&mut self, index: usize, raw: raw::Listener) -> Option<Listener> {
        let path = format!("listeners[{index}]");
        let address = match &raw.address {
            Some(text) => self.address(&format!("{path}.address"), text, AddressUse::Listener),
            None => {
                self.error(
                    format!("{path}.address"),
                    "missing `address`",
                    "add the IP:port to listen on, e.g. address = \"127.0.0.1:15001\"",
                );
                None
            }
        };
        let protocol = self.protocol(&path, raw.protocol.as_deref());
        let max_connections = self.integer(
            &format!("{path}.max_connections"),
            "max_connections",
            raw.max_connections,
            1,
            u32::MAX,
            DEFAULT_MAX_CONNECTIONS,
        );
        let idle_timeout = self.duration(
            &format!("{path}.idle_timeout"),
            "idle_timeout",
            raw.idle_timeout,
            DEFAULT_IDLE_TIMEOUT,
            true,
        );
        let backlog = self.integer(
            &format!("{path}.backlog"),
            "backlog",
            raw.backlog,
            1,
            65535,
            DEFAULT_BACKLOG,
        );
        let handshake_timeout = if raw.handshake_timeout.is_some()
            && matches!(protocol, Some(Protocol::Tcp | Protocol::Http))
        {
            self.error(
                format!("{path}.handshake_timeout"),
                format!(
                    "a {} listener has no TLS handshake to time",
                    protocol.map_or("", Protocol::as_str)
                ),
                "remove handshake_timeout, or use protocol = \"tls\", \"https\" or \"tls-passthrough\"",
            );
            None
        } else {
            self.duration(
                &format!("{path}.handshake_timeout"),
                "handshake_timeout",
                raw.handshake_timeout,
                DEFAULT_HANDSHAKE_TIMEOUT,
                true,
            )
        };
        let tls_path = format!("{path}.tls");
        let tls = match (protocol, raw.tls) {
            (Some(p @ (Protocol::Tls | Protocol::Https)), Some(tls)) => {
                let alpn_given = tls.alpn.is_some();
                self.listener_tls(&tls_path, tls).map(|mut tls| {
                    if p == Protocol::Https && !alpn_given {
                        tls.alpn = default_https_alpn();
                    }
                    Some(tls)
                })
            }
            // No [listeners.tls]: defaults, and the identity from the gateway's local CA.
            (Some(p @ (Protocol::Tls | Protocol::Https)), None) => Some(Some(ListenerTls {
                certificates: Vec::new(),
                min_version: TlsVersion::Tls12,
                alpn: if p == Protocol::Https {
                    default_https_alpn()
                } else {
                    Vec::new()
                },
                client_auth: ClientAuth::None,
                trust_bundles: Vec::new(),
            })),
            (Some(other), Some(_)) => {
                self.error(
                    tls_path,
                    format!("a {other} listener does not terminate TLS, so it takes no tls table"),
                    if other == Protocol::TlsPassthrough {
                        "remove [listeners.tls]: tls-passthrough forwards the client's TLS bytes \
                         untouched; use protocol = \"tls\" to terminate TLS here"
                    } else {
                        "remove [listeners.tls], or set protocol = \"tls\" or \"https\" to \
                         terminate TLS"
                    },
                );
                None
            }
            (_, _) => Some(None),
        };
        let http_path = format!("{path}.http");
        let http = match (protocol, raw.http) {
            (Some(Protocol::Http | Protocol::Https), http) => self
                .listener_http(&http_path, http.unwrap_or_default())
                .map(Some),
            (Some(other), Some(_)) => {
                self.error(
                    http_path,
                    format!("a {other} listener does not speak HTTP, so it takes no http table"),
                    "remove [listeners.http], or set protocol = \"http\" or \"https\" to route \
                     HTTP requests",
                );
                None
            }
            (_, _) => Some(None),
        };
        Some(Listener {
            name: raw.name?,
            address: address?,
            protocol: protocol?,
            max_connections: max_connections?,
            idle_timeout: idle_timeout?,
            backlog: backlog?,
            routes: Vec::new(),
            handshake_timeout: handshake_timeout?,
            default_route: None,
            tls: tls?,
            http: http?,
        })
    }

    fn protocol(&mut self, listener_path: &str, protocol: Option<&str>) -> Option<Protocol> {
        let path = format!("{listener_path}.protocol");
        match protocol {
            Some("tcp") => return Some(Protocol::Tcp),
            Some("tls") => return Some(Protocol::Tls),
            Some("tls-passthrough") => return Some(Protocol::TlsPassthrough),
            Some("http") => return Some(Protocol::Http),
            Some("https") => return Some(Protocol::Https),
            None => self.error(
                path,
                "missing `protocol`",
                "add protocol = \"tcp\", \"tls\", \"tls-passthrough\", \"http\" or \"https\"",
            ),
            Some(other) => {
                let mut hint = match nearest(other, &PROTOCOLS) {
                    Some(near) => format!("did you mean \"{near}\"? "),
                    None => String::new(),
                };
                hint.push_str(
                    "write protocol = \"tcp\", \"tls\", \"tls-passthrough\", \"http\" or \"https\"",
                );
                self.error(
                    path,
                    format!(
                        "unknown protocol `{other}`; allowed values: {}",
                        quoted_list(&PROTOCOLS)
                    ),
                    hint,
                );
            }
        }
        None
    }

    fn cluster(&mut self, index: usize, raw: raw::Cluster) -> Option<Cluster> {
        let path = format!("clusters[{index}]");
        let endpoints = match raw.endpoints {
            None => {
                self.error(
                    format!("{path}.endpoints"),
                    "missing `endpoints`",
                    "list the upstream addresses, e.g. endpoints = [\"127.0.0.1:8080\"]",
                );
                None
            }
            Some(list) if list.is_empty() => {
                self.error(
                    format!("{path}.endpoints"),
                    format!(
                        "cluster \"{}\" has no endpoints",
                        raw.name.as_deref().unwrap_or_default()
                    ),
                    "list at least one upstream address, e.g. endpoints = [\"127.0.0.1:8080\"]",
                );
                None
            }
            Some(list) => self.endpoints(&path, &list),
        };
        let connect_timeout = self.duration(
            &format!("{path}.connect_timeout"),
            "connect_timeout",
            raw.connect_timeout,
            DEFAULT_CONNECT_TIMEOUT,
            true,
        );
        let balance = self.balance(&path, raw.balance.as_deref());
        let hash_on = self.hash_on(&path, balance, raw.hash_on);
        let mut tls = match raw.tls {
            None => Some(None),
            Some(tls) => self.cluster_tls(&format!("{path}.tls"), tls).map(Some),
        };
        let protocol = self.upstream_protocol(&path, raw.protocol.as_deref(), &mut tls);
        let health_check = match raw.health_check {
            None => Some(None),
            Some(hc) => self
                .health_check(&format!("{path}.health_check"), hc)
                .map(Some),
        };
        let outlier_detection = match raw.outlier_detection {
            None => Some(None),
            Some(od) => self
                .outlier_detection(&format!("{path}.outlier_detection"), od)
                .map(Some),
        };
        let (endpoints, endpoint_weights) = endpoints?;
        let circuit_breakers =
            self.circuit_breakers(&format!("{path}.circuit_breakers"), raw.circuit_breakers);
        let retry_budget = self.retry_budget(&format!("{path}.retry_budget"), raw.retry_budget);
        Some(Cluster {
            name: raw.name?,
            endpoints,
            endpoint_weights,
            connect_timeout: connect_timeout?,
            balance: balance?,
            hash_on: hash_on?,
            tls: tls?,
            health_check: health_check?,
            outlier_detection: outlier_detection?,
            circuit_breakers: circuit_breakers?,
            retry_budget: retry_budget?,
            protocol: protocol?,
        })
    }

    /// `[[clusters]] protocol`. HTTP/2 over TLS is chosen by ALPN: `alpn` defaults to
    /// `["h2"]` there and, when given, must offer `h2`.
    fn upstream_protocol(
        &mut self,
        cluster_path: &str,
        raw: Option<&str>,
        tls: &mut Option<Option<ClusterTls>>,
    ) -> Option<UpstreamProtocol> {
        let protocol = match raw {
            None | Some("http1") => UpstreamProtocol::Http1,
            Some("http2") => UpstreamProtocol::Http2,
            Some(other) => {
                let mut hint = match nearest(other, &["http1", "http2"]) {
                    Some(near) => format!("did you mean \"{near}\"? "),
                    None => String::new(),
                };
                hint.push_str("write protocol = \"http1\" or protocol = \"http2\"");
                self.error(
                    format!("{cluster_path}.protocol"),
                    format!("unknown upstream protocol `{other}`; allowed: \"http1\", \"http2\""),
                    hint,
                );
                return None;
            }
        };
        if protocol == UpstreamProtocol::Http2
            && let Some(Some(tls)) = tls.as_mut()
        {
            if tls.alpn.is_empty() {
                tls.alpn = vec!["h2".to_owned()];
            } else if !tls.alpn.iter().any(|p| p == "h2") {
                self.error(
                    format!("{cluster_path}.tls.alpn"),
                    format!(
                        "protocol = \"http2\" over TLS needs ALPN \"h2\", but alpn is {:?}",
                        tls.alpn
                    ),
                    "add \"h2\" to alpn (e.g. alpn = [\"h2\"]) or leave alpn out, or use \
                     protocol = \"http1\"",
                );
                return None;
            }
        }
        Some(protocol)
    }

    fn route(
        &mut self,
        index: usize,
        mut raw: raw::Route,
        listeners: &Names,
        clusters: &Names,
        listener: Option<&BoundListener>,
    ) -> Option<Route> {
        let path = format!("routes[{index}]");
        let matcher = match raw.matcher.take() {
            None => Some(None),
            Some(matcher) => self
                .route_match(&format!("{path}.match"), matcher, listener)
                .map(Some),
        };
        let listener_index = self.listener_ref(
            &path,
            raw.listener.as_deref(),
            listeners,
            "this route serves, e.g. listener = \"tcp-in\"",
        );
        let protocol = listener.and_then(|l| l.protocol.as_deref());
        let action = self.route_action(&path, &mut raw, clusters, protocol);
        let matched_path = matcher
            .as_ref()
            .map(|m| m.as_ref().and_then(|m| m.path.as_ref()));
        let http = self.route_http(&path, &mut raw, protocol, action.as_ref(), matched_path);
        Some(Route {
            name: raw.name?,
            listener: raw.listener?,
            listener_index: listener_index?,
            matcher: matcher?,
            action: action?,
            http: http?,
        })
    }

    /// `cluster`, `weighted_clusters`, `direct_response` or `redirect`: exactly one.
    fn route_action(
        &mut self,
        path: &str,
        raw: &mut raw::Route,
        clusters: &Names,
        protocol: Option<&str>,
    ) -> Option<RouteAction> {
        let given: Vec<&str> = [
            ("cluster", raw.cluster.is_some()),
            ("weighted_clusters", raw.weighted_clusters.is_some()),
            ("direct_response", raw.direct_response.is_some()),
            ("redirect", raw.redirect.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, set)| set.then_some(name))
        .collect();
        match given.as_slice() {
            [] => {
                let (message, also) = if matches!(protocol, Some("http" | "https")) {
                    (
                        "route has no destination: none of `cluster`, `weighted_clusters`, \
                         `direct_response` and `redirect` is set",
                        ", direct_response or redirect to answer without an upstream",
                    )
                } else {
                    (
                        "route has no destination: neither `cluster` nor `weighted_clusters` is set",
                        "",
                    )
                };
                self.error(
                    path,
                    message,
                    format!(
                        "add cluster = \"NAME\" (or weighted_clusters to split traffic{also}); {}",
                        clusters.suggest("", "cluster")
                    ),
                );
                return None;
            }
            [_] => {}
            [first, second] => {
                self.error(
                    path,
                    format!("route sets both `{first}` and `{second}`"),
                    "keep one: cluster = \"NAME\" sends everything to one cluster, \
                     weighted_clusters splits traffic between several, direct_response and \
                     redirect answer without an upstream",
                );
                return None;
            }
            more => {
                self.error(
                    path,
                    format!(
                        "route sets {}; a route has exactly one action",
                        more.iter()
                            .map(|f| format!("`{f}`"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    "keep one of cluster, weighted_clusters, direct_response and redirect",
                );
                return None;
            }
        }
        if let Some(cluster) = raw.cluster.take() {
            let cluster_path = format!("{path}.cluster");
            return self
                .cluster_ref(&cluster_path, &cluster, clusters)
                .map(|cluster_index| RouteAction::Forward {
                    clusters: vec![WeightedCluster {
                        cluster,
                        cluster_index,
                        weight: 1,
                    }],
                });
        }
        if let Some(list) = raw.weighted_clusters.take() {
            return self.weighted_clusters(path, list, clusters);
        }
        if let Some(direct) = raw.direct_response.take() {
            return self.direct_response(&format!("{path}.direct_response"), direct, protocol);
        }
        let redirect = raw.redirect.take()?;
        self.redirect(&format!("{path}.redirect"), redirect, protocol)
    }

    fn cluster_ref(&mut self, path: &str, name: &str, clusters: &Names) -> Option<usize> {
        let index = clusters.index(name);
        if index.is_none() {
            self.error(
                path,
                format!("no cluster named \"{name}\""),
                clusters.suggest(name, "cluster"),
            );
        }
        index
    }

    fn weighted_clusters(
        &mut self,
        route_path: &str,
        list: Vec<raw::WeightedCluster>,
        clusters: &Names,
    ) -> Option<RouteAction> {
        let path = format!("{route_path}.weighted_clusters");
        if list.is_empty() {
            self.error(
                path,
                "weighted_clusters is empty",
                "list at least one cluster, e.g. weighted_clusters = [{ cluster = \"stable\", \
                 weight = 98 }, { cluster = \"canary\", weight = 2 }], or use cluster = \"NAME\"",
            );
            return None;
        }
        let mut out = Vec::with_capacity(list.len());
        let mut ok = true;
        let mut seen: HashMap<String, usize> = HashMap::new();
        let mut total: u64 = 0;
        for (index, entry) in list.into_iter().enumerate() {
            let entry_path = format!("{path}[{index}]");
            let cluster = match entry.cluster {
                None => {
                    self.error(
                        format!("{entry_path}.cluster"),
                        "missing `cluster`",
                        format!(
                            "name the cluster, e.g. {{ cluster = \"stable\", weight = 1 }}; {}",
                            clusters.suggest("", "cluster")
                        ),
                    );
                    None
                }
                Some(name) => {
                    let cluster_index =
                        self.cluster_ref(&format!("{entry_path}.cluster"), &name, clusters);
                    match seen.get(&name) {
                        Some(first) => {
                            self.error(
                                format!("{entry_path}.cluster"),
                                format!(
                                    "cluster \"{name}\" is listed twice (also at \
                                     weighted_clusters[{first}])"
                                ),
                                "merge the two entries into one and add up their weights",
                            );
                            None
                        }
                        None => {
                            seen.insert(name.clone(), index);
                            cluster_index.map(|i| (name, i))
                        }
                    }
                }
            };
            let weight = match entry.weight {
                None => {
                    self.error(
                        format!("{entry_path}.weight"),
                        "missing `weight`",
                        "give each entry a relative weight >= 1, e.g. { cluster = \"stable\", \
                         weight = 98 }",
                    );
                    None
                }
                Some(0) => {
                    self.error(
                        format!("{entry_path}.weight"),
                        "weight must be at least 1, found 0",
                        "remove the entry to send this cluster no traffic, or give it weight >= 1",
                    );
                    None
                }
                Some(weight) => match u32::try_from(weight) {
                    Ok(weight) => Some(weight),
                    Err(_) => {
                        self.error(
                            format!("{entry_path}.weight"),
                            format!("weight must be between 1 and {}, found {weight}", u32::MAX),
                            "weights are relative: e.g. use percentages, weight = 98 and weight = 2",
                        );
                        None
                    }
                },
            };
            match (cluster, weight) {
                (Some((cluster, cluster_index)), Some(weight)) => {
                    total += u64::from(weight);
                    out.push(WeightedCluster {
                        cluster,
                        cluster_index,
                        weight,
                    });
                }
                _ => ok = false,
            }
        }
        if ok && total > u64::from(u32::MAX) {
            self.error(
                path,
                format!("the weights add up to {total}, more than {}", u32::MAX),
                "weights are relative: scale them down, e.g. to percentages",
            );
            ok = false;
        }
        ok.then_some(RouteAction::Forward { clusters: out })
    }

    // ---- TLS ----

    /// A file path from the config, resolved against the config file's directory.
    fn file_path(&mut self, path: &str, field: &str, value: Option<String>) -> Option<PathBuf> {
        match value {
            None => {
                self.error(
                    path,
                    format!("missing `{field}`"),
                    format!("give the path of the PEM file, e.g. {field} = \"/etc/meshgate/{field}.pem\""),
                );
                None
            }
            Some(text) if text.trim().is_empty() => {
                self.error(
                    path,
                    format!("`{field}` is empty"),
                    "give the path of a PEM file; relative paths start at the config file's directory",
                );
                None
            }
            Some(text) => {
                let file = PathBuf::from(text);
                Some(match &self.context.base_dir {
                    Some(base) if file.is_relative() => base.join(file),
                    _ => file,
                })
            }
        }
    }

    /// Records a file problem at the config path of the field that named the file.
    fn file_error(&mut self, paths: &[(&str, &Path)], err: FileError) {
        let path = paths
            .iter()
            .find(|(_, file)| *file == err.path.as_path())
            .or(paths.first())
            .map_or(String::new(), |(path, _)| (*path).to_owned());
        self.error(
            path,
            format!("{}: {}", err.path.display(), err.problem),
            err.hint,
        );
    }

    fn tls_version(&mut self, path: &str, value: Option<&str>) -> Option<TlsVersion> {
        match value {
            None | Some("1.2") => Some(TlsVersion::Tls12),
            Some("1.3") => Some(TlsVersion::Tls13),
            Some(other) => {
                let hint = if matches!(other, "1.0" | "1.1") {
                    "TLS 1.0 and 1.1 are not supported; write min_version = \"1.2\""
                } else {
                    "write min_version = \"1.2\" (TLS 1.2 and 1.3) or \"1.3\" (TLS 1.3 only)"
                };
                self.error(
                    path,
                    format!("unknown TLS version {other:?}; allowed values: \"1.2\", \"1.3\""),
                    hint,
                );
                None
            }
        }
    }

    fn alpn(&mut self, path: &str, list: Option<Vec<String>>) -> Option<Vec<String>> {
        let list = list.unwrap_or_default();
        let mut ok = true;
        for (index, proto) in list.iter().enumerate() {
            let problem = if proto.is_empty() {
                Some("an ALPN protocol name is empty".to_owned())
            } else if proto.len() > 255 {
                Some(format!(
                    "ALPN protocol name is {} bytes, the limit is 255",
                    proto.len()
                ))
            } else if list[..index].contains(proto) {
                Some(format!("ALPN protocol {proto:?} is listed twice"))
            } else {
                None
            };
            if let Some(problem) = problem {
                self.error(
                    format!("{path}[{index}]"),
                    problem,
                    "list protocol IDs once each, in preference order, e.g. alpn = [\"h2\", \"http/1.1\"]",
                );
                ok = false;
            }
        }
        ok.then_some(list)
    }

    /// SNI names and `*.` wildcards, lowercased.
    fn sni_patterns(&mut self, path: &str, list: Vec<String>) -> Option<Vec<String>> {
        let mut out: Vec<String> = Vec::with_capacity(list.len());
        let mut ok = true;
        for (index, pattern) in list.into_iter().enumerate() {
            let lower = pattern.to_ascii_lowercase();
            let name = lower.strip_prefix("*.").unwrap_or(&lower);
            if !is_dns_name(name) {
                self.error(
                    format!("{path}[{index}]"),
                    format!("invalid SNI pattern {pattern:?}"),
                    "write a DNS name (\"api.example.test\") or a wildcard one label deep \
                     (\"*.example.test\"); IP addresses are not sent as SNI",
                );
                ok = false;
            } else if out.contains(&lower) {
                self.error(
                    format!("{path}[{index}]"),
                    format!("SNI pattern {pattern:?} is listed twice"),
                    "list each name once",
                );
                ok = false;
            } else {
                out.push(lower);
            }
        }
        ok.then_some(out)
    }

    fn listener_tls(&mut self, path: &str, raw: raw::ListenerTls) -> Option<ListenerTls> {
        let now = self.context.now;
        let certificates = match raw.certificates {
            // No certificates: the gateway serves an identity from its local CA.
            None => Some(Vec::new()),
            Some(list) if list.is_empty() => {
                self.error(
                    format!("{path}.certificates"),
                    "`certificates` is empty",
                    "list at least one { cert = \"...\", key = \"...\" }; without a certificate \
                     every handshake would fail",
                );
                None
            }
            Some(list) => self.server_certificates(&format!("{path}.certificates"), list, now),
        };
        let min_version =
            self.tls_version(&format!("{path}.min_version"), raw.min_version.as_deref());
        let alpn = self.alpn(&format!("{path}.alpn"), raw.alpn);
        let client_auth = match raw.client_auth.as_deref() {
            None | Some("none") => Some(ClientAuth::None),
            Some("optional") => Some(ClientAuth::Optional),
            Some("required") => Some(ClientAuth::Required),
            Some(other) => {
                let mut hint = match nearest(other, &["none", "optional", "required"]) {
                    Some(near) => format!("did you mean \"{near}\"? "),
                    None => String::new(),
                };
                hint.push_str("write client_auth = \"none\", \"optional\" or \"required\"");
                self.error(
                    format!("{path}.client_auth"),
                    format!(
                        "unknown client_auth `{other}`; allowed values: \"none\", \"optional\", \
                         \"required\""
                    ),
                    hint,
                );
                None
            }
        };
        let trust_bundles =
            self.trust_bundles(&format!("{path}.trust_bundles"), raw.trust_bundles, now);
        if let (Some(auth), Some(bundles)) = (client_auth, &trust_bundles) {
            if auth != ClientAuth::None && bundles.is_empty() {
                self.error(
                    format!("{path}.trust_bundles"),
                    format!(
                        "client_auth = \"{}\" needs at least one trust bundle",
                        auth.as_str()
                    ),
                    "add trust_bundles = [{ trust_domain = \"example.test\", bundle = \
                     \"example.test.pem\" }] with the roots of each trust domain whose clients \
                     may connect",
                );
                return None;
            }
            if auth == ClientAuth::None && !bundles.is_empty() {
                self.error(
                    format!("{path}.client_auth"),
                    "trust_bundles are set but client_auth is \"none\", so no client certificate \
                     would be requested",
                    "set client_auth = \"required\" (or \"optional\") to verify clients, or remove \
                     trust_bundles",
                );
                return None;
            }
        }
        Some(ListenerTls {
            certificates: certificates?,
            min_version: min_version?,
            alpn: alpn?,
            client_auth: client_auth?,
            trust_bundles: trust_bundles?,
        })
    }

    fn server_certificates(
        &mut self,
        path: &str,
        list: Vec<raw::Certificate>,
        now: SystemTime,
    ) -> Option<Vec<ServerCertificate>> {
        let mut out = Vec::with_capacity(list.len());
        let mut ok = true;
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut default: Option<usize> = None;
        for (index, entry) in list.into_iter().enumerate() {
            let entry_path = format!("{path}[{index}]");
            let cert_field = format!("{entry_path}.cert");
            let key_field = format!("{entry_path}.key");
            let cert = self.file_path(&cert_field, "cert", entry.cert);
            let key = self.file_path(&key_field, "key", entry.key);
            let sni =
                self.sni_patterns(&format!("{entry_path}.sni"), entry.sni.unwrap_or_default());
            if let Some(sni) = &sni {
                for (i, name) in sni.iter().enumerate() {
                    if let Some(first) = names.insert(name.clone(), index) {
                        self.error(
                            format!("{entry_path}.sni[{i}]"),
                            format!("{name:?} is already served by {path}[{first}]"),
                            "each name is served by one certificate; remove it from one of them",
                        );
                        ok = false;
                    }
                }
                if sni.is_empty() {
                    if let Some(first) = default {
                        self.error(
                            format!("{entry_path}.sni"),
                            format!(
                                "{path}[{first}] is already the default certificate (no `sni`)"
                            ),
                            "give this certificate the names it serves, e.g. sni = \
                             [\"api.example.test\"]; only one certificate can be the default",
                        );
                        ok = false;
                    } else {
                        default = Some(index);
                    }
                }
            }
            if let (Some(cert), Some(key)) = (&cert, &key)
                && let Err(err) = pem::read_identity(cert, key, now)
            {
                self.file_error(&[(&cert_field, cert), (&key_field, key)], err);
                ok = false;
            }
            match (cert, key, sni) {
                (Some(cert), Some(key), Some(sni)) => out.push(ServerCertificate {
                    cert,
                    key,
                    sni,
                    default: false,
                }),
                _ => ok = false,
            }
        }
        if !ok {
            return None;
        }
        if let Some(first) = out.get_mut(default.unwrap_or(0)) {
            first.default = true;
        }
        Some(out)
    }

    fn trust_bundles(
        &mut self,
        path: &str,
        list: Option<Vec<raw::TrustBundle>>,
        now: SystemTime,
    ) -> Option<Vec<TrustBundle>> {
        let list = list.unwrap_or_default();
        let mut out = Vec::with_capacity(list.len());
        let mut ok = true;
        let mut seen: HashMap<TrustDomain, usize> = HashMap::new();
        for (index, entry) in list.into_iter().enumerate() {
            let entry_path = format!("{path}[{index}]");
            let domain =
                self.trust_domain(&format!("{entry_path}.trust_domain"), entry.trust_domain);
            if let Some(domain) = &domain
                && let Some(first) = seen.insert(domain.clone(), index)
            {
                self.error(
                    format!("{entry_path}.trust_domain"),
                    format!("trust domain {domain} is already listed at {path}[{first}]"),
                    "bundles of one trust domain go in one entry: put all its roots in one PEM \
                     file",
                );
                ok = false;
            }
            let bundle_field = format!("{entry_path}.bundle");
            let federated = entry.federated.unwrap_or(false);
            let bundle = if federated {
                if entry.bundle.is_some() {
                    self.error(
                        bundle_field,
                        "`bundle` is set on a federated trust domain",
                        "drop `bundle`: with federated = true the bundle is the trust store's \
                         (<state-dir>/trust/<trust_domain>/bundle.pem, kept by `meshgate trust \
                         add`), or drop `federated` to use a file",
                    );
                    None
                } else {
                    Some(PathBuf::new())
                }
            } else {
                let bundle = self.file_path(&bundle_field, "bundle", entry.bundle);
                if let Some(file) = &bundle
                    && let Err(err) = pem::read_bundle(file, now)
                {
                    self.file_error(&[(&bundle_field, file)], err);
                    ok = false;
                }
                bundle
            };
            let crl = match entry.crl {
                None => Some(None),
                Some(text) => {
                    let crl_field = format!("{entry_path}.crl");
                    let file = self.file_path(&crl_field, "crl", Some(text));
                    if let Some(file) = &file
                        && let Err(err) = pem::read_crls(file)
                    {
                        self.file_error(&[(&crl_field, file)], err);
                        ok = false;
                    }
                    file.map(Some)
                }
            };
            match (domain, bundle, crl) {
                (Some(trust_domain), Some(bundle), Some(crl)) => out.push(TrustBundle {
                    trust_domain,
                    bundle,
                    crl,
                    federated,
                }),
                _ => ok = false,
            }
        }
        ok.then_some(out)
    }

    fn trust_domain(&mut self, path: &str, value: Option<String>) -> Option<TrustDomain> {
        let Some(text) = value else {
            self.error(
                path,
                "missing `trust_domain`",
                "name the SPIFFE trust domain of the bundle, e.g. trust_domain = \"example.test\"",
            );
            return None;
        };
        match TrustDomain::new(&text) {
            Ok(domain) => Some(domain),
            Err(err) => {
                self.error(
                    path,
                    format!("invalid trust domain {text:?}: {err}"),
                    "a trust domain is the host part of SPIFFE IDs, e.g. \"example.test\" for \
                     spiffe://example.test/...",
                );
                None
            }
        }
    }

    fn spiffe_ids(&mut self, path: &str, list: Vec<String>) -> Option<Vec<SpiffeId>> {
        let mut out = Vec::with_capacity(list.len());
        let mut ok = true;
        for (index, text) in list.into_iter().enumerate() {
            match SpiffeId::parse(&text) {
                Ok(id) => out.push(id),
                Err(err) => {
                    self.error(
                        format!("{path}[{index}]"),
                        format!("invalid SPIFFE ID {text:?}: {err}"),
                        "write SPIFFE IDs as spiffe://<trust domain>/<path>, e.g. \
                         \"spiffe://example.test/ns/prod/sa/web\"",
                    );
                    ok = false;
                }
            }
        }
        ok.then_some(out)
    }

    fn trust_domains(&mut self, path: &str, list: Vec<String>) -> Option<Vec<TrustDomain>> {
        let mut out = Vec::with_capacity(list.len());
        let mut ok = true;
        for (index, text) in list.into_iter().enumerate() {
            match self.trust_domain(&format!("{path}[{index}]"), Some(text)) {
                Some(domain) => out.push(domain),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    fn route_match(
        &mut self,
        path: &str,
        mut raw: raw::RouteMatch,
        listener: Option<&BoundListener>,
    ) -> Option<RouteMatch> {
        let protocol = listener.and_then(|l| l.protocol.as_deref());
        if protocol == Some("tcp") {
            self.error(
                path,
                "a route of a tcp listener cannot have `match`: a tcp listener sends every \
                 connection to its one route",
                "remove the match, or set protocol = \"tls-passthrough\" (route by SNI without \
                 decrypting) or \"tls\" on the listener",
            );
            return None;
        }
        let http = self.http_match(path, &mut raw, protocol);
        let sni = self.sni_patterns(&format!("{path}.sni"), raw.sni.unwrap_or_default());
        let peer = match raw.peer {
            None => Some(None),
            Some(peer) => {
                let peer_path = format!("{path}.peer");
                if protocol == Some("tls-passthrough") {
                    self.error(
                        peer_path,
                        "a tls-passthrough listener does not see client certificates, so it \
                         cannot match on the peer",
                        "use protocol = \"tls\" with client_auth = \"required\" to route by client \
                         identity, or remove `peer`",
                    );
                    None
                } else if matches!(protocol, Some("tls" | "https"))
                    && listener.is_some_and(|l| l.client_auth == "none")
                {
                    self.error(
                        peer_path,
                        format!(
                            "listener \"{}\" has client_auth = \"none\", so no peer identity is \
                             known and this match can never succeed",
                            listener.map_or("", |l| l.name.as_str())
                        ),
                        "set client_auth = \"required\" (or \"optional\") under the listener's \
                         [listeners.tls], or remove `peer`",
                    );
                    None
                } else if protocol == Some("http") {
                    self.error(
                        peer_path,
                        "an http listener does not see client certificates, so it cannot match \
                         on the peer",
                        "remove `peer`; routing by client identity needs a tls or https listener \
                         with client_auth = \"required\" or \"optional\"",
                    );
                    None
                } else {
                    self.peer_match(&peer_path, peer).map(Some)
                }
            }
        };
        let http = http?;
        Some(RouteMatch {
            sni: sni?,
            peer: peer?,
            hosts: http.hosts,
            path: http.path,
            methods: http.methods,
            headers: http.headers,
            query: http.query,
        })
    }

    fn peer_match(&mut self, path: &str, raw: raw::PeerMatch) -> Option<PeerMatch> {
        let spiffe_ids = self.spiffe_ids(
            &format!("{path}.spiffe_ids"),
            raw.spiffe_ids.unwrap_or_default(),
        );
        let trust_domains = self.trust_domains(
            &format!("{path}.trust_domains"),
            raw.trust_domains.unwrap_or_default(),
        );
        let mut prefixes_ok = true;
        let path_prefixes = raw.path_prefixes.unwrap_or_default();
        for (index, prefix) in path_prefixes.iter().enumerate() {
            let trimmed = prefix.strip_suffix('/').unwrap_or(prefix);
            let valid = prefix.starts_with('/')
                && (trimmed.is_empty() || SpiffeId::parse(&format!("spiffe://x{trimmed}")).is_ok());
            if !valid {
                self.error(
                    format!("{path}.path_prefixes[{index}]"),
                    format!("invalid SPIFFE path prefix {prefix:?}"),
                    "write a path starting with '/', e.g. \"/ns/prod\" (matches /ns/prod and \
                     /ns/prod/...)",
                );
                prefixes_ok = false;
            }
        }
        let (spiffe_ids, trust_domains) = (spiffe_ids?, trust_domains?);
        if !prefixes_ok {
            return None;
        }
        if spiffe_ids.is_empty() && trust_domains.is_empty() && path_prefixes.is_empty() {
            self.error(
                path,
                "`peer` is empty",
                "set spiffe_ids, trust_domains or path_prefixes (each one given must match), or \
                 remove `peer`",
            );
            return None;
        }
        Some(PeerMatch {
            spiffe_ids,
            trust_domains,
            path_prefixes,
        })
    }

    fn cluster_tls(&mut self, path: &str, raw: raw::ClusterTls) -> Option<ClusterTls> {
        let now = self.context.now;
        let verify = match raw.verify {
            None => {
                self.error(
                    format!("{path}.verify"),
                    "missing `verify`: the upstream's identity must be checked",
                    "add verify = { spiffe_ids = [\"spiffe://example.test/backend\"] } or verify \
                     = { dns_names = [\"backend.example.test\"] }",
                );
                None
            }
            Some(verify) => self.upstream_verify(&format!("{path}.verify"), verify),
        };
        let bundle_field = format!("{path}.trust_bundle");
        let trust_bundle = match raw.trust_bundle {
            None => {
                self.error(
                    &bundle_field,
                    "missing `trust_bundle`",
                    "give the PEM file of the CA certificates the upstream's chain leads to, e.g. \
                     trust_bundle = \"/etc/meshgate/example.test.pem\"",
                );
                None
            }
            Some(text) => {
                let file = self.file_path(&bundle_field, "trust_bundle", Some(text));
                if let Some(file) = &file
                    && let Err(err) = pem::read_bundle(file, now)
                {
                    self.file_error(&[(&bundle_field, file)], err);
                    return None;
                }
                file
            }
        };
        let identity = match raw.identity {
            None => Some(None),
            Some(identity) => {
                let cert_field = format!("{path}.identity.cert");
                let key_field = format!("{path}.identity.key");
                let cert = self.file_path(&cert_field, "cert", identity.cert);
                let key = self.file_path(&key_field, "key", identity.key);
                match (cert, key) {
                    (Some(cert), Some(key)) => match pem::read_identity(&cert, &key, now) {
                        Ok(_) => Some(Some(TlsIdentity { cert, key })),
                        Err(err) => {
                            self.file_error(&[(&cert_field, &cert), (&key_field, &key)], err);
                            None
                        }
                    },
                    _ => None,
                }
            }
        };
        let sni = match raw.sni {
            None => Some(match &verify {
                Some(UpstreamVerify::DnsNames(names)) => names.first().cloned(),
                _ => None,
            }),
            Some(name) => {
                let lower = name.to_ascii_lowercase();
                if is_dns_name(&lower) {
                    Some(Some(lower))
                } else {
                    self.error(
                        format!("{path}.sni"),
                        format!("invalid SNI {name:?}"),
                        "write the DNS name to send, e.g. sni = \"backend.example.test\"; leave it \
                         out to send none",
                    );
                    None
                }
            }
        };
        let min_version =
            self.tls_version(&format!("{path}.min_version"), raw.min_version.as_deref());
        let alpn = self.alpn(&format!("{path}.alpn"), raw.alpn);
        Some(ClusterTls {
            sni: sni?,
            alpn: alpn?,
            min_version: min_version?,
            verify: verify?,
            trust_bundle: trust_bundle?,
            identity: identity?,
        })
    }

    fn upstream_verify(&mut self, path: &str, raw: raw::Verify) -> Option<UpstreamVerify> {
        const HINT: &str = "set exactly one of spiffe_ids, trust_domains and dns_names, e.g. \
                            verify = { spiffe_ids = [\"spiffe://example.test/backend\"] }";
        let given = [
            raw.spiffe_ids.is_some(),
            raw.trust_domains.is_some(),
            raw.dns_names.is_some(),
        ]
        .into_iter()
        .filter(|g| *g)
        .count();
        if given != 1 {
            self.error(
                path,
                if given == 0 {
                    "`verify` is empty".to_owned()
                } else {
                    "`verify` sets more than one of spiffe_ids, trust_domains and dns_names"
                        .to_owned()
                },
                HINT,
            );
            return None;
        }
        let verify = if let Some(list) = raw.spiffe_ids {
            UpstreamVerify::SpiffeIds(self.spiffe_ids(&format!("{path}.spiffe_ids"), list)?)
        } else if let Some(list) = raw.trust_domains {
            UpstreamVerify::TrustDomains(
                self.trust_domains(&format!("{path}.trust_domains"), list)?,
            )
        } else {
            let list = raw.dns_names.unwrap_or_default();
            for (index, name) in list.iter().enumerate() {
                if !is_dns_name(&name.to_ascii_lowercase()) {
                    self.error(
                        format!("{path}.dns_names[{index}]"),
                        format!("invalid DNS name {name:?}"),
                        "write the name the upstream certificate is issued for, e.g. \
                         \"backend.example.test\"",
                    );
                    return None;
                }
            }
            UpstreamVerify::DnsNames(list.iter().map(|n| n.to_ascii_lowercase()).collect())
        };
        let (empty, domains): (bool, Vec<&str>) = match &verify {
            UpstreamVerify::SpiffeIds(ids) => (
                ids.is_empty(),
                ids.iter().map(SpiffeId::trust_domain_name).collect(),
            ),
            UpstreamVerify::TrustDomains(domains) => (
                domains.is_empty(),
                domains.iter().map(TrustDomain::as_str).collect(),
            ),
            UpstreamVerify::DnsNames(names) => (names.is_empty(), Vec::new()),
        };
        if empty {
            self.error(path, "`verify` lists nothing to accept", HINT);
            return None;
        }
        if let Some(first) = domains.first()
            && let Some(other) = domains.iter().find(|d| *d != first)
        {
            self.error(
                path,
                format!(
                    "the expected identities span trust domains {first} and {other}; a cluster's \
                     trust_bundle holds the roots of one trust domain"
                ),
                "split the endpoints into one cluster per trust domain",
            );
            return None;
        }
        Some(verify)
    }

    /// Resolves `default_route` of each listener to one of its routes.
    fn default_routes(
        &mut self,
        listeners: &mut [Option<Listener>],
        bindings: &Bindings,
        route_names: &Names,
    ) {
        for (index, bound) in bindings.listeners.iter().enumerate() {
            let Some(name) = &bound.default_route else {
                continue;
            };
            let path = format!("listeners[{index}].default_route");
            if bound.tcp {
                self.error(
                    path,
                    "a tcp listener has no default_route: its one route takes every connection",
                    "remove default_route",
                );
                continue;
            }
            let Some(route_index) = route_names.index(name) else {
                self.error(
                    path,
                    format!("no route named \"{name}\""),
                    route_names.suggest(name, "route"),
                );
                continue;
            };
            let route_listener = bindings.routes.get(route_index).and_then(|r| r.listener);
            if route_listener != Some(index) {
                self.error(
                    path,
                    format!(
                        "route \"{name}\" belongs to another listener; the default route must be \
                         one of this listener's routes"
                    ),
                    format!("set listener = \"{}\" in route \"{name}\"", bound.name),
                );
                continue;
            }
            if let Some(Some(listener)) = listeners.get_mut(index) {
                listener.default_route = Some(route_index);
            }
        }
        // Routes after a catch-all route of the same listener would never be used.
        let mut catch_all: HashMap<usize, usize> = HashMap::new();
        for (route_index, route) in bindings.routes.iter().enumerate() {
            let Some(listener) = route.listener else {
                continue;
            };
            let tcp = bindings.listeners.get(listener).is_some_and(|l| l.tcp);
            if tcp {
                continue;
            }
            if let Some(&first) = catch_all.get(&listener) {
                let first_name = bindings.routes.get(first).map_or("", |r| r.name.as_str());
                self.error(
                    format!("routes[{route_index}]"),
                    format!(
                        "route \"{}\" is never used: route \"{first_name}\" (routes[{first}]) \
                         before it has no `match` and takes every connection",
                        route.name
                    ),
                    "routes are tried in file order: move the catch-all route last, or make it the \
                     listener's default_route",
                );
            } else if !route.has_match {
                catch_all.insert(listener, route_index);
            }
        }
    }

    /// Fills `Listener::routes` and checks that each tcp listener has exactly one route.
    fn bind_routes(&mut self, listeners: &mut [Option<Listener>], bindings: &Bindings) {
        let mut bound: Vec<Vec<usize>> = vec![Vec::new(); bindings.listeners.len()];
        for (route_index, route) in bindings.routes.iter().enumerate() {
            let Some(listener_index) = route.listener else {
                continue;
            };
            let (Some(routes), Some(listener)) = (
                bound.get_mut(listener_index),
                bindings.listeners.get(listener_index),
            ) else {
                continue;
            };
            if listener.tcp
                && let Some(&first) = routes.first()
            {
                let first_name = bindings.routes.get(first).map_or("", |r| r.name.as_str());
                self.error(
                    format!("routes[{route_index}].listener"),
                    format!(
                        "listener \"{}\" already has route \"{first_name}\" (routes[{first}]); a \
                         tcp listener takes exactly one route",
                        listener.name
                    ),
                    "remove this route or bind it to another listener; to split traffic between \
                     clusters, use weighted_clusters in one route",
                );
            }
            routes.push(route_index);
        }
        // A route whose `listener` is missing or misspelt is reported already; saying that the
        // listener it was meant for has no route would only repeat it. Same for a listener with
        // a duplicate name, which no route can name.
        let unresolved = bindings.routes.iter().any(|r| r.listener.is_none());
        for (index, listener) in bindings.listeners.iter().enumerate() {
            let routes = bound.get(index).map_or(&[][..], Vec::as_slice);
            let known_protocol = listener
                .protocol
                .as_deref()
                .is_some_and(|p| PROTOCOLS.contains(&p));
            if known_protocol && listener.referable && routes.is_empty() && !unresolved {
                self.error(
                    format!("listeners[{index}]"),
                    format!("listener \"{}\" has no route", listener.name),
                    format!(
                        "add a [[routes]] table with listener = \"{}\" and cluster = \"NAME\", or \
                         remove the listener",
                        listener.name
                    ),
                );
            }
        }
        for (listener, routes) in listeners.iter_mut().zip(bound) {
            if let Some(listener) = listener {
                listener.routes = routes;
            }
        }
    }

    /// Two listeners (or a listener and the admin API) on the same IP:port cannot both bind.
    fn listener_addresses(&mut self, listeners: &[Option<Listener>], admin: Option<&AdminConfig>) {
        let mut seen: HashMap<SocketAddr, (usize, &str)> = HashMap::new();
        let admin_address = admin.and_then(|a| a.address);
        for (index, listener) in listeners.iter().enumerate() {
            let Some(listener) = listener else { continue };
            let address = listener.address;
            if address.port() == 0 {
                continue;
            }
            let path = format!("listeners[{index}].address");
            if admin_address == Some(address) {
                self.error(
                    path,
                    format!("address {address} is already used by the admin API (admin.address)"),
                    "move this listener to another port, or set address under [admin] to another \
                     port",
                );
            } else if let Some((first, name)) = seen.get(&address) {
                self.error(
                    path,
                    format!("address {address} is already used by listener \"{name}\" (listeners[{first}])"),
                    "give each listener its own IP:port (port 0 picks a free port)",
                );
            } else {
                seen.insert(address, (index, &listener.name));
            }
        }
    }

    fn address(&mut self, path: &str, text: &str, usage: AddressUse) -> Option<SocketAddr> {
        match parse_socket_addr(text) {
            Ok(address) => Some(address),
            Err(problem) => {
                let mut hint = usage.hint().to_owned();
                if problem == AddressProblem::Hostname {
                    hint.push_str("; host names are not resolved in this release, write the IP");
                }
                self.error(
                    path,
                    format!("invalid address {text:?}: {}", problem.as_str()),
                    hint,
                );
                None
            }
        }
    }

    /// An integer in `min..=max`, or `default` when absent.
    fn integer(
        &mut self,
        path: &str,
        field: &str,
        value: Option<i64>,
        min: u32,
        max: u32,
        default: u32,
    ) -> Option<u32> {
        let Some(value) = value else {
            return Some(default);
        };
        match u32::try_from(value) {
            Ok(v) if (min..=max).contains(&v) => Some(v),
            _ => {
                let message = if max == u32::MAX {
                    format!("`{field}` must be at least {min}, found {value}")
                } else {
                    format!("`{field}` must be between {min} and {max}, found {value}")
                };
                self.error(path, message, format!("e.g. {field} = {default}"));
                None
            }
        }
    }

    /// A duration string, or `default` when absent. `positive`: zero is rejected.
    fn duration(
        &mut self,
        path: &str,
        field: &str,
        value: Option<raw::Duration>,
        default: Duration,
        positive: bool,
    ) -> Option<Duration> {
        const UNITS: &str = "units: h, m, s, ms; combine them largest first, e.g. \"1m30s\"";
        let example = format_duration(default);
        let text = match value {
            None => return Some(default),
            Some(raw::Duration::Text(text)) => text,
            Some(raw::Duration::Integer(n)) => {
                self.error(
                    path,
                    format!("duration must be a string with a unit, found the bare number {n}"),
                    format!("write {field} = \"{n}s\" for {n} seconds (or \"{n}ms\"); {UNITS}"),
                );
                return None;
            }
            Some(raw::Duration::Float(x)) => {
                let millis = (x * 1000.0).round();
                self.error(
                    path,
                    format!("duration must be a string with a unit, found the bare number {x}"),
                    format!("write {field} = \"{millis}ms\" for {x} seconds; {UNITS}"),
                );
                return None;
            }
        };
        match parse_duration(&text) {
            Ok(duration) if positive && duration.is_zero() => {
                self.error(
                    path,
                    format!("`{field}` must be greater than 0"),
                    format!("e.g. {field} = \"{example}\""),
                );
                None
            }
            Ok(duration) => Some(duration),
            Err(err) => {
                self.error(
                    path,
                    format!("invalid duration {text:?}: {err}"),
                    format!("write a number with a unit, e.g. {field} = \"{example}\"; {UNITS}"),
                );
                None
            }
        }
    }
}

/// Which listener each route is bound to, gathered before the other checks.
struct Bindings {
    listeners: Vec<BoundListener>,
    routes: Vec<BoundRoute>,
}

struct BoundListener {
    name: String,
    tcp: bool,
    /// As written.
    protocol: Option<String>,
    /// As written; "none" when absent.
    client_auth: String,
    default_route: Option<String>,
    /// The first listener with its name, so routes can refer to it.
    referable: bool,
}

struct BoundRoute {
    name: String,
    listener: Option<usize>,
    has_match: bool,
}

/// A DNS name: labels of `A-Za-z0-9-_`, 1..=63 bytes each, 1..=253 bytes in all, not all
/// digits (no IP literals).
fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        && !name
            .split('.')
            .all(|label| label.bytes().all(|b| b.is_ascii_digit()))
}

fn name_example(kind: &str) -> &'static str {
    match kind {
        "listener" => "name = \"tcp-in\"",
        "route" => "name = \"default\"",
        "policy" => "name = \"only-frontends\"",
        _ => "name = \"echo\"",
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AddressUse {
    Admin,
    Listener,
    Endpoint,
}

impl AddressUse {
    fn hint(self) -> &'static str {
        match self {
            AddressUse::Admin => {
                "write the address as \"IP:PORT\", e.g. address = \"127.0.0.1:15000\""
            }
            AddressUse::Listener => {
                "write the address as \"IP:PORT\", e.g. address = \"127.0.0.1:15001\" (IPv6 as \
                 \"[::1]:15001\"; 0.0.0.0 or [::] listens on all interfaces)"
            }
            AddressUse::Endpoint => {
                "write endpoints as \"IP:PORT\", e.g. \"127.0.0.1:8080\" (IPv6 as \"[::1]:8080\")"
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AddressProblem {
    Empty,
    MissingPort,
    Ipv6WithoutBrackets,
    UnbracketedIpv6,
    InvalidPort,
    PortOutOfRange,
    Hostname,
    InvalidIp,
}

impl AddressProblem {
    fn as_str(self) -> &'static str {
        match self {
            AddressProblem::Empty => "the address is empty",
            AddressProblem::MissingPort => "missing port",
            AddressProblem::Ipv6WithoutBrackets => {
                "missing port (an IPv6 address with a port is written \"[IP]:PORT\")"
            }
            AddressProblem::UnbracketedIpv6 => "IPv6 addresses need brackets: \"[IP]:PORT\"",
            AddressProblem::InvalidPort => "the port is not a number",
            AddressProblem::PortOutOfRange => "the port is out of range (0-65535)",
            AddressProblem::Hostname => "expected an IP address, found a host name",
            AddressProblem::InvalidIp => "not a valid IP address",
        }
    }
}

/// `IP:PORT` with IPv6 in brackets, explaining what is wrong when it is not.
fn parse_socket_addr(text: &str) -> Result<SocketAddr, AddressProblem> {
    if let Ok(address) = text.parse::<SocketAddr>() {
        return Ok(address);
    }
    if text.is_empty() {
        return Err(AddressProblem::Empty);
    }
    match text.parse::<IpAddr>() {
        Ok(IpAddr::V4(_)) => return Err(AddressProblem::MissingPort),
        Ok(IpAddr::V6(_)) => return Err(AddressProblem::Ipv6WithoutBrackets),
        Err(_) => {}
    }
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        match rest.split_once(']') {
            Some((host, "")) => (host, None),
            Some((host, port)) => match port.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None => return Err(AddressProblem::InvalidPort),
            },
            None => return Err(AddressProblem::InvalidIp),
        }
    } else {
        match text.rsplit_once(':') {
            Some((host, _)) if host.contains(':') => {
                return Err(if host.parse::<IpAddr>().is_ok() {
                    AddressProblem::UnbracketedIpv6
                } else {
                    AddressProblem::InvalidIp
                });
            }
            Some((host, port)) => (host, Some(port)),
            None => (text, None),
        }
    };
    let looks_like_hostname = !text.starts_with('[')
        && !host.is_empty()
        && host.parse::<IpAddr>().is_err()
        && host.chars().any(|c| c.is_ascii_alphabetic())
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.'));
    if looks_like_hostname && !host.contains(':') {
        return Err(AddressProblem::Hostname);
    }
    if host.parse::<IpAddr>().is_err() {
        return Err(AddressProblem::InvalidIp);
    }
    match port {
        None => Err(AddressProblem::MissingPort),
        Some(port) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
            Err(AddressProblem::PortOutOfRange)
        }
        Some("") => Err(AddressProblem::MissingPort),
        Some(_) => Err(AddressProblem::InvalidPort),
    }
}

/// ALPN of an `https` listener whose `[listeners.tls]` gives none.
pub(crate) fn default_https_alpn() -> Vec<String> {
    vec!["h2".to_owned(), "http/1.1".to_owned()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_addresses_explain_what_is_wrong() {
        assert!(parse_socket_addr("127.0.0.1:80").is_ok());
        assert!(parse_socket_addr("[::1]:80").is_ok());
        assert!(parse_socket_addr("0.0.0.0:0").is_ok());
        let cases = [
            ("", AddressProblem::Empty),
            ("10.0.0.1", AddressProblem::MissingPort),
            ("::1", AddressProblem::Ipv6WithoutBrackets),
            ("fe80::1:8080", AddressProblem::Ipv6WithoutBrackets),
            ("10.0.0.1:", AddressProblem::MissingPort),
            ("[::1]", AddressProblem::MissingPort),
            ("::1:99999", AddressProblem::UnbracketedIpv6),
            ("10.0.0.1:http", AddressProblem::InvalidPort),
            ("10.0.0.1:65536", AddressProblem::PortOutOfRange),
            ("localhost:80", AddressProblem::Hostname),
            ("example.com", AddressProblem::Hostname),
            ("10.0.0.256:80", AddressProblem::InvalidIp),
            ("[zz]:80", AddressProblem::InvalidIp),
        ];
        for (text, want) in cases {
            assert_eq!(parse_socket_addr(text), Err(want), "{text:?}");
        }
    }
}
