//! Rotation on file change: the certificate, key, bundle and CRL files the config names are
//! polled with stat(2) and a change reloads the config through the same path as SIGHUP.
//!
//! Why a stat poll and not inotify: the files are a handful, so one `stat` each per second costs
//! nothing, and a poll sees every way files get replaced — in-place writes, `mv`/rename over the
//! old file (editors, `write_atomic`, cert-manager style tools), Kubernetes/Vault-agent style
//! symlink swaps (`..data` -> new directory: `stat` follows the link, inotify on the file or its
//! directory does not see it), bind mounts and network filesystems, and a file whose directory
//! did not exist yet — with no watch descriptors to re-arm after a rename and no
//! `max_user_watches` limit. The price is up to one interval of delay.
//!
//! A change is applied once the files have been still for [`SETTLE`], so a writer that updates
//! a certificate and then its key in place is seen as one change, not as a mismatched pair.
//! Every load (by this watch, SIGHUP, `POST /reload`, a rollback) re-takes the baseline, so a
//! change is applied once whatever triggered it.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use meshgate_config::Config;

/// How often the files are checked.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// How long changed files must stay unchanged before they are loaded.
pub const SETTLE: Duration = Duration::from_millis(250);

/// What `stat` says about a file (following symlinks); `None` in [`Snapshot`]: missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sig {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

