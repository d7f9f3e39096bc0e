//! Validation of what only `http` listeners have: `[listeners.http]`, the HTTP parts of
//! `[routes.match]` (hosts, path, methods, headers), the answering actions (`direct_response`,
//! `redirect`) and the request handling of a route (header edits, rewrites, timeout).
//!
//! Regular expressions are compiled here once with the same size limit the dataplane uses, so a
//! pattern that validates is a pattern that runs.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use super::{
    DEFAULT_MAX_REQUEST_HEAD, DEFAULT_REQUEST_TIMEOUT, DEFAULT_ROUTE_TIMEOUT, MAX_DIRECT_BODY,
    MAX_HEADER_OPS, MAX_REQUEST_HEAD, REGEX_SIZE_LIMIT, Validator, is_dns_name,
};
use crate::raw;
use crate::types::{
    HeaderMatch, HeaderOps, HeaderValueMatch, ListenerHttp, PathMatch, QueryMatch, RetryPolicy,
    RouteAction, RouteHttp,
};

/// Fields the proxy writes itself; a route may not add, set or remove them.
const MANAGED_HEADERS: [&str; 9] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "upgrade",
    "te",
    "trailer",
];

/// Methods of RFC 9110 and PATCH, for the case hint.
const KNOWN_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// The protocol routes may upgrade to when `upgrades` is not set.
const DEFAULT_UPGRADE: &str = "websocket";

/// Redirect statuses.
const REDIRECT_STATUSES: [u16; 5] = [301, 302, 303, 307, 308];
const DEFAULT_REDIRECT_STATUS: u16 = 302;

/// The HTTP parts of a `[routes.match]`.
#[derive(Default)]
pub(super) struct HttpMatch {
    pub hosts: Vec<String>,
    pub path: Option<PathMatch>,
    pub methods: Vec<String>,
    pub headers: Vec<HeaderMatch>,
    pub query: Vec<QueryMatch>,
}

impl Validator {
    pub(super) fn listener_http(
        &mut self,
        path: &str,
        raw: raw::ListenerHttp,
    ) -> Option<ListenerHttp> {
        let max_request_head = self.integer(
            &format!("{path}.max_request_head"),
            "max_request_head",
            raw.max_request_head,
            1024,
            MAX_REQUEST_HEAD,
            DEFAULT_MAX_REQUEST_HEAD,
        );
        let request_timeout = self.duration(
            &format!("{path}.request_timeout"),
            "request_timeout",
            raw.request_timeout,
            DEFAULT_REQUEST_TIMEOUT,
            true,
        );
        Some(ListenerHttp {
            max_request_head: max_request_head?,
            request_timeout: request_timeout?,
        })
    }

    /// `None` when an action that answers requests is bound to a listener that does not read
    /// them (reported).
    fn answers_requests(&mut self, path: &str, field: &str, protocol: Option<&str>) -> bool {
        match protocol {
            Some(p) if p != "http" && p != "https" => {
                self.error(
                    path,
                    format!(
                        "`{field}` answers HTTP requests, but a {p} listener forwards whole \
                         connections without reading requests"
                    ),
                    "bind the route to a listener with protocol = \"http\" or \"https\", or \
                     forward with cluster = \"NAME\"",
                );
                false
            }
            _ => true,
        }
    }

