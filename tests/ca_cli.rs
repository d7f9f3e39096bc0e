//! The offline CA through the real binary, checked with the real `openssl`: init, issue,
//! inspect, bundle export, revoke + CRL, join tokens, file modes, refusals and exit codes.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use meshgate_control::{Ca, FixedClock, JoinToken, SpiffeId, TokenError};
use meshgate_testkit::cli::s;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_meshgate"))
}

fn ok(args: &[&str]) -> String {
    meshgate_testkit::cli::ok(bin(), args)
}

fn code_and_stderr(args: &[&str]) -> (i32, String) {
    meshgate_testkit::cli::code_and_stderr(bin(), args)
}

fn openssl(args: &[&str]) -> Output {
    Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl is installed")
}

fn mode_of(p: &Path) -> u32 {
    std::fs::metadata(p).expect("stat").permissions().mode() & 0o777
}

/// A CA initialised in a fresh temp directory.
struct Env {
    dir: tempfile::TempDir,
    state: PathBuf,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        ok(&[
            "ca",
            "init",
            "--trust-domain",
            "example.org",
            "--state-dir",
            s(&state),
        ]);
        Env { dir, state }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn st(&self) -> &str {
        s(&self.state)
    }

    /// Issue `id` into `<name>.pem` / `<name>-key.pem`.
    fn issue(&self, id: &str, name: &str, extra: &[&str]) -> (PathBuf, PathBuf) {
        let cert = self.path(&format!("{name}.pem"));
        let key = self.path(&format!("{name}-key.pem"));
        let mut args = vec![
            "cert",
            "issue",
            "--state-dir",
            self.st(),
            "--spiffe-id",
            id,
            "--cert",
            s(&cert),
            "--key",
            s(&key),
        ];
        args.extend_from_slice(extra);
        ok(&args);
        (cert, key)
    }

    /// `bundle export --format pem` from stdout, saved to a file for openssl.
    fn bundle_pem(&self) -> PathBuf {
        let p = self.path("bundle.pem");
        std::fs::write(
            &p,
            ok(&[
                "bundle",
                "export",
                "--state-dir",
                self.st(),
                "--format",
                "pem",
            ]),
        )
        .expect("write");
        p
    }

    fn inspect(&self, cert: &Path) -> serde_json::Value {
        serde_json::from_str(&ok(&["cert", "inspect", s(cert), "-o", "json"])).expect("json")
    }
}

