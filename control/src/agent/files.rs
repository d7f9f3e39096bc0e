//! The agent's output directory: the SVID, its key and the trust bundle, replaced as one set.
//!
//! ```text
//! OUT/
//!   current -> gen-1735725600-5F0C1A2B     symlink, swapped atomically (rename)
//!   svid.pem -> current/svid.pem           stable paths for consumers
//!   svid_key.pem -> current/svid_key.pem
//!   bundle.pem -> current/bundle.pem
//!   gen-1735725600-5F0C1A2B/               one generation; never modified once in place
//!     svid.pem (0644)  svid_key.pem (0600)  bundle.pem (0644)  meta.json (0644)
//! ```
//!
//! Installing a generation: write the four files into a private temp directory (each fsync'd),
//! fsync it, rename it to `gen-*` (atomic), then point `current` at it by renaming a new
//! symlink over it (atomic), fsync `OUT`. A crash at any instant leaves `current` on a complete
//! generation, old or new. The two previous generations are kept, so a reader that resolved
//! `current` just before a swap still finds matching files.
//!
//! What a reader may rely on: the files inside one `gen-*` directory always belong together.
//! Reading `svid.pem` and then `svid_key.pem` through the top-level links resolves `current`
//! twice, so a reader that must never pair a certificate with the wrong key resolves it once
//! (`readlink OUT/current`, or open the directory and read both files relative to it), or
//! reloads on the agent's `--on-rotate`/`--signal` hook, which runs after the swap.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, symlink};
use std::path::{Path, PathBuf};

use rcgen::PublicKeyData;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

use crate::ca::SecretPem;
use crate::inspect::{inspect_der, pem_certificates};
use crate::spiffe::SpiffeId;
use crate::state::{self, mode};

pub const SVID: &str = "svid.pem";
pub const KEY: &str = "svid_key.pem";
pub const BUNDLE: &str = "bundle.pem";
const META: &str = "meta.json";
const CURRENT: &str = "current";
/// Generations kept besides the current one.
const KEEP_PREVIOUS: usize = 2;

/// One complete identity as installed (or to install).
#[derive(Debug, Clone)]
pub struct Identity {
    pub spiffe_id: SpiffeId,
    /// Leaf first, then intermediates.
    pub chain_pem: String,
    pub key_pem: SecretPem,
    pub bundle_pem: String,
    pub serial: String,
    pub not_after: OffsetDateTime,
    pub issued_at: OffsetDateTime,
}

#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    version: u32,
    spiffe_id: String,
    serial: String,
    #[serde(with = "time::serde::rfc3339")]
    issued_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    not_after: OffsetDateTime,
}

#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a usable identity ({detail}); the agent needs to enroll again")]
    Damaged { path: PathBuf, detail: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> FilesError + '_ {
    move |source| FilesError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn sync_dir(dir: &Path) -> Result<(), FilesError> {
    fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io_err(dir))
}

/// Check that `key_pem` is the key of the first certificate of `chain_pem`, and return the
/// leaf's SPIFFE ID, serial and expiry.
pub fn check_pair(
    chain_pem: &str,
    key_pem: &str,
) -> Result<(SpiffeId, String, OffsetDateTime), String> {
    let ders = pem_certificates(chain_pem.as_bytes()).map_err(|e| e.to_string())?;
    let leaf = ders.first().ok_or("no certificate")?;
    let (_, cert) = X509Certificate::from_der(leaf).map_err(|e| e.to_string())?;
    let key = rcgen::KeyPair::from_pem(key_pem).map_err(|e| format!("private key: {e}"))?;
    if key.subject_public_key_info() != cert.public_key().raw {
        return Err("the private key does not belong to the certificate".into());
    }
    let info = inspect_der(leaf, 0).map_err(|e| e.to_string())?;
    let id = info
        .spiffe_id
        .as_deref()
        .ok_or("the certificate has no SPIFFE ID")
        .and_then(|s| SpiffeId::parse(s).map_err(|_| "the certificate's SPIFFE ID is invalid"))?;
    Ok((id, info.serial, info.not_after))
}

/// The output directory.
#[derive(Debug, Clone)]
pub struct OutDir {
    root: PathBuf,
}

