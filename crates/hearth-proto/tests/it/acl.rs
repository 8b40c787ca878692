//! `AccessList::decide`: every refusal reason, each from the smallest change
//! to an otherwise accepted command.

use hearth_proto::acl::{AccessList, Refusal, ReplayState, Role};
use hearth_proto::capability::DeviceKind;
use hearth_proto::envelope::{self, Kind};
use hearth_proto::message::{self, device_key_id, Command, CommandPayload, DeviceState, Cause, StatePayload};
use hearth_proto::PROTOCOL_VERSION;

use crate::{cbor, command, controller, controller_kid, device, key, public, NOW};

/// Controller 1 is the owner, controller 2 a member; key 9 is the device's.
const OWNER: u8 = 1;
const MEMBER: u8 = 2;
const STRANGER: u8 = 5;
const DEVICE_KEY: u8 = 9;

/// When [`access_list`]'s entries were added: long before [`NOW`], so a
/// revoke held for days was still issued after them.
const PAIRED_AT: u64 = NOW - 60 * 86_400;
const DAY: u64 = 86_400;

fn access_list() -> AccessList {
    let mut acl = AccessList::default();
    assert!(acl.upsert(public(OWNER), Role::Owner, PAIRED_AT));
    assert!(acl.upsert(public(MEMBER), Role::Member, PAIRED_AT));
    acl
}

fn sign(seed: u8, payload: &CommandPayload) -> Vec<u8> {
    message::sign_command(&key(seed), payload).expect("signs")
}

/// What `decide` should answer: accepted with this counter, or refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Accept(u64),
    Refuse(Refusal),
}
use Expect::{Accept, Refuse};

/// Runs one decision on a device of `kind` and compares the outcome.
fn check(name: &str, kind: DeviceKind, replay: &ReplayState, bytes: &[u8], expected: Expect) {
    let device = device(0x11);
    let ctx = hearth_proto::acl::DeviceContext { device: &device, kind, now: NOW };
    let got = match access_list().decide(ctx, replay, bytes) {
        Ok(d) => Accept(d.counter),
        Err(r) => Refuse(r.reason),
    };
    assert_eq!(got, expected, "case {name:?}");
}