#[test]
fn issued_svid_verifies_with_openssl_and_has_the_svid_profile() {
    let env = Env::new();
    let (cert, _) = env.issue(
        "spiffe://example.org/ns/prod/web",
        "svid",
        &["--dns", "web.internal"],
    );
    let bundle = env.bundle_pem();
    let v = openssl(&["verify", "-CAfile", s(&bundle), s(&cert)]);
    assert!(
        v.status.success(),
        "openssl verify: {}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );

    let text = String::from_utf8(openssl(&["x509", "-in", s(&cert), "-noout", "-text"]).stdout)
        .expect("utf8");
    assert_eq!(text.matches("URI:").count(), 1, "{text}");
    assert!(
        text.contains("URI:spiffe://example.org/ns/prod/web"),
        "{text}"
    );
    assert!(text.contains("DNS:web.internal"), "{text}");
    assert!(text.contains("CA:FALSE"), "{text}");
    let ku = text
        .split("X509v3 Key Usage: critical")
        .nth(1)
        .expect("critical key usage");
    assert_eq!(
        ku.lines().nth(1).map(str::trim),
        Some("Digital Signature"),
        "{text}"
    );
    assert!(
        text.contains("TLS Web Server Authentication, TLS Web Client Authentication"),
        "{text}"
    );
    assert!(text.contains("ASN1 OID: prime256v1"), "{text}");

    // --out writes the same bundle atomically.
    let out = env.path("bundle-out.pem");
    ok(&[
        "bundle",
        "export",
        "--state-dir",
        env.st(),
        "--format",
        "pem",
        "--out",
        s(&out),
    ]);
    assert_eq!(
        std::fs::read(&out).expect("read"),
        std::fs::read(&bundle).expect("read")
    );
}

#[test]
fn inspect_json_has_the_documented_fields_matching_openssl() {
    let env = Env::new();
    let (cert, _) = env.issue("spiffe://example.org/web", "svid", &["--ttl", "30m"]);
    let j = env.inspect(&cert);
    for field in [
        "spiffe_id",
        "issuer",
        "subject",
        "serial",
        "not_before",
        "not_after",
        "dns_names",
        "uris",
        "key_usage",
        "extended_key_usage",
        "is_ca",
        "sha256_fingerprint",
    ] {
        assert!(j.get(field).is_some(), "missing {field}: {j}");
    }
    assert_eq!(j["spiffe_id"], "spiffe://example.org/web");
    assert_eq!(j["uris"], serde_json::json!(["spiffe://example.org/web"]));
    assert_eq!(j["key_usage"], serde_json::json!(["digital_signature"]));
    assert_eq!(
        j["extended_key_usage"],
        serde_json::json!(["server_auth", "client_auth"])
    );
    assert_eq!(j["is_ca"], false);
    let nb = time::OffsetDateTime::parse(
        j["not_before"].as_str().expect("str"),
        &time::format_description::well_known::Rfc3339,
    )
    .expect("rfc3339");
    let na = time::OffsetDateTime::parse(
        j["not_after"].as_str().expect("str"),
        &time::format_description::well_known::Rfc3339,
    )
    .expect("rfc3339");
    assert_eq!(
        (na - nb).whole_seconds(),
        30 * 60 + 30,
        "30m TTL plus 30s backdating"
    );

    let serial = String::from_utf8(openssl(&["x509", "-in", s(&cert), "-noout", "-serial"]).stdout)
        .expect("utf8");
    assert_eq!(
        serial.trim(),
        format!("serial={}", j["serial"].as_str().expect("str"))
    );
    let fp = String::from_utf8(
        openssl(&["x509", "-in", s(&cert), "-noout", "-fingerprint", "-sha256"]).stdout,
    )
    .expect("utf8");
    assert!(
        fp.trim()
            .ends_with(j["sha256_fingerprint"].as_str().expect("str")),
        "{fp} vs {j}"
    );

    // Any PEM certificate: the CA's own root.
    let root = env.inspect(&env.state.join("ca/root.pem"));
    assert_eq!(root["is_ca"], true);
    assert_eq!(root["spiffe_id"], "spiffe://example.org");
    assert_eq!(
        root["key_usage"],
        serde_json::json!(["key_cert_sign", "crl_sign"])
    );

    // Table output names the fields too; a missing file is a usage error.
    let table = ok(&["cert", "inspect", s(&cert)]);
    assert!(
        table.contains("spiffe://example.org/web")
            && table.contains("digital_signature (critical)"),
        "{table}"
    );
    let (code, err) = code_and_stderr(&["cert", "inspect", s(&env.path("nope.pem"))]);
    assert_eq!(code, 64, "{err}");
}

#[test]
fn state_files_keys_and_directories_have_private_modes() {
    let env = Env::new();
    let (_, key) = env.issue("spiffe://example.org/web", "svid", &[]);
    ok(&[
        "token",
        "create",
        "--state-dir",
        env.st(),
        "--spiffe-id",
        "spiffe://example.org/vm",
    ]);
    assert_eq!(mode_of(&env.state), 0o700);
    assert_eq!(mode_of(&env.state.join("ca")), 0o700);
    assert_eq!(mode_of(&env.state.join("ledger")), 0o700);
    assert_eq!(mode_of(&env.state.join("ca/root-key.pem")), 0o600);
    assert_eq!(mode_of(&env.state.join("tokens.json")), 0o600);
    assert_eq!(mode_of(&key), 0o600);
    let k = std::fs::read_to_string(&key).expect("key");
    assert!(k.starts_with("-----BEGIN PRIVATE KEY-----"), "PKCS#8 PEM");
    // The key really belongs to the certificate: openssl derives the same public key.
    let from_key = openssl(&["pkey", "-in", s(&key), "-pubout"]).stdout;
    let from_cert = openssl(&["x509", "-in", s(&env.path("svid.pem")), "-noout", "-pubkey"]).stdout;
    assert_eq!(from_key, from_cert);
}

#[test]
fn foreign_trust_domain_and_bad_spiffe_ids_are_refused_with_exit_64() {
    let env = Env::new();
    let cert = env.path("c.pem");
    let key = env.path("k.pem");
    let issue = |id: &str| {
        code_and_stderr(&[
            "cert",
            "issue",
            "--state-dir",
            env.st(),
            "--spiffe-id",
            id,
            "--cert",
            s(&cert),
            "--key",
            s(&key),
        ])
    };
    let (code, err) = issue("spiffe://other.org/web");
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("not in this CA's trust domain example.org"),
        "{err}"
    );

    for (id, says) in [
        (
            "http://example.org/web",
            "does not start with \"spiffe://\"",
        ),
        ("spiffe://Example.org/web", "must be lowercase"),
        ("spiffe://example.org:443/web", "port"),
        ("spiffe://me@example.org/web", "user info"),
        ("spiffe://example.org/web?x=1", "query"),
        ("spiffe://example.org/web#f", "fragment"),
        ("spiffe://example.org//web", "empty segment"),
        ("spiffe://example.org/a/../web", "\"..\""),
        ("spiffe://example.org/./web", "\".\""),
        ("spiffe://example.org/web/", "trailing slash"),
        ("spiffe://example.org/we b", "path characters"),
        ("spiffe:///web", "no trust domain"),
    ] {
        let (code, err) = issue(id);
        assert_eq!(code, 64, "{id}: {err}");
        assert!(err.contains(says), "{id}: expected {says:?} in {err}");
    }
    assert!(
        !cert.exists() && !key.exists(),
        "nothing written on refusal"
    );
    let ledger =
        std::fs::read_to_string(env.state.join("ledger/00000001.jsonl")).unwrap_or_default();
    assert!(ledger.is_empty(), "refusals are not recorded: {ledger}");

    let (code, err) = code_and_stderr(&[
        "cert",
        "issue",
        "--state-dir",
        env.st(),
        "--spiffe-id",
        "spiffe://example.org/web",
        "--cert",
        s(&cert),
        "--key",
        s(&key),
        "--ttl",
        "25h",
    ]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("longer than this CA's maximum"), "{err}");
}

