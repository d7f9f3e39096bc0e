//! `route::resolve` for `http` listeners: the routes of each listener compiled once per config
//! generation (regexes built, names lowercased, header edits as bytes, counters looked up), and
//! the first-match selection over a parsed request.
//!
//! Where it sits: `proxy::http` parses a request head, normalises its path and calls
//! [`ListenerRoutes::select`]; the chosen [`CompiledRoute`] carries everything the rest of the
//! request needs (edits, rewrites, timeout, counters), so the per-request path does no lookups
//! by name and no allocation here.

use std::sync::Arc;
use std::time::Duration;

use meshgate_config::{
    Config, HeaderOps, HeaderValueMatch, PathMatch, PeerMatch, Protocol, RouteAction, RouteMatch,
    sni_matches,
};

use crate::authz::ListenerPolicies;
use crate::http1::{Limits, RequestHead, split_query};
use crate::metrics::{HttpRouteStats, ShardStats};
use crate::tls::spiffe::SpiffeId;

mod query;

/// Size limit of a compiled route regex; the config crate validates with the same limit.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// The compiled routes of every `http` listener of a generation.
#[derive(Debug, Default)]
pub struct HttpRoutes {
    /// Same index as `config.listeners`; `Some` for `http` listeners.
    listeners: Vec<Option<ListenerRoutes>>,
}

impl HttpRoutes {
    pub fn new(config: &Config, stats: &ShardStats) -> HttpRoutes {
        HttpRoutes {
            listeners: config
                .listeners
                .iter()
                .enumerate()
                .map(|(index, l)| {
                    matches!(l.protocol, Protocol::Http | Protocol::Https)
                        .then(|| ListenerRoutes::new(config, index, l, stats))
                })
                .collect(),
        }
    }

    /// The routes of listener `index`, if it is an `http` listener.
    pub fn listener(&self, index: usize) -> Option<&ListenerRoutes> {
        self.listeners.get(index).and_then(Option::as_ref)
    }
}

/// One `http` listener: its routes in declared order and its limits.
#[derive(Debug)]
pub struct ListenerRoutes {
    pub routes: Vec<CompiledRoute>,
    /// Index into `routes` of the listener's `default_route`.
    pub default_route: Option<usize>,
    pub limits: Limits,
    pub request_timeout: Duration,
    pub idle_timeout: Duration,
    /// Requests that no route took, or that were refused before routing.
    pub unrouted: Arc<HttpRouteStats>,
    /// The listener's `[[policies]]`; `None` when it has none.
    pub policies: Option<Box<ListenerPolicies>>,
}

impl ListenerRoutes {
    fn new(
        config: &Config,
        listener_index: usize,
        listener: &meshgate_config::Listener,
        stats: &ShardStats,
    ) -> ListenerRoutes {
        let routes: Vec<CompiledRoute> = listener
            .routes
            .iter()
            .filter_map(|&index| {
                let route = config.routes.get(index)?;
                Some(CompiledRoute::new(index, route, &listener.name, stats))
            })
            .collect();
        let default_route = listener
            .default_route
            .and_then(|d| routes.iter().position(|r| r.index == d));
        let http = listener.http.as_ref();
        let limits = Limits {
            max_head_size: http.map_or(64 * 1024, |h| h.max_request_head as usize),
            ..Limits::default()
        };
        ListenerRoutes {
            routes,
            default_route,
            limits,
            request_timeout: http.map_or(Duration::from_secs(30), |h| h.request_timeout),
            idle_timeout: listener.idle_timeout,
            unrouted: stats.http_route(&listener.name, HttpRouteStats::NO_ROUTE, &[]),
            policies: ListenerPolicies::compile(config, listener_index, true, stats).map(Box::new),
        }
    }

    /// The first route (in declared order) that takes `req`, else the default route.
    pub fn select(&self, req: &RequestView<'_>) -> Option<&CompiledRoute> {
        self.routes
            .iter()
            .find(|r| r.matches(req))
            .or_else(|| self.default_route.and_then(|d| self.routes.get(d)))
    }
}

/// What routing looks at in a request.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    /// The host without its port (`None`: HTTP/1.0 without Host).
    pub host: Option<&'a str>,
    /// The normalised path, without the query.
    pub path: &'a str,
    pub method: &'a str,
    pub head: &'a RequestHead,
    /// The buffer `head` was parsed from.
    pub buf: &'a [u8],
    /// `https`: the TLS server name the client sent.
    pub sni: Option<&'a str>,
    /// `https` with client auth: the verified client identity.
    pub peer: Option<&'a SpiffeId>,
}

