//! The seed corpora in `fuzz/corpus/<target>/`: a few valid and a few
//! invalid inputs per fuzz target, made from the fuzzing fixture so the
//! valid ones reach past the signature and MAC checks.
//!
//! This test checks the committed files match what it generates (so the
//! seeds never silently go stale after a format change); rewrite them with
//! `HEARTH_BLESS=1 cargo test -p hearth-proto --test it corpus`.

use std::path::PathBuf;

use hearth_proto::capability::DeviceKind;
use hearth_proto::e2e::{self, Addressed, Content, SealedHeader};
use hearth_proto::envelope::{self, Kind};
use hearth_proto::fuzzing::{fixture, Fixture, LAST_COUNTER, NOW};
use hearth_proto::keys::PublicKey;
use hearth_proto::link::{encode_frame, CloudFrame, ControllerFrame, ControllerPush, DeviceFrame, PairOutcome};
use hearth_proto::message::{
    self, device_key_id, Cause, Command, CommandPayload, DeviceState, Outcome, ResultPayload, StatePayload,
};
use hearth_proto::pairing::{respond, PairConfirmation, PairError, SetupLabel};
use hearth_proto::{acl::Refusal, acl::Role, PROTOCOL_VERSION};

use crate::{bless, cbor, repo_root};

/// One seed file.
struct Seed {
    target: &'static str,
    name: &'static str,
    bytes: Vec<u8>,
    /// False when the bytes contain fresh randomness (pairing nonces), so
    /// only the file's presence can be checked.
    deterministic: bool,
}

/// Whether a committed seed still matches a freshly made one. ES256
/// signatures are random since signing moved to `ring` (ADR 0015), so both
/// are compared after [`without_signatures`].
fn matches_up_to_signatures(committed: &[u8], fresh: &[u8]) -> bool {
    committed.len() == fresh.len() && without_signatures(committed) == without_signatures(fresh)
}