#[test]
fn missing_state_dir_says_to_run_ca_init_and_init_never_overwrites() {
    let dir = tempfile::tempdir().expect("tempdir");
    let st = dir.path().join("none");
    let (code, err) = code_and_stderr(&["ca", "show", "--state-dir", s(&st)]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("run `meshgate ca init"), "{err}");

    let env = Env::new();
    let before = std::fs::read(env.state.join("ca/root-key.pem")).expect("key");
    let (code, err) = code_and_stderr(&[
        "ca",
        "init",
        "--trust-domain",
        "example.org",
        "--state-dir",
        env.st(),
    ]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("already holds a CA"), "{err}");
    assert_eq!(
        std::fs::read(env.state.join("ca/root-key.pem")).expect("key"),
        before
    );

    let (code, err) = code_and_stderr(&[
        "ca",
        "init",
        "--trust-domain",
        "Bad.Domain",
        "--state-dir",
        s(&dir.path().join("x")),
    ]);
    assert_eq!(code, 64, "{err}");
}

#[test]
fn ca_show_reports_trust_domain_fingerprints_validity_and_algorithm() {
    let env = Env::new();
    let j: serde_json::Value =
        serde_json::from_str(&ok(&["ca", "show", "--state-dir", env.st(), "-o", "json"]))
            .expect("json");
    assert_eq!(j["trust_domain"], "example.org");
    assert_eq!(j["mode"], "root");
    assert_eq!(j["roots"][0]["public_key"], "EC P-256");
    let fp = String::from_utf8(
        openssl(&[
            "x509",
            "-in",
            s(&env.state.join("ca/root.pem")),
            "-noout",
            "-fingerprint",
            "-sha256",
        ])
        .stdout,
    )
    .expect("utf8");
    assert!(
        fp.trim()
            .ends_with(j["roots"][0]["sha256_fingerprint"].as_str().expect("fp")),
        "{fp}"
    );
    assert!(j["roots"][0]["not_after"].is_string());
    let table = ok(&["ca", "show", "--state-dir", env.st()]);
    assert!(
        table.contains("example.org") && table.contains("EC P-256"),
        "{table}"
    );
}

