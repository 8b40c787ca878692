//! Dimmable lights (issue 5): on/off plus brightness 1–100 % with a fade,
//! driven through the `Driver` trait, kept over a restart, refused out of
//! range or on a device that is not a dimmer, and still subject to the
//! safety interlock.

use hearth_device::driver::{Output, Simulated};
use hearth_proto::acl::Refusal;
use hearth_proto::capability::DeviceKind;
use hearth_proto::message::{Command, Outcome};

use crate::energy::{Plug, NOW};

fn dim(percent: u8, fade_ms: u32) -> Command {
    Command::SetBrightness { percent, fade_ms }
}

#[test]
fn brightness_and_fades_reach_the_driver_and_survive_a_restart() {
    let mut light = Plug::new(DeviceKind::Dimmer);
    let driver = Simulated::new();
    light.core.set_driver(Box::new(driver.clone()));
    let owner = light.owner.clone();
    // Dimming an "off" light switches it on at that level, fading in.
    let r = light.send(&owner, dim(40, 2_000), NOW);
    assert_eq!((r.outcome, r.state.relay, r.state.brightness), (Outcome::Done, Some(true), Some(40)));
    assert_eq!(driver.applied().last().map(|a| a.1), Some(Output { on: true, brightness: Some(40), fade_ms: 2_000 }));
    let t = NOW * 1000;
    assert_eq!((driver.level_at(t), driver.level_at(t + 1_000), driver.level_at(t + 5_000)), (0.0, 20.0, 40.0));
    // Off and on keep the level; a plain switch does not fade.
    light.send(&owner, Command::SetRelay { on: false }, NOW + 10);
    assert_eq!(driver.level_at((NOW + 10) * 1000), 0.0);
    let r = light.send(&owner, Command::SetRelay { on: true }, NOW + 20);
    assert_eq!(r.state.brightness, Some(40));
    assert_eq!(driver.applied().last().map(|a| a.1), Some(Output { on: true, brightness: Some(40), fade_ms: 0 }));
    // Out of range: refused, nothing changes.
    for bad in [dim(0, 0), dim(101, 0), dim(50, 60_001)] {
        assert_eq!(light.send(&owner, bad, NOW + 30).outcome, Outcome::Refused { reason: Refusal::OutOfRange });
    }
    assert_eq!(light.core.report().brightness, Some(40));
    // A restart comes back at the same level (power-on policy "last").
    light.send(&owner, dim(75, 0), NOW + 40);
    light.restart(NOW + 50);
    let after = Simulated::new();
    light.core.set_driver(Box::new(after.clone()));
    assert_eq!(light.core.report().brightness, Some(75));
    assert_eq!(after.level_at((NOW + 50) * 1000), 75.0);
}

#[test]
fn only_a_dimmer_dims_and_the_interlock_still_counts_switches() {
    let mut plug = Plug::new(DeviceKind::Plug);
    let owner = plug.owner.clone();
    assert_eq!(plug.send(&owner, dim(50, 0), NOW).outcome, Outcome::Refused { reason: Refusal::Unsupported });
    assert_eq!(plug.core.report().brightness, None);

    let mut light = Plug::new(DeviceKind::Dimmer);
    light.set_rules(serde_json::json!({"version": 1, "timezone": "UTC", "interlocks": {"max_toggles_per_min": 2}}));
    let owner = light.owner.clone();
    assert_eq!(light.send(&owner, dim(30, 0), NOW).outcome, Outcome::Done);
    assert_eq!(light.send(&owner, Command::SetRelay { on: false }, NOW).outcome, Outcome::Done);
    // A third switch in the minute, by dimming, is refused like any other.
    let r = light.send(&owner, dim(60, 0), NOW + 1);
    assert!(matches!(r.outcome, Outcome::Refused { reason: Refusal::TooManySwitches { .. } }), "{r:?}");
    assert_eq!((light.core.state().relay, light.core.report().brightness), (false, Some(30)), "nothing changed");
    // Dimming a light that is already on is not a switch.
    assert_eq!(light.send(&owner, Command::SetRelay { on: true }, NOW + 61).outcome, Outcome::Done);
    assert_eq!(light.send(&owner, dim(90, 500), NOW + 61).outcome, Outcome::Done);
    assert_eq!(light.send(&owner, dim(10, 500), NOW + 62).outcome, Outcome::Done);
}

/// A driver that reads a (fake) metering chip: the energy plug reports
/// and books what the driver measures, not the simulator's load.
#[test]
fn a_metering_driver_is_what_the_energy_plug_reports() {
    struct Meter;
    impl hearth_device::driver::Driver for Meter {
        fn apply(&mut self, _: Output, _: u64) {}
        fn power_mw(&mut self, _: u64) -> Option<u64> {
            Some(60_000)
        }
    }
    let mut plug = Plug::new(DeviceKind::EnergyPlug);
    plug.core.set_driver(Box::new(Meter));
    let owner = plug.owner.clone();
    assert_eq!(plug.send(&owner, Command::SetRelay { on: true }, NOW).outcome, Outcome::Done);
    plug.run(NOW, NOW + 61);
    assert_eq!(plug.core.report().power_mw, Some(60_000));
    let Outcome::Energy { report } = plug.send(&owner, Command::GetEnergy { since: NOW, resolution: None }, NOW + 61).outcome else {
        panic!("no report")
    };
    // 60 W for 60 s = 1 Wh.
    assert_eq!(report.total_mwh, 1_000);
}
