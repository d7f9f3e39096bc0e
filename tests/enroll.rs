//! Enrollment end to end, across real processes with real TLS: `meshgate ca serve`, `meshgate
//! agent`, join tokens from `meshgate token create`, and the tools an operator has (`openssl
//! verify`, `openssl req`, `curl` with the agent's files as client certificate).
//!
//! The rotation tests use a 10 s SVID TTL (the issue's 60 s x 10 renewals would take over ten
//! minutes; the schedule is relative to the lifetime, so a shorter one exercises the same
//! code): with `meshgate ca serve`, 6 renewals in a row, then the CA is stopped for longer than
//! a whole SVID lifetime (the identity expires meanwhile), then it returns and the agent
//! recovers by renewing within the server's renewal grace; finally the agent restarts from its
//! files with no token. With the CA inside `meshgate run` (`[control]`), 10 renewals in a row
//! while a workload calls through a gateway's mTLS listener without one failure, the same
//! outage and recovery, then revocation enforced by the gateways.

use meshgate_testkit::cli::{eventually, s, tool};
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_meshgate"))
}

fn ok(args: &[&str]) -> String {
    meshgate_testkit::cli::ok(bin(), args)
}

fn sigterm(child: &Child) {
    let pid = i32::try_from(child.id()).expect("pid");
    // SAFETY: kill(2) with a pid of a child this test spawned.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
}

fn wait_exit(child: &mut Child, within: Duration) -> i32 {
    eventually(within, "the process to exit", || {
        child
            .try_wait()
            .expect("wait")
            .map(|st| st.code().unwrap_or(-1))
    })
}

/// A CA in a temp directory.
struct Env {
    dir: tempfile::TempDir,
    state: PathBuf,
    ca_pem: PathBuf,
}

impl Env {
    fn new(default_ttl: &str) -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        ok(&[
            "ca",
            "init",
            "--trust-domain",
            "example.org",
            "--state-dir",
            s(&state),
            "--default-ttl",
            default_ttl,
            "--max-ttl",
            "1h",
        ]);
        let ca_pem = dir.path().join("ca.pem");
        ok(&[
            "bundle",
            "export",
            "--state-dir",
            s(&state),
            "--format",
            "pem",
            "--out",
            s(&ca_pem),
        ]);
        Env { dir, state, ca_pem }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A join token for `id`, written to a file.
    fn token_file(&self, id: &str, name: &str) -> PathBuf {
        let token = ok(&[
            "token",
            "create",
            "--state-dir",
            s(&self.state),
            "--spiffe-id",
            id,
        ]);
        let p = self.path(name);
        std::fs::write(&p, token.trim()).expect("write token");
        p
    }

    fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.state.join("audit/enrollment.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
            .collect()
    }
}

