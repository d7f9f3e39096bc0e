//! Errors of the CA core, one enum per concern. Messages are for operators: each says what is
//! wrong and what to do. [`CaError::is_usage`] separates "the input or the setup is wrong"
//! (the CLI exits 64) from failures of the machine (exit 1).

use std::io;
use std::path::PathBuf;

use crate::layout::LockError;
use crate::spiffe::{SpiffeId, SpiffeIdError, TrustDomain};
use crate::state::WriteError;

/// Reading or writing a state file failed, or a file is not what meshgate wrote.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("{path} is damaged ({detail}); restore the state directory from a backup")]
    Corrupt { path: PathBuf, detail: String },
    #[error("the system random number generator failed; nothing was written")]
    Random,
}

impl StoreError {
    pub(crate) fn read(path: impl Into<PathBuf>, source: io::Error) -> Self {
        StoreError::Read {
            path: path.into(),
            source,
        }
    }
    pub(crate) fn corrupt(path: impl Into<PathBuf>, detail: impl ToString) -> Self {
        StoreError::Corrupt {
            path: path.into(),
            detail: detail.to_string(),
        }
    }
}

/// A CSR was refused.
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    #[error("the CSR is not a valid PKCS#10 request: {0}")]
    Malformed(String),
    #[error("the CSR's signature does not verify: it was not signed by the key it carries")]
    BadSignature,
    #[error(
        "the CSR's key type is not accepted ({0}); use ECDSA P-256 (or P-384, Ed25519, RSA >= 2048)"
    )]
    UnsupportedKey(String),
    #[error("the CSR asks for {in_csr}, but this request is authorised for {authorised}")]
    IdentityMismatch {
        authorised: SpiffeId,
        in_csr: String,
    },
    #[error("the CSR asks for DNS name {0:?}, which this request is not authorised for")]
    DnsNotAuthorised(String),
    #[error(
        "the CSR asks for a SAN meshgate does not issue ({0}); only one URI SAN (the SPIFFE ID) and DNS names"
    )]
    UnsupportedSan(String),
}

/// A join token was refused; each reason is distinct so the enrollment server can audit it.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("the join token is not in the form meshgate issues (mgjt.<id>.<secret>)")]
    Malformed,
    #[error("unknown join token; create one with `meshgate token create`")]
    Unknown,
    #[error(
        "join token {id} expired at {expired_at}; create a new one with `meshgate token create`"
    )]
    Expired { id: String, expired_at: String },
    #[error(
        "join token {id} was already used at {used_at}; join tokens are single-use, create a new one"
    )]
    AlreadyUsed { id: String, used_at: String },
    #[error("join token {id} was revoked at {revoked_at}")]
    Revoked { id: String, revoked_at: String },
    #[error("join token {id} is for {bound}, not {requested}")]
    IdentityMismatch {
        id: String,
        bound: SpiffeId,
        requested: SpiffeId,
    },
    #[error("no join token with id {0:?}; see `meshgate token list`")]
    NoSuchId(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Everything the CA can refuse or fail at.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("no CA in {dir}: run `meshgate ca init --trust-domain <TD> --state-dir {dir}` first")]
    NotInitialised { dir: PathBuf },
    #[error(
        "{dir} already holds a CA for trust domain {trust_domain}; use another --state-dir (init never overwrites a CA)"
    )]
    AlreadyInitialised {
        dir: PathBuf,
        trust_domain: TrustDomain,
    },
    #[error(
        "{dir} is not empty and is not a meshgate state directory (found {found:?}); point --state-dir at a new or empty directory"
    )]
    ForeignDir { dir: PathBuf, found: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{path} can be read by other users (mode {mode:03o}); run `chmod 600 {path}`")]
    InsecureKey { path: PathBuf, mode: u32 },
    #[error("invalid SPIFFE ID: {0}")]
    SpiffeId(#[from] SpiffeIdError),
    #[error(
        "{id} is not in this CA's trust domain {trust_domain}; use spiffe://{trust_domain}/<path>"
    )]
    ForeignTrustDomain {
        id: SpiffeId,
        trust_domain: TrustDomain,
    },
    #[error(
        "{0} is reserved for meshgate's own components (paths under /meshgate/); join tokens and enrollment cannot issue it, pick another path"
    )]
    ReservedIdentity(SpiffeId),
    #[error("invalid DNS name {name:?}: {reason}")]
    InvalidDnsName { name: String, reason: &'static str },
    #[error("invalid TTL: {0}")]
    InvalidTtl(String),
    #[error(
        "TTL {requested} is longer than this CA's maximum {max}; ask for {max} or less (the maximum is set by `meshgate ca init --max-ttl`)"
    )]
    TtlTooLong { requested: String, max: String },
    #[error(
        "the CA certificate expired at {not_after}; this CA cannot issue any more (rotate the CA)"
    )]
    CaExpired { not_after: String },
    #[error("the CA certificate is not valid before {not_before}; check this host's clock")]
    CaNotYetValid { not_before: String },
    #[error(
        "invalid serial {0:?}: expected hexadecimal digits (as printed by `meshgate cert list`)"
    )]
    BadSerial(String),
    #[error("serial {0} is not in this CA's ledger; see `meshgate cert list --all`")]
    UnknownSerial(String),
    #[error("invalid revocation reason {0:?}; use one of: {reasons}", reasons = crate::ca::RevocationReason::NAMES.join(", "))]
    BadReason(String),
    #[error("operator root: {0}")]
    OperatorRoot(String),
    #[error("cannot {what}: {source}")]
    Crypto {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("refused CSR: {0}")]
    Csr(#[from] CsrError),
    #[error("renewal refused: {0}")]
    RenewalRefused(String),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("CA rotation: {0}")]
    Rotation(String),
    #[error(
        "refusing to retire the old root: {count} unexpired SVID(s) signed by it are in the ledger (the last expires at {latest_expiry}); wait until then, revoke them, or pass --force to cut them off"
    )]
    RetireRefused { count: usize, latest_expiry: String },
}

impl CaError {
    /// True when the operator's input or setup is at fault (CLI exit 64), false for failures of
    /// the machine or damaged state (exit 1).
    pub fn is_usage(&self) -> bool {
        !matches!(
            self,
            CaError::Store(_) | CaError::Crypto { .. } | CaError::Token(TokenError::Store(_))
        )
    }

    pub(crate) fn crypto(what: &'static str) -> impl FnOnce(rcgen::Error) -> CaError {
        move |source| CaError::Crypto { what, source }
    }
}

impl From<WriteError> for CaError {
    fn from(e: WriteError) -> Self {
        CaError::Store(StoreError::Write(e))
    }
}

impl From<LockError> for CaError {
    fn from(e: LockError) -> Self {
        CaError::Store(StoreError::Lock(e))
    }
}