#[test]
fn revoked_serial_is_in_the_crl_and_openssl_refuses_it() {
    let env = Env::new();
    let (bad, _) = env.issue("spiffe://example.org/bad", "bad", &[]);
    let (good, _) = env.issue("spiffe://example.org/good", "good", &[]);
    let serial = env.inspect(&bad)["serial"]
        .as_str()
        .expect("serial")
        .to_owned();
    ok(&[
        "cert",
        "revoke",
        "--state-dir",
        env.st(),
        &serial,
        "--reason",
        "key-compromise",
    ]);

    let crl = env.state.join("crl.pem");
    let text = String::from_utf8(openssl(&["crl", "-in", s(&crl), "-noout", "-text"]).stdout)
        .expect("utf8");
    assert!(text.contains(&format!("Serial Number: {serial}")), "{text}");
    assert!(text.contains("Next Update:"), "{text}");
    assert!(text.contains("Key Compromise"), "{text}");

    let bundle = env.bundle_pem();
    let v = openssl(&[
        "verify",
        "-crl_check",
        "-CAfile",
        s(&bundle),
        "-CRLfile",
        s(&crl),
        s(&bad),
    ]);
    assert!(!v.status.success(), "revoked certificate accepted");
    let msg = format!(
        "{}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    assert!(msg.contains("certificate revoked"), "{msg}");
    let v = openssl(&[
        "verify",
        "-crl_check",
        "-CAfile",
        s(&bundle),
        "-CRLfile",
        s(&crl),
        s(&good),
    ]);
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));

    // list: valid ones by default, all with --all.
    let list: serde_json::Value = serde_json::from_str(&ok(&[
        "cert",
        "list",
        "--state-dir",
        env.st(),
        "-o",
        "json",
    ]))
    .expect("json");
    assert_eq!(list.as_array().expect("array").len(), 1);
    assert_eq!(list[0]["spiffe_id"], "spiffe://example.org/good");
    let all: serde_json::Value = serde_json::from_str(&ok(&[
        "cert",
        "list",
        "--state-dir",
        env.st(),
        "--all",
        "-o",
        "json",
    ]))
    .expect("json");
    assert_eq!(all.as_array().expect("array").len(), 2);
    assert_eq!(all[0]["status"], "revoked");
    assert_eq!(all[0]["authorised_by"], "operator:cli");

    // Unknown serial and junk are usage errors; revoking twice republishes.
    assert_eq!(
        code_and_stderr(&["cert", "revoke", "--state-dir", env.st(), "0123"]).0,
        64
    );
    assert_eq!(
        code_and_stderr(&["cert", "revoke", "--state-dir", env.st(), "xyz"]).0,
        64
    );
    let again = ok(&[
        "cert",
        "revoke",
        "--state-dir",
        env.st(),
        &serial.to_lowercase(),
    ]);
    assert!(again.contains("already revoked"), "{again}");
}

#[test]
fn join_tokens_store_only_a_hash_and_are_single_use() {
    let env = Env::new();
    let token = ok(&[
        "token",
        "create",
        "--state-dir",
        env.st(),
        "--spiffe-id",
        "spiffe://example.org/vm/1",
        "--ttl",
        "10m",
    ]);
    let token = token.trim().to_owned();
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "{token}");
    assert_eq!(
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts[2])
            .expect("b64")
            .len(),
        32
    );
    for entry in walk(&env.state) {
        let bytes = std::fs::read(&entry).expect("read");
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            !text.contains(parts[2]),
            "token secret found in {}",
            entry.display()
        );
    }
    let list: serde_json::Value = serde_json::from_str(&ok(&[
        "token",
        "list",
        "--state-dir",
        env.st(),
        "-o",
        "json",
    ]))
    .expect("json");
    assert_eq!(list[0]["id"], parts[1]);
    assert_eq!(list[0]["status"], "active");

    // The enrollment server's call, on the state the CLI wrote.
    let ca = Ca::open(&env.state).expect("open");
    let vm1 = SpiffeId::parse("spiffe://example.org/vm/1").expect("id");
    let vm2 = SpiffeId::parse("spiffe://example.org/vm/2").expect("id");
    let t = JoinToken::new(token.clone());
    assert!(matches!(
        ca.tokens().redeem(&t, &vm2),
        Err(TokenError::IdentityMismatch { .. })
    ));
    assert!(matches!(
        ca.tokens()
            .redeem(&JoinToken::new(format!("{token}x")), &vm1),
        Err(TokenError::Unknown)
    ));
    ca.tokens().redeem(&t, &vm1).expect("first use");
    assert!(matches!(
        ca.tokens().redeem(&t, &vm1),
        Err(TokenError::AlreadyUsed { .. })
    ));
    let list: serde_json::Value = serde_json::from_str(&ok(&[
        "token",
        "list",
        "--state-dir",
        env.st(),
        "-o",
        "json",
    ]))
    .expect("json");
    assert_eq!(list[0]["status"], "used");

    // Expiry, with the clock moved past it.
    let short = ok(&[
        "token",
        "create",
        "--state-dir",
        env.st(),
        "--spiffe-id",
        "spiffe://example.org/vm/1",
        "--ttl",
        "1m",
    ]);
    let later = Arc::new(FixedClock::new(
        time::OffsetDateTime::now_utc() + time::Duration::minutes(2),
    ));
    let ca = Ca::open_with_clock(&env.state, later).expect("open");
    assert!(matches!(
        ca.tokens().redeem(&JoinToken::new(short.trim()), &vm1),
        Err(TokenError::Expired { .. })
    ));

    // Revoke by id.
    let third = ok(&[
        "token",
        "create",
        "--state-dir",
        env.st(),
        "--spiffe-id",
        "spiffe://example.org/vm/1",
        "-o",
        "json",
    ]);
    let third: serde_json::Value = serde_json::from_str(&third).expect("json");
    ok(&[
        "token",
        "revoke",
        "--state-dir",
        env.st(),
        third["id"].as_str().expect("id"),
    ]);
    let ca = Ca::open(&env.state).expect("open");
    let t3 = JoinToken::new(third["token"].as_str().expect("token"));
    assert!(matches!(
        ca.tokens().redeem(&t3, &vm1),
        Err(TokenError::Revoked { .. })
    ));
    assert_eq!(
        code_and_stderr(&["token", "revoke", "--state-dir", env.st(), "ffffffff"]).0,
        64
    );
    let (code, err) = code_and_stderr(&[
        "token",
        "create",
        "--state-dir",
        env.st(),
        "--spiffe-id",
        "spiffe://other.org/vm",
    ]);
    assert_eq!(code, 64, "{err}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("ls").flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p))
        } else {
            out.push(p)
        }
    }
    out
}

