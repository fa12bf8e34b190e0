//! The client protocol's frame decoders (requests as a node reads them, responses as a client
//! reads them) over arbitrary bytes: must never panic; decoding in chunks must equal decoding
//! whole; every decoded frame must encode and decode back to itself
//! (`herald_net::fuzzing::fuzz_client_frame_decoder` holds the checks).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    herald_net::fuzzing::fuzz_client_frame_decoder(data);
});
