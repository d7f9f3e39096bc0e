//! Validation of how a cluster spreads requests over its endpoints: the endpoint list (plain
//! addresses or `{ address, weight }` tables), `balance`, `hash_on`, `[clusters.health_check]`
//! and `[clusters.outlier_detection]`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use super::{AddressUse, Validator, quoted_list};
use crate::load::nearest;
use crate::raw;
use crate::types::{
    Balance, Cluster, HashOn, HealthCheck, HealthCheckKind, Listener, OutlierDetection, Protocol,
    Route, RouteAction,
};

pub(crate) const MAX_ENDPOINT_WEIGHT: u32 = 10_000;
const BALANCES: [&str; 3] = ["round_robin", "least_request", "maglev"];
pub(crate) const DEFAULT_HC_INTERVAL: Duration = Duration::from_secs(5);
pub(crate) const DEFAULT_HC_TIMEOUT: Duration = Duration::from_secs(1);
pub(crate) const DEFAULT_HC_HEALTHY: u32 = 2;
pub(crate) const DEFAULT_HC_UNHEALTHY: u32 = 3;
pub(crate) const DEFAULT_OD_CONSECUTIVE: u32 = 5;
pub(crate) const DEFAULT_OD_BASE_EJECTION: Duration = Duration::from_secs(30);
pub(crate) const DEFAULT_OD_MAX_EJECTION: Duration = Duration::from_secs(300);
pub(crate) const DEFAULT_OD_MAX_PERCENT: u32 = 10;
pub(crate) const DEFAULT_OD_INTERVAL: Duration = Duration::from_secs(10);

impl Validator {
    /// The endpoints and their weights (same index).
    pub(super) fn endpoints(
        &mut self,
        cluster_path: &str,
        list: &[raw::Endpoint],
    ) -> Option<(Vec<SocketAddr>, Vec<u32>)> {
        let mut endpoints = Vec::with_capacity(list.len());
        let mut weights = Vec::with_capacity(list.len());
        let mut ok = true;
        let mut seen: HashMap<SocketAddr, usize> = HashMap::new();
        for (index, entry) in list.iter().enumerate() {
            let path = format!("{cluster_path}.endpoints[{index}]");
            let (text, weight) = match entry {
                raw::Endpoint::Address(text) => (Some(text), Some(1)),
                raw::Endpoint::Weighted { address, weight } => {
                    if address.is_none() {
                        self.error(
                            format!("{path}.address"),
                            "missing `address`",
                            "write the entry as { address = \"127.0.0.1:8080\", weight = 3 }",
                        );
                    }
                    let weight = self.integer(
                        &format!("{path}.weight"),
                        "weight",
                        *weight,
                        1,
                        MAX_ENDPOINT_WEIGHT,
                        1,
                    );
                    (address.as_ref(), weight)
                }
            };
            let (Some(text), Some(weight)) = (text, weight) else {
                ok = false;
                continue;
            };
            let Some(address) = self.address(&path, text, AddressUse::Endpoint) else {
                ok = false;
                continue;
            };
            let ip = address.ip().to_canonical();
            let problem = if address.port() == 0 {
                Some(format!("endpoint {address} has port 0"))
            } else if ip.is_unspecified() {
                Some(format!(
                    "endpoint {address} has the unspecified IP {ip}, which cannot be connected to"
                ))
            } else if ip.is_multicast() {
                Some(format!("endpoint {address} is a multicast address"))
            } else {
                None
            };
            if let Some(problem) = problem {
                self.error(
                    path,
                    problem,
                    "use the upstream's own IP and port, e.g. \"127.0.0.1:8080\"",
                );
                ok = false;
                continue;
            }
            if let Some(first) = seen.get(&address) {
                self.error(
                    path,
                    format!("duplicate endpoint {address} (same as endpoints[{first}])"),
                    "list each endpoint once; remove this entry",
                );
                ok = false;
                continue;
            }
            seen.insert(address, index);
            endpoints.push(address);
            weights.push(weight);
        }
        ok.then_some((endpoints, weights))
    }

