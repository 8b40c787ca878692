//! Pairing through a cloud that may tamper with every message it relays.

use hearth_proto::acl::{AccessList, DeviceContext, ReplayState, Role};
use hearth_proto::capability::DeviceKind;
use hearth_proto::envelope::{self, Kind};
use hearth_proto::message::{self, device_key_id, Command};
use hearth_proto::pairing::{
    respond, PairConfirmation, PairError, PairingGate, PendingPairing, SetupLabel, SetupSecret, MAX_FAILED_ATTEMPTS,
};
use hearth_proto::{Error, PROTOCOL_VERSION};

use crate::{cbor, command, controller, device, key, public, NOW};

const CONTROLLER: u8 = 1;
const OTHER_CONTROLLER: u8 = 3;
const DEVICE_KEY: u8 = 9;
const CLOUD_KEY: u8 = 13;

fn secret() -> SetupSecret {
    SetupSecret::from_bytes([0x42; 16])
}

#[test]
fn happy_path_makes_the_controller_owner() {
    let dev = device(0x11);
    // The controller scans the label.
    let label = SetupLabel { device: Some(dev.clone()), secret: secret() };
    let scanned = SetupLabel::parse(&label.qr_payload()).unwrap();
    assert_eq!(scanned, label);
    let pending = PendingPairing::start(scanned.secret, &key(CONTROLLER));

    // The device checks the request, closes setup mode and answers.
    let mut gate = PairingGate::setup();
    gate.attempt(&secret(), pending.request()).expect("right secret");
    assert!(!gate.setup_mode);
    let resp = respond(&secret(), &dev, &key(DEVICE_KEY), pending.request(), NOW).unwrap();

    // The cloud checks the confirmation with the device key it knows from the certificate.
    let c = hearth_proto::pairing::verify_confirmation(&resp.confirmation, &dev, &public(DEVICE_KEY)).unwrap();
    assert_eq!(c, PairConfirmation { v: PROTOCOL_VERSION, device: dev.clone(), controller: controller(CONTROLLER), role: Role::Owner, at: NOW });

    // The controller authenticates the device key through the setup secret.
    let paired = pending.finish(&resp, Some(&dev)).expect("controller accepts the response");
    assert_eq!(paired.device, dev);
    assert_eq!(paired.device_key, public(DEVICE_KEY));

    // End to end: the device lists the key from the request, and the
    // controller's first command is accepted.
    let mut acl = AccessList::default();
    acl.upsert(pending.request().controller_key.clone(), Role::Owner, NOW);
    let bytes = message::sign_command(&key(CONTROLLER), &command(CONTROLLER, 1, Command::Toggle)).unwrap();
    let ctx = DeviceContext { device: &dev, kind: DeviceKind::Plug, now: NOW };
    assert!(acl.decide(ctx, &ReplayState::default(), &bytes).is_ok());

    // Setup mode is closed: a second pairing, even with the right secret, is refused.
    let second = PendingPairing::start(secret(), &key(OTHER_CONTROLLER));
    assert_eq!(gate.attempt(&secret(), second.request()), Err(PairError::NotInSetupMode));
}

#[test]
fn wrong_secrets_count_down_then_lock_until_reset() {
    let wrong = PendingPairing::start(SetupSecret::from_bytes([0x43; 16]), &key(CONTROLLER));
    let right = PendingPairing::start(secret(), &key(CONTROLLER));
    let mut gate = PairingGate::setup();
    let mut seen = Vec::new();
    for _ in 0..MAX_FAILED_ATTEMPTS {
        match gate.attempt(&secret(), wrong.request()) {
            Err(PairError::WrongSecret { tries_left }) => seen.push(tries_left),
            other => panic!("expected a wrong-secret refusal, got {other:?}"),
        }
    }
    assert_eq!(seen, (0..MAX_FAILED_ATTEMPTS).rev().collect::<Vec<_>>(), "tries_left goes 19, 18, …, 0");
    assert!(!gate.setup_mode);
    // The 21st attempt fails even with the right secret: no more guesses.
    assert_eq!(gate.attempt(&secret(), right.request()), Err(PairError::NotInSetupMode));
    assert_eq!(gate.attempt(&secret(), wrong.request()), Err(PairError::NotInSetupMode));

    // The physical reset reopens setup mode with a fresh budget.
    gate.reset();
    assert_eq!(gate, PairingGate::setup());
    assert_eq!(gate.attempt(&secret(), wrong.request()), Err(PairError::WrongSecret { tries_left: 19 }));
    assert_eq!(gate.attempt(&secret(), right.request()), Ok(()));
    assert_eq!(gate.failed_attempts, 0);
}