#[test]
fn every_refusal_reason() {
    let on = Command::SetRelay { on: true };
    let ok = command(OWNER, 7, on.clone());
    let signed_ok = sign(OWNER, &ok);

    let mut flipped = signed_ok.clone();
    // The signature is the last 64 bytes of the envelope (a CBOR bstr at the end).
    let last = flipped.len() - 1;
    flipped[last] ^= 0x55;
    flipped[last - 40] ^= 0x01;

    let payload_other_controller = CommandPayload { controller: controller(MEMBER), ..ok.clone() };
    // Signed by the owner under the owner's kid, but the payload names the member.
    let controller_mismatch =
        envelope::sign(&key(OWNER), Kind::Command, &controller_kid(OWNER), cbor(&payload_other_controller)).unwrap();

    // The device key signs a command and the cloud relabels it with the owner's kid.
    let device_relabelled = envelope::sign(&key(DEVICE_KEY), Kind::Command, &controller_kid(OWNER), cbor(&ok)).unwrap();

    let state = StatePayload {
        v: PROTOCOL_VERSION,
        device: device(0x11),
        kind: DeviceKind::Plug,
        seq: 1,
        at: NOW,
        state: DeviceState { relay: Some(true), ..DeviceState::default() },
        cause: Cause::Command { controller: controller(OWNER) },
    };
    let state_report = message::sign_state(&key(DEVICE_KEY), &state).unwrap();
    // A state report signed by the owner's key under its kid is still not a command.
    let state_by_owner = envelope::sign(&key(OWNER), Kind::StateReport, &controller_kid(OWNER), cbor(&state)).unwrap();
    // A command-kind envelope whose kid is a 12-byte device id, not a controller id.
    let device_kid = envelope::sign(&key(DEVICE_KEY), Kind::Command, &device_key_id(&device(0x11)), cbor(&ok)).unwrap();

    let at = |issued_at| sign(OWNER, &CommandPayload { issued_at, ..ok.clone() });
    let revoke = Command::RemoveController { controller: controller(MEMBER) };
    let revoke_at = |issued_at| sign(OWNER, &CommandPayload { issued_at, ..command(OWNER, 7, revoke.clone()) });
    let share = Command::AddController { key: public(STRANGER), enc: hearth_proto::e2e::EncSecretKey::derive(b"acl test").public().clone(), role: Role::Member, scope: Default::default() };
    let share_at = |issued_at| sign(OWNER, &CommandPayload { issued_at, ..command(OWNER, 7, share.clone()) });
    let fresh = ReplayState::default();
    let cases: Vec<(&str, DeviceKind, Vec<u8>, Expect)> = vec![
        ("accepted set_relay from owner", DeviceKind::Plug, signed_ok.clone(), Accept(7)),
        ("accepted toggle from member", DeviceKind::Plug, sign(MEMBER, &command(MEMBER, 1, Command::Toggle)), Accept(1)),
        ("get_state needs no capability", DeviceKind::MotionSensor, sign(OWNER, &command(OWNER, 3, Command::GetState)), Accept(3)),
        ("signature bytes flipped", DeviceKind::Plug, flipped, Refuse(Refusal::BadSignature)),
        ("device key relabelled as owner", DeviceKind::Plug, device_relabelled, Refuse(Refusal::BadSignature)),
        ("unknown controller", DeviceKind::Plug, sign(STRANGER, &command(STRANGER, 7, on.clone())), Refuse(Refusal::NotPaired)),
        (
            "another device",
            DeviceKind::Plug,
            sign(OWNER, &CommandPayload { device: device(0x22), ..ok.clone() }),
            Refuse(Refusal::WrongDevice),
        ),
        ("issued 121 s ago", DeviceKind::Plug, at(NOW - 121), Refuse(Refusal::Stale)),
        ("issued 121 s ahead", DeviceKind::Plug, at(NOW + 121), Refuse(Refusal::Stale)),
        ("issued 120 s ago", DeviceKind::Plug, at(NOW - 120), Accept(7)),
        ("issued 120 s ahead", DeviceKind::Plug, at(NOW + 120), Accept(7)),
        ("issued at 0", DeviceKind::Plug, at(0), Refuse(Refusal::Stale)),
        ("issued at u64::MAX", DeviceKind::Plug, at(u64::MAX), Refuse(Refusal::Stale)),
        // A revoke the cloud held while the device was offline still counts
        // (issue 3); only a revoke is exempt, and not one from the future.
        ("revoke issued 30 days ago", DeviceKind::Plug, revoke_at(NOW - 30 * 86_400), Accept(7)),
        ("revoke issued 121 s ahead", DeviceKind::Plug, revoke_at(NOW + 121), Refuse(Refusal::Stale)),
        ("share issued 121 s ago", DeviceKind::Plug, share_at(NOW - 121), Refuse(Refusal::Stale)),
        ("payload controller is not the kid", DeviceKind::Plug, controller_mismatch, Refuse(Refusal::Malformed)),
        ("state report presented as a command", DeviceKind::Plug, state_report, Refuse(Refusal::Malformed)),
        ("owner-signed state report as a command", DeviceKind::Plug, state_by_owner, Refuse(Refusal::Malformed)),
        ("kid is a device id", DeviceKind::Plug, device_kid, Refuse(Refusal::Malformed)),
        ("set_relay to a motion sensor", DeviceKind::MotionSensor, signed_ok.clone(), Refuse(Refusal::Unsupported)),
        (
            "toggle to a motion sensor",
            DeviceKind::MotionSensor,
            sign(OWNER, &command(OWNER, 8, Command::Toggle)),
            Refuse(Refusal::Unsupported),
        ),
        (
            "protocol version 2",
            DeviceKind::Plug,
            sign(OWNER, &CommandPayload { v: 2, ..ok.clone() }),
            Refuse(Refusal::Malformed),
        ),
        (
            "protocol version 0",
            DeviceKind::Plug,
            sign(OWNER, &CommandPayload { v: 0, ..ok.clone() }),
            Refuse(Refusal::Malformed),
        ),
        ("empty input", DeviceKind::Plug, Vec::new(), Refuse(Refusal::Malformed)),
        ("not CBOR", DeviceKind::Plug, b"{\"op\":\"toggle\"}".to_vec(), Refuse(Refusal::Malformed)),
        ("untagged COSE_Sign1", DeviceKind::Plug, signed_ok[1..].to_vec(), Refuse(Refusal::Malformed)),
        ("truncated", DeviceKind::Plug, signed_ok[..signed_ok.len() - 1].to_vec(), Refuse(Refusal::Malformed)),
    ];
    for (name, kind, bytes, expected) in cases {
        check(name, kind, &fresh, &bytes, expected);
    }
}

