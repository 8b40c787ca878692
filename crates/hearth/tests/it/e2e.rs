//! The foundation's promises, end to end on 127.0.0.1 (issue 2, tests 1–3 and 6).

use std::time::{Duration, Instant};

use hearth::client::Cloud;
use hearth_proto::acl::Refusal;
use hearth_proto::ids::{ControllerId, DeviceId};
use hearth_proto::keys::PublicKey;
use hearth_proto::message::{self, Command, CommandPayload, Outcome};
use hearth_proto::{b64, PROTOCOL_VERSION};
use p256::ecdsa::SigningKey;
use p256::pkcs8::DecodePrivateKey;
use serde_json::json;

use crate::harness::*;

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Test 1: sign up → provision → pair → `on` → signed ack → state pushed to
/// a second controller of the same account, within 1 s.
#[test]
fn on_is_acked_and_pushed_to_a_second_controller_within_a_second() {
    let w = World::new();
    let plug = w.provision("plug", "plug");
    let _dev = w.run_device(&plug);
    let phone = w.controller("phone");
    phone.signup("alice@example.com");
    assert_eq!(file_mode(&phone.dir.join("controller.key")), 0o600, "controller key must be private");
    assert!(eventually(Duration::from_secs(10), || phone.run(&["pair", &plug.code, "--name", "lamp"]).status.success()));
    let laptop = w.controller("laptop");
    laptop.login("alice@example.com");
    // Reports are end-to-end encrypted (ADR 0006): the laptop reads them
    // only once the owner has shared the device with it.
    phone.ok(&["share", "lamp", &share_code(&laptop), "--role", "member"]);
    let watch = laptop.watch();

    let started = Instant::now();
    let out = phone.ok(&["on", "lamp"]);
    assert!(out.contains("lamp is ON (signed by the device"), "{out}");
    let line = watch.wait_line(Duration::from_secs(5), |l| l.contains("\"state\"") && l.contains("\"relay\":true"));
    let elapsed = started.elapsed();
    assert!(line.contains("\"verified\":true"), "{line}");
    eprintln!("MEASURED: `hearth on` start → pushed state at second controller: {} ms", elapsed.as_millis());
    assert!(elapsed < Duration::from_secs(1), "push took {elapsed:?}");

    let ls = phone.ok(&["ls"]);
    assert!(ls.contains("lamp") && ls.contains("online") && ls.contains("ON"), "{ls}");
}

/// Test 2: a device restart keeps relay state and access list; a cloud
/// restart needs no user action from devices or controllers.
#[test]
fn restarts_keep_state_and_links_come_back() {
    let mut w = World::new();
    let plug = w.provision("plug", "plug");
    let mut dev = w.run_device(&plug);
    let phone = w.controller("phone");
    phone.signup("bob@example.com");
    assert!(eventually(Duration::from_secs(10), || phone.run(&["pair", &plug.code, "--name", "heater"]).status.success()));
    phone.ok(&["on", "heater"]);

    // Device restart: relay still on, and the owner can still switch it.
    assert!(dev.terminate().success());
    drop(dev);
    let show = run(std::process::Command::new(device_bin()).args(["show", "--state-dir"]).arg(&plug.state));
    assert!(stdout(&show).to_lowercase().contains("on"), "relay state not kept: {}", stdout(&show));
    let _dev = w.run_device(&plug);
    assert!(eventually(Duration::from_secs(15), || phone.run(&["status", "heater"]).status.success()
        && stdout(&phone.run(&["status", "heater"])).contains("ON (online)")));
    phone.ok(&["off", "heater"]);

    // Cloud restart on the same ports: the device redials by itself, the
    // watching controller relinks by itself, and commands work again.
    let laptop = w.controller("laptop");
    laptop.login("bob@example.com");
    phone.ok(&["share", "heater", &share_code(&laptop)]);
    let watch = laptop.watch();
    let (api, devs) = (w.api_addr.clone(), w.device_addr.clone());
    w.stop_cloud();
    w.start_cloud(&api, &devs);
    watch.wait_line(Duration::from_secs(30), |l| l.contains("\"ready\""));
    assert!(
        eventually(Duration::from_secs(60), || phone.run(&["on", "heater"]).status.success()),
        "device did not come back after the cloud restarted"
    );
    watch.wait_line(Duration::from_secs(30), |l| l.contains("\"relay\":true"));
}

/// The controller's share code, as `hearth key` prints it.
pub fn share_code(c: &Controller) -> String {
    let out = c.ok(&["key"]);
    out.lines().find_map(|l| l.strip_prefix("share code: ")).expect("a share code").to_owned()
}

fn signer(c: &Controller) -> SigningKey {
    SigningKey::from_pkcs8_pem(&c.key_pem()).expect("controller key")
}

fn command(key: &SigningKey, device: &DeviceId, counter: u64, cmd: Command) -> Vec<u8> {
    let payload = CommandPayload {
        v: PROTOCOL_VERSION,
        device: device.clone(),
        controller: ControllerId::of_key(&PublicKey::from(key)),
        counter,
        issued_at: now(),
        command: cmd,
    };
    message::sign_command(key, &payload).expect("sign")
}

