//! `[routes.retry]`, `[clusters.circuit_breakers]` and `[clusters.retry_budget]`.

use std::time::Duration;

use super::Validator;
use crate::duration::format_duration;
use crate::load::nearest;
use crate::raw;
use crate::types::{CircuitBreakers, RetryBudget, RetryOn, RetryPolicy};

/// Total tries allowed on a route (the first one included).
pub(crate) const MAX_RETRY_ATTEMPTS: u32 = 10;
/// Without `[routes.retry]`: one retry, as the gateway always did (and as Envoy's `num_retries`
/// default of 1).
pub(crate) const DEFAULT_RETRY_ATTEMPTS: u32 = 2;
/// Envoy's backoff defaults.
pub(crate) const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(25);
pub(crate) const DEFAULT_BACKOFF_MAX: Duration = Duration::from_millis(250);

impl RetryPolicy {
    /// The policy of a forward route without `[routes.retry]`.
    pub fn default_policy() -> RetryPolicy {
        RetryPolicy {
            attempts: DEFAULT_RETRY_ATTEMPTS,
            on: vec![RetryOn::ConnectFailure, RetryOn::Reset],
            status_codes: Vec::new(),
            per_try_timeout: None,
            backoff_base: DEFAULT_BACKOFF_BASE,
            backoff_max: DEFAULT_BACKOFF_MAX,
        }
    }
}

impl Validator {
    /// `path` is the `retry` table's own path (`routes[3].retry`).
    pub(super) fn route_retry(
        &mut self,
        path: &str,
        raw: raw::RouteRetry,
        route_timeout: Option<Duration>,
    ) -> Option<RetryPolicy> {
        let default = RetryPolicy::default_policy();
        let attempts = self.integer(
            &format!("{path}.attempts"),
            "attempts",
            raw.attempts,
            1,
            MAX_RETRY_ATTEMPTS,
            DEFAULT_RETRY_ATTEMPTS,
        );
        let on = match raw.on {
            None => Some(default.on.clone()),
            Some(list) => self.retry_on(&format!("{path}.on"), &list),
        };
        let status_codes = self.status_codes(path, raw.status_codes, on.as_deref());
        let per_try_timeout = match raw.per_try_timeout {
            None => Some(None),
            Some(d) => self
                .duration(
                    &format!("{path}.per_try_timeout"),
                    "per_try_timeout",
                    Some(d),
                    Duration::from_secs(2),
                    true,
                )
                .map(Some),
        };
        if let (Some(Some(per_try)), Some(route)) = (per_try_timeout, route_timeout)
            && per_try >= route
        {
            self.error(
                format!("{path}.per_try_timeout"),
                format!(
                    "per_try_timeout {} is not shorter than the route's timeout {}, which \
                     covers all attempts: no retry could ever start",
                    format_duration(per_try),
                    format_duration(route)
                ),
                "make per_try_timeout shorter than timeout (e.g. a third of it), or raise the \
                 route's timeout",
            );
        }
        let backoff_base = self.duration(
            &format!("{path}.backoff_base"),
            "backoff_base",
            raw.backoff_base,
            DEFAULT_BACKOFF_BASE,
            true,
        );
        let backoff_max = match (raw.backoff_max, backoff_base) {
            (None, Some(base)) => Some(DEFAULT_BACKOFF_MAX.max(base * 10)),
            (max, _) => self.duration(
                &format!("{path}.backoff_max"),
                "backoff_max",
                max,
                DEFAULT_BACKOFF_MAX,
                true,
            ),
        };
        if let (Some(base), Some(max)) = (backoff_base, backoff_max)
            && max < base
        {
            self.error(
                format!("{path}.backoff_max"),
                format!(
                    "backoff_max {} is shorter than backoff_base {}",
                    format_duration(max),
                    format_duration(base)
                ),
                "set backoff_max to at least backoff_base (Envoy's default is ten times it)",
            );
            return None;
        }
        Some(RetryPolicy {
            attempts: attempts?,
            on: on?,
            status_codes: status_codes?,
            per_try_timeout: per_try_timeout?,
            backoff_base: backoff_base?,
            backoff_max: backoff_max?,
        })
    }

