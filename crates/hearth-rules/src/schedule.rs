//! The scheduler: which relay actions are due, exactly once.
//!
//! The device calls [`tick`] every few seconds with the current instant. The
//! state it persists ([`RuntimeState`]) holds the last instant it evaluated;
//! each call handles the half-open interval `(last_eval, now]`, so every
//! scheduled occurrence falls into exactly one call however the ticks are
//! spaced. The semantics below are ADR 0005's; tests pin each of them.
//!
//! * **Offline / powered off.** If the gap since the last evaluation is larger
//!   than [`LATE_TOLERANCE_SECS`], the device was not running at those times.
//!   Missed toggles are not replayed: only the latest missed state-setting
//!   action within [`CATCH_UP_HORIZON_SECS`] is applied (flagged `late`), so
//!   a lamp scheduled on 18:00 and off 23:00 that was unplugged from 17:00 to
//!   07:00 boots to "off", without flashing on and off. An older missed
//!   action is stale and dropped; then the power-on policy decides.
//! * **DST, spring forward.** A wall-clock time inside the gap (02:30 on the
//!   day Europe jumps from 02:00 to 03:00) runs once, shifted forward by the
//!   gap length (03:30 local) — RFC 5545's rule, and jiff's "compatible"
//!   disambiguation.
//! * **DST, fall back.** A wall-clock time that occurs twice (01:30 on the
//!   day New York repeats 01:00–02:00) runs once, at the earlier instant.
//!   Occurrences are generated per (rule, local date), so it cannot run twice.
//! * **Clock jumps backwards** (NTP correction): nothing is due and
//!   `last_eval` stays where it was, so nothing runs twice.
//! * **Sun-relative times on polar dates** (no sunrise) do not run that day.

use jiff::civil::Date;
use jiff::tz::TimeZone;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::model::{Away, ButtonAction, ClockTime, Press, RuleKind, RuleSet, ScheduleAction, TimeSpec};
use crate::rng::SplitMix64;
use crate::sun::{self, DayLight};

/// Gap between two evaluations still treated as "the device was running"
/// (tick jitter, a slow flash write). Larger gaps are outages.
pub const LATE_TOLERANCE_SECS: i64 = 120;
/// How far back an outage catch-up looks; older missed actions are stale.
pub const CATCH_UP_HORIZON_SECS: i64 = 24 * 3600;

/// Why the relay is being switched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// A schedule's start (on/off/on-until).
    Schedule,
    /// The end of an "on until" schedule.
    ScheduleEnd,
    /// Away mode.
    Away,
    /// Countdown auto-off, "on until 23:00", or a button's "on for".
    Timer,
    /// Motion, or the quiet period after it.
    Motion,
    /// A button rule.
    Button,
    /// The owner: the device's own switch or an authorized remote command.
    Manual,
    /// The power-on policy at boot.
    PowerOn,
}

/// One relay action the device should perform (through the interlocks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DueAction {
    /// When it was due (may be earlier than now).
    pub at: Timestamp,
    /// Desired relay state.
    pub on: bool,
    /// Why.
    pub cause: Cause,
    /// The rule, if a rule caused it.
    pub rule: Option<u32>,
    /// Applied after an outage instead of at its time.
    pub late: bool,
}

/// What the device persists between ticks and across reboots.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeState {
    /// End of the last evaluated interval; `None` before the first tick.
    pub last_eval: Option<Timestamp>,
    /// The relay state the device last reported (see [`RuntimeState::observed`]).
    pub relay_on: bool,
    /// Pending auto-off (countdown, "on until", button "on for").
    pub auto_off_at: Option<Timestamp>,
    /// Pending off after the motion quiet period; `Some` only while motion
    /// holds the relay on.
    pub motion_off_at: Option<Timestamp>,
    /// Away mode is suppressed until this instant (next local midnight after
    /// a manual switch).
    pub away_suppressed_until: Option<Timestamp>,
}

impl RuntimeState {
    /// Record the relay state the device actually has after the interlocks
    /// ruled. A refused "on" leaves the relay off, and timers that assumed it
    /// went on are dropped.
    pub fn observed(&mut self, on: bool) {
        self.relay_on = on;
        if !on {
            self.auto_off_at = None;
            self.motion_off_at = None;
        }
    }
}

fn secs(t: Timestamp, s: i64) -> Timestamp {
    Timestamp::from_second(t.as_second().saturating_add(s)).unwrap_or(t)
}

fn local_date(t: Timestamp, tz: &TimeZone) -> Date {
    t.to_zoned_datetime(tz.clone()).date()
}

