#![no_main]
//! Fuzz target: `hearth_proto::fuzzing::signed_payload`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| hearth_proto::fuzzing::signed_payload(data));
