//! meshgate-dataplane: the per-core shards and the connection pipeline.

pub mod rt;