#[test]
fn spiffe_bundle_has_the_jwks_shape() {
    let env = Env::new();
    let j: serde_json::Value = serde_json::from_str(&ok(&[
        "bundle",
        "export",
        "--state-dir",
        env.st(),
        "--format",
        "spiffe",
    ]))
    .expect("json");
    let keys = j["keys"].as_array().expect("keys");
    assert_eq!(keys.len(), 1);
    let k = &keys[0];
    assert_eq!(k["use"], "x509-svid");
    assert_eq!(k["kty"], "EC");
    assert_eq!(k["crv"], "P-256");
    let b64u = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    assert_eq!(
        b64u.decode(k["x"].as_str().expect("x")).expect("x").len(),
        32
    );
    assert_eq!(
        b64u.decode(k["y"].as_str().expect("y")).expect("y").len(),
        32
    );
    let x5c = k["x5c"].as_array().expect("x5c");
    assert_eq!(x5c.len(), 1);
    let der = base64::engine::general_purpose::STANDARD
        .decode(x5c[0].as_str().expect("str"))
        .expect("std b64");
    let pem = std::fs::read(env.state.join("ca/root.pem")).expect("root");
    assert_eq!(
        meshgate_control::inspect::pem_certificates(&pem).expect("pem")[0],
        der
    );
    assert_eq!(j["spiffe_sequence"], 1);
    assert_eq!(j["spiffe_refresh_hint"], 300);
}