/// `bytes` with every 64-byte CBOR byte string (`58 40` and 64 bytes: an
/// ES256 signature, as no other field here has that length) zeroed, also
/// inside base64 text (envelopes in JSON frames), which is decoded and
/// treated the same way. Everything else stays, byte for byte.
fn without_signatures(bytes: &[u8]) -> Vec<u8> {
    use base64::Engine as _;
    let is_b64 = |c: u8| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'+' | b'/' | b'=');
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i..].starts_with(&[0x58, 0x40]) && i + 66 <= bytes.len() {
            out.extend_from_slice(&[0x58, 0x40]);
            out.extend_from_slice(&[0; 64]);
            i += 66;
            continue;
        }
        let run = bytes[i..].iter().take_while(|c| is_b64(**c)).count();
        if run >= 80 {
            let text = &bytes[i..i + run];
            let decoded = [
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                &base64::engine::general_purpose::STANDARD,
                &base64::engine::general_purpose::STANDARD_NO_PAD,
                &base64::engine::general_purpose::URL_SAFE,
            ]
            .iter()
            .find_map(|e| e.decode(text).ok());
            match decoded {
                Some(inner) => {
                    out.push(b'<');
                    out.extend(without_signatures(&inner));
                    out.push(b'>');
                }
                None => out.extend_from_slice(text),
            }
            i += run;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

fn corpus_dir() -> PathBuf {
    repo_root().join("fuzz/corpus")
}

fn controller_kid(f: &Fixture) -> Vec<u8> {
    hex::decode(PublicKey::from(&f.controller_key).controller_id().as_str()).unwrap()
}

fn payloads(f: &Fixture) -> (CommandPayload, ResultPayload, StatePayload, PairConfirmation) {
    let controller = PublicKey::from(&f.controller_key).controller_id();
    let cmd = CommandPayload {
        v: PROTOCOL_VERSION,
        device: f.device.clone(),
        controller: controller.clone(),
        counter: LAST_COUNTER + 1,
        issued_at: NOW,
        command: Command::SetRelay { on: true },
    };
    let result = ResultPayload {
        v: PROTOCOL_VERSION,
        device: f.device.clone(),
        controller: controller.clone(),
        counter: LAST_COUNTER + 1,
        outcome: Outcome::Refused { reason: Refusal::Stale },
        state: DeviceState { relay: Some(false), ..DeviceState::default() },
        at: NOW,        access: None,
    };
    let state = StatePayload {
        v: PROTOCOL_VERSION,
        device: f.device.clone(),
        kind: DeviceKind::EnergyPlug,
        seq: 9,
        at: NOW,
        state: DeviceState { relay: Some(true), motion: Some(false), power_mw: Some(12), firmware: None, brightness: None },
        cause: Cause::Local,
    };
    let conf = PairConfirmation { v: PROTOCOL_VERSION, device: f.device.clone(), controller, role: Role::Owner, at: NOW };
    (cmd, result, state, conf)
}

fn seeds() -> Vec<Seed> {
    let f = fixture();
    let (cmd, result, state, conf) = payloads(f);
    let dkid = device_key_id(&f.device);
    let signed_cmd = message::sign_command(&f.controller_key, &cmd).unwrap();
    let stale_cmd = message::sign_command(&f.controller_key, &CommandPayload { issued_at: NOW - 1000, ..cmd.clone() }).unwrap();
    let replayed_cmd = message::sign_command(&f.controller_key, &CommandPayload { counter: 1, ..cmd.clone() }).unwrap();
    let v2_cmd = message::sign_command(&f.controller_key, &CommandPayload { v: 2, ..cmd.clone() }).unwrap();
    let signed_result = message::sign_result(&f.device_key, &result).unwrap();
    let signed_state = message::sign_state(&f.device_key, &state).unwrap();
    let signed_conf = envelope::sign(&f.device_key, Kind::PairConfirmation, &dkid, cbor(&conf)).unwrap();
    let relabelled = envelope::sign(&f.device_key, Kind::Command, &controller_kid(f), cbor(&cmd)).unwrap();
    let mut flipped = signed_cmd.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x80;
    // The algorithm -7 (ES256, CBOR 0x26) rewritten to -8 (EdDSA, 0x27).
    let mut eddsa = signed_cmd.clone();
    let alg = eddsa.windows(2).position(|w| w == [0x01, 0x26]).expect("alg label") + 1;
    eddsa[alg] = 0x27;

    let pair_request = serde_json::to_vec(f.pending.request()).unwrap();
    let mut wrong_mac = f.pending.request().clone();
    wrong_mac.mac[0] ^= 1;
    let response = respond(&f.secret, &f.device, &f.device_key, f.pending.request(), NOW).unwrap();
    let mut swapped = response.clone();
    swapped.device_key = PublicKey::from(&f.controller_key);
    let label = SetupLabel { device: Some(f.device.clone()), secret: f.secret.clone() };

    let push_result = ControllerPush::Result { device: f.device.clone(), envelope: signed_result.clone() };
    let device_frames = [
        DeviceFrame::Hello { kind: DeviceKind::Plug, firmware: "0.1.0".into(), setup_lookup: Some(f.secret.lookup()) },
        DeviceFrame::Result { envelope: signed_result.clone() },
        DeviceFrame::PairResult { req: 3, outcome: PairOutcome::Ok(response.clone()) },
        DeviceFrame::PairResult { req: 4, outcome: PairOutcome::Err(PairError::WrongSecret { tries_left: 5 }) },
        DeviceFrame::Setup { setup_lookup: None },
    ];
    let json = |v: &serde_json::Value| serde_json::to_vec(v).unwrap();

    let s = |target, name, bytes| Seed { target, name, bytes, deterministic: true };
    let random = |target, name, bytes| Seed { target, name, bytes, deterministic: false };
    let mut out = vec![
        s("envelope", "command", signed_cmd.clone()),
        s("envelope", "result", signed_result.clone()),
        s("envelope", "state", signed_state.clone()),
        s("envelope", "confirmation", signed_conf.clone()),
        s("envelope", "untagged", signed_cmd[1..].to_vec()),
        s("envelope", "eddsa-alg", eddsa),
        s("envelope", "empty", Vec::new()),
        s("peek", "command", signed_cmd.clone()),
        s("peek", "result", signed_result.clone()),
        s("peek", "truncated", signed_result[..signed_result.len() / 2].to_vec()),
        s("verify_device_messages", "result", signed_result.clone()),
        s("verify_device_messages", "state", signed_state.clone()),
        s("verify_device_messages", "confirmation", signed_conf.clone()),
        s("verify_device_messages", "command", signed_cmd.clone()),
        s("decode_command", "valid", cbor(&cmd)),
        s("decode_command", "version-2", cbor(&CommandPayload { v: 2, ..cmd.clone() })),
        s("decode_command", "get-state", cbor(&CommandPayload { command: Command::GetState, ..cmd.clone() })),
        s("decode_command", "state-payload", cbor(&state)),
        s("acl_decide", "accepted", signed_cmd.clone()),
        s("acl_decide", "stale", stale_cmd),
        s("acl_decide", "replayed", replayed_cmd),
        s("acl_decide", "version-2", v2_cmd),
        s("acl_decide", "relabelled-device-key", relabelled),
        s("acl_decide", "flipped-signature", flipped),
        s("signed_payload", "command", cbor(&cmd)),
        s("signed_payload", "result", cbor(&result)),
        s("signed_payload", "state", cbor(&state)),
        s("signed_payload", "confirmation", cbor(&conf)),
        s("signed_payload", "wrong-device", cbor(&CommandPayload { device: "222222222222222222222222".parse().unwrap(), ..cmd.clone() })),
        s("cloud_frame", "command", encode_frame(&CloudFrame::Command { envelope: signed_cmd.clone() }).unwrap()),
        s("cloud_frame", "ping", encode_frame(&CloudFrame::Ping { n: 7 }).unwrap()),
        s("cloud_frame", "busy", encode_frame(&CloudFrame::Busy { retry_after: 10 }).unwrap()),
        s("cloud_frame", "pair", encode_frame(&CloudFrame::Pair { req: 1, request: f.pending.request().clone() }).unwrap()),
        s("cloud_frame", "unknown-type", encode_frame(&serde_json::json!({"type": "reboot"})).unwrap()),
        s("cloud_frame", "oversized-header", vec![0xff, 0xff, 0xff, 0xff, b'{']),
        s("controller_frame", "command", json(&serde_json::to_value(ControllerFrame::Command { device: f.device.clone(), envelope: signed_cmd.clone() }).unwrap())),
        s("controller_frame", "command-framed", encode_frame(&ControllerFrame::Command { device: f.device.clone(), envelope: signed_cmd.clone() }).unwrap()),
        s("controller_frame", "bad-device", br#"{"type":"command","device":"../../etc","envelope":"AA"}"#.to_vec()),
        s("controller_push", "result", serde_json::to_vec(&push_result).unwrap()),
        s("controller_push", "state", serde_json::to_vec(&ControllerPush::State { device: f.device.clone(), envelope: signed_state.clone() }).unwrap()),
        s("controller_push", "presence", serde_json::to_vec(&ControllerPush::Presence { device: f.device.clone(), online: true }).unwrap()),
        s("controller_push", "undeliverable", serde_json::to_vec(&ControllerPush::Undeliverable { device: f.device.clone(), message: "offline \u{1f50c}".into() }).unwrap()),
        s("controller_push", "extra-field", br#"{"type":"presence","device":"111111111111111111111111","online":true,"x":1}"#.to_vec()),
        s("setup_label", "qr", label.qr_payload().into_bytes()),
        s("setup_label", "code", f.secret.code().into_bytes()),
        s("setup_label", "code-lowercase-spaces", f.secret.code().to_lowercase().replace('-', " ").into_bytes()),
        s("setup_label", "qr-no-device", format!("HEARTH:1::{}", f.secret.code()).into_bytes()),
        s("setup_label", "non-canonical", b"7777-7777-7777-7777-7777-7777-77".to_vec()),
        s("pair_request", "valid", pair_request),
        s("pair_request", "wrong-mac", serde_json::to_vec(&wrong_mac).unwrap()),
        s("pair_request", "short-nonce", br#"{"controller_key":"AA","nonce":"AA","mac":"AA"}"#.to_vec()),
        random("pair_response", "valid", serde_json::to_vec(&response).unwrap()),
        random("pair_response", "swapped-device-key", serde_json::to_vec(&swapped).unwrap()),
    ];
    // Sealed envelopes (ADR 0006) carry fresh randomness (content key,
    // nonce, HPKE ephemeral keys), so only their presence is checked.
    let me = PublicKey::from(&f.controller_key).controller_id();
    let for_me = [(me.clone(), f.controller_enc.public().clone())];
    let stranger = hearth_proto::e2e::EncSecretKey::derive(b"fuzz corpus: another controller");
    let for_stranger = [(me.clone(), stranger.public().clone())];
    let state_header = SealedHeader { v: PROTOCOL_VERSION, device: f.device.clone(), content: Content::State, seq: state.seq, to: None, at: NOW };
    let result_header = SealedHeader {
        content: Content::Result,
        seq: 0,
        to: Some(Addressed { controller: me.clone(), counter: result.counter }),
        ..state_header.clone()
    };
    let seal = |key, header: &SealedHeader, inner: &[u8], to: &[_]| e2e::seal(key, header.clone(), inner, to, &mut rand::rngs::OsRng).unwrap();
    out.extend([
        random("sealed", "state", seal(&f.device_key, &state_header, &signed_state, &for_me)),
        random("sealed", "result", seal(&f.device_key, &result_header, &signed_result, &for_me)),
        random("sealed", "no-recipients", seal(&f.device_key, &state_header, &signed_state, &[])),
        random("sealed", "wrong-key-for-me", seal(&f.device_key, &state_header, &signed_state, &for_stranger)),
        random("sealed", "forged-outer", seal(&f.controller_key, &state_header, &signed_state, &for_me)),
        random("sealed", "header-disagrees", seal(&f.device_key, &SealedHeader { seq: 99, ..state_header.clone() }, &signed_state, &for_me)),
        s("sealed", "plain-state", signed_state.clone()),
    ]);
    for (i, frame) in device_frames.iter().enumerate() {
        const NAMES: [&str; 5] = ["hello", "result", "pair-ok", "pair-err", "setup"];
        let bytes = encode_frame(frame).unwrap();
        out.push(if i == 2 { random("device_frame", NAMES[i], bytes) } else { s("device_frame", NAMES[i], bytes) });
    }
    out.push(s("device_frame", "truncated", encode_frame(&device_frames[0]).unwrap()[..10].to_vec()));
    out
}

#[test]
fn seed_corpus_is_committed_and_current() {
    let seeds = seeds();
    for seed in &seeds {
        let path = corpus_dir().join(seed.target).join(seed.name);
        if bless() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            let current = std::fs::read(&path).is_ok_and(|c| !seed.deterministic || matches_up_to_signatures(&c, &seed.bytes));
            if !current {
                std::fs::write(&path, &seed.bytes).unwrap();
            }
            continue;
        }
        let committed = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e}; generate with HEARTH_BLESS=1", path.display()));
        if seed.deterministic {
            assert!(
                matches_up_to_signatures(&committed, &seed.bytes),
                "{} is stale; regenerate with HEARTH_BLESS=1",
                path.display()
            );
        }
    }
    // Every fuzz target has seeds, and every seed folder is a fuzz target.
    for (name, _) in hearth_proto::fuzzing::TARGETS {
        assert!(seeds.iter().any(|s| s.target == *name), "no seeds for fuzz target {name}");
    }
    // Other crates' targets (e.g. the cloud's `api_body`) keep their seeds
    // here too; they only need a cargo-fuzz target of that name.
    let manifest = std::fs::read_to_string(repo_root().join("fuzz/Cargo.toml")).unwrap();
    for entry in std::fs::read_dir(corpus_dir()).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        let ours = hearth_proto::fuzzing::TARGETS.iter().any(|(t, _)| *t == name);
        assert!(ours || manifest.contains(&format!("name = \"{name}\"")), "fuzz/corpus/{name} has no target");
    }
}

/// Tidy check: every entry point has a cargo-fuzz target calling it, so a
/// new decoder cannot be added to `fuzzing` and forgotten in `fuzz/`.
#[test]
fn every_entry_point_has_a_cargo_fuzz_target() {
    let manifest = std::fs::read_to_string(repo_root().join("fuzz/Cargo.toml")).unwrap();
    for (name, _) in hearth_proto::fuzzing::TARGETS {
        assert!(manifest.contains(&format!("name = \"{name}\"")), "fuzz/Cargo.toml has no [[bin]] {name}");
        let source = std::fs::read_to_string(repo_root().join(format!("fuzz/fuzz_targets/{name}.rs")))
            .unwrap_or_else(|e| panic!("fuzz/fuzz_targets/{name}.rs: {e}"));
        assert!(source.contains(&format!("hearth_proto::fuzzing::{name}(")), "fuzz_targets/{name}.rs calls another entry point");
    }
}

/// The sealed seeds reach past the outer signature and the HPKE open, so
/// the fuzzer starts from inputs that exercise decryption, not only the
/// first parse error.
#[test]
fn sealed_seeds_open_for_the_fixture_controller() {
    let f = fixture();
    let me = PublicKey::from(&f.controller_key).controller_id();
    let key = PublicKey::from(&f.device_key);
    let read = |name: &str| std::fs::read(corpus_dir().join("sealed").join(name)).unwrap();
    assert!(e2e::open_state(&read("state"), &f.device, &key, &me, &f.controller_enc).is_ok());
    assert!(e2e::open_result(&read("result"), &f.device, &key, &me, &f.controller_enc).is_ok());
    assert_eq!(e2e::open(&read("no-recipients"), &f.device, &key, &me, &f.controller_enc).err(), Some(e2e::OpenError::NotARecipient));
    assert_eq!(e2e::open(&read("wrong-key-for-me"), &f.device, &key, &me, &f.controller_enc).err(), Some(e2e::OpenError::Undecryptable));
    assert!(matches!(e2e::open(&read("forged-outer"), &f.device, &key, &me, &f.controller_enc), Err(e2e::OpenError::Forged(_))));
    assert!(matches!(e2e::open_state(&read("header-disagrees"), &f.device, &key, &me, &f.controller_enc), Err(e2e::OpenError::Forged(_))));
}