/// One route of an `http` listener, ready to use.
#[derive(Debug)]
pub struct CompiledRoute {
    /// Index in `config.routes`.
    pub index: usize,
    matcher: Matcher,
    pub request_edits: Edits,
    pub response_edits: Edits,
    /// (matched prefix, replacement); for an exact match the prefix is the whole path.
    pub prefix_rewrite: Option<(String, String)>,
    pub host_rewrite: Option<Box<[u8]>>,
    pub timeout: Duration,
    pub stats: Arc<HttpRouteStats>,
    /// The gateway's own request fields this route sets or removes itself.
    pub overrides: Overrides,
    /// HTTP/1.1 `Upgrade` protocols this route forwards (lowercase).
    pub upgrades: Box<[String]>,
}

/// Gateway-written request fields a route's `request_headers` takes over.
#[derive(Debug, Clone, Copy, Default)]
pub struct Overrides {
    pub forwarded_for: bool,
    pub forwarded_proto: bool,
    pub request_id: bool,
    pub client_cert: bool,
}

/// A compiled `[routes.match]` (also the shape of a `[[policies.rules]]` entry).
#[derive(Debug)]
pub struct Matcher {
    hosts: Box<[String]>,
    path: Option<PathMatcher>,
    methods: Box<[String]>,
    headers: Box<[HeaderMatcher]>,
    query: Box<[query::QueryMatcher]>,
    /// `https`: TLS server names (empty: any).
    sni: Box<[String]>,
    /// `https` with client auth: the identities allowed.
    peer: Option<PeerMatch>,
    /// No conditions: takes everything.
    catch_all: bool,
}

#[derive(Debug)]
enum PathMatcher {
    Prefix(String),
    Exact(String),
    Regex(regex::Regex),
    /// A pattern that failed to compile here (validated by the config crate, so only a
    /// mismatch of regex limits could cause it): matches nothing.
    Never,
}

#[derive(Debug)]
struct HeaderMatcher {
    name: String,
    kind: HeaderKind,
}

#[derive(Debug)]
enum HeaderKind {
    Exact(Box<[u8]>),
    Regex(regex::bytes::Regex),
    Present(bool),
    Never,
}

impl HeaderKind {
    /// A header or query value condition, its regex compiled.
    fn new(value: &HeaderValueMatch, route: &str) -> HeaderKind {
        match value {
            HeaderValueMatch::Exact(v) => HeaderKind::Exact(v.as_bytes().into()),
            HeaderValueMatch::Present(p) => HeaderKind::Present(*p),
            HeaderValueMatch::Regex(r) => match regex::bytes::RegexBuilder::new(r)
                .size_limit(REGEX_SIZE_LIMIT)
                .build()
            {
                Ok(re) => HeaderKind::Regex(re),
                Err(e) => {
                    tracing::error!(route, error = %e, "header or query regex does not compile; the route matches nothing");
                    HeaderKind::Never
                }
            },
        }
    }
}

/// Header edits as the codec takes them (names lowercase, values bytes).
#[derive(Debug, Default)]
pub struct Edits {
    pub remove: Box<[String]>,
    pub set: Box<[(String, Box<[u8]>)]>,
    pub add: Box<[(String, Box<[u8]>)]>,
}

impl Edits {
    fn new(ops: &HeaderOps) -> Edits {
        let pairs = |list: &[(String, String)]| -> Box<[(String, Box<[u8]>)]> {
            list.iter()
                .map(|(n, v)| (n.to_ascii_lowercase(), v.as_bytes().into()))
                .collect()
        };
        Edits {
            remove: ops.remove.iter().map(|n| n.to_ascii_lowercase()).collect(),
            set: pairs(&ops.set),
            add: pairs(&ops.add),
        }
    }

    /// `name` (in any case) is set or removed by these edits.
    pub fn takes_over(&self, name: &str) -> bool {
        self.remove.iter().any(|n| n.eq_ignore_ascii_case(name))
            || self.set.iter().any(|(n, _)| n.eq_ignore_ascii_case(name))
    }
}

