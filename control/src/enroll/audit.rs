//! The enrollment audit trail: one JSON object per attempt (enroll, renew, bundle fetch, refused
//! TLS handshake), with outcome, reason, token id, SPIFFE ID, peer address and serial.
//!
//! Each line goes to two places:
//! - a `tracing` event at INFO, target `meshgate::audit`, field `audit` = the JSON text (so it
//!   reaches the daemon's log on stderr / journald with everything else);
//! - an append-only file, by default `<state-dir>/audit/enrollment.jsonl` (0600, in a 0700
//!   directory), rotated to `enrollment.jsonl.1` when it passes [`AuditFile::max_bytes`]: the
//!   audit never takes more than twice that on disk.
//!
//! Never logged: join tokens (only their id), keys, CSRs. Audit writes never fail a request:
//! a write error is reported once through `tracing` and counted.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use time::OffsetDateTime;

use crate::clock::rfc3339;
use crate::state::mode;

/// Default size at which the audit file is rotated.
pub const DEFAULT_MAX_BYTES: u64 = 16 * 1024 * 1024;

/// One attempt.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AuditEvent {
    pub ts: String,
    /// `enroll`, `renew`, `bundle`, `tls` (a refused handshake), `http` (unroutable or
    /// malformed request).
    pub event: &'static str,
    /// `issued`, `served`, `refused`, `error`.
    pub outcome: &'static str,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    /// Operator-facing detail of a refusal (never secret material).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    pub peer: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_id: Option<String>,
    /// The identity asked for (enroll) or presented (renew).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
    /// Serial of the client certificate presented (renew, or any mTLS request).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_serial: Option<String>,
    /// Serial of the certificate issued.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_after: Option<String>,
    /// Renewal of an SVID that had expired, within the grace period.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub in_grace: bool,
}

impl AuditEvent {
    pub fn new(event: &'static str, peer: impl ToString, now: OffsetDateTime) -> AuditEvent {
        AuditEvent {
            ts: rfc3339(now),
            event,
            peer: peer.to_string(),
            ..Default::default()
        }
    }
}

/// The size-bounded audit file.
#[derive(Debug)]
pub struct AuditFile {
    pub path: PathBuf,
    pub max_bytes: u64,
}

#[derive(Debug)]
struct Open {
    file: File,
    len: u64,
}

/// Where audit lines go.
#[derive(Debug)]
pub struct AuditLog {
    file: Option<(AuditFile, Mutex<Option<Open>>)>,
    write_errors: AtomicU64,
}

fn open_append(path: &Path) -> std::io::Result<Open> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.exists()
    {
        crate::state::ensure_state_dir(dir).map_err(|e| e.source)?;
    }
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(mode::SECRET)
        .open(path)?;
    let len = file.metadata()?.len();
    Ok(Open { file, len })
}

impl AuditLog {
    /// Audit to `tracing` only.
    pub fn tracing_only() -> AuditLog {
        AuditLog {
            file: None,
            write_errors: AtomicU64::new(0),
        }
    }

    /// Audit to `tracing` and to `file`. The file is opened (created 0600) now, so a path that
    /// cannot be written is reported at start-up.
    pub fn with_file(file: AuditFile) -> std::io::Result<AuditLog> {
        let open = open_append(&file.path)?;
        Ok(AuditLog {
            file: Some((file, Mutex::new(Some(open)))),
            write_errors: AtomicU64::new(0),
        })
    }

    pub fn path(&self) -> Option<&Path> {
        self.file.as_ref().map(|(f, _)| f.path.as_path())
    }

    /// Audit lines that could not be written to the file.
    pub fn write_errors(&self) -> u64 {
        self.write_errors.load(Ordering::Relaxed)
    }

    pub fn record(&self, ev: &AuditEvent) {
        let line = match serde_json::to_string(ev) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(target: "meshgate::audit", error = %e, "cannot encode an audit event");
                return;
            }
        };
        tracing::info!(target: "meshgate::audit", audit = %line);
        let Some((cfg, open)) = &self.file else {
            return;
        };
        let mut guard = open.lock().unwrap_or_else(|p| p.into_inner());
        let result = (|| -> std::io::Result<()> {
            let need = line.len() as u64 + 1;
            let rotate = guard
                .as_ref()
                .is_some_and(|o| o.len > 0 && o.len + need > cfg.max_bytes);
            if rotate {
                *guard = None;
                let mut old = cfg.path.as_os_str().to_owned();
                old.push(".1");
                fs::rename(&cfg.path, PathBuf::from(old))?;
            }
            if guard.is_none() {
                *guard = Some(open_append(&cfg.path)?);
            }
            if let Some(o) = guard.as_mut() {
                let mut buf = line.into_bytes();
                buf.push(b'\n');
                o.file.write_all(&buf)?;
                o.len += buf.len() as u64;
            }
            Ok(())
        })();
        if let Err(e) = result {
            *guard = None;
            if self.write_errors.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::error!(
                    target: "meshgate::audit",
                    path = %cfg.path.display(),
                    error = %e,
                    "cannot write the audit file; audit lines still go to the log"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn appends_json_lines_and_rotates() {
        let d = tempfile::tempdir().expect("tempdir");
        let path = d.path().join("audit/enrollment.jsonl");
        let log = AuditLog::with_file(AuditFile {
            path: path.clone(),
            max_bytes: 400,
        })
        .expect("open");
        for i in 0..6 {
            let mut ev = AuditEvent::new("enroll", "127.0.0.1:5000", OffsetDateTime::UNIX_EPOCH);
            ev.outcome = "refused";
            ev.status = 403;
            ev.reason = Some("token_used");
            ev.token_id = Some(format!("0000000{i}"));
            log.record(&ev);
        }
        let cur = fs::read_to_string(&path).expect("read");
        let old = fs::read_to_string(d.path().join("audit/enrollment.jsonl.1")).expect("rotated");
        assert!(
            cur.len() <= 400 && old.len() <= 400,
            "{} {}",
            cur.len(),
            old.len()
        );
        let last: serde_json::Value =
            serde_json::from_str(cur.lines().last().expect("line")).expect("json");
        assert_eq!(last["token_id"], "00000005");
        assert_eq!(last["reason"], "token_used");
        assert_eq!(last["ts"], "1970-01-01T00:00:00Z");
        assert!(last.get("serial").is_none() && last.get("in_grace").is_none());
        assert_eq!(
            fs::metadata(&path).expect("meta").permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(log.write_errors(), 0);
    }
}
