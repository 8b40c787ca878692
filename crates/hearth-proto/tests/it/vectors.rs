//! Committed test vectors in `tests/data/`.
//!
//! Ours (`*.cose.json`) must be reproduced byte for byte up to the
//! signature, so any change to keys, CBOR encoding, header order or content
//! types shows up as a diff. The signature (the last 64 bytes of a
//! COSE_Sign1) differs on every signing since ES256 signs with `ring` and a
//! random nonce (ADR 0015); the committed ones were made by the `p256`
//! crate (RFC 6979) and must verify. `tests/interop/check_cose.py`
//! verifies the same files with pycose, an independent COSE implementation,
//! and writes `python_command.cose.json`, which the last test here accepts.
//!
//! To regenerate after an intended format change:
//! `HEARTH_BLESS=1 cargo test -p hearth-proto --test it vectors`.

use hearth_proto::acl::{AccessList, DeviceContext, ReplayState, Role};
use hearth_proto::capability::DeviceKind;
use hearth_proto::envelope::{self, Kind};
use hearth_proto::keys::PublicKey;
use hearth_proto::message::{
    self, device_key_id, Cause, Command, CommandPayload, DeviceState, Outcome, ResultPayload, StatePayload,
};
use hearth_proto::pairing::{self, PairConfirmation};
use hearth_proto::PROTOCOL_VERSION;
use serde::{Deserialize, Serialize};

use crate::{bless, command, controller, controller_kid, data_dir, device, key, public, NOW};

/// One signed envelope and what it was made from. Hex everywhere so other
/// implementations need nothing but a JSON reader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Vector {
    /// What this vector shows.
    description: String,
    /// The test key's private scalar (a repeated byte; never a real key).
    private_key_hex: String,
    /// SEC1 uncompressed public key.
    public_key_sec1_hex: String,
    /// The protected header's `kid`.
    kid_hex: String,
    /// The protected header's content type.
    content_type: String,
    /// The CBOR payload inside the envelope.
    payload_cbor_hex: String,
    /// The payload as JSON, for people reading the file.
    payload: serde_json::Value,
    /// The tagged COSE_Sign1.
    cose_sign1_hex: String,
}

/// Builds a vector for `payload` signed with key `seed` as `kind`.
fn vector<T: Serialize>(description: &str, seed: u8, kind: Kind, kid: Vec<u8>, content_type: &str, payload: &T, signed: Vec<u8>) -> Vector {
    let cbor = crate::cbor(payload);
    Vector {
        description: description.to_owned(),
        private_key_hex: hex::encode([seed; 32]),
        public_key_sec1_hex: hex::encode(public(seed).to_sec1()),
        kid_hex: hex::encode(&kid),
        content_type: content_type.to_owned(),
        payload_cbor_hex: hex::encode(&cbor),
        payload: serde_json::to_value(payload).expect("payloads are JSON-representable"),
        cose_sign1_hex: {
            // The helper in `message` and a plain `envelope::sign` over the same
            // payload must agree; otherwise the vector documents the wrong thing.
            let direct = envelope::sign(&key(seed), kind, &kid, cbor).expect("signs");
            assert_eq!(unsigned(&signed), unsigned(&direct), "{description}: message helper and envelope::sign differ");
            hex::encode(signed)
        },
    }
}

/// A COSE_Sign1 without its ES256 signature (the last 64 bytes), as hex.
fn unsigned(cose_sign1: &[u8]) -> String {
    assert!(cose_sign1.len() > 64 && cose_sign1[cose_sign1.len() - 66..cose_sign1.len() - 64] == [0x58, 0x40]);
    hex::encode(&cose_sign1[..cose_sign1.len() - 64])
}

const CONTROLLER: u8 = 1;
const DEVICE_KEY: u8 = 2;

fn our_vectors() -> Vec<(&'static str, Vector)> {
    let dev = device(0x11);
    let cmd = CommandPayload { counter: 101, ..command(CONTROLLER, 0, Command::SetRelay { on: true }) };
    let result = ResultPayload {
        v: PROTOCOL_VERSION,
        device: dev.clone(),
        controller: controller(CONTROLLER),
        counter: 101,
        outcome: Outcome::Done,
        state: DeviceState { relay: Some(true), ..DeviceState::default() },
        at: NOW,        access: None,
    };
    let state = StatePayload {
        v: PROTOCOL_VERSION,
        device: dev.clone(),
        kind: DeviceKind::EnergyPlug,
        seq: 42,
        at: NOW,
        state: DeviceState { relay: Some(true), motion: None, power_mw: Some(4_500), firmware: None, brightness: None },
        cause: Cause::Command { controller: controller(CONTROLLER) },
    };
    let confirmation =
        PairConfirmation { v: PROTOCOL_VERSION, device: dev.clone(), controller: controller(CONTROLLER), role: Role::Owner, at: NOW };
    let dkid = device_key_id(&dev);
    vec![
        (
            "command_set_relay.cose.json",
            vector(
                "Controller key [1;32] asks device 111111111111111111111111 to switch its relay on (counter 101).",
                CONTROLLER,
                Kind::Command,
                controller_kid(CONTROLLER),
                "application/hearth.command.v1+cbor",
                &cmd,
                message::sign_command(&key(CONTROLLER), &cmd).unwrap(),
            ),
        ),
        (
            "result_done.cose.json",
            vector(
                "Device key [2;32] answers counter 101: done, relay on.",
                DEVICE_KEY,
                Kind::CommandResult,
                dkid.clone(),
                "application/hearth.result.v1+cbor",
                &result,
                message::sign_result(&key(DEVICE_KEY), &result).unwrap(),
            ),
        ),
        (
            "state_report.cose.json",
            vector(
                "Device key [2;32] reports relay on at 4.5 W after a command.",
                DEVICE_KEY,
                Kind::StateReport,
                dkid.clone(),
                "application/hearth.state.v1+cbor",
                &state,
                message::sign_state(&key(DEVICE_KEY), &state).unwrap(),
            ),
        ),
        (
            "pair_confirmation.cose.json",
            vector(
                "Device key [2;32] confirms controller [1;32] as its owner.",
                DEVICE_KEY,
                Kind::PairConfirmation,
                dkid,
                "application/hearth.pair-confirmation.v1+cbor",
                &confirmation,
                envelope::sign(&key(DEVICE_KEY), Kind::PairConfirmation, &device_key_id(&dev), crate::cbor(&confirmation)).unwrap(),
            ),
        ),
    ]
}