    pub(super) fn balance(&mut self, path: &str, raw: Option<&str>) -> Option<Balance> {
        match raw {
            None | Some("round_robin") => Some(Balance::RoundRobin),
            Some("least_request") => Some(Balance::LeastRequest),
            Some("maglev") => Some(Balance::Maglev),
            Some(other) => {
                let mut hint = match nearest(other, &BALANCES) {
                    Some(near) => format!("did you mean \"{near}\"? "),
                    None => String::new(),
                };
                hint.push_str(
                    "round_robin spreads evenly (by weight), least_request prefers endpoints \
                     with fewer requests in flight, maglev keeps a key (hash_on) on one endpoint",
                );
                self.error(
                    format!("{path}.balance"),
                    format!(
                        "unknown balance `{other}`; allowed values: {}",
                        quoted_list(&BALANCES)
                    ),
                    hint,
                );
                None
            }
        }
    }

    /// `Some(None)` when no hash is configured (and none is needed).
    pub(super) fn hash_on(
        &mut self,
        path: &str,
        balance: Option<Balance>,
        raw: Option<raw::HashOn>,
    ) -> Option<Option<HashOn>> {
        let field = format!("{path}.hash_on");
        let hash_on = match raw {
            None => None,
            Some(raw::HashOn::Name(name)) => match name.as_str() {
                "peer_identity" => Some(HashOn::PeerIdentity),
                "source_ip" => Some(HashOn::SourceIp),
                other => {
                    self.error(
                        field,
                        format!(
                            "unknown hash_on `{other}`; allowed: \"peer_identity\", \
                             \"source_ip\" or {{ header = \"NAME\" }}"
                        ),
                        "e.g. hash_on = { header = \"x-user\" } or hash_on = \"source_ip\"",
                    );
                    return None;
                }
            },
            Some(raw::HashOn::Header { header }) => {
                let valid = !header.is_empty()
                    && header
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
                if !valid {
                    self.error(
                        field,
                        format!("`{header}` is not a valid header name"),
                        "name a request header, e.g. hash_on = { header = \"x-user\" }",
                    );
                    return None;
                }
                Some(HashOn::Header(header.to_ascii_lowercase()))
            }
        };
        match (balance, &hash_on) {
            (Some(Balance::Maglev), None) => {
                self.error(
                    field,
                    "balance = \"maglev\" needs `hash_on`",
                    "say what to hash: hash_on = { header = \"x-user\" }, \"peer_identity\" or \
                     \"source_ip\"",
                );
                None
            }
            (Some(b), Some(_)) if b != Balance::Maglev => {
                self.error(
                    field,
                    format!("hash_on is only used by balance = \"maglev\" (this cluster: {b})"),
                    "set balance = \"maglev\" or remove hash_on",
                );
                None
            }
            _ => Some(hash_on),
        }
    }

