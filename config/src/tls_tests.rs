//! Config tests for the TLS fields: listeners, route matches, upstream TLS. Certificates come
//! from testkit's PKI, written to a temporary directory next to the config file.

use std::path::PathBuf;

use meshgate_testkit::pki::{BadCert, Leaf, Pki};

use crate::{ClientAuth, ConfigError, Protocol, TlsVersion, UpstreamVerify, load};

/// A directory with the PKI's files and a config file written into it.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let pki = Pki::new().unwrap_or_else(|err| panic!("{err:#}"));
        let dir = tempfile::tempdir().unwrap_or_else(|err| panic!("{err}"));
        let path = dir.path();
        let write = |leaf: Option<Leaf>, name: &str| {
            let written = leaf.map(|leaf| leaf.write_pem(path, name).is_ok());
            assert_eq!(written, Some(true), "{name}");
        };
        write(pki.example.server(&["gateway.example.test"]).ok(), "server");
        write(pki.example.server(&["api.example.test"]).ok(), "api");
        write(pki.example.svid("/gateway").ok(), "gateway");
        write(pki.bad_client(BadCert::Expired).ok(), "expired");
        write(pki.bad_client(BadCert::NotYetValid).ok(), "later");
        for (ca, name) in [(&pki.example, "example"), (&pki.other, "other")] {
            ca.write_bundle(path, name)
                .unwrap_or_else(|err| panic!("{err:#}"));
        }
        let crl = pki.example.crl(&[]).unwrap_or_else(|err| panic!("{err:#}"));
        let pem = format!(
            "-----BEGIN X509 CRL-----\n{}\n-----END X509 CRL-----\n",
            base64_lines(&crl)
        );
        std::fs::write(path.join("example.crl.pem"), pem).unwrap_or_else(|err| panic!("{err}"));
        Setup { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn load(&self, text: &str) -> Result<crate::Config, Vec<ConfigError>> {
        let file = self.path("meshgate.toml");
        std::fs::write(&file, text).unwrap_or_else(|err| panic!("{err}"));
        load(&file).map_err(|err| err.errors)
    }

    fn valid(&self, text: &str) -> crate::Config {
        self.load(text)
            .unwrap_or_else(|errors| panic!("{}", dump(&errors)))
    }

    fn errors(&self, text: &str) -> Vec<ConfigError> {
        match self.load(text) {
            Ok(config) => panic!("expected errors, got {config:#?}"),
            Err(errors) => {
                for error in &errors {
                    assert!(
                        error.hint.as_deref().is_some_and(|h| !h.is_empty()),
                        "{error}"
                    );
                }
                errors
            }
        }
    }
}

/// Standard base64 with 64-character lines, for the PEM CRL (testkit hands out DER).
fn base64_lines(der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in der.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out.as_bytes()
        .chunks(64)
        .map(|line| String::from_utf8_lossy(line).into_owned())
        .collect::<Vec<_>>()
        .join("\n")
}

fn dump(errors: &[ConfigError]) -> String {
    errors.iter().map(|e| format!("{e}\n")).collect()
}

fn error_at<'a>(errors: &'a [ConfigError], path: &str) -> &'a ConfigError {
    let found: Vec<&ConfigError> = errors.iter().filter(|e| e.path == path).collect();
    match found.as_slice() {
        [one] => one,
        _ => panic!("expected one error at {path:?}, got:\n{}", dump(errors)),
    }
}

const TLS_LISTENER: &str = r#"version = 1

[[listeners]]
name = "tls-in"
address = "127.0.0.1:0"
protocol = "tls"
handshake_timeout = "3s"
default_route = "fallback"

[listeners.tls]
certificates = [
  { cert = "api.pem", key = "api-key.pem", sni = ["API.example.test", "*.apps.example.test"] },
  { cert = "server.pem", key = "server-key.pem" },
]
min_version = "1.3"
alpn = ["h2", "http/1.1"]
client_auth = "required"
trust_bundles = [
  { trust_domain = "example.test", bundle = "example.pem", crl = "example.crl.pem" },
  { trust_domain = "other.test", bundle = "other.pem" },
]

[[routes]]
name = "prod"
listener = "tls-in"
cluster = "backend"
match = { sni = ["api.example.test"], peer = { trust_domains = ["example.test"], path_prefixes = ["/ns/prod"] } }

[[routes]]
name = "fallback"
listener = "tls-in"
cluster = "echo"

[[clusters]]
name = "echo"
endpoints = ["127.0.0.1:15002"]