impl Matcher {
    /// `m` compiled; `None`: no conditions (matches everything). `owner` names the route or
    /// policy in the error logged for a pattern that does not compile.
    pub fn new(m: Option<&RouteMatch>, owner: &str) -> Matcher {
        let Some(m) = m else {
            return Matcher {
                hosts: Box::default(),
                path: None,
                methods: Box::default(),
                headers: Box::default(),
                query: Box::default(),
                sni: Box::default(),
                peer: None,
                catch_all: true,
            };
        };
        let path = m.path.as_ref().map(|p| match p {
            PathMatch::Prefix(p) => PathMatcher::Prefix(p.clone()),
            PathMatch::Exact(p) => PathMatcher::Exact(p.clone()),
            PathMatch::Regex(r) => match regex::RegexBuilder::new(r)
                .size_limit(REGEX_SIZE_LIMIT)
                .build()
            {
                Ok(re) => PathMatcher::Regex(re),
                Err(e) => {
                    tracing::error!(owner = %owner, error = %e, "path regex does not compile; it matches nothing");
                    PathMatcher::Never
                }
            },
        });
        let headers = m
            .headers
            .iter()
            .map(|h| HeaderMatcher {
                name: h.name.to_ascii_lowercase(),
                kind: HeaderKind::new(&h.value, owner),
            })
            .collect();
        Matcher {
            hosts: m.hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
            path,
            methods: m.methods.clone().into_boxed_slice(),
            headers,
            query: query::compile(&m.query, owner),
            sni: m.sni.clone().into_boxed_slice(),
            peer: m.peer.clone(),
            catch_all: false,
        }
    }

    /// Whether `req` meets every condition.
    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        if self.catch_all {
            return true;
        }
        if !self.methods.is_empty() && !self.methods.iter().any(|m| m == req.method) {
            return false;
        }
        if !self.hosts.is_empty() && !req.host.is_some_and(|h| sni_matches(&self.hosts, h)) {
            return false;
        }
        if !self.sni.is_empty() && !req.sni.is_some_and(|s| sni_matches(&self.sni, s)) {
            return false;
        }
        if let Some(want) = &self.peer
            && !req.peer.is_some_and(|id| want.matches(id))
        {
            return false;
        }
        let path_ok = match &self.path {
            None => true,
            Some(PathMatcher::Prefix(p)) => req.path.starts_with(p.as_str()),
            Some(PathMatcher::Exact(p)) => req.path == p,
            Some(PathMatcher::Regex(re)) => re.is_match(req.path),
            Some(PathMatcher::Never) => false,
        };
        path_ok
            && self.headers.iter().all(|h| h.matches(req))
            && (self.query.is_empty()
                || query::all_match(&self.query, split_query(req.head.path_bytes(req.buf)).1))
    }
}

impl CompiledRoute {
    fn new(
        index: usize,
        route: &meshgate_config::Route,
        listener: &str,
        stats: &ShardStats,
    ) -> CompiledRoute {
        let empty = RouteMatch {
            sni: Vec::new(),
            peer: None,
            hosts: Vec::new(),
            path: None,
            methods: Vec::new(),
            headers: Vec::new(),
            query: Vec::new(),
        };
        let m = route.matcher.as_ref().unwrap_or(&empty);
        let matcher = Matcher::new(route.matcher.as_ref(), &route.name);
        let http = route.http.as_ref();
        let request_edits = http.map_or_else(Edits::default, |h| Edits::new(&h.request_headers));
        let response_edits = http.map_or_else(Edits::default, |h| Edits::new(&h.response_headers));
        let prefix_rewrite = http.and_then(|h| h.prefix_rewrite.as_ref()).and_then(|to| {
            let from = match m.path.as_ref()? {
                PathMatch::Prefix(p) | PathMatch::Exact(p) => p.clone(),
                PathMatch::Regex(_) => return None,
            };
            Some((from, to.clone()))
        });
        let overrides = Overrides {
            forwarded_for: request_edits.takes_over("x-forwarded-for"),
            forwarded_proto: request_edits.takes_over("x-forwarded-proto"),
            request_id: request_edits.takes_over("x-request-id"),
            client_cert: request_edits.takes_over("x-forwarded-client-cert"),
        };
        CompiledRoute {
            index,
            matcher,
            request_edits,
            response_edits,
            prefix_rewrite,
            host_rewrite: http
                .and_then(|h| h.host_rewrite.as_ref())
                .map(|h| h.as_bytes().into()),
            timeout: http.map_or(Duration::from_secs(15), |h| h.timeout),
            stats: stats.http_route(
                listener,
                &route.name,
                match &route.action {
                    RouteAction::Forward { clusters } => clusters,
                    _ => &[],
                },
            ),
            overrides,
            upgrades: http.map_or_else(Box::default, |h| h.upgrades.clone().into_boxed_slice()),
        }
    }

