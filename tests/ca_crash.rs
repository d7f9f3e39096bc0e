//! Crash safety of issuance: `meshgate cert issue --count N` (one process issuing N
//! certificates in a row) is SIGKILLed at random instants until 1,000 issuances have been
//! recorded. After every kill: the CA opens, every state file parses, the CA key still matches
//! its certificate, no serial appears twice, and every certificate file that exists has its key
//! next to it and its serial in the ledger (the ledger entry is persisted before the files are
//! written). Finally a fresh issuance still verifies with openssl.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use meshgate_control::inspect::inspect_pem;
use meshgate_control::{Ca, Serial};
use meshgate_testkit::cli::s;

const TARGET: usize = 1000;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_meshgate"))
}

/// xorshift64*: reproducible kill points from a printed seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn between_ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo))
    }
}

/// Every invariant that must hold whenever no writer is running. `run` is the directory the
/// last (killed or finished) process wrote its certificates to; earlier runs were checked when
/// they ended and nothing writes there any more.
fn check_state(state: &Path, run: &Path) -> usize {
    let ca = Ca::open(state).unwrap_or_else(|e| panic!("state does not open after a kill: {e}"));
    let ledger = ca
        .ledger()
        .unwrap_or_else(|e| panic!("ledger does not parse after a kill: {e}"));
    let mut seen = HashSet::new();
    for e in &ledger {
        assert!(seen.insert(e.serial.clone()), "serial {} reused", e.serial);
    }
    ca.tokens().list().expect("tokens.json parses");
    ca.revocations().expect("revocations.json parses");
    ca.bundle().expect("bundle state parses");
    let crl = ca.crl_pem().expect("crl.pem readable");
    assert!(crl.starts_with("-----BEGIN X509 CRL-----"), "{crl}");

    let by_serial: HashMap<&Serial, _> = ledger.iter().map(|e| (&e.serial, e)).collect();
    let mut last = None;
    for entry in std::fs::read_dir(run).expect("ls run dir").flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(idx) = name.strip_prefix("svid.pem.") else {
            continue;
        };
        let idx: u32 = idx.parse().expect("index");
        let cert_pem = std::fs::read(entry.path()).expect("read cert");
        let info = &inspect_pem(&cert_pem).unwrap_or_else(|e| panic!("{name} is torn: {e}"))[0];
        let serial: Serial = info.serial.parse().expect("serial");
        let recorded = by_serial
            .get(&serial)
            .unwrap_or_else(|| panic!("{name}: serial {serial} not in the ledger"));
        assert_eq!(
            recorded.sha256_fingerprint, info.sha256_fingerprint,
            "{name}"
        );
        let key = std::fs::read_to_string(run.join(format!("key.pem.{idx}")))
            .unwrap_or_else(|e| panic!("{name} has no key: {e}"));
        assert!(
            key.starts_with("-----BEGIN PRIVATE KEY-----")
                && key.ends_with("-----END PRIVATE KEY-----\n"),
            "{name}: torn key"
        );
        last = last.max(Some(idx));
    }
    // The pair written last, where a kill lands, really belongs together.
    if let Some(idx) = last {
        let key = std::fs::read_to_string(run.join(format!("key.pem.{idx}"))).expect("key");
        assert_eq!(
            public_key_of_key(&key),
            public_key_of_cert(&run.join(format!("svid.pem.{idx}"))),
            "pair {idx}"
        );
    }
    ledger.len()
}

fn public_key_of_key(key_pem: &str) -> String {
    let mut child = Command::new("openssl")
        .args(["pkey", "-pubout"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("openssl");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(key_pem.as_bytes())
        .expect("write key");
    let out = child.wait_with_output().expect("openssl pkey");
    assert!(out.status.success(), "key does not parse");
    String::from_utf8(out.stdout).expect("utf8")
}

fn public_key_of_cert(cert: &Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-in", s(cert), "-noout", "-pubkey"])
        .output()
        .expect("openssl");
    String::from_utf8(out.stdout).expect("utf8")
}

#[test]
fn sigkill_during_1000_issuances_leaves_state_intact_and_no_serial_reused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let init = Command::new(bin())
        .args([
            "ca",
            "init",
            "--trust-domain",
            "example.org",
            "--state-dir",
            s(&state),
        ])
        .output()
        .expect("init");
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let key_before = std::fs::read(state.join("ca/root-key.pem")).expect("key");

    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as u64
        | 1;
    eprintln!("kill schedule seed: {seed:#x}");
    let mut rng = Rng(seed);
    let started = Instant::now();
    let mut runs = Vec::new();
    let mut kills = 0;
    let mut recorded = 0;
    while recorded < TARGET {
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "too slow: {recorded} issued after {kills} kills"
        );
        let run = dir.path().join(format!("run{}", runs.len()));
        std::fs::create_dir(&run).expect("mkdir");
        // Short batches while kills are still due, so that a kill lands inside a batch even
        // on a fast, idle machine (a long batch could finish before the kill).
        let batch = if kills < 40 {
            (TARGET - recorded).min(200)
        } else {
            TARGET - recorded
        };
        let remaining = batch.to_string();
        let mut child = Command::new(bin())
            .args([
                "cert",
                "issue",
                "--state-dir",
                s(&state),
                "--spiffe-id",
                "spiffe://example.org/crash",
                "--cert",
                s(&run.join("svid.pem")),
                "--key",
                s(&run.join("key.pem")),
                "--count",
                &remaining,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        runs.push(run);
        // The first 40 runs are killed at a random instant (so kills land at every step of an
        // issuance); the last one runs to completion.
        let wait = if kills < 40 {
            rng.between_ms(5, 150)
        } else {
            Duration::from_secs(3600)
        };
        let deadline = Instant::now() + wait;
        let finished = loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                break Some(status);
            }
            if Instant::now() >= deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        match finished {
            Some(status) => {
                let mut err = String::new();
                use std::io::Read;
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                assert!(status.success(), "issuance failed without a kill: {err}");
            }
            None => {
                child.kill().expect("SIGKILL");
                child.wait().expect("reap");
                kills += 1;
            }
        }
        recorded = check_state(&state, runs.last().expect("a run"));
    }
    eprintln!(
        "{recorded} issuances recorded across {} runs, {kills} SIGKILLs, {:?}",
        runs.len(),
        started.elapsed()
    );
    assert!(kills >= 20, "only {kills} kills landed");
    assert_eq!(
        std::fs::read(state.join("ca/root-key.pem")).expect("key"),
        key_before,
        "CA key changed"
    );

    // And the CA still works end to end.
    let cert = dir.path().join("after.pem");
    let key = dir.path().join("after-key.pem");
    let bundle = dir.path().join("bundle.pem");
    for args in [
        vec![
            "cert",
            "issue",
            "--state-dir",
            s(&state),
            "--spiffe-id",
            "spiffe://example.org/after",
            "--cert",
            s(&cert),
            "--key",
            s(&key),
        ],
        vec![
            "bundle",
            "export",
            "--state-dir",
            s(&state),
            "--format",
            "pem",
            "--out",
            s(&bundle),
        ],
    ] {
        let o = Command::new(bin()).args(&args).output().expect("run");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let v = Command::new("openssl")
        .args(["verify", "-CAfile", s(&bundle), s(&cert)])
        .output()
        .expect("openssl");
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));

    // No debris left once a writer has held the lock again.
    let leftovers: Vec<_> = ["", "ca", "ledger"]
        .iter()
        .flat_map(|d| std::fs::read_dir(state.join(d)).expect("ls").flatten())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp."))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
