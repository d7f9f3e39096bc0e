//! Config tests for `http` listeners: `[listeners.http]`, HTTP route matches, answering actions,
//! header edits, rewrites and timeouts, and the errors for each of them.

use std::path::Path;
use std::time::Duration;

use crate::{
    ConfigError, HeaderMatch, HeaderOps, HeaderValueMatch, ListenerHttp, PathMatch, Protocol,
    RouteAction, load, parse,
};

/// An http listener with a route of every kind.
const HTTP: &str = r#"version = 1

[[listeners]]
name = "web"
address = "127.0.0.1:0"
protocol = "http"

[listeners.http]
max_request_head = 8192
request_timeout = "5s"

[[routes]]
name = "healthz"
listener = "web"
match = { path = { exact = "/healthz" } }
direct_response = { status = 200, body = "ok\n" }

[[routes]]
name = "moved"
listener = "web"
match = { hosts = ["Old.Example.test"] }
redirect = { location = "https://new.example.test/" }

[[routes]]
name = "api"
listener = "web"
match = { hosts = ["api.example.test", "*.apps.example.test", "10.0.0.1"], path = { prefix = "/api/" }, methods = ["GET", "POST"], headers = [{ name = "X-Canary", exact = "1" }, { name = "x-env", regex = "^(dev|test)$" }, { name = "x-debug", present = false }] }
cluster = "api"
prefix_rewrite = "/"
host_rewrite = "API.internal:8080"
timeout = "2s"
request_headers = { add = { X-Env = "prod" }, set = { x-team = "web" }, remove = ["X-Debug"] }
response_headers = { remove = ["server"] }

[[routes]]
name = "versioned"
listener = "web"
match = { path = { regex = "^/v[0-9]+/" } }
weighted_clusters = [{ cluster = "api", weight = 98 }, { cluster = "canary", weight = 2 }]

[[routes]]
name = "rest"
listener = "web"
cluster = "api"

[[clusters]]
name = "api"
endpoints = ["127.0.0.1:15002"]

[[clusters]]
name = "canary"
endpoints = ["127.0.0.1:15003"]
"#;

fn valid(text: &str) -> crate::Config {
    parse(text, "http.toml").unwrap_or_else(|err| panic!("expected a valid config:\n{err}"))
}

