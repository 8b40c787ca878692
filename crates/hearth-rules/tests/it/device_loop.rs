//! The pieces wired together the way the device will drive them: a
//! one-second loop feeding the scheduler, the interlock and the meter from
//! a simulated load. This is the integration recipe in executable form.

use hearth_rules::energy::{EnergyConfig, LoadProfile, LoadSim, Meter};
use hearth_rules::model::RuleSet;
use hearth_rules::safety::{Interlock, Refusal, SafetyEvent, Source, Verdict};
use hearth_rules::schedule::{self, RuntimeState};
use jiff::Timestamp;
use serde_json::json;

use crate::at;

/// A minimal device: rules + runtime state + interlock + meter + load.
struct Device {
    rules: RuleSet,
    tz: jiff::tz::TimeZone,
    state: RuntimeState,
    interlock: Interlock,
    meter: Meter,
    load: LoadSim,
    on_at: Option<Timestamp>,
    refusals: Vec<Refusal>,
    switches: usize,
    safety: Vec<SafetyEvent>,
}

impl Device {
    fn new(rules: RuleSet, load: LoadProfile, start: Timestamp) -> Self {
        let tz = rules.time_zone().expect("zone");
        let interlock = Interlock::new(rules.interlocks.clone(), 3680);
        Device {
            rules,
            tz,
            state: RuntimeState { last_eval: Some(start), ..Default::default() },
            interlock,
            meter: Meter::default(),
            load: LoadSim::new(load, 1),
            on_at: None,
            refusals: Vec::new(),
            switches: 0,
            safety: Vec::new(),
        }
    }

    /// Every relay change goes through the interlock; the verdict is fed back.
    fn switch(&mut self, on: bool, source: Source, now: Timestamp) {
        match self.interlock.request(on, source, now) {
            Ok(Verdict::Switch(s)) => {
                self.switches += 1;
                self.on_at = s.then_some(now);
            }
            Ok(Verdict::Unchanged) => {}
            Err(r) => self.refusals.push(r),
        }
        self.state.observed(self.interlock.relay_on());
    }

    fn second(&mut self, now: Timestamp) {
        for a in schedule::tick(&mut self.state, &self.rules, &self.tz, now) {
            self.switch(a.on, Source::Rule, now);
        }
        let on = self.interlock.relay_on();
        let secs_on = self.on_at.map_or(0, |t| (now.as_second() - t.as_second()) as u64);
        let w = self.load.watts(on, secs_on);
        let obs = self.interlock.observe(now, Some(w));
        if let Some(s) = obs.switch {
            self.on_at = s.then_some(now);
            self.state.observed(s);
        }
        self.safety.extend(obs.events);
        let day = hearth_rules::energy::local_day(now, &self.tz);
        self.meter.sample(&EnergyConfig::default(), now, day, w, on);
    }
}

#[test]
fn a_heater_over_its_limit_is_cut_off_and_a_schedule_cannot_force_it_back() {
    let v = json!({"version": 1, "timezone": "Europe/Berlin",
        "interlocks": {"max_toggles_per_min": 4, "over_power": {"limit_w": 1500, "for_secs": 3, "retry_after_secs": 600, "max_retries": 0}},
        "rules": [
            {"id": 1, "name": "heater on", "kind": {"schedule": {"days": ["mon","tue","wed","thu","fri","sat","sun"], "at": {"clock": "06:00"}, "action": "on"}}},
            {"id": 2, "name": "heater on again", "kind": {"schedule": {"days": ["mon","tue","wed","thu","fri","sat","sun"], "at": {"clock": "06:05"}, "action": "on"}}},
        ]});
    let rules = RuleSet::from_json(v.to_string().as_bytes()).expect("rules");
    let start = at("Europe/Berlin", 2025, 1, 15, 5, 59);
    let mut dev = Device::new(rules, LoadProfile::Constant { watts: 2000.0 }, start);
    for s in 1..=600 {
        dev.second(Timestamp::from_second(start.as_second() + s).expect("ts"));
    }
    // On at 06:00, cut off after 3 s over 1500 W, latched (no retries).
    assert!(matches!(dev.safety[..], [SafetyEvent::OverPower { latched: true, .. }]), "{:?}", dev.safety);
    assert!(!dev.interlock.relay_on());
    // The 06:05 schedule was refused, and so is a remote command.
    assert_eq!(dev.refusals, vec![Refusal::Latched]);
    dev.switch(true, Source::Remote, at("Europe/Berlin", 2025, 1, 15, 6, 10));
    assert_eq!(dev.refusals.last(), Some(&Refusal::Latched));
    // About 3 s of 2 kW were drawn before the cut-off.
    let (mwh, on_secs) = dev.meter.total();
    assert!((1500..=2300).contains(&mwh), "{mwh} mWh");
    assert!(on_secs <= 4);
}

#[test]
fn remote_flood_through_the_whole_stack_stays_within_the_limit() {
    let v = json!({"version": 1, "timezone": "Europe/Berlin", "interlocks": {"max_toggles_per_min": 6}, "rules": []});
    let rules = RuleSet::from_json(v.to_string().as_bytes()).expect("rules");
    let start = at("Europe/Berlin", 2025, 1, 15, 12, 0);
    let mut dev = Device::new(rules, LoadProfile::Constant { watts: 40.0 }, start);
    for s in 1..=300 {
        let now = Timestamp::from_second(start.as_second() + s).expect("ts");
        // Fifty alternating commands a second from a compromised controller.
        for i in 0..50 {
            dev.switch(i % 2 == 0, Source::Remote, now);
        }
        dev.second(now);
    }
    // Five minutes at six switches per minute; every other change refused
    // with the rate-limit reason. Half the commands ask for the state the
    // relay already has (unchanged, not refused); in the five seconds where
    // the window reopens, the first six commands switch in a row, which
    // leaves three fewer refusals in each of them.
    assert_eq!(dev.switches, 30);
    assert!(dev.refusals.iter().all(|r| matches!(r, Refusal::RateLimited { max: 6, .. })));
    assert_eq!(dev.refusals.len(), 300 * 25 - 5 * 3);
}
