//! The engine's commit-record decoder over arbitrary bytes (`herald_engine::record::fuzz_decode`):
//! must never panic, and whatever decodes must encode back to the very same bytes (so no two
//! records mean the same thing, and no field is silently dropped or normalised).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    herald_engine::record::fuzz_decode(data);
});