/// A refusal names the claimed sender and counter when they could be read
/// (even unverified), so the device can address its signed refusal and the
/// sender can match it; nothing else uses them.
#[test]
fn refusals_carry_what_was_learned() {
    let device = device(0x11);
    let ctx = hearth_proto::acl::DeviceContext { device: &device, kind: DeviceKind::Plug, now: NOW };
    let replay = ReplayState::default();
    let acl = access_list();

    let r = acl.decide(ctx, &replay, b"junk").unwrap_err();
    assert_eq!((r.controller, r.counter), (None, None));

    let stranger = sign(STRANGER, &command(STRANGER, 4, Command::Toggle));
    let r = acl.decide(ctx, &replay, &stranger).unwrap_err();
    assert_eq!((r.reason, r.controller, r.counter), (Refusal::NotPaired, Some(controller(STRANGER)), Some(4)));

    let stale = sign(OWNER, &CommandPayload { issued_at: NOW - 500, ..command(OWNER, 4, Command::Toggle) });
    let r = acl.decide(ctx, &replay, &stale).unwrap_err();
    assert_eq!((r.reason, r.controller, r.counter), (Refusal::Stale, Some(controller(OWNER)), Some(4)));
}

#[test]
fn replayed_counters_are_refused_after_commit() {
    let device = device(0x11);
    let ctx = hearth_proto::acl::DeviceContext { device: &device, kind: DeviceKind::Plug, now: NOW };
    let acl = access_list();
    let mut replay = ReplayState::default();
    let toggle = |seed, counter| sign(seed, &command(seed, counter, Command::Toggle));

    let first = toggle(OWNER, 10);
    let decision = acl.decide(ctx, &replay, &first).expect("fresh command accepted");
    // `decide` is pure: until the device commits, the same bytes still pass.
    assert!(acl.decide(ctx, &replay, &first).is_ok());
    replay.commit(&decision);
    assert_eq!(replay.last(&controller(OWNER)), Some(10));

    check("same bytes again", DeviceKind::Plug, &replay, &first, Refuse(Refusal::Replayed));
    check("same counter, new signature", DeviceKind::Plug, &replay, &sign(OWNER, &command(OWNER, 10, Command::GetState)), Refuse(Refusal::Replayed));
    check("lower counter", DeviceKind::Plug, &replay, &toggle(OWNER, 9), Refuse(Refusal::Replayed));
    check("counter 0", DeviceKind::Plug, &replay, &toggle(OWNER, 0), Refuse(Refusal::Replayed));
    check("next counter", DeviceKind::Plug, &replay, &toggle(OWNER, 11), Accept(11));
    check("a jump ahead", DeviceKind::Plug, &replay, &toggle(OWNER, u64::MAX), Accept(u64::MAX));
    // Counters are per controller: the member's 10 is still new.
    check("other controller, same counter", DeviceKind::Plug, &replay, &toggle(MEMBER, 10), Accept(10));

    // Forgetting a controller (it left the list) drops its counter too.
    replay.forget(&controller(OWNER));
    check("after forget", DeviceKind::Plug, &replay, &first, Accept(10));
}

#[test]
fn a_removed_controller_is_not_paired() {
    let device = device(0x11);
    let ctx = hearth_proto::acl::DeviceContext { device: &device, kind: DeviceKind::Plug, now: NOW };
    let mut acl = access_list();
    let bytes = sign(OWNER, &command(OWNER, 1, Command::Toggle));
    assert!(acl.decide(ctx, &ReplayState::default(), &bytes).is_ok());
    acl.clear();
    assert_eq!(acl.decide(ctx, &ReplayState::default(), &bytes).unwrap_err().reason, Refusal::NotPaired);
}