[[clusters]]
name = "backend"
endpoints = ["127.0.0.1:15003"]

[clusters.tls]
alpn = ["h2"]
verify = { spiffe_ids = ["spiffe://example.test/backend"] }
trust_bundle = "example.pem"
identity = { cert = "gateway.pem", key = "gateway-key.pem" }
"#;

#[test]
fn full_tls_config_validates_with_paths_relative_to_the_file() {
    let setup = Setup::new();
    let config = setup.valid(TLS_LISTENER);
    let listener = &config.listeners[0];
    assert_eq!(listener.protocol, Protocol::Tls);
    assert_eq!(listener.default_route, Some(1));
    assert_eq!(
        listener.handshake_timeout,
        std::time::Duration::from_secs(3)
    );
    let tls = listener.tls.as_ref().unwrap_or_else(|| panic!("no tls"));
    assert_eq!(tls.min_version, TlsVersion::Tls13);
    assert_eq!(tls.client_auth, ClientAuth::Required);
    assert_eq!(tls.alpn, ["h2", "http/1.1"]);
    assert_eq!(tls.certificates[0].cert, setup.path("api.pem"));
    assert_eq!(
        tls.certificates[0].sni,
        ["api.example.test", "*.apps.example.test"]
    );
    assert!(!tls.certificates[0].default && tls.certificates[1].default);
    assert_eq!(tls.trust_bundles[0].trust_domain.as_str(), "example.test");
    assert_eq!(
        tls.trust_bundles[0].crl,
        Some(setup.path("example.crl.pem"))
    );
    let matcher = config.routes[0]
        .matcher
        .as_ref()
        .unwrap_or_else(|| panic!("no match"));
    let prod = crate::spiffe::SpiffeId::parse("spiffe://example.test/ns/prod/web")
        .unwrap_or_else(|e| panic!("{e}"));
    let dev = crate::spiffe::SpiffeId::parse("spiffe://example.test/ns/dev/web")
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(matcher.matches(Some("API.example.test."), Some(&prod)));
    assert!(!matcher.matches(Some("api.example.test"), Some(&dev)));
    assert!(!matcher.matches(Some("api.example.test"), None));
    assert!(!matcher.matches(None, Some(&prod)));
    let cluster_tls = config.clusters[1]
        .tls
        .as_ref()
        .unwrap_or_else(|| panic!("no tls"));
    assert!(matches!(&cluster_tls.verify, UpstreamVerify::SpiffeIds(ids) if ids.len() == 1));
    assert_eq!(cluster_tls.min_version, TlsVersion::Tls12);
    assert_eq!(cluster_tls.sni, None);
    let json = serde_json::to_value(&config).unwrap_or_default();
    assert_eq!(json["listeners"][0]["protocol"], "tls");
    assert_eq!(json["listeners"][0]["tls"]["min_version"], "1.3");
    assert_eq!(
        json["routes"][0]["match"]["peer"]["trust_domains"][0],
        "example.test"
    );
    assert_eq!(
        json["clusters"][1]["tls"]["verify"]["spiffe_ids"][0],
        "spiffe://example.test/backend"
    );
    // The key path never shows key material, only the path.
    assert!(!json.to_string().contains("PRIVATE KEY"));
}

#[test]
fn certificate_file_problems_name_the_file_and_the_fix() {
    let setup = Setup::new();
    let swap = |from: &str, to: &str| TLS_LISTENER.replacen(from, to, 1);
    let cases = [
        (
            swap("key = \"api-key.pem\"", "key = \"server-key.pem\""),
            "listeners[0].tls.certificates[0].cert",
            "does not match the private key",
        ),
        (
            swap("cert = \"api.pem\"", "cert = \"expired.pem\"").replacen(
                "key = \"api-key.pem\"",
                "key = \"expired-key.pem\"",
                1,
            ),
            "listeners[0].tls.certificates[0].cert",
            "expired on",
        ),
        (
            swap("cert = \"api.pem\"", "cert = \"later.pem\"").replacen(
                "key = \"api-key.pem\"",
                "key = \"later-key.pem\"",
                1,
            ),
            "listeners[0].tls.certificates[0].cert",
            "is not valid before",
        ),
        (
            swap("cert = \"api.pem\"", "cert = \"missing.pem\""),
            "listeners[0].tls.certificates[0].cert",
            "cannot read certificate file",
        ),
        (
            swap("key = \"api-key.pem\"", "key = \"server.pem\""),
            "listeners[0].tls.certificates[0].key",
            "no usable private key",
        ),
        (
            swap("bundle = \"other.pem\"", "bundle = \"server.pem\""),
            "listeners[0].tls.trust_bundles[1].bundle",
            "not a CA certificate",
        ),
        (
            swap("crl = \"example.crl.pem\"", "crl = \"example.pem\""),
            "listeners[0].tls.trust_bundles[0].crl",
            "no CRL in the file",
        ),
        (
            swap("key = \"gateway-key.pem\"", "key = \"server-key.pem\""),
            "clusters[1].tls.identity.cert",
            "does not match the private key",
        ),
        (
            swap(
                "trust_bundle = \"example.pem\"",
                "trust_bundle = \"nope.pem\"",
            ),
            "clusters[1].tls.trust_bundle",
            "cannot read",
        ),
    ];
    for (text, path, want) in cases {
        let errors = setup.errors(&text);
        let error = error_at(&errors, path);
        assert!(error.message.contains(want), "{path}: {error}");
        assert!(
            error
                .message
                .contains(&setup.dir.path().display().to_string()),
            "{error}"
        );
        assert_eq!(errors.len(), 1, "{}", dump(&errors));
    }
}