    pub(super) fn direct_response(
        &mut self,
        path: &str,
        raw: raw::DirectResponse,
        protocol: Option<&str>,
    ) -> Option<RouteAction> {
        if !self.answers_requests(path, "direct_response", protocol) {
            return None;
        }
        let status = match raw.status {
            None => Some(200),
            Some(status) => match u16::try_from(status) {
                Ok(status) if (200..=599).contains(&status) => Some(status),
                _ => {
                    self.error(
                        format!("{path}.status"),
                        format!("status must be a final HTTP status (200 to 599), found {status}"),
                        "e.g. direct_response = { status = 200, body = \"ok\\n\" }",
                    );
                    None
                }
            },
        };
        let body = raw.body.unwrap_or_default();
        let mut ok = true;
        if body.len() > MAX_DIRECT_BODY {
            self.error(
                format!("{path}.body"),
                format!(
                    "body is {} bytes, the limit is {MAX_DIRECT_BODY}",
                    body.len()
                ),
                "serve large content from an upstream cluster",
            );
            ok = false;
        }
        if let Some(status @ (204 | 304)) = status
            && !body.is_empty()
        {
            self.error(
                format!("{path}.body"),
                format!("a {status} response has no body"),
                "remove `body`, or use status = 200",
            );
            ok = false;
        }
        let status = status?;
        ok.then_some(RouteAction::DirectResponse { status, body })
    }

    pub(super) fn redirect(
        &mut self,
        path: &str,
        raw: raw::Redirect,
        protocol: Option<&str>,
    ) -> Option<RouteAction> {
        if !self.answers_requests(path, "redirect", protocol) {
            return None;
        }
        let location = match raw.location {
            None => {
                self.error(
                    format!("{path}.location"),
                    "missing `location`",
                    "give the URL to send clients to, e.g. redirect = { location = \
                     \"https://example.test/\", status = 301 }",
                );
                None
            }
            Some(location)
                if location.is_empty() || !location.bytes().all(|b| (b'!'..=b'~').contains(&b)) =>
            {
                self.error(
                    format!("{path}.location"),
                    format!("invalid location {location:?}"),
                    "write an absolute URL or a path of printable ASCII without spaces \
                     (percent-encode others), e.g. \"https://example.test/new\"",
                );
                None
            }
            Some(location) => Some(location),
        };
        let status = match raw.status {
            None => Some(DEFAULT_REDIRECT_STATUS),
            Some(status) => match u16::try_from(status) {
                Ok(status) if REDIRECT_STATUSES.contains(&status) => Some(status),
                _ => {
                    self.error(
                        format!("{path}.status"),
                        format!(
                            "status {status} is not a redirect; allowed values: 301, 302, 303, \
                             307, 308"
                        ),
                        "301/308 are permanent (308 keeps the method), 302/307 temporary (307 \
                         keeps the method), 303 turns the request into a GET",
                    );
                    None
                }
            },
        };
        Some(RouteAction::Redirect {
            location: location?,
            status: status?,
        })
    }