#[test]
fn access_list_is_bounded() {
    let mut acl = AccessList::default();
    for seed in 1..=hearth_proto::acl::MAX_ENTRIES as u8 {
        assert!(acl.upsert(public(seed), Role::Member, NOW));
    }
    assert!(!acl.upsert(public(200), Role::Member, NOW), "the 65th controller was added");
    // Changing the role of a listed controller still works on a full list.
    assert!(acl.upsert(public(1), Role::Owner, NOW));
    assert_eq!(acl.get(&controller(1)).map(|e| e.role), Some(Role::Owner));
}

/// A revoke the cloud held back is still ordered by the counter: after any
/// later command of the same owner reached the device, it is refused as
/// replayed, so a cloud cannot keep it to replay at a time of its choosing.
#[test]
fn an_old_revoke_is_refused_once_a_later_command_was_accepted() {
    let device = device(0x11);
    let ctx = hearth_proto::acl::DeviceContext { device: &device, kind: DeviceKind::Plug, now: NOW };
    let acl = access_list();
    let held = sign(OWNER, &CommandPayload { issued_at: NOW - 86_400, ..command(OWNER, 5, Command::RemoveController { controller: controller(MEMBER) }) });
    let mut replay = ReplayState::default();
    let later = acl.decide(ctx, &replay, &sign(OWNER, &command(OWNER, 6, Command::GetState))).unwrap();
    replay.commit(&later);
    assert_eq!(acl.decide(ctx, &replay, &held).unwrap_err().reason, Refusal::Replayed);
    assert_eq!(acl.decide(ctx, &ReplayState::default(), &held).unwrap().counter, 5);
}

#[test]
fn a_switch_only_grant_may_switch_and_nothing_else() {
    let mut acl = access_list();
    let scope = hearth_proto::acl::Scope { switch_only: true, ..Default::default() };
    assert!(acl.set_scope(&controller(MEMBER), scope));
    let device = device(0x11);
    let ctx = hearth_proto::acl::DeviceContext { device: &device, kind: DeviceKind::EnergyPlug, now: NOW };
    let replay = ReplayState::default();
    let decide = |n: u64, cmd: Command| acl.decide(ctx, &replay, &sign(MEMBER, &command(MEMBER, n, cmd))).map(|_| ()).map_err(|r| r.reason);
    assert_eq!(decide(1, Command::SetRelay { on: true }), Ok(()));
    assert_eq!(decide(2, Command::Toggle), Ok(()));
    assert_eq!(decide(3, Command::GetState), Ok(()));
    for cmd in [Command::GetRules, Command::GetAccess, Command::GetEnergy { since: 0, resolution: None }, Command::CheckUpdate] {
        assert_eq!(decide(4, cmd.clone()), Err(Refusal::NotPermitted), "{cmd:?}");
    }
}

/// Applies an accepted decision's access change the way the device does
/// (`hearth-device` `protocol.rs`): a removed controller's counter is
/// forgotten, an added one gets `added_at = now`.
fn apply(acl: &mut AccessList, replay: &mut ReplayState, bytes: &[u8], now: u64) {
    let device = device(0x11);
    let ctx = hearth_proto::acl::DeviceContext { device: &device, kind: DeviceKind::Plug, now };
    let d = acl.decide(ctx, replay, bytes).expect("accepted");
    replay.commit(&d);
    match d.command {
        Command::RemoveController { controller } => {
            assert!(acl.remove(&controller));
            replay.forget(&controller);
        }
        Command::AddController { key, role, .. } => assert!(acl.upsert(key, role, now)),
        _ => {}
    }
}

fn revoke(signer: u8, counter: u64, target: u8, issued_at: u64) -> Vec<u8> {
    sign(signer, &CommandPayload { issued_at, ..command(signer, counter, Command::RemoveController { controller: controller(target) }) })
}

fn share(signer: u8, counter: u64, target: u8, role: Role, issued_at: u64) -> Vec<u8> {
    let enc = hearth_proto::e2e::EncSecretKey::derive(b"acl test").public().clone();
    let add = Command::AddController { key: public(target), enc, role, scope: Default::default() };
    sign(signer, &CommandPayload { issued_at, ..command(signer, counter, add) })
}