#[test]
fn intermediate_under_an_openssl_root_verifies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root_key = dir.path().join("root.key");
    let root_cert = dir.path().join("root.pem");
    let keygen = openssl(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        s(&root_key),
    ]);
    assert!(
        keygen.status.success(),
        "{}",
        String::from_utf8_lossy(&keygen.stderr)
    );
    let req = openssl(&[
        "req",
        "-x509",
        "-new",
        "-key",
        s(&root_key),
        "-out",
        s(&root_cert),
        "-days",
        "30",
        "-subj",
        "/O=Operator/CN=Operator Root",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    assert!(
        req.status.success(),
        "{}",
        String::from_utf8_lossy(&req.stderr)
    );
    let state = dir.path().join("state");
    ok(&[
        "ca",
        "init",
        "--trust-domain",
        "corp.example",
        "--state-dir",
        s(&state),
        "--root-cert",
        s(&root_cert),
        "--root-key",
        s(&root_key),
    ]);
    assert!(
        !state.join("ca/root-key.pem").exists(),
        "the operator's root key is never stored"
    );
    let cert = dir.path().join("svid.pem");
    let key = dir.path().join("svid-key.pem");
    ok(&[
        "cert",
        "issue",
        "--state-dir",
        s(&state),
        "--spiffe-id",
        "spiffe://corp.example/db",
        "--cert",
        s(&cert),
        "--key",
        s(&key),
    ]);
    let bundle = dir.path().join("bundle.pem");
    ok(&[
        "bundle",
        "export",
        "--state-dir",
        s(&state),
        "--format",
        "pem",
        "--out",
        s(&bundle),
    ]);
    assert_eq!(
        std::fs::read(&bundle).expect("bundle"),
        std::fs::read(&root_cert).expect("root"),
        "bundle = operator root"
    );
    // svid.pem holds leaf + intermediate; openssl builds the chain from it.
    let v = openssl(&[
        "verify",
        "-CAfile",
        s(&bundle),
        "-untrusted",
        s(&cert),
        s(&cert),
    ]);
    assert!(
        v.status.success(),
        "{}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    let all: serde_json::Value =
        serde_json::from_str(&ok(&["cert", "inspect", s(&cert), "--all", "-o", "json"]))
            .expect("json");
    assert_eq!(all.as_array().expect("array").len(), 2);
    assert_eq!(all[1]["is_ca"], true);
    assert_eq!(all[1]["path_len_constraint"], 0);

    // A SEC1 key is refused with the conversion command.
    let sec1 = dir.path().join("root-sec1.key");
    assert!(
        openssl(&["ec", "-in", s(&root_key), "-out", s(&sec1)])
            .status
            .success()
    );
    let (code, err) = code_and_stderr(&[
        "ca",
        "init",
        "--trust-domain",
        "corp.example",
        "--state-dir",
        s(&dir.path().join("s2")),
        "--root-cert",
        s(&root_cert),
        "--root-key",
        s(&sec1),
    ]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("openssl pkcs8 -topk8"), "{err}");
}

#[test]
fn needs_renewal_exit_codes() {
    let env = Env::new();
    let (cert, _) = env.issue("spiffe://example.org/web", "svid", &["--ttl", "1h"]);
    assert_eq!(
        code_and_stderr(&["cert", "needs-renewal", s(&cert)]).0,
        1,
        "fresh: not yet"
    );
    // 30 s of backdating out of a 1h30s lifetime is past a 0.1% threshold.
    assert_eq!(
        code_and_stderr(&["cert", "needs-renewal", s(&cert), "--fraction", "0.001"]).0,
        0
    );
    assert_eq!(
        code_and_stderr(&["cert", "needs-renewal", s(&env.path("missing.pem"))]).0,
        64
    );
    std::fs::write(env.path("junk.pem"), "not a certificate").expect("write");
    assert_eq!(
        code_and_stderr(&["cert", "needs-renewal", s(&env.path("junk.pem"))]).0,
        64
    );
    assert_eq!(
        code_and_stderr(&["cert", "needs-renewal", s(&cert), "--fraction", "0"]).0,
        64
    );

    // Expired: a 1 s certificate, polled until it has expired (--fraction 1 = only when expired).
    let (short, _) = env.issue("spiffe://example.org/web", "short", &["--ttl", "1s"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, _) = code_and_stderr(&["cert", "needs-renewal", s(&short), "--fraction", "1"]);
        if code == 0 {
            break;
        }
        assert_eq!(code, 1);
        assert!(
            Instant::now() < deadline,
            "a 1s certificate never became due"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn concurrent_cli_processes_do_not_interleave_ledger_writes() {
    let env = Env::new();
    let out = env.path("out");
    std::fs::create_dir(&out).expect("mkdir");
    let children: Vec<_> = (0..3)
        .map(|i| {
            Command::new(bin())
                .args([
                    "cert",
                    "issue",
                    "--state-dir",
                    env.st(),
                    "--spiffe-id",
                    "spiffe://example.org/p",
                    "--cert",
                    s(&out.join(format!("c{i}.pem"))),
                    "--key",
                    s(&out.join(format!("k{i}.pem"))),
                    "--count",
                    "15",
                ])
                .output_async()
        })
        .collect();
    for c in children {
        let o = c.wait_with_output().expect("wait");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let ledger = Ca::open(&env.state)
        .expect("open")
        .ledger()
        .expect("ledger");
    assert_eq!(ledger.len(), 45);
    let serials: std::collections::HashSet<_> = ledger.iter().map(|e| e.serial.clone()).collect();
    assert_eq!(serials.len(), 45, "serial reused");
}

/// `Command::spawn` with piped output, so three children run at once.
trait SpawnPiped {
    fn output_async(&mut self) -> std::process::Child;
}

impl SpawnPiped for Command {
    fn output_async(&mut self) -> std::process::Child {
        self.env_remove("MESHGATE_STATE_DIR")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn meshgate")
    }
}
