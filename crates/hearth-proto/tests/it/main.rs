//! Integration tests for the protocol core: the device's access-list
//! decision, the pairing exchange with a tampering cloud, committed test
//! vectors (ours and one made by pycose), and a replay of the fuzz corpora.
//!
//! Everything is deterministic: keys come from repeated seed bytes, the
//! clock is a constant, and ECDSA signatures are RFC 6979 deterministic.

// A panic is how a test reports failure, so unwrap is fine here (STYLE.md §4
// bans it in library code only).
#![allow(clippy::unwrap_used)]

mod acl;
mod corpus;
mod fuzz_replay;
mod pairing;
mod vectors;

use std::path::PathBuf;

use hearth_proto::ids::{ControllerId, DeviceId};
use hearth_proto::keys::PublicKey;
use hearth_proto::message::{Command, CommandPayload};
use hearth_proto::PROTOCOL_VERSION;
use p256::ecdsa::SigningKey;

/// The device clock every test uses, unix seconds.
pub const NOW: u64 = hearth_proto::fuzzing::NOW;

/// A deterministic key from a repeated seed byte.
pub fn key(seed: u8) -> SigningKey {
    hearth_proto::fuzzing::seeded_key(seed)
}

/// The public half of [`key`].
pub fn public(seed: u8) -> PublicKey {
    PublicKey::from(&key(seed))
}

/// The controller id of [`key`].
pub fn controller(seed: u8) -> ControllerId {
    public(seed).controller_id()
}

/// A device id from a repeated byte.
pub fn device(byte: u8) -> DeviceId {
    DeviceId::from_bytes([byte; DeviceId::BYTES])
}

/// The raw key-id bytes a controller signs with.
pub fn controller_kid(seed: u8) -> Vec<u8> {
    hex::decode(controller(seed).as_str()).expect("controller ids are hex")
}

/// A well-formed command from controller `seed` to `device(0x11)`.
pub fn command(seed: u8, counter: u64, command: Command) -> CommandPayload {
    CommandPayload {
        v: PROTOCOL_VERSION,
        device: device(0x11),
        controller: controller(seed),
        counter,
        issued_at: NOW,
        command,
    }
}

/// CBOR-encodes a payload the way the crate does (ciborium, serde).
pub fn cbor<T: serde::Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(value, &mut out).expect("test payloads encode");
    out
}

/// The repository root (two levels above this crate).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// This crate's committed test data.
pub fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

/// Whether the run should rewrite committed fixtures instead of checking
/// them (`HEARTH_BLESS=1 cargo test -p hearth-proto --test it`).
pub fn bless() -> bool {
    std::env::var_os("HEARTH_BLESS").is_some_and(|v| v == "1")
}
