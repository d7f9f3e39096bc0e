//! `tls::secure`: the stage between `listen::accept` and `route::resolve`.
//!
//! Socket-free building blocks; the pipeline drives them over `rt::TcpStream`:
//! - [`clienthello`]: sans-IO ClientHello peek (SNI, ALPN, versions) for `tls-passthrough`
//!   routing and for logging before a handshake.
//! - [`spiffe`]: SPIFFE IDs, per-trust-domain bundles, the rustls client-certificate verifier
//!   (downstream mTLS) and server-certificate verifier (upstream mTLS), rejection reasons.
//! - [`certs`]: server certificates chosen by SNI, PEM loading, and the rustls `ServerConfig` /
//!   `ClientConfig` builders (ring provider only).
//!
//! Nothing here touches a socket or a clock other than through its arguments.

pub mod certs;
pub mod clienthello;
pub mod spiffe;

#[cfg(test)]
mod tests;