    fn retry_on(&mut self, path: &str, list: &[String]) -> Option<Vec<RetryOn>> {
        let names: Vec<&str> = RetryOn::ALL.iter().map(|o| o.as_str()).collect();
        let mut out = Vec::with_capacity(list.len());
        let mut ok = true;
        for (index, text) in list.iter().enumerate() {
            match RetryOn::ALL.iter().find(|o| o.as_str() == text) {
                Some(on) if out.contains(on) => {
                    self.error(
                        format!("{path}[{index}]"),
                        format!("\"{text}\" is listed twice"),
                        "list each condition once; remove this entry",
                    );
                    ok = false;
                }
                Some(on) => out.push(*on),
                None => {
                    let mut hint = match nearest(text, &names) {
                        Some(near) => format!("did you mean \"{near}\"? "),
                        None => String::new(),
                    };
                    hint.push_str(&format!(
                        "allowed values: {}",
                        names
                            .iter()
                            .map(|n| format!("\"{n}\""))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                    self.error(
                        format!("{path}[{index}]"),
                        format!("unknown retry condition \"{text}\""),
                        hint,
                    );
                    ok = false;
                }
            }
        }
        ok.then_some(out)
    }

    fn status_codes(
        &mut self,
        path: &str,
        list: Option<Vec<i64>>,
        on: Option<&[RetryOn]>,
    ) -> Option<Vec<u16>> {
        let field = format!("{path}.status_codes");
        let wants = on.is_some_and(|on| on.contains(&RetryOn::RetriableStatusCodes));
        let Some(list) = list else {
            if wants {
                self.error(
                    field,
                    "`on` lists \"retriable-status-codes\" but `status_codes` is missing",
                    "list the statuses to retry, e.g. status_codes = [503, 429]",
                );
                return None;
            }
            return Some(Vec::new());
        };
        if on.is_some() && !wants {
            self.error(
                &field,
                "`status_codes` is set but `on` does not list \"retriable-status-codes\", so \
                 these statuses would never be retried",
                "add \"retriable-status-codes\" to on, or remove status_codes",
            );
            return None;
        }
        if list.is_empty() {
            self.error(
                &field,
                "`status_codes` is empty",
                "list the statuses to retry, e.g. status_codes = [503, 429]",
            );
            return None;
        }
        let mut out = Vec::with_capacity(list.len());
        let mut ok = true;
        for (index, code) in list.into_iter().enumerate() {
            match u16::try_from(code) {
                Ok(c) if (400..=599).contains(&c) => {
                    if !out.contains(&c) {
                        out.push(c);
                    }
                }
                _ => {
                    self.error(
                        format!("{field}[{index}]"),
                        format!(
                            "status {code} cannot be retried: a final response status is 200..=599"
                        ),
                        "e.g. status_codes = [503, 429]",
                    );
                    ok = false;
                }
            }
        }
        ok.then_some(out)
    }

    pub(super) fn circuit_breakers(
        &mut self,
        path: &str,
        raw: Option<raw::CircuitBreakers>,
    ) -> Option<CircuitBreakers> {
        let Some(raw) = raw else {
            return Some(CircuitBreakers::default());
        };
        let limit = |this: &mut Self, field: &str, value: Option<i64>| match value {
            None => Some(None),
            Some(v) => this
                .integer(
                    &format!("{path}.{field}"),
                    field,
                    Some(v),
                    1,
                    u32::MAX,
                    1024,
                )
                .map(Some),
        };
        let max_connections = limit(self, "max_connections", raw.max_connections);
        let max_pending_requests = limit(self, "max_pending_requests", raw.max_pending_requests);
        let max_requests = limit(self, "max_requests", raw.max_requests);
        Some(CircuitBreakers {
            max_connections: max_connections?,
            max_pending_requests: max_pending_requests?,
            max_requests: max_requests?,
        })
    }

    pub(super) fn retry_budget(
        &mut self,
        path: &str,
        raw: Option<raw::RetryBudget>,
    ) -> Option<RetryBudget> {
        let default = RetryBudget::default();
        let Some(raw) = raw else {
            return Some(default);
        };
        let budget_percent = self.integer(
            &format!("{path}.budget_percent"),
            "budget_percent",
            raw.budget_percent,
            0,
            100,
            default.budget_percent,
        );
        let min_retry_concurrency = self.integer(
            &format!("{path}.min_retry_concurrency"),
            "min_retry_concurrency",
            raw.min_retry_concurrency,
            0,
            u32::MAX,
            default.min_retry_concurrency,
        );
        Some(RetryBudget {
            budget_percent: budget_percent?,
            min_retry_concurrency: min_retry_concurrency?,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::parse;

    fn config(retry: &str, cluster: &str) -> String {
        format!(
            r#"version = 1
[[listeners]]
name = "web"
address = "127.0.0.1:0"
protocol = "http"
[[routes]]
name = "r"
listener = "web"
cluster = "c"
timeout = "5s"
{retry}
[[clusters]]
name = "c"
endpoints = ["127.0.0.1:1"]
{cluster}
"#
        )
    }

    fn errors(text: &str) -> Vec<String> {
        match parse(text, "test.toml") {
            Ok(_) => Vec::new(),
            Err(e) => e.errors.iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn defaults_keep_one_retry_on_connect_failure_and_reset() {
        let c = parse(&config("", ""), "test.toml").unwrap_or_else(|e| panic!("{e}"));
        let retry = &c.routes[0].http.as_ref().expect("http route").retry;
        assert_eq!(retry.attempts, 2);
        assert_eq!(retry.on.len(), 2);
        assert_eq!(c.clusters[0].retry_budget.budget_percent, 20);
        assert!(!c.clusters[0].circuit_breakers.any());
    }

    #[test]
    fn a_full_policy_parses() {
        let text = config(
            "[routes.retry]\nattempts = 3\non = [\"5xx\", \"retriable-status-codes\"]\n\
             status_codes = [429]\nper_try_timeout = \"1s\"\nbackoff_base = \"10ms\"",
            "[clusters.circuit_breakers]\nmax_requests = 7\n[clusters.retry_budget]\n\
             budget_percent = 50\nmin_retry_concurrency = 1",
        );
        let c = parse(&text, "test.toml").unwrap_or_else(|e| panic!("{e}"));
        let retry = &c.routes[0].http.as_ref().expect("http route").retry;
        assert_eq!(retry.attempts, 3);
        assert_eq!(retry.status_codes, [429]);
        assert_eq!(retry.backoff_max, std::time::Duration::from_millis(250));
        assert_eq!(c.clusters[0].circuit_breakers.max_requests, Some(7));
        assert_eq!(c.clusters[0].retry_budget.min_retry_concurrency, 1);
    }

    #[test]
    fn mistakes_name_the_field_and_the_fix() {
        let e = errors(&config(
            "[routes.retry]\nattempts = 0\non = [\"5xxx\", \"reset\", \"reset\"]\n\
             per_try_timeout = \"5s\"\nbackoff_base = \"1s\"\nbackoff_max = \"100ms\"",
            "[clusters.circuit_breakers]\nmax_requests = 0\n[clusters.retry_budget]\n\
             budget_percent = 101",
        ));
        let all = e.join("\n");
        for want in [
            "routes[0].retry.attempts",
            "routes[0].retry.on[0]",
            "did you mean \"5xx\"",
            "routes[0].retry.on[2]",
            "routes[0].retry.per_try_timeout",
            "routes[0].retry.backoff_max",
            "clusters[0].circuit_breakers.max_requests",
            "clusters[0].retry_budget.budget_percent",
        ] {
            assert!(all.contains(want), "missing {want:?} in:\n{all}");
        }
        let e = errors(&config(
            "[routes.retry]\non = [\"retriable-status-codes\"]",
            "",
        ));
        assert!(e.iter().any(|e| e.contains("status_codes")), "{e:?}");
        let e = errors(&config(
            "[routes.retry]\non = [\"5xx\"]\nstatus_codes = [503]",
            "",
        ));
        assert!(
            e.iter().any(|e| e.contains("retriable-status-codes")),
            "{e:?}"
        );
    }

    #[test]
    fn retry_on_a_tcp_route_is_refused() {
        let text = config("[routes.retry]\nattempts = 3", "")
            .replace("protocol = \"http\"", "protocol = \"tcp\"")
            .replace("timeout = \"5s\"\n", "");
        let e = errors(&text);
        assert!(e.iter().any(|e| e.contains("routes[0].retry")), "{e:?}");
    }
}