#[test]
fn tls_structure_errors() {
    let setup = Setup::new();
    let cases: Vec<(String, &str, &str)> = vec![
        (
            TLS_LISTENER.replace("client_auth = \"required\"", "client_auth = \"require\""),
            "listeners[0].tls.client_auth",
            "unknown client_auth `require`",
        ),
        (
            TLS_LISTENER.replace("min_version = \"1.3\"", "min_version = \"1.1\""),
            "listeners[0].tls.min_version",
            "unknown TLS version \"1.1\"",
        ),
        (
            TLS_LISTENER.replace("client_auth = \"required\"", "client_auth = \"none\""),
            "listeners[0].tls.client_auth",
            "trust_bundles are set but client_auth is \"none\"",
        ),
        (
            TLS_LISTENER.replace("{ cert = \"server.pem\", key = \"server-key.pem\" }",
                "{ cert = \"server.pem\", key = \"server-key.pem\", sni = [\"api.example.test\"] }"),
            "listeners[0].tls.certificates[1].sni[0]",
            "already served by",
        ),
        (
            TLS_LISTENER.replace("sni = [\"API.example.test\", \"*.apps.example.test\"]", "sni = []"),
            "listeners[0].tls.certificates[1].sni",
            "already the default certificate",
        ),
        (
            TLS_LISTENER.replace("\"*.apps.example.test\"", "\"*.*.example.test\""),
            "listeners[0].tls.certificates[0].sni[1]",
            "invalid SNI pattern",
        ),
        (
            TLS_LISTENER.replace("{ trust_domain = \"other.test\"", "{ trust_domain = \"example.test\""),
            "listeners[0].tls.trust_bundles[1].trust_domain",
            "already listed",
        ),
        (
            TLS_LISTENER.replace("{ trust_domain = \"other.test\"", "{ trust_domain = \"Other.test\""),
            "listeners[0].tls.trust_bundles[1].trust_domain",
            "invalid trust domain",
        ),
        (
            TLS_LISTENER.replace("path_prefixes = [\"/ns/prod\"]", "path_prefixes = [\"ns/prod\"]"),
            "routes[0].match.peer.path_prefixes[0]",
            "invalid SPIFFE path prefix",
        ),
        (
            TLS_LISTENER.replace("trust_domains = [\"example.test\"], ", "spiffe_ids = [\"spiffe://example.test/a?b\"], "),
            "routes[0].match.peer.spiffe_ids[0]",
            "invalid SPIFFE ID",
        ),
        (
            TLS_LISTENER.replace("default_route = \"fallback\"", "default_route = \"nope\""),
            "listeners[0].default_route",
            "no route named \"nope\"",
        ),
        (
            TLS_LISTENER.replace(
                "verify = { spiffe_ids = [\"spiffe://example.test/backend\"] }",
                "verify = { spiffe_ids = [\"spiffe://example.test/backend\"], dns_names = [\"b.example.test\"] }",
            ),
            "clusters[1].tls.verify",
            "more than one",
        ),
        (
            TLS_LISTENER.replace(
                "verify = { spiffe_ids = [\"spiffe://example.test/backend\"] }",
                "verify = { spiffe_ids = [\"spiffe://example.test/backend\", \"spiffe://other.test/b\"] }",
            ),
            "clusters[1].tls.verify",
            "span trust domains",
        ),
        (
            TLS_LISTENER.replace("verify = { spiffe_ids = [\"spiffe://example.test/backend\"] }\n", ""),
            "clusters[1].tls.verify",
            "missing `verify`",
        ),
        (
            TLS_LISTENER.replace("protocol = \"tls\"", "protocol = \"tls-passthrough\""),
            "listeners[0].tls",
            "does not terminate TLS",
        ),
        (
            TLS_LISTENER.replace("[listeners.tls]", "[listeners.tls]\nciphers = [\"x\"]"),
            "listeners[0].tls.ciphers",
            "unknown field `ciphers`",
        ),
        (
            TLS_LISTENER.replace("{ cert = \"server.pem\",", "{ crt = \"server.pem\","),
            "listeners[0].tls.certificates[1].crt",
            "unknown field `crt`",
        ),
    ];
    for (text, path, want) in cases {
        let errors = setup.errors(&text);
        let error = error_at(&errors, path);
        assert!(error.message.contains(want), "{path}: {error}");
    }
    // An unknown nested field is reported on its own line; its hint lists the fields.
    let errors = setup
        .errors(&TLS_LISTENER.replace("[listeners.tls]", "[listeners.tls]\nciphers = [\"x\"]"));
    let error = error_at(&errors, "listeners[0].tls.ciphers");
    assert_eq!(error.line, Some(11));
    assert!(
        error
            .hint
            .as_deref()
            .unwrap_or("")
            .contains("`min_version`"),
        "{error}"
    );
}

