#![no_main]
//! Fuzz target: `hearth_proto::fuzzing::cloud_frame`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| hearth_proto::fuzzing::cloud_frame(data));