    /// Whether this route takes `req`: every part of its match must hold.
    #[inline]
    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        self.matcher.matches(req)
    }

    /// The path to send upstream after `prefix_rewrite`, when the route has one.
    pub fn rewrite(&self, path: &str) -> Option<String> {
        let (from, to) = self.prefix_rewrite.as_ref()?;
        let rest = path.strip_prefix(from.as_str())?;
        let mut out = String::with_capacity(to.len() + rest.len());
        out.push_str(to);
        // "/api/" -> "/" on "/api/x" gives "/x"; "/api" -> "/" on "/api/x" must not give "//x".
        if out.ends_with('/') && rest.starts_with('/') {
            out.push_str(&rest[1..]);
        } else {
            out.push_str(rest);
        }
        if out.is_empty() {
            out.push('/');
        }
        Some(out)
    }
}

impl HeaderMatcher {
    fn matches(&self, req: &RequestView<'_>) -> bool {
        let mut values = req
            .head
            .headers(req.buf)
            .filter(|(n, _)| n.eq_ignore_ascii_case(&self.name))
            .map(|(_, v)| v);
        match &self.kind {
            HeaderKind::Present(want) => values.next().is_some() == *want,
            HeaderKind::Exact(want) => values.any(|v| v == &**want),
            HeaderKind::Regex(re) => values.any(|v| re.is_match(v)),
            HeaderKind::Never => false,
        }
    }
}

