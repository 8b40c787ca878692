//! Energy: history bounds, accounting, standby, events, persistence.

use hearth_rules::energy::{
    cost_milli, pick_latest, EnergyConfig, EnergyEvent, History, LoadProfile, LoadSim, Meter, Price, DAY_SLOTS,
    HISTORY_BYTES, HOUR_SLOTS, MINUTE_SLOTS,
};
use hearth_rules::RuleError;
use jiff::Timestamp;

const T0: i64 = 1_750_000_000; // 2025-06-15T15:06:40Z

fn t(s: i64) -> Timestamp {
    Timestamp::from_second(T0 + s).expect("ts")
}

fn day(s: i64) -> i64 {
    (T0 + s).div_euclid(86_400)
}

/// Run a simulated load for `secs`, sampling every `step` seconds.
fn simulate(meter: &mut Meter, cfg: &EnergyConfig, profile: LoadProfile, secs: i64, step: i64) -> Vec<(i64, EnergyEvent)> {
    let mut sim = LoadSim::new(profile, 7);
    let mut events = Vec::new();
    let mut s = 0;
    while s <= secs {
        let w = sim.watts(true, s as u64);
        for e in meter.sample(cfg, t(s), day(s), w, true) {
            events.push((s, e));
        }
        s += step;
    }
    events
}

#[test]
fn kettle_energy_matches_power_times_time_and_is_priced() {
    let cfg = EnergyConfig { price: Some(Price { per_kwh_milli: 300, currency: "EUR".into() }), ..Default::default() };
    let mut m = Meter::default();
    simulate(&mut m, &cfg, LoadProfile::Kettle { watts: 2200.0, boil_secs: 180 }, 600, 1);
    // 2200 W × 180 s = 110 Wh; the simulator adds ±2 % noise per sample.
    let (mwh, on) = m.total();
    assert!((108_000..=112_000).contains(&mwh), "{mwh} mWh");
    assert_eq!(on, 600, "relay on for the whole run");
    assert_eq!(m.day(day(0)).energy_mwh as u64, mwh, "all of it today");
    // 110 Wh at 0.300 EUR/kWh ≈ 0.033 EUR = 33 thousandths.
    assert_eq!(cost_milli(mwh, cfg.price.as_ref().expect("price")), 33);
    assert_eq!(cost_milli(1_000_000, &Price { per_kwh_milli: 315, currency: "EUR".into() }), 315);
}

#[test]
fn kettle_left_on_is_detected_as_standby() {
    let cfg = EnergyConfig { standby_below_mw: Some(2000), ..Default::default() };
    let mut m = Meter::default();
    let ev = simulate(&mut m, &cfg, LoadProfile::Kettle { watts: 2200.0, boil_secs: 180 }, 600, 5);
    assert_eq!(ev, vec![(240, EnergyEvent::EnteredStandby { since: t(180) })]);
    assert!(m.in_standby());
}

#[test]
fn tv_standby_and_leaving_it() {
    let cfg = EnergyConfig { standby_below_mw: Some(3000), ..Default::default() };
    let mut m = Meter::default();
    let ev = simulate(
        &mut m,
        &cfg,
        LoadProfile::TvStandby { active_watts: 90.0, standby_watts: 0.8, active_secs: 3600 },
        7200,
        10,
    );
    assert_eq!(ev, vec![(3660, EnergyEvent::EnteredStandby { since: t(3600) })]);
    // Switched off: standby ends.
    let ev = m.sample(&cfg, t(7210), day(7210), 0.0, false);
    assert_eq!(ev, vec![EnergyEvent::LeftStandby { at: t(7210) }]);
    // 90 W for 1 h + 0.8 W for 1 h ≈ 90.8 Wh.
    let (mwh, _) = m.total();
    assert!((88_000..=93_000).contains(&mwh), "{mwh}");
}

