//! Rule model: strict parsing, bounds, atomic versioned edits.

use hearth_rules::model::{ClockTime, Edit, Rule, RuleKind, RuleSet, MAX_JSON_LEN, MAX_RULES};
use hearth_rules::RuleError;
use serde_json::{json, Value};

fn base(rules: Value) -> Value {
    json!({"version": 3, "timezone": "Europe/Berlin", "location": {"lat": 52.52, "lon": 13.405}, "rules": rules})
}

/// Parse `input`; `expected` is `Ok(())` or the error's message prefix.
fn check(input: Value, expected: Result<(), &str>) {
    let got = RuleSet::from_json(input.to_string().as_bytes());
    match (expected, &got) {
        (Ok(()), Ok(set)) => {
            // Round trip: what the device stores parses back to the same set.
            assert_eq!(&RuleSet::from_json(&set.to_json()).expect("round trip"), set);
        }
        (Err(want), Err(e)) => assert!(e.to_string().starts_with(want), "want {want:?}, got {e}"),
        (want, got) => panic!("input {input}\nwant {want:?}\ngot {got:?}"),
    }
}

fn sched(id: u32, at: Value) -> Value {
    json!({"id": id, "name": "r", "kind": {"schedule": {"days": ["mon"], "at": at, "action": "on"}}})
}

#[test]
fn rule_sets_parse_strictly() {
    check(base(json!([])), Ok(()));
    check(
        base(json!([
            sched(1, json!({"clock": "07:30"})),
            {"id": 2, "name": "porch", "enabled": false, "kind": {"schedule": {"days": ["sat","sun"], "at": {"sunset": -20}, "action": {"on_until": {"clock": "23:00"}}}}},
            {"id": 3, "name": "cd", "kind": {"countdown": {"off_after_secs": 1800}}},
            {"id": 4, "name": "away", "kind": {"away": {"days": ["mon"], "start": {"sunset": 0}, "end": {"clock": "23:30"}, "min_on_mins": 30, "max_on_mins": 60, "seed": 1}}},
            {"id": 5, "name": "hall", "kind": {"motion": {"sensor": "dev-1", "off_after_secs": 120, "when": "after_sunset"}}},
            {"id": 6, "name": "btn", "kind": {"button": {"press": "long", "action": "toggle"}}},
        ])),
        Ok(()),
    );
    // Unknown fields anywhere are refused, not ignored.
    let mut v = base(json!([]));
    v["colour"] = json!("red");
    check(v, Err("rule set does not parse: unknown field `colour`"));
    check(
        base(json!([{"id": 1, "name": "r", "kind": {"countdown": {"off_after_secs": 60, "extra": 1}}}])),
        Err("rule set does not parse: unknown field `extra`"),
    );
    check(base(json!([{"id": 1, "name": "r", "kind": {"teleport": {}}}])), Err("rule set does not parse: unknown variant"));
    // Values.
    check(base(json!([sched(1, json!({"clock": "24:00"}))])), Err("rule set does not parse: \"24:00\" is not a time of day"));
    check(base(json!([sched(1, json!({"clock": "7:30"}))])), Err("rule set does not parse: \"7:30\" is not a time of day"));
    check(base(json!([sched(1, json!({"sunrise": 181}))])), Err("rule 1 at: sun offset 181 min"));
    check(
        base(json!([{"id": 1, "name": "r", "kind": {"schedule": {"days": [], "at": {"clock": "07:00"}, "action": "on"}}}])),
        Err("rule set does not parse: days must name at least one weekday"),
    );
    check(base(json!([sched(1, json!({"clock": "07:00"})), sched(1, json!({"clock": "08:00"}))])), Err("rule id 1 is used twice"));
    check(
        base(json!([{"id": 4, "name": "away", "kind": {"away": {"days": ["mon"], "start": {"clock": "18:00"}, "end": {"clock": "23:30"}, "min_on_mins": 20, "max_on_mins": 60, "seed": 1}}}])),
        Err("rule 4 min_on_mins: must be at least 30"),
    );
    check(
        base(json!([{"id": 5, "name": "m", "kind": {"motion": {"sensor": "d", "off_after_secs": 5, "when": "always"}}}])),
        Err("rule 5 off_after_secs"),
    );
    let mut no_loc = base(json!([sched(1, json!({"sunset": 0}))]));
    no_loc.as_object_mut().expect("object").remove("location");
    check(no_loc, Err("rule 1 at: sunrise/sunset needs the device location"));
    let mut bad_loc = base(json!([]));
    bad_loc["location"]["lat"] = json!(91.0);
    check(bad_loc, Err("location.lat"));
}

