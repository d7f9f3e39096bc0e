//! Fuzzes the sans-IO ClientHello peek: no input may panic, and a parsed hello must parse the
//! same from exactly its records and report every prefix of them as incomplete.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    meshgate_dataplane::tls::clienthello::fuzz_check(data);
});
