#![no_main]
//! Fuzz target: `hearth_proto::fuzzing::setup_label`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| hearth_proto::fuzzing::setup_label(data));
