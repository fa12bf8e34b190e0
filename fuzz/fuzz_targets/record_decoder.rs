//! Record and segment-header decoding over arbitrary bytes: must never panic, whatever the input
//! (`herald_wal::format`'s decoders return typed reasons instead).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    herald_wal::fuzzing::fuzz_record_decoder(data);
});
