//! Fuzz entry points: one function per decoder that reads bytes from the
//! network, each taking arbitrary `&[u8]`.
//!
//! The cargo-fuzz targets in `fuzz/` are a few lines calling these, and the
//! stable-Rust test `tests/it/fuzz_replay.rs` runs them over the committed
//! seed corpora plus deterministic mutations, so CI exercises them without a
//! nightly toolchain. Every function must return normally for any input: a
//! panic is a bug. Where a decoder's output can be checked cheaply the entry
//! point also asserts a property (round trip, replay refusal), because a
//! fuzzer that only looks for crashes misses wrong answers.
//!
//! Keys and ids here are fixed (seeded scalars, constant ids) so that runs
//! are deterministic and seeds signed with them reach the code behind the
//! signature check. They are public test fixtures, never real secrets.

use std::sync::OnceLock;

use p256::ecdsa::SigningKey;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::acl::{AccessList, Decision, DeviceContext, ReplayState, Role};
use crate::capability::DeviceKind;
use crate::e2e::{self, EncSecretKey, OpenError};
use crate::envelope::{self, Kind};
use crate::ids::DeviceId;
use crate::keys::PublicKey;
use crate::link::{self, CloudFrame, ControllerFrame, ControllerPush, DeviceFrame};
use crate::message::{self, Command};
use crate::pairing::{self, PairRequest, PairResponse, PairingGate, PendingPairing, SetupLabel, SetupSecret};

/// Seed byte of the fixture controller key (`SigningKey::from_slice(&[1; 32])`).
pub const CONTROLLER_SEED: u8 = 1;
/// Seed byte of the fixture device key.
pub const DEVICE_SEED: u8 = 2;
/// The fixture device id bytes.
pub const DEVICE_ID: [u8; 12] = [0x11; 12];
/// The fixture setup secret bytes.
pub const SETUP_SECRET: [u8; 16] = [0x07; 16];
/// The nonce of the fixture pairing request, fixed so runs are deterministic.
pub const PAIR_NONCE: [u8; 16] = [0x09; 16];
/// The fixture device clock, unix seconds.
pub const NOW: u64 = 1_700_000_000;
/// The counter already committed for the fixture controller.
pub const LAST_COUNTER: u64 = 100;

/// Everything the entry points check against.
#[derive(Debug)]
pub struct Fixture {
    /// The controller's signing key.
    pub controller_key: SigningKey,
    /// The device's signing key.
    pub device_key: SigningKey,
    /// The device id.
    pub device: DeviceId,
    /// The device's setup secret.
    pub secret: SetupSecret,
    /// The controller's side of a pairing with the fixture device.
    pub pending: PendingPairing,
    /// An access list holding the controller as owner.
    pub acl: AccessList,
    /// Replay state with [`LAST_COUNTER`] committed for the controller.
    pub replay: ReplayState,
    /// The controller's HPKE key (ADR 0006), derived as the CLI derives it.
    pub controller_enc: EncSecretKey,
}

/// A key from a repeated seed byte, as the tests and vectors use them.
pub fn seeded_key(seed: u8) -> SigningKey {
    // Every seed 1..=255 repeated 32 times is a scalar far below the P-256
    // order and non-zero, so this only fails for seed 0, which no caller uses.
    SigningKey::from_slice(&[seed; 32]).expect("a constant non-zero scalar below the order")
}

/// The shared fixture, built once per process: deriving public keys costs a
/// scalar multiplication that would otherwise dominate every fuzz run.
pub fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let controller_key = seeded_key(CONTROLLER_SEED);
        let device_key = seeded_key(DEVICE_SEED);
        let device = DeviceId::from_bytes(DEVICE_ID);
        let secret = SetupSecret::from_bytes(SETUP_SECRET);
        let pending = PendingPairing::start_with_nonce(secret.clone(), &controller_key, PAIR_NONCE);
        let mut acl = AccessList::default();
        acl.upsert(PublicKey::from(&controller_key), Role::Owner, NOW);
        let mut replay = ReplayState::default();
        replay.commit(&Decision {
            controller: PublicKey::from(&controller_key).controller_id(),
            role: Role::Owner,
            counter: LAST_COUNTER,
            command: Command::GetState,
            max_on_secs: None,
        });
        let controller_enc = EncSecretKey::for_controller(&controller_key);
        Fixture { controller_key, device_key, device, secret, pending, acl, replay, controller_enc }
    })
}

/// The fixture device's context for [`AccessList::decide`].
pub fn context(f: &Fixture) -> DeviceContext<'_> {
    DeviceContext { device: &f.device, kind: DeviceKind::Plug, now: NOW }
}

