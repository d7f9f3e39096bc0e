//! meshgate-perf
fn main() {}