fn read_vector(name: &str) -> Vector {
    let path = data_dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn our_vectors_reproduce_byte_for_byte() {
    for (name, made) in our_vectors() {
        if bless() {
            let text = serde_json::to_string_pretty(&made).unwrap() + "\n";
            std::fs::write(data_dir().join(name), text).unwrap();
            continue;
        }
        let committed = read_vector(name);
        let strip = |v: &Vector| {
            let signed = hex::decode(&v.cose_sign1_hex).unwrap();
            Vector { cose_sign1_hex: unsigned(&signed), ..v.clone() }
        };
        assert_eq!(strip(&committed), strip(&made), "{name} no longer reproduces; if intended, rerun with HEARTH_BLESS=1");
        // Both signatures, the committed (p256, RFC 6979) and the fresh one
        // (ring), verify under the vector's public key.
        let key = PublicKey::from_sec1(&hex::decode(&committed.public_key_sec1_hex).unwrap()).unwrap();
        for v in [&committed, &made] {
            let payload = envelope::open(&hex::decode(&v.cose_sign1_hex).unwrap()).unwrap().verify(&key).unwrap();
            assert_eq!(hex::encode(payload), committed.payload_cbor_hex, "{name}");
        }
    }
}

#[test]
fn our_vectors_verify() {
    let dev = device(0x11);
    let cmd = read_vector("command_set_relay.cose.json");
    let bytes = hex::decode(&cmd.cose_sign1_hex).unwrap();
    let key = PublicKey::from_sec1(&hex::decode(&cmd.public_key_sec1_hex).unwrap()).unwrap();
    let u = envelope::open(&bytes).unwrap();
    assert_eq!(u.kind(), Kind::Command);
    assert_eq!(hex::encode(u.key_id()), cmd.kid_hex);
    assert_eq!(hex::encode(u.verify(&key).unwrap()), cmd.payload_cbor_hex);
    let mut acl = AccessList::default();
    acl.upsert(key, Role::Owner, NOW);
    let ctx = DeviceContext { device: &dev, kind: DeviceKind::Plug, now: NOW };
    let d = acl.decide(ctx, &ReplayState::default(), &bytes).expect("the committed command is accepted");
    assert_eq!((d.counter, d.command), (101, Command::SetRelay { on: true }));

    let device_key = public(DEVICE_KEY);
    let result = hex::decode(read_vector("result_done.cose.json").cose_sign1_hex).unwrap();
    assert_eq!(message::verify_result(&result, &dev, &device_key).unwrap().outcome, Outcome::Done);
    assert_eq!(message::peek_result(&result).unwrap().counter, 101);
    let state = hex::decode(read_vector("state_report.cose.json").cose_sign1_hex).unwrap();
    assert_eq!(message::verify_state(&state, &dev, &device_key).unwrap().state.power_mw, Some(4_500));
    let conf = hex::decode(read_vector("pair_confirmation.cose.json").cose_sign1_hex).unwrap();
    assert_eq!(pairing::verify_confirmation(&conf, &dev, &device_key).unwrap().controller, controller(CONTROLLER));
    // Wrong key, or right key for the wrong device: refused.
    assert!(message::verify_result(&result, &dev, &public(CONTROLLER)).is_err());
    assert!(message::verify_state(&state, &device(0x22), &device_key).is_err());
}

/// A command made by pycose (`tests/interop/check_cose.py --write`), with
/// its own CBOR encoder and ECDSA: our decoder, verifier and decision
/// function accept it exactly like one of ours.
#[test]
fn python_made_command_is_accepted() {
    let v = read_vector("python_command.cose.json");
    let bytes = hex::decode(&v.cose_sign1_hex).unwrap();
    let key = PublicKey::from_sec1(&hex::decode(&v.public_key_sec1_hex).unwrap()).unwrap();
    assert_eq!(key, public(3), "the Python vector uses key [3;32]");
    let u = envelope::open(&bytes).expect("pycose's COSE_Sign1 decodes");
    assert_eq!(u.kind(), Kind::Command);
    assert_eq!(u.key_id(), controller_kid(3).as_slice());
    let payload = u.verify(&key).expect("pycose's ES256 signature verifies");
    assert_eq!(hex::encode(&payload), v.payload_cbor_hex);
    let cmd = message::decode_command(&payload).expect("cbor2's payload decodes");
    assert_eq!(cmd.controller, controller(3));

    let dev = device(0x11);
    let mut acl = AccessList::default();
    acl.upsert(key.clone(), Role::Member, NOW);
    let ctx = DeviceContext { device: &dev, kind: DeviceKind::Plug, now: NOW };
    let d = acl.decide(ctx, &ReplayState::default(), &bytes).expect("the device accepts it");
    assert_eq!(d.command, Command::Toggle);

    // And a flipped signature bit from Python's side is refused like ours.
    let mut bad = bytes.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert!(envelope::open(&bad).unwrap().verify(&key).is_err());
}