/// `envelope::open`, then the signature check with both fixture keys, as
/// every kind, and the unverified device-id read used for routing.
pub fn envelope(data: &[u8]) {
    let f = fixture();
    let _ = message::claimed_device(data);
    let Ok(unverified) = envelope::open(data) else { return };
    assert!(!unverified.key_id().is_empty() && unverified.key_id().len() <= 32, "open let through a bad key id");
    for key in [&f.controller_key, &f.device_key] {
        let public = PublicKey::from(key);
        let _ = unverified.clone().verify(&public);
        for kind in [Kind::Command, Kind::CommandResult, Kind::StateReport, Kind::PairConfirmation] {
            let verified = unverified.clone().verify_as(kind, &public);
            // Kind separation (ADR 0001): a signature for one kind is never accepted as another.
            if verified.is_ok() {
                assert_eq!(unverified.kind(), kind, "an envelope verified as the wrong kind");
            }
        }
    }
}

/// The cloud's unverified routing reads: `peek_command` and `peek_result`.
pub fn peek(data: &[u8]) {
    let _ = message::peek_command(data);
    let _ = message::peek_result(data);
}

/// The controller's and cloud's checks of device-signed bytes: results,
/// state reports and pairing confirmations, with the fixture device key.
pub fn verify_device_messages(data: &[u8]) {
    let f = fixture();
    let key = PublicKey::from(&f.device_key);
    let _ = message::verify_result(data, &f.device, &key);
    let _ = message::verify_state(data, &f.device, &key);
    let _ = pairing::verify_confirmation(data, &f.device, &key);
}

/// `message::decode_command` on a payload as if its signature had passed.
pub fn decode_command(data: &[u8]) {
    if let Ok(cmd) = message::decode_command(data) {
        assert_eq!(cmd.v, crate::PROTOCOL_VERSION, "decode_command let through another version");
    }
}

/// The device's decision on raw bytes, against the fixture access list.
pub fn acl_decide(data: &[u8]) {
    let f = fixture();
    decide_and_check(f, data);
}

/// Signs `data` as the payload of every kind with the fixture keys and runs
/// the matching check. Random bytes cannot carry a valid signature, so this
/// is how the fuzzer reaches the payload decoding that sits behind it.
pub fn signed_payload(data: &[u8]) {
    let f = fixture();
    let controller = PublicKey::from(&f.controller_key);
    // A ControllerId is always lowercase hex, so this decode cannot fail.
    let controller_kid = hex::decode(controller.controller_id().as_str()).unwrap_or_default();
    let device_kid = message::device_key_id(&f.device);
    if let Ok(signed) = envelope::sign(&f.controller_key, Kind::Command, &controller_kid, data.to_vec()) {
        decide_and_check(f, &signed);
        let _ = message::peek_command(&signed);
    }
    let device_key = PublicKey::from(&f.device_key);
    if let Ok(signed) = envelope::sign(&f.device_key, Kind::CommandResult, &device_kid, data.to_vec()) {
        let _ = message::peek_result(&signed);
        if let Ok(result) = message::verify_result(&signed, &f.device, &device_key) {
            assert_eq!(result.device, f.device, "verify_result accepted another device");
        }
    }
    if let Ok(signed) = envelope::sign(&f.device_key, Kind::StateReport, &device_kid, data.to_vec()) {
        if let Ok(state) = message::verify_state(&signed, &f.device, &device_key) {
            assert_eq!(state.device, f.device, "verify_state accepted another device");
        }
    }
    if let Ok(signed) = envelope::sign(&f.device_key, Kind::PairConfirmation, &device_kid, data.to_vec()) {
        let _ = pairing::verify_confirmation(&signed, &f.device, &device_key);
    }
}

fn decide_and_check(f: &Fixture, bytes: &[u8]) {
    let ctx = context(f);
    let Ok(decision) = f.acl.decide(ctx, &f.replay, bytes) else { return };
    // Whatever was accepted came from a listed controller, is fresh and new...
    assert!(f.acl.get(&decision.controller).is_some(), "accepted a controller not on the list");
    assert!(decision.counter > LAST_COUNTER, "accepted a replayed counter");
    // ...and is refused once its counter is committed: the replay guarantee.
    let mut replay = f.replay.clone();
    replay.commit(&decision);
    match f.acl.decide(ctx, &replay, bytes) {
        Err(refused) => assert_eq!(refused.reason, crate::acl::Refusal::Replayed, "replay refused for the wrong reason"),
        Ok(_) => panic!("a committed command was accepted again"),
    }
}

/// Checks that a decoded frame survives encoding and decoding unchanged,
/// so what the cloud forwards is what it read.
fn frame_round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(frame: &T) {
    // Re-encoding may legitimately exceed the limit (compressed keys come
    // back uncompressed, escapes change length), so only a success is checked.
    if let Ok(bytes) = link::encode_frame(frame) {
        match link::decode_frame::<T>(&bytes) {
            Ok(Some((again, used))) => {
                assert_eq!(used, bytes.len(), "frame length changed in a round trip");
                assert_eq!(&again, frame, "frame changed in a round trip");
            }
            other => panic!("an encoded frame did not decode: {other:?}"),
        }
    }
}

fn frame<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(data: &[u8]) {
    // The TLS link carries length-prefixed frames...
    if let Ok(Some((frame, used))) = link::decode_frame::<T>(data) {
        assert!(used >= 4 && used <= data.len(), "decode_frame used {used} of {} bytes", data.len());
        frame_round_trip(&frame);
    }
    // ...and the WebSocket link carries bare bodies.
    if let Ok(frame) = link::decode_body::<T>(data) {
        frame_round_trip(&frame);
    }
}

