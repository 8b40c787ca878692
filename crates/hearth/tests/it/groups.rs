//! Issue 5 end to end: groups and scenes kept by the controller, one
//! signed command per device, each device's own answer reported.

use std::time::Duration;

use crate::harness::*;

#[test]
fn groups_and_scenes_switch_each_device_and_report_each_answer() {
    let w = World::new();
    let lamp = w.provision("lamp", "plug");
    let kettle = w.provision("kettle", "energy_plug");
    let sensor = w.provision("hall", "motion_sensor");
    let _lamp = w.run_device(&lamp);
    let mut kettle_dev = w.run_device(&kettle);
    let _sensor = w.run_device(&sensor);
    let phone = w.controller("phone");
    phone.signup("gus@example.com");
    for (p, name) in [(&lamp, "lamp"), (&kettle, "kettle"), (&sensor, "hall")] {
        assert!(eventually(Duration::from_secs(10), || phone.run(&["pair", &p.code, "--name", name]).status.success()));
    }

    // A typo is caught when the group is edited, not when it is used.
    phone.ok(&["group", "create", "downstairs"]);
    assert!(!phone.run(&["group", "add", "downstairs", "lamb"]).status.success());
    assert!(!phone.run(&["group", "create", "lamp"]).status.success(), "a group may not shadow a device");
    let out = phone.ok(&["group", "add", "downstairs", "lamp", "kettle"]);
    assert!(out.contains("Group downstairs: lamp, kettle"), "{out}");
    assert!(phone.ok(&["group", "ls"]).contains("downstairs: lamp, kettle"));
    let file = phone.dir.join("groups.json");
    assert_eq!(file_mode(&file), 0o600);

    // One command per device, each answer verified and shown.
    let out = phone.ok(&["on", "downstairs"]);
    assert!(out.contains("lamp: ON (signed by the device") && out.contains("kettle: ON, 1200.0 W (signed by the device"), "{out}");
    assert!(phone.ok(&["status", "lamp"]).contains("ON"));
    let out = phone.ok(&["toggle", "downstairs"]);
    assert!(out.contains("lamp: off") && out.contains("kettle: off"), "{out}");

    // A device that cannot do it refuses (signed); the others still switch.
    phone.ok(&["group", "add", "downstairs", "hall"]);
    let out = phone.run(&["on", "downstairs"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{stdout}");
    assert!(stdout.contains("hall: refused: the device cannot do that") && stdout.contains("lamp: ON"), "{stdout}");
    phone.ok(&["group", "rm", "downstairs", "hall"]);

    // Scenes: saved states, applied at once; an offline device is reported, not hidden.
    phone.ok(&["scene", "set", "evening", "lamp=off", "kettle=on"]);
    assert!(phone.ok(&["scene", "ls"]).contains("evening: lamp=off kettle=on"));
    let out = phone.ok(&["scene", "run", "evening"]);
    assert!(out.contains("lamp: off") && out.contains("kettle: ON"), "{out}");
    kettle_dev.terminate();
    assert!(eventually(Duration::from_secs(10), || phone.ok(&["ls"]).lines().any(|l| l.starts_with("kettle") && l.contains("offline"))));
    let out = phone.run(&["scene", "run", "evening"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("kettle: FAILED: offline") && stdout.contains("lamp: off"), "{stdout}");

    phone.ok(&["scene", "rm", "evening"]);
    phone.ok(&["group", "rm", "downstairs"]);
    assert!(phone.ok(&["group", "ls"]).contains("No groups yet"));
}

/// A dimmable light from the CLI: `hearth dim` sets the level (and switches
/// it on), the level survives off/on, a group of lights dims together, and
/// a plug in the group refuses (signed) instead of pretending.
#[test]
fn dimming_a_light_and_a_group() {
    let w = World::new();
    let light = w.provision("light", "dimmer");
    let plug = w.provision("plug", "plug");
    let _light = w.run_device(&light);
    let _plug = w.run_device(&plug);
    let phone = w.controller("phone");
    phone.signup("hal@example.com");
    assert!(eventually(Duration::from_secs(10), || phone.run(&["pair", &light.code, "--name", "light"]).status.success()));
    assert!(eventually(Duration::from_secs(10), || phone.run(&["pair", &plug.code, "--name", "plug"]).status.success()));
    let out = phone.ok(&["dim", "light", "40", "--fade", "2s"]);
    assert!(out.contains("light is ON, 40 % (signed by the device"), "{out}");
    phone.ok(&["off", "light"]);
    assert!(phone.ok(&["on", "light"]).contains("ON, 40 %"));
    assert!(!phone.run(&["dim", "light", "0"]).status.success());
    let out = phone.run(&["dim", "light", "150"]);
    assert!(!out.status.success(), "a u8 over 100 is refused (by the device or the parser)");
    phone.ok(&["group", "create", "all"]);
    phone.ok(&["group", "add", "all", "light", "plug"]);
    let out = phone.run(&["dim", "all", "70", "--fade", "500ms"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{stdout}");
    assert!(stdout.contains("light: ON, 70 %") && stdout.contains("plug: refused: the device cannot do that"), "{stdout}");
}