#[test]
fn cloud_swapping_the_controller_key_fails_the_mac() {
    let pending = PendingPairing::start(secret(), &key(CONTROLLER));
    let mut forged = pending.request().clone();
    forged.controller_key = public(CLOUD_KEY);
    let mut gate = PairingGate::setup();
    assert_eq!(gate.attempt(&secret(), &forged), Err(PairError::WrongSecret { tries_left: 19 }));
    assert!(gate.setup_mode, "one failure does not lock the device");

    // A changed nonce or a truncated MAC fail too.
    let mut forged = pending.request().clone();
    forged.nonce[0] ^= 1;
    assert_eq!(gate.attempt(&secret(), &forged), Err(PairError::WrongSecret { tries_left: 18 }));
    let mut forged = pending.request().clone();
    forged.mac.truncate(16);
    assert_eq!(gate.attempt(&secret(), &forged), Err(PairError::WrongSecret { tries_left: 17 }));
    // A nonce of the wrong length is unreadable, not a guess.
    let mut forged = pending.request().clone();
    forged.nonce.push(0);
    assert_eq!(gate.attempt(&secret(), &forged), Err(PairError::Malformed));
    // The untouched request still pairs.
    assert_eq!(gate.attempt(&secret(), pending.request()), Ok(()));
}

#[test]
fn cloud_swapping_the_device_key_fails_finish() {
    let dev = device(0x11);
    let pending = PendingPairing::start(secret(), &key(CONTROLLER));
    let resp = respond(&secret(), &dev, &key(DEVICE_KEY), pending.request(), NOW).unwrap();

    // Just the key swapped: the MAC covers it.
    let mut forged = resp.clone();
    forged.device_key = public(CLOUD_KEY);
    assert!(matches!(pending.finish(&forged, Some(&dev)), Err(Error::BadSignature { .. })));

    // Key swapped and the confirmation re-signed by the cloud: still the MAC.
    let confirmation = PairConfirmation {
        v: PROTOCOL_VERSION,
        device: dev.clone(),
        controller: controller(CONTROLLER),
        role: Role::Owner,
        at: NOW,
    };
    forged.confirmation =
        envelope::sign(&key(CLOUD_KEY), Kind::PairConfirmation, &device_key_id(&dev), cbor(&confirmation)).unwrap();
    assert!(matches!(pending.finish(&forged, Some(&dev)), Err(Error::BadSignature { .. })));

    // A different device id (the cloud redirects the pairing): refused either way.
    let mut forged = resp.clone();
    forged.device = device(0x22);
    assert!(pending.finish(&forged, Some(&dev)).is_err());
    assert!(pending.finish(&forged, None).is_err());

    // A response for another request (replayed nonce from elsewhere).
    let other = PendingPairing::start(secret(), &key(CONTROLLER));
    assert!(other.finish(&resp, Some(&dev)).is_err());

    assert!(pending.finish(&resp, Some(&dev)).is_ok());
}