/// Device → cloud frames, as the cloud reads them.
pub fn device_frame(data: &[u8]) {
    frame::<DeviceFrame>(data);
}

/// Cloud → device frames, as the device reads them.
pub fn cloud_frame(data: &[u8]) {
    frame::<CloudFrame>(data);
}

/// Controller → cloud WebSocket messages, as the cloud reads them.
pub fn controller_frame(data: &[u8]) {
    frame::<ControllerFrame>(data);
}

/// Cloud → controller WebSocket messages, as the controller reads them.
pub fn controller_push(data: &[u8]) {
    frame::<ControllerPush>(data);
}

/// A scanned QR payload or a typed setup code.
pub fn setup_label(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(secret) = SetupSecret::from_code(&text) {
        assert_eq!(SetupSecret::from_code(&secret.code()).ok(), Some(secret), "setup code round trip");
    }
    if let Ok(label) = SetupLabel::parse(&text) {
        assert_eq!(SetupLabel::parse(&label.qr_payload()).ok(), Some(label), "label round trip");
    }
}

/// A pairing request as JSON, checked by a device in setup mode.
pub fn pair_request(data: &[u8]) {
    let f = fixture();
    let Ok(req) = serde_json::from_slice::<PairRequest>(data) else { return };
    let mut gate = PairingGate::setup();
    if gate.attempt(&f.secret, &req).is_ok() {
        assert!(!gate.setup_mode, "a successful pairing left setup mode open");
        // The answer must be one the controller accepts, whoever it is.
        if let Ok(resp) = pairing::respond(&f.secret, &f.device, &f.device_key, &req, NOW) {
            assert!(pairing::verify_confirmation(&resp.confirmation, &f.device, &PublicKey::from(&f.device_key)).is_ok());
        }
    } else {
        assert!(gate.failed_attempts <= 1, "one attempt counted more than once");
    }
}

/// A pairing response as JSON, checked by the fixture controller.
pub fn pair_response(data: &[u8]) {
    let f = fixture();
    let Ok(resp) = serde_json::from_slice::<PairResponse>(data) else { return };
    if let Ok(paired) = f.pending.finish(&resp, None) {
        assert_eq!(paired.device, resp.device);
    }
    let _ = f.pending.finish(&resp, Some(&f.device));
}

/// A sealed (HPKE, ADR 0006) envelope as the cloud checks it
/// (`verify_sealed`) and as the fixture controller opens it (`open_state`,
/// `open_result`). Properties: nothing opens unless the outer signature
/// verifies for the fixture device, and whatever opens names that device
/// and agrees with its readable header.
pub fn sealed(data: &[u8]) {
    let f = fixture();
    let device_key = PublicKey::from(&f.device_key);
    let me = PublicKey::from(&f.controller_key).controller_id();
    let _ = e2e::is_sealed(data);
    let outer = e2e::verify_sealed(data, &f.device, &device_key);
    if let Ok(p) = &outer {
        assert_eq!(p.header.device, f.device, "verify_sealed accepted another device");
    }
    match e2e::open(data, &f.device, &device_key, &me, &f.controller_enc) {
        Ok((header, _inner)) => assert_eq!(Some(&header), outer.as_ref().ok().map(|p| &p.header), "opened without a valid outer signature"),
        Err(OpenError::Forged(_)) => assert!(outer.is_err(), "an outer-valid envelope was called forged by open"),
        Err(OpenError::NotARecipient | OpenError::Undecryptable) => {}
    }
    if let Ok(s) = e2e::open_state(data, &f.device, &device_key, &me, &f.controller_enc) {
        assert_eq!(s.device, f.device, "open_state accepted another device's report");
        assert_eq!(outer.as_ref().map(|p| p.header.seq).ok(), Some(s.seq), "header and report disagree");
    }
    if let Ok(r) = e2e::open_result(data, &f.device, &device_key, &me, &f.controller_enc) {
        assert_eq!(r.device, f.device, "open_result accepted another device's result");
        let to = outer.as_ref().ok().and_then(|p| p.header.to.clone());
        assert_eq!(to.map(|t| (t.controller, t.counter)), Some((r.controller, r.counter)), "header and result disagree");
    }
}

/// The shape of every entry point.
pub type EntryPoint = fn(&[u8]);

/// Every entry point by name, for the replay test and the fuzz targets'
/// corpus folders (`fuzz/corpus/<name>/`).
pub const TARGETS: &[(&str, EntryPoint)] = &[
    ("envelope", envelope),
    ("peek", peek),
    ("verify_device_messages", verify_device_messages),
    ("decode_command", decode_command),
    ("acl_decide", acl_decide),
    ("signed_payload", signed_payload),
    ("device_frame", device_frame),
    ("cloud_frame", cloud_frame),
    ("controller_frame", controller_frame),
    ("controller_push", controller_push),
    ("setup_label", setup_label),
    ("pair_request", pair_request),
    ("pair_response", pair_response),
    ("sealed", sealed),
];
