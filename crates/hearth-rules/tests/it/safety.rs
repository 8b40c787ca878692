//! Safety interlocks: flood, over-power, max on-time, latch.

use hearth_rules::safety::{Interlock, InterlockConfig, OverPower, Refusal, SafetyEvent, Source, Verdict};
use jiff::Timestamp;

fn t(s: i64) -> Timestamp {
    Timestamp::from_second(1_750_000_000 + s).expect("ts")
}

fn cfg(max_toggles: u8, over: Option<OverPower>, max_on: Option<u32>) -> InterlockConfig {
    InterlockConfig { max_on_secs: max_on, max_toggles_per_min: max_toggles, over_power: over }
}

fn kettle_guard(auto_retry: bool) -> OverPower {
    OverPower { limit_w: 2000, for_secs: 5, retry_after_secs: 30, max_retries: 2, auto_retry }
}

#[test]
fn remote_flood_cannot_exceed_the_toggle_limit() {
    let mut il = Interlock::new(cfg(6, None, None), 3680);
    let mut switches = Vec::new();
    let mut refused = 0;
    // Ten alternating commands a second for ten minutes.
    for i in 0..6000 {
        let now = Timestamp::from_second(t(0).as_second()).expect("ts").as_millisecond() + i * 100;
        let now = Timestamp::from_millisecond(now).expect("ts");
        match il.request(i % 2 == 0, Source::Remote, now) {
            Ok(Verdict::Switch(_)) => switches.push(now),
            Ok(Verdict::Unchanged) => {}
            Err(Refusal::RateLimited { max, retry_after_secs }) => {
                assert_eq!(max, 6);
                assert!((1..=60).contains(&retry_after_secs));
                refused += 1;
            }
            Err(other) => panic!("unexpected refusal {other:?}"),
        }
    }
    // In every 60-second window there are at most 6 switches.
    for (i, s) in switches.iter().enumerate() {
        let in_window = switches[i..].iter().take_while(|x| x.as_millisecond() - s.as_millisecond() < 60_000).count();
        assert!(in_window <= 6, "{in_window} switches within a minute starting at {s}");
    }
    assert_eq!(switches.len(), 60, "6 per minute for 10 minutes");
    // Half the flood asks for the state the relay already has (unchanged,
    // not counted); nearly all of the other half is refused with a reason.
    assert_eq!(refused, 2970);
}

#[test]
fn rules_are_rate_limited_too_but_a_person_can_always_switch_off() {
    let mut il = Interlock::new(cfg(2, None, None), 3680);
    assert_eq!(il.request(true, Source::Rule, t(0)), Ok(Verdict::Switch(true)));
    assert_eq!(il.request(false, Source::Rule, t(1)), Ok(Verdict::Switch(false)));
    assert!(matches!(il.request(true, Source::Rule, t(2)), Err(Refusal::RateLimited { retry_after_secs: 58, .. })));
    assert!(matches!(il.request(true, Source::Local, t(2)), Err(Refusal::RateLimited { .. })));
    // Let the window pass, switch on, fill the window again.
    assert_eq!(il.request(true, Source::Remote, t(61)), Ok(Verdict::Switch(true)));
    assert_eq!(il.request(false, Source::Remote, t(61)), Ok(Verdict::Switch(false)));
    assert!(matches!(il.request(true, Source::Remote, t(62)), Err(Refusal::RateLimited { .. })));
    // Unchanged requests are not switches and are not refused.
    assert_eq!(il.request(false, Source::Remote, t(62)), Ok(Verdict::Unchanged));
    let mut il = Interlock::new(cfg(1, None, None), 3680);
    assert_eq!(il.request(true, Source::Remote, t(0)), Ok(Verdict::Switch(true)));
    assert!(matches!(il.request(false, Source::Remote, t(1)), Err(Refusal::RateLimited { .. })));
    assert_eq!(il.request(false, Source::Local, t(1)), Ok(Verdict::Switch(false)));
}

#[test]
fn over_power_load_is_cut_off_with_backoff_then_latch() {
    let mut il = Interlock::new(cfg(30, Some(kettle_guard(false)), None), 3680);
    let mut now = 0;
    let on = |il: &mut Interlock, now: i64| il.request(true, Source::Remote, t(now));
    assert_eq!(on(&mut il, now), Ok(Verdict::Switch(true)));
    // 2200 W: four seconds are tolerated, the fifth cuts off.
    for s in 0..5 {
        assert_eq!(il.observe(t(now + s), Some(2200.0)).switch, None, "second {s}");
    }
    let o = il.observe(t(now + 5), Some(2200.0));
    assert_eq!(o.switch, Some(false));
    assert!(matches!(o.events[..], [SafetyEvent::OverPower { trip: 1, latched: false, .. }]));
    assert!(!il.relay_on());
    now += 5;
    // Locked for 30 s: a remote "on" is refused with the reason.
    assert_eq!(on(&mut il, now + 10), Err(Refusal::OverPowerLockout { until: t(now + 30) }));
    // Second trip: the wait doubles.
    assert_eq!(on(&mut il, now + 30), Ok(Verdict::Switch(true)));
    now += 30;
    for s in 0..=5 {
        il.observe(t(now + s), Some(2500.0));
    }
    now += 5;
    assert_eq!(on(&mut il, now + 59), Err(Refusal::OverPowerLockout { until: t(now + 60) }));
    assert_eq!(on(&mut il, now + 60), Ok(Verdict::Switch(true)));
    now += 60;
    // Third trip exceeds max_retries = 2: latched; remote cannot reset it.
    for s in 0..=5 {
        il.observe(t(now + s), Some(2500.0));
    }
    assert!(il.latched());
    assert_eq!(on(&mut il, now + 3600), Err(Refusal::Latched));
    assert_eq!(il.reset_latch(Source::Remote), Err(Refusal::Latched));
    // The latch survives a reboot (the device persists the interlock).
    let mut il: Interlock = serde_json::from_str(&serde_json::to_string(&il).expect("ser")).expect("de");
    assert_eq!(on(&mut il, now + 3600), Err(Refusal::Latched));
    assert_eq!(il.reset_latch(Source::Local), Ok(()));
    assert_eq!(on(&mut il, now + 3600), Ok(Verdict::Switch(true)));
}