    /// Header edits, rewrites and the timeout of a route. `Some(None)` for routes of other
    /// listeners (where none of these may be set).
    pub(super) fn route_http(
        &mut self,
        path: &str,
        raw: &mut raw::Route,
        protocol: Option<&str>,
        action: Option<&RouteAction>,
        matched_path: Option<Option<&PathMatch>>,
    ) -> Option<Option<RouteHttp>> {
        let request_headers = raw.request_headers.take();
        let response_headers = raw.response_headers.take();
        let prefix_rewrite = raw.prefix_rewrite.take();
        let host_rewrite = raw.host_rewrite.take();
        let timeout = raw.timeout.take();
        let retry = raw.retry.take();
        let upgrades = raw.upgrades.take();
        match protocol {
            Some("http" | "https") => {}
            Some(p) => {
                let given = [
                    ("request_headers", request_headers.is_some()),
                    ("response_headers", response_headers.is_some()),
                    ("prefix_rewrite", prefix_rewrite.is_some()),
                    ("host_rewrite", host_rewrite.is_some()),
                    ("timeout", timeout.is_some()),
                    ("retry", retry.is_some()),
                    ("upgrades", upgrades.is_some()),
                ];
                let mut ok = true;
                for (field, _) in given.iter().filter(|(_, set)| *set) {
                    self.error(
                        format!("{path}.{field}"),
                        format!(
                            "`{field}` applies to routes of http listeners only; a {p} listener \
                             forwards bytes, not HTTP requests"
                        ),
                        format!("remove {field}, or bind the route to an http listener"),
                    );
                    ok = false;
                }
                return ok.then_some(None);
            }
            // The listener is unknown (reported already): nothing more to say.
            None => return Some(None),
        }
        let forwards = match action {
            Some(RouteAction::Forward { .. }) | None => true,
            Some(_) => false,
        };
        let request_headers = match request_headers {
            None => Some(HeaderOps::default()),
            Some(ops) => self.header_ops(&format!("{path}.request_headers"), ops),
        };
        let response_headers = match response_headers {
            None => Some(HeaderOps::default()),
            Some(ops) => self.header_ops(&format!("{path}.response_headers"), ops),
        };
        let prefix_rewrite = match prefix_rewrite {
            None => Some(None),
            Some(text) => {
                let field = format!("{path}.prefix_rewrite");
                if !forwards {
                    self.not_forwarding(&field, "prefix_rewrite");
                    None
                } else if let Some(problem) = path_problem(&text) {
                    self.error(
                        field,
                        format!("invalid prefix_rewrite {text:?}: {problem}"),
                        "write the path prefix to send instead, e.g. prefix_rewrite = \"/v2/\"",
                    );
                    None
                } else {
                    match matched_path {
                        Some(Some(PathMatch::Prefix(_) | PathMatch::Exact(_))) | None => {
                            Some(Some(text))
                        }
                        Some(_) => {
                            self.error(
                                field,
                                "prefix_rewrite replaces the path prefix the route matched, but \
                                 the route has no match.path.prefix (or exact)",
                                "add match = { path = { prefix = \"/api/\" } } to the route, or \
                                 remove prefix_rewrite",
                            );
                            None
                        }
                    }
                }
            }
        };
        let host_rewrite = match host_rewrite {
            None => Some(None),
            Some(text) => {
                let field = format!("{path}.host_rewrite");
                if !forwards {
                    self.not_forwarding(&field, "host_rewrite");
                    None
                } else if valid_authority(&text) {
                    Some(Some(text.to_ascii_lowercase()))
                } else {
                    self.error(
                        field,
                        format!("invalid host_rewrite {text:?}"),
                        "write a host name or IP, optionally with a port, e.g. host_rewrite = \
                         \"backend.internal\" or \"10.0.0.5:8080\"",
                    );
                    None
                }
            }
        };
        let timeout = self.duration(
            &format!("{path}.timeout"),
            "timeout",
            timeout,
            DEFAULT_ROUTE_TIMEOUT,
            true,
        );
        let retry = match retry {
            None => Some(RetryPolicy::default_policy()),
            Some(_) if !forwards => {
                self.not_forwarding(&format!("{path}.retry"), "retry");
                None
            }
            Some(raw) => self.route_retry(&format!("{path}.retry"), raw, timeout),
        };
        let upgrades = match upgrades {
            None => Some(vec![DEFAULT_UPGRADE.to_owned()]),
            Some(list) if !forwards && !list.is_empty() => {
                self.not_forwarding(&format!("{path}.upgrades"), "upgrades");
                None
            }
            Some(list) => self.upgrades(&format!("{path}.upgrades"), list),
        };
        Some(Some(RouteHttp {
            request_headers: request_headers?,
            response_headers: response_headers?,
            prefix_rewrite: prefix_rewrite?,
            host_rewrite: host_rewrite?,
            timeout: timeout?,
            retry: retry?,
            upgrades: upgrades?,
        }))
    }

    fn not_forwarding(&mut self, path: &str, field: &str) {
        self.error(
            path,
            format!(
                "`{field}` changes the request sent upstream, but this route answers itself \
                 (direct_response or redirect)"
            ),
            format!("remove {field}, or forward with cluster = \"NAME\""),
        );
    }

