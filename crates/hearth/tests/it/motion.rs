//! Issue 5, motion rules across devices: the real programs. The owner's CLI
//! grants the sensor's device key "member" on the plug and stores the rule
//! on the sensor; a walk past the simulated sensor (SIGUSR2) switches the
//! plug on over the LAN, and the plug goes off after the quiet period. The
//! sensor's key can do nothing else on the plug.

use std::process::Command;
use std::time::{Duration, Instant};

use hearth_device::lan::{exchange, DevicePin};
use hearth_proto::acl::{Refusal, Role, Scope};
use hearth_proto::e2e::{self, EncSecretKey};
use hearth_proto::ids::DeviceId;
use hearth_proto::keys::PublicKey;
use hearth_proto::message::{self, Command as Cmd, CommandPayload, Outcome};
use p256::pkcs8::DecodePrivateKey;

use crate::harness::*;
use crate::lan::{free_port, relay, run_lan_device};

fn walk_past(p: &Proc) {
    assert!(run(Command::new("kill").args(["-USR2", &p.child.id().to_string()])).status.success());
}

#[test]
fn walking_past_the_sensor_switches_the_plug_on_and_off_after_the_quiet_period() {
    let w = World::new();
    let plug = w.provision("plug", "plug");
    let port = free_port();
    let plug_lan = format!("127.0.0.1:{port}");
    let (_plug_dev, _) = run_lan_device(&w, &plug, &plug_lan, &[]);
    let sensor = w.provision("sensor", "motion-sensor");
    // The sensor's sandbox may connect to its targets' LAN port.
    let mut cmd = Command::new(device_bin());
    cmd.args(["run", "--state-dir"]).arg(&sensor.state).args(["--cloud", &w.device_addr, "--lan-peer-port", &port.to_string()]);
    let sensor_dev = Proc::spawn("sensor", cmd);
    sensor_dev.wait_line(Duration::from_secs(20), |l| l.contains("running"));

    let phone = w.controller("phone");
    phone.signup("motion@example.com");
    assert!(eventually(Duration::from_secs(10), || phone.run(&["pair", &plug.code, "--name", "lamp"]).status.success()));
    assert!(eventually(Duration::from_secs(10), || phone.run(&["pair", &sensor.code, "--name", "hall"]).status.success()));

    let out = phone.ok(&["rules", "motion", "hall", "--target", "lamp", "--off-after", "10s", "--target-lan", &plug_lan]);
    assert!(out.contains("hall may switch it on and off, nothing else"), "{out}");
    assert!(out.contains("motion switches lamp on, off after 10 s"), "{out}");
    assert!(phone.ok(&["rules", "hall"]).contains("motion"));
    assert!(!relay(&plug.state));

    walk_past(&sensor_dev);
    let started = Instant::now();
    assert!(eventually(Duration::from_secs(10), || relay(&plug.state)), "the plug did not go on at motion");
    let on_after = started.elapsed();
    assert!(eventually(Duration::from_secs(25), || !relay(&plug.state)), "the plug did not go off after the quiet period");
    let quiet = started.elapsed();
    assert!(quiet >= Duration::from_secs(9), "off after {quiet:?}, before the 10 s quiet period (on after {on_after:?})");

    // Motion does not take over a lamp a person switched on: it stays on
    // past the quiet period.
    phone.ok(&["on", "lamp"]);
    walk_past(&sensor_dev);
    std::thread::sleep(Duration::from_secs(13));
    assert!(relay(&plug.state), "motion switched off a lamp the owner had switched on");
    phone.ok(&["off", "lamp"]);

    // The sensor's key on the plug: may switch, nothing else. Signed with
    // the sensor's own device key, as the sensor would.
    let key = p256::ecdsa::SigningKey::from_pkcs8_pem(&std::fs::read_to_string(sensor.state.join("device.key")).unwrap()).unwrap();
    let me = PublicKey::from(&key).controller_id();
    let enc = EncSecretKey::for_controller(&key);
    let device: DeviceId = plug.id.parse().unwrap();
    let ca = std::fs::read_to_string(w.path("pki").join("manufacturer-ca.pem")).unwrap();
    let pin = DevicePin { device: device.clone(), key: None, manufacturer_ca_pem: Some(ca) };
    let dev_key = hearth_pki::device_identity(&hearth_pki::certs_from_pem(&std::fs::read_to_string(plug.state.join("device.pem")).unwrap()).unwrap()[0])
        .unwrap()
        .1;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let mut counter = u64::MAX / 4;
    let mut attempt = |command: Cmd| {
        counter += 1;
        let payload = CommandPayload { v: 1, device: device.clone(), controller: me.clone(), counter, issued_at: now, command };
        let env = message::sign_command(&key, &payload).unwrap();
        let (answer, _) = rt.block_on(exchange(&plug_lan, pin.clone(), env)).unwrap();
        let r = if e2e::is_sealed(&answer) {
            e2e::open_result(&answer, &device, &dev_key, &me, &enc).unwrap()
        } else {
            message::verify_result(&answer, &device, &dev_key).unwrap()
        };
        r.outcome
    };
    let stranger = hearth_proto::keys::generate();
    let share = Cmd::AddController {
        key: PublicKey::from(&stranger),
        enc: EncSecretKey::for_controller(&stranger).public().clone(),
        role: Role::Owner,
        scope: Scope::default(),
    };
    assert_eq!(attempt(share), Outcome::Refused { reason: Refusal::NotPermitted }, "the sensor cannot share the plug");
    let rules = Cmd::SetRules { base_version: 0, rules: r#"{"version":0,"timezone":"UTC","rules":[]}"#.into() };
    assert_eq!(attempt(rules), Outcome::Refused { reason: Refusal::NotPermitted }, "the sensor cannot change the plug's rules");
    assert_eq!(attempt(Cmd::GetRules), Outcome::Refused { reason: Refusal::NotPermitted }, "nor read them (a switch-only grant)");
    assert_eq!(attempt(Cmd::GetAccess), Outcome::Refused { reason: Refusal::NotPermitted }, "nor read the access list");
    let owner = hearth_proto::ids::ControllerId::of_key(&PublicKey::from(&p256::ecdsa::SigningKey::from_pkcs8_pem(&phone.key_pem()).unwrap()));
    assert_eq!(attempt(Cmd::RemoveController { controller: owner }), Outcome::Refused { reason: Refusal::NotPermitted }, "the sensor cannot revoke the owner");
    assert!(!relay(&plug.state));
}

/// The same rule with no LAN at all: the plug does not serve the LAN, so
/// the sensor's signed commands go over its cloud link, which forwards
/// them only because both devices belong to the same account.
/// The owner must allow that path (`--allow-cloud-path`, ADR 0011).
#[test]
fn without_a_lan_the_sensor_switches_the_plug_through_the_cloud() {
    let w = World::new();
    let plug = w.provision("plug", "plug");
    let _plug_dev = w.run_device(&plug);
    let sensor = w.provision("sensor", "motion-sensor");
    let sensor_dev = w.run_device(&sensor);
    let phone = w.controller("phone");
    phone.signup("cloud-motion@example.com");
    assert!(eventually(Duration::from_secs(10), || phone.run(&["pair", &plug.code, "--name", "lamp"]).status.success()));
    assert!(eventually(Duration::from_secs(10), || phone.run(&["pair", &sensor.code, "--name", "hall"]).status.success()));
    // The sensor reports on a fixed cadence by default (ADR 0011), so the
    // cloud path, which shows the cloud when motion happens, must be asked for.
    let out = phone.ok(&["rules", "motion", "hall", "--target", "lamp", "--off-after", "10s", "--allow-cloud-path"]);
    assert!(out.contains("over the cloud link (no LAN address known for it; the cloud sees when motion happens)"), "{out}");

    walk_past(&sensor_dev);
    let started = Instant::now();
    assert!(eventually(Duration::from_secs(10), || relay(&plug.state)), "the plug did not go on at motion");
    assert!(eventually(Duration::from_secs(25), || !relay(&plug.state)), "the plug did not go off after the quiet period");
    assert!(started.elapsed() >= Duration::from_secs(9), "off before the quiet period");
}

/// Internet and cloud down, and the plug's address in the rule is stale
/// (DHCP gave it another port here): the sensor finds the plug again by
/// mDNS (legacy unicast to the plug's responder) and switches it over the
/// LAN, on and off.
#[test]
fn with_the_cloud_down_a_stale_address_is_found_again_by_mdns() {
    let mut w = World::new();
    let plug = w.provision("plug", "plug");
    let (port, mdns_port, stale) = (free_port(), free_port(), free_port());
    let mut cmd = Command::new(device_bin());
    cmd.args(["run", "--state-dir"]).arg(&plug.state).args(["--cloud", &w.device_addr, "--lan-listen", &format!("127.0.0.1:{port}")]);
    cmd.env("HEARTH_MDNS_PORT", mdns_port.to_string());
    let plug_dev = Proc::spawn("plug", cmd);
    plug_dev.wait_line(Duration::from_secs(20), |l| l.contains("running"));
    let sensor = w.provision("sensor", "motion-sensor");
    let mut cmd = Command::new(device_bin());
    cmd.args(["run", "--state-dir"]).arg(&sensor.state).args(["--cloud", &w.device_addr, "--lan-peer-port", &port.to_string()]);
    cmd.env("HEARTH_MDNS_TO", format!("127.0.0.1:{mdns_port}"));
    let sensor_dev = Proc::spawn("sensor", cmd);
    sensor_dev.wait_line(Duration::from_secs(20), |l| l.contains("running"));

    let phone = w.controller("phone");
    phone.signup("stale@example.com");
    assert!(eventually(Duration::from_secs(10), || phone.run(&["pair", &plug.code, "--name", "lamp"]).status.success()));
    assert!(eventually(Duration::from_secs(10), || phone.run(&["pair", &sensor.code, "--name", "hall"]).status.success()));
    phone.ok(&["rules", "motion", "hall", "--target", "lamp", "--off-after", "10s", "--target-lan", &format!("127.0.0.1:{stale}")]);
    w.stop_cloud();

    walk_past(&sensor_dev);
    let started = Instant::now();
    assert!(eventually(Duration::from_secs(10), || relay(&plug.state)), "the plug did not go on at motion");
    assert!(eventually(Duration::from_secs(25), || !relay(&plug.state)), "the plug did not go off after the quiet period");
    assert!(started.elapsed() >= Duration::from_secs(9), "off before the quiet period");
}