#[test]
fn long_on_event_fires_once_per_on_period() {
    let cfg = EnergyConfig { long_on_hours: Some(2), ..Default::default() };
    let mut m = Meter::default();
    let ev = simulate(&mut m, &cfg, LoadProfile::Constant { watts: 60.0 }, 5 * 3600, 60);
    assert_eq!(ev, vec![(7260, EnergyEvent::LongOn { since: t(0), hours: 2 })]);
    m.sample(&cfg, t(5 * 3600 + 60), day(0), 0.0, false);
    let mut later = Vec::new();
    for s in (6 * 3600..9 * 3600).step_by(60) {
        later.extend(m.sample(&cfg, t(s), day(s), 60.0, true));
    }
    assert_eq!(later, vec![EnergyEvent::LongOn { since: t(6 * 3600), hours: 2 }]);
}

#[test]
fn gaps_between_samples_are_not_billed() {
    let cfg = EnergyConfig::default();
    let mut m = Meter::default();
    m.sample(&cfg, t(0), day(0), 1000.0, true);
    // The device was off for an hour: nothing is invented for that hour.
    m.sample(&cfg, t(3600), day(3600), 1000.0, true);
    assert_eq!(m.total(), (0, 0));
    m.sample(&cfg, t(3636), day(3636), 1000.0, true);
    assert_eq!(m.total(), (10_000, 36));
}

#[test]
fn history_keeps_24h_of_minutes_90_days_of_hours_and_2_years_of_days() {
    let mut h = History::default();
    assert_eq!((h.minutes.capacity(), h.hours.capacity(), h.days.capacity()), (MINUTE_SLOTS, HOUR_SLOTS, DAY_SLOTS));
    // Three years, one record every 10 minutes: 1 Wh and 600 s each.
    let end = 3 * 365 * 86_400;
    let mut s = 0;
    while s < end {
        h.add(t(s), day(s), 1000, 600);
        s += 600;
    }
    let last = t(end - 600);
    let minute = last.as_second().div_euclid(60);
    let hour = last.as_second().div_euclid(3600);
    assert_eq!(h.minutes.head(), Some(minute));
    assert_eq!(h.minutes.get(minute).map(|x| x.energy_mwh), Some(1000));
    assert_eq!(h.minutes.get(minute - 1).map(|x| x.energy_mwh), Some(0), "no record that minute");
    assert!(h.minutes.get(minute - MINUTE_SLOTS as i64).is_none(), "older than 24 h is gone");
    assert_eq!(h.hours.get(hour - 1).map(|x| (x.energy_mwh, x.on_secs)), Some((6000, 3600)));
    assert!(h.hours.get(hour - HOUR_SLOTS as i64).is_none());
    let d = day(end - 600);
    assert_eq!(h.days.get(d - 1).map(|x| (x.energy_mwh, x.on_secs)), Some((144_000, 86_400)));
    assert!(h.days.get(d - DAY_SLOTS as i64).is_none());
    assert_eq!(h.total_mwh, (end / 600) as u64 * 1000, "lifetime total keeps everything");
    // A record older than a ring is dropped there but still counts in the total.
    h.add(t(0), day(0), 5, 0);
    assert_eq!(h.total_mwh, (end / 600) as u64 * 1000 + 5);
}

#[test]
fn history_round_trips_and_damage_is_detected() {
    let mut h = History::default();
    for s in (0..200_000).step_by(30) {
        h.add(t(s), day(s), 250, 30);
    }
    let img = h.to_bytes(41);
    assert_eq!(img.len(), HISTORY_BYTES);
    assert_eq!(History::from_bytes(&img), Ok((h.clone(), 41)));
    let check = |bytes: &[u8], want: &str| {
        assert_eq!(History::from_bytes(bytes).map(|_| ()), Err(RuleError::CorruptHistory(match want {
            "len" => "wrong length",
            _ => "checksum mismatch",
        })));
    };
    check(&img[..img.len() - 1], "len");
    check(&[], "len");
    let mut flipped = img.clone();
    flipped[20_000] ^= 0x01;
    check(&flipped, "crc");
    // A/B copies: a torn newer copy falls back to the older valid one.
    let older = h.to_bytes(40);
    let mut torn = h.to_bytes(42);
    torn[HISTORY_BYTES / 2..].fill(0);
    assert_eq!(pick_latest(Some(&older), Some(&torn)).map(|x| x.1), Some(40));
    assert_eq!(pick_latest(Some(&older), Some(&img)).map(|x| x.1), Some(41));
    assert_eq!(pick_latest(Some(&img), Some(&older)).map(|x| x.1), Some(41));
    assert!(pick_latest(None, Some(&torn)).is_none());
}

