//! Join tokens: single-use secrets that let a VM enroll once for one SPIFFE ID.
//!
//! A token reads `mgjt.<id>.<secret>`: `id` (8 hex digits) names it in `token list` / `token
//! revoke` and audit lines; `secret` is 32 bytes from the system CSPRNG, base64url. Only the
//! SHA-256 of the whole token is stored (`tokens.json`, 0600), so the state directory never
//! holds a usable token. [`TokenStore::redeem`] marks a token used and persists that before it
//! returns success, under the state lock: two concurrent redemptions cannot both succeed.

use std::fmt;
use std::fs;
use std::io;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SecureRandom;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::clock::{Clock, rfc3339};
use crate::error::{StoreError, TokenError};
use crate::layout::{StateDir, StateLock};
use crate::ledger::AuthorisedBy;
use crate::spiffe::SpiffeId;
use crate::state::{self, mode};

const PREFIX: &str = "mgjt";
const SECRET_BYTES: usize = 32;
/// Records that expired this long ago are dropped when the file is next written.
const KEEP_EXPIRED: time::Duration = time::Duration::days(30);

/// A join token in clear. Only ever shown once (printed by `token create`); `Debug` hides it.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken(String);

impl JoinToken {
    pub fn new(text: impl Into<String>) -> Self {
        JoinToken(text.into())
    }
    /// The secret text, for printing to the operator or sending to the server.
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// The token's id (`mgjt.<id>.<secret>`), if it has the right shape.
    pub fn id(&self) -> Option<&str> {
        let mut parts = self.0.trim().split('.');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(PREFIX), Some(id), Some(secret), None) if valid_id(id) && !secret.is_empty() => {
                Some(id)
            }
            _ => None,
        }
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.id() {
            Some(id) => write!(f, "JoinToken({PREFIX}.{id}.<redacted>)"),
            None => f.write_str("JoinToken(<redacted>)"),
        }
    }
}

fn valid_id(id: &str) -> bool {
    id.len() == 8
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn sha256_hex(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Equality that takes the same time wherever the inputs differ.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What is stored about a token (never the token itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    pub spiffe_id: SpiffeId,
    /// Hex SHA-256 of the whole token text.
    pub sha256: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub used_at: Option<OffsetDateTime>,
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub revoked_at: Option<OffsetDateTime>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenStatus {
    Active,
    Used,
    Expired,
    Revoked,
}

impl fmt::Display for TokenStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TokenStatus::Active => "active",
            TokenStatus::Used => "used",
            TokenStatus::Expired => "expired",
            TokenStatus::Revoked => "revoked",
        })
    }
}

impl TokenRecord {
    pub fn status(&self, now: OffsetDateTime) -> TokenStatus {
        if self.revoked_at.is_some() {
            TokenStatus::Revoked
        } else if self.used_at.is_some() {
            TokenStatus::Used
        } else if now >= self.expires_at {
            TokenStatus::Expired
        } else {
            TokenStatus::Active
        }
    }
}

/// A successful redemption: the identity the enrollment may be issued for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenGrant {
    pub token_id: String,
    pub spiffe_id: SpiffeId,
}

