//! meshgate-config: the configuration file model and the validated types built from it.
//!
//! Data flow: file text -> [`parse`] (TOML syntax, then each section and each array element is
//! deserialized on its own into the crate-private `raw` structs, so one bad listener does not hide
//! errors elsewhere) -> `TryFrom<raw::Config> for Config` (semantic checks and cross references)
//! -> [`Config`]. Every problem found on the way becomes one [`ConfigError`] with the field path,
//! the line, and a hint that says how to fix it; [`LoadError`] carries all of them.
//!
//! The daemon, `meshgate config validate` and hot reload all call the same [`load`]. There is no
//! runtime in this crate: it only reads text and builds plain data.
//!
//! The file format is documented field by field in `docs/config-reference.md`; unit tests keep
//! that reference and the `raw` structs in step.

mod duration;
mod error;
mod load;
pub mod pem;
mod raw;
pub mod spiffe;
mod types;
mod validate;

#[cfg(test)]
mod tls_tests;

#[cfg(test)]
mod http_tests;

#[cfg(test)]
mod policy_tests;

use std::path::Path;

pub use duration::{DurationError, format_duration, parse_duration};
pub use error::{ConfigError, LoadError};
pub use types::{
    AccessLogConfig, AccessLogFormat, AccessLogTarget, AdminConfig, Balance, CircuitBreakers,
    ClientAuth, Cluster, ClusterTls, Config, ControlConfig, ControlEnrollmentConfig,
    ControlWorkloadApiConfig, HashOn, HeaderMatch, HeaderOps, HeaderValueMatch, HealthCheck,
    HealthCheckKind, Listener, ListenerHttp, ListenerTls, OutlierDetection, PathMatch, PeerMatch,
    Policy, PolicyAction, Protocol, QueryMatch, RetryBudget, RetryOn, RetryPolicy, Route,
    RouteAction, RouteHttp, RouteMatch, RuntimeConfig, ServerCertificate, TelemetryConfig,
    TlsIdentity, TlsVersion, TrustBundle, UpstreamProtocol, UpstreamVerify, WeightedCluster,
    sni_matches,
};

/// The configuration `meshgate run` uses when no `--config` is given (`config/examples/default.toml`).
pub const EMBEDDED_DEFAULT: &str = include_str!("../examples/default.toml");

/// The origin name used in errors about [`EMBEDDED_DEFAULT`].
pub const EMBEDDED_DEFAULT_ORIGIN: &str = "<embedded default config>";

/// Reads and validates the config file at `path`.
///
/// A file that cannot be read is reported as a [`LoadError`] naming the file, like any other
/// config problem.
pub fn load(path: &Path) -> Result<Config, LoadError> {
    let origin = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => load::parse_in(&text, &origin, &load_context(path)),
        Err(err) => Err(LoadError {
            origin,
            errors: vec![ConfigError {
                path: String::new(),
                message: format!("cannot read config file: {err}"),
                hint: Some(match err.kind() {
                    std::io::ErrorKind::NotFound => {
                        "check the path given to --config; run `meshgate run` without --config to \
                         use the embedded default"
                            .to_owned()
                    }
                    std::io::ErrorKind::PermissionDenied => {
                        "make the file readable by the user meshgate runs as".to_owned()
                    }
                    std::io::ErrorKind::InvalidData => "save the file as UTF-8 text".to_owned(),
                    _ => "check that the path names a readable UTF-8 text file".to_owned(),
                }),
                line: None,
                column: None,
            }],
        }),
    }
}

/// Parses and validates config text. `origin` names the text in errors (usually the file path).
/// Relative file paths in the text (certificates, keys, bundles) resolve against the current
/// directory; [`load`] resolves them against the config file's directory instead.
pub fn parse(text: &str, origin: &str) -> Result<Config, LoadError> {
    load::parse(text, origin)
}

/// [`parse`] for text read from `path` (not read again): relative file paths in the text
/// resolve against `path`'s directory, as with [`load`]. For hot reload and `config validate`
/// of text already in memory.
pub fn parse_file_text(text: &str, path: &Path) -> Result<Config, LoadError> {
    load::parse_in(text, &path.display().to_string(), &load_context(path))
}

fn load_context(path: &Path) -> validate::Context {
    validate::Context {
        base_dir: path
            .parent()
            .filter(|dir| !dir.as_os_str().is_empty())
            .map(Path::to_path_buf),
        now: std::time::SystemTime::now(),
    }
}