    fn header_ops(&mut self, path: &str, raw: raw::HeaderOps) -> Option<HeaderOps> {
        let mut ok = true;
        let mut map = |this: &mut Self, field: &str, list: Option<BTreeMap<String, String>>| {
            let list = list.unwrap_or_default();
            let list_path = format!("{path}.{field}");
            if list.len() > MAX_HEADER_OPS {
                this.error(
                    &list_path,
                    format!(
                        "{} fields to {field}, the limit is {MAX_HEADER_OPS}",
                        list.len()
                    ),
                    "edit fewer fields per route",
                );
                ok = false;
            }
            let mut out: Vec<(String, String)> = Vec::with_capacity(list.len());
            for (name, value) in list {
                let entry_path = format!("{list_path}.{name}");
                let lower = name.to_ascii_lowercase();
                if !this.editable_header(&entry_path, &name) {
                    ok = false;
                } else if out.iter().any(|(n, _)| *n == lower) {
                    this.error(
                        &entry_path,
                        format!("field {name:?} is listed twice (names are case-insensitive)"),
                        "list each field once",
                    );
                    ok = false;
                } else if let Some(problem) = value_problem(&value) {
                    this.error(
                        &entry_path,
                        format!("invalid value for {name}: {problem}"),
                        "field values are printable text on one line, without leading or \
                         trailing whitespace",
                    );
                    ok = false;
                } else {
                    out.push((lower, value));
                }
            }
            out
        };
        let add = map(self, "add", raw.add);
        let set = map(self, "set", raw.set);
        let remove_list = raw.remove.unwrap_or_default();
        let mut remove: Vec<String> = Vec::with_capacity(remove_list.len());
        if remove_list.len() > MAX_HEADER_OPS {
            self.error(
                format!("{path}.remove"),
                format!(
                    "{} fields to remove, the limit is {MAX_HEADER_OPS}",
                    remove_list.len()
                ),
                "edit fewer fields per route",
            );
            ok = false;
        }
        for (index, name) in remove_list.into_iter().enumerate() {
            let entry_path = format!("{path}.remove[{index}]");
            let lower = name.to_ascii_lowercase();
            if !self.editable_header(&entry_path, &name) {
                ok = false;
            } else if remove.contains(&lower) {
                self.error(
                    &entry_path,
                    format!("field {name:?} is listed twice"),
                    "list each field once",
                );
                ok = false;
            } else {
                remove.push(lower);
            }
        }
        ok.then_some(HeaderOps { add, set, remove })
    }

    /// A field name a route may edit: a token, not managed by the proxy.
    fn editable_header(&mut self, path: &str, name: &str) -> bool {
        if !is_token(name) {
            self.error(
                path,
                format!("invalid header field name {name:?}"),
                "field names are tokens: letters, digits and !#$%&'*+-.^_`|~, e.g. x-team",
            );
            return false;
        }
        let lower = name.to_ascii_lowercase();
        if MANAGED_HEADERS.contains(&lower.as_str()) {
            self.error(
                path,
                format!("{name} is managed by the proxy and cannot be edited by a route"),
                if lower == "host" {
                    "use host_rewrite = \"NAME\" to change the Host sent upstream"
                } else {
                    "framing and connection fields are written from the message itself; remove \
                     this edit"
                },
            );
            return false;
        }
        true
    }