#[test]
fn short_spikes_do_not_cut_off() {
    let mut il = Interlock::new(cfg(6, Some(kettle_guard(false)), None), 3680);
    il.request(true, Source::Remote, t(0)).expect("on");
    for s in 0..600 {
        // A 4-second inrush spike every minute, 1500 W otherwise.
        let w = if s % 60 < 4 { 2600.0 } else { 1500.0 };
        assert_eq!(il.observe(t(s), Some(w)).switch, None, "second {s}");
    }
    assert!(il.relay_on());
}

#[test]
fn hardware_rating_applies_and_configuration_cannot_raise_it() {
    for over in [None, Some(OverPower { limit_w: 10_000, ..kettle_guard(false) })] {
        let mut il = Interlock::new(cfg(6, over.clone(), None), 3680);
        il.request(true, Source::Remote, t(0)).expect("on");
        let cut = (0..=10).find_map(|s| il.observe(t(s), Some(3700.0)).switch.map(|_| s));
        assert!(cut.is_some(), "3700 W on a 3680 W relay is cut off (config {over:?})");
    }
}

#[test]
fn nan_power_reading_fails_safe() {
    let mut il = Interlock::new(cfg(6, Some(kettle_guard(false)), None), 3680);
    il.request(true, Source::Remote, t(0)).expect("on");
    let cut = (0..=10).find_map(|s| il.observe(t(s), Some(f32::NAN)).switch.map(|_| s));
    assert_eq!(cut, Some(5));
}

#[test]
fn auto_retry_switches_back_on_after_the_wait() {
    let mut il = Interlock::new(cfg(6, Some(kettle_guard(true)), None), 3680);
    il.request(true, Source::Remote, t(0)).expect("on");
    for s in 0..=5 {
        il.observe(t(s), Some(2100.0));
    }
    assert!(!il.relay_on());
    assert_eq!(il.observe(t(34), None).switch, None);
    let o = il.observe(t(35), None);
    assert_eq!(o.switch, Some(true));
    assert!(matches!(o.events[..], [SafetyEvent::Retried { .. }]));
}

#[test]
fn maximum_on_time_switches_off_with_an_event() {
    let mut il = Interlock::new(cfg(6, None, Some(2 * 3600)), 3680);
    il.request(true, Source::Remote, t(0)).expect("on");
    assert_eq!(il.observe(t(7199), Some(100.0)).switch, None);
    let o = il.observe(t(7200), Some(100.0));
    assert_eq!(o.switch, Some(false));
    assert_eq!(o.events, vec![SafetyEvent::MaxOnTime { at: t(7200), on_secs: 7200 }]);
    // Switching on again starts a new period.
    il.request(true, Source::Remote, t(7300)).expect("on again");
    assert_eq!(il.observe(t(7300 + 7199), None).switch, None);
}

#[test]
fn interlock_config_validation() {
    let check = |c: InterlockConfig, ok: bool| {
        let mut set = hearth_rules::model::RuleSet::empty("UTC");
        set.interlocks = c.clone();
        assert_eq!(set.validate().is_ok(), ok, "{c:?}");
    };
    check(cfg(6, None, None), true);
    check(cfg(0, None, None), false);
    check(cfg(31, None, None), false);
    check(cfg(6, None, Some(59)), false);
    check(cfg(6, Some(OverPower { for_secs: 0, ..kettle_guard(false) }), None), false);
    check(cfg(6, Some(OverPower { retry_after_secs: 5, ..kettle_guard(false) }), None), false);
    check(cfg(6, Some(OverPower { max_retries: 11, ..kettle_guard(false) }), None), false);
}

#[test]
fn reconfiguring_does_not_reset_the_rate_limit_or_the_latch() {
    let mut il = Interlock::new(cfg(2, Some(OverPower { max_retries: 0, ..kettle_guard(false) }), None), 3680);
    il.request(true, Source::Remote, t(0)).expect("on");
    il.request(false, Source::Remote, t(1)).expect("off");
    // An edit that loosens the limit does not forget the two switches…
    il.reconfigure(cfg(3, Some(OverPower { max_retries: 0, ..kettle_guard(false) }), None));
    assert_eq!(il.request(true, Source::Remote, t(2)), Ok(Verdict::Switch(true)));
    assert!(matches!(il.request(false, Source::Remote, t(3)), Err(Refusal::RateLimited { .. })));
    // …and a latched cut-off stays latched whatever the new settings say.
    for s in 0..=5 {
        il.observe(t(10 + s), Some(2500.0));
    }
    assert!(il.latched());
    il.reconfigure(cfg(30, None, None));
    assert_eq!(il.request(true, Source::Remote, t(100)), Err(Refusal::Latched));
}