/// A wall-clock time on a date → instant (gap: shifted forward; fold: earlier).
fn clock_instant(date: Date, c: ClockTime, tz: &TimeZone) -> Option<Timestamp> {
    let dt = date.at(c.hour() as i8, c.minute() as i8, 0, 0);
    tz.to_ambiguous_timestamp(dt).compatible().ok()
}

/// Resolve a [`TimeSpec`] on a local date; `None` for sun times on polar days
/// or when the set has no location.
pub fn resolve(spec: TimeSpec, date: Date, rules: &RuleSet, tz: &TimeZone) -> Option<Timestamp> {
    match spec {
        TimeSpec::Clock(c) => clock_instant(date, c, tz),
        TimeSpec::Sunrise(off) | TimeSpec::Sunset(off) => {
            let loc = rules.location?;
            match sun::day_light(loc, date, tz) {
                DayLight::Normal { sunrise, sunset } => {
                    let base = if matches!(spec, TimeSpec::Sunrise(_)) { sunrise } else { sunset };
                    Some(secs(base, i64::from(off) * 60))
                }
                DayLight::AlwaysUp | DayLight::AlwaysDown => None,
            }
        }
    }
}

/// The on-periods away mode plans for the window starting on `date`.
///
/// A pure function of (rule seed, date): a rebooted device recomputes the
/// same plan. Every period lasts at least `min_on_mins` (a period the window
/// would cut short is dropped rather than shortened).
pub fn away_plan(a: &Away, date: Date, rules: &RuleSet, tz: &TimeZone) -> Vec<(Timestamp, Timestamp)> {
    let mut plan = Vec::new();
    if !a.days.contains(date.weekday()) {
        return plan;
    }
    let Some(start) = resolve(a.start, date, rules, tz) else { return plan };
    let Some(mut end) = resolve(a.end, date, rules, tz) else { return plan };
    if end <= start {
        match date.tomorrow().ok().and_then(|d| resolve(a.end, d, rules, tz)) {
            Some(e) => end = e,
            None => return plan,
        }
    }
    let day = sun::days_from_civil(date) as u64;
    let mut rng = SplitMix64::new(a.seed ^ day.wrapping_mul(0xD1B5_4A32_D192_ED03));
    let min_on = i64::from(a.min_on_mins) * 60;
    let mut cursor = secs(start, i64::from(rng.range(0, 30)) * 60);
    // At most one period per min_on, so the loop is bounded by the window.
    while cursor < end {
        let len = i64::from(rng.range(u32::from(a.min_on_mins), u32::from(a.max_on_mins))) * 60;
        let off = secs(cursor, len).min(end);
        if off.as_second() - cursor.as_second() < min_on {
            break;
        }
        plan.push((cursor, off));
        cursor = secs(off, i64::from(rng.range(10, 60)) * 60);
    }
    plan
}

/// Every scheduled (schedule and away) action with `from < at <= to`,
/// sorted by time, then rule id.
pub fn occurrences(rules: &RuleSet, tz: &TimeZone, from: Timestamp, to: Timestamp) -> Vec<DueAction> {
    let mut out = Vec::new();
    if to <= from {
        return out;
    }
    let push = |out: &mut Vec<DueAction>, at: Option<Timestamp>, on: bool, cause: Cause, rule: u32| {
        if let Some(at) = at {
            if from < at && at <= to {
                out.push(DueAction { at, on, cause, rule: Some(rule), late: false });
            }
        }
    };
    // One day of margin each side: sun offsets, "until" on the next day and
    // away windows past midnight all stay within it.
    let (Ok(first), Ok(last)) = (local_date(from, tz).yesterday(), local_date(to, tz).tomorrow()) else {
        return out;
    };
    let mut date = first;
    while date <= last {
        for r in rules.rules.iter().filter(|r| r.enabled) {
            match &r.kind {
                RuleKind::Schedule(s) if s.days.contains(date.weekday()) => {
                    let start = resolve(s.at, date, rules, tz);
                    match s.action {
                        ScheduleAction::On => push(&mut out, start, true, Cause::Schedule, r.id),
                        ScheduleAction::Off => push(&mut out, start, false, Cause::Schedule, r.id),
                        ScheduleAction::OnUntil(until) => {
                            push(&mut out, start, true, Cause::Schedule, r.id);
                            if let Some(st) = start {
                                let mut end = resolve(until, date, rules, tz);
                                if end.is_some_and(|e| e <= st) {
                                    end = date.tomorrow().ok().and_then(|d| resolve(until, d, rules, tz));
                                }
                                push(&mut out, end, false, Cause::ScheduleEnd, r.id);
                            }
                        }
                    }
                }
                RuleKind::Away(a) => {
                    for (on, off) in away_plan(a, date, rules, tz) {
                        push(&mut out, Some(on), true, Cause::Away, r.id);
                        push(&mut out, Some(off), false, Cause::Away, r.id);
                    }
                }
                _ => {}
            }
        }
        match date.tomorrow() {
            Ok(d) => date = d,
            Err(_) => break,
        }
    }
    out.sort_by_key(|a| (a.at, a.rule, a.on));
    out
}