    /// Takes the HTTP fields out of `raw` and checks them against the listener's protocol.
    pub(super) fn http_match(
        &mut self,
        path: &str,
        raw: &mut raw::RouteMatch,
        protocol: Option<&str>,
    ) -> Option<HttpMatch> {
        let hosts = raw.hosts.take();
        let path_match = raw.path.take();
        let methods = raw.methods.take();
        let headers = raw.headers.take();
        let query = raw.query.take();
        match protocol {
            Some("http" | "https") => {}
            Some(p) => {
                let given = [
                    ("hosts", hosts.is_some()),
                    ("path", path_match.is_some()),
                    ("methods", methods.is_some()),
                    ("headers", headers.is_some()),
                    ("query", query.is_some()),
                ];
                let mut ok = true;
                for (field, _) in given.iter().filter(|(_, set)| *set) {
                    self.error(
                        format!("{path}.{field}"),
                        format!(
                            "`{field}` matches HTTP requests, but a {p} listener routes whole \
                             connections before any HTTP is read"
                        ),
                        "remove it (match on sni instead), or bind the route to an http listener",
                    );
                    ok = false;
                }
                return ok.then(HttpMatch::default);
            }
            None => return Some(HttpMatch::default()),
        }
        let mut ok = true;
        // An https listener keeps `sni` (the TLS server name, matched like on tls listeners).
        if protocol == Some("http") && raw.sni.take().is_some() {
            self.error(
                format!("{path}.sni"),
                "an http listener has no TLS, so its requests carry no SNI",
                "match the Host of the request instead: hosts = [\"api.example.test\"]",
            );
            ok = false;
        }
        let hosts = self.host_patterns(&format!("{path}.hosts"), hosts.unwrap_or_default());
        let path_match = match path_match {
            None => Some(None),
            Some(p) => self.path_match(&format!("{path}.path"), p).map(Some),
        };
        let methods = self.methods(&format!("{path}.methods"), methods.unwrap_or_default());
        let headers = self.header_matches(&format!("{path}.headers"), headers.unwrap_or_default());
        let query = self.query_matches(&format!("{path}.query"), query.unwrap_or_default());
        let out = HttpMatch {
            hosts: hosts?,
            path: path_match?,
            methods: methods?,
            headers: headers?,
            query: query?,
        };
        ok.then_some(out)
    }

    fn host_patterns(&mut self, path: &str, list: Vec<String>) -> Option<Vec<String>> {
        let mut out: Vec<String> = Vec::with_capacity(list.len());
        let mut ok = true;
        for (index, pattern) in list.into_iter().enumerate() {
            let lower = pattern.to_ascii_lowercase();
            let lower = lower.strip_suffix('.').unwrap_or(&lower).to_owned();
            let valid = match lower.strip_prefix("*.") {
                Some(parent) => is_dns_name(parent),
                None => is_dns_name(&lower) || is_ip_host(&lower),
            };
            if !valid {
                self.error(
                    format!("{path}[{index}]"),
                    format!("invalid host pattern {pattern:?}"),
                    "write a host name (\"api.example.test\"), a wildcard one label deep \
                     (\"*.example.test\") or an IP (\"10.0.0.1\", \"[::1]\"), without a port",
                );
                ok = false;
            } else if out.contains(&lower) {
                self.error(
                    format!("{path}[{index}]"),
                    format!("host pattern {pattern:?} is listed twice"),
                    "list each host once",
                );
                ok = false;
            } else {
                out.push(lower);
            }
        }
        ok.then_some(out)
    }

    fn path_match(&mut self, path: &str, raw: raw::PathMatch) -> Option<PathMatch> {
        let given = [
            raw.prefix.is_some(),
            raw.exact.is_some(),
            raw.regex.is_some(),
        ]
        .into_iter()
        .filter(|g| *g)
        .count();
        if given != 1 {
            // "None given" is reported at the first alternative, so that a value dropped for
            // its type (reported there already) is not reported twice.
            let (at, message) = if given == 0 {
                (
                    format!("{path}.prefix"),
                    "`path` sets none of prefix, exact and regex",
                )
            } else {
                (
                    path.to_owned(),
                    "`path` sets more than one of prefix, exact and regex",
                )
            };
            self.error(
                at,
                message,
                "set exactly one, e.g. path = { prefix = \"/api/\" }, path = { exact = \
                 \"/healthz\" } or path = { regex = \"^/v[0-9]+/\" }",
            );
            return None;
        }
        if let Some(regex) = raw.regex {
            return self
                .regex(&format!("{path}.regex"), &regex)
                .then_some(PathMatch::Regex(regex));
        }
        let (field, text, make): (&str, String, fn(String) -> PathMatch) = match raw.prefix {
            Some(prefix) => ("prefix", prefix, PathMatch::Prefix),
            None => ("exact", raw.exact.unwrap_or_default(), PathMatch::Exact),
        };
        match path_problem(&text) {
            None => Some(make(text)),
            Some(problem) => {
                self.error(
                    format!("{path}.{field}"),
                    format!("invalid path {text:?}: {problem}"),
                    "paths are matched after normalisation (no //, /./ or /../, no query); \
                     write e.g. \"/api/\"",
                );
                None
            }
        }
    }