/// `meshgate ca serve` as a child process.
struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn start(env: &Env, listen: &str, extra: &[&str]) -> Server {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(env.path("serve.log"))
            .expect("log");
        let mut child = Command::new(bin())
            .args([
                "ca",
                "serve",
                "--state-dir",
                s(&env.state),
                "--listen",
                listen,
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn ca serve");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("ca serve prints its address");
        // "listening on https://127.0.0.1:PORT as spiffe://..."
        let port = line
            .split_whitespace()
            .nth(2)
            .and_then(|u| u.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {line:?}"));
        Server { child, port }
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    fn stop(mut self) {
        sigterm(&self.child);
        assert_eq!(
            wait_exit(&mut self.child, Duration::from_secs(20)),
            0,
            "ca serve exits 0 on SIGTERM"
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent_cmd(env: &Env, server: &str, id: &str, out: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(bin());
    c.args([
        "agent",
        "--server",
        server,
        "--spiffe-id",
        id,
        "--out",
        s(out),
    ])
    .args(extra)
    .env_remove("MESHGATE_LOG")
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(env.path("agent.log"))
            .expect("log"),
    );
    c
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serial_of(pem_path: &Path) -> Option<String> {
    let pem = std::fs::read(pem_path).ok()?;
    meshgate_control::inspect::inspect_pem(&pem)
        .ok()?
        .first()
        .map(|c| c.serial.clone())
}

fn openssl_verify(dir: &Path) {
    let out = tool(
        "openssl",
        &[
            "verify",
            "-CAfile",
            s(&dir.join("bundle.pem")),
            s(&dir.join("svid.pem")),
        ],
    );
    assert!(
        out.status.success(),
        "openssl verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// curl with the agent's files as client certificate (from one generation directory, so the
/// certificate and key always match). Returns (status, headers+body).
fn curl_mtls(gen_dir: &Path, url: &str) -> (u16, String) {
    let out = tool(
        "curl",
        &[
            "-sS",
            "-D",
            "-",
            "--max-time",
            "10",
            "--cacert",
            s(&gen_dir.join("bundle.pem")),
            "--cert",
            s(&gen_dir.join("svid.pem")),
            "--key",
            s(&gen_dir.join("svid_key.pem")),
            url,
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "curl failed: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    (status, text)
}

/// curl without a client certificate; returns (status, body).
fn curl(ca: &Path, args: &[&str], url: &str) -> (u16, String) {
    let mut all = vec![
        "-sS",
        "--max-time",
        "10",
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
        "--cacert",
        s(ca),
    ];
    all.extend_from_slice(args);
    all.push(url);
    let out = tool("curl", &all);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (
        code.trim()
            .parse()
            .unwrap_or_else(|_| panic!("curl: {text} {}", String::from_utf8_lossy(&out.stderr))),
        body.to_owned(),
    )
}

fn current_gen(out: &Path) -> PathBuf {
    out.join(std::fs::read_link(out.join("current")).expect("current link"))
}

#[test]
fn agent_enrolls_with_a_token_files_verify_and_work_with_curl_refusals_have_reasons() {
    let t0 = Instant::now();
    let env = Env::new("1h");
    let server = Server::start(&env, "127.0.0.1:0", &[]);
    let vm = "spiffe://example.org/vm/1";
    let token = env.token_file(vm, "token");
    let out = env.path("out");

    // Enroll once (--once: exit when an identity is in place).
    let status = agent_cmd(
        &env,
        &server.url(),
        vm,
        &out,
        &[
            "--token-file",
            s(&token),
            "--ca-bundle",
            s(&env.ca_pem),
            "--once",
        ],
    )
    .status()
    .expect("agent");
    assert_eq!(status.code(), Some(0), "agent --once");
    for f in ["svid.pem", "svid_key.pem", "bundle.pem"] {
        assert!(out.join(f).exists(), "{f}");
    }
    let key_mode = std::fs::metadata(out.join("svid_key.pem"))
        .expect("key")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(key_mode, 0o600);
    openssl_verify(&out);
    let inspect: serde_json::Value = serde_json::from_str(&ok(&[
        "cert",
        "inspect",
        s(&out.join("svid.pem")),
        "-o",
        "json",
    ]))
    .expect("json");
    assert_eq!(inspect["spiffe_id"], vm);

    // The SVID is a valid mTLS client certificate for meshgate's verifier.
    let (code, text) = curl_mtls(&current_gen(&out), &format!("{}/v1/bundle", server.url()));
    assert_eq!(code, 200, "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains(&format!("meshgate-peer-spiffe-id: {vm}")),
        "{text}"
    );

    // The token cannot be used twice: a second agent is refused with the reason, exit 77.
    let out2 = env.path("out2");
    let second = agent_cmd(
        &env,
        &server.url(),
        vm,
        &out2,
        &["--token-file", s(&token), "--ca-bundle", s(&env.ca_pem)],
    )
    .stderr(Stdio::piped())
    .output()
    .expect("agent");
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(77), "{err}");
    assert!(
        err.contains("token_used") && err.contains("already used"),
        "{err}"
    );
    assert!(!out2.join("svid.pem").exists());

    // A CSR for another identity (made with openssl) is refused, and does not spend the token.
    let vm2 = "spiffe://example.org/vm/2";
    let token2 = std::fs::read_to_string(env.token_file(vm2, "token2")).expect("token");
    let csr = env.path("other.csr");
    let made = tool(
        "openssl",
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            s(&env.path("other.key")),
            "-subj",
            "/O=test",
            "-addext",
            "subjectAltName=URI:spiffe://example.org/vm/3",
            "-out",
            s(&csr),
        ],
    );
    assert!(made.status.success(), "{made:?}");
    let body = serde_json::json!({
        "token": token2,
        "spiffe_id": vm2,
        "csr_pem": std::fs::read_to_string(&csr).expect("csr"),
    });
    std::fs::write(env.path("other.json"), body.to_string()).expect("json");
    let data = format!("@{}", s(&env.path("other.json")));
    let enroll_url = format!("{}/v1/enroll", server.url());
    let (code, body) = curl(
        &env.ca_pem,
        &[
            "-H",
            "content-type: application/json",
            "--data-binary",
            &data,
        ],
        &enroll_url,
    );
    assert_eq!(code, 403, "{body}");
    assert!(
        body.contains("\"error\":\"csr_identity_mismatch\""),
        "{body}"
    );
    let tokens: serde_json::Value = serde_json::from_str(&ok(&[
        "token",
        "list",
        "--state-dir",
        s(&env.state),
        "-o",
        "json",
    ]))
    .expect("json");
    let t2 = tokens
        .as_array()
        .expect("array")
        .iter()
        .find(|t| t["spiffe_id"] == vm2)
        .expect("token 2");
    assert_eq!(
        t2["status"], "active",
        "a refused CSR must not spend the token"
    );

    // Garbage is a 400, never a crash; renewal without a client certificate is a 401.
    let (code, body) = curl(&env.ca_pem, &["--data-binary", "garbage"], &enroll_url);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("bad_request"), "{body}");
    let (code, body) = curl(
        &env.ca_pem,
        &["--data-binary", "{\"csr_pem\":\"x\"}"],
        &format!("{}/v1/renew", server.url()),
    );
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("client_certificate_required"), "{body}");
    let (code, _) = curl(&env.ca_pem, &[], &format!("{}/v1/bundle", server.url()));
    assert_eq!(code, 200, "the server survived all of it");

    // One audit line per attempt, with the reasons.
    let audit = env.audit();
    let reasons: BTreeSet<String> = audit
        .iter()
        .filter_map(|l| l["reason"].as_str().map(str::to_owned))
        .collect();
    for r in [
        "token_used",
        "csr_identity_mismatch",
        "bad_request",
        "client_certificate_required",
    ] {
        assert!(reasons.contains(r), "{r} not audited: {reasons:?}");
    }
    assert!(audit.iter().any(|l| l["event"] == "enroll"
        && l["outcome"] == "issued"
        && l["spiffe_id"] == vm
        && l["serial"].as_str() == serial_of(&out.join("svid.pem")).as_deref()));
    server.stop();
    eprintln!("enroll test took {:?}", t0.elapsed());
}

#[test]
fn enrollment_attempts_are_rate_limited_with_429_and_retry_after() {
    let env = Env::new("1h");
    let server = Server::start(
        &env,
        "127.0.0.1:0",
        &["--per-source-burst", "3", "--per-source-per-minute", "6"],
    );
    let url = format!("{}/v1/enroll", server.url());
    let mut codes = Vec::new();
    let mut last = String::new();
    for _ in 0..5 {
        let out = tool(
            "curl",
            &[
                "-sS",
                "-D",
                "-",
                "--max-time",
                "10",
                "--cacert",
                s(&env.ca_pem),
                "--data-binary",
                "{}",
                &url,
            ],
        );
        last = String::from_utf8_lossy(&out.stdout).into_owned();
        codes.push(
            last.split_whitespace()
                .nth(1)
                .and_then(|c| c.parse::<u16>().ok())
                .expect("status"),
        );
    }
    assert_eq!(codes, vec![400, 400, 400, 429, 429], "{last}");
    // 6 per minute: a token every 10 s, less the time the requests took (a loaded machine).
    let retry_after: u64 = last
        .to_ascii_lowercase()
        .lines()
        .find_map(|l| l.strip_prefix("retry-after: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Retry-After: {last}"));
    assert!((5..=10).contains(&retry_after), "{last}");
    assert!(last.contains("\"error\":\"rate_limited\""), "{last}");
    assert!(
        env.audit()
            .iter()
            .any(|l| l["reason"] == "rate_limited" && l["status"] == 429)
    );
    server.stop();
}

#[test]
fn agent_renews_repeatedly_survives_a_ca_outage_longer_than_a_lifetime_and_restarts_from_files() {
    const TTL_SECS: u64 = 10;
    const RENEWALS: usize = 6;
    let t0 = Instant::now();
    let env = Env::new(&format!("{TTL_SECS}s"));
    // The prober below calls several times a second from 127.0.0.1.
    let limits = [
        "--per-source-burst",
        "1000",
        "--per-source-per-minute",
        "60000",
    ];
    let server = Server::start(&env, "127.0.0.1:0", &limits);
    let port = server.port;
    let vm = "spiffe://example.org/vm/rotating";
    let token = env.token_file(vm, "token");
    let out = env.path("out");
    let hook_log = env.path("rotations.log");
    let on_rotate = format!("echo \"$MESHGATE_SERIAL\" >> {}", s(&hook_log));
    let mut agent = Running(
        agent_cmd(
            &env,
            &server.url(),
            vm,
            &out,
            &[
                "--token-file",
                s(&token),
                "--ca-bundle",
                s(&env.ca_pem),
                "--on-rotate",
                &on_rotate,
            ],
        )
        .spawn()
        .expect("agent"),
    );

    // A workload calling over mTLS with whatever identity is current, all along the renewals:
    // not one call may fail.
    let probing = Arc::new(AtomicBool::new(true));
    let prober = {
        let (probing, out, url) = (probing.clone(), out.clone(), server.url());
        std::thread::spawn(move || {
            let mut calls = 0u32;
            while probing.load(Ordering::SeqCst) {
                if out.join("current").exists() {
                    let (code, text) = curl_mtls(&current_gen(&out), &format!("{url}/v1/bundle"));
                    assert_eq!(code, 200, "a workload call failed: {text}");
                    calls += 1;
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            calls
        })
    };

    // Enrollment, then RENEWALS renewals in a row at ~half-life; after each one the files
    // verify and work as an mTLS client certificate.
    let svid = out.join("svid.pem");
    let mut seen: Vec<String> = Vec::new();
    let phase = Instant::now();
    while seen.len() < RENEWALS + 1 {
        let serial = eventually(
            Duration::from_secs(3 * TTL_SECS),
            "the next rotation",
            || serial_of(&svid).filter(|s| seen.last() != Some(s)),
        );
        let gen_dir = current_gen(&out);
        openssl_verify(&gen_dir);
        let (code, text) = curl_mtls(&gen_dir, &format!("{}/v1/bundle", server.url()));
        assert_eq!(code, 200, "the workload's mTLS call failed: {text}");
        seen.push(serial);
    }
    probing.store(false, Ordering::SeqCst);
    let calls = prober.join().expect("every workload call succeeded");
    assert!(calls >= 20, "only {calls} workload calls");
    eprintln!("{calls} workload mTLS calls during the renewals, all 200");
    let per_rotation = phase.elapsed() / u32::try_from(RENEWALS).expect("small");
    eprintln!(
        "{RENEWALS} renewals at TTL {TTL_SECS}s in {:?} ({per_rotation:?} each)",
        phase.elapsed()
    );
    assert!(
        per_rotation >= Duration::from_secs(TTL_SECS * 4 / 10)
            && per_rotation <= Duration::from_secs(TTL_SECS * 7 / 10),
        "renewals should come at about half of the {TTL_SECS}s lifetime, got {per_rotation:?}"
    );

    // The CA goes away right after a renewal and stays away longer than a whole lifetime.
    let last = seen.last().cloned().expect("serial");
    let gen_before = current_gen(&out);
    server.stop();
    let down = Instant::now();
    std::thread::sleep(Duration::from_secs(TTL_SECS + 3));
    assert!(
        agent.0.try_wait().expect("wait").is_none(),
        "the agent must keep running while the CA is away"
    );
    assert_eq!(
        serial_of(&svid).as_deref(),
        Some(last.as_str()),
        "the last identity stays in place"
    );
    assert_eq!(current_gen(&out), gen_before);
    eprintln!("CA down for {:?}", down.elapsed());

    // It returns on the same address: the agent renews its (now expired) SVID within the
    // server's renewal grace, without a token.
    let server = Server::start(&env, &format!("127.0.0.1:{port}"), &limits);
    let back = Instant::now();
    let recovered = eventually(Duration::from_secs(60), "recovery after the outage", || {
        serial_of(&svid).filter(|s| *s != last)
    });
    eprintln!("recovered {:?} after the CA returned", back.elapsed());
    openssl_verify(&current_gen(&out));
    let (code, _) = curl_mtls(&current_gen(&out), &format!("{}/v1/bundle", server.url()));
    assert_eq!(code, 200);
    assert!(
        env.audit().iter().any(|l| l["event"] == "renew"
            && l["in_grace"] == true
            && l["peer_serial"] == last.as_str()),
        "the recovery is a grace renewal of the last SVID"
    );

    // Restart: SIGTERM, then start again with no token and no --ca-bundle: it resumes from
    // its files and keeps renewing.
    sigterm(&agent.0);
    assert_eq!(wait_exit(&mut agent.0, Duration::from_secs(10)), 0);
    let tokens_used_before = token_authorised(&env);
    let _agent = Running(
        agent_cmd(&env, &server.url(), vm, &out, &[])
            .spawn()
            .expect("agent"),
    );
    let after_restart = eventually(
        Duration::from_secs(3 * TTL_SECS),
        "a renewal after the restart",
        || serial_of(&svid).filter(|s| *s != recovered),
    );
    openssl_verify(&current_gen(&out));
    assert_eq!(
        token_authorised(&env),
        tokens_used_before,
        "no enrollment with a token after the restart"
    );
    let ledger: serde_json::Value = serde_json::from_str(&ok(&[
        "cert",
        "list",
        "--state-dir",
        s(&env.state),
        "--all",
        "-o",
        "json",
    ]))
    .expect("json");
    let entry = ledger
        .as_array()
        .expect("array")
        .iter()
        .find(|e| e["serial"] == after_restart.as_str())
        .expect("ledger entry");
    assert_eq!(entry["authorised_by"], format!("renewal:{recovered}"));
    let log = std::fs::read_to_string(env.path("agent.log")).expect("agent log");
    assert!(log.contains("resuming from the identity on disk"), "{log}");

    // The on-rotate hook ran once per rotation (enrollment, renewals, recovery).
    let hooks = eventually(Duration::from_secs(5), "the hooks", || {
        let lines = std::fs::read_to_string(&hook_log).ok()?;
        let n = lines.lines().count();
        (n >= RENEWALS + 2).then_some(lines)
    });
    assert!(hooks.lines().any(|l| l == recovered), "{hooks}");
    drop(server);
    eprintln!("rotation test took {:?}", t0.elapsed());
}

/// Ledger entries authorised by a join token.
fn token_authorised(env: &Env) -> usize {
    let ledger: serde_json::Value = serde_json::from_str(&ok(&[
        "cert",
        "list",
        "--state-dir",
        s(&env.state),
        "--all",
        "-o",
        "json",
    ]))
    .expect("json");
    ledger
        .as_array()
        .expect("array")
        .iter()
        .filter(|e| {
            e["authorised_by"]
                .as_str()
                .is_some_and(|a| a.starts_with("token:"))
        })
        .count()
}

// ---- the control plane inside `meshgate run` ----

/// An `http` listener answering `ok`, and an mTLS `tls` listener in front of it that requires
/// an SVID of example.org (roots `bundle`, revocations `crl`); optional `[control]` text.
fn gateway_config(
    admin: u16,
    plain: u16,
    mtls: u16,
    bundle: &Path,
    crl: &Path,
    control: &str,
) -> String {
    format!(
        r#"version = 1
{control}
[admin]
address = "127.0.0.1:{admin}"

[[listeners]]
name = "plain"
address = "127.0.0.1:{plain}"
protocol = "http"

[[listeners]]
name = "mtls"
address = "127.0.0.1:{mtls}"
protocol = "tls"

[listeners.tls]
client_auth = "required"
trust_bundles = [{{ trust_domain = "example.org", bundle = "{bundle}", crl = "{crl}" }}]

[[routes]]
name = "ok"
listener = "plain"
direct_response = {{ status = 200, body = "ok\n" }}

[[routes]]
name = "in"
listener = "mtls"
cluster = "plain"

[[clusters]]
name = "plain"
endpoints = ["127.0.0.1:{plain}"]
"#,
        bundle = s(bundle),
        crl = s(crl),
    )
}

fn control_section(enroll: u16) -> String {
    format!(
        "[control]\ntrust_domain = \"example.org\"\n\n[control.enrollment]\naddress = \"127.0.0.1:{enroll}\"\n"
    )
}

/// A call through a gateway's mTLS listener (served as `localhost` by its local CA, `root`)
/// with `cert`/`key`: Ok(body) or Err(curl's complaint).
fn call_gateway(root: &Path, cert: &Path, key: &Path, port: u16) -> Result<String, String> {
    let resolve = format!("localhost:{port}:127.0.0.1");
    let url = format!("https://localhost:{port}/");
    let out = tool(
        "curl",
        &[
            "-sS",
            "--fail",
            "--max-time",
            "10",
            "--resolve",
            &resolve,
            "--cacert",
            s(root),
            "--cert",
            s(cert),
            "--key",
            s(key),
            &url,
        ],
    );
    let body = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() && body == "ok\n" {
        Ok(body)
    } else {
        Err(format!(
            "curl {}: {body}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn start_gateway(config: &str, admin: u16, state: Option<&Path>) -> meshgate_testkit::Meshgate {
    let admin_addr = format!("127.0.0.1:{admin}").parse().expect("addr");
    let extra: Vec<&str> = match state {
        Some(dir) => vec!["--state-dir", s(dir)],
        None => vec![],
    };
    meshgate_testkit::Meshgate::start_with_args(bin(), config, admin_addr, &extra)
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// The issue's scenario with the CA inside `meshgate run` (`[control]`): an agent enrolls with
/// a token at the daemon's enrollment server and renews 10 times in a row (10 s SVID TTL
/// instead of 60 s, to keep the test near a minute) while a workload calls through another
/// gateway's mTLS listener with the current identity, never failing; the token cannot be used
/// twice; the CA daemon stops (cleanly, exit 0) for longer than a lifetime and the agent
/// recovers when it returns; a revoked certificate is refused once the CRL is published (at
/// once by the CA daemon, whose control thread watches the CRL; after a reload by the other
/// gateway), a non-revoked one still passes; a reload that changes `[control]` is refused.
#[test]
fn run_with_control_enrolls_renews_and_enforces_revocation() {
    const TTL_SECS: u64 = 10;
    const RENEWALS: usize = 10;
    let env = Env::new(&format!("{TTL_SECS}s"));
    let port = meshgate_testkit::free_port;
    let (ca_admin, ca_plain, ca_mtls, enroll) = (port(), port(), port(), port());
    let (gw_admin, gw_plain, gw_mtls) = (port(), port(), port());
    let crl = env.state.join("crl.pem");
    let ca_config = gateway_config(
        ca_admin,
        ca_plain,
        ca_mtls,
        &env.state.join("ca/root.pem"),
        &crl,
        &control_section(enroll),
    );
    let mut ca = start_gateway(&ca_config, ca_admin, Some(&env.state));
    let gw = start_gateway(
        &gateway_config(gw_admin, gw_plain, gw_mtls, &env.ca_pem, &crl, ""),
        gw_admin,
        None,
    );
    let gw_root = gw.dir.path().join("state/ca/root.pem");
    let ca_root = env.state.join("ca/root.pem");
    let server = format!("https://127.0.0.1:{enroll}");

    let vm = "spiffe://example.org/vm/behind-gateway";
    let token = env.token_file(vm, "token");
    let out = env.path("out");
    let mut agent = Running(
        agent_cmd(
            &env,
            &server,
            vm,
            &out,
            &["--token-file", s(&token), "--ca-bundle", s(&env.ca_pem)],
        )
        .spawn()
        .expect("agent"),
    );

    // The workload: calls through the gateway with whatever identity is current.
    let probing = Arc::new(AtomicBool::new(true));
    let prober = {
        let (probing, out, root) = (probing.clone(), out.clone(), gw_root.clone());
        std::thread::spawn(move || {
            let mut calls = 0u32;
            while probing.load(Ordering::SeqCst) {
                if out.join("current").exists() {
                    let g = current_gen(&out);
                    if let Err(e) =
                        call_gateway(&root, &g.join("svid.pem"), &g.join("svid_key.pem"), gw_mtls)
                    {
                        panic!("a workload call failed while its identity was valid: {e}");
                    }
                    calls += 1;
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            calls
        })
    };
    let svid = out.join("svid.pem");
    let mut seen: Vec<String> = Vec::new();
    let phase = Instant::now();
    while seen.len() < RENEWALS + 1 {
        let serial = eventually(
            Duration::from_secs(3 * TTL_SECS),
            "the next rotation",
            || serial_of(&svid).filter(|s| seen.last() != Some(s)),
        );
        seen.push(serial);
    }
    probing.store(false, Ordering::SeqCst);
    let calls = prober.join().expect("every workload call succeeded");
    eprintln!(
        "enrollment + {RENEWALS} renewals at TTL {TTL_SECS}s in {:?}; {calls} calls through the gateway, all 200",
        phase.elapsed()
    );
    assert!(calls >= 40, "only {calls} workload calls");
    let g = current_gen(&out);
    openssl_verify(&g);
    call_gateway(
        &ca_root,
        &g.join("svid.pem"),
        &g.join("svid_key.pem"),
        ca_mtls,
    )
    .expect("the CA daemon's own mTLS listener");

    // The token is spent: a second enrollment with it is refused for good (exit 77).
    let again = agent_cmd(
        &env,
        &server,
        vm,
        &env.path("out2"),
        &[
            "--token-file",
            s(&token),
            "--ca-bundle",
            s(&env.ca_pem),
            "--once",
        ],
    )
    .status()
    .expect("agent --once");
    assert_eq!(again.code(), Some(77), "a reused token must be refused");

    // A reload that changes [control] is refused; the rest keeps running.
    std::fs::write(
        &ca.config_path,
        ca_config.replace(&format!(":{enroll}\""), &format!(":{}\"", port())),
    )
    .expect("edit");
    ca.signal(libc::SIGHUP);
    eventually(Duration::from_secs(10), "the refused reload", || {
        ca.log().contains("[control] changed").then_some(())
    });
    std::fs::write(&ca.config_path, &ca_config).expect("restore");

    // The CA daemon stops for longer than a lifetime; the agent keeps its last identity and
    // renews (within the grace) when the CA is back.
    let last = seen.last().cloned().expect("serial");
    let status = ca.terminate(Duration::from_secs(30)).expect("exit");
    assert!(
        status.success(),
        "meshgate run exits 0 on SIGTERM: {status}"
    );
    assert!(
        ca.log().contains("enrollment server stopped"),
        "{}",
        ca.log()
    );
    std::thread::sleep(Duration::from_secs(TTL_SECS + 3));
    assert!(
        agent.0.try_wait().expect("wait").is_none(),
        "the agent keeps running"
    );
    assert_eq!(serial_of(&svid).as_deref(), Some(last.as_str()));
    let ca = start_gateway(&ca_config, ca_admin, Some(&env.state));
    let recovered = eventually(Duration::from_secs(60), "recovery after the outage", || {
        serial_of(&svid).filter(|s| *s != last)
    });
    let g = current_gen(&out);
    call_gateway(
        &gw_root,
        &g.join("svid.pem"),
        &g.join("svid_key.pem"),
        gw_mtls,
    )
    .expect("calls work again after the recovery");
    eprintln!("recovered with serial {recovered}");
    drop(agent);

    // Revocation: two client certificates; one is revoked.
    let issue = |name: &str| {
        let (cert, key) = (
            env.path(&format!("{name}.pem")),
            env.path(&format!("{name}_key.pem")),
        );
        ok(&[
            "cert",
            "issue",
            "--state-dir",
            s(&env.state),
            "--spiffe-id",
            &format!("spiffe://example.org/client/{name}"),
            "--cert",
            s(&cert),
            "--key",
            s(&key),
            "--ttl",
            "10m",
        ]);
        (cert, key)
    };
    let (revoked, revoked_key) = issue("revoked");
    let (kept, kept_key) = issue("kept");
    for (root, p) in [(&gw_root, gw_mtls), (&ca_root, ca_mtls)] {
        call_gateway(root, &revoked, &revoked_key, p).expect("not revoked yet");
        call_gateway(root, &kept, &kept_key, p).expect("valid");
    }
    let serial = serial_of(&revoked).expect("serial");
    ok(&["cert", "revoke", "--state-dir", s(&env.state), &serial]);
    // The CA daemon re-reads the CRL by itself.
    eventually(
        Duration::from_secs(10),
        "the CA daemon refuses the revoked certificate",
        || call_gateway(&ca_root, &revoked, &revoked_key, ca_mtls).err(),
    );
    call_gateway(&ca_root, &kept, &kept_key, ca_mtls).expect("the other one still passes");
    // The other gateway after a reload.
    gw.signal(libc::SIGHUP);
    let refused = eventually(
        Duration::from_secs(10),
        "the gateway refuses the revoked certificate",
        || call_gateway(&gw_root, &revoked, &revoked_key, gw_mtls).err(),
    );
    eprintln!("revoked certificate refused: {refused}");
    call_gateway(&gw_root, &kept, &kept_key, gw_mtls).expect("the other one still passes");
    let revoked_refusals = meshgate_testkit::metric_sum(
        &gw.metrics(),
        "meshgate_tls_peer_verifications_total",
        &[("result", "revoked")],
    );
    assert!(
        revoked_refusals >= 1.0,
        "a refusal by revocation is counted"
    );
    drop(ca);
}