fn errors(text: &str) -> Vec<ConfigError> {
    match parse(text, "http.toml") {
        Ok(config) => panic!("expected errors, got {config:#?}"),
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

fn dump(errors: &[ConfigError]) -> String {
    errors.iter().map(|e| format!("{e}\n")).collect()
}

/// The one error of `text`: at `path`, its message containing `needle`.
fn only_error(text: &str, path: &str, needle: &str) -> ConfigError {
    let errors = errors(text);
    assert_eq!(errors.len(), 1, "expected one error:\n{}", dump(&errors));
    let error = errors[0].clone();
    assert_eq!(error.path, path, "{error}");
    assert!(
        error.message.contains(needle) || error.hint.as_deref().unwrap_or("").contains(needle),
        "expected {needle:?} in: {error}"
    );
    error
}

#[test]
fn full_http_config_validates() {
    let config = valid(HTTP);
    let listener = &config.listeners[0];
    assert_eq!(listener.protocol, Protocol::Http);
    assert_eq!(listener.routes, [0, 1, 2, 3, 4]);
    assert_eq!(
        listener.http,
        Some(ListenerHttp {
            max_request_head: 8192,
            request_timeout: Duration::from_secs(5),
        })
    );
    assert_eq!(
        config.routes[0].action,
        RouteAction::DirectResponse {
            status: 200,
            body: "ok\n".into()
        }
    );
    assert_eq!(
        config.routes[1].action,
        RouteAction::Redirect {
            location: "https://new.example.test/".into(),
            status: 302
        }
    );
    let moved = config.routes[1].matcher.as_ref().map(|m| m.hosts.clone());
    assert_eq!(moved, Some(vec!["old.example.test".to_owned()]));
    let api = &config.routes[2];
    let matcher = api.matcher.as_ref().unwrap_or_else(|| panic!("api match"));
    assert_eq!(
        matcher.hosts,
        ["api.example.test", "*.apps.example.test", "10.0.0.1"]
    );
    assert_eq!(matcher.path, Some(PathMatch::Prefix("/api/".into())));
    assert_eq!(matcher.methods, ["GET", "POST"]);
    assert_eq!(
        matcher.headers,
        [
            HeaderMatch {
                name: "x-canary".into(),
                value: HeaderValueMatch::Exact("1".into())
            },
            HeaderMatch {
                name: "x-env".into(),
                value: HeaderValueMatch::Regex("^(dev|test)$".into())
            },
            HeaderMatch {
                name: "x-debug".into(),
                value: HeaderValueMatch::Present(false)
            },
        ]
    );
    let http = api.http.as_ref().unwrap_or_else(|| panic!("api http"));
    assert_eq!(
        http.request_headers,
        HeaderOps {
            add: vec![("x-env".into(), "prod".into())],
            set: vec![("x-team".into(), "web".into())],
            remove: vec!["x-debug".into()],
        }
    );
    assert_eq!(http.response_headers.remove, ["server"]);
    assert_eq!(http.prefix_rewrite.as_deref(), Some("/"));
    assert_eq!(http.host_rewrite.as_deref(), Some("api.internal:8080"));
    assert_eq!(http.timeout, Duration::from_secs(2));
    // Defaults.
    let rest = config.routes[4]
        .http
        .as_ref()
        .unwrap_or_else(|| panic!("rest http"));
    assert_eq!(rest.timeout, Duration::from_secs(15));
    assert!(rest.request_headers.is_empty());
    let json = serde_json::to_value(&config).unwrap_or_default();
    assert_eq!(json["listeners"][0]["protocol"], "http");
    assert_eq!(json["listeners"][0]["http"]["request_timeout"], "5s");
    assert_eq!(
        json["routes"][2]["match"]["path"]["prefix"], "/api/",
        "{json}"
    );
    assert_eq!(
        json["routes"][2]["match"]["headers"][0]["exact"], "1",
        "{json}"
    );
    assert_eq!(
        json["routes"][0]["action"]["direct_response"]["status"],
        200
    );
}

#[test]
fn http_listener_defaults() {
    let config = valid(&HTTP.replace(
        "[listeners.http]\nmax_request_head = 8192\nrequest_timeout = \"5s\"\n",
        "",
    ));
    assert_eq!(
        config.listeners[0].http,
        Some(ListenerHttp {
            max_request_head: 65536,
            request_timeout: Duration::from_secs(30),
        })
    );
    // Non-http listeners and their routes carry no HTTP settings.
    let tcp = valid(
        "version = 1\n[[listeners]]\nname = \"l\"\naddress = \"127.0.0.1:0\"\nprotocol = \"tcp\"\n\
         [[routes]]\nname = \"r\"\nlistener = \"l\"\ncluster = \"c\"\n[[clusters]]\nname = \"c\"\n\
         endpoints = [\"127.0.0.1:1\"]\n",
    );
    assert_eq!(tcp.listeners[0].http, None);
    assert_eq!(tcp.routes[0].http, None);
}

#[test]
fn the_http_gateway_example() {
    let examples = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/examples"));
    // The HTTPS listener reads the certificates of certs/make.sh.
    let tmp = tempfile::tempdir().unwrap_or_else(|err| panic!("tempdir: {err}"));
    let status = std::process::Command::new("sh")
        .arg(examples.join("certs/make.sh"))
        .arg(tmp.path().join("certs"))
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap_or_else(|err| panic!("run make.sh: {err}"));
    assert!(status.success(), "make.sh failed (is openssl installed?)");
    let path = tmp.path().join("http-gateway.toml");
    std::fs::copy(examples.join("http-gateway.toml"), &path)
        .unwrap_or_else(|err| panic!("copy: {err}"));
    let config = load(&path).unwrap_or_else(|err| panic!("{err}"));
    let https = config
        .listener("https-in")
        .unwrap_or_else(|| panic!("https-in"));
    assert_eq!(https.address.to_string(), "127.0.0.1:15443");
    assert_eq!(https.protocol, Protocol::Https);
    let tls = https.tls.as_ref().unwrap_or_else(|| panic!("tls"));
    assert_eq!(tls.client_auth, crate::ClientAuth::Required);
    assert_eq!(tls.alpn, ["h2", "http/1.1"]);
    let listener = config
        .listener("http-in")
        .unwrap_or_else(|| panic!("http-in"));
    assert_eq!(listener.address.to_string(), "127.0.0.1:15080");
    assert_eq!(listener.protocol, Protocol::Http);
    assert_eq!(
        config.admin.address.map(|a| a.to_string()).as_deref(),
        Some("127.0.0.1:15000")
    );
    let healthz = config.route("healthz").unwrap_or_else(|| panic!("healthz"));
    assert!(matches!(
        healthz.action,
        RouteAction::DirectResponse { status: 200, .. }
    ));
    let split = config.route("split").unwrap_or_else(|| panic!("split"));
    let RouteAction::Forward { clusters } = &split.action else {
        panic!("split forwards");
    };
    let weights: Vec<(&str, u32)> = clusters
        .iter()
        .map(|c| (c.cluster.as_str(), c.weight))
        .collect();
    assert_eq!(weights, [("stable", 98), ("canary", 2)]);
    let endpoints: Vec<String> = config
        .clusters
        .iter()
        .map(|c| format!("{}={}", c.name, c.endpoints[0]))
        .collect();
    assert_eq!(
        endpoints,
        ["stable=127.0.0.1:15002", "canary=127.0.0.1:15003"]
    );
}

#[test]
fn listener_http_table_errors() {
    only_error(
        &HTTP.replace("max_request_head = 8192", "max_request_head = 100"),
        "listeners[0].http.max_request_head",
        "between 1024 and 1048576",
    );
    only_error(
        &HTTP.replace("request_timeout = \"5s\"", "request_timeout = \"0s\""),
        "listeners[0].http.request_timeout",
        "greater than 0",
    );
    let unknown = only_error(
        &HTTP.replace("request_timeout = \"5s\"", "request_timeot = \"5s\""),
        "listeners[0].http.request_timeot",
        "did you mean `request_timeout`?",
    );
    assert_eq!(unknown.line, Some(10));
    // [listeners.http] on a tcp listener.
    let tcp = "version = 1\n[[listeners]]\nname = \"l\"\naddress = \"127.0.0.1:0\"\nprotocol = \
               \"tcp\"\nhttp = { request_timeout = \"5s\" }\n[[routes]]\nname = \"r\"\nlistener = \
               \"l\"\ncluster = \"c\"\n[[clusters]]\nname = \"c\"\nendpoints = [\"127.0.0.1:1\"]\n";
    only_error(tcp, "listeners[0].http", "does not speak HTTP");
    only_error(
        &HTTP.replace(
            "protocol = \"http\"",
            "protocol = \"http\"\nhandshake_timeout = \"1s\"",
        ),
        "listeners[0].handshake_timeout",
        "no TLS handshake",
    );
}

#[test]
fn match_errors() {
    let cases: [(&str, &str, &str, &str); 12] = [
        (
            "path = { prefix = \"/api/\" }",
            "path = { prefix = \"/api/\", exact = \"/x\" }",
            "routes[2].match.path",
            "more than one",
        ),
        (
            "path = { prefix = \"/api/\" }",
            "path = { prefix = \"api\" }",
            "routes[2].match.path.prefix",
            "does not start with '/'",
        ),
        (
            "path = { prefix = \"/api/\" }",
            "path = { prefix = \"/a//b\" }",
            "routes[2].match.path.prefix",
            "normalised",
        ),
        (
            "regex = \"^/v[0-9]+/\"",
            "regex = \"^/v[0-9+/\"",
            "routes[3].match.path.regex",
            "unclosed character class",
        ),
        (
            "regex = \"^(dev|test)$\"",
            "regex = \"^(dev|test$\"",
            "routes[2].match.headers[1].regex",
            "invalid regular expression",
        ),
        (
            "methods = [\"GET\", \"POST\"]",
            "methods = [\"GET\", \"post\"]",
            "routes[2].match.methods[1]",
            "did you mean \"POST\"?",
        ),
        (
            "{ name = \"x-debug\", present = false }",
            "{ name = \"x-debug\" }",
            "routes[2].match.headers[2].exact",
            "says nothing about the value",
        ),
        (
            "{ name = \"x-debug\", present = false }",
            "{ name = \"host\", present = true }",
            "routes[2].match.headers[2].name",
            "hosts",
        ),
        (
            "{ name = \"x-debug\", present = false }",
            "{ name = \"x debug\", present = true }",
            "routes[2].match.headers[2].name",
            "invalid header field name",
        ),
        (
            "hosts = [\"Old.Example.test\"]",
            "hosts = [\"old.example.test:80\"]",
            "routes[1].match.hosts[0]",
            "without a port",
        ),
        (
            "hosts = [\"Old.Example.test\"]",
            "sni = [\"old.example.test\"]",
            "routes[1].match.sni",
            "no SNI",
        ),
        (
            "match = { hosts = [\"Old.Example.test\"] }",
            "match = { hosts = [\"old.example.test\"], peer = { trust_domains = [\"example.test\"] } }",
            "routes[1].match.peer",
            "client certificates",
        ),
    ];
    for (from, to, path, needle) in cases {
        assert!(HTTP.contains(from), "{from}");
        only_error(&HTTP.replace(from, to), path, needle);
    }
    // A misspelt field deep in the match is reported where it is, with the fix (and the path
    // match, left empty, says so too).
    let found = errors(&HTTP.replace(
        "path = { exact = \"/healthz\" }",
        "path = { exat = \"/healthz\" }",
    ));
    assert_eq!(found.len(), 2, "{}", dump(&found));
    assert_eq!(found[0].path, "routes[0].match.path.exat");
    assert_eq!(found[0].line, Some(15));
    assert!(
        found[0]
            .hint
            .as_deref()
            .is_some_and(|h| h.starts_with("did you mean `exact`?")),
        "{}",
        found[0]
    );
    assert_eq!(found[1].path, "routes[0].match.path.prefix");
    only_error(
        &HTTP.replace("exact = \"1\" }", "exact = 1 }"),
        "routes[2].match.headers[0].exact",
        "expected a string",
    );
}

#[test]
fn action_and_edit_errors() {
    let cases: [(&str, &str, &str, &str); 14] = [
        (
            "direct_response = { status = 200, body = \"ok\\n\" }",
            "direct_response = { status = 200, body = \"ok\\n\" }\ncluster = \"api\"",
            "routes[0]",
            "both `cluster` and `direct_response`",
        ),
        (
            "direct_response = { status = 200, body = \"ok\\n\" }",
            "direct_response = { status = 101 }",
            "routes[0].direct_response.status",
            "200 to 599",
        ),
        (
            "direct_response = { status = 200, body = \"ok\\n\" }",
            "direct_response = { status = 204, body = \"x\" }",
            "routes[0].direct_response.body",
            "has no body",
        ),
        (
            "redirect = { location = \"https://new.example.test/\" }",
            "redirect = { location = \"https://new.example.test/\", status = 200 }",
            "routes[1].redirect.status",
            "not a redirect",
        ),
        (
            "redirect = { location = \"https://new.example.test/\" }",
            "redirect = { location = \"https://new example/\" }",
            "routes[1].redirect.location",
            "invalid location",
        ),
        (
            "redirect = { location = \"https://new.example.test/\" }",
            "redirect = { status = 301 }",
            "routes[1].redirect.location",
            "missing `location`",
        ),
        (
            "remove = [\"X-Debug\"]",
            "remove = [\"Host\"]",
            "routes[2].request_headers.remove[0]",
            "host_rewrite",
        ),
        (
            "set = { x-team = \"web\" }",
            "set = { content-length = \"5\" }",
            "routes[2].request_headers.set.content-length",
            "managed by the proxy",
        ),
        (
            "set = { x-team = \"web\" }",
            "set = { x-team = \"a\\r\\nx-evil: 1\" }",
            "routes[2].request_headers.set.x-team",
            "control characters",
        ),
        (
            "add = { X-Env = \"prod\" }",
            "add = { X-Env = \"prod\", x-env = \"dev\" }",
            "routes[2].request_headers.add.x-env",
            "listed twice",
        ),
        (
            "prefix_rewrite = \"/\"",
            "prefix_rewrite = \"v2\"",
            "routes[2].prefix_rewrite",
            "does not start with '/'",
        ),
        (
            "host_rewrite = \"API.internal:8080\"",
            "host_rewrite = \"api internal\"",
            "routes[2].host_rewrite",
            "invalid host_rewrite",
        ),
        (
            "match = { path = { regex = \"^/v[0-9]+/\" } }",
            "match = { path = { regex = \"^/v[0-9]+/\" } }\nprefix_rewrite = \"/\"",
            "routes[3].prefix_rewrite",
            "no match.path.prefix",
        ),
        (
            "direct_response = { status = 200, body = \"ok\\n\" }",
            "direct_response = { status = 200, body = \"ok\\n\" }\nhost_rewrite = \"x\"",
            "routes[0].host_rewrite",
            "answers itself",
        ),
    ];
    for (from, to, path, needle) in cases {
        assert!(HTTP.contains(from), "{from}");
        only_error(&HTTP.replace(from, to), path, needle);
    }
    // No action at all on an http route names the answering actions too.
    let error = only_error(
        &HTTP.replace(
            "name = \"rest\"\nlistener = \"web\"\ncluster = \"api\"",
            "name = \"rest\"\nlistener = \"web\"",
        ),
        "routes[4]",
        "direct_response",
    );
    assert!(error.message.contains("no destination"), "{error}");
    // Routes after a catch-all route are never used.
    only_error(
        &HTTP.replace(
            "name = \"versioned\"\nlistener = \"web\"\nmatch = { path = { regex = \"^/v[0-9]+/\" } }",
            "name = \"versioned\"\nlistener = \"web\"",
        ),
        "routes[4]",
        "never used",
    );
}

#[test]
fn http_fields_on_other_listeners() {
    let tcp = "version = 1\n[[listeners]]\nname = \"l\"\naddress = \"127.0.0.1:0\"\nprotocol = \
               \"tcp\"\n[[routes]]\nname = \"r\"\nlistener = \"l\"\nROUTE\n[[clusters]]\nname = \
               \"c\"\nendpoints = [\"127.0.0.1:1\"]\n";
    only_error(
        &tcp.replace("ROUTE", "direct_response = { status = 200 }"),
        "routes[0].direct_response",
        "forwards whole connections",
    );
    only_error(
        &tcp.replace("ROUTE", "cluster = \"c\"\ntimeout = \"1s\""),
        "routes[0].timeout",
        "http listeners only",
    );
    only_error(
        &tcp.replace(
            "ROUTE",
            "cluster = \"c\"\nrequest_headers = { add = { a = \"b\" } }",
        ),
        "routes[0].request_headers",
        "http listeners only",
    );
    let passthrough = tcp.replace("\"tcp\"", "\"tls-passthrough\"");
    only_error(
        &passthrough.replace(
            "ROUTE",
            "cluster = \"c\"\nmatch = { sni = [\"a.test\"], path = { prefix = \"/\" } }",
        ),
        "routes[0].match.path",
        "routes whole connections",
    );
}

/// One forward route on the http listener with `extra` lines, and the error/valid helpers.
fn one_route(extra: &str) -> String {
    format!(
        "version = 1\n[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:0\"\nprotocol = \"http\"\n\
         [[routes]]\nname = \"r\"\nlistener = \"web\"\ncluster = \"c\"\n{extra}\n\
         [[clusters]]\nname = \"c\"\nendpoints = [\"127.0.0.1:1\"]\n"
    )
}

#[test]
fn query_matches_and_upgrades() {
    let config = valid(&one_route(
        "upgrades = [\"WebSocket\", \"x-custom\"]\n[[routes.match.query]]\nname = \"version\"\nexact = \"2\"\n\
         [[routes.match.query]]\nname = \"v\"\nregex = \"^[0-9]+$\"\n[[routes.match.query]]\nname = \"debug\"\npresent = false\n",
    ));
    let route = &config.routes[0];
    let query = &route.matcher.as_ref().expect("match").query;
    assert_eq!(query.len(), 3);
    assert_eq!(query[0].name, "version");
    assert_eq!(query[0].value, HeaderValueMatch::Exact("2".into()));
    assert_eq!(query[2].value, HeaderValueMatch::Present(false));
    let http = route.http.as_ref().expect("http");
    assert_eq!(http.upgrades, ["websocket", "x-custom"]);
    // Default: WebSocket only.
    let config = valid(&one_route(""));
    assert_eq!(
        config.routes[0].http.as_ref().expect("http").upgrades,
        ["websocket"]
    );
    // `[]` turns upgrades off.
    let config = valid(&one_route("upgrades = []"));
    assert!(
        config.routes[0]
            .http
            .as_ref()
            .expect("http")
            .upgrades
            .is_empty()
    );

    only_error(
        &one_route("[[routes.match.query]]\nexact = \"2\"\n"),
        "routes[0].match.query[0].name",
        "missing",
    );
    only_error(
        &one_route("[[routes.match.query]]\nname = \"v\"\n"),
        "routes[0].match.query[0].exact",
        "none of exact, regex and present",
    );
    only_error(
        &one_route("[[routes.match.query]]\nname = \"v\"\nexact = \"1\"\npresent = true\n"),
        "routes[0].match.query[0]",
        "more than one",
    );
    only_error(
        &one_route("[[routes.match.query]]\nname = \"v\"\nregex = \"(\"\n"),
        "routes[0].match.query[0].regex",
        "invalid regular expression",
    );
    only_error(
        &one_route("[[routes.match.query]]\nname = \"v\"\nexact = \"1\"\nvalue = \"1\"\n"),
        "routes[0].match.query[0].value",
        "`name`, `exact`, `regex`, `present`",
    );
    only_error(
        &one_route("upgrades = [\"h2c\"]"),
        "routes[0].upgrades[0]",
        "never forwarded",
    );
    only_error(
        &one_route("upgrades = [\"a b\"]"),
        "routes[0].upgrades[0]",
        "invalid",
    );
    only_error(
        &one_route("upgrades = [\"websocket\", \"WEBSOCKET\"]"),
        "routes[0].upgrades[1]",
        "twice",
    );
    // Query matches are for HTTP requests; upgrades only for routes that forward.
    let tcp = "version = 1\n[[listeners]]\nname = \"t\"\naddress = \"127.0.0.1:0\"\nprotocol = \"tls-passthrough\"\n\
               [[routes]]\nname = \"r\"\nlistener = \"t\"\ncluster = \"c\"\nupgrades = []\nmatch = { query = [{ name = \"a\", present = true }] }\n\
               [[clusters]]\nname = \"c\"\nendpoints = [\"127.0.0.1:1\"]\n";
    let errs = errors(tcp);
    let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
    assert!(paths.contains(&"routes[0].match.query"), "{}", dump(&errs));
    assert!(paths.contains(&"routes[0].upgrades"), "{}", dump(&errs));
    let direct = "version = 1\n[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:0\"\nprotocol = \"http\"\n\
                  [[routes]]\nname = \"r\"\nlistener = \"web\"\ndirect_response = { status = 200 }\nupgrades = [\"websocket\"]\n";
    only_error(direct, "routes[0].upgrades", "answers itself");
}