#[test]
fn energy_config_validation() {
    let check = |c: EnergyConfig, ok: bool| {
        let mut set = hearth_rules::model::RuleSet::empty("UTC");
        set.energy = c.clone();
        assert_eq!(set.validate().is_ok(), ok, "{c:?}");
    };
    check(EnergyConfig { standby_below_mw: Some(5000), long_on_hours: Some(4), price: None }, true);
    check(EnergyConfig { standby_below_mw: Some(200_000), ..Default::default() }, false);
    check(EnergyConfig { long_on_hours: Some(0), ..Default::default() }, false);
    check(EnergyConfig { price: Some(Price { per_kwh_milli: 300, currency: "eur".into() }), ..Default::default() }, false);
    check(EnergyConfig { price: Some(Price { per_kwh_milli: 300, currency: "EURO".into() }), ..Default::default() }, false);
}

/// History queries (issue 5: "per-minute for the last 24 h, hourly for 90
/// days, daily for 2 years"), with injected time: each resolution answers
/// from its own ring, clamped to what it covers, oldest first, gaps zero.
#[test]
fn series_answer_each_span_from_its_ring_and_stay_bounded() {
    use hearth_rules::energy::Resolution;
    assert_eq!(Resolution::for_span(3600), Resolution::Minute);
    assert_eq!(Resolution::for_span(24 * 3600), Resolution::Minute);
    assert_eq!(Resolution::for_span(24 * 3600 + 1), Resolution::Hour);
    assert_eq!(Resolution::for_span(90 * 86_400), Resolution::Hour);
    assert_eq!(Resolution::for_span(91 * 86_400), Resolution::Day);

    let mut h = History::default();
    // 1 Wh in each of three minutes, a silent minute, then 2 Wh.
    for (s, mwh) in [(0, 1000), (60, 1000), (120, 1000), (240, 2000)] {
        h.add(t(s), day(s), mwh, 30);
    }
    let now = t(240);
    let minute = Resolution::Minute.bucket(now, day(240));
    let s = h.series(Resolution::Minute, minute - 4, minute);
    assert_eq!(s.first, minute - 4);
    assert_eq!(s.slots.iter().map(|x| x.energy_mwh).collect::<Vec<_>>(), vec![1000, 1000, 1000, 0, 2000]);
    // Asking for more than 24 h of minutes gets exactly the ring's 1440.
    let s = h.series(Resolution::Minute, minute - 100_000, minute);
    assert_eq!((s.slots.len(), s.first), (MINUTE_SLOTS, minute - MINUTE_SLOTS as i64 + 1));
    assert_eq!(s.slots.iter().map(|x| u64::from(x.energy_mwh)).sum::<u64>(), 5000);
    // Hours and days see the same energy in one bucket.
    let hour = Resolution::Hour.bucket(now, day(240));
    let s = h.series(Resolution::Hour, hour - 1, hour);
    assert_eq!(s.slots.iter().map(|x| x.energy_mwh).sum::<u32>(), 5000);
    let s = h.series(Resolution::Day, day(240) - 729, day(240));
    assert_eq!((s.slots.len(), s.slots.last().map(|x| x.energy_mwh)), (DAY_SLOTS, Some(5000)));
    // A range after the newest bucket, or reversed, is empty or zero, never a panic.
    assert!(h.series(Resolution::Hour, hour + 5, hour + 1).slots.is_empty());
    assert_eq!(h.series(Resolution::Hour, hour + 1, hour + 2).slots, vec![Default::default(); 2]);
    // Two days later the minute ring has rolled over completely.
    h.add(t(2 * 86_400), day(2 * 86_400), 7, 1);
    let m2 = Resolution::Minute.bucket(t(2 * 86_400), 0);
    let s = h.series(Resolution::Minute, m2 - 3000, m2);
    assert_eq!(s.slots.iter().map(|x| u64::from(x.energy_mwh)).sum::<u64>(), 7);
    assert_eq!(h.series(Resolution::Day, day(0), day(2 * 86_400)).slots.iter().map(|x| x.energy_mwh).collect::<Vec<_>>(), vec![5000, 0, 7]);
}