#[test]
fn confirmation_for_another_controller_fails_finish() {
    let dev = device(0x11);
    let mine = PendingPairing::start(secret(), &key(CONTROLLER));
    let theirs = PendingPairing::start(secret(), &key(OTHER_CONTROLLER));
    let resp_mine = respond(&secret(), &dev, &key(DEVICE_KEY), mine.request(), NOW).unwrap();
    let resp_theirs = respond(&secret(), &dev, &key(DEVICE_KEY), theirs.request(), NOW).unwrap();

    // The MAC over the keys is fine, but the device-signed confirmation names
    // the other controller: the device made someone else its owner.
    let mut forged = resp_mine.clone();
    forged.confirmation = resp_theirs.confirmation.clone();
    assert!(matches!(mine.finish(&forged, Some(&dev)), Err(Error::Malformed { what: "confirmation", .. })));

    // Names us, but only as a member: not what pairing promises.
    let member = PairConfirmation {
        v: PROTOCOL_VERSION,
        device: dev.clone(),
        controller: controller(CONTROLLER),
        role: Role::Member,
        at: NOW,
    };
    forged.confirmation =
        envelope::sign(&key(DEVICE_KEY), Kind::PairConfirmation, &device_key_id(&dev), cbor(&member)).unwrap();
    assert!(mine.finish(&forged, Some(&dev)).is_err());

    // A state report signed by the device is not a confirmation (kind separation).
    forged.confirmation =
        envelope::sign(&key(DEVICE_KEY), Kind::StateReport, &device_key_id(&dev), cbor(&member)).unwrap();
    assert!(mine.finish(&forged, Some(&dev)).is_err());
}

#[test]
fn setup_codes() {
    let check = |input: &str, expected: Option<[u8; 16]>| {
        let got = SetupSecret::from_code(input).ok().map(|s| *s.as_bytes());
        assert_eq!(got, expected, "code {input:?}");
    };
    check("AAAA-AAAA-AAAA-AAAA-AAAA-AAAA-AA", Some([0; 16]));
    check("aaaa aaaa aaaa aaaa aaaa aaaa aa", Some([0; 16]));
    check("7777-7777-7777-7777-7777-7777-74", Some([0xff; 16]));
    check("7777-7777-7777-7777-7777-7777-77", None);
    check("AAAA-AAAA-AAAA-AAAA-AAAA-AAAA-A", None);
    check("AAAA-AAAA-AAAA-AAAA-AAAA-AAAA-AAA", None);
    check("AAAA-AAAA-AAAA-AAAA-AAAA-AAAA-A1", None);
    check("AAAA-AAAA-AAAA-AAAA-AAAA-AAAA-Aé", None);
    check("", None);

    let dev = device(0x11);
    let qr = SetupLabel { device: Some(dev.clone()), secret: secret() }.qr_payload();
    assert!(qr.starts_with("HEARTH:1:111111111111111111111111:"));
    assert_eq!(SetupLabel::parse(&format!("  {qr}\n")).unwrap().device, Some(dev));
    assert!(SetupLabel::parse("HEARTH:1:zz:AAAAAAAAAAAAAAAAAAAAAAAAAA").is_err());
    assert!(SetupLabel::parse("HEARTH:1:AAAAAAAAAAAAAAAAAAAAAAAAAA").is_err());
    assert_eq!(SetupLabel::parse("HEARTH:1::AAAAAAAAAAAAAAAAAAAAAAAAAA").unwrap().device, None);
}

/// Regression: a gate read back with a huge failure count (a corrupted or
/// hand-edited state file) used to overflow `failed_attempts += 1`: a panic
/// in debug builds, and in release a wrap to 0 that reopened 20 guesses.
#[test]
fn corrupt_attempt_count_locks_instead_of_wrapping() {
    let wrong = PendingPairing::start(SetupSecret::from_bytes([0x43; 16]), &key(CONTROLLER));
    let mut gate = PairingGate { setup_mode: true, failed_attempts: u32::MAX };
    assert_eq!(gate.attempt(&secret(), wrong.request()), Err(PairError::WrongSecret { tries_left: 0 }));
    assert!(!gate.setup_mode);
}
