//! meshgate-dataplane: the per-core shards and the connection pipeline.
//!
//! Data flow of one connection (each stage a module):
//! `listen::accept` -> (`tls::secure`, later) -> route -> `balance::pick` -> `upstream::connect`
//! -> `proxy` (tcp copy; http later) -> metrics. The only module that knows about io_uring is
//! [`rt`]; see docs/ARCHITECTURE.md.

pub mod accesslog;
pub mod admin;
mod authz;
pub mod balance;
mod bufpool;
pub mod error;
pub mod gateway;
pub mod health;
pub mod http1;
mod http_route;
mod listen;
pub mod metrics;
mod pool;
mod proxy;
pub mod retry;
pub mod rt;
mod shard;
pub mod tls;
mod upstream;

pub use gateway::{Gateway, Shared, StartError};
