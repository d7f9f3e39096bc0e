//! meshgate-control: the CA, issuance, enrollment, trust bundles and the state store.
//!
//! Offline CA core (this crate today): [`ca::Ca`] initialises a state directory (ECDSA P-256
//! root, or an intermediate under an operator's root), issues X509-SVIDs ([`ca::Ca::issue`],
//! [`ca::Ca::sign_csr`]), records them in a ledger, revokes them into a CRL, exports trust
//! bundles, and manages single-use join tokens ([`tokens::TokenStore::redeem`]). The enrollment
//! server ([`enroll`]: join-token enrollment and mTLS renewal over HTTPS) and the agent
//! ([`agent`]: enroll once, rotate at half-life, survive CA outages and restarts) build on
//! these calls, and so does the SPIFFE Workload API ([`workload`]). State layout: docs/state-dir.md.
//! Every state write goes through [`state::write_atomic`]; writers serialise on
//! [`layout::StateLock`].

pub mod agent;
pub mod bundle;
pub mod ca;
pub mod clock;
pub mod duration;
pub mod enroll;
pub mod error;
pub mod federation;
pub mod history;
pub mod inspect;
pub mod layout;
pub mod ledger;
pub mod spiffe;
pub mod state;
pub mod tokens;
#[cfg(feature = "workload-api")]
pub mod workload;

pub use ca::{
    Ca, CsrRequest, InitOptions, IssueRequest, IssuedSvid, RenewOptions, Renewed, SignedSvid,
};
pub use clock::{Clock, FixedClock, SystemClock};
pub use error::{CaError, CsrError, StoreError, TokenError};
pub use ledger::{AuthorisedBy, LedgerEntry, Serial};
pub use spiffe::{SpiffeId, TrustDomain};
pub use tokens::{JoinToken, TokenGrant, TokenStore};
