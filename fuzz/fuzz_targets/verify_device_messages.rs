#![no_main]
//! Fuzz target: `hearth_proto::fuzzing::verify_device_messages`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| hearth_proto::fuzzing::verify_device_messages(data));
