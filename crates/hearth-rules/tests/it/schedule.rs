//! Scheduler: exactly-once, DST, outages, away mode, motion, buttons.

use hearth_rules::model::{ClockTime, Press, RuleSet};
use hearth_rules::schedule::{self, away_plan, Cause, DueAction, RuntimeState};
use jiff::Timestamp;
use serde_json::json;

use crate::{at, date, tz};

/// A rule set from JSON (so the tests also exercise the wire format).
fn rules(zone: &str, rules: serde_json::Value) -> RuleSet {
    let v = json!({
        "version": 1,
        "timezone": zone,
        "location": {"lat": 52.52, "lon": 13.405},
        "rules": rules,
    });
    RuleSet::from_json(v.to_string().as_bytes()).expect("valid rule set")
}

/// Tick from `start` to `end` every `step` seconds; all actions returned.
fn run(set: &RuleSet, zone: &str, start: Timestamp, end: Timestamp, step: i64) -> Vec<DueAction> {
    let zone = tz(zone);
    let mut st = RuntimeState { last_eval: Some(start), ..Default::default() };
    let mut out = Vec::new();
    let mut t = start.as_second();
    while t < end.as_second() {
        t = (t + step).min(end.as_second());
        out.extend(schedule::tick(&mut st, set, &zone, Timestamp::from_second(t).expect("ts")));
    }
    out
}

fn summary(actions: &[DueAction]) -> Vec<(i64, bool, Option<u32>)> {
    actions.iter().map(|a| (a.at.as_second(), a.on, a.rule)).collect()
}

#[test]
fn every_occurrence_fires_exactly_once_however_ticks_are_spaced() {
    let set = rules(
        "Europe/Berlin",
        json!([
            {"id": 1, "name": "morning", "kind": {"schedule": {"days": ["mon","tue","wed","thu","fri"], "at": {"clock": "07:00"}, "action": "on"}}},
            {"id": 2, "name": "night", "kind": {"schedule": {"days": ["mon","tue","wed","thu","fri","sat","sun"], "at": {"clock": "23:00"}, "action": "off"}}},
            {"id": 3, "name": "porch", "kind": {"schedule": {"days": ["sat","sun"], "at": {"sunset": -15}, "action": {"on_until": {"clock": "01:00"}}}}},
        ]),
    );
    // A week spanning the spring-forward night.
    let start = at("Europe/Berlin", 2025, 3, 24, 0, 0);
    let end = at("Europe/Berlin", 2025, 3, 31, 12, 0);
    let reference = summary(&schedule::occurrences(&set, &tz("Europe/Berlin"), start, end));
    // 6 weekday mornings (Mon 24 … Fri 28, Mon 31), 7 nights, the porch on
    // and off on Sat and Sun, plus the 01:00 off of the porch switched on
    // on Sunday the 23rd (before the interval).
    assert_eq!(reference.len(), 6 + 7 + 4 + 1, "{reference:?}");
    for step in [13, 60, 119] {
        assert_eq!(summary(&run(&set, "Europe/Berlin", start, end, step)), reference, "tick every {step}s");
    }
}

#[test]
fn sunset_schedule_follows_the_sun() {
    let set = rules(
        "Europe/Berlin",
        json!([{"id": 1, "name": "dusk", "kind": {"schedule": {"days": ["mon","tue","wed","thu","fri","sat","sun"], "at": {"sunset": -15}, "action": "on"}}}]),
    );
    let z = tz("Europe/Berlin");
    let got = schedule::occurrences(&set, &z, at("Europe/Berlin", 2024, 6, 21, 0, 0), at("Europe/Berlin", 2024, 6, 22, 0, 0));
    // Published Berlin sunset that day: 21:33 CEST, so 21:18 ± 2 min.
    assert_eq!(got.len(), 1);
    let want = at("Europe/Berlin", 2024, 6, 21, 21, 18).as_second();
    assert!((got[0].at.as_second() - want).abs() <= 120, "{}", got[0].at.to_zoned_datetime(z));
}

