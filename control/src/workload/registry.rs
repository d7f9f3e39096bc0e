//! Workload registrations: which local processes get which SPIFFE ID from the Workload API.
//!
//! Stored in `<state-dir>/workloads.json` (0600, written with [`crate::state::write_atomic`]
//! under the state lock), edited by `meshgate workload register|list|remove` and read by the
//! server at every new connection, so a change applies to the next connection without a restart.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::StoreError;
use crate::layout::{StateDir, StateLock};
use crate::spiffe::SpiffeId;
use crate::state::{self, mode};

/// How a calling process is recognised (from the socket's peer credentials).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Selector {
    /// The caller's effective Unix uid.
    Uid(u32),
    /// The caller's executable, as `/proc/<pid>/exe` resolves it (an absolute path).
    Exe(PathBuf),
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Selector::Uid(u) => write!(f, "uid:{u}"),
            Selector::Exe(p) => write!(f, "exe:{}", p.display()),
        }
    }
}

/// One registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    pub spiffe_id: SpiffeId,
    pub selector: Selector,
}

/// What the server knows about a caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub pid: Option<i32>,
    /// `None` when `/proc/<pid>/exe` cannot be read (process gone, or not ours to inspect).
    pub exe: Option<PathBuf>,
}

impl Registration {
    pub fn matches(&self, caller: &Caller) -> bool {
        match &self.selector {
            Selector::Uid(u) => *u == caller.uid,
            Selector::Exe(p) => caller.exe.as_deref() == Some(p.as_path()),
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    version: u32,
    registrations: Vec<Registration>,
}

fn path(dir: &StateDir) -> PathBuf {
    dir.root().join("workloads.json")
}

/// All registrations, in the order they were made (none if the file does not exist).
pub fn list(state_dir: &Path) -> Result<Vec<Registration>, StoreError> {
    let p = path(&StateDir::new(state_dir));
    match fs::read(&p) {
        Ok(b) => serde_json::from_slice::<File>(&b)
            .map(|f| f.registrations)
            .map_err(|e| StoreError::corrupt(&p, e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(StoreError::read(&p, e)),
    }
}

fn save(dir: &StateDir, regs: Vec<Registration>) -> Result<(), StoreError> {
    let p = path(dir);
    let mut json = serde_json::to_vec_pretty(&File {
        version: 1,
        registrations: regs,
    })
    .map_err(|e| StoreError::corrupt(&p, e))?;
    json.push(b'\n');
    state::write_atomic(&p, &json, mode::SECRET)?;
    Ok(())
}

/// Add a registration; `false` if the same one exists already.
pub fn add(state_dir: &Path, reg: Registration) -> Result<bool, StoreError> {
    let dir = StateDir::new(state_dir);
    let _lock = StateLock::exclusive(&dir)?;
    let mut regs = list(state_dir)?;
    if regs.contains(&reg) {
        return Ok(false);
    }
    regs.push(reg);
    save(&dir, regs)?;
    Ok(true)
}

/// Remove the registrations of `spiffe_id` (only those with `selector`, if given); returns how
/// many were removed.
pub fn remove(
    state_dir: &Path,
    spiffe_id: &SpiffeId,
    selector: Option<&Selector>,
) -> Result<usize, StoreError> {
    let dir = StateDir::new(state_dir);
    let _lock = StateLock::exclusive(&dir)?;
    let mut regs = list(state_dir)?;
    let before = regs.len();
    regs.retain(|r| !(&r.spiffe_id == spiffe_id && selector.is_none_or(|s| &r.selector == s)));
    let removed = before - regs.len();
    if removed > 0 {
        save(&dir, regs)?;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_list_match_remove() {
        let dir = tempfile::tempdir().expect("tempdir");
        let st = dir.path();
        let id = SpiffeId::parse("spiffe://example.org/w").expect("id");
        let by_uid = Registration {
            spiffe_id: id.clone(),
            selector: Selector::Uid(1000),
        };
        let by_exe = Registration {
            spiffe_id: id.clone(),
            selector: Selector::Exe("/usr/bin/app".into()),
        };
        assert!(add(st, by_uid.clone()).expect("add"));
        assert!(!add(st, by_uid.clone()).expect("again"));
        assert!(add(st, by_exe.clone()).expect("add"));
        assert_eq!(
            list(st).expect("list"),
            vec![by_uid.clone(), by_exe.clone()]
        );
        use std::os::unix::fs::PermissionsExt;
        let m = fs::metadata(st.join("workloads.json")).expect("meta");
        assert_eq!(m.permissions().mode() & 0o777, 0o600);

        let caller = Caller {
            uid: 1000,
            pid: None,
            exe: None,
        };
        assert!(by_uid.matches(&caller) && !by_exe.matches(&caller));
        let caller = Caller {
            uid: 0,
            pid: Some(1),
            exe: Some("/usr/bin/app".into()),
        };
        assert!(!by_uid.matches(&caller) && by_exe.matches(&caller));

        assert_eq!(remove(st, &id, Some(&Selector::Uid(1000))).expect("rm"), 1);
        assert_eq!(list(st).expect("list"), vec![by_exe]);
        assert_eq!(remove(st, &id, None).expect("rm"), 1);
        assert!(list(st).expect("list").is_empty());
    }
}
