#![no_main]
//! Fuzz target: `hearth_proto::fuzzing::decode_command`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| hearth_proto::fuzzing::decode_command(data));
