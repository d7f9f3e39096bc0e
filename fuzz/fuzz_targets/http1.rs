//! Fuzzes the sans-IO HTTP/1.1 codec: no input may panic; a request or response head that
//! parses must re-encode and re-parse to the same head and report every prefix as partial;
//! bodies decode the same whole and byte by byte; normalised paths are idempotent.
//! Run: `cargo +nightly fuzz run http1 fuzz/corpus/http1`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    meshgate_dataplane::http1::fuzzing::fuzz_check(data);
});
