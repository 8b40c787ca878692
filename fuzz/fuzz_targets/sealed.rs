#![no_main]
//! Fuzz target: `hearth_proto::fuzzing::sealed` (the HPKE sealed-envelope decoder, ADR 0006).

libfuzzer_sys::fuzz_target!(|data: &[u8]| hearth_proto::fuzzing::sealed(data));
