//! Start-up on hosts that cannot run the dataplane: a clear error naming the cause and the fix,
//! exit 71, nothing half-started. The limits are imposed on the child process only
//! (setrlimit / a seccomp filter in `pre_exec`), never on the test machine.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_meshgate"))
}

fn with_memlock(args: &[&str], bytes: u64) -> Output {
    let mut cmd = Command::new(bin());
    cmd.args(args);
    // SAFETY: setrlimit is async-signal-safe; it only lowers this child's own limit.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: bytes,
                rlim_max: bytes,
            };
            if libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.output().expect("run meshgate")
}

/// Run meshgate with a seccomp filter that makes syscall `nr` fail with EPERM, as Docker's
/// default profile does for io_uring.
fn denying(nr: libc::c_long, args: &[&str]) -> Output {
    let mut cmd = Command::new(bin());
    cmd.args(args);
    // SAFETY: prctl with a filter program that lives on this closure's stack for the call; only
    // async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
            const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
            let nr = nr as u32;
            let mut filter = [
                // A = seccomp_data.nr
                libc::sock_filter {
                    code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
                    jt: 0,
                    jf: 0,
                    k: 0,
                },
                libc::sock_filter {
                    code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
                    jt: 0,
                    jf: 1,
                    k: nr,
                },
                libc::sock_filter {
                    code: (libc::BPF_RET | libc::BPF_K) as u16,
                    jt: 0,
                    jf: 0,
                    k: SECCOMP_RET_ERRNO | libc::EPERM as u32,
                },
                libc::sock_filter {
                    code: (libc::BPF_RET | libc::BPF_K) as u16,
                    jt: 0,
                    jf: 0,
                    k: SECCOMP_RET_ALLOW,
                },
            ];
            let prog = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_mut_ptr(),
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &prog as *const _ as usize,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.output().expect("run meshgate")
}

#[test]
fn low_memlock_is_named_with_the_fix() {
    let state = tempfile::tempdir().expect("tempdir");
    let state = state.path().to_str().expect("utf8").to_string();
    for args in [&["check"][..], &["run", "--state-dir", &state][..]] {
        let out = with_memlock(args, 64 * 1024);
        let err = String::from_utf8_lossy(&out.stderr);
        let text = format!("{}{err}", String::from_utf8_lossy(&out.stdout));
        assert_eq!(out.status.code(), Some(71), "meshgate {args:?}: {text}");
        assert!(
            text.contains("RLIMIT_MEMLOCK") && text.contains("LimitMEMLOCK"),
            "{text}"
        );
    }
}

/// `check` and `run` under a seccomp filter denying `nr` exit 71 naming `syscall` and seccomp.
fn assert_blocked_syscall_is_named(nr: libc::c_long, syscall: &str) {
    let state = tempfile::tempdir().expect("tempdir");
    let state_path = state.path().to_str().expect("utf8").to_string();
    for args in [&["check"][..], &["run", "--state-dir", &state_path][..]] {
        let out = denying(nr, args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(71), "meshgate {args:?}: {text}");
        assert!(text.contains(syscall) && text.contains("seccomp"), "{text}");
    }
}

#[test]
fn io_uring_blocked_by_seccomp_is_named_with_the_fix() {
    assert_blocked_syscall_is_named(libc::SYS_io_uring_setup, "io_uring_setup");
}

/// A profile that allows creating a ring but not entering it: caught by `check` (a NOP probe)
/// before any shard starts, not by a shard failing later.
#[test]
fn io_uring_enter_blocked_by_seccomp_is_named_with_the_fix() {
    assert_blocked_syscall_is_named(libc::SYS_io_uring_enter, "io_uring_enter");
}

/// `meshgate check` names the ring's setup flags. This kernel (5.11+ is required, the CI's is
/// newer) takes all four.
#[test]
fn check_reports_the_ring_mode() {
    let out = Command::new(bin())
        .args(["check", "-o", "json"])
        .output()
        .expect("run meshgate");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let mode = doc["ring_mode"].as_str().expect("ring_mode present");
    for flag in ["coop_taskrun", "taskrun_flag"] {
        assert!(mode.contains(flag), "{mode}");
    }
    assert!(
        mode.contains("single_issuer") == mode.contains("defer_taskrun"),
        "{mode}"
    );
}