impl OutDir {
    pub fn new(root: impl Into<PathBuf>) -> OutDir {
        OutDir { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The generation `current` points at, if any.
    pub fn current_generation(&self) -> Option<PathBuf> {
        let target = fs::read_link(self.root.join(CURRENT)).ok()?;
        let name = target.file_name()?.to_owned();
        // Only a generation of this directory, whatever the link says.
        Some(self.root.join(name))
    }

    /// The installed identity, read from one generation (so the files match), or `None` when
    /// nothing was installed yet.
    pub fn load(&self) -> Result<Option<Identity>, FilesError> {
        let link = self.root.join(CURRENT);
        match fs::symlink_metadata(&link) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&link)(e)),
            Ok(_) => {}
        }
        let dir = self
            .current_generation()
            .ok_or_else(|| FilesError::Damaged {
                path: link.clone(),
                detail: "not a symlink to a generation directory".into(),
            })?;
        let read = |name: &str| {
            let p = dir.join(name);
            fs::read_to_string(&p).map_err(io_err(&p))
        };
        let chain_pem = read(SVID)?;
        let key_pem = read(KEY)?;
        let bundle_pem = read(BUNDLE)?;
        let damaged = |detail: String| FilesError::Damaged {
            path: dir.clone(),
            detail,
        };
        let (spiffe_id, serial, not_after) = check_pair(&chain_pem, &key_pem).map_err(damaged)?;
        if pem_certificates(bundle_pem.as_bytes()).is_err() {
            return Err(damaged(format!("{BUNDLE} holds no certificate")));
        }
        // meta.json only refines the schedule; without it, renew from notBefore.
        let issued_at = read(META)
            .ok()
            .and_then(|t| serde_json::from_str::<Meta>(&t).ok())
            .filter(|m| m.serial == serial)
            .map(|m| m.issued_at)
            .unwrap_or_else(|| {
                pem_certificates(chain_pem.as_bytes())
                    .ok()
                    .and_then(|d| inspect_der(&d[0], 0).ok())
                    .map(|i| i.not_before)
                    .unwrap_or(not_after)
            });
        Ok(Some(Identity {
            spiffe_id,
            chain_pem,
            key_pem: SecretPem::new(key_pem),
            bundle_pem,
            serial,
            not_after,
            issued_at,
        }))
    }

    /// Install `id` as the new current generation (see the module docs). Returns its path.
    pub fn install(&self, id: &Identity) -> Result<PathBuf, FilesError> {
        if !self.root.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(&self.root)
                .map_err(io_err(&self.root))?;
        }
        let serial_head: String = id.serial.chars().take(8).collect();
        let name = format!("gen-{}-{serial_head}", id.issued_at.unix_timestamp().max(0));
        let final_dir = self.root.join(&name);
        let tmp = self
            .root
            .join(format!(".{name}.tmp.{}", std::process::id()));
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
        }
        fs::DirBuilder::new()
            .mode(0o755)
            .create(&tmp)
            .map_err(io_err(&tmp))?;
        let meta = Meta {
            version: 1,
            spiffe_id: id.spiffe_id.to_string(),
            serial: id.serial.clone(),
            issued_at: id.issued_at,
            not_after: id.not_after,
        };
        let meta_json = serde_json::to_vec_pretty(&meta).map_err(|e| FilesError::Damaged {
            path: tmp.join(META),
            detail: e.to_string(),
        })?;
        let w = |n: &str, data: &[u8], m: u32| {
            state::write_atomic(&tmp.join(n), data, m).map_err(|e| FilesError::Io {
                path: e.path,
                source: e.source,
            })
        };
        w(KEY, id.key_pem.expose().as_bytes(), mode::SECRET)?;
        w(SVID, id.chain_pem.as_bytes(), mode::PUBLIC)?;
        w(BUNDLE, id.bundle_pem.as_bytes(), mode::PUBLIC)?;
        w(META, &meta_json, mode::PUBLIC)?;
        sync_dir(&tmp)?;
        if final_dir.exists() {
            // Same second and serial prefix: only after a crash between rename and swap.
            fs::remove_dir_all(&final_dir).map_err(io_err(&final_dir))?;
        }
        fs::rename(&tmp, &final_dir).map_err(io_err(&final_dir))?;
        sync_dir(&self.root)?;
        self.replace_link(CURRENT, Path::new(&name))?;
        for f in [SVID, KEY, BUNDLE] {
            let want = Path::new(CURRENT).join(f);
            if fs::read_link(self.root.join(f)).ok().as_deref() != Some(want.as_path()) {
                self.replace_link(f, &want)?;
            }
        }
        sync_dir(&self.root)?;
        self.prune(&name);
        Ok(final_dir)
    }

    /// Atomically make `root/link` a symlink to `target`.
    fn replace_link(&self, link: &str, target: &Path) -> Result<(), FilesError> {
        let tmp = self
            .root
            .join(format!(".{link}.tmp.{}", std::process::id()));
        let _ = fs::remove_file(&tmp);
        symlink(target, &tmp).map_err(io_err(&tmp))?;
        let dst = self.root.join(link);
        fs::rename(&tmp, &dst).map_err(io_err(&dst))
    }

    /// Remove generations older than the previous [`KEEP_PREVIOUS`] and temp debris of killed
    /// agents. Failures only cost disk space.
    fn prune(&self, current: &str) {
        let Ok(entries) = fs::read_dir(&self.root) else {
            return;
        };
        let mut gens: Vec<(i64, String)> = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(".gen-") && name.contains(".tmp.") {
                let _ = fs::remove_dir_all(e.path());
            } else if let Some(rest) = name.strip_prefix("gen-")
                && name != current
            {
                let ts = rest
                    .split('-')
                    .next()
                    .and_then(|t| t.parse().ok())
                    .unwrap_or(0);
                gens.push((ts, name));
            }
        }
        gens.sort();
        let drop_n = gens.len().saturating_sub(KEEP_PREVIOUS);
        for (_, name) in gens.into_iter().take(drop_n) {
            let _ = fs::remove_dir_all(self.root.join(name));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{Ca, InitOptions, IssueRequest};
    use crate::clock::FixedClock;
    use crate::ledger::AuthorisedBy;
    use crate::spiffe::TrustDomain;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Arc;

    fn identity(ca: &Ca, clock: &FixedClock) -> Identity {
        let svid = ca
            .issue(&IssueRequest {
                spiffe_id: SpiffeId::parse("spiffe://example.org/vm/1").expect("id"),
                dns_names: vec![],
                ttl: None,
                authorised_by: AuthorisedBy::Operator("test".into()),
            })
            .expect("issue");
        clock.advance(std::time::Duration::from_secs(1));
        Identity {
            spiffe_id: svid.entry.spiffe_id.clone(),
            chain_pem: svid.chain_pem,
            key_pem: svid.key_pem,
            bundle_pem: ca.bundle().expect("bundle").to_pem(),
            serial: svid.entry.serial.to_string(),
            not_after: svid.entry.not_after,
            issued_at: svid.entry.issued_at,
        }
    }

    #[test]
    fn installs_generations_and_swaps_current() {
        let d = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(FixedClock::at_system_now());
        let ca = Ca::init(
            &d.path().join("state"),
            &InitOptions::new(TrustDomain::parse("example.org").expect("td")),
            clock.clone(),
        )
        .expect("init");
        let out = OutDir::new(d.path().join("out"));
        assert!(out.load().expect("empty").is_none());

        let mut serials = Vec::new();
        for _ in 0..5 {
            let id = identity(&ca, &clock);
            let gen_dir = out.install(&id).expect("install");
            serials.push(id.serial.clone());
            let back = out.load().expect("load").expect("installed");
            assert_eq!(back.serial, id.serial);
            assert_eq!(back.issued_at, id.issued_at);
            assert_eq!(out.current_generation(), Some(gen_dir.clone()));
            assert_eq!(
                fs::metadata(gen_dir.join(KEY))
                    .expect("meta")
                    .permissions()
                    .mode()
                    & 0o777,
                0o600
            );
            // The stable top-level paths lead to the same files.
            assert_eq!(
                fs::read_to_string(out.root().join(SVID)).expect("svid"),
                id.chain_pem
            );
            assert_eq!(
                fs::read_to_string(out.root().join(KEY)).expect("key"),
                id.key_pem.expose()
            );
        }
        // Current + 2 previous generations kept.
        let gens = fs::read_dir(out.root())
            .expect("ls")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("gen-"))
            .count();
        assert_eq!(gens, 3);
        assert_eq!(serials.len(), 5);
    }

    #[test]
    fn a_mismatched_key_is_damage_not_an_identity() {
        let d = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(FixedClock::at_system_now());
        let ca = Ca::init(
            &d.path().join("state"),
            &InitOptions::new(TrustDomain::parse("example.org").expect("td")),
            clock.clone(),
        )
        .expect("init");
        let out = OutDir::new(d.path().join("out"));
        let a = identity(&ca, &clock);
        let b = identity(&ca, &clock);
        let dir = out.install(&a).expect("install");
        fs::write(dir.join(KEY), b.key_pem.expose()).expect("tamper");
        assert!(matches!(out.load(), Err(FilesError::Damaged { .. })));
        // Debris of a killed install is ignored and cleaned at the next install.
        fs::create_dir(out.root().join(".gen-1-AB.tmp.99")).expect("debris");
        out.install(&b).expect("install");
        assert!(!out.root().join(".gen-1-AB.tmp.99").exists());
        assert_eq!(out.load().expect("load").expect("some").serial, b.serial);
    }
}
