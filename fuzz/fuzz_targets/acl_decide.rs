#![no_main]
//! Fuzz target: `hearth_proto::fuzzing::acl_decide`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| hearth_proto::fuzzing::acl_decide(data));
