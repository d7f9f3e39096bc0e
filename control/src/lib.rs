//! meshgate-control: the CA, issuance, enrollment, trust bundles and the state store.
//!
//! Thin for now: it holds the atomic state-file writer that every later piece of state (CA keys,
//! ledger, tokens, bundles) goes through. See docs/ARCHITECTURE.md.

pub mod state;
