//! `proxy`: the last stage of a connection, moving bytes (TCP) or requests (HTTP, later).

pub mod h2;
pub mod h2_upstream;
pub mod http;
pub(crate) mod http_io;
pub mod relay;
pub mod tcp;