#[test]
fn sun_schedule_does_not_run_on_polar_days() {
    let v = json!({"version": 1, "timezone": "Europe/Oslo", "location": {"lat": 69.6492, "lon": 18.9553},
        "rules": [{"id": 1, "name": "dusk", "kind": {"schedule": {"days": ["mon","tue","wed","thu","fri","sat","sun"], "at": {"sunset": 0}, "action": "on"}}}]});
    let set = RuleSet::from_json(v.to_string().as_bytes()).expect("valid");
    let z = tz("Europe/Oslo");
    let dec = schedule::occurrences(&set, &z, at("Europe/Oslo", 2025, 12, 10, 0, 0), at("Europe/Oslo", 2025, 12, 20, 0, 0));
    assert!(dec.is_empty(), "polar night has no sunset: {dec:?}");
    let oct = schedule::occurrences(&set, &z, at("Europe/Oslo", 2025, 10, 10, 0, 0), at("Europe/Oslo", 2025, 10, 20, 0, 0));
    assert_eq!(oct.len(), 10);
}

#[test]
fn spring_forward_0230_runs_once_shifted_to_0330() {
    let set = rules(
        "Europe/Berlin",
        json!([{"id": 7, "name": "x", "kind": {"schedule": {"days": ["sun"], "at": {"clock": "02:30"}, "action": "on"}}}]),
    );
    // 2025-03-30: Berlin jumps from 02:00 CET to 03:00 CEST.
    let got = run(&set, "Europe/Berlin", at("Europe/Berlin", 2025, 3, 30, 0, 0), at("Europe/Berlin", 2025, 3, 30, 6, 0), 60);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].at, at("Europe/Berlin", 2025, 3, 30, 3, 30));
    assert_eq!(got[0].at.to_string(), "2025-03-30T01:30:00Z");
}

#[test]
fn fall_back_0130_runs_once_at_the_first_0130() {
    let set = rules(
        "America/New_York",
        json!([{"id": 8, "name": "x", "kind": {"schedule": {"days": ["sun"], "at": {"clock": "01:30"}, "action": "off"}}}]),
    );
    // 2025-11-02: New York repeats 01:00–02:00 (EDT, then EST).
    let start = Timestamp::from_second(at("America/New_York", 2025, 11, 2, 0, 0).as_second()).expect("ts");
    let got = run(&set, "America/New_York", start, at("America/New_York", 2025, 11, 2, 4, 0), 60);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].at.to_string(), "2025-11-02T05:30:00Z", "01:30 EDT, the earlier of the two");
}

#[test]
fn fall_back_in_europe_0230_runs_once() {
    let set = rules(
        "Europe/Berlin",
        json!([{"id": 9, "name": "x", "kind": {"schedule": {"days": ["sun"], "at": {"clock": "02:30"}, "action": "on"}}}]),
    );
    let got = run(&set, "Europe/Berlin", at("Europe/Berlin", 2025, 10, 26, 0, 0), at("Europe/Berlin", 2025, 10, 26, 5, 0), 30);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].at.to_string(), "2025-10-26T00:30:00Z");
}

fn lamp() -> RuleSet {
    rules(
        "Europe/Berlin",
        json!([
            {"id": 1, "name": "evening on", "kind": {"schedule": {"days": ["mon","tue","wed","thu","fri","sat","sun"], "at": {"clock": "18:00"}, "action": "on"}}},
            {"id": 2, "name": "night off", "kind": {"schedule": {"days": ["mon","tue","wed","thu","fri","sat","sun"], "at": {"clock": "23:00"}, "action": "off"}}},
        ]),
    )
}

