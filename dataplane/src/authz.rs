//! `authz::check`: who may call what, from the listener's `[[policies]]`.
//!
//! Where it sits: HTTP requests are checked in `proxy::http` after the path is normalised and
//! before routing (so a policy sees the same path a route does, and a refused request never
//! reaches an upstream); connections of L4 listeners are checked in `proxy::tcp` after the TLS
//! handshake (or the ClientHello peek) and before an upstream is chosen.
//!
//! Decision (Istio's AuthorizationPolicy): a matching `deny` policy refuses; otherwise, if the
//! listener has `allow` policies, one must match; otherwise the call gets through. `audit`
//! policies log the calls they match and never change the decision.
//!
//! Compiled once per config generation and shard; a listener without policies has no
//! [`ListenerPolicies`] at all, so calls through it pay one `Option` test.

use std::net::SocketAddr;
use std::sync::Arc;

use meshgate_config::{Config, PolicyAction, RouteMatch};

use crate::http_route::{Matcher, RequestView};
use crate::metrics::{Counter, ShardStats};
use crate::tls::spiffe::SpiffeId;

/// The `policy` label of refusals that no `allow` policy matched.
pub const NO_ALLOW_MATCHED: &str = "-";

/// The compiled policies of one listener.
#[derive(Debug)]
pub struct ListenerPolicies {
    listener: Arc<str>,
    deny: Box<[Policy]>,
    allow: Box<[Policy]>,
    audit: Box<[Policy]>,
    /// Refusals because the listener has `allow` policies and none matched.
    no_allow: Arc<Counter>,
}

#[derive(Debug)]
struct Policy {
    name: Arc<str>,
    /// HTTP listeners: each rule compiled like a route match.
    http_rules: Box<[Matcher]>,
    /// L4 listeners: the rules as written (only `sni` and `peer` can be set there).
    conn_rules: Box<[RouteMatch]>,
    /// Refusals by this policy (`deny` policies).
    denied: Arc<Counter>,
}

/// Why a call was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Denied<'a> {
    /// The `deny` policy that matched; `None`: no `allow` policy matched.
    pub policy: Option<&'a str>,
}

impl Denied<'_> {
    /// Envoy's response code details for an RBAC refusal.
    pub fn details(&self) -> String {
        format!(
            "rbac_access_denied_matched_policy[{}]",
            self.policy.unwrap_or("none")
        )
    }
}

/// Body of a refused HTTP request (Envoy's, so clients and runbooks recognise it).
pub const DENIED_BODY: &[u8] = b"RBAC: access denied";

/// What the audit log says about the call besides the policy and the decision.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    pub client: SocketAddr,
    pub peer: Option<&'a SpiffeId>,
    pub sni: Option<&'a str>,
}

impl ListenerPolicies {
    /// The policies of listener `index` of `config`; `None` when it has none.
    pub fn compile(
        config: &Config,
        index: usize,
        http: bool,
        stats: &ShardStats,
    ) -> Option<ListenerPolicies> {
        let listener: Arc<str> = Arc::from(config.listeners.get(index)?.name.as_str());
        let mut out = ListenerPolicies {
            no_allow: stats.authz_denied(&listener, NO_ALLOW_MATCHED),
            listener,
            deny: Box::default(),
            allow: Box::default(),
            audit: Box::default(),
        };
        let (mut deny, mut allow, mut audit) = (Vec::new(), Vec::new(), Vec::new());
        for p in config.policies.iter().filter(|p| p.listener_index == index) {
            let compiled = Policy {
                name: Arc::from(p.name.as_str()),
                http_rules: if http {
                    p.rules
                        .iter()
                        .map(|r| Matcher::new(Some(r), &p.name))
                        .collect()
                } else {
                    Box::default()
                },
                conn_rules: if http {
                    Box::default()
                } else {
                    p.rules.clone().into_boxed_slice()
                },
                denied: stats.authz_denied(&out.listener, &p.name),
            };
            match p.action {
                PolicyAction::Deny => deny.push(compiled),
                PolicyAction::Allow => allow.push(compiled),
                PolicyAction::Audit => audit.push(compiled),
            }
        }
        if deny.is_empty() && allow.is_empty() && audit.is_empty() {
            return None;
        }
        out.deny = deny.into_boxed_slice();
        out.allow = allow.into_boxed_slice();
        out.audit = audit.into_boxed_slice();
        Some(out)
    }

    /// The decision on one HTTP request (`req` carries the normalised path).
    pub fn check_request(
        &self,
        req: &RequestView<'_>,
        client: SocketAddr,
    ) -> Result<(), Denied<'_>> {
        let decision = self.decide(|p| p.http_rules.iter().any(|m| m.matches(req)));
        if !self.audit.is_empty() {
            for p in self.audit.iter() {
                if p.http_rules.iter().any(|m| m.matches(req)) {
                    tracing::info!(
                        target: "meshgate::audit",
                        policy = %p.name,
                        listener = %self.listener,
                        decision = if decision.is_ok() { "allow" } else { "deny" },
                        peer = req.peer.map(|id| id.as_str()).unwrap_or("-"),
                        client = %client,
                        method = req.method,
                        host = req.host.unwrap_or("-"),
                        path = req.path,
                        "audit"
                    );
                }
            }
        }
        decision
    }

    /// The decision on one connection of an L4 listener.
    pub fn check_connection(&self, caller: &Caller<'_>) -> Result<(), Denied<'_>> {
        let matches = |p: &Policy| {
            p.conn_rules
                .iter()
                .any(|r| r.matches(caller.sni, caller.peer))
        };
        let decision = self.decide(matches);
        for p in self.audit.iter().filter(|p| matches(p)) {
            tracing::info!(
                target: "meshgate::audit",
                policy = %p.name,
                listener = %self.listener,
                decision = if decision.is_ok() { "allow" } else { "deny" },
                peer = caller.peer.map(|id| id.as_str()).unwrap_or("-"),
                client = %caller.client,
                sni = caller.sni.unwrap_or("-"),
                "audit"
            );
        }
        decision
    }

    fn decide(&self, matches: impl Fn(&Policy) -> bool) -> Result<(), Denied<'_>> {
        if let Some(p) = self.deny.iter().find(|p| matches(p)) {
            p.denied.inc();
            return Err(Denied {
                policy: Some(&p.name),
            });
        }
        if !self.allow.is_empty() && !self.allow.iter().any(matches) {
            self.no_allow.inc();
            return Err(Denied { policy: None });
        }
        Ok(())
    }
}