/// `host[:port]` -> `host` (IPv6 literals keep their brackets), without a trailing dot.
pub fn host_without_port(authority: &str) -> &str {
    let host = if authority.starts_with('[') {
        match authority.find(']') {
            Some(end) => &authority[..=end],
            None => authority,
        }
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
            _ => authority,
        }
    };
    host.strip_suffix('.').unwrap_or(host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http1::{Parsed, parse_request};

    const CONFIG: &str = r#"version = 1
[[listeners]]
name = "web"
address = "127.0.0.1:0"
protocol = "http"
default_route = "fallback"
[[routes]]
name = "health"
listener = "web"
match = { path = { exact = "/healthz" } }
direct_response = { status = 200 }
[[routes]]
name = "api"
listener = "web"
match = { hosts = ["api.example.test", "*.apps.example.test"], path = { prefix = "/api/" }, methods = ["GET"] }
cluster = "c"
prefix_rewrite = "/"
[[routes]]
name = "versioned"
listener = "web"
match = { path = { regex = "^/v[0-9]+/" }, headers = [{ name = "x-canary", exact = "1" }, { name = "x-debug", present = false }] }
cluster = "c"
request_headers = { set = { x-request-id = "fixed" } }
[[routes]]
name = "fallback"
listener = "web"
match = { path = { prefix = "/never" } }
cluster = "c"
[[clusters]]
name = "c"
endpoints = ["127.0.0.1:1"]
"#;

    fn routes() -> (Config, HttpRoutes) {
        let config = meshgate_config::parse(CONFIG, "test").expect("valid test config");
        let stats = ShardStats::default();
        let routes = HttpRoutes::new(&config, &stats);
        (config, routes)
    }

    /// The name of the route `raw` (a request head) takes.
    fn pick(routes: &HttpRoutes, config: &Config, raw: &str) -> Option<String> {
        let buf = raw.as_bytes();
        let Ok(Parsed::Complete { head, .. }) = parse_request(buf, &Limits::default()) else {
            panic!("bad test request {raw:?}");
        };
        let target = head.path(buf).to_owned();
        let path = crate::http1::normalize_path(target.as_bytes()).expect("path");
        let req = RequestView {
            host: head.host(buf).map(host_without_port),
            path: &path,
            method: head.method_str(buf),
            head: &head,
            buf,
            sni: None,
            peer: None,
        };
        let l = routes.listener(0).expect("http listener");
        l.select(&req).map(|r| config.routes[r.index].name.clone())
    }

    #[test]
    fn first_match_in_declared_order_then_default() {
        let (config, routes) = routes();
        let cases = [
            ("GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n", "health"),
            (
                "GET /api/v1 HTTP/1.1\r\nhost: api.example.test:8080\r\n\r\n",
                "api",
            ),
            (
                "GET /api/v1 HTTP/1.1\r\nhost: API.Example.Test.\r\n\r\n",
                "api",
            ),
            (
                "GET /api/v1 HTTP/1.1\r\nhost: a.apps.example.test\r\n\r\n",
                "api",
            ),
            // Wildcards are one label deep; methods are exact.
            (
                "GET /api/v1 HTTP/1.1\r\nhost: a.b.apps.example.test\r\n\r\n",
                "fallback",
            ),
            (
                "POST /api/v1 HTTP/1.1\r\nhost: api.example.test\r\ncontent-length: 0\r\n\r\n",
                "fallback",
            ),
            // The normalised path is matched.
            (
                "GET /x/../api/./v1 HTTP/1.1\r\nhost: api.example.test\r\n\r\n",
                "api",
            ),
            (
                "GET /%61pi/v1 HTTP/1.1\r\nhost: api.example.test\r\n\r\n",
                "api",
            ),
            (
                "GET /v2/x HTTP/1.1\r\nhost: x\r\nx-canary: 1\r\n\r\n",
                "versioned",
            ),
            (
                "GET /v2/x HTTP/1.1\r\nhost: x\r\nx-canary: 2\r\nx-canary: 1\r\n\r\n",
                "versioned",
            ),
            (
                "GET /v2/x HTTP/1.1\r\nhost: x\r\nx-canary: 1\r\nx-debug: y\r\n\r\n",
                "fallback",
            ),
            ("GET /v2/x HTTP/1.1\r\nhost: x\r\n\r\n", "fallback"),
        ];
        for (raw, want) in cases {
            assert_eq!(
                pick(&routes, &config, raw).as_deref(),
                Some(want),
                "{raw:?}"
            );
        }
    }

    #[test]
    fn https_routes_match_the_sni() {
        let config = meshgate_config::parse(
            r#"version = 1
[[listeners]]
name = "tls-web"
address = "127.0.0.1:0"
protocol = "https"
[[routes]]
name = "a"
listener = "tls-web"
match = { sni = ["a.example.test"], path = { prefix = "/" } }
cluster = "c"
[[routes]]
name = "rest"
listener = "tls-web"
cluster = "c"
[[clusters]]
name = "c"
endpoints = ["127.0.0.1:1"]
"#,
            "test",
        )
        .expect("valid https config");
        let stats = ShardStats::default();
        let routes = HttpRoutes::new(&config, &stats);
        let l = routes.listener(0).expect("https listeners are compiled");
        let buf = b"GET / HTTP/1.1\r\nhost: b.example.test\r\n\r\n";
        let Ok(Parsed::Complete { head, .. }) = parse_request(buf, &Limits::default()) else {
            panic!("bad request");
        };
        let view = |sni| RequestView {
            host: Some("b.example.test"),
            path: "/",
            method: "GET",
            head: &head,
            buf,
            sni,
            peer: None,
        };
        let name = |sni| {
            l.select(&view(sni))
                .map(|r| config.routes[r.index].name.clone())
        };
        assert_eq!(name(Some("a.example.test")).as_deref(), Some("a"));
        assert_eq!(name(Some("b.example.test")).as_deref(), Some("rest"));
        assert_eq!(name(None).as_deref(), Some("rest"));
    }

    #[test]
    fn rewrite_and_overrides() {
        let (config, routes) = routes();
        let l = routes.listener(0).expect("http listener");
        let api = &l.routes[1];
        assert_eq!(config.routes[api.index].name, "api");
        assert_eq!(api.rewrite("/api/v1/x").as_deref(), Some("/v1/x"));
        assert_eq!(api.rewrite("/api/").as_deref(), Some("/"));
        assert_eq!(api.rewrite("/other"), None);
        assert!(l.routes[2].overrides.request_id);
        assert!(!l.routes[2].overrides.forwarded_for);
        assert_eq!(l.routes[1].timeout, Duration::from_secs(15));
    }

    #[test]
    fn hosts_lose_their_port() {
        assert_eq!(host_without_port("a.test:80"), "a.test");
        assert_eq!(host_without_port("a.test"), "a.test");
        assert_eq!(host_without_port("a.test."), "a.test");
        assert_eq!(host_without_port("[::1]:80"), "[::1]");
        assert_eq!(host_without_port("[::1]"), "[::1]");
        assert_eq!(host_without_port("10.0.0.1:8080"), "10.0.0.1");
    }
}