#[test]
fn outage_applies_only_the_latest_missed_action() {
    let set = lamp();
    let z = tz("Europe/Berlin");
    let mut st = RuntimeState { last_eval: Some(at("Europe/Berlin", 2025, 5, 6, 17, 0)), relay_on: false, ..Default::default() };
    // Unplugged 17:00, back at 07:00 next morning: 18:00 on and 23:00 off were missed.
    let a = schedule::boot(&mut st, &set, &z, at("Europe/Berlin", 2025, 5, 7, 7, 0));
    assert_eq!((a.on, a.rule, a.late, a.cause), (false, Some(2), true, Cause::Schedule));
    assert!(!st.relay_on);
    // Back at 20:00 the same day instead: the latest missed action is the 18:00 on.
    let mut st = RuntimeState { last_eval: Some(at("Europe/Berlin", 2025, 5, 6, 17, 0)), ..Default::default() };
    let a = schedule::boot(&mut st, &set, &z, at("Europe/Berlin", 2025, 5, 6, 20, 0));
    assert_eq!((a.on, a.rule, a.late), (true, Some(1), true));
    // Offline (not powered off) across both: tick gives one action, not two.
    let mut st = RuntimeState { last_eval: Some(at("Europe/Berlin", 2025, 5, 6, 17, 0)), ..Default::default() };
    let got = schedule::tick(&mut st, &set, &z, at("Europe/Berlin", 2025, 5, 7, 7, 0));
    assert_eq!(summary(&got), vec![(at("Europe/Berlin", 2025, 5, 6, 23, 0).as_second(), false, Some(2))]);
}

#[test]
fn boot_uses_power_on_policy_when_nothing_was_missed() {
    let z = tz("Europe/Berlin");
    for (policy, before, want) in [("off", true, false), ("on", false, true), ("last", true, true), ("last", false, false)] {
        let mut set = lamp();
        set.power_on = serde_json::from_value(json!(policy)).expect("policy");
        let mut st = RuntimeState { last_eval: Some(at("Europe/Berlin", 2025, 5, 6, 9, 0)), relay_on: before, ..Default::default() };
        let a = schedule::boot(&mut st, &set, &z, at("Europe/Berlin", 2025, 5, 6, 9, 30));
        assert_eq!((a.on, a.cause), (want, Cause::PowerOn), "policy {policy}, before {before}");
    }
}

#[test]
fn outage_longer_than_the_horizon_is_stale() {
    let set = rules(
        "Europe/Berlin",
        json!([{"id": 1, "name": "monday", "kind": {"schedule": {"days": ["mon"], "at": {"clock": "08:00"}, "action": "on"}}}]),
    );
    let z = tz("Europe/Berlin");
    // Off from Sunday to Thursday: Monday 08:00 is more than 24 h ago.
    let mut st = RuntimeState { last_eval: Some(at("Europe/Berlin", 2025, 5, 4, 12, 0)), ..Default::default() };
    let a = schedule::boot(&mut st, &set, &z, at("Europe/Berlin", 2025, 5, 8, 12, 0));
    assert_eq!((a.on, a.cause), (false, Cause::PowerOn));
}

#[test]
fn clock_going_backwards_repeats_nothing() {
    let set = lamp();
    let z = tz("Europe/Berlin");
    let mut st = RuntimeState { last_eval: Some(at("Europe/Berlin", 2025, 5, 6, 17, 59)), ..Default::default() };
    assert_eq!(schedule::tick(&mut st, &set, &z, at("Europe/Berlin", 2025, 5, 6, 18, 1)).len(), 1);
    // NTP steps the clock back two minutes: 18:00 must not fire again.
    assert!(schedule::tick(&mut st, &set, &z, at("Europe/Berlin", 2025, 5, 6, 17, 59)).is_empty());
    assert!(schedule::tick(&mut st, &set, &z, at("Europe/Berlin", 2025, 5, 6, 18, 0)).is_empty());
    assert!(schedule::tick(&mut st, &set, &z, at("Europe/Berlin", 2025, 5, 6, 18, 2)).is_empty());
}

#[test]
fn first_tick_ever_replays_nothing() {
    let mut st = RuntimeState::default();
    assert!(schedule::tick(&mut st, &lamp(), &tz("Europe/Berlin"), at("Europe/Berlin", 2025, 5, 6, 23, 30)).is_empty());
    assert!(st.last_eval.is_some());
}