/// Test 3: bad signature, replay, unpaired controller, other account.
#[test]
fn refused_commands() {
    let w = World::new();
    let plug = w.provision("plug", "plug");
    let _dev = w.run_device(&plug);
    let owner = w.controller("owner");
    owner.signup("carol@example.com");
    assert!(eventually(Duration::from_secs(10), || owner.run(&["pair", &plug.code, "--name", "fan"]).status.success()));
    let device: DeviceId = plug.id.parse().unwrap();
    let cfg = owner.config();
    let token = cfg["token"].as_str().unwrap().to_owned();
    let ca = cfg["cloud_ca_pem"].as_str().unwrap().to_owned();
    let device_key: PublicKey = serde_json::from_value(cfg["devices"][plug.id.as_str()]["key"].clone()).unwrap();
    let key = signer(&owner);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = Cloud::new(&format!("https://{}", w.api_addr), &ca, Some(token)).unwrap();
    let send = |env: &[u8]| {
        rt.block_on(api.call(
            hyper::Method::POST,
            &format!("/api/v1/devices/{device}/command"),
            Some(json!({ "envelope": b64::encode(env) })),
        ))
    };
    let outcome = |answer: serde_json::Value| {
        let bytes = b64::decode(answer["result"].as_str().unwrap()).unwrap();
        if hearth_proto::e2e::is_sealed(&bytes) {
            let me = ControllerId::of_key(&PublicKey::from(&key));
            let enc = hearth_proto::e2e::EncSecretKey::for_controller(&key);
            hearth_proto::e2e::open_result(&bytes, &device, &device_key, &me, &enc).expect("answers are sealed by the device").outcome
        } else {
            message::verify_result(&bytes, &device, &device_key).expect("answers are signed by the device").outcome
        }
    };

    // A valid command works; sent again it is a replay.
    // Above the counter `hearth pair` used to register the encryption key.
    let counter = (now() + 60) * 1_000_000;
    let good = command(&key, &device, counter, Command::SetRelay { on: true });
    assert_eq!(outcome(send(&good).unwrap()), Outcome::Done);
    assert_eq!(outcome(send(&good).unwrap()), Outcome::Refused { reason: Refusal::Replayed });

    // A flipped bit in the signature.
    let mut bad = command(&key, &device, counter + 1, Command::SetRelay { on: false });
    let last = bad.len() - 1;
    bad[last] ^= 0x01;
    assert_eq!(outcome(send(&bad).unwrap()), Outcome::Refused { reason: Refusal::BadSignature });

    // A controller of the same account that never paired: the cloud routes
    // it (same account), the device refuses it.
    let laptop = w.controller("laptop");
    laptop.login("carol@example.com");
    let out = laptop.run(&["off", "fan"]);
    assert_eq!(out.status.code(), Some(3), "{}{}", stdout(&out), stderr(&out));
    assert!(stderr(&out).contains(Refusal::NotPaired.explain()), "{}", stderr(&out));

    // Another account: the cloud does not even route it.
    let mallory = w.controller("mallory");
    mallory.signup("mallory@example.com");
    let out = mallory.run(&["on", &plug.id]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not paired with this device"), "{}", stderr(&out));
    let m_cfg = mallory.config();
    let m_api = Cloud::new(&format!("https://{}", w.api_addr), &ca, Some(m_cfg["token"].as_str().unwrap().into())).unwrap();
    let forged = command(&signer(&mallory), &device, now() * 1_000_000 + 5, Command::SetRelay { on: false });
    let err = rt
        .block_on(m_api.call(hyper::Method::POST, &format!("/api/v1/devices/{device}/command"), Some(json!({"envelope": b64::encode(&forged)}))))
        .unwrap_err();
    let err = err.downcast_ref::<hearth::client::ApiError>().expect("an API error");
    assert_eq!(err.status, hyper::StatusCode::NOT_FOUND);

    // And after all that the relay is still on: nothing but the good command took effect.
    assert!(stdout(&owner.run(&["status", "fan"])).contains("ON"));
}

/// Test 6: a wrong secret fails and counts down; the 21st attempt is refused
/// even with the right secret, until the reset button is pressed.
#[test]
fn pairing_wrong_secret_and_lockout() {
    let w = World::new();
    let plug = w.provision("plug", "plug");
    let mut dev = w.run_device(&plug);
    let c = w.controller("c");
    c.signup("dave@example.com");
    let wrong = hearth_proto::pairing::SetupLabel {
        device: Some(plug.id.parse().unwrap()),
        secret: hearth_proto::pairing::SetupSecret::from_bytes([7; 16]),
    }
    .qr_payload();
    // Wait until the device is linked (a typed wrong code cannot even be routed).
    assert!(eventually(Duration::from_secs(10), || stderr(&c.run(&["pair", &wrong])).contains("tries left")));
    for left in (0..19).rev() {
        let out = c.run(&["pair", &wrong]);
        assert!(!out.status.success());
        assert!(stderr(&out).contains(&format!("wrong setup code, {left} tries left")), "{}", stderr(&out));
    }
    let right = hearth_proto::pairing::SetupLabel {
        device: Some(plug.id.parse().unwrap()),
        secret: hearth_proto::pairing::SetupSecret::from_code(&plug.code).unwrap(),
    }
    .qr_payload();
    let out = c.run(&["pair", &right, "--name", "x"]);
    assert!(!out.status.success(), "the 21st attempt must be refused");
    assert!(stderr(&out).contains("not in setup mode"), "{}", stderr(&out));

    // The physical reset button reopens setup mode.
    assert!(dev.terminate().success());
    drop(dev);
    assert!(run(std::process::Command::new(device_bin()).args(["reset", "--state-dir"]).arg(&plug.state)).status.success());
    let _dev = w.run_device(&plug);
    assert!(eventually(Duration::from_secs(10), || c.run(&["pair", &right, "--name", "x"]).status.success()));
    c.ok(&["on", "x"]);
}