impl TokenGrant {
    pub fn authorised_by(&self) -> AuthorisedBy {
        AuthorisedBy::Token(self.token_id.clone())
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct TokenFile {
    version: u32,
    tokens: Vec<TokenRecord>,
}

/// The token table in a state directory.
#[derive(Debug, Clone)]
pub struct TokenStore {
    dir: StateDir,
    clock: Arc<dyn Clock>,
}

impl TokenStore {
    pub fn new(dir: StateDir, clock: Arc<dyn Clock>) -> Self {
        TokenStore { dir, clock }
    }

    fn load(&self) -> Result<TokenFile, StoreError> {
        let path = self.dir.tokens();
        match fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| StoreError::corrupt(&path, e)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(TokenFile {
                version: 1,
                tokens: Vec::new(),
            }),
            Err(e) => Err(StoreError::read(&path, e)),
        }
    }

    fn save(&self, mut file: TokenFile) -> Result<(), StoreError> {
        let now = self.clock.now();
        file.tokens.retain(|t| t.expires_at + KEEP_EXPIRED > now);
        file.version = 1;
        let path = self.dir.tokens();
        let mut json =
            serde_json::to_vec_pretty(&file).map_err(|e| StoreError::corrupt(&path, e))?;
        json.push(b'\n');
        state::write_atomic(&path, &json, mode::SECRET)?;
        Ok(())
    }

    /// Write an empty table (at `ca init`).
    pub(crate) fn init(&self) -> Result<(), StoreError> {
        self.save(TokenFile {
            version: 1,
            tokens: Vec::new(),
        })
    }

    /// Create a token for `spiffe_id` valid for `ttl`. The caller has validated the identity
    /// against the trust domain and the TTL against its limits.
    pub(crate) fn create(
        &self,
        spiffe_id: &SpiffeId,
        ttl: time::Duration,
    ) -> Result<(JoinToken, TokenRecord), StoreError> {
        let rng = ring::rand::SystemRandom::new();
        let rng_err = |_| StoreError::Random;
        let _lock = StateLock::exclusive(&self.dir)?;
        let mut file = self.load()?;
        let id = loop {
            let mut b = [0u8; 4];
            rng.fill(&mut b).map_err(rng_err)?;
            let id: String = b.iter().map(|x| format!("{x:02x}")).collect();
            if !file.tokens.iter().any(|t| t.id == id) {
                break id;
            }
        };
        let mut secret = [0u8; SECRET_BYTES];
        rng.fill(&mut secret).map_err(rng_err)?;
        let token = JoinToken(format!("{PREFIX}.{id}.{}", URL_SAFE_NO_PAD.encode(secret)));
        let now = self.clock.now();
        let record = TokenRecord {
            id,
            spiffe_id: spiffe_id.clone(),
            sha256: sha256_hex(token.0.as_bytes()),
            created_at: now,
            expires_at: now + ttl,
            used_at: None,
            revoked_at: None,
        };
        file.tokens.push(record.clone());
        self.save(file)?;
        Ok((token, record))
    }

    pub fn list(&self) -> Result<Vec<TokenRecord>, StoreError> {
        Ok(self.load()?.tokens)
    }

    /// Revoke by id. Revoking a revoked token is not an error (the first time is kept).
    pub fn revoke(&self, id: &str) -> Result<TokenRecord, TokenError> {
        let _lock = StateLock::exclusive(&self.dir).map_err(StoreError::from)?;
        let mut file = self.load()?;
        let now = self.clock.now();
        let rec = file
            .tokens
            .iter_mut()
            .find(|t| t.id == id)
            .ok_or_else(|| TokenError::NoSuchId(id.to_owned()))?;
        rec.revoked_at.get_or_insert(now);
        let out = rec.clone();
        self.save(file)?;
        Ok(out)
    }

    /// Check `token` for `requested` and mark it used, durably, before returning the grant.
    ///
    /// Refusals, each distinct: malformed, unknown (including a known id with the wrong secret),
    /// revoked, already used, expired, bound to another identity. A refusal never changes the
    /// token; in particular a wrong identity does not burn it (whoever holds the token could ask
    /// for the right identity anyway).
    pub fn redeem(
        &self,
        token: &JoinToken,
        requested: &SpiffeId,
    ) -> Result<TokenGrant, TokenError> {
        let id = token.id().ok_or(TokenError::Malformed)?.to_owned();
        let presented = sha256_hex(token.expose().trim().as_bytes());
        let _lock = StateLock::exclusive(&self.dir).map_err(StoreError::from)?;
        let mut file = self.load()?;
        let now = self.clock.now();
        let rec = file
            .tokens
            .iter_mut()
            .find(|t| t.id == id && ct_eq(t.sha256.as_bytes(), presented.as_bytes()))
            .ok_or(TokenError::Unknown)?;
        if let Some(at) = rec.revoked_at {
            return Err(TokenError::Revoked {
                id,
                revoked_at: rfc3339(at),
            });
        }
        if let Some(at) = rec.used_at {
            return Err(TokenError::AlreadyUsed {
                id,
                used_at: rfc3339(at),
            });
        }
        if now >= rec.expires_at {
            return Err(TokenError::Expired {
                id,
                expired_at: rfc3339(rec.expires_at),
            });
        }
        if &rec.spiffe_id != requested {
            return Err(TokenError::IdentityMismatch {
                id,
                bound: rec.spiffe_id.clone(),
                requested: requested.clone(),
            });
        }
        rec.used_at = Some(now);
        let grant = TokenGrant {
            token_id: id,
            spiffe_id: rec.spiffe_id.clone(),
        };
        self.save(file)?;
        Ok(grant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::FixedClock;
    use std::time::Duration;

    fn store() -> (tempfile::TempDir, TokenStore, Arc<FixedClock>) {
        let d = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(FixedClock::at_system_now());
        let s = TokenStore::new(StateDir::new(d.path()), clock.clone());
        s.init().expect("init");
        (d, s, clock)
    }

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).expect("id")
    }

    #[test]
    fn token_shape_and_only_hash_stored() {
        let (d, s, _) = store();
        let (tok, rec) = s
            .create(&id("spiffe://td/vm1"), time::Duration::hours(1))
            .expect("create");
        let text = tok.expose();
        let parts: Vec<_> = text.split('.').collect();
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[0], "mgjt");
        assert_eq!(parts[1], rec.id);
        assert_eq!(URL_SAFE_NO_PAD.decode(parts[2]).expect("b64").len(), 32);
        let stored = fs::read_to_string(d.path().join("tokens.json")).expect("read");
        assert!(!stored.contains(parts[2]), "secret stored in clear");
        assert!(stored.contains(&rec.sha256));
        assert!(
            !format!("{tok:?}").contains(parts[2]),
            "Debug leaks the secret"
        );
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(d.path().join("tokens.json"))
                .expect("meta")
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
    }

