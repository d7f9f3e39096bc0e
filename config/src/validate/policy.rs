//! Validation of `[[policies]]`: who may call what through a listener.
//!
//! A rule has the shape of a `[routes.match]` and is checked by the same code against the
//! listener's protocol, so a rule that validates is one the listener can evaluate: HTTP parts
//! only on `http`/`https` listeners, `peer` only where a client certificate is verified, `sni`
//! only where TLS is seen.

use super::{BoundListener, Names, Validator};
use crate::raw;
use crate::types::{Policy, PolicyAction, RouteMatch};

const ACTIONS: [&str; 3] = ["allow", "deny", "audit"];

impl Validator {
    pub(super) fn policy(
        &mut self,
        index: usize,
        raw: raw::Policy,
        listeners: &Names,
        bound: &[BoundListener],
    ) -> Option<Policy> {
        let path = format!("policies[{index}]");
        let listener_index = self.listener_ref(
            &path,
            raw.listener.as_deref(),
            listeners,
            "this policy guards, e.g. listener = \"ingress\"",
        );
        let action = match raw.action.as_deref() {
            Some("allow") => Some(PolicyAction::Allow),
            Some("deny") => Some(PolicyAction::Deny),
            Some("audit") => Some(PolicyAction::Audit),
            Some(other) => {
                self.error(
                    format!("{path}.action"),
                    format!("unknown policy action \"{other}\""),
                    format!(
                        "use one of {}: allow lets only matching calls through, deny refuses \
                         matching calls, audit logs them",
                        super::quoted_list(&ACTIONS)
                    ),
                );
                None
            }
            None => {
                self.error(
                    format!("{path}.action"),
                    "missing `action`",
                    "set action = \"allow\" (only what the rules match gets through), \"deny\" \
                     (what they match is refused) or \"audit\" (what they match is logged)",
                );
                None
            }
        };
        let listener = listener_index.and_then(|i| bound.get(i));
        let rules = match raw.rules {
            None => {
                self.error(
                    format!("{path}.rules"),
                    "missing `rules`",
                    "add at least one [[policies.rules]] table, e.g. rules = [{ peer = { \
                     trust_domains = [\"example.test\"] } }]; an empty rule {} matches every call",
                );
                None
            }
            Some(list) if list.is_empty() => {
                self.error(
                    format!("{path}.rules"),
                    "`rules` is empty, so the policy could never match",
                    "add a rule; an empty rule {} matches every call",
                );
                None
            }
            Some(list) => {
                let mut out = Vec::with_capacity(list.len());
                let mut ok = true;
                for (i, rule) in list.into_iter().enumerate() {
                    match self.policy_rule(&format!("{path}.rules[{i}]"), rule, listener) {
                        Some(r) => out.push(r),
                        None => ok = false,
                    }
                }
                ok.then_some(out)
            }
        };
        Some(Policy {
            name: raw.name?,
            listener: raw.listener?,
            listener_index: listener_index?,
            action: action?,
            rules: rules?,
        })
    }

    fn policy_rule(
        &mut self,
        path: &str,
        raw: raw::RouteMatch,
        listener: Option<&BoundListener>,
    ) -> Option<RouteMatch> {
        let empty = raw.sni.is_none()
            && raw.peer.is_none()
            && raw.hosts.is_none()
            && raw.path.is_none()
            && raw.methods.is_none()
            && raw.headers.is_none()
            && raw.query.is_none();
        if empty {
            return Some(RouteMatch {
                sni: Vec::new(),
                peer: None,
                hosts: Vec::new(),
                path: None,
                methods: Vec::new(),
                headers: Vec::new(),
                query: Vec::new(),
            });
        }
        if listener.is_some_and(|l| l.tcp) {
            self.error(
                path,
                "a tcp listener knows nothing about its callers to match on",
                "use an empty rule {} (it matches every connection), or guard a tls listener \
                 (match on sni and peer) or an http/https listener (also hosts, path, methods, \
                 headers)",
            );
            return None;
        }
        self.route_match(path, raw, listener)
    }
}