    fn methods(&mut self, path: &str, list: Vec<String>) -> Option<Vec<String>> {
        let mut out: Vec<String> = Vec::with_capacity(list.len());
        let mut ok = true;
        for (index, method) in list.into_iter().enumerate() {
            let upper = method.to_ascii_uppercase();
            let problem = if !is_token(&method) {
                Some((
                    format!("invalid method {method:?}"),
                    "methods are tokens such as \"GET\" or \"POST\"".to_owned(),
                ))
            } else if method != upper && KNOWN_METHODS.contains(&upper.as_str()) {
                Some((
                    format!("method {method:?} never matches: methods are case-sensitive"),
                    format!("did you mean \"{upper}\"?"),
                ))
            } else if out.contains(&method) {
                Some((
                    format!("method {method:?} is listed twice"),
                    "list each method once".to_owned(),
                ))
            } else {
                None
            };
            match problem {
                Some((message, hint)) => {
                    self.error(format!("{path}[{index}]"), message, hint);
                    ok = false;
                }
                None => out.push(method),
            }
        }
        ok.then_some(out)
    }

    fn header_matches(
        &mut self,
        path: &str,
        list: Vec<raw::HeaderMatch>,
    ) -> Option<Vec<HeaderMatch>> {
        let mut out = Vec::with_capacity(list.len());
        let mut ok = true;
        for (index, entry) in list.into_iter().enumerate() {
            let entry_path = format!("{path}[{index}]");
            let name = match entry.name {
                None => {
                    self.error(
                        format!("{entry_path}.name"),
                        "missing `name`",
                        "name the header field, e.g. { name = \"x-canary\", exact = \"1\" }",
                    );
                    None
                }
                Some(name) if !is_token(&name) => {
                    self.error(
                        format!("{entry_path}.name"),
                        format!("invalid header field name {name:?}"),
                        "field names are tokens: letters, digits and !#$%&'*+-.^_`|~",
                    );
                    None
                }
                Some(name) if name.eq_ignore_ascii_case("host") => {
                    self.error(
                        format!("{entry_path}.name"),
                        "match the host with `hosts`, not with a header entry",
                        "write hosts = [\"api.example.test\"] in the match",
                    );
                    None
                }
                Some(name) => Some(name.to_ascii_lowercase()),
            };
            let value = self.value_condition(
                &entry_path,
                "header",
                "{ name = \"x-canary\", exact = \"1\" }, { name = \"x-env\", regex = \
                 \"^(dev|test)$\" } or { name = \"x-debug\", present = true }",
                (entry.exact, entry.regex, entry.present),
            );
            match (name, value) {
                (Some(name), Some(value)) => out.push(HeaderMatch { name, value }),
                _ => ok = false,
            }
        }
        ok.then_some(out)
    }

