//! `proxy`: the last stage of a connection, moving bytes (TCP) or requests (HTTP, later).

pub mod http;
pub mod relay;
pub mod tcp;