fn countdown_secs(rules: &RuleSet) -> Option<i64> {
    rules.rules.iter().filter(|r| r.enabled).find_map(|r| match &r.kind {
        RuleKind::Countdown(c) => Some(i64::from(c.off_after_secs)),
        _ => None,
    })
}

/// Bookkeeping after deciding to switch: timers follow the relay.
fn note_switch(state: &mut RuntimeState, rules: &RuleSet, on: bool, at: Timestamp) {
    if on && !state.relay_on {
        state.auto_off_at = countdown_secs(rules).map(|s| secs(at, s));
    }
    if !on {
        state.auto_off_at = None;
        state.motion_off_at = None;
    }
    state.relay_on = on;
}

fn next_local_midnight(now: Timestamp, tz: &TimeZone) -> Option<Timestamp> {
    let tomorrow = local_date(now, tz).tomorrow().ok()?;
    tz.to_ambiguous_timestamp(tomorrow.at(0, 0, 0, 0)).compatible().ok()
}

/// Evaluate `(state.last_eval, now]`: the actions due, exactly once.
///
/// With a normal tick interval every due action is returned in order. After
/// an outage (gap > [`LATE_TOLERANCE_SECS`]) at most one action is returned:
/// the latest missed one within [`CATCH_UP_HORIZON_SECS`], marked `late`.
pub fn tick(state: &mut RuntimeState, rules: &RuleSet, tz: &TimeZone, now: Timestamp) -> Vec<DueAction> {
    let Some(last) = state.last_eval else {
        // First evaluation ever: there is no "missed" past to replay.
        state.last_eval = Some(now);
        return Vec::new();
    };
    if now <= last {
        return Vec::new();
    }
    let gap = now.as_second() - last.as_second();
    let outage = gap > LATE_TOLERANCE_SECS;
    let from = if outage { last.max(secs(now, -CATCH_UP_HORIZON_SECS)) } else { last };
    let suppressed = state.away_suppressed_until;
    let mut due: Vec<DueAction> = occurrences(rules, tz, from, now)
        .into_iter()
        .filter(|a| !(a.cause == Cause::Away && suppressed.is_some_and(|s| a.at < s)))
        .collect();
    if let Some(t) = state.auto_off_at.filter(|t| *t <= now) {
        due.push(DueAction { at: t, on: false, cause: Cause::Timer, rule: None, late: false });
    }
    if let Some(t) = state.motion_off_at.filter(|t| *t <= now) {
        due.push(DueAction { at: t, on: false, cause: Cause::Motion, rule: None, late: false });
    }
    due.sort_by_key(|a| a.at);
    if outage {
        due = due.pop().map(|mut a| {
            a.late = true;
            vec![a]
        }).unwrap_or_default();
    }
    // Timers fire once: a fired timer is cleared even if an earlier action
    // in this batch already switched off.
    if state.auto_off_at.is_some_and(|t| t <= now) {
        state.auto_off_at = None;
    }
    if state.motion_off_at.is_some_and(|t| t <= now) {
        state.motion_off_at = None;
    }
    for a in &due {
        note_switch(state, rules, a.on, a.at);
    }
    if state.away_suppressed_until.is_some_and(|s| s <= now) {
        state.away_suppressed_until = None;
    }
    state.last_eval = Some(now);
    due
}

/// At boot: the power-on policy, overridden by a missed scheduled action.
///
/// Returns the one action that sets the relay's initial state.
pub fn boot(state: &mut RuntimeState, rules: &RuleSet, tz: &TimeZone, now: Timestamp) -> DueAction {
    use crate::model::PowerOnPolicy;
    let before = state.relay_on;
    let on = match rules.power_on {
        PowerOnPolicy::Off => false,
        PowerOnPolicy::On => true,
        PowerOnPolicy::Last => before,
    };
    // The relay is physically off at power-up. Missed actions first: timers
    // from before the cut that expired meanwhile count as missed (an
    // expired countdown means "off"), and must be seen before the policy
    // would clear them.
    state.relay_on = false;
    let caught_up = tick(state, rules, tz, now);
    if let Some(last) = caught_up.last() {
        return *last;
    }
    // Nothing missed: the policy decides. A countdown still running from
    // before the cut keeps its deadline rather than restarting.
    let pending = state.auto_off_at;
    note_switch(state, rules, on, now);
    if on && pending.is_some() {
        state.auto_off_at = pending;
    }
    DueAction { at: now, on, cause: Cause::PowerOn, rule: None, late: false }
}

