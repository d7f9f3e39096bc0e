//! The issued-certificate ledger: one JSON line per certificate the CA signed, written (and
//! fsynced) before the certificate is handed to anyone.
//!
//! Layout: `ledger/00000001.jsonl`, `ledger/00000002.jsonl`, ... Each segment holds at most
//! [`SEGMENT_ENTRIES`] lines and is replaced whole through [`crate::state::write_atomic`] when an
//! entry is added, so a crash leaves the segment with or without the new line, never a torn one,
//! and the cost of an append stays bounded however long the ledger grows. Only the last segment
//! is ever rewritten. Callers hold the state lock while appending.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::error::{CaError, StoreError};
use crate::layout::StateDir;
use crate::spiffe::SpiffeId;
use crate::state::{self, mode};

/// Entries per segment file.
pub const SEGMENT_ENTRIES: usize = 1000;

/// A certificate serial number, shown and stored as uppercase hex (as `openssl` prints it).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Serial(Vec<u8>);

impl Serial {
    /// Big-endian bytes of a positive integer, without leading zero bytes.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let first = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
        Serial(bytes[first..].to_vec())
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// A fresh serial: 16 bytes from the system CSPRNG with the top bit cleared (positive in DER)
    /// and the next bit set (so the encoding is always 16 bytes): 126 random bits. Two serials
    /// collide with probability about n^2 / 2^127 — for a billion certificates, below 10^-20.
    pub fn random() -> Result<Self, ring::error::Unspecified> {
        let mut b = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)?;
        b[0] = (b[0] & 0x7f) | 0x40;
        Ok(Serial(b.to_vec()))
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("00");
        }
        for b in &self.0 {
            write!(f, "{b:02X}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Serial({self})")
    }
}

impl FromStr for Serial {
    type Err = CaError;
    /// Hex, any case, with optional `0x` prefix and `:` separators (`3A:4B`, `3a4b`, `0x3A4B`).
    fn from_str(s: &str) -> Result<Self, CaError> {
        let bad = || CaError::BadSerial(s.to_owned());
        let t = s.trim();
        let t = t
            .strip_prefix("0x")
            .or_else(|| t.strip_prefix("0X"))
            .unwrap_or(t);
        let hex: String = t.chars().filter(|&c| c != ':').collect();
        if hex.is_empty() || hex.len() > 40 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let padded = if hex.len() % 2 == 1 {
            format!("0{hex}")
        } else {
            hex
        };
        let bytes = (0..padded.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&padded[i..i + 2], 16).map_err(|_| bad()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Serial::from_bytes(&bytes))
    }
}

impl Serialize for Serial {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Serial {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// How an issuance was authorised; recorded in the ledger as `operator:<who>`, `token:<id>` or
/// `renewal:<serial>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthorisedBy {
    /// An operator at the CLI (`operator:cli`) or another local, trusted caller.
    Operator(String),
    /// A join token, by its id.
    Token(String),
    /// Renewal authenticated by a still-valid SVID with this serial.
    Renewal(Serial),
}

impl fmt::Display for AuthorisedBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthorisedBy::Operator(who) => write!(f, "operator:{who}"),
            AuthorisedBy::Token(id) => write!(f, "token:{id}"),
            AuthorisedBy::Renewal(serial) => write!(f, "renewal:{serial}"),
        }
    }
}

/// One issued certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    pub serial: Serial,
    pub spiffe_id: SpiffeId,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_names: Vec<String>,
    /// IP address SANs (only the enrollment server's own serving certificate has them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_addresses: Vec<std::net::IpAddr>,
    #[serde(with = "time::serde::rfc3339")]
    pub not_before: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub issued_at: OffsetDateTime,
    /// `operator:cli`, `token:<id>`, `renewal:<serial>`.
    pub authorised_by: String,
    /// SHA-256 of the certificate's DER, colon-separated uppercase hex (as `openssl x509
    /// -fingerprint -sha256` prints it).
    pub sha256_fingerprint: String,
    /// SHA-256 fingerprint of the CA certificate that signed it (absent in entries written
    /// before CA rotation existed: `ca rotate retire` counts those as signed by the old root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer_sha256: Option<String>,
}

fn segment_name(n: u32) -> String {
    format!("{n:08}.jsonl")
}

/// Segment numbers present, ascending.
fn segments(dir: &Path) -> Result<Vec<u32>, StoreError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(StoreError::read(dir, e)),
    };
    let mut out = Vec::new();
    for e in entries {
        let e = e.map_err(|err| StoreError::read(dir, err))?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(num) = name.strip_suffix(".jsonl")
            && num.len() == 8
            && let Ok(n) = num.parse::<u32>()
        {
            out.push(n);
        }
    }
    out.sort_unstable();
    Ok(out)
}

fn read_segment(path: &Path) -> Result<Vec<LedgerEntry>, StoreError> {
    let text = fs::read_to_string(path).map_err(|e| StoreError::read(path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| StoreError::corrupt(path, format!("line {}: {e}", i + 1)))
        })
        .collect()
}