/// Security review: the signer's counter is forgotten when it is removed,
/// so step 6 no longer orders its old revokes. An admin's revoke, kept by
/// the cloud, must not remove the member again after the owner removed and
/// re-added both of them.
#[test]
fn an_old_revoke_does_not_outlive_a_re_add_of_its_signer() {
    const ADMIN: u8 = 3;
    let mut acl = access_list();
    let mut replay = ReplayState::default();
    assert!(acl.upsert(public(ADMIN), Role::Admin, PAIRED_AT));
    let old = revoke(ADMIN, 5, MEMBER, NOW - 10 * DAY);
    apply(&mut acl, &mut replay, &old, NOW - 10 * DAY);
    assert!(acl.get(&controller(MEMBER)).is_none());
    apply(&mut acl, &mut replay, &revoke(OWNER, 1, ADMIN, NOW - 8 * DAY), NOW - 8 * DAY);
    apply(&mut acl, &mut replay, &share(OWNER, 2, ADMIN, Role::Admin, NOW - 5 * DAY), NOW - 5 * DAY);
    apply(&mut acl, &mut replay, &share(OWNER, 3, MEMBER, Role::Member, NOW - 5 * DAY), NOW - 5 * DAY);
    assert_eq!(replay.last(&controller(ADMIN)), None, "the admin's counter was forgotten");

    let device = device(0x11);
    let ctx = hearth_proto::acl::DeviceContext { device: &device, kind: DeviceKind::Plug, now: NOW };
    assert_eq!(acl.decide(ctx, &replay, &old).unwrap_err().reason, Refusal::Stale);
    // A new revoke by the re-added admin, held as long, is still honoured.
    let held = revoke(ADMIN, 1, MEMBER, NOW - 4 * DAY);
    assert_eq!(acl.decide(ctx, &replay, &held).unwrap().counter, 1);
}

/// Security review: an owner's revoke withheld by the cloud must not remove
/// a controller another owner re-added after the revoke was signed.
#[test]
fn an_old_revoke_does_not_outlive_a_re_add_of_its_target() {
    const OWNER2: u8 = 4;
    let mut acl = access_list();
    let mut replay = ReplayState::default();
    assert!(acl.upsert(public(OWNER2), Role::Owner, PAIRED_AT));
    let withheld = revoke(OWNER, 9, MEMBER, NOW - 10 * DAY);
    apply(&mut acl, &mut replay, &revoke(OWNER2, 1, MEMBER, NOW - 8 * DAY), NOW - 8 * DAY);
    apply(&mut acl, &mut replay, &share(OWNER2, 2, MEMBER, Role::Member, NOW - 5 * DAY), NOW - 5 * DAY);

    let device = device(0x11);
    let ctx = hearth_proto::acl::DeviceContext { device: &device, kind: DeviceKind::Plug, now: NOW };
    assert_eq!(acl.decide(ctx, &replay, &withheld).unwrap_err().reason, Refusal::Stale);
    // The same revoke, delivered before the re-add, would have been honoured.
    let before = hearth_proto::acl::DeviceContext { now: NOW - 9 * DAY, ..ctx };
    assert_eq!(access_list().decide(before, &ReplayState::default(), &withheld).unwrap().counter, 9);
}

/// The exemption still covers what it is for: a revoke held longer than the
/// freshness window, issued after both entries were added, is accepted.
#[test]
fn a_held_revoke_issued_after_the_entries_were_added_is_accepted() {
    let device = device(0x11);
    let ctx = hearth_proto::acl::DeviceContext { device: &device, kind: DeviceKind::Plug, now: NOW };
    let mut acl = AccessList::default();
    assert!(acl.upsert(public(OWNER), Role::Owner, NOW - 1_000));
    assert!(acl.upsert(public(MEMBER), Role::Member, NOW - 500));
    let replay = ReplayState::default();
    assert_eq!(acl.decide(ctx, &replay, &revoke(OWNER, 3, MEMBER, NOW - 500)).unwrap().counter, 3);
    assert_eq!(acl.decide(ctx, &replay, &revoke(OWNER, 3, MEMBER, NOW - 121)).unwrap().counter, 3);
    assert_eq!(acl.decide(ctx, &replay, &revoke(OWNER, 3, MEMBER, NOW - 501)).unwrap_err().reason, Refusal::Stale);
}