#[test]
fn countdown_switches_off_after_the_delay() {
    let set = rules("Europe/Berlin", json!([{"id": 1, "name": "30 min", "kind": {"countdown": {"off_after_secs": 1800}}}]));
    let z = tz("Europe/Berlin");
    let t0 = at("Europe/Berlin", 2025, 5, 6, 10, 0);
    let mut st = RuntimeState { last_eval: Some(t0), ..Default::default() };
    let a = schedule::manual(&mut st, &set, &z, true, t0);
    assert!(a.on);
    assert!(schedule::tick(&mut st, &set, &z, at("Europe/Berlin", 2025, 5, 6, 10, 29)).is_empty());
    let got = schedule::tick(&mut st, &set, &z, at("Europe/Berlin", 2025, 5, 6, 10, 30));
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].on, got[0].cause, got[0].at), (false, Cause::Timer, at("Europe/Berlin", 2025, 5, 6, 10, 30)));
    // Fired once only.
    assert!(schedule::tick(&mut st, &set, &z, at("Europe/Berlin", 2025, 5, 6, 11, 0)).is_empty());
}

#[test]
fn on_until_2300_switches_off_at_the_next_2300() {
    let set = rules("Europe/Berlin", json!([]));
    let z = tz("Europe/Berlin");
    let until = ClockTime::new(23, 0).expect("time");
    for (h, want_day) in [(20, 6), (23, 7)] {
        let t0 = at("Europe/Berlin", 2025, 5, 6, h, 30);
        let mut st = RuntimeState { last_eval: Some(t0), ..Default::default() };
        assert!(schedule::on_until(&mut st, &set, &z, until, t0).on);
        assert_eq!(st.auto_off_at, Some(at("Europe/Berlin", 2025, 5, want_day, 23, 0)), "started {h}:30");
        let got = run_from(&mut st, &set, "Europe/Berlin", at("Europe/Berlin", 2025, 5, 8, 0, 0), 60);
        assert_eq!(summary(&got), vec![(at("Europe/Berlin", 2025, 5, want_day, 23, 0).as_second(), false, None)]);
    }
}

fn run_from(st: &mut RuntimeState, set: &RuleSet, zone: &str, end: Timestamp, step: i64) -> Vec<DueAction> {
    let zone = tz(zone);
    let mut out = Vec::new();
    let mut t = st.last_eval.expect("started").as_second();
    while t < end.as_second() {
        t = (t + step).min(end.as_second());
        out.extend(schedule::tick(st, set, &zone, Timestamp::from_second(t).expect("ts")));
    }
    out
}

fn away_set() -> RuleSet {
    rules(
        "Europe/Berlin",
        json!([{"id": 5, "name": "away", "kind": {"away": {"days": ["mon","tue","wed","thu","fri","sat","sun"],
            "start": {"sunset": 0}, "end": {"clock": "00:30"}, "min_on_mins": 30, "max_on_mins": 90, "seed": 12345}}}]),
    )
}

#[test]
fn away_periods_last_at_least_30_minutes_inside_the_window() {
    let set = away_set();
    let z = tz("Europe/Berlin");
    let hearth_rules::model::RuleKind::Away(a) = set.rules[0].kind else { panic!("away rule") };
    let mut d = date(2025, 1, 1);
    let mut total = 0;
    for _ in 0..365 {
        let plan = away_plan(&a, d, &set, &z);
        let start = schedule::resolve(a.start, d, &set, &z).expect("sunset");
        let end = schedule::resolve(a.end, d.tomorrow().expect("date"), &set, &z).expect("end");
        assert!(!plan.is_empty(), "{d}: a window of several hours has at least one period");
        let mut prev_off = start;
        for (on, off) in &plan {
            assert!(off.as_second() - on.as_second() >= 30 * 60, "{d}: short period");
            assert!(*on >= prev_off && *off <= end, "{d}: outside window or overlapping");
            prev_off = *off;
        }
        total += plan.len();
        d = d.tomorrow().expect("date");
    }
    assert!(total > 365, "more than one period per day on average: {total}");
    // The same seed and date give the same plan (a reboot recomputes it);
    // other days differ.
    assert_eq!(away_plan(&a, date(2025, 6, 1), &set, &z), away_plan(&a, date(2025, 6, 1), &set, &z));
    assert_ne!(away_plan(&a, date(2025, 6, 1), &set, &z), away_plan(&a, date(2025, 6, 2), &set, &z));
}