/// The validated [`EMBEDDED_DEFAULT`] config.
pub fn embedded_default() -> Config {
    // A constant of this crate, parsed by the unit tests: not input.
    parse(EMBEDDED_DEFAULT, EMBEDDED_DEFAULT_ORIGIN).expect("embedded default config is valid")
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use super::*;

    /// A small valid config; tests append to it or replace parts of it.
    const VALID: &str = r#"version = 1

[[listeners]]
name = "tcp-in"
address = "127.0.0.1:15001"
protocol = "tcp"

[[routes]]
name = "default"
listener = "tcp-in"
cluster = "echo"

[[clusters]]
name = "echo"
endpoints = ["127.0.0.1:15002"]
"#;

    fn valid(text: &str) -> Config {
        parse(text, "test.toml").unwrap_or_else(|err| panic!("expected a valid config:\n{err}"))
    }

    /// The errors of an invalid config; checks that every error has a path-independent hint.
    fn errors(text: &str) -> Vec<ConfigError> {
        let err = match parse(text, "test.toml") {
            Ok(config) => panic!("expected errors, got {config:#?}"),
            Err(err) => err,
        };
        assert_eq!(err.origin, "test.toml");
        assert!(!err.errors.is_empty());
        for error in &err.errors {
            assert!(
                error.hint.as_deref().is_some_and(|h| !h.is_empty()),
                "no hint: {error}"
            );
        }
        err.errors
    }

    /// The one error at `path`.
    fn error_at<'a>(errors: &'a [ConfigError], path: &str) -> &'a ConfigError {
        let found: Vec<&ConfigError> = errors.iter().filter(|e| e.path == path).collect();
        match found.as_slice() {
            [one] => one,
            _ => panic!("expected one error at {path:?}, got:\n{}", dump(errors)),
        }
    }

    fn only_error(text: &str, path: &str) -> ConfigError {
        let errors = errors(text);
        assert_eq!(
            errors.len(),
            1,
            "expected one error, got:\n{}",
            dump(&errors)
        );
        error_at(&errors, path).clone()
    }

    fn dump(errors: &[ConfigError]) -> String {
        errors.iter().map(|e| format!("{e}\n")).collect()
    }

    fn hint(error: &ConfigError) -> &str {
        error.hint.as_deref().unwrap_or_default()
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap_or_else(|err| panic!("{text}: {err}"))
    }

    // ---- valid files ----

    /// Every example loads. The TLS examples name certificate files that are not in the
    /// repository (`config/examples/certs/make.sh` makes them), so the examples are copied to a
    /// temporary directory, make.sh writes fresh certificates beside them, and the copies are
    /// loaded with full file checks: nothing is skipped, and the repository tree is untouched.
    #[test]
    fn every_example_file_is_valid() {
        let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/examples"));
        let tmp = tempfile::tempdir().unwrap_or_else(|err| panic!("tempdir: {err}"));
        let status = std::process::Command::new("sh")
            .arg(dir.join("certs/make.sh"))
            .arg(tmp.path().join("certs"))
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap_or_else(|err| panic!("run make.sh: {err}"));
        assert!(status.success(), "make.sh failed (is openssl installed?)");
        let mut count = 0;
        for entry in std::fs::read_dir(dir).unwrap_or_else(|err| panic!("{dir:?}: {err}")) {
            let path = entry.unwrap_or_else(|err| panic!("{dir:?}: {err}")).path();
            if path.extension().is_some_and(|ext| ext == "toml") {
                let copy = tmp.path().join(path.file_name().unwrap_or_default());
                std::fs::copy(&path, &copy).unwrap_or_else(|err| panic!("{path:?}: {err}"));
                if let Err(err) = load(&copy) {
                    panic!("{err}");
                }
                count += 1;
            }
        }
        assert!(
            count >= 4,
            "expected default, tcp-proxy, mtls-gateway and sni-passthrough in {dir:?}"
        );
        let mtls =
            load(&tmp.path().join("mtls-gateway.toml")).unwrap_or_else(|err| panic!("{err}"));
        let listener = mtls
            .listener("mtls-in")
            .unwrap_or_else(|| panic!("no mtls-in"));
        assert_eq!(listener.address, addr("127.0.0.1:15443"));
        assert_eq!(listener.protocol, Protocol::Tls);
        let tls = listener.tls.as_ref().unwrap_or_else(|| panic!("no tls"));
        assert_eq!(tls.client_auth, ClientAuth::Required);
        assert_eq!(
            tls.certificates[0].cert,
            tmp.path().join("certs/server.pem")
        );
        assert_eq!(mtls.clusters[0].endpoints, [addr("127.0.0.1:15002")]);
        assert_eq!(mtls.admin.address, Some(addr("127.0.0.1:15000")));
    }

    #[test]
    fn embedded_default_is_https_http_and_tcp() {
        let config = embedded_default();
        assert_eq!(config.admin.address, Some(addr("127.0.0.1:15000")));
        let https = config
            .listener("https")
            .unwrap_or_else(|| panic!("no https"));
        assert_eq!(https.address, addr("127.0.0.1:15443"));
        assert_eq!(https.protocol, Protocol::Tls);
        let tls = https.tls.as_ref().unwrap_or_else(|| panic!("no tls"));
        assert!(tls.certificates.is_empty(), "served from the local CA");
        let http = config.listener("http").unwrap_or_else(|| panic!("no http"));
        assert_eq!(http.address, addr("127.0.0.1:15080"));
        assert_eq!(http.protocol, Protocol::Http);
        let listener = config
            .listener("tcp-in")
            .unwrap_or_else(|| panic!("no tcp-in"));
        assert_eq!(listener.address, addr("127.0.0.1:15001"));
        assert_eq!(listener.protocol, Protocol::Tcp);
        let cluster = config.cluster("echo").unwrap_or_else(|| panic!("no echo"));
        assert_eq!(cluster.endpoints, [addr("127.0.0.1:15002")]);
    }

    #[test]
    fn minimal_config_gets_the_documented_defaults() {
        let config = valid(VALID);
        assert_eq!(config.version, 1);
        assert_eq!(
            config.admin,
            AdminConfig {
                address: Some(addr("127.0.0.1:15000")),
                unix_socket: None,
                danger_allow_non_loopback: false,
            }
        );
        assert_eq!(
            config.runtime,
            RuntimeConfig {
                cores: None,
                pin: true,
                drain_timeout: Duration::from_secs(30),
                ring_entries: 1024,
                watch_files: true,
            }
        );
        assert_eq!(config.access_log, None);
        assert_eq!(
            config.listeners,
            [Listener {
                name: "tcp-in".into(),
                address: addr("127.0.0.1:15001"),
                protocol: Protocol::Tcp,
                max_connections: 100_000,
                idle_timeout: Duration::from_secs(3600),
                backlog: 1024,
                routes: vec![0],
                handshake_timeout: Duration::from_secs(10),
                default_route: None,
                tls: None,
                http: None,
            }]
        );
        assert_eq!(
            config.routes,
            [Route {
                name: "default".into(),
                listener: "tcp-in".into(),
                listener_index: 0,
                matcher: None,
                action: RouteAction::Forward {
                    clusters: vec![WeightedCluster {
                        cluster: "echo".into(),
                        cluster_index: 0,
                        weight: 1,
                    }],
                },
                http: None,
            }]
        );
        assert_eq!(
            config.clusters,
            [Cluster {
                name: "echo".into(),
                endpoints: vec![addr("127.0.0.1:15002")],
                endpoint_weights: vec![1],
                connect_timeout: Duration::from_secs(5),
                balance: Balance::RoundRobin,
                hash_on: None,
                tls: None,
                health_check: None,
                outlier_detection: None,
                circuit_breakers: CircuitBreakers::default(),
                retry_budget: RetryBudget::default(),
                protocol: UpstreamProtocol::Http1,
            }]
        );
    }

    #[test]
    fn full_config_resolves_names_to_indices() {
        let config = valid(
            r#"version = 1
[admin]
address = "[::1]:9901"
unix_socket = "/run/meshgate/admin.sock"
[runtime]
cores = 4
pin = false
drain_timeout = "1m30s"
ring_entries = 2
watch_files = false
[[listeners]]
name = "a"
address = "0.0.0.0:0"
protocol = "tcp"
max_connections = 1
idle_timeout = "250ms"
backlog = 65535
[[listeners]]
name = "b"
address = "0.0.0.0:0"
protocol = "tcp"
[[routes]]
name = "to-b"
listener = "b"
weighted_clusters = [{ cluster = "canary", weight = 2 }, { cluster = "stable", weight = 98 }]
[[routes]]
name = "to-a"
listener = "a"
cluster = "stable"
[[clusters]]
name = "stable"
endpoints = ["10.0.0.1:80", "[2001:db8::1]:80"]
connect_timeout = "100ms"
balance = "round_robin"
[[clusters]]
name = "canary"
endpoints = ["10.0.0.2:80"]
[[clusters]]
name = "unused"
endpoints = ["10.0.0.3:80"]
"#,
        );
        assert_eq!(config.admin.address, Some(addr("[::1]:9901")));
        assert_eq!(
            config.admin.unix_socket.as_deref(),
            Some(Path::new("/run/meshgate/admin.sock"))
        );
        assert_eq!(config.runtime.cores, Some(4));
        assert!(!config.runtime.pin);
        assert_eq!(config.runtime.drain_timeout, Duration::from_secs(90));
        assert_eq!(config.runtime.ring_entries, 2);
        assert!(!config.runtime.watch_files);
        assert_eq!(config.listeners[0].routes, [1]);
        assert_eq!(config.listeners[1].routes, [0]);
        assert_eq!(config.listeners[0].idle_timeout, Duration::from_millis(250));
        assert_eq!(config.routes[0].listener_index, 1);
        let RouteAction::Forward { clusters } = &config.routes[0].action else {
            panic!("routes[0] forwards");
        };
        assert_eq!(
            clusters,
            &[
                WeightedCluster {
                    cluster: "canary".into(),
                    cluster_index: 1,
                    weight: 2
                },
                WeightedCluster {
                    cluster: "stable".into(),
                    cluster_index: 0,
                    weight: 98
                },
            ]
        );
        let listener_a = &config.listeners[0];
        let routes: Vec<&str> = config
            .routes_of(listener_a)
            .map(|r| r.name.as_str())
            .collect();
        assert_eq!(routes, ["to-a"]);
        assert!(config.route("to-b").is_some());
        assert!(config.cluster("unused").is_some());
        assert!(config.listener("nope").is_none());
        assert_eq!(
            config.clusters[0].endpoints,
            [addr("10.0.0.1:80"), addr("[2001:db8::1]:80")]
        );
    }

    #[test]
    fn serializes_durations_and_enums_as_written_in_the_file() {
        let json = serde_json::to_value(embedded_default()).unwrap_or_default();
        assert_eq!(json["runtime"]["drain_timeout"], "30s");
        assert_eq!(json["listeners"][2]["idle_timeout"], "1h");
        assert_eq!(json["listeners"][2]["protocol"], "tcp");
        assert_eq!(json["listeners"][0]["protocol"], "tls");
        assert_eq!(json["listeners"][2]["address"], "127.0.0.1:15001");
        assert_eq!(json["clusters"][1]["connect_timeout"], "5s");
        assert_eq!(json["clusters"][1]["balance"], "round_robin");
        assert_eq!(json["clusters"][1]["protocol"], "http1");
        assert_eq!(
            json["routes"][2]["action"]["forward"]["clusters"][0]["cluster"],
            "echo"
        );
        assert_eq!(Protocol::Tcp.to_string(), "tcp");
        assert_eq!(Balance::RoundRobin.to_string(), "round_robin");
    }

    // ---- errors: structure ----

    #[test]
    fn unknown_top_level_field() {
        let error = only_error(&format!("{VALID}\n[[cluster]]\nname = \"x\"\n"), "cluster");
        assert_eq!(error.message, "unknown field `cluster`");
        assert_eq!(error.line, Some(17));
        assert!(
            hint(&error).starts_with("did you mean `clusters`?"),
            "{error}"
        );
        assert!(hint(&error).contains("`listeners`"), "{error}");
    }

    #[test]
    fn unknown_nested_fields() {
        let text = VALID.replace(
            "endpoints = [\"127.0.0.1:15002\"]",
            "endpoints = [\"127.0.0.1:15002\"]\nendpoint = \"127.0.0.1:1\"\nlistener = \"tcp-in\"",
        ) + "[admin]\nadress = \"127.0.0.1:1\"\n";
        let errors = errors(&text);
        assert_eq!(errors.len(), 3, "{}", dump(&errors));
        let typo = error_at(&errors, "clusters[0].endpoint");
        assert_eq!(typo.message, "unknown field `endpoint`");
        assert_eq!(typo.line, Some(16));
        assert!(
            hint(typo).starts_with("did you mean `endpoints`?"),
            "{typo}"
        );
        let misplaced = error_at(&errors, "clusters[0].listener");
        assert!(
            hint(misplaced).contains("`listener` is a field of [[routes]]"),
            "{misplaced}"
        );
        assert!(hint(error_at(&errors, "admin.adress")).starts_with("did you mean `address`?"));
    }

    #[test]
    fn unknown_field_in_a_weighted_cluster_entry() {
        let text = VALID.replace(
            "cluster = \"echo\"",
            "weighted_clusters = [{ cluster = \"echo\", weigth = 1 }]",
        );
        let errors = errors(&text);
        let unknown = error_at(&errors, "routes[0].weighted_clusters[0].weigth");
        assert!(
            hint(unknown).starts_with("did you mean `weight`?"),
            "{unknown}"
        );
        // The entry is still checked: its weight is missing.
        assert_eq!(
            error_at(&errors, "routes[0].weighted_clusters[0].weight").message,
            "missing `weight`"
        );
    }

    #[test]
    fn wrong_types_name_the_path_and_the_expected_type() {
        let text = VALID
            .replace(
                "protocol = \"tcp\"",
                "protocol = \"tcp\"\nmax_connections = \"lots\"\nbacklog = 1.5",
            )
            .replace(
                "endpoints = [\"127.0.0.1:15002\"]",
                "endpoints = [\"127.0.0.1:15002\", 8080]",
            )
            + "[runtime]\npin = \"yes\"\n";
        let errors = errors(&text);
        assert_eq!(errors.len(), 4, "{}", dump(&errors));
        let max = error_at(&errors, "listeners[0].max_connections");
        assert_eq!(max.message, "expected an integer, found string \"lots\"");
        assert_eq!(hint(max), "write it like `max_connections = 100000`");
        assert_eq!(
            error_at(&errors, "listeners[0].backlog").message,
            "expected an integer, found float 1.5"
        );
        assert_eq!(
            error_at(&errors, "clusters[0].endpoints[1]").message,
            "expected a string or a table { address, weight }, found integer 8080"
        );
        assert_eq!(
            error_at(&errors, "runtime.pin").message,
            "expected a boolean (true or false), found string \"yes\""
        );
    }

    #[test]
    fn sections_of_the_wrong_shape() {
        let text = "version = 1\nadmin = \"127.0.0.1:15000\"\n[listeners]\nname = \"a\"\n";
        let errors = errors(text);
        assert_eq!(errors.len(), 2, "{}", dump(&errors));
        assert_eq!(
            error_at(&errors, "admin").message,
            "expected a table, found string \"127.0.0.1:15000\""
        );
        let listeners = error_at(&errors, "listeners");
        assert_eq!(
            listeners.message,
            "expected an array of tables ([[listeners]]), found a table"
        );
        assert!(hint(listeners).contains("[[listeners]]"));

        let error = only_error("version = 1\nclusters = [\"127.0.0.1:1\"]\n", "clusters[0]");
        assert_eq!(
            error.message,
            "expected a table, found string \"127.0.0.1:1\""
        );
    }

    #[test]
    fn syntax_errors_have_line_and_column() {
        let text = "version = 1\n\n[[listeners]]\nname = tcp-in\n";
        let error = only_error(text, "");
        assert_eq!((error.line, error.column), (Some(4), Some(8)));
        assert!(error.message.starts_with("TOML syntax error: "), "{error}");
        assert!(hint(&error).contains("double quotes"), "{error}");
        let err = parse(text, "bad.toml")
            .err()
            .unwrap_or_else(|| panic!("parsed"));
        assert!(
            err.to_string()
                .starts_with("bad.toml:4:8: TOML syntax error"),
            "{err}"
        );
    }

    // ---- errors: values ----

    #[test]
    fn missing_version() {
        let error = only_error(&VALID.replace("version = 1\n", ""), "version");
        assert_eq!(error.message, "missing `version`");
        assert!(hint(&error).contains("version = 1"));
    }

    #[test]
    fn wrong_version() {
        let error = only_error(&VALID.replace("version = 1", "version = 2"), "version");
        assert_eq!(
            error.message,
            "unsupported config version 2; this release reads version 1 only"
        );
        assert_eq!(error.line, Some(1));
        let error = only_error(&VALID.replace("version = 1", "version = \"1\""), "version");
        assert_eq!(error.message, "expected an integer, found string \"1\"");
    }

    #[test]
    fn bad_addresses() {
        let text = VALID
            .replace("127.0.0.1:15002", "10.0.0.1")
            .replace("127.0.0.1:15001", "localhost:15001")
            + "[admin]\naddress = \"::1:15000\"\n";
        let errors = errors(&text);
        assert_eq!(errors.len(), 3, "{}", dump(&errors));
        let endpoint = error_at(&errors, "clusters[0].endpoints[0]");
        assert_eq!(
            endpoint.message,
            "invalid address \"10.0.0.1\": missing port"
        );
        assert!(
            hint(endpoint).starts_with("write endpoints as \"IP:PORT\", e.g. \"127.0.0.1:8080\"")
        );
        assert_eq!(endpoint.line, Some(15));
        let listener = error_at(&errors, "listeners[0].address");
        assert_eq!(
            listener.message,
            "invalid address \"localhost:15001\": expected an IP address, found a host name"
        );
        assert!(hint(listener).contains("not resolved"));
        assert!(
            error_at(&errors, "admin.address")
                .message
                .contains("[IP]:PORT")
        );
    }

    #[test]
    fn endpoint_rules() {
        let text = VALID.replace(
            "endpoints = [\"127.0.0.1:15002\"]",
            "endpoints = [\"127.0.0.1:15002\", \"127.0.0.1:0\", \"0.0.0.0:80\", \"127.0.0.1:15002\"]",
        );
        let errors = errors(&text);
        assert_eq!(errors.len(), 3, "{}", dump(&errors));
        assert!(
            error_at(&errors, "clusters[0].endpoints[1]")
                .message
                .contains("port 0")
        );
        assert!(
            error_at(&errors, "clusters[0].endpoints[2]")
                .message
                .contains("unspecified")
        );
        assert_eq!(
            error_at(&errors, "clusters[0].endpoints[3]").message,
            "duplicate endpoint 127.0.0.1:15002 (same as endpoints[0])"
        );
    }

    #[test]
    fn empty_or_missing_cluster_endpoints() {
        let error = only_error(
            &VALID.replace("[\"127.0.0.1:15002\"]", "[]"),
            "clusters[0].endpoints",
        );
        assert_eq!(error.message, "cluster \"echo\" has no endpoints");
        assert!(hint(&error).contains("endpoints = [\"127.0.0.1:8080\"]"));
        let error = only_error(
            &VALID.replace("endpoints = [\"127.0.0.1:15002\"]\n", ""),
            "clusters[0].endpoints",
        );
        assert_eq!(error.message, "missing `endpoints`");
        // Reported at the [[clusters]] header, the nearest line that exists.
        assert_eq!(error.line, Some(13));
    }

    #[test]
    fn duplicate_names() {
        let text = format!(
            "{VALID}
[[listeners]]
name = \"tcp-in\"
address = \"127.0.0.1:15003\"
protocol = \"tcp\"

[[routes]]
name = \"default\"
listener = \"tcp-in\"
cluster = \"echo\"

[[clusters]]
name = \"echo\"
endpoints = [\"127.0.0.1:15004\"]
"
        );
        let errors = errors(&text);
        let listener = error_at(&errors, "listeners[1].name");
        assert_eq!(
            listener.message,
            "duplicate listener name \"tcp-in\" (first used by listeners[0])"
        );
        assert_eq!(listener.line, Some(18));
        assert_eq!(
            error_at(&errors, "routes[1].name").message,
            "duplicate route name \"default\" (first used by routes[0])"
        );
        assert_eq!(
            error_at(&errors, "clusters[1].name").message,
            "duplicate cluster name \"echo\" (first used by clusters[0])"
        );
        // The second route also binds the first tcp-in listener a second time.
        assert!(
            error_at(&errors, "routes[1].listener")
                .message
                .contains("already has route \"default\"")
        );
        assert_eq!(errors.len(), 4, "{}", dump(&errors));
    }

    #[test]
    fn invalid_names() {
        let text = VALID
            .replace("name = \"tcp-in\"", "name = \"tcp in\"")
            .replace("listener = \"tcp-in\"", "listener = \"tcp in\"")
            .replace("name = \"echo\"", &format!("name = \"{}\"", "e".repeat(65)))
            .replace(
                "cluster = \"echo\"",
                &format!("cluster = \"{}\"", "e".repeat(65)),
            );
        let errors = errors(&text);
        assert_eq!(errors.len(), 2, "{}", dump(&errors));
        assert_eq!(
            error_at(&errors, "listeners[0].name").message,
            "invalid listener name \"tcp in\": character ' ' is not allowed"
        );
        assert!(
            error_at(&errors, "clusters[0].name")
                .message
                .contains("65 characters")
        );
    }

    #[test]
    fn route_to_missing_listener_and_cluster() {
        let text = VALID
            .replace("listener = \"tcp-in\"", "listener = \"tcp_in\"")
            .replace("cluster = \"echo\"", "cluster = \"echoo\"");
        let errors = errors(&text);
        // No "listener has no route" on top: the misspelt route is the cause.
        assert_eq!(errors.len(), 2, "{}", dump(&errors));
        let listener = error_at(&errors, "routes[0].listener");
        assert_eq!(listener.message, "no listener named \"tcp_in\"");
        assert_eq!(
            hint(listener),
            "did you mean \"tcp-in\"? listeners defined: \"tcp-in\""
        );
        let cluster = error_at(&errors, "routes[0].cluster");
        assert_eq!(cluster.message, "no cluster named \"echoo\"");
        assert!(hint(cluster).starts_with("did you mean \"echo\"?"));
    }

    #[test]
    fn weighted_cluster_errors() {
        let text = VALID.replace(
            "cluster = \"echo\"",
            "weighted_clusters = [{ cluster = \"echo\", weight = 0 }, { cluster = \"nope\", weight = 1 }, { cluster = \"echo\", weight = 1 }, { weight = -1 }]",
        );
        let errors = errors(&text);
        assert_eq!(errors.len(), 5, "{}", dump(&errors));
        let zero = error_at(&errors, "routes[0].weighted_clusters[0].weight");
        assert_eq!(zero.message, "weight must be at least 1, found 0");
        assert_eq!(zero.line, Some(11));
        assert_eq!(
            error_at(&errors, "routes[0].weighted_clusters[1].cluster").message,
            "no cluster named \"nope\""
        );
        assert!(
            error_at(&errors, "routes[0].weighted_clusters[2].cluster")
                .message
                .contains("listed twice")
        );
        assert_eq!(
            error_at(&errors, "routes[0].weighted_clusters[3].cluster").message,
            "missing `cluster`"
        );
        assert!(
            error_at(&errors, "routes[0].weighted_clusters[3].weight")
                .message
                .contains("found -1")
        );
    }

    #[test]
    fn weighted_clusters_as_array_of_tables_and_weight_overflow() {
        let text = VALID.replace(
            "cluster = \"echo\"\n",
            "[[routes.weighted_clusters]]\ncluster = \"echo\"\nweight = 4294967295\n\
             [[routes.weighted_clusters]]\ncluster = \"other\"\nweight = 1\n",
        ) + "[[clusters]]\nname = \"other\"\nendpoints = [\"127.0.0.1:1\"]\n";
        let error = only_error(&text, "routes[0].weighted_clusters");
        assert!(error.message.contains("add up to 4294967296"), "{error}");
        let ok = text.replace("4294967295", "4294967294");
        assert_eq!(valid(&ok).routes[0].listener_index, 0);
    }

    #[test]
    fn route_needs_exactly_one_destination() {
        let error = only_error(
            &VALID.replace(
                "cluster = \"echo\"",
                "cluster = \"echo\"\nweighted_clusters = [{ cluster = \"echo\", weight = 1 }]",
            ),
            "routes[0]",
        );
        assert!(error.message.contains("both"), "{error}");
        let error = only_error(&VALID.replace("cluster = \"echo\"\n", ""), "routes[0]");
        assert!(error.message.contains("no destination"), "{error}");
        assert!(
            hint(&error).contains("clusters defined: \"echo\""),
            "{error}"
        );
        let error = only_error(
            &VALID.replace("cluster = \"echo\"", "weighted_clusters = []"),
            "routes[0].weighted_clusters",
        );
        assert_eq!(error.message, "weighted_clusters is empty");
    }

    #[test]
    fn bad_durations() {
        let text = VALID
            .replace(
                "protocol = \"tcp\"",
                "protocol = \"tcp\"\nidle_timeout = \"5 min\"",
            )
            .replace(
                "endpoints = [\"127.0.0.1:15002\"]",
                "endpoints = [\"127.0.0.1:15002\"]\nconnect_timeout = \"0s\"",
            )
            + "[runtime]\ndrain_timeout = 30\n";
        let errors = errors(&text);
        assert_eq!(errors.len(), 3, "{}", dump(&errors));
        let idle = error_at(&errors, "listeners[0].idle_timeout");
        assert_eq!(
            idle.message,
            "invalid duration \"5 min\": missing unit after `5`"
        );
        assert!(hint(idle).contains("idle_timeout = \"1h\""), "{idle}");
        let bare = error_at(&errors, "runtime.drain_timeout");
        assert_eq!(
            bare.message,
            "duration must be a string with a unit, found the bare number 30"
        );
        assert!(
            hint(bare).starts_with("write drain_timeout = \"30s\""),
            "{bare}"
        );
        assert_eq!(
            error_at(&errors, "clusters[0].connect_timeout").message,
            "`connect_timeout` must be greater than 0"
        );
        let float = only_error(
            &format!("{VALID}[runtime]\ndrain_timeout = 1.5\n"),
            "runtime.drain_timeout",
        );
        assert!(hint(&float).contains("\"1500ms\""), "{float}");
    }

    #[test]
    fn unsupported_protocols() {
        let error = only_error(
            &VALID.replace("\"tcp\"", "\"udp\""),
            "listeners[0].protocol",
        );
        assert_eq!(
            error.message,
            "unknown protocol `udp`; allowed values: \"tcp\", \"tls\", \"tls-passthrough\", \"http\", \"https\""
        );
        let error = only_error(
            &VALID.replace("\"tcp\"", "\"tls-passthru\""),
            "listeners[0].protocol",
        );
        assert!(
            hint(&error).starts_with("did you mean \"tls-passthrough\"?"),
            "{error}"
        );
        let error = only_error(
            &VALID.replace("protocol = \"tcp\"\n", ""),
            "listeners[0].protocol",
        );
        assert_eq!(error.message, "missing `protocol`");
        // tls-passthrough needs nothing more; tls without certificates serves an identity from
        // the gateway's local CA (certificates left empty for the daemon to fill in).
        let config = valid(&VALID.replace("\"tcp\"", "\"tls-passthrough\""));
        assert_eq!(config.listeners[0].protocol, Protocol::TlsPassthrough);
        assert_eq!(Protocol::TlsPassthrough.to_string(), "tls-passthrough");
        let config = valid(&VALID.replace("\"tcp\"", "\"tls\""));
        let tls = config.listeners[0].tls.as_ref().expect("tls defaults");
        assert!(tls.certificates.is_empty());
        assert_eq!(tls.client_auth, ClientAuth::None);
    }

    #[test]
    fn unsupported_balance() {
        let error = only_error(
            &VALID.replace(
                "endpoints = [\"127.0.0.1:15002\"]",
                "endpoints = [\"127.0.0.1:15002\"]\nbalance = \"roundrobin\"",
            ),
            "clusters[0].balance",
        );
        assert!(
            hint(&error).starts_with("did you mean \"round_robin\"?"),
            "{error}"
        );
    }

    #[test]
    fn tcp_listener_without_a_route() {
        let text = format!(
            "{VALID}\n[[listeners]]\nname = \"lonely\"\naddress = \"127.0.0.1:15003\"\nprotocol = \"tcp\"\n"
        );
        let error = only_error(&text, "listeners[1]");
        assert_eq!(error.message, "listener \"lonely\" has no route");
        assert!(hint(&error).contains("listener = \"lonely\""), "{error}");
        assert_eq!(error.line, Some(17));
    }

    #[test]
    fn tcp_listener_with_two_routes() {
        let text = format!(
            "{VALID}\n[[routes]]\nname = \"second\"\nlistener = \"tcp-in\"\ncluster = \"echo\"\n"
        );
        let error = only_error(&text, "routes[1].listener");
        assert_eq!(
            error.message,
            "listener \"tcp-in\" already has route \"default\" (routes[0]); a tcp listener \
             takes exactly one route"
        );
    }

    #[test]
    fn listeners_cannot_share_an_address() {
        let text = format!(
            "{VALID}
[[listeners]]
name = \"twin\"
address = \"127.0.0.1:15001\"
protocol = \"tcp\"
[[listeners]]
name = \"admin-clash\"
address = \"127.0.0.1:15000\"
protocol = \"tcp\"
[[routes]]
name = \"twin\"
listener = \"twin\"
cluster = \"echo\"
[[routes]]
name = \"admin-clash\"
listener = \"admin-clash\"
cluster = \"echo\"
"
        );
        let errors = errors(&text);
        assert_eq!(errors.len(), 2, "{}", dump(&errors));
        assert_eq!(
            error_at(&errors, "listeners[1].address").message,
            "address 127.0.0.1:15001 is already used by listener \"tcp-in\" (listeners[0])"
        );
        assert!(
            error_at(&errors, "listeners[2].address")
                .message
                .contains("admin API")
        );
        // Port 0 is a fresh ephemeral port each time, so it may repeat.
        valid(
            &text
                .replace("127.0.0.1:15001", "127.0.0.1:0")
                .replace("127.0.0.1:15000", "127.0.0.1:0"),
        );
    }

    #[test]
    fn admin_must_be_loopback_unless_danger() {
        let error = only_error(
            &format!("{VALID}[admin]\naddress = \"0.0.0.0:15000\"\n"),
            "admin.address",
        );
        assert_eq!(
            error.message,
            "admin address 0.0.0.0:15000 is not a loopback address"
        );
        assert!(hint(&error).contains("danger_allow_non_loopback = true"));
        let config = valid(&format!(
            "{VALID}[admin]\naddress = \"0.0.0.0:15000\"\ndanger_allow_non_loopback = true\n"
        ));
        assert!(config.admin.danger_allow_non_loopback);
        valid(&format!("{VALID}[admin]\naddress = \"127.1.2.3:1\"\n"));
        valid(&format!(
            "{VALID}[admin]\naddress = \"[::ffff:127.0.0.1]:1\"\n"
        ));
        let error = only_error(
            &format!("{VALID}[admin]\nunix_socket = \"admin.sock\"\n"),
            "admin.unix_socket",
        );
        assert!(error.message.contains("not an absolute path"), "{error}");
        let long = format!("/{}", "a".repeat(107));
        only_error(
            &format!("{VALID}[admin]\nunix_socket = \"{long}\"\n"),
            "admin.unix_socket",
        );
    }

    #[test]
    fn integer_ranges() {
        let text = VALID.replace(
            "protocol = \"tcp\"",
            "protocol = \"tcp\"\nmax_connections = 0\nbacklog = 65536",
        ) + "[runtime]\ncores = 0\nring_entries = 1000\n";
        let errors = errors(&text);
        assert_eq!(errors.len(), 4, "{}", dump(&errors));
        assert_eq!(
            error_at(&errors, "listeners[0].max_connections").message,
            "`max_connections` must be at least 1, found 0"
        );
        assert_eq!(
            error_at(&errors, "listeners[0].backlog").message,
            "`backlog` must be between 1 and 65535, found 65536"
        );
        assert!(
            error_at(&errors, "runtime.cores")
                .message
                .contains("at least 1")
        );
        let ring = error_at(&errors, "runtime.ring_entries");
        assert!(ring.message.contains("power of two"), "{ring}");
        assert_eq!(hint(ring), "e.g. ring_entries = 1024");
        only_error(
            &format!("{VALID}[runtime]\nring_entries = 65536\n"),
            "runtime.ring_entries",
        );
    }

    #[test]
    fn multiple_errors_are_reported_together_in_file_order() {
        let text = r#"version = 3

[runtime]
drain_timeout = "soon"

[[listeners]]
name = "tcp-in"
address = "127.0.0.1"
protocol = "htps"
backlogg = 10

[[listeners]]
name = "other"
address = "127.0.0.1:2"
protocol = "tcp"

[[routes]]
name = "default"
listener = "tcp-in"
cluster = "missing"

[[clusters]]
name = "echo"
endpoints = []
"#;
        let err = parse(text, "bad.toml")
            .err()
            .unwrap_or_else(|| panic!("parsed"));
        let found: Vec<(Option<usize>, &str)> = err
            .errors
            .iter()
            .map(|e| (e.line, e.path.as_str()))
            .collect();
        assert_eq!(
            found,
            [
                (Some(1), "version"),
                (Some(4), "runtime.drain_timeout"),
                (Some(8), "listeners[0].address"),
                (Some(9), "listeners[0].protocol"),
                (Some(10), "listeners[0].backlogg"),
                (Some(12), "listeners[1]"),
                (Some(20), "routes[0].cluster"),
                (Some(24), "clusters[0].endpoints"),
            ]
        );
        let shown = err.to_string();
        assert_eq!(shown.matches("\n  hint: ").count(), 8, "{shown}");
        assert!(
            shown.starts_with(
                "bad.toml:1: version: unsupported config version 3; this release reads version 1 \
                 only\n  hint: "
            ),
            "{shown}"
        );
    }

    #[test]
    fn load_reports_unreadable_files_by_name() {
        let path = Path::new("/nonexistent/meshgate.toml");
        let err = load(path).err().unwrap_or_else(|| panic!("loaded"));
        assert_eq!(err.origin, "/nonexistent/meshgate.toml");
        assert_eq!(err.errors.len(), 1);
        assert!(
            err.errors[0]
                .message
                .starts_with("cannot read config file: ")
        );
        assert!(
            err.to_string()
                .starts_with("/nonexistent/meshgate.toml: cannot read config file: ")
        );
    }

    #[test]
    fn no_panics_on_odd_input() {
        for text in [
            "",
            "version = 1\n[[routes]]\n[[clusters]]\n[[listeners]]\n",
            "version = 1\nlisteners = [1, \"x\", [], {}]\nroutes = {}\n",
            "version = 1\n[admin]\naddress = 1979-05-27T07:32:00Z\n[runtime]\ncores = -1\n",
            "version = 9223372036854775807\n[runtime]\nring_entries = -9223372036854775808\n",
            "version = 1\n[[routes]]\nweighted_clusters = [[1], \"x\"]\n",
            "\u{feff}version = 1\n",
            "version = 1\n\"a.b\" = 1\n[\"x[0]\"]\n",
        ] {
            let _ = parse(text, "odd.toml");
        }
    }

    #[test]
    fn odd_keys_and_date_times() {
        let errors = errors("version = 1\n\"a.b\" = 1\n[admin]\naddress = 1979-05-27T07:32:00Z\n");
        assert_eq!(errors.len(), 2, "{}", dump(&errors));
        let key = error_at(&errors, "\"a.b\"");
        assert_eq!(
            (key.line, key.message.as_str()),
            (Some(2), "unknown field `a.b`")
        );
        let date = error_at(&errors, "admin.address");
        assert_eq!(
            date.message,
            "date-times are not valid here, found date-time 1979-05-27T07:32:00Z"
        );
        assert!(
            hint(date).contains("address = \"127.0.0.1:15000\""),
            "{date}"
        );
    }

    // ---- [access_log] ----

    fn with_access_log(fields: &str) -> String {
        format!("{VALID}\n[access_log]\n{fields}\n")
    }

    #[test]
    fn access_log_section() {
        let config = valid(&with_access_log(
            "path = \"/var/log/meshgate/access.log\"\nformat = \"text\"\nqueue = 1024",
        ));
        assert_eq!(
            config.access_log,
            Some(AccessLogConfig {
                target: AccessLogTarget::File("/var/log/meshgate/access.log".into()),
                format: AccessLogFormat::Text,
                queue: 1024,
            })
        );
        let json = serde_json::to_value(&config).unwrap_or_default();
        assert_eq!(
            json["access_log"]["target"]["file"],
            "/var/log/meshgate/access.log"
        );
        assert_eq!(json["access_log"]["format"], "text");
        assert_eq!(json["access_log"]["queue"], 1024);
        // The range is inclusive at both ends.
        for queue in [1, 1_048_576] {
            let config = valid(&with_access_log(&format!(
                "path = \"stdout\"\nqueue = {queue}"
            )));
            assert_eq!(config.access_log.map(|log| log.queue), Some(queue));
        }
    }

    #[test]
    fn access_log_defaults_and_stdout() {
        let config = valid(&with_access_log("path = \"stdout\""));
        assert_eq!(
            config.access_log,
            Some(AccessLogConfig {
                target: AccessLogTarget::Stdout,
                format: AccessLogFormat::Json,
                queue: 65536,
            })
        );
        let json = serde_json::to_value(&config).unwrap_or_default();
        assert_eq!(json["access_log"]["target"], "stdout");
        assert_eq!(json["access_log"]["format"], "json");
        assert_eq!(AccessLogTarget::Stdout.to_string(), "stdout");
        assert_eq!(AccessLogFormat::Text.to_string(), "text");
        let explicit = valid(&with_access_log("path = \"stdout\"\nformat = \"json\""));
        assert_eq!(explicit, config);
    }

    #[test]
    fn access_log_relative_paths_start_at_the_config_file() {
        let text = with_access_log("path = \"logs/access.log\"");
        let config = parse_file_text(&text, Path::new("/etc/meshgate/meshgate.toml"))
            .unwrap_or_else(|err| panic!("{err}"));
        let target = config.access_log.map(|log| log.target);
        assert_eq!(
            target,
            Some(AccessLogTarget::File(
                "/etc/meshgate/logs/access.log".into()
            ))
        );
        assert_eq!(
            target.map(|t| t.to_string()).as_deref(),
            Some("/etc/meshgate/logs/access.log")
        );
        // "./stdout" is a file, not the stream.
        let text = with_access_log("path = \"./stdout\"");
        let config = parse_file_text(&text, Path::new("/etc/meshgate/meshgate.toml"))
            .unwrap_or_else(|err| panic!("{err}"));
        assert_eq!(
            config.access_log.map(|log| log.target),
            Some(AccessLogTarget::File("/etc/meshgate/./stdout".into()))
        );
        // Absolute paths are kept; parsed from text, relative paths stay relative (to the
        // working directory). Neither the file nor its directory has to exist.
        let text = with_access_log("path = \"/nonexistent/meshgate/access.log\"");
        let config = parse_file_text(&text, Path::new("/etc/meshgate/meshgate.toml"))
            .unwrap_or_else(|err| panic!("{err}"));
        assert_eq!(
            config.access_log.map(|log| log.target),
            Some(AccessLogTarget::File(
                "/nonexistent/meshgate/access.log".into()
            ))
        );
        let config = valid(&with_access_log("path = \"access.log\""));
        assert_eq!(
            config.access_log.map(|log| log.target),
            Some(AccessLogTarget::File("access.log".into()))
        );
    }

    #[test]
    fn access_log_path_errors() {
        let missing = only_error(&with_access_log("format = \"json\""), "access_log.path");
        assert_eq!(missing.message, "missing `path`");
        assert_eq!(missing.line, Some(17));
        assert!(hint(&missing).contains("path = \"stdout\""), "{missing}");

        for empty in ["\"\"", "\"  \""] {
            let error = only_error(
                &with_access_log(&format!("path = {empty}")),
                "access_log.path",
            );
            assert_eq!(error.message, "`path` is empty");
            assert_eq!(error.line, Some(18));
            assert!(
                hint(&error).contains("relative paths start at the config file's directory"),
                "{error}"
            );
        }

        let directory = only_error(
            &with_access_log("path = \"/var/log/meshgate/\""),
            "access_log.path",
        );
        assert!(
            directory.message.contains("names a directory"),
            "{directory}"
        );
        assert!(
            hint(&directory).contains("path = \"/var/log/meshgate/access.log\""),
            "{directory}"
        );

        for stream in ["STDOUT", "stderr", "-"] {
            let error = only_error(
                &with_access_log(&format!("path = \"{stream}\"")),
                "access_log.path",
            );
            assert!(error.message.contains("not a stream"), "{error}");
            assert!(
                hint(&error).contains(&format!("path = \"./{stream}\"")),
                "{error}"
            );
        }

        let wrong_type = only_error(&with_access_log("path = 1"), "access_log.path");
        assert_eq!(wrong_type.message, "expected a string, found integer 1");
        assert_eq!(
            hint(&wrong_type),
            "write it like `path = \"/var/log/meshgate/access.log\"`"
        );
    }

    #[test]
    fn access_log_format_errors() {
        let typo = only_error(
            &with_access_log("path = \"stdout\"\nformat = \"JSON\""),
            "access_log.format",
        );
        assert_eq!(
            typo.message,
            "unknown access log format `JSON`; allowed values: \"json\", \"text\""
        );
        assert_eq!(typo.line, Some(19));
        assert!(hint(&typo).starts_with("did you mean \"json\"? "), "{typo}");
        let other = only_error(
            &with_access_log("path = \"stdout\"\nformat = \"logfmt\""),
            "access_log.format",
        );
        assert!(other.message.contains("allowed values"), "{other}");
        assert!(
            hint(&other).starts_with("write format = \"json\""),
            "{other}"
        );
    }

    #[test]
    fn access_log_queue_errors() {
        for queue in ["0", "-1", "1048577", "9223372036854775807"] {
            let error = only_error(
                &with_access_log(&format!("path = \"stdout\"\nqueue = {queue}")),
                "access_log.queue",
            );
            assert_eq!(
                error.message,
                format!("`queue` must be between 1 and 1048576, found {queue}")
            );
            assert_eq!(hint(&error), "e.g. queue = 65536");
        }
        let float = only_error(
            &with_access_log("path = \"stdout\"\nqueue = 1.5"),
            "access_log.queue",
        );
        assert_eq!(float.message, "expected an integer, found float 1.5");
    }

    #[test]
    fn telemetry_section() {
        assert!(!valid(VALID).telemetry.istio_compat);
        let on = valid(&format!("{VALID}\n[telemetry]\nistio_compat = true\n"));
        assert!(on.telemetry.istio_compat);
        let json = serde_json::to_value(&on).unwrap_or_default();
        assert_eq!(json["telemetry"]["istio_compat"], true);
        let wrong = only_error(
            &format!("{VALID}\n[telemetry]\nistio_compat = \"yes\"\n"),
            "telemetry.istio_compat",
        );
        assert!(hint(&wrong).contains("istio_compat = true"), "{wrong}");
        let typo = only_error(
            &format!("{VALID}\n[telemetry]\nistio = true\n"),
            "telemetry.istio",
        );
        assert!(hint(&typo).contains("istio_compat"), "{typo}");
    }

    #[test]
    fn access_log_structure_errors() {
        // Every problem of the table is reported at once, with the rest of the file checked.
        let errors = errors(&with_access_log(
            "path = \"\"\nfromat = \"json\"\nformat = \"xml\"\nqueue = 0",
        ));
        assert_eq!(errors.len(), 4, "{}", dump(&errors));
        assert!(hint(error_at(&errors, "access_log.fromat")).starts_with("did you mean `format`?"));
        error_at(&errors, "access_log.path");
        error_at(&errors, "access_log.format");
        error_at(&errors, "access_log.queue");

        let shape = only_error(
            &VALID.replace("version = 1\n", "version = 1\naccess_log = \"stdout\"\n"),
            "access_log",
        );
        assert_eq!(shape.message, "expected a table, found string \"stdout\"");
        assert!(hint(&shape).contains("[access_log]"), "{shape}");
    }
}
