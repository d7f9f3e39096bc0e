//! Where each piece of CA state lives inside the state directory (documented in
//! docs/state-dir.md), and the advisory lock that serialises writers.
//!
//! Readers never lock: every file is replaced whole by [`crate::state::write_atomic`], so a
//! reader sees the previous or the next version. Writers (issue, revoke, token create/redeem,
//! init) hold [`StateLock`] across their read-modify-write, so two processes (two CLI
//! invocations, or the CLI and the enrollment server) never interleave.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::state::mode;

/// Paths inside a state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        StateDir { root: root.into() }
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn lock(&self) -> PathBuf {
        self.root.join("lock")
    }
    pub fn ca_dir(&self) -> PathBuf {
        self.root.join("ca")
    }
    /// CA settings; written last by `ca init`, so its presence marks a complete CA.
    pub fn config(&self) -> PathBuf {
        self.ca_dir().join("config.json")
    }
    /// The trust anchor: our self-signed root, or the operator's root in intermediate mode.
    pub fn root_cert(&self) -> PathBuf {
        self.ca_dir().join("root.pem")
    }
    /// Present only when meshgate generated the root (root mode).
    pub fn root_key(&self) -> PathBuf {
        self.ca_dir().join("root-key.pem")
    }
    /// Present only in intermediate mode.
    pub fn intermediate_cert(&self) -> PathBuf {
        self.ca_dir().join("intermediate.pem")
    }
    pub fn intermediate_key(&self) -> PathBuf {
        self.ca_dir().join("intermediate-key.pem")
    }
    /// CA rotation in progress (root mode): the new root, from `ca rotate prepare` until
    /// `ca rotate retire` makes it `root.pem`.
    pub fn next_root_cert(&self) -> PathBuf {
        self.ca_dir().join("next-root.pem")
    }
    pub fn next_root_key(&self) -> PathBuf {
        self.ca_dir().join("next-root-key.pem")
    }
    /// The rotation's phase; absent when no rotation is in progress.
    pub fn rotation(&self) -> PathBuf {
        self.ca_dir().join("rotation.json")
    }
    /// Federated trust domains (`meshgate trust add`): `trust/<td>/...`.
    pub fn trust_dir(&self) -> PathBuf {
        self.root.join("trust")
    }
    pub fn ledger_dir(&self) -> PathBuf {
        self.root.join("ledger")
    }
    pub fn revocations(&self) -> PathBuf {
        self.root.join("revocations.json")
    }
    pub fn crl(&self) -> PathBuf {
        self.root.join("crl.pem")
    }
    pub fn tokens(&self) -> PathBuf {
        self.root.join("tokens.json")
    }
    pub fn bundle_state(&self) -> PathBuf {
        self.root.join("bundle.json")
    }

    /// Files and directories of the CA in the state directory.
    pub(crate) const CA_NAMES: &'static [&'static str] = &[
        "lock",
        "ca",
        "ledger",
        "revocations.json",
        "crl.pem",
        "tokens.json",
        "bundle.json",
    ];

    /// Other meshgate state that may share the directory (the gateway's config history, the
    /// enrollment server's audit trail).
    const OTHER_NAMES: &'static [&'static str] = &["config-history", "audit", "trust"];

    /// Whether `ca init` may use a directory holding an entry of this name: meshgate's own
    /// state, or a temp file left by a killed writer. Anything else means the operator pointed
    /// us at a directory that is not ours, and `init` refuses to take it over (and chmod it).
    pub(crate) fn is_ours(name: &str) -> bool {
        Self::CA_NAMES.contains(&name)
            || Self::OTHER_NAMES.contains(&name)
            || Self::is_ca_temp(name)
    }

    /// `.<ca-file>.tmp.<pid>`: a temp file of [`crate::state::write_atomic`] for a CA file.
    fn is_ca_temp(name: &str) -> bool {
        name.strip_prefix('.')
            .and_then(|rest| rest.split_once(".tmp."))
            .is_some_and(|(base, _)| Self::CA_NAMES.contains(&base))
    }

    /// Remove temp files left by CA writers that were killed mid-write. Call only under the
    /// lock ([`StateLock::exclusive`] does): every CA writer holds it, so no live write can be
    /// disturbed. At the top level only temp files of CA files are touched (other meshgate
    /// state there has its own writers); `ca/` and `ledger/` belong to the CA alone.
    pub(crate) fn sweep_temp_files(&self) {
        let dirs = [
            (self.root.clone(), true),
            (self.ca_dir(), false),
            (self.ledger_dir(), false),
        ];
        for (dir, top) in dirs {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name();
                let name = name.to_string_lossy();
                let debris = if top {
                    Self::is_ca_temp(&name)
                } else {
                    name.starts_with('.') && name.contains(".tmp.")
                };
                if debris {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
    }
}

/// An exclusive advisory lock (`flock(2)` through `File::lock`) on `<state-dir>/lock`, held
/// until dropped. flock locks belong to the open file description, so two `StateLock`s in one
/// process exclude each other as well as two processes do. A killed holder's lock is released
/// by the kernel.
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot lock {path}: {source}")]
pub struct LockError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

impl StateLock {
    pub fn exclusive(dir: &StateDir) -> Result<Self, LockError> {
        let path = dir.lock();
        let err = |source| LockError {
            path: path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(mode::SECRET)
            .open(&path)
            .map_err(err)?;
        file.lock().map_err(err)?;
        // Holding the lock, no other writer is mid-write: temp files now are debris of a
        // writer that was killed.
        dir.sweep_temp_files();
        Ok(StateLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_excludes_a_second_holder_until_dropped() {
        let d = tempfile::tempdir().expect("tempdir");
        let sd = StateDir::new(d.path());
        let first = StateLock::exclusive(&sd).expect("first");
        // A second open file description, as another process or thread would have.
        let other = File::options()
            .read(true)
            .write(true)
            .open(sd.lock())
            .expect("open");
        assert!(
            other.try_lock().is_err(),
            "second lock taken while the first is held"
        );
        drop(first);
        other
            .try_lock()
            .expect("free once the first holder is gone");
    }

    #[test]
    fn sweep_removes_only_temp_files() {
        let d = tempfile::tempdir().expect("tempdir");
        let sd = StateDir::new(d.path());
        fs::write(d.path().join(".tokens.json.tmp.123"), b"x").expect("w");
        fs::write(d.path().join("tokens.json"), b"{}").expect("w");
        // Another writer's temp file at the top level is not ours to remove.
        fs::write(d.path().join(".other.toml.tmp.9"), b"x").expect("w");
        crate::state::ensure_state_dir(&sd.ledger_dir()).expect("mkdir");
        fs::write(sd.ledger_dir().join(".00000001.jsonl.tmp.7"), b"x").expect("w");
        sd.sweep_temp_files();
        let mut names: Vec<_> = fs::read_dir(d.path())
            .expect("ls")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, vec![".other.toml.tmp.9", "ledger", "tokens.json"]);
        assert_eq!(fs::read_dir(sd.ledger_dir()).expect("ls").count(), 0);
        assert!(StateDir::is_ours("config-history") && StateDir::is_ours(".crl.pem.tmp.1"));
        assert!(!StateDir::is_ours("notes.txt") && !StateDir::is_ours(".bashrc"));
    }
}
