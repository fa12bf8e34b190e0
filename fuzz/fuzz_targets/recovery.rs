//! Recovery of a log whose segment files are arbitrary bytes (up to three 4 KiB segments, see
//! `herald_wal::fuzzing::fuzz_recovery`): must never panic, and a log it accepts must take an
//! append, read it back and recover again.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    herald_wal::fuzzing::fuzz_recovery(data);
});
