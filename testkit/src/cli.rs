//! Running the `meshgate` binary (and the tools beside it) from a test, as an operator's
//! script would.
//!
//! Integration tests know the binary's path (`env!("CARGO_BIN_EXE_meshgate")`); testkit does
//! not, so every function takes it. `MESHGATE_STATE_DIR` is removed from the child's
//! environment so that a developer's own setting never leaks into a test.

use std::path::Path;
use std::process::{Command, Output};
use std::thread;
use std::time::{Duration, Instant};

/// `meshgate <args>`, waited for.
pub fn run(bin: &Path, args: &[&str]) -> Output {
    Command::new(bin)
        .args(args)
        .env_remove("MESHGATE_STATE_DIR")
        .output()
        .expect("run meshgate")
}

/// `meshgate <args>`, which must succeed; its stdout. A failure shows the exit code, stdout and
/// stderr.
pub fn ok(bin: &Path, args: &[&str]) -> String {
    let out = run(bin, args);
    assert!(
        out.status.success(),
        "meshgate {args:?} failed ({:?}): {}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf8 stdout")
}

/// `meshgate <args>`: its exit code (-1 if killed by a signal) and stderr.
pub fn code_and_stderr(bin: &Path, args: &[&str]) -> (i32, String) {
    let out = run(bin, args);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Another installed tool (`openssl`, `curl`, ...), waited for.
pub fn tool(name: &str, args: &[&str]) -> Output {
    Command::new(name)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{name} is installed: {e}"))
}

/// A path as `&str`, for command lines.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf8 path")
}

/// Poll `f` every 100 ms until it returns `Some`; fail the test naming `what` after `within`.
pub fn eventually<T>(within: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(100));
    }
}