    pub(super) fn health_check(
        &mut self,
        path: &str,
        raw: raw::HealthCheck,
    ) -> Option<HealthCheck> {
        let kind = match raw.kind.as_deref() {
            None | Some("tcp") if raw.path.is_none() && raw.expected_statuses.is_none() => {
                Some(HealthCheckKind::Tcp)
            }
            None | Some("http") => Some(HealthCheckKind::Http),
            Some("tcp") => {
                self.error(
                    format!("{path}.kind"),
                    "`path` and `expected_statuses` are for kind = \"http\"",
                    "set kind = \"http\", or remove path and expected_statuses",
                );
                None
            }
            Some(other) => {
                self.error(
                    format!("{path}.kind"),
                    format!(
                        "unknown health check kind `{other}`; allowed values: \"tcp\", \"http\""
                    ),
                    "kind = \"tcp\" checks that a connection opens; kind = \"http\" sends GET path",
                );
                None
            }
        };
        let check_path = match raw.path {
            None => Some("/".to_owned()),
            Some(p) if p.starts_with('/') && p.bytes().all(|b| b.is_ascii_graphic()) => Some(p),
            Some(p) => {
                self.error(
                    format!("{path}.path"),
                    format!("health check path {p:?} must start with `/` and have no spaces"),
                    "e.g. path = \"/healthz\"",
                );
                None
            }
        };
        let host = match raw.host {
            Some(h) if h.is_empty() || !h.bytes().all(|b| b.is_ascii_graphic()) => {
                self.error(
                    format!("{path}.host"),
                    format!("{h:?} is not a valid Host header value"),
                    "e.g. host = \"backend.example.test\", or leave it out to send the address",
                );
                None
            }
            h => Some(h),
        };
        let expected_statuses = match raw.expected_statuses {
            None => Some(vec![200]),
            Some(list) if list.is_empty() => {
                self.error(
                    format!("{path}.expected_statuses"),
                    "expected_statuses is empty",
                    "list the healthy statuses, e.g. expected_statuses = [200, 204]",
                );
                None
            }
            Some(list) => {
                let mut out = Vec::with_capacity(list.len());
                for (i, s) in list.iter().enumerate() {
                    match u16::try_from(*s) {
                        Ok(s) if (100..=599).contains(&s) => out.push(s),
                        _ => self.error(
                            format!("{path}.expected_statuses[{i}]"),
                            format!("{s} is not an HTTP status (100..=599)"),
                            "e.g. expected_statuses = [200, 204]",
                        ),
                    }
                }
                (out.len() == list.len()).then_some(out)
            }
        };
        let interval = self.duration(
            &format!("{path}.interval"),
            "interval",
            raw.interval,
            DEFAULT_HC_INTERVAL,
            true,
        );
        let timeout = self.duration(
            &format!("{path}.timeout"),
            "timeout",
            raw.timeout,
            DEFAULT_HC_TIMEOUT,
            true,
        );
        let healthy_threshold = self.integer(
            &format!("{path}.healthy_threshold"),
            "healthy_threshold",
            raw.healthy_threshold,
            1,
            1000,
            DEFAULT_HC_HEALTHY,
        );
        let unhealthy_threshold = self.integer(
            &format!("{path}.unhealthy_threshold"),
            "unhealthy_threshold",
            raw.unhealthy_threshold,
            1,
            1000,
            DEFAULT_HC_UNHEALTHY,
        );
        if let (Some(i), Some(t)) = (interval, timeout)
            && t > i
        {
            self.error(
                format!("{path}.timeout"),
                format!(
                    "timeout ({}) is longer than interval ({})",
                    crate::duration::format_duration(t),
                    crate::duration::format_duration(i)
                ),
                "a check must end before the next one starts: lower timeout or raise interval",
            );
            return None;
        }
        Some(HealthCheck {
            kind: kind?,
            path: check_path?,
            host: host?,
            expected_statuses: expected_statuses?,
            interval: interval?,
            timeout: timeout?,
            healthy_threshold: healthy_threshold?,
            unhealthy_threshold: unhealthy_threshold?,
        })
    }

    pub(super) fn outlier_detection(
        &mut self,
        path: &str,
        raw: raw::OutlierDetection,
    ) -> Option<OutlierDetection> {
        let consecutive_5xx = self.integer(
            &format!("{path}.consecutive_5xx"),
            "consecutive_5xx",
            raw.consecutive_5xx,
            0,
            100_000,
            DEFAULT_OD_CONSECUTIVE,
        );
        let consecutive_gateway_failures = self.integer(
            &format!("{path}.consecutive_gateway_failures"),
            "consecutive_gateway_failures",
            raw.consecutive_gateway_failures,
            0,
            100_000,
            DEFAULT_OD_CONSECUTIVE,
        );
        let base_ejection_time = self.duration(
            &format!("{path}.base_ejection_time"),
            "base_ejection_time",
            raw.base_ejection_time,
            DEFAULT_OD_BASE_EJECTION,
            true,
        );
        let max_ejection_time = self.duration(
            &format!("{path}.max_ejection_time"),
            "max_ejection_time",
            raw.max_ejection_time,
            DEFAULT_OD_MAX_EJECTION,
            true,
        );
        let max_ejection_percent = self.integer(
            &format!("{path}.max_ejection_percent"),
            "max_ejection_percent",
            raw.max_ejection_percent,
            0,
            100,
            DEFAULT_OD_MAX_PERCENT,
        );
        let interval = self.duration(
            &format!("{path}.interval"),
            "interval",
            raw.interval,
            DEFAULT_OD_INTERVAL,
            true,
        );
        if consecutive_5xx == Some(0) && consecutive_gateway_failures == Some(0) {
            self.error(
                path,
                "outlier detection with consecutive_5xx = 0 and consecutive_gateway_failures = 0 \
                 never ejects",
                "set one of them above 0, or remove [clusters.outlier_detection]",
            );
            return None;
        }
        if let (Some(base), Some(max)) = (base_ejection_time, max_ejection_time)
            && max < base
        {
            self.error(
                format!("{path}.max_ejection_time"),
                "max_ejection_time is shorter than base_ejection_time",
                "raise max_ejection_time to at least base_ejection_time",
            );
            return None;
        }
        Some(OutlierDetection {
            consecutive_5xx: consecutive_5xx?,
            consecutive_gateway_failures: consecutive_gateway_failures?,
            base_ejection_time: base_ejection_time?,
            max_ejection_time: max_ejection_time?,
            max_ejection_percent: max_ejection_percent?,
            interval: interval?,
        })
    }

