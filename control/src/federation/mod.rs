//! SPIFFE federation: serve this trust domain's bundle to peers, fetch theirs, keep them.
//!
//! - [`endpoint`]: the bundle endpoint server (`https_spiffe`: the server presents an SVID of
//!   the local CA; `https_web`: an operator certificate). `meshgate bundle serve` and
//!   `meshgate ca serve --bundle-listen` run it; [`endpoint::BundleEndpoint::start`] is the one
//!   entry point to mount it elsewhere.
//! - [`store`]: the trust store in the state directory (`trust/<td>/`): per federated trust
//!   domain its endpoint, the last good bundle (SPIFFE JSON and PEM) and the refresh status.
//! - [`client`]: one HTTPS fetch of a peer's bundle, verified per its profile.
//! - [`poller`]: the loop inside `meshgate run` that refreshes every peer at its refresh hint
//!   (bounded), keeps the last good bundle on any failure, and tells the daemon when a bundle
//!   changed so that every shard's verifier picks it up through the ordinary reload.
//!
//! Trust domains are never merged: each federated domain has its own directory and PEM file,
//! and a fetched bundle is accepted only for the domain it was fetched for.

pub mod client;
pub mod endpoint;
pub mod poller;
pub mod store;

use std::fmt;

use serde::{Deserialize, Serialize};

/// How a bundle endpoint authenticates itself (SPIFFE federation profiles).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Profile {
    /// The server presents an X509-SVID; the client checks it against the peer's bundle (the
    /// bootstrap bundle the first time) and its SPIFFE ID.
    HttpsSpiffe,
    /// The server presents a Web PKI certificate for its host name.
    HttpsWeb,
    /// No endpoint: the bundle was imported by an operator (`meshgate bundle import`).
    Static,
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Profile::HttpsSpiffe => "https_spiffe",
            Profile::HttpsWeb => "https_web",
            Profile::Static => "static",
        })
    }
}

/// Path of the bundle endpoint server's SVID: `spiffe://<td>/meshgate/bundle-endpoint`.
pub const ENDPOINT_ID_PATH: &str = "/meshgate/bundle-endpoint";