#[test]
fn route_matches_and_listener_protocols() {
    let setup = Setup::new();
    let passthrough = r#"version = 1
[[listeners]]
name = "pt"
address = "127.0.0.1:0"
protocol = "tls-passthrough"
[[routes]]
name = "a"
listener = "pt"
cluster = "a"
match = { sni = ["a.example.test"] }
[[routes]]
name = "b"
listener = "pt"
cluster = "a"
match = { sni = ["*.b.example.test"] }
[[clusters]]
name = "a"
endpoints = ["127.0.0.1:1"]
"#;
    let config = setup.valid(passthrough);
    assert_eq!(config.listeners[0].routes, [0, 1]);
    assert_eq!(config.listeners[0].default_route, None);

    let cases: Vec<(String, &str, &str)> = vec![
        (
            passthrough.replace("match = { sni = [\"a.example.test\"] }", "match = { peer = { trust_domains = [\"example.test\"] } }"),
            "routes[0].match.peer",
            "does not see client certificates",
        ),
        (
            passthrough.replace("match = { sni = [\"a.example.test\"] }\n", ""),
            "routes[1]",
            "is never used",
        ),
        (
            passthrough.replace("protocol = \"tls-passthrough\"", "protocol = \"tcp\""),
            "routes[0].match",
            "cannot have `match`",
        ),
        (
            passthrough.replace(
                "protocol = \"tls-passthrough\"",
                "protocol = \"tcp\"\nhandshake_timeout = \"1s\"",
            ),
            "listeners[0].handshake_timeout",
            "no TLS handshake",
        ),
        (
            passthrough.replace(
                "protocol = \"tls-passthrough\"",
                "protocol = \"tls-passthrough\"\nhandshake_timeout = \"0s\"",
            ),
            "listeners[0].handshake_timeout",
            "must be greater than 0",
        ),
        (
            TLS_LISTENER.replace("client_auth = \"required\"\ntrust_bundles = [\n  { trust_domain = \"example.test\", bundle = \"example.pem\", crl = \"example.crl.pem\" },\n  { trust_domain = \"other.test\", bundle = \"other.pem\" },\n]\n", ""),
            "routes[0].match.peer",
            "client_auth = \"none\"",
        ),
        (
            TLS_LISTENER.replace("client_auth = \"required\"\ntrust_bundles = [\n  { trust_domain = \"example.test\", bundle = \"example.pem\", crl = \"example.crl.pem\" },\n  { trust_domain = \"other.test\", bundle = \"other.pem\" },\n]\n", "client_auth = \"optional\"\n"),
            "listeners[0].tls.trust_bundles",
            "needs at least one trust bundle",
        ),
        (
            format!("{passthrough}[[listeners]]\nname = \"other\"\naddress = \"127.0.0.1:0\"\nprotocol = \"tls-passthrough\"\ndefault_route = \"a\"\n[[routes]]\nname = \"o\"\nlistener = \"other\"\ncluster = \"a\"\n"),
            "listeners[1].default_route",
            "belongs to another listener",
        ),
    ];
    for (text, path, want) in cases {
        let errors = setup.errors(&text);
        let error = error_at(&errors, path);
        assert!(error.message.contains(want), "{path}: {error}");
    }
    // A tls-passthrough listener without routes is an error like a tcp one.
    let errors = setup.errors(&format!(
        "{passthrough}[[listeners]]\nname = \"lonely\"\naddress = \"127.0.0.1:0\"\nprotocol = \"tls-passthrough\"\n"
    ));
    assert!(
        error_at(&errors, "listeners[1]")
            .message
            .contains("has no route")
    );
}

