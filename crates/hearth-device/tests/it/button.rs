//! Button actions (issue 5): the owner's button rules decide what a short,
//! long or double press does; without a rule a short press toggles and the
//! others do nothing; presses go through the interlock as a person at the
//! device. One test drives the real agent's `press`.

use hearth_proto::capability::DeviceKind;
use hearth_proto::message::{Cause, Command, Outcome};
use hearth_rules::model::Press;

use crate::energy::{Plug, NOW};
use crate::support::{Controller, Device, FakeCloud, Pki};

fn button_rules() -> serde_json::Value {
    serde_json::json!({"version": 1, "timezone": "UTC", "rules": [
        {"id": 1, "name": "long: on for 10 min", "kind": {"button": {"press": "long", "action": {"on_for": 600}}}},
        {"id": 2, "name": "double: off", "kind": {"button": {"press": "double", "action": "off"}}}]})
}

#[test]
fn long_and_double_presses_follow_the_rules_and_a_short_one_toggles() {
    let mut plug = Plug::new(DeviceKind::Plug);
    // Without rules: a long or double press does nothing, a short one toggles.
    plug.core.press(Press::Long, &mut plug.store, NOW).unwrap();
    plug.core.press(Press::Double, &mut plug.store, NOW).unwrap();
    assert!(!plug.core.state().relay);
    plug.core.press(Press::Short, &mut plug.store, NOW).unwrap();
    assert!(plug.core.state().relay);
    plug.core.press(Press::Short, &mut plug.store, NOW + 1).unwrap();
    assert!(!plug.core.state().relay);

    plug.set_rules(button_rules());
    // Long press: on for ten minutes, then the device switches itself off.
    let frames = plug.core.press(Press::Long, &mut plug.store, NOW + 10).unwrap();
    assert_eq!(frames.len(), 1, "one state report");
    assert!(plug.core.state().relay);
    let causes = plug.run(NOW + 11, NOW + 610);
    assert!(causes.is_empty() && plug.core.state().relay, "off early: {causes:?}");
    let causes = plug.run(NOW + 610, NOW + 612);
    assert!(!plug.core.state().relay);
    assert_eq!(causes, vec![Cause::Rule { rule: None }]);
    // Double press: off (here: on by a short press first).
    plug.core.press(Press::Short, &mut plug.store, NOW + 700).unwrap();
    assert!(plug.core.state().relay);
    plug.core.press(Press::Double, &mut plug.store, NOW + 701).unwrap();
    assert!(!plug.core.state().relay);
    // The rules survive a restart.
    plug.restart(NOW + 800);
    plug.core.press(Press::Long, &mut plug.store, NOW + 801).unwrap();
    assert!(plug.core.state().relay);
}

#[test]
fn presses_count_against_the_toggle_limit_and_off_always_works() {
    let mut plug = Plug::new(DeviceKind::Plug);
    let mut rules = button_rules();
    rules["interlocks"] = serde_json::json!({"max_toggles_per_min": 2});
    plug.set_rules(rules);
    // Two switch-ons in the minute (a person switching off is never counted).
    for (s, press) in [(0, Press::Long), (1, Press::Double), (2, Press::Long), (3, Press::Double)] {
        plug.core.press(press, &mut plug.store, NOW + s).unwrap();
    }
    // A third "on" within the minute is refused even from the button…
    plug.core.press(Press::Long, &mut plug.store, NOW + 4).unwrap();
    assert!(!plug.core.state().relay);
    // …and allowed once the first one is a minute old; "off" always works.
    plug.core.press(Press::Long, &mut plug.store, NOW + 61).unwrap();
    assert!(plug.core.state().relay);
    plug.core.press(Press::Double, &mut plug.store, NOW + 62).unwrap();
    assert!(!plug.core.state().relay);
}

#[tokio::test]
async fn the_agent_passes_a_long_press_to_the_rules() {
    let pki = Pki::new();
    let cloud = FakeCloud::genuine(&pki).await;
    let dev = Device::new(&pki, DeviceKind::Plug);
    let key = dev.public_key();
    let agent = dev.spawn(cloud.addr);
    let mut link = cloud.accept().await;
    link.greeting(&key).await;
    let mut owner = Controller::new();
    owner.pair(&mut link, 1, dev.secret()).await;
    let set = Command::SetRules { base_version: 0, rules: button_rules().to_string() };
    assert_eq!(link.command(owner.sign(dev.id(), set), &key).await.outcome, Outcome::Done);
    assert_eq!(agent.press(Press::Double).await.unwrap().relay, Some(false));
    assert_eq!(agent.press(Press::Long).await.unwrap().relay, Some(true));
    assert_eq!(link.state(&key).await.cause, Cause::Local);
    agent.shutdown().await.unwrap();
}
