//! Config tests for `[[policies]]`: what validates, and the error (path, message, hint) for
//! each way to get one wrong.

use crate::{ConfigError, PolicyAction, parse};

/// An http listener, an mTLS tls listener, a plain tls listener and a tcp listener.
const BASE: &str = r#"version = 1

[[listeners]]
name = "web"
address = "127.0.0.1:0"
protocol = "http"

[[listeners]]
name = "plain"
address = "127.0.0.1:0"
protocol = "tcp"

[[routes]]
name = "web"
listener = "web"
cluster = "c"

[[routes]]
name = "plain"
listener = "plain"
cluster = "c"

[[clusters]]
name = "c"
endpoints = ["127.0.0.1:1"]
"#;

fn with(extra: &str) -> String {
    format!("{BASE}\n{extra}")
}

fn errors(text: &str) -> Vec<ConfigError> {
    match parse(text, "policy.toml") {
        Ok(config) => panic!("expected errors, got {:#?}", config.policies),
        Err(err) => {
            for error in &err.errors {
                assert!(
                    error.hint.as_deref().is_some_and(|h| !h.is_empty()),
                    "no hint: {error}"
                );
            }
            err.errors
        }
    }
}

/// The one error of `text`: at `path`, `needle` in its message or hint.
fn only_error(text: &str, path: &str, needle: &str) {
    let errors = errors(text);
    let all: String = errors.iter().map(|e| format!("{e}\n")).collect();
    assert_eq!(errors.len(), 1, "expected one error:\n{all}");
    assert_eq!(errors[0].path, path, "{all}");
    let e = &errors[0];
    assert!(
        e.message.contains(needle) || e.hint.as_deref().unwrap_or("").contains(needle),
        "expected {needle:?} in: {e}"
    );
}

#[test]
fn policies_validate_in_file_order() {
    let config = parse(
        &with(
            r#"
[[policies]]
name = "deny-admin"
listener = "web"
action = "deny"
[[policies.rules]]
path = { prefix = "/admin/" }
methods = ["POST"]
[[policies.rules]]
headers = [{ name = "x-evil", present = true }]

[[policies]]
name = "deny-all-plain"
listener = "plain"
action = "deny"
rules = [{}]

[[policies]]
name = "audit"
listener = "web"
action = "audit"
rules = [{ hosts = ["*.example.test"] }]
"#,
        ),
        "policy.toml",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<_> = config.policies.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["deny-admin", "deny-all-plain", "audit"]);
    let p = &config.policies[0];
    assert_eq!(
        (p.action, p.listener_index, p.rules.len()),
        (PolicyAction::Deny, 0, 2)
    );
    assert_eq!(p.rules[0].methods, ["POST"]);
    assert_eq!(config.policies[1].listener_index, 1);
    assert!(config.policies[1].rules[0].hosts.is_empty());
    assert_eq!(config.policies[2].action, PolicyAction::Audit);
}

#[test]
fn each_mistake_names_its_field_and_the_fix() {
    only_error(
        &with(
            "[[policies]]\nname = \"p\"\nlistener = \"nope\"\naction = \"allow\"\nrules = [{}]\n",
        ),
        "policies[0].listener",
        "listeners defined",
    );
    only_error(
        &with(
            "[[policies]]\nname = \"p\"\nlistener = \"web\"\naction = \"permit\"\nrules = [{}]\n",
        ),
        "policies[0].action",
        "\"allow\"",
    );
    only_error(
        &with("[[policies]]\nname = \"p\"\nlistener = \"web\"\nrules = [{}]\n"),
        "policies[0].action",
        "missing",
    );
    only_error(
        &with("[[policies]]\nname = \"p\"\nlistener = \"web\"\naction = \"deny\"\n"),
        "policies[0].rules",
        "empty rule {} matches every call",
    );
    only_error(
        &with("[[policies]]\nname = \"p\"\nlistener = \"web\"\naction = \"deny\"\nrules = []\n"),
        "policies[0].rules",
        "could never match",
    );
    // A tcp listener has nothing to match on but everything.
    only_error(
        &with(
            "[[policies]]\nname = \"p\"\nlistener = \"plain\"\naction = \"deny\"\nrules = [{ sni = [\"a.test\"] }]\n",
        ),
        "policies[0].rules[0]",
        "empty rule {}",
    );
    // An http listener sees no client certificate.
    only_error(
        &with(
            "[[policies]]\nname = \"p\"\nlistener = \"web\"\naction = \"allow\"\nrules = [{ peer = { trust_domains = [\"a.test\"] } }]\n",
        ),
        "policies[0].rules[0].peer",
        "client certificates",
    );
    // Rules are checked like route matches: a bad method case is reported at its index.
    only_error(
        &with(
            "[[policies]]\nname = \"p\"\nlistener = \"web\"\naction = \"deny\"\n[[policies.rules]]\nmethods = [\"get\"]\n",
        ),
        "policies[0].rules[0].methods[0]",
        "GET",
    );
    // Unknown fields inside a rule are reported at their path.
    let errs = errors(&with(
        "[[policies]]\nname = \"p\"\nlistener = \"web\"\naction = \"deny\"\n[[policies.rules]]\nmethod = [\"GET\"]\n",
    ));
    assert!(
        errs.iter().any(|e| e.path == "policies[0].rules[0].method"
            && e.hint.as_deref().unwrap_or("").contains("methods")),
        "{errs:?}"
    );
    // Duplicate names.
    only_error(
        &with(
            "[[policies]]\nname = \"p\"\nlistener = \"web\"\naction = \"deny\"\nrules = [{}]\n[[policies]]\nname = \"p\"\nlistener = \"web\"\naction = \"deny\"\nrules = [{}]\n",
        ),
        "policies[1].name",
        "duplicate",
    );
}