#[test]
fn upstream_dns_verification_defaults_the_sni() {
    let setup = Setup::new();
    let text = TLS_LISTENER.replace(
        "verify = { spiffe_ids = [\"spiffe://example.test/backend\"] }",
        "verify = { dns_names = [\"Backend.example.test\"] }\nmin_version = \"1.3\"",
    );
    let config = setup.valid(&text);
    let tls = config.clusters[1]
        .tls
        .as_ref()
        .unwrap_or_else(|| panic!("no tls"));
    assert_eq!(tls.sni.as_deref(), Some("backend.example.test"));
    assert_eq!(tls.min_version, TlsVersion::Tls13);
    assert_eq!(
        tls.verify,
        UpstreamVerify::DnsNames(vec!["backend.example.test".to_owned()])
    );
}

#[test]
fn federated_trust_bundles_take_no_file() {
    let setup = Setup::new();
    let text = TLS_LISTENER.replace(
        "{ trust_domain = \"other.test\", bundle = \"other.pem\" }",
        "{ trust_domain = \"other.test\", federated = true }",
    );
    let config = setup.valid(&text);
    let tls = config.listeners[0]
        .tls
        .as_ref()
        .unwrap_or_else(|| panic!("no tls"));
    assert!(tls.trust_bundles[1].federated && !tls.trust_bundles[0].federated);
    assert_eq!(tls.trust_bundles[1].bundle, PathBuf::new());
    let both = TLS_LISTENER.replace(
        "{ trust_domain = \"other.test\", bundle = \"other.pem\" }",
        "{ trust_domain = \"other.test\", bundle = \"other.pem\", federated = true }",
    );
    let errors = setup.errors(&both);
    let e = error_at(&errors, "listeners[0].tls.trust_bundles[1].bundle");
    assert!(e.to_string().contains("federated"), "{}", dump(&errors));
}

#[test]
fn http2_clusters_over_tls_offer_h2() {
    let setup = Setup::new();
    // The backend cluster offers alpn = ["h2"] already; without alpn, http2 defaults it.
    let text = TLS_LISTENER
        .replace("alpn = [\"h2\"]\nverify", "verify")
        .replace(
            "name = \"backend\"\nendpoints = [\"127.0.0.1:15003\"]",
            "name = \"backend\"\nendpoints = [\"127.0.0.1:15003\"]\nprotocol = \"http2\"",
        );
    let config = setup.valid(&text);
    assert_eq!(config.clusters[1].protocol, crate::UpstreamProtocol::Http2);
    assert_eq!(config.clusters[0].protocol, crate::UpstreamProtocol::Http1);
    let tls = config.clusters[1]
        .tls
        .as_ref()
        .unwrap_or_else(|| panic!("tls"));
    assert_eq!(tls.alpn, ["h2"]);
    // An ALPN list without h2 cannot carry HTTP/2.
    let text = text.replace(
        "verify = { spiffe",
        "alpn = [\"http/1.1\"]\nverify = { spiffe",
    );
    let errors = setup.errors(&text);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].path, "clusters[1].tls.alpn", "{}", errors[0]);
    assert!(errors[0].message.contains("h2"), "{}", errors[0]);
    // Unknown protocols are named with the allowed values and the nearest one.
    let text = TLS_LISTENER.replace(
        "name = \"echo\"\nendpoints = [\"127.0.0.1:15002\"]",
        "name = \"echo\"\nendpoints = [\"127.0.0.1:15002\"]\nprotocol = \"http3\"",
    );
    let errors = setup.errors(&text);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].path, "clusters[0].protocol", "{}", errors[0]);
    assert!(
        errors[0]
            .hint
            .as_deref()
            .unwrap_or("")
            .contains("did you mean"),
        "{}",
        errors[0]
    );
}
