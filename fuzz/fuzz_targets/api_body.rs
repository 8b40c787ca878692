#![no_main]
//! Fuzz target: `hearth_cloud::fuzzing::api_body`, every JSON request body
//! the cloud API decodes.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = hearth_cloud::fuzzing::api_body(data);
});
