//! Fuzzing entry point for the API's request bodies (issue 7 "Fuzzing":
//! a target for every decoder that takes bytes from the network). Hidden;
//! used by `fuzz/fuzz_targets/api_body.rs` and replayed by
//! `tests/it/fuzz_bodies.rs` on stable.
//!
//! A child of `api` so it decodes into the very structs the handlers use,
//! without making them public.

use super::{check_name, json_error, CommandBody, ControllerBody, Credentials, PairBody};

/// Decodes `data` as every JSON body the API accepts, the way
/// [`super::JsonBody`] does, and runs the checks a handler would run
/// first. Must never panic, whatever the bytes. Returns how many body
/// kinds accepted the bytes (the stable replay test checks that every seed
/// is a real body).
pub fn api_body(data: &[u8]) -> usize {
    fn decode<T: serde::de::DeserializeOwned>(data: &[u8]) -> Option<T> {
        match serde_json::from_slice::<T>(data) {
            Ok(v) => Some(v),
            Err(e) => {
                // The client-facing message is built from attacker input too.
                let _ = json_error(&e);
                None
            }
        }
    }
    let mut accepted = 0;
    if let Some(c) = decode::<Credentials>(data) {
        let _ = (c.email.len(), c.password.len());
        accepted += 1;
    }
    if let Some(c) = decode::<ControllerBody>(data) {
        let _ = check_name(&c.name);
        let _ = c.public_key.controller_id();
        accepted += 1;
    }
    if let Some(c) = decode::<CommandBody>(data) {
        let _ = hearth_proto::b64::decode(&c.envelope);
        accepted += 1;
    }
    if let Some(p) = decode::<PairBody>(data) {
        let _ = check_name(&p.name);
        let _ = (p.code_lookup.len(), p.device, p.request);
        accepted += 1;
    }
    accepted
}
