#![no_main]
//! Fuzz target: `hearth_proto::fuzzing::device_frame`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| hearth_proto::fuzzing::device_frame(data));