#[test]
fn manual_switch_stops_away_mode_for_the_rest_of_the_day() {
    let set = away_set();
    let z = tz("Europe/Berlin");
    let hearth_rules::model::RuleKind::Away(a) = set.rules[0].kind else { panic!("away rule") };
    let day = date(2025, 6, 1);
    let plan = away_plan(&a, day, &set, &z);
    // Without intervention the device follows the plan.
    let start = at("Europe/Berlin", 2025, 6, 1, 12, 0);
    let plain = run(&set, "Europe/Berlin", start, at("Europe/Berlin", 2025, 6, 1, 23, 59), 60);
    let first_day: Vec<_> = plain.iter().filter(|x| x.cause == Cause::Away).map(|x| (x.at, x.on)).collect();
    let want: Vec<_> = plan.iter().flat_map(|(on, off)| [(*on, true), (*off, false)]).filter(|(t, _)| *t <= at("Europe/Berlin", 2025, 6, 1, 23, 59)).collect();
    assert_eq!(first_day, want);
    // A manual switch at 12:00 silences away mode until midnight…
    let mut st = RuntimeState { last_eval: Some(start), ..Default::default() };
    schedule::manual(&mut st, &set, &z, false, start);
    let got = run_from(&mut st, &set, "Europe/Berlin", at("Europe/Berlin", 2025, 6, 2, 23, 59), 60);
    assert!(got.iter().all(|x| x.at >= at("Europe/Berlin", 2025, 6, 2, 0, 0)), "nothing before midnight: {got:?}");
    // …and it resumes with the next day's window.
    assert!(got.iter().any(|x| x.on && x.at > at("Europe/Berlin", 2025, 6, 2, 12, 0)));
}

fn motion_set(when: serde_json::Value) -> RuleSet {
    rules(
        "Europe/Berlin",
        json!([{"id": 3, "name": "hall", "kind": {"motion": {"sensor": "sensor-1", "off_after_secs": 300, "when": when}}}]),
    )
}

#[test]
fn motion_switches_on_and_off_after_quiet() {
    let set = motion_set(json!("always"));
    let z = tz("Europe/Berlin");
    let t = |m: i8, s: i64| Timestamp::from_second(at("Europe/Berlin", 2025, 5, 6, 10, m).as_second() + s).expect("ts");
    let mut st = RuntimeState { last_eval: Some(t(0, 0)), ..Default::default() };
    assert!(schedule::motion(&mut st, &set, &z, "other-sensor", t(0, 0)).is_none(), "unknown sensor ignored");
    let a = schedule::motion(&mut st, &set, &z, "sensor-1", t(0, 0)).expect("on");
    assert_eq!((a.on, a.cause, a.rule), (true, Cause::Motion, Some(3)));
    // More motion at 10:03 extends the quiet period to 10:08.
    schedule::tick(&mut st, &set, &z, t(3, 0));
    assert!(schedule::motion(&mut st, &set, &z, "sensor-1", t(3, 0)).is_none(), "already on");
    assert!(schedule::tick(&mut st, &set, &z, t(7, 59)).is_empty());
    let off = schedule::tick(&mut st, &set, &z, t(8, 0));
    assert_eq!(summary(&off), vec![(t(8, 0).as_second(), false, None)]);
}

