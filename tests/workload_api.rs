//! The SPIFFE Workload API of `meshgate run` (`[control.workload_api]`), fetched by a real
//! SPIFFE client library: py-spiffe (`pip install spiffe`; .ci/run installs it and points
//! MESHGATE_TEST_PYTHON at that interpreter) and raw gRPC calls from grpcio.
//!
//! Shown: an unregistered caller gets PermissionDenied; a request without the
//! `workload.spiffe.io` metadata gets InvalidArgument; a caller registered by uid, then by
//! executable path, gets its SVID (verified by `openssl verify` against the CA) and the bundle;
//! the stream sends a new SVID at half its TTL; SIGTERM removes the socket.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use meshgate_testkit::cli::s;
use meshgate_testkit::{Meshgate, free_port};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_meshgate"))
}

fn meshgate(args: &[&str]) -> String {
    meshgate_testkit::cli::ok(bin(), args)
}

/// Run the py-spiffe client against `socket`; `wait_rotation` also waits for a second message.
fn fetch(socket: &Path, wait_rotation: bool) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/workload_api/fetch.py");
    let mut cmd = Command::new(meshgate_testkit::spiffe_python());
    cmd.arg(&script).arg(socket);
    if wait_rotation {
        cmd.arg("rotation");
    }
    let out = cmd.output().expect("run python3");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the Workload API client failed (needs `pip install spiffe`; set MESHGATE_TEST_PYTHON to an interpreter that has it): {stderr}"
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "client output: {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[test]
fn workload_api_serves_registered_callers_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    meshgate(&[
        "ca",
        "init",
        "--trust-domain",
        "example.org",
        "--state-dir",
        s(&state),
    ]);
    let socket: PathBuf = dir.path().join("run/workload.sock");
    let (admin, plain) = (free_port(), free_port());
    let config = format!(
        r#"version = 1

[admin]
address = "127.0.0.1:{admin}"

[control.workload_api]
socket = "{socket}"
svid_ttl = "6s"

[[listeners]]
name = "plain"
address = "127.0.0.1:{plain}"
protocol = "http"

[[routes]]
name = "ok"
listener = "plain"
direct_response = {{ status = 200, body = "ok\n" }}
"#,
        socket = s(&socket)
    );
    let mut mg = Meshgate::start_with_args(
        bin(),
        &config,
        format!("127.0.0.1:{admin}").parse().expect("addr"),
        &["--state-dir", s(&state)],
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(socket.exists(), "the socket is created at start");

    // Nobody is registered yet.
    let r = fetch(&socket, false);
    assert_eq!(
        r["no_header"], "INVALID_ARGUMENT: security header missing from request",
        "{r}"
    );
    assert_eq!(r["svid"], "PERMISSION_DENIED: no identity issued", "{r}");
    assert_eq!(r["bundles"], "PERMISSION_DENIED: no identity issued", "{r}");
    assert!(r["error"].is_string() && r["spiffe_id"].is_null(), "{r}");
    let uid = r["uid"].as_u64().expect("uid").to_string();
    let exe = r["exe"].as_str().expect("exe").to_owned();

    // By uid.
    let by_uid = "spiffe://example.org/workload/by-uid";
    meshgate(&[
        "workload",
        "register",
        "--state-dir",
        s(&state),
        "--spiffe-id",
        by_uid,
        "--uid",
        &uid,
    ]);
    let r = fetch(&socket, false);
    assert_eq!(r["spiffe_id"], by_uid, "{r}");
    assert_eq!(
        (&r["key_is_p256"], &r["key_matches_leaf"]),
        (&serde_json::json!(true), &serde_json::json!(true)),
        "{r}"
    );
    assert_eq!(
        r["bundle_trust_domains"],
        serde_json::json!(["example.org"]),
        "{r}"
    );
    assert_eq!(
        (r["svid"].as_str(), r["bundles"].as_str()),
        (Some("OK"), Some("OK"))
    );
    let cert = dir.path().join("fetched.pem");
    std::fs::write(&cert, r["cert_pem"].as_str().expect("pem")).expect("write");
    let verify = Command::new("openssl")
        .args(["verify", "-CAfile", s(&state.join("ca/root.pem")), s(&cert)])
        .output()
        .expect("openssl");
    assert!(
        verify.status.success(),
        "openssl verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let inspect: serde_json::Value =
        serde_json::from_str(&meshgate(&["cert", "inspect", s(&cert), "-o", "json"]))
            .expect("json");
    let leaf = if inspect.is_array() {
        &inspect[0]
    } else {
        &inspect
    };
    assert_eq!(leaf["spiffe_id"], by_uid, "{inspect}");

    // The stream sends a fresh SVID at half of the 6s TTL.
    let r = fetch(&socket, true);
    assert_eq!(r["rotated"], true, "{r}");

    // By executable (the interpreter running the client), under another ID.
    meshgate(&[
        "workload",
        "remove",
        "--state-dir",
        s(&state),
        "--spiffe-id",
        by_uid,
    ]);
    let by_exe = "spiffe://example.org/workload/by-exe";
    meshgate(&[
        "workload",
        "register",
        "--state-dir",
        s(&state),
        "--spiffe-id",
        by_exe,
        "--exe",
        &exe,
    ]);
    let listed: serde_json::Value = serde_json::from_str(&meshgate(&[
        "workload",
        "list",
        "--state-dir",
        s(&state),
        "-o",
        "json",
    ]))
    .expect("json");
    assert_eq!(listed[0]["selector"]["exe"], exe.as_str(), "{listed}");
    let r = fetch(&socket, false);
    assert_eq!(r["spiffe_id"], by_exe, "{r}");

    // Another executable's registration does not match this caller.
    meshgate(&[
        "workload",
        "remove",
        "--state-dir",
        s(&state),
        "--spiffe-id",
        by_exe,
    ]);
    meshgate(&[
        "workload",
        "register",
        "--state-dir",
        s(&state),
        "--spiffe-id",
        by_exe,
        "--exe",
        "/usr/bin/true",
    ]);
    let r = fetch(&socket, false);
    assert_eq!(r["svid"], "PERMISSION_DENIED: no identity issued", "{r}");

    // Every SVID it issued is in the ledger.
    let ledger: serde_json::Value = serde_json::from_str(&meshgate(&[
        "cert",
        "list",
        "--state-dir",
        s(&state),
        "--all",
        "-o",
        "json",
    ]))
    .expect("json");
    let from_api = ledger
        .as_array()
        .expect("array")
        .iter()
        .filter(|e| e["authorised_by"] == "operator:workload-api")
        .count();
    assert!(from_api >= 3, "{ledger}");

    let status = mg.terminate(Duration::from_secs(20)).expect("exit");
    assert!(status.success(), "{status}");
    assert!(!socket.exists(), "the socket is removed at exit");
}
