//! Herald's T-SQL parser over arbitrary bytes (`herald_engine::sql::fuzz_parse`): must never
//! panic (or overflow the stack), and whatever parses must print (`Display`) as a script that
//! parses back to the very same statements.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    herald_engine::sql::fuzz_parse(data);
});