fn sig(path: &std::path::Path) -> Option<Sig> {
    let m = std::fs::metadata(path).ok()?;
    Some(Sig {
        dev: m.dev(),
        ino: m.ino(),
        size: m.size(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
    })
}

/// The state of a set of files at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Snapshot(Vec<(PathBuf, Option<Sig>)>);

impl Snapshot {
    pub fn take(paths: &[PathBuf]) -> Snapshot {
        Snapshot(paths.iter().map(|p| (p.clone(), sig(p))).collect())
    }

    fn get(&self, path: &PathBuf) -> Option<Option<Sig>> {
        self.0.iter().find(|(p, _)| p == path).map(|(_, s)| *s)
    }

    /// The files whose state differs from `base`.
    fn changed_from(&self, base: &Snapshot) -> Vec<PathBuf> {
        self.0
            .iter()
            .filter(|(p, s)| base.get(p) != Some(*s))
            .map(|(p, _)| p.clone())
            .collect()
    }
}

/// Every certificate, key, trust bundle and CRL file `config` names (listeners and clusters),
/// each once, in a stable order.
pub fn tls_files(config: &Config) -> Vec<PathBuf> {
    let mut files = BTreeSet::new();
    for tls in config.listeners.iter().filter_map(|l| l.tls.as_ref()) {
        for c in &tls.certificates {
            files.insert(c.cert.clone());
            files.insert(c.key.clone());
        }
        for b in &tls.trust_bundles {
            files.insert(b.bundle.clone());
            if let Some(crl) = &b.crl {
                files.insert(crl.clone());
            }
        }
    }
    for tls in config.clusters.iter().filter_map(|c| c.tls.as_ref()) {
        files.insert(tls.trust_bundle.clone());
        if let Some(id) = &tls.identity {
            files.insert(id.cert.clone());
            files.insert(id.key.clone());
        }
    }
    files.into_iter().collect()
}

/// The watch over one config's TLS files.
#[derive(Debug)]
pub struct FileWatch {
    paths: Vec<PathBuf>,
    /// The files as they were when the config in force was loaded.
    base: Snapshot,
    /// A change seen but not yet still for [`SETTLE`].
    pending: Option<Snapshot>,
    next: Instant,
    interval: Duration,
    settle: Duration,
}

impl FileWatch {
    /// Watch `paths`, taking `base` as the state they were loaded in.
    pub fn new(paths: Vec<PathBuf>, base: Snapshot) -> FileWatch {
        FileWatch::with_timing(paths, base, INTERVAL, SETTLE)
    }

    fn with_timing(
        paths: Vec<PathBuf>,
        base: Snapshot,
        interval: Duration,
        settle: Duration,
    ) -> FileWatch {
        FileWatch {
            paths,
            base,
            pending: None,
            next: Instant::now() + interval,
            interval,
            settle,
        }
    }

    /// The state of the watched files now (take it *before* a load, then [`Self::rebase`]).
    pub fn snapshot(&self) -> Snapshot {
        Snapshot::take(&self.paths)
    }

    /// A load happened: `before` is the state of the old paths taken just before it;
    /// `paths` the files of the config now in force (files new to the set are taken as
    /// they are now).
    pub fn rebase(&mut self, before: &Snapshot, paths: Vec<PathBuf>) {
        let base = paths
            .iter()
            .map(|p| (p.clone(), before.get(p).unwrap_or_else(|| sig(p))))
            .collect();
        self.base = Snapshot(base);
        self.paths = paths;
        self.pending = None;
        self.next = Instant::now() + self.interval;
    }

    /// Fires when [`Self::poll`] is due.
    pub fn timer(&self) -> crossbeam_channel::Receiver<Instant> {
        crossbeam_channel::after(self.next.saturating_duration_since(Instant::now()))
    }

    /// Check the files: `Some(changed)` when a change has settled and should be loaded (take
    /// the snapshot and rebase around that load); `None` otherwise.
    pub fn poll(&mut self) -> Option<Vec<PathBuf>> {
        let now = self.snapshot();
        if now == self.base {
            self.pending = None;
            self.next = Instant::now() + self.interval;
            return None;
        }
        if self.pending.as_ref() == Some(&now) {
            self.pending = None;
            self.next = Instant::now() + self.interval;
            return Some(now.changed_from(&self.base));
        }
        // Changed (or still changing): look again once it has had time to settle.
        self.pending = Some(now);
        self.next = Instant::now() + self.settle;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &std::path::Path, text: &str) {
        std::fs::write(path, text).expect("write");
    }

    fn poll_settled(w: &mut FileWatch) -> Option<Vec<PathBuf>> {
        // First sight of a change only arms the settle check.
        for _ in 0..3 {
            if let Some(c) = w.poll() {
                return Some(c);
            }
        }
        None
    }

    #[test]
    fn in_place_rename_and_symlink_swaps_are_seen_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        write(&cert, "one");
        write(&key, "one");
        let paths = vec![cert.clone(), key.clone()];
        let mut w = FileWatch::with_timing(paths.clone(), Snapshot::take(&paths), INTERVAL, SETTLE);
        assert_eq!(w.poll(), None, "nothing changed");

        // Replaced by rename (what write_atomic and most tools do).
        let tmp = dir.path().join(".cert.tmp");
        write(&tmp, "two");
        std::fs::rename(&tmp, &cert).expect("rename");
        assert_eq!(w.poll(), None, "the first sight waits to settle");
        assert_eq!(w.poll(), Some(vec![cert.clone()]));
        let before = w.snapshot();
        w.rebase(&before, paths.clone());
        assert_eq!(w.poll(), None, "applied once");

        // Rewritten in place, same size: inode and size equal, ctime/mtime differ.
        std::thread::sleep(Duration::from_millis(20));
        write(&key, "uno");
        assert_eq!(poll_settled(&mut w), Some(vec![key.clone()]));
        let before = w.snapshot();
        w.rebase(&before, paths.clone());

        // A symlink swapped to a new target (Kubernetes secret volumes).
        let v1 = dir.path().join("v1");
        let v2 = dir.path().join("v2");
        std::fs::create_dir(&v1).expect("mkdir");
        std::fs::create_dir(&v2).expect("mkdir");
        write(&v1.join("b.pem"), "root one");
        write(&v2.join("b.pem"), "root two");
        let data = dir.path().join("..data");
        std::os::unix::fs::symlink(&v1, &data).expect("symlink");
        let bundle = dir.path().join("bundle.pem");
        std::os::unix::fs::symlink(data.join("b.pem"), &bundle).expect("symlink");
        let paths = vec![bundle.clone()];
        w.rebase(&Snapshot::take(&paths), paths.clone());
        let next = dir.path().join("..data_tmp");
        std::os::unix::fs::symlink(&v2, &next).expect("symlink");
        std::fs::rename(&next, &data).expect("swap");
        assert_eq!(poll_settled(&mut w), Some(vec![bundle.clone()]));

        // A load by another trigger (SIGHUP) after the change: the watch does not load again.
        write(&v2.join("b.pem"), "root three");
        let before = w.snapshot();
        w.rebase(&before, paths.clone());
        assert_eq!(poll_settled(&mut w), None);

        // A file that disappears is a change too (the reload then names it in its error).
        std::fs::remove_file(v2.join("b.pem")).expect("rm");
        assert_eq!(poll_settled(&mut w), Some(vec![bundle]));
    }

    #[test]
    fn a_file_still_being_written_is_loaded_once_it_is_still() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cert = dir.path().join("cert.pem");
        write(&cert, "a");
        let paths = vec![cert.clone()];
        let mut w = FileWatch::with_timing(
            paths.clone(),
            Snapshot::take(&paths),
            INTERVAL,
            Duration::ZERO,
        );
        write(&cert, "ab");
        assert_eq!(w.poll(), None);
        write(&cert, "abc");
        assert_eq!(w.poll(), None, "changed again since the first sight");
        assert_eq!(w.poll(), Some(vec![cert]));
    }
}