    /// The value part of a header or query entry: exactly one of exact, regex and present.
    fn value_condition(
        &mut self,
        entry_path: &str,
        what: &str,
        examples: &str,
        (exact, regex, present): (Option<String>, Option<String>, Option<bool>),
    ) -> Option<HeaderValueMatch> {
        let given = [exact.is_some(), regex.is_some(), present.is_some()]
            .into_iter()
            .filter(|g| *g)
            .count();
        if given != 1 {
            let (at, message) = if given == 0 {
                (
                    format!("{entry_path}.exact"),
                    format!(
                        "{what} entry says nothing about the value: none of exact, regex and \
                         present is set"
                    ),
                )
            } else {
                (
                    entry_path.to_owned(),
                    format!("{what} entry sets more than one of exact, regex and present"),
                )
            };
            self.error(at, message, format!("set exactly one: {examples}"));
            return None;
        }
        if let Some(exact) = exact {
            // Query values are compared decoded, so any text can occur in one.
            return match (what, value_problem(&exact)) {
                ("header", Some(problem)) => {
                    self.error(
                        format!("{entry_path}.exact"),
                        format!("{exact:?} can never match: {problem}"),
                        "field values are compared without surrounding whitespace",
                    );
                    None
                }
                _ => Some(HeaderValueMatch::Exact(exact)),
            };
        }
        if let Some(regex) = regex {
            return self
                .regex(&format!("{entry_path}.regex"), &regex)
                .then_some(HeaderValueMatch::Regex(regex));
        }
        present.map(HeaderValueMatch::Present)
    }

    fn query_matches(&mut self, path: &str, list: Vec<raw::QueryMatch>) -> Option<Vec<QueryMatch>> {
        let mut out = Vec::with_capacity(list.len());
        let mut ok = true;
        for (index, entry) in list.into_iter().enumerate() {
            let entry_path = format!("{path}[{index}]");
            let name = match entry.name {
                Some(name) if !name.is_empty() => Some(name),
                _ => {
                    self.error(
                        format!("{entry_path}.name"),
                        "missing or empty `name`",
                        "name the query parameter (decoded, case-sensitive), e.g. \
                         [[routes.match.query]] name = \"version\" then exact = \"2\"",
                    );
                    None
                }
            };
            let value = self.value_condition(
                &entry_path,
                "query",
                "{ name = \"version\", exact = \"2\" }, { name = \"v\", regex = \"^[0-9]+$\" } \
                 or { name = \"debug\", present = true }",
                (entry.exact, entry.regex, entry.present),
            );
            match (name, value) {
                (Some(name), Some(value)) => out.push(QueryMatch { name, value }),
                _ => ok = false,
            }
        }
        ok.then_some(out)
    }

    fn upgrades(&mut self, path: &str, list: Vec<String>) -> Option<Vec<String>> {
        let mut out: Vec<String> = Vec::with_capacity(list.len());
        let mut ok = true;
        for (index, name) in list.into_iter().enumerate() {
            let lower = name.to_ascii_lowercase();
            let problem = if !is_token(&name) {
                Some((
                    format!("invalid upgrade protocol {name:?}"),
                    "protocols are tokens as sent in the Upgrade field, e.g. \"websocket\"",
                ))
            } else if lower == "h2c" {
                Some((
                    "`h2c` is never forwarded: cleartext HTTP/2 reaches the gateway with prior \
                     knowledge, and upgrading an upstream connection to it is not supported"
                        .to_owned(),
                    "remove \"h2c\"; HTTP/2 clients connect with prior knowledge (or ALPN on \
                     https listeners)",
                ))
            } else if out.contains(&lower) {
                Some((
                    format!("upgrade protocol {name:?} is listed twice"),
                    "list each protocol once",
                ))
            } else {
                None
            };
            match problem {
                Some((message, hint)) => {
                    self.error(format!("{path}[{index}]"), message, hint);
                    ok = false;
                }
                None => out.push(lower),
            }
        }
        ok.then_some(out)
    }

    /// Compiles `text` with the dataplane's limits; reports and returns false if it does not.
    fn regex(&mut self, path: &str, text: &str) -> bool {
        match compile_regex(text) {
            Ok(()) => true,
            Err(problem) => {
                self.error(
                    path,
                    format!("invalid regular expression {text:?}: {problem}"),
                    "use Rust regex syntax (https://docs.rs/regex/#syntax); anchor with ^ and $ \
                     to match the whole value",
                );
                false
            }
        }
    }
}