/// Every entry, oldest first.
pub fn read_all(dir: &StateDir) -> Result<Vec<LedgerEntry>, StoreError> {
    let ldir = dir.ledger_dir();
    let mut out = Vec::new();
    for n in segments(&ldir)? {
        out.extend(read_segment(&ldir.join(segment_name(n)))?);
    }
    Ok(out)
}

/// Add `entry` durably. The caller holds the state lock.
pub fn append(dir: &StateDir, entry: &LedgerEntry) -> Result<(), StoreError> {
    append_with_limit(dir, entry, SEGMENT_ENTRIES)
}

fn append_with_limit(
    dir: &StateDir,
    entry: &LedgerEntry,
    per_segment: usize,
) -> Result<(), StoreError> {
    let ldir = dir.ledger_dir();
    let segs = segments(&ldir)?;
    let (path, mut text): (PathBuf, String) = match segs.last() {
        Some(&n) => {
            let path = ldir.join(segment_name(n));
            let text = fs::read_to_string(&path).map_err(|e| StoreError::read(&path, e))?;
            if text.lines().filter(|l| !l.trim().is_empty()).count() >= per_segment {
                (ldir.join(segment_name(n + 1)), String::new())
            } else {
                (path, text)
            }
        }
        None => (ldir.join(segment_name(1)), String::new()),
    };
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    let line = serde_json::to_string(entry).map_err(|e| StoreError::corrupt(&path, e))?;
    text.push_str(&line);
    text.push('\n');
    state::write_atomic(&path, text.as_bytes(), mode::PUBLIC)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: u64) -> LedgerEntry {
        LedgerEntry {
            serial: Serial::from_bytes(&i.to_be_bytes()),
            spiffe_id: SpiffeId::parse("spiffe://example.org/w").expect("id"),
            dns_names: vec![],
            ip_addresses: vec![],
            not_before: OffsetDateTime::UNIX_EPOCH,
            not_after: OffsetDateTime::UNIX_EPOCH,
            issued_at: OffsetDateTime::UNIX_EPOCH,
            authorised_by: AuthorisedBy::Operator("cli".into()).to_string(),
            sha256_fingerprint: "00".into(),
            issuer_sha256: None,
        }
    }

    #[test]
    fn serial_text_forms() {
        let s: Serial = "3a:4B".parse().expect("colon");
        assert_eq!(s.to_string(), "3A4B");
        assert_eq!("0x003A4B".parse::<Serial>().expect("prefix"), s);
        assert_eq!("A4B".parse::<Serial>().expect("odd").to_string(), "0A4B");
        assert!("xyz".parse::<Serial>().is_err());
        assert!("".parse::<Serial>().is_err());
        let r = Serial::random().expect("rng");
        assert_eq!(r.as_bytes().len(), 16);
        assert_eq!(r.as_bytes()[0] & 0xc0, 0x40);
        assert_eq!(r.to_string().parse::<Serial>().expect("round trip"), r);
    }

    #[test]
    fn appends_across_segments_and_reads_back_in_order() {
        let d = tempfile::tempdir().expect("tempdir");
        let sd = StateDir::new(d.path());
        state::ensure_state_dir(&sd.ledger_dir()).expect("mkdir");
        let n = 7;
        for i in 1..=n {
            append_with_limit(&sd, &entry(i), 3).expect("append");
        }
        let all = read_all(&sd).expect("read");
        assert_eq!(all.len() as u64, n);
        assert!(
            all.iter()
                .zip(1..)
                .all(|(e, i)| e.serial == Serial::from_bytes(&u64::to_be_bytes(i)))
        );
        assert_eq!(segments(&sd.ledger_dir()).expect("segs"), vec![1, 2, 3]);
    }

    #[test]
    fn a_damaged_line_is_reported_with_file_and_line() {
        let d = tempfile::tempdir().expect("tempdir");
        let sd = StateDir::new(d.path());
        state::ensure_state_dir(&sd.ledger_dir()).expect("mkdir");
        append(&sd, &entry(1)).expect("append");
        let p = sd.ledger_dir().join(segment_name(1));
        let mut text = fs::read_to_string(&p).expect("read");
        text.push_str("{\"serial\":\n");
        fs::write(&p, text).expect("write");
        let err = read_all(&sd).expect_err("corrupt");
        assert!(err.to_string().contains("line 2"), "{err}");
    }

    #[test]
    fn authorisation_labels() {
        assert_eq!(
            AuthorisedBy::Operator("cli".into()).to_string(),
            "operator:cli"
        );
        assert_eq!(AuthorisedBy::Token("ab12".into()).to_string(), "token:ab12");
        assert_eq!(
            AuthorisedBy::Renewal("0A".parse().expect("serial")).to_string(),
            "renewal:0A"
        );
    }
}