#[test]
fn rule_sets_are_bounded() {
    let many: Vec<Value> = (0..=MAX_RULES as u32).map(|i| sched(i, json!({"clock": "07:00"}))).collect();
    check(base(Value::Array(many)), Err("65 rules, more than the limit of 64"));
    let long = "x".repeat(65);
    check(
        base(json!([{"id": 1, "name": long, "kind": {"countdown": {"off_after_secs": 60}}}])),
        Err("rule 1 name is 65 bytes, more than the limit of 64"),
    );
    let mut big = base(json!([]));
    big["timezone"] = json!("y".repeat(MAX_JSON_LEN));
    check(big, Err("rule set is"));
    let huge = vec![b' '; MAX_JSON_LEN + 1];
    assert!(matches!(RuleSet::from_json(&huge), Err(RuleError::TooLarge { .. })));
}

fn rule(id: u32, name: &str) -> Rule {
    use hearth_rules::model::{Button, ButtonAction, Press};
    Rule { id, name: name.into(), enabled: true, kind: RuleKind::Button(Button { press: Press::Long, action: ButtonAction::Toggle }) }
}

fn countdown(id: u32) -> Rule {
    Rule {
        id,
        name: "cd".into(),
        enabled: true,
        kind: RuleKind::Countdown(hearth_rules::model::Countdown { off_after_secs: 60 }),
    }
}

#[test]
fn edits_are_atomic_and_versioned() {
    let v0 = RuleSet::empty("Europe/Berlin");
    let v1 = v0.apply(0, &[Edit::Add(countdown(1)), Edit::SetTimezone("Europe/Paris".into())]).expect("edit");
    assert_eq!((v1.version, v1.rules.len(), v1.timezone.as_str()), (1, 1, "Europe/Paris"));
    assert_eq!(v0.version, 0, "the old set is untouched");
    // An edit based on a stale version is refused.
    assert_eq!(v1.apply(0, &[Edit::Remove(1)]), Err(RuleError::VersionConflict { expected: 0, actual: 1 }));
    // One bad edit in a batch: nothing of the batch applies.
    let bad = v1.apply(1, &[Edit::Add(rule(2, "b")), Edit::Remove(99)]);
    assert_eq!(bad, Err(RuleError::UnknownRule(99)));
    let bad = v1.apply(1, &[Edit::Add(rule(2, "b")), Edit::Add(rule(3, &"n".repeat(100)))]);
    assert!(matches!(bad, Err(RuleError::StringTooLong { .. })));
    // Two countdowns are refused after the batch is assembled.
    assert!(matches!(v1.apply(1, &[Edit::Add(countdown(2))]), Err(RuleError::OutOfRange { .. })));
    let v2 = v1
        .apply(1, &[Edit::SetEnabled { id: 1, enabled: false }, Edit::Replace(rule(1, "renamed"))])
        .expect("edit");
    assert_eq!((v2.version, v2.rules[0].name.as_str()), (2, "renamed"));
    // Whole-set replacement must be exactly the next version.
    let mut next = v2.clone();
    next.version = 4;
    assert!(matches!(v2.replace(next.clone()), Err(RuleError::VersionConflict { .. })));
    next.version = 3;
    assert_eq!(v2.replace(next).map(|s| s.version), Ok(3));
    // Edits travel as JSON too.
    let e: Vec<Edit> = serde_json::from_value(json!([{"remove": 1}, {"set_power_on": "last"}])).expect("edits");
    let v3 = v2.apply(2, &e).expect("edit");
    assert!(v3.rules.is_empty());
}

#[test]
fn unknown_time_zone_is_reported() {
    assert_eq!(RuleSet::empty("Mars/Olympus").time_zone().map(|_| ()), Err(RuleError::UnknownTimeZone("Mars/Olympus".into())));
    assert!(RuleSet::empty("Europe/Berlin").time_zone().is_ok());
}

#[test]
fn clock_time_text_form() {
    for (s, ok) in [("00:00", true), ("23:59", true), ("12:60", false), ("1:00", false), ("ab:cd", false), ("", false)] {
        assert_eq!(s.parse::<ClockTime>().is_ok(), ok, "{s}");
    }
    assert_eq!(ClockTime::new(7, 5).expect("time").to_string(), "07:05");
}
