//! Issue 3 end to end: sharing, catch-up from the sealed history, and
//! revocation, with the real programs. The cloud here is honest; the
//! malicious one is in `hearth-device`'s `adversary` tests.

use std::time::Duration;

use hearth_proto::acl::Refusal;

use crate::e2e::share_code;
use crate::harness::*;

fn events(c: &Controller, device: &str) -> Vec<serde_json::Value> {
    c.ok(&["events", device, "--json"]).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn readable(ev: &[serde_json::Value]) -> Vec<bool> {
    ev.iter().map(|e| e["verified"] == true).collect()
}

#[test]
fn share_catch_up_and_revoke() {
    let w = World::new();
    let plug = w.provision("plug", "plug");
    let _dev = w.run_device(&plug);
    let phone = w.controller("phone");
    phone.signup("dana@example.com");
    assert!(eventually(Duration::from_secs(10), || phone.run(&["pair", &plug.code, "--name", "lamp"]).status.success()));
    phone.ok(&["on", "lamp"]);

    // A second controller of the same account sees the device listed but
    // cannot read its state until the device itself is told to share it.
    let laptop = w.controller("laptop");
    laptop.login("dana@example.com");
    assert!(laptop.ok(&["status", "lamp"]).contains("encrypted, not for this controller"));
    let shared = phone.ok(&["share", "lamp", &share_code(&laptop)]);
    let fingerprint = laptop.ok(&["key"]).lines().find_map(|l| l.strip_prefix("encryption key fingerprint: ").map(str::to_owned)).unwrap();
    assert!(shared.contains(&fingerprint), "the owner is shown the key it grants: {shared}");

    // While the laptop is offline, the phone switches twice; the laptop
    // catches up from the cloud's history of sealed reports.
    phone.ok(&["off", "lamp"]);
    phone.ok(&["on", "lamp"]);
    let ev = events(&laptop, "lamp");
    let r = readable(&ev);
    assert!(r.len() >= 3, "{ev:?}");
    assert_eq!(&r[r.len() - 2..], &[true, true], "{ev:?}");
    assert!(!r[0], "reports sealed before the share stay unreadable: {ev:?}");
    assert_eq!(ev.last().unwrap()["state"]["relay"], true);
    // The laptop (a member) may switch, but may not share further.
    laptop.ok(&["off", "lamp"]);
    let out = laptop.run(&["share", "lamp", &share_code(&phone)]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains(Refusal::NotPermitted.explain()));

    // The device's own (signed, sealed) view of who may do what.
    let laptop_id = laptop.ok(&["key"]).lines().find_map(|l| l.strip_prefix("controller: ").map(str::to_owned)).unwrap();
    let access = phone.ok(&["access", "lamp"]);
    let line = access.lines().find(|l| l.starts_with(&laptop_id)).unwrap_or_else(|| panic!("{access}"));
    assert!(line.contains("member") && line.contains(&fingerprint), "{access}");
    assert!(access.lines().any(|l| l.contains("owner") && l.ends_with("(this controller)")), "{access}");

    // Revoked: refused at once, and new history is not sealed for it.
    phone.ok(&["revoke", "lamp", &laptop_id]);
    let out = laptop.run(&["on", "lamp"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains(Refusal::NotPaired.explain()));
    phone.ok(&["on", "lamp"]);
    let ev = events(&laptop, "lamp");
    assert_eq!(readable(&ev).last(), Some(&false), "{ev:?}");
    assert!(laptop.ok(&["status", "lamp"]).contains("encrypted, not for this controller"));
    assert!(phone.ok(&["status", "lamp"]).contains("ON"));
    assert!(!phone.ok(&["access", "lamp"]).contains(&laptop_id));
}

/// Sharing with a controller of another account: the device accepts the
/// owner's signed grant, and the cloud then routes for that account (and
/// stops once the device confirmed the revoke).
#[test]
fn share_with_another_account_and_revoke() {
    let w = World::new();
    let plug = w.provision("plug", "plug");
    let _dev = w.run_device(&plug);
    let alice = w.controller("alice");
    alice.signup("alice@example.com");
    assert!(eventually(Duration::from_secs(10), || alice.run(&["pair", &plug.code, "--name", "lamp"]).status.success()));
    alice.ok(&["on", "lamp"]);

    let bob = w.controller("bob");
    bob.signup("bob@example.com");
    assert!(!bob.ok(&["ls"]).contains("lamp"), "not shared yet");
    let out = bob.run(&["off", "lamp"]);
    assert!(!out.status.success(), "bob's account cannot route to alice's plug yet");

    let out = alice.run(&["share", "lamp", &share_code(&bob)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("warning"), "{}", String::from_utf8_lossy(&out.stderr));
    let ls = bob.ok(&["ls"]);
    assert!(ls.contains("lamp (shared)"), "{ls}");

    // Bob switches it and sees the pushed, decrypted, verified state.
    let watch = bob.watch();
    let out = bob.ok(&["off", "lamp"]);
    assert!(out.contains("lamp is off (signed by the device"), "{out}");
    let line = watch.wait_line(Duration::from_secs(5), |l| l.contains("\"state\"") && l.contains("\"relay\":false"));
    assert!(line.contains("\"verified\":true"), "{line}");
    assert_eq!(events(&bob, "lamp").last().unwrap()["state"]["relay"], false);

    // Revoked on the device, then no longer routed: bob's command does not
    // reach it, he gets no new state and no history.
    let bob_id = bob.ok(&["key"]).lines().find_map(|l| l.strip_prefix("controller: ").map(str::to_owned)).unwrap();
    alice.ok(&["revoke", "lamp", &bob_id]);
    assert!(!bob.ok(&["ls"]).contains("lamp"));
    let out = bob.run(&["on", "lamp"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no device named \"lamp\""), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!bob.run(&["events", "lamp", "--json"]).status.success());
    alice.ok(&["on", "lamp"]);
    assert!(alice.ok(&["status", "lamp"]).contains("ON"));
    let deadline = std::time::Instant::now() + Duration::from_millis(1500);
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        if let Ok(l) = watch.lines.recv_timeout(left) {
            assert!(!l.contains("\"state\""), "bob still got a state push after the revoke: {l}");
        }
    }
}

/// A revoke issued while the device is offline (issue 3): the cloud holds
/// it and sends it before anything else when the device reconnects, so the
/// revoked controller's first command that reaches the device — sent as
/// soon as it is back — is already refused.
#[test]
fn a_revoke_issued_while_the_device_is_offline_goes_first_on_reconnect() {
    let w = World::new();
    let plug = w.provision("plug", "plug");
    let mut dev = w.run_device(&plug);
    let phone = w.controller("phone");
    phone.signup("erin@example.com");
    assert!(eventually(Duration::from_secs(10), || phone.run(&["pair", &plug.code, "--name", "lamp"]).status.success()));
    let laptop = w.controller("laptop");
    laptop.login("erin@example.com");
    phone.ok(&["share", "lamp", &share_code(&laptop)]);
    laptop.ok(&["on", "lamp"]);
    let laptop_id = laptop.ok(&["key"]).lines().find_map(|l| l.strip_prefix("controller: ").map(str::to_owned)).unwrap();

    // The device goes away; the owner revokes the laptop meanwhile.
    dev.terminate();
    assert!(eventually(Duration::from_secs(10), || phone.ok(&["ls"]).contains("offline")));
    let held = phone.ok(&["revoke", "lamp", &laptop_id]);
    assert!(held.contains("offline") && held.contains("before anything else"), "{held}");
    // A switch by the laptop is not held: it fails as offline.
    let out = laptop.run(&["off", "lamp"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("offline"), "{}", String::from_utf8_lossy(&out.stderr));

    // The device comes back; the laptop fires as soon as it can. Its first
    // command that reaches the device is refused: the revoke went first.
    let _dev = w.run_device(&plug);
    let mut answer = None;
    assert!(eventually(Duration::from_secs(20), || {
        let out = laptop.run(&["off", "lamp"]);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if stderr.contains("offline") {
            return false;
        }
        answer = Some((out.status.code(), stderr));
        true
    }));
    let (code, stderr) = answer.unwrap();
    assert_eq!(code, Some(3), "{stderr}");
    assert!(stderr.contains(Refusal::NotPaired.explain()), "{stderr}");
    // The device's own list confirms it, and the relay kept the laptop's "on".
    assert!(!phone.ok(&["access", "lamp"]).contains(&laptop_id));
    assert!(phone.ok(&["status", "lamp"]).contains("ON"));
}