/// Compiles a route regex the way the dataplane does: the error's last line when it fails.
pub(crate) fn compile_regex(text: &str) -> Result<(), String> {
    match regex::bytes::RegexBuilder::new(text)
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
    {
        Ok(_) => Ok(()),
        Err(err) => {
            let message = err.to_string();
            let last = message
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .trim();
            Err(last.strip_prefix("error: ").unwrap_or(last).to_owned())
        }
    }
}

/// RFC 9110 token.
fn is_token(text: &str) -> bool {
    !text.is_empty()
        && text.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'!' | b'#'
                        | b'$'
                        | b'%'
                        | b'&'
                        | b'\''
                        | b'*'
                        | b'+'
                        | b'-'
                        | b'.'
                        | b'^'
                        | b'_'
                        | b'`'
                        | b'|'
                        | b'~'
                )
        })
}

/// Why `value` cannot be a header field value as the codec writes and compares it.
fn value_problem(value: &str) -> Option<&'static str> {
    if value.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        Some("control characters (line breaks, NUL) are not allowed")
    } else if value.starts_with([' ', '\t']) || value.ends_with([' ', '\t']) {
        Some("leading or trailing whitespace")
    } else {
        None
    }
}

/// Why `text` can never equal a normalised request path (or be a prefix of one).
fn path_problem(text: &str) -> Option<&'static str> {
    if !text.starts_with('/') {
        return Some("it does not start with '/'");
    }
    if !text.bytes().all(|b| (b'!'..=b'~').contains(&b)) {
        return Some("only printable ASCII without spaces is allowed (percent-encode the rest)");
    }
    if text.contains(['?', '#']) {
        return Some("'?' and '#' are not part of a path (queries are not matched)");
    }
    if text.contains('\\') {
        return Some("backslashes are refused in request paths");
    }
    if text.contains("//") {
        return Some("normalised paths have no empty segments (//)");
    }
    if text
        .split('/')
        .any(|segment| segment == "." || segment == "..")
    {
        return Some("normalised paths have no . or .. segments");
    }
    None
}

/// `10.0.0.1` or `[::1]`.
fn is_ip_host(text: &str) -> bool {
    text.parse::<Ipv4Addr>().is_ok()
        || text
            .strip_prefix('[')
            .and_then(|t| t.strip_suffix(']'))
            .is_some_and(|t| t.parse::<Ipv6Addr>().is_ok())
}

/// `host[:port]` as the Host field carries it.
fn valid_authority(text: &str) -> bool {
    let (host, port) = match text.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((v6, rest)) => (format!("[{v6}]"), rest.strip_prefix(':').map(str::to_owned)),
            None => return false,
        },
        None => match text.rsplit_once(':') {
            Some((host, port)) => (host.to_owned(), Some(port.to_owned())),
            None => (text.to_owned(), None),
        },
    };
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p != 0));
    let host = host.to_ascii_lowercase();
    port_ok && (is_dns_name(&host) || is_ip_host(&host))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_that_can_never_match_are_explained() {
        assert_eq!(path_problem("/api/"), None);
        assert_eq!(path_problem("/"), None);
        assert!(path_problem("api").is_some());
        assert!(path_problem("/a//b").is_some());
        assert!(path_problem("/a/../b").is_some());
        assert!(path_problem("/a?x=1").is_some());
        assert!(path_problem("/a b").is_some());
    }

    #[test]
    fn authorities() {
        assert!(valid_authority("backend.internal"));
        assert!(valid_authority("backend.internal:8080"));
        assert!(valid_authority("10.0.0.1:80"));
        assert!(valid_authority("[::1]:80"));
        assert!(!valid_authority("a b"));
        assert!(!valid_authority("host:0"));
        assert!(!valid_authority("host:x"));
        assert!(!valid_authority(""));
    }

    #[test]
    fn regex_errors_are_one_line() {
        assert!(compile_regex("^/v[0-9]+/").is_ok());
        let err = compile_regex("^/v[0-9+/").err().unwrap_or_default();
        assert!(!err.contains('\n'), "{err}");
        assert!(err.contains("unclosed"), "{err}");
    }
}