/// The owner switched the relay (the device's own switch or an authorized
/// remote command). Away mode stops for the rest of the local day.
pub fn manual(state: &mut RuntimeState, rules: &RuleSet, tz: &TimeZone, on: bool, now: Timestamp) -> DueAction {
    state.away_suppressed_until = next_local_midnight(now, tz);
    // A manual switch takes the lamp away from the motion rule.
    state.motion_off_at = None;
    note_switch(state, rules, on, now);
    DueAction { at: now, on, cause: Cause::Manual, rule: None, late: false }
}

/// "On until 23:00": switch on now and off at the next 23:00 local.
pub fn on_until(state: &mut RuntimeState, rules: &RuleSet, tz: &TimeZone, until: ClockTime, now: Timestamp) -> DueAction {
    let action = manual(state, rules, tz, true, now);
    let today = local_date(now, tz);
    let mut off = clock_instant(today, until, tz);
    if off.is_none_or(|t| t <= now) {
        off = today.tomorrow().ok().and_then(|d| clock_instant(d, until, tz));
    }
    state.auto_off_at = off;
    action
}

/// Whether a motion rule's time condition holds at `now`.
fn motion_armed(when: crate::model::MotionWhen, rules: &RuleSet, tz: &TimeZone, now: Timestamp) -> bool {
    use crate::model::MotionWhen;
    match when {
        MotionWhen::Always => true,
        MotionWhen::Between { start, end } => {
            let t = now.to_zoned_datetime(tz.clone()).time();
            let m = (t.hour() as u16) * 60 + t.minute() as u16;
            if start <= end {
                start.minutes() <= m && m < end.minutes()
            } else {
                m >= start.minutes() || m < end.minutes()
            }
        }
        MotionWhen::AfterSunset => rules.location.is_some_and(|l| sun::is_dark(l, tz, now)),
    }
}

/// Motion reported by `sensor` (already authenticated through its grant).
///
/// Switches on if a matching, armed rule exists and the relay is off, and
/// (re)starts the quiet timer. A relay the owner switched on by hand is left
/// alone: motion never switches off what a person switched on.
pub fn motion(state: &mut RuntimeState, rules: &RuleSet, tz: &TimeZone, sensor: &str, now: Timestamp) -> Option<DueAction> {
    let rule = rules.rules.iter().filter(|r| r.enabled).find_map(|r| match &r.kind {
        RuleKind::Motion(m) if m.sensor == sensor && m.target.is_none() && motion_armed(m.when, rules, tz, now) => Some((r.id, m.off_after_secs)),
        _ => None,
    })?;
    let quiet_end = secs(now, i64::from(rule.1));
    if state.relay_on {
        if state.motion_off_at.is_some() {
            state.motion_off_at = Some(quiet_end);
        }
        return None;
    }
    note_switch(state, rules, true, now);
    state.motion_off_at = Some(quiet_end);
    Some(DueAction { at: now, on: true, cause: Cause::Motion, rule: Some(rule.0), late: false })
}

/// The targets of the armed cross-device motion rules stored on a sensor
/// (rules with [`crate::model::Motion::target`]), with their quiet periods:
/// what the sensor must switch on now. Same conditions as [`motion`]
/// (enabled, window or darkness evaluated in the sensor's zone and location).
pub fn motion_targets<'a>(rules: &'a RuleSet, tz: &TimeZone, now: Timestamp) -> Vec<(&'a crate::model::MotionTarget, u32)> {
    rules
        .rules
        .iter()
        .filter(|r| r.enabled)
        .filter_map(|r| match &r.kind {
            RuleKind::Motion(m) if motion_armed(m.when, rules, tz, now) => m.target.as_ref().map(|t| (t, m.off_after_secs)),
            _ => None,
        })
        .collect()
}

/// A button press on the device.
pub fn button(state: &mut RuntimeState, rules: &RuleSet, tz: &TimeZone, press: Press, now: Timestamp) -> Option<DueAction> {
    let (id, action) = rules.rules.iter().filter(|r| r.enabled).find_map(|r| match &r.kind {
        RuleKind::Button(b) if b.press == press => Some((r.id, b.action)),
        _ => None,
    })?;
    let on = match action {
        ButtonAction::Toggle => !state.relay_on,
        ButtonAction::On | ButtonAction::OnFor(_) => true,
        ButtonAction::Off => false,
    };
    // A button is a person at the device: it counts as manual for away mode.
    let mut a = manual(state, rules, tz, on, now);
    if let ButtonAction::OnFor(s) = action {
        state.auto_off_at = Some(secs(now, i64::from(s)));
    }
    a.cause = Cause::Button;
    a.rule = Some(id);
    Some(a)
}
