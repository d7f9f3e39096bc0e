//! Config history: every config generation the gateway applied, kept in the state directory so
//! an operator can list, diff and roll back (`meshgate config history|diff|rollback`).
//!
//! Layout: `config-history/index.json` (the entries, newest last) and `config-history/<id>.toml`
//! (the exact text that was applied). Ids grow across restarts; the last [`DEFAULT_KEEP`]
//! entries are kept. Every file goes through [`crate::state::write_atomic`]; the index is written
//! after the text it points to, so a crash never leaves an entry without its text.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::state::{self, WriteError, mode};

/// Entries kept by default.
pub const DEFAULT_KEEP: usize = 20;

/// One applied config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Grows by one per applied config, across restarts.
    pub id: u64,
    /// SHA-256 of the text, hex.
    pub sha256: String,
    /// Unix time it was applied.
    pub applied_unix: u64,
    /// Where it came from (file path, "embedded default", "rollback to N").
    pub source: String,
    /// The runtime generation it became (resets to 1 at each start).
    pub generation: u64,
    /// What changed against the previous entry, in one line.
    pub summary: String,
}

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is damaged ({source}); move it away to start a new history")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("no config history entry {0}; `meshgate config history` lists them")]
    NotFound(u64),
}

/// The history in `state_dir/config-history`.
#[derive(Debug, Clone)]
pub struct History {
    dir: PathBuf,
    keep: usize,
}

impl History {
    pub fn new(state_dir: &Path) -> History {
        History {
            dir: state_dir.join("config-history"),
            keep: DEFAULT_KEEP,
        }
    }

    pub fn with_keep(mut self, keep: usize) -> History {
        self.keep = keep.max(1);
        self
    }

    /// The directory the history lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn index_path(&self) -> PathBuf {
        self.dir.join("index.json")
    }

    fn text_path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id}.toml"))
    }

    /// Entries, oldest first.
    pub fn list(&self) -> Result<Vec<Entry>, HistoryError> {
        let path = self.index_path();
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|source| HistoryError::Corrupt { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(source) => Err(HistoryError::Read { path, source }),
        }
    }

    /// The entry `id` and its text.
    pub fn get(&self, id: u64) -> Result<(Entry, String), HistoryError> {
        let entry = self
            .list()?
            .into_iter()
            .find(|e| e.id == id)
            .ok_or(HistoryError::NotFound(id))?;
        let path = self.text_path(id);
        let text =
            fs::read_to_string(&path).map_err(|source| HistoryError::Read { path, source })?;
        Ok((entry, text))
    }

    /// Record an applied config. Returns the new entry.
    pub fn record(
        &self,
        text: &str,
        source: &str,
        generation: u64,
        summary: &str,
        applied_unix: u64,
    ) -> Result<Entry, HistoryError> {
        state::ensure_state_dir(&self.dir)?;
        let mut entries = self.list()?;
        let id = entries.last().map_or(1, |e| e.id + 1);
        let entry = Entry {
            id,
            sha256: sha256_hex(text.as_bytes()),
            applied_unix,
            source: source.to_string(),
            generation,
            summary: summary.to_string(),
        };
        state::write_atomic(&self.text_path(id), text.as_bytes(), mode::SECRET)?;
        entries.push(entry.clone());
        let drop_n = entries.len().saturating_sub(self.keep);
        let dropped: Vec<Entry> = entries.drain(..drop_n).collect();
        let index = serde_json::to_vec_pretty(&entries).map_err(|e| WriteError {
            path: self.index_path(),
            source: std::io::Error::other(e),
        })?;
        state::write_atomic(&self.index_path(), &index, mode::SECRET)?;
        for e in dropped {
            let _ = fs::remove_file(self.text_path(e.id));
        }
        Ok(entry)
    }
}

/// SHA-256 of `data` as lowercase hex.
pub fn sha256_hex(data: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_lists_gets_and_prunes() {
        let d = tempfile::tempdir().expect("tempdir");
        let h = History::new(d.path()).with_keep(3);
        for i in 1..=5u64 {
            let e = h
                .record(&format!("version = 1 # {i}\n"), "f.toml", i, "x", 1000 + i)
                .expect("record");
            assert_eq!(e.id, i);
        }
        let ids: Vec<u64> = h.list().expect("list").iter().map(|e| e.id).collect();
        assert_eq!(ids, vec![3, 4, 5]);
        let (e, text) = h.get(4).expect("get");
        assert_eq!(text, "version = 1 # 4\n");
        assert_eq!(e.sha256, sha256_hex(text.as_bytes()));
        assert!(matches!(h.get(1), Err(HistoryError::NotFound(1))));
        assert!(
            !d.path().join("config-history/1.toml").exists(),
            "pruned text removed"
        );
        // Ids keep growing across "restarts" (a new History on the same dir).
        let again = History::new(d.path()).with_keep(3);
        assert_eq!(again.record("v", "f", 1, "", 0).expect("record").id, 6);
    }

    #[test]
    fn damaged_index_is_reported_not_overwritten() {
        let d = tempfile::tempdir().expect("tempdir");
        let h = History::new(d.path());
        h.record("a", "f", 1, "", 0).expect("record");
        fs::write(d.path().join("config-history/index.json"), b"{not json").expect("damage");
        assert!(matches!(h.list(), Err(HistoryError::Corrupt { .. })));
        assert!(h.record("b", "f", 2, "", 0).is_err());
    }
}