#[test]
fn motion_never_switches_off_a_manually_switched_light() {
    let set = motion_set(json!("always"));
    let z = tz("Europe/Berlin");
    let t0 = at("Europe/Berlin", 2025, 5, 6, 10, 0);
    let mut st = RuntimeState { last_eval: Some(t0), ..Default::default() };
    schedule::manual(&mut st, &set, &z, true, t0);
    assert!(schedule::motion(&mut st, &set, &z, "sensor-1", t0).is_none());
    assert!(run_from(&mut st, &set, "Europe/Berlin", at("Europe/Berlin", 2025, 5, 6, 12, 0), 60).is_empty());
}

#[test]
fn motion_respects_window_and_darkness() {
    let z = tz("Europe/Berlin");
    let check = |when: serde_json::Value, h: i8, m: i8, want: bool| {
        let set = motion_set(when.clone());
        let now = at("Europe/Berlin", 2024, 6, 21, h, m);
        let mut st = RuntimeState { last_eval: Some(now), ..Default::default() };
        assert_eq!(schedule::motion(&mut st, &set, &z, "sensor-1", now).is_some(), want, "{when} at {h}:{m:02}");
    };
    let night = json!({"between": {"start": "22:00", "end": "06:00"}});
    check(night.clone(), 23, 0, true);
    check(night.clone(), 5, 59, true);
    check(night.clone(), 6, 0, false);
    check(night, 12, 0, false);
    // Berlin, 21 June 2024: sunrise 04:43, sunset 21:33 CEST.
    check(json!("after_sunset"), 12, 0, false);
    check(json!("after_sunset"), 21, 40, true);
    check(json!("after_sunset"), 3, 0, true);
    check(json!("after_sunset"), 5, 0, false);
}

#[test]
fn long_press_runs_its_action() {
    let set = rules(
        "Europe/Berlin",
        json!([
            {"id": 1, "name": "long", "kind": {"button": {"press": "long", "action": {"on_for": 600}}}},
            {"id": 2, "name": "short", "kind": {"button": {"press": "short", "action": "toggle"}}},
        ]),
    );
    let z = tz("Europe/Berlin");
    let t0 = at("Europe/Berlin", 2025, 5, 6, 10, 0);
    let mut st = RuntimeState { last_eval: Some(t0), ..Default::default() };
    assert!(schedule::button(&mut st, &set, &z, Press::Double, t0).is_none(), "no rule for double");
    let a = schedule::button(&mut st, &set, &z, Press::Long, t0).expect("long press rule");
    assert_eq!((a.on, a.cause, a.rule), (true, Cause::Button, Some(1)));
    let got = run_from(&mut st, &set, "Europe/Berlin", at("Europe/Berlin", 2025, 5, 6, 10, 20), 60);
    assert_eq!(summary(&got), vec![(at("Europe/Berlin", 2025, 5, 6, 10, 10).as_second(), false, None)]);
    let a = schedule::button(&mut st, &set, &z, Press::Short, at("Europe/Berlin", 2025, 5, 6, 10, 21)).expect("toggle");
    assert!(a.on);
}