    /// Header hashing needs an HTTP request: a cluster hashed on a header cannot serve a TCP
    /// route, and the clusters of one route hash on one header at most (the request's header
    /// is read once, before the cluster is picked).
    pub(super) fn route_hashing(
        &mut self,
        listeners: &[Option<Listener>],
        routes: &[Option<Route>],
        clusters: &[Option<Cluster>],
    ) {
        for (index, route) in routes.iter().enumerate() {
            let Some(route) = route else { continue };
            let RouteAction::Forward { clusters: targets } = &route.action else {
                continue;
            };
            let http = listeners
                .get(route.listener_index)
                .and_then(Option::as_ref)
                .is_none_or(|l| matches!(l.protocol, Protocol::Http | Protocol::Https));
            let mut header: Option<&str> = None;
            for target in targets {
                let Some(Some(cluster)) = clusters.get(target.cluster_index) else {
                    continue;
                };
                let Some(HashOn::Header(name)) = &cluster.hash_on else {
                    continue;
                };
                if !http {
                    self.error(
                        format!("routes[{index}]"),
                        format!(
                            "cluster \"{}\" hashes on header {name}, but route \"{}\" is on a \
                             non-HTTP listener",
                            cluster.name, route.name
                        ),
                        "TCP and TLS routes can hash on \"source_ip\" or \"peer_identity\"; \
                         use another cluster for this route",
                    );
                } else if let Some(first) = header
                    && first != name
                {
                    self.error(
                        format!("routes[{index}]"),
                        format!(
                            "the clusters of route \"{}\" hash on different headers ({first}, {name})",
                            route.name
                        ),
                        "hash the clusters of one route on the same header",
                    );
                } else {
                    header = Some(name);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::types::{Balance, HashOn, HealthCheckKind};

    const BASE: &str = r#"version = 1
[[listeners]]
name = "web"
address = "127.0.0.1:0"
protocol = "http"
[[listeners]]
name = "tcp"
address = "127.0.0.1:0"
protocol = "tcp"
[[routes]]
name = "web"
listener = "web"
cluster = "c"
[[routes]]
name = "tcp"
listener = "tcp"
cluster = "t"
[[clusters]]
name = "t"
endpoints = ["127.0.0.1:9"]
[[clusters]]
name = "c"
"#;

    fn parse(extra: &str) -> Result<crate::Config, crate::LoadError> {
        crate::parse(&format!("{BASE}{extra}"), "lb.toml")
    }

    fn error_paths(extra: &str) -> Vec<String> {
        let err = parse(extra).expect_err("invalid");
        for e in &err.errors {
            assert!(e.hint.as_deref().is_some_and(|h| !h.is_empty()), "{e}");
        }
        err.errors.iter().map(|e| e.path.clone()).collect()
    }

    #[test]
    fn plain_and_weighted_endpoints_mix() {
        let config = parse(
            "endpoints = [\"127.0.0.1:8001\", { address = \"127.0.0.1:8002\", weight = 3 }]\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let c = &config.clusters[1];
        assert_eq!(c.endpoint_weights, [1, 3]);
        assert_eq!(c.endpoints[1].port(), 8002);
        assert!(c.weighted());
        assert_eq!(c.balance, Balance::RoundRobin);
    }

    #[test]
    fn bad_endpoint_entries_name_their_field() {
        let paths = error_paths(
            "endpoints = [{ address = \"127.0.0.1:8001\", weight = 0 }, { weight = 2 }]\n",
        );
        assert_eq!(
            paths,
            [
                "clusters[1].endpoints[0].weight",
                "clusters[1].endpoints[1].address"
            ]
        );
        let paths = error_paths(
            "endpoints = [\"127.0.0.1:8001\", { address = \"127.0.0.1:8003\", wieght = 2 }]\n",
        );
        assert_eq!(paths, ["clusters[1].endpoints[1]"]);
    }

    #[test]
    fn maglev_needs_hash_on_and_hash_on_needs_maglev() {
        assert_eq!(
            error_paths("endpoints = [\"127.0.0.1:1\"]\nbalance = \"maglev\"\n"),
            ["clusters[1].hash_on"]
        );
        assert_eq!(
            error_paths("endpoints = [\"127.0.0.1:1\"]\nhash_on = \"source_ip\"\n"),
            ["clusters[1].hash_on"]
        );
        assert_eq!(
            error_paths("endpoints = [\"127.0.0.1:1\"]\nbalance = \"least_requests\"\n"),
            ["clusters[1].balance"]
        );
        let c = parse(
            "endpoints = [\"127.0.0.1:1\"]\nbalance = \"maglev\"\nhash_on = { header = \"X-User\" }\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.clusters[1].hash_on, Some(HashOn::Header("x-user".into())));
        let c = parse("endpoints = [\"127.0.0.1:1\"]\nbalance = \"least_request\"\n")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.clusters[1].balance, Balance::LeastRequest);
    }

    #[test]
    fn header_hashing_is_refused_on_tcp_routes() {
        let text = format!(
            "{}\nbalance = \"maglev\"\nhash_on = {{ header = \"x-user\" }}\n[[clusters]]\nname = \"c\"\nendpoints = [\"127.0.0.1:2\"]\n",
            BASE.replace("[[clusters]]\nname = \"c\"\n", "")
        );
        let err = crate::parse(&text, "lb.toml").expect_err("invalid");
        assert_eq!(err.errors.len(), 1, "{err}");
        assert_eq!(err.errors[0].path, "routes[1]");
    }

    #[test]
    fn health_check_defaults_and_errors() {
        let c = parse("endpoints = [\"127.0.0.1:1\"]\n[clusters.health_check]\n")
            .unwrap_or_else(|e| panic!("{e}"));
        let hc = c.clusters[1].health_check.as_ref().expect("hc");
        assert_eq!(hc.kind, HealthCheckKind::Tcp);
        assert_eq!(hc.interval, Duration::from_secs(5));
        let c = parse("endpoints = [\"127.0.0.1:1\"]\n[clusters.health_check]\npath = \"/hz\"\n")
            .unwrap_or_else(|e| panic!("{e}"));
        let hc = c.clusters[1].health_check.as_ref().expect("hc");
        assert_eq!(hc.kind, HealthCheckKind::Http);
        assert_eq!(hc.expected_statuses, [200]);
        let paths = error_paths(
            "endpoints = [\"127.0.0.1:1\"]\n[clusters.health_check]\nkind = \"tcp\"\npath = \"/x\"\n\
             interval = \"1s\"\ntimeout = \"2s\"\nexpected_statuses = [700]\n",
        );
        assert!(
            paths.contains(&"clusters[1].health_check.kind".to_owned()),
            "{paths:?}"
        );
        assert!(
            paths.contains(&"clusters[1].health_check.expected_statuses[0]".to_owned()),
            "{paths:?}"
        );
        let paths = error_paths(
            "endpoints = [\"127.0.0.1:1\"]\n[clusters.outlier_detection]\nconsecutive_5xx = 0\n\
             consecutive_gateway_failures = 0\n",
        );
        assert_eq!(paths, ["clusters[1].outlier_detection"]);
    }
}