    #[test]
    fn redeem_once_then_refused() {
        let (_d, s, _) = store();
        let vm = id("spiffe://td/vm1");
        let (tok, _) = s.create(&vm, time::Duration::hours(1)).expect("create");
        let grant = s.redeem(&tok, &vm).expect("first use");
        assert_eq!(grant.spiffe_id, vm);
        assert_eq!(
            grant.authorised_by().to_string(),
            format!("token:{}", grant.token_id)
        );
        assert!(matches!(
            s.redeem(&tok, &vm),
            Err(TokenError::AlreadyUsed { .. })
        ));
        assert_eq!(
            s.list().expect("list")[0].status(OffsetDateTime::now_utc()),
            TokenStatus::Used
        );
    }

    #[test]
    fn each_refusal_is_distinct() {
        let (_d, s, clock) = store();
        let vm = id("spiffe://td/vm1");
        let (tok, rec) = s.create(&vm, time::Duration::hours(1)).expect("create");

        assert!(matches!(
            s.redeem(&JoinToken::new("nonsense"), &vm),
            Err(TokenError::Malformed)
        ));
        let forged = JoinToken::new(format!(
            "mgjt.{}.{}",
            rec.id,
            URL_SAFE_NO_PAD.encode([0u8; 32])
        ));
        assert!(matches!(s.redeem(&forged, &vm), Err(TokenError::Unknown)));
        let other = JoinToken::new(format!(
            "mgjt.00000000.{}",
            URL_SAFE_NO_PAD.encode([0u8; 32])
        ));
        assert!(matches!(s.redeem(&other, &vm), Err(TokenError::Unknown)));
        match s.redeem(&tok, &id("spiffe://td/vm2")) {
            Err(TokenError::IdentityMismatch { bound, .. }) => assert_eq!(bound, vm),
            other => panic!("{other:?}"),
        }
        // A mismatch did not burn the token; expiry does.
        clock.advance(Duration::from_secs(3600));
        assert!(matches!(
            s.redeem(&tok, &vm),
            Err(TokenError::Expired { .. })
        ));

        let (tok2, rec2) = s.create(&vm, time::Duration::hours(1)).expect("create");
        s.revoke(&rec2.id).expect("revoke");
        assert!(matches!(
            s.redeem(&tok2, &vm),
            Err(TokenError::Revoked { .. })
        ));
        assert!(matches!(s.revoke("ffffffff"), Err(TokenError::NoSuchId(_))));
    }

    #[test]
    fn concurrent_redemptions_succeed_exactly_once() {
        let (_d, s, _) = store();
        let vm = id("spiffe://td/vm1");
        let (tok, _) = s.create(&vm, time::Duration::hours(1)).expect("create");
        let wins: usize = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..8)
                .map(|_| sc.spawn(|| s.redeem(&tok, &vm).is_ok()))
                .collect();
            hs.into_iter()
                .map(|h| usize::from(h.join().expect("join")))
                .sum()
        });
        assert_eq!(wins, 1);
    }

    #[test]
    fn old_expired_records_are_pruned() {
        let (_d, s, clock) = store();
        let vm = id("spiffe://td/vm1");
        s.create(&vm, time::Duration::hours(1)).expect("create");
        clock.advance(Duration::from_secs(31 * 86_400));
        s.create(&vm, time::Duration::hours(1)).expect("create");
        assert_eq!(s.list().expect("list").len(), 1);
    }
}
