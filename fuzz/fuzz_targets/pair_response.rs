#![no_main]
//! Fuzz target: `hearth_proto::fuzzing::pair_response`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| hearth_proto::fuzzing::pair_response(data));