#[test]
fn runtime_state_survives_a_reboot_through_its_serialized_form() {
    let set = rules("Europe/Berlin", json!([{"id": 1, "name": "30 min", "kind": {"countdown": {"off_after_secs": 1800}}}]));
    let z = tz("Europe/Berlin");
    let t0 = at("Europe/Berlin", 2025, 5, 6, 10, 0);
    let mut st = RuntimeState { last_eval: Some(t0), ..Default::default() };
    schedule::manual(&mut st, &set, &z, true, t0);
    let stored = serde_json::to_vec(&st).expect("serialize");
    // Power cut at 10:10, back at 10:45: the countdown expired meanwhile.
    let mut st: RuntimeState = serde_json::from_slice(&stored).expect("deserialize");
    let a = schedule::boot(&mut st, &set, &z, at("Europe/Berlin", 2025, 5, 6, 10, 45));
    assert_eq!((a.on, a.cause, a.late), (false, Cause::Timer, true));
    // Back at 10:12 instead, with power-on policy "last": on again, and the
    // countdown keeps its 10:30 deadline rather than restarting.
    let mut set_last = set.clone();
    set_last.power_on = hearth_rules::model::PowerOnPolicy::Last;
    let mut st: RuntimeState = serde_json::from_slice(&stored).expect("deserialize");
    let a = schedule::boot(&mut st, &set_last, &z, at("Europe/Berlin", 2025, 5, 6, 10, 12));
    assert_eq!((a.on, a.cause), (true, Cause::PowerOn));
    assert_eq!(st.auto_off_at, Some(at("Europe/Berlin", 2025, 5, 6, 10, 30)));
    assert!(serde_json::from_str::<RuntimeState>(r#"{"relay_on":true,"surprise":1}"#).is_err(), "strict fields");
}

/// Every row of `tests/rules/dst_table.csv` (wall-clock times on DST-change
/// days in twelve zones, resolved by Python's zoneinfo with fold=0, see
/// `tests/rules/gen_dst_table.py`) resolves to the same instant here: gaps
/// shift forward, repeated times take the earlier instant. Includes Lord
/// Howe's 30-minute DST, Chatham's 02:45 change, Dublin's negative DST and
/// changes at midnight (Santiago, Tehran).
#[test]
fn wall_clock_resolution_matches_python_zoneinfo() {
    use hearth_rules::model::TimeSpec;
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/rules/dst_table.csv");
    let text = std::fs::read_to_string(path).expect("fixture tests/rules/dst_table.csv");
    let mut zones = std::collections::HashMap::new();
    let mut rows = 0;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let f: Vec<&str> = line.split(',').collect();
        assert_eq!(f.len(), 4, "bad fixture line {line}");
        let (zone, d, hm, want): (&str, jiff::civil::Date, &str, i64) =
            (f[0], f[1].parse().expect("date"), f[2], f[3].parse().expect("unix"));
        let set = zones.entry(zone).or_insert_with(|| (RuleSet::empty(zone), tz(zone)));
        let clock: ClockTime = hm.parse().expect("clock");
        let got = schedule::resolve(TimeSpec::Clock(clock), d, &set.0, &set.1).expect("clock times always resolve");
        assert_eq!(got.as_second(), want, "{line}");
        rows += 1;
    }
    assert!(rows > 3000, "fixture too small: {rows}");
}

#[test]
fn a_sensors_cross_device_rule_names_its_armed_targets_and_is_not_a_local_rule() {
    let z = tz("Europe/Berlin");
    let target = json!({"device": "plug-1", "key": "BASE64KEY", "lan": "192.168.1.20:8445"});
    let set = rules(
        "Europe/Berlin",
        json!([{"id": 1, "name": "hall", "kind": {"motion": {"sensor": "sensor-1", "off_after_secs": 120,
            "when": {"between": {"start": "18:00", "end": "23:00"}}, "target": target}}}]),
    );
    let evening = at("Europe/Berlin", 2025, 5, 6, 19, 0);
    let got: Vec<(String, u32)> = schedule::motion_targets(&set, &z, evening).into_iter().map(|(t, s)| (t.device.clone(), s)).collect();
    assert_eq!(got, vec![("plug-1".to_owned(), 120)]);
    assert!(schedule::motion_targets(&set, &z, at("Europe/Berlin", 2025, 5, 6, 12, 0)).is_empty(), "outside the window");
    // The sensor does not switch itself for a rule aimed at another device.
    let mut st = RuntimeState { last_eval: Some(evening), ..Default::default() };
    assert!(schedule::motion(&mut st, &set, &z, "sensor-1", evening).is_none());
    // A target without an address is refused when the set is stored.
    let bad = json!([{"id": 1, "name": "x", "kind": {"motion": {"sensor": "s", "off_after_secs": 60, "when": "always",
        "target": {"device": "plug-1", "key": "K", "lan": "no-port"}}}}]);
    let json = serde_json::to_vec(&json!({"version": 0, "timezone": "UTC", "rules": bad})).expect("json");
    assert!(RuleSet::from_json(&json).is_err());
}
