//! Atomic state files: every piece of control state (CA keys, the issued-cert ledger, tokens,
//! trust bundles) is written through [`write_atomic`], so a crash at any instant leaves either the
//! previous good file or the new one, never a torn mix.
//!
//! Sequence: create a temp file in the same directory with the final mode (0600 for secrets) ->
//! write -> fsync the file -> rename over the target -> fsync the directory.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// File modes used for state.
pub mod mode {
    /// Private keys, tokens.
    pub const SECRET: u32 = 0o600;
    /// Certificates, bundles, ledgers.
    pub const PUBLIC: u32 = 0o644;
    /// The state directory itself.
    pub const DIR: u32 = 0o700;
}

#[derive(Debug, thiserror::Error)]
#[error("cannot write {path}: {source}")]
pub struct WriteError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// Create `dir` (and parents) if missing, and make sure it is mode 0700.
pub fn ensure_state_dir(dir: &Path) -> Result<(), WriteError> {
    let err = |source| WriteError {
        path: dir.to_path_buf(),
        source,
    };
    fs::create_dir_all(dir).map_err(err)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(mode::DIR)).map_err(err)
}

/// Replace `path` with `data` atomically and durably, with permission bits `mode`.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), WriteError> {
    let err = |source| WriteError {
        path: path.to_path_buf(),
        source,
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| Path::new("."));
    let name = path.file_name().ok_or_else(|| {
        err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "path has no file name",
        ))
    })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = dir.join(tmp_name);

    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        // The mode given to open() is filtered by the umask; make it exact.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(data)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_replace_atomically_with_mode() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("key.pem");
        write_atomic(&p, b"one", mode::SECRET).expect("first write");
        write_atomic(&p, b"two", mode::SECRET).expect("second write");
        assert_eq!(fs::read(&p).expect("read"), b"two");
        assert_eq!(
            fs::metadata(&p).expect("meta").permissions().mode() & 0o777,
            0o600
        );
        // No temp files left behind.
        let names: Vec<_> = fs::read_dir(d.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn failed_write_keeps_previous_file() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("bundle.json");
        write_atomic(&p, b"good", mode::PUBLIC).expect("write");
        // A directory in the temp file's place makes the write fail before the rename.
        let tmp = d
            .path()
            .join(format!(".bundle.json.tmp.{}", std::process::id()));
        fs::create_dir(&tmp).expect("mkdir");
        assert!(write_atomic(&p, b"bad", mode::PUBLIC).is_err());
        assert_eq!(fs::read(&p).expect("read"), b"good");
    }

    #[test]
    fn state_dir_is_private() {
        let d = tempfile::tempdir().expect("tempdir");
        let s = d.path().join("a/b/state");
        ensure_state_dir(&s).expect("create");
        assert_eq!(
            fs::metadata(&s).expect("meta").permissions().mode() & 0o777,
            0o700
        );
    }
}
