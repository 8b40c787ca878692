//! The rule model: what the owner configures, as the device stores it.
//!
//! A [`RuleSet`] is one versioned document. It is only ever replaced whole:
//! an editor reads version `v`, sends edits "based on `v`", and the device
//! produces version `v + 1` if and only if every edit applies and the result
//! validates ([`RuleSet::apply`]). There is no partially edited state, so a
//! power cut during an edit leaves either the old or the new set, never a mix
//! (the device persists the new set with write-then-rename).
//!
//! Parsing is strict (`deny_unknown_fields`) and bounded ([`MAX_RULES`],
//! [`MAX_NAME_LEN`], [`MAX_JSON_LEN`]): a rule set reaches the device through
//! the cloud, and although it is signed end to end by the owner, a device must
//! not be made to allocate without bound by a buggy controller.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::energy::EnergyConfig;
use crate::safety::InterlockConfig;
use crate::RuleError;

/// Most rules one device keeps.
pub const MAX_RULES: usize = 64;
/// Longest rule name, in bytes.
pub const MAX_NAME_LEN: usize = 64;
/// Longest IANA zone name or device id, in bytes.
pub const MAX_ID_LEN: usize = 64;
/// Largest serialized rule set the device parses, in bytes.
pub const MAX_JSON_LEN: usize = 32 * 1024;
/// Largest sunrise/sunset offset, in minutes either way.
pub const MAX_SUN_OFFSET_MIN: i16 = 180;
/// Shortest on-period away mode may produce (the "at least 30 minutes").
pub const MIN_AWAY_ON_MIN: u16 = 30;

/// A wall-clock time of day, minute resolution. Serialized as `"HH:MM"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClockTime(u16);

impl ClockTime {
    /// `hour:minute`, or `None` when out of range.
    pub fn new(hour: u8, minute: u8) -> Option<Self> {
        (hour < 24 && minute < 60).then(|| Self(u16::from(hour) * 60 + u16::from(minute)))
    }
    /// Hour, 0–23.
    pub fn hour(self) -> u8 {
        (self.0 / 60) as u8
    }
    /// Minute, 0–59.
    pub fn minute(self) -> u8 {
        (self.0 % 60) as u8
    }
    /// Minutes since midnight.
    pub fn minutes(self) -> u16 {
        self.0
    }
}

impl fmt::Display for ClockTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02}:{:02}", self.hour(), self.minute())
    }
}

impl std::str::FromStr for ClockTime {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a time of day in HH:MM form");
        let (h, m) = s.split_once(':').ok_or_else(bad)?;
        if h.len() != 2 || m.len() != 2 {
            return Err(bad());
        }
        let h: u8 = h.parse().map_err(|_| bad())?;
        let m: u8 = m.parse().map_err(|_| bad())?;
        ClockTime::new(h, m).ok_or_else(bad)
    }
}

impl Serialize for ClockTime {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ClockTime {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Bounded: a borrowed/short string is enough; longer inputs fail parse.
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A day of the week, serialized as `"mon"` … `"sun"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[allow(missing_docs)]
pub enum Day {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

const ALL_DAYS: [Day; 7] = [Day::Mon, Day::Tue, Day::Wed, Day::Thu, Day::Fri, Day::Sat, Day::Sun];

/// A set of weekdays (bit 0 = Monday). Serialized as a list of [`Day`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<Day>", into = "Vec<Day>")]
pub struct Weekdays(u8);

impl Weekdays {
    /// Every day.
    pub const ALL: Weekdays = Weekdays(0x7f);
    /// Whether the set contains `day` (a jiff weekday).
    pub fn contains(self, day: jiff::civil::Weekday) -> bool {
        self.0 & (1 << day.to_monday_zero_offset()) != 0
    }
    /// The set of the given days.
    pub fn of(days: &[Day]) -> Self {
        Weekdays(days.iter().fold(0, |m, d| m | (1 << *d as u8)))
    }
}

impl TryFrom<Vec<Day>> for Weekdays {
    type Error = String;
    fn try_from(v: Vec<Day>) -> Result<Self, String> {
        // The list is at most as long as the JSON limit allows; duplicates
        // are harmless, an empty list would be a rule that never runs.
        if v.is_empty() {
            return Err("days must name at least one weekday".into());
        }
        Ok(Weekdays::of(&v))
    }
}

impl From<Weekdays> for Vec<Day> {
    fn from(w: Weekdays) -> Vec<Day> {
        ALL_DAYS.iter().copied().filter(|d| w.0 & (1 << *d as u8) != 0).collect()
    }
}

/// When something happens within a local day.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum TimeSpec {
    /// A wall-clock time in the device's zone.
    Clock(ClockTime),
    /// Sunrise plus this many minutes (negative = before).
    Sunrise(i16),
    /// Sunset plus this many minutes (negative = before).
    Sunset(i16),
}

/// Where the device is, for sunrise and sunset.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Location {
    /// Latitude in degrees, north positive.
    pub lat: f64,
    /// Longitude in degrees, east positive.
    pub lon: f64,
}

/// What the relay does when power returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PowerOnPolicy {
    /// Stay off (the safe default for heaters, irons, kettles).
    #[default]
    Off,
    /// Switch on.
    On,
    /// Restore the state before the power cut.
    Last,
}

/// What a schedule does at its time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ScheduleAction {
    /// Switch on.
    On,
    /// Switch off.
    Off,
    /// Switch on, then off at `until` (same local day, or the next one if
    /// `until` is earlier than the start).
    OnUntil(TimeSpec),
}

/// A timed rule: at `at` on `days`, do `action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// Weekdays (of the local start date) on which the rule runs.
    pub days: Weekdays,
    /// When.
    pub at: TimeSpec,
    /// What.
    pub action: ScheduleAction,
}

/// Countdown auto-off: whenever the relay goes on, switch off after a while.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Countdown {
    /// Seconds after switching on (1 s … 24 h).
    pub off_after_secs: u32,
}

/// Away mode: random on/off periods inside a daily window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Away {
    /// Weekdays (of the window's start date) on which it runs.
    pub days: Weekdays,
    /// Window start.
    pub start: TimeSpec,
    /// Window end; earlier than `start` means the next day.
    pub end: TimeSpec,
    /// Shortest on-period in minutes (at least [`MIN_AWAY_ON_MIN`]).
    pub min_on_mins: u16,
    /// Longest on-period in minutes.
    pub max_on_mins: u16,
    /// Seed drawn from the device's CSPRNG when the rule was created; the
    /// day's plan is a pure function of it and the date, so a rebooted
    /// device recomputes the same plan without storing it.
    pub seed: u64,
}

/// When a motion rule is armed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum MotionWhen {
    /// Always.
    Always,
    /// Between two wall-clock times (wrapping past midnight if `end < start`).
    Between {
        /// From.
        start: ClockTime,
        /// Until (exclusive).
        end: ClockTime,
    },
    /// Only when the sun is down (after sunset or before sunrise).
    AfterSunset,
}

/// Motion from a paired sensor switches this device on, and off after quiet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Motion {
    /// The sensor's device id (it acts through a scoped grant, checked by
    /// the device's command verifier before this rule ever sees the event).
    pub sensor: String,
    /// Seconds without motion before switching off (10 s … 24 h).
    pub off_after_secs: u32,
    /// When the rule is armed.
    pub when: MotionWhen,
    /// Set when the rule is stored on the sensor itself and switches
    /// another device (issue 5, "motion rules across devices"): the sensor
    /// signs the switch commands with its own key, which the owner granted
    /// on the target's access list. `None`: the rule is on the switched
    /// device and `sensor` reports to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<MotionTarget>,
}

/// The device a sensor's motion rule switches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MotionTarget {
    /// The target's device id.
    pub device: String,
    /// The target's public key, base64url SEC1, as the owner's controller
    /// learned it at pairing; the sensor accepts the target's TLS
    /// certificate and signed answers only with this key.
    pub key: String,
    /// The target's LAN endpoint, `HOST:PORT`; without one the sensor
    /// sends through its cloud link only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lan: Option<String>,
    /// The owner allowed the cloud-link fallback while the sensor reports
    /// on a fixed cadence (ADR 0011). A command sent through the cloud at
    /// motion time tells the cloud when someone walked past, which the
    /// cadence exists to hide, so without this the sensor uses the LAN only.
    #[serde(default, skip_serializing_if = "is_false")]
    pub allow_cloud: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Longest accepted base64url key text in a [`MotionTarget`].
pub const MAX_KEY_LEN: usize = 128;
/// Longest accepted `HOST:PORT` in a [`MotionTarget`].
pub const MAX_ADDR_LEN: usize = 128;

/// A kind of button press.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum Press {
    Short,
    Long,
    Double,
}

/// What a button press does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ButtonAction {
    /// Flip the relay.
    Toggle,
    /// Switch on.
    On,
    /// Switch off.
    Off,
    /// Switch on for this many seconds.
    OnFor(u32),
}

/// A button rule on a device that has a button.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Button {
    /// Which press.
    pub press: Press,
    /// What it does.
    pub action: ButtonAction,
}

/// The kinds of rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
#[allow(missing_docs)]
pub enum RuleKind {
    Schedule(Schedule),
    Countdown(Countdown),
    Away(Away),
    Motion(Motion),
    Button(Button),
}

/// One rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Owner-chosen id, unique in the set; events and edits refer to it.
    pub id: u32,
    /// A name for people.
    pub name: String,
    /// Disabled rules are kept but never run.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// What the rule does.
    pub kind: RuleKind,
}

fn yes() -> bool {
    true
}

/// Everything the owner configured on one device, versioned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSet {
    /// Bumped by one on every accepted edit.
    pub version: u64,
    /// IANA zone name, e.g. `Europe/Berlin`.
    pub timezone: String,
    /// Needed for sunrise/sunset rules.
    #[serde(default)]
    pub location: Option<Location>,
    /// What the relay does when power returns.
    #[serde(default)]
    pub power_on: PowerOnPolicy,
    /// Safety interlocks.
    #[serde(default)]
    pub interlocks: InterlockConfig,
    /// Energy settings.
    #[serde(default)]
    pub energy: EnergyConfig,
    /// The rules.
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Fixed-cadence reporting (ADR 0011): `None` is the device's default
    /// (a fixed 30 s cadence on motion sensors, immediate reports
    /// elsewhere); `Some(0)` reports every change at once (the owner's
    /// explicit choice: the cloud then learns when motion happens);
    /// `Some(n)` with n in [`MIN_REPORT_EVERY_SECS`]..=[`MAX_REPORT_EVERY_SECS`]
    /// sends one fixed-size sealed report every n seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_every_secs: Option<u32>,
    /// Motion sensors (issue 5): how long without a registered walk-past
    /// before the state goes from "motion" to "no motion", in
    /// [`MIN_NO_MOTION_DELAY_SECS`]..=[`MAX_NO_MOTION_DELAY_SECS`];
    /// `None`: [`DEFAULT_NO_MOTION_DELAY_SECS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_motion_delay_secs: Option<u32>,
    /// Motion sensors (issue 5): 1 (least) ..= 10 (most sensitive); `None`:
    /// [`DEFAULT_SENSITIVITY`]. A walk-past of strength s (1 far/weak ..= 10
    /// close/strong) registers only if s > 10 - sensitivity; a GPIO driver
    /// would map it to its PIR threshold instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sensitivity: Option<u8>,
}

/// Shortest no-motion delay the owner may set (seconds).
pub const MIN_NO_MOTION_DELAY_SECS: u32 = 10;
/// Longest no-motion delay the owner may set (seconds).
pub const MAX_NO_MOTION_DELAY_SECS: u32 = 3600;
/// The no-motion delay when the owner set none (seconds).
pub const DEFAULT_NO_MOTION_DELAY_SECS: u32 = 60;
/// A motion sensor's sensitivity when the owner set none (1..=10).
pub const DEFAULT_SENSITIVITY: u8 = 5;

/// Shortest reporting cadence the owner may set (seconds).
pub const MIN_REPORT_EVERY_SECS: u32 = 10;
/// Longest reporting cadence the owner may set (seconds).
pub const MAX_REPORT_EVERY_SECS: u32 = 600;

/// One change to a rule set; a batch of them applies atomically.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Edit {
    /// Add a rule (its id must be new).
    Add(Rule),
    /// Replace the rule with the same id.
    Replace(Rule),
    /// Remove a rule.
    Remove(u32),
    /// Enable or disable a rule.
    SetEnabled {
        /// Rule id.
        id: u32,
        /// New state.
        enabled: bool,
    },
    /// Set the zone.
    SetTimezone(String),
    /// Set or clear the location.
    SetLocation(Option<Location>),
    /// Set the power-on policy.
    SetPowerOn(PowerOnPolicy),
    /// Set the interlocks.
    SetInterlocks(InterlockConfig),
    /// Set the energy settings.
    SetEnergy(EnergyConfig),
}

pub(crate) fn range_err(field: impl Into<String>, reason: impl Into<String>) -> RuleError {
    RuleError::OutOfRange { field: field.into(), reason: reason.into() }
}

fn check_len(field: impl FnOnce() -> String, s: &str, max: usize) -> Result<(), RuleError> {
    if s.len() > max {
        return Err(RuleError::StringTooLong { field: field(), len: s.len(), max });
    }
    Ok(())
}

fn check_spec(field: &str, t: &TimeSpec, has_location: bool) -> Result<(), RuleError> {
    match t {
        TimeSpec::Clock(_) => Ok(()),
        TimeSpec::Sunrise(o) | TimeSpec::Sunset(o) => {
            if o.abs() > MAX_SUN_OFFSET_MIN {
                return Err(range_err(field, format!("sun offset {o} min is beyond ±{MAX_SUN_OFFSET_MIN}")));
            }
            if !has_location {
                return Err(range_err(field, "sunrise/sunset needs the device location to be set"));
            }
            Ok(())
        }
    }
}

impl RuleSet {
    /// An empty set at version 0 for a zone.
    pub fn empty(timezone: &str) -> Self {
        RuleSet {
            version: 0,
            timezone: timezone.to_owned(),
            location: None,
            power_on: PowerOnPolicy::Off,
            interlocks: InterlockConfig::default(),
            energy: EnergyConfig::default(),
            rules: Vec::new(),
            report_every_secs: None,
            no_motion_delay_secs: None,
            sensitivity: None,
        }
    }

    /// Parse and validate a serialized set (size-bounded, strict fields).
    pub fn from_json(bytes: &[u8]) -> Result<Self, RuleError> {
        if bytes.len() > MAX_JSON_LEN {
            return Err(RuleError::TooLarge { len: bytes.len(), max: MAX_JSON_LEN });
        }
        let set: RuleSet = serde_json::from_slice(bytes).map_err(|e| RuleError::Parse(e.to_string()))?;
        set.validate()?;
        Ok(set)
    }

    /// Serialize (the inverse of [`RuleSet::from_json`]).
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing plain structs with string keys cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The device's zone. Fails if the zone is unknown to the local tzdb.
    pub fn time_zone(&self) -> Result<jiff::tz::TimeZone, RuleError> {
        jiff::tz::TimeZone::get(&self.timezone).map_err(|_| RuleError::UnknownTimeZone(self.timezone.clone()))
    }

    /// Check every bound. Called on parse and on every edit.
    pub fn validate(&self) -> Result<(), RuleError> {
        check_len(|| "timezone".into(), &self.timezone, MAX_ID_LEN)?;
        if self.rules.len() > MAX_RULES {
            return Err(RuleError::TooManyRules { count: self.rules.len(), max: MAX_RULES });
        }
        if let Some(l) = self.location {
            if !(-90.0..=90.0).contains(&l.lat) || !l.lat.is_finite() {
                return Err(range_err("location.lat", format!("{} is not in -90..=90", l.lat)));
            }
            if !(-180.0..=180.0).contains(&l.lon) || !l.lon.is_finite() {
                return Err(range_err("location.lon", format!("{} is not in -180..=180", l.lon)));
            }
        }
        self.interlocks.validate()?;
        self.energy.validate()?;
        if let Some(n) = self.report_every_secs {
            if n != 0 && !(MIN_REPORT_EVERY_SECS..=MAX_REPORT_EVERY_SECS).contains(&n) {
                return Err(range_err("report_every_secs", "must be 0 (immediate) or 10 s … 10 min"));
            }
        }
        if let Some(n) = self.no_motion_delay_secs {
            if !(MIN_NO_MOTION_DELAY_SECS..=MAX_NO_MOTION_DELAY_SECS).contains(&n) {
                return Err(range_err("no_motion_delay_secs", "must be 10 s … 1 h"));
            }
        }
        if let Some(n) = self.sensitivity {
            if !(1..=10).contains(&n) {
                return Err(range_err("sensitivity", "must be 1 … 10"));
            }
        }
        let has_loc = self.location.is_some();
        let mut ids: Vec<u32> = Vec::with_capacity(self.rules.len());
        let mut countdowns = 0;
        for r in &self.rules {
            if ids.contains(&r.id) {
                return Err(RuleError::DuplicateRuleId(r.id));
            }
            ids.push(r.id);
            let f = |what: &str| format!("rule {} {what}", r.id);
            check_len(|| f("name"), &r.name, MAX_NAME_LEN)?;
            match &r.kind {
                RuleKind::Schedule(s) => {
                    check_spec(&f("at"), &s.at, has_loc)?;
                    if let ScheduleAction::OnUntil(u) = &s.action {
                        check_spec(&f("until"), u, has_loc)?;
                    }
                }
                RuleKind::Countdown(c) => {
                    countdowns += 1;
                    if countdowns > 1 {
                        return Err(range_err(f("countdown"), "only one countdown rule per device"));
                    }
                    if !(1..=86_400).contains(&c.off_after_secs) {
                        return Err(range_err(f("off_after_secs"), "must be 1 s … 24 h"));
                    }
                }
                RuleKind::Away(a) => {
                    check_spec(&f("start"), &a.start, has_loc)?;
                    check_spec(&f("end"), &a.end, has_loc)?;
                    if a.min_on_mins < MIN_AWAY_ON_MIN {
                        return Err(range_err(f("min_on_mins"), format!("must be at least {MIN_AWAY_ON_MIN}")));
                    }
                    if a.max_on_mins < a.min_on_mins || a.max_on_mins > 12 * 60 {
                        return Err(range_err(f("max_on_mins"), "must be min_on_mins … 720"));
                    }
                }
                RuleKind::Motion(m) => {
                    check_len(|| f("sensor"), &m.sensor, MAX_ID_LEN)?;
                    if let Some(t) = &m.target {
                        check_len(|| f("target.device"), &t.device, MAX_ID_LEN)?;
                        check_len(|| f("target.key"), &t.key, MAX_KEY_LEN)?;
                        if let Some(lan) = &t.lan {
                            check_len(|| f("target.lan"), lan, MAX_ADDR_LEN)?;
                            if !lan.contains(':') {
                                return Err(range_err(f("target.lan"), "must be HOST:PORT"));
                            }
                        }
                        if t.device.is_empty() || t.key.is_empty() {
                            return Err(range_err(f("target"), "needs the target's id and key"));
                        }
                    }
                    if !(10..=86_400).contains(&m.off_after_secs) {
                        return Err(range_err(f("off_after_secs"), "must be 10 s … 24 h"));
                    }
                    if m.when == MotionWhen::AfterSunset && !has_loc {
                        return Err(range_err(f("when"), "after_sunset needs the device location to be set"));
                    }
                }
                RuleKind::Button(b) => {
                    if let ButtonAction::OnFor(s) = b.action {
                        if !(1..=86_400).contains(&s) {
                            return Err(range_err(f("on_for"), "must be 1 s … 24 h"));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Apply a batch of edits made against `based_on`: all of them or none.
    ///
    /// Returns the new set with `version + 1`; `self` is untouched either way,
    /// so the caller swaps the stored set only on success.
    pub fn apply(&self, based_on: u64, edits: &[Edit]) -> Result<RuleSet, RuleError> {
        if based_on != self.version {
            return Err(RuleError::VersionConflict { expected: based_on, actual: self.version });
        }
        let mut next = self.clone();
        for e in edits {
            match e {
                Edit::Add(r) => {
                    if next.rules.iter().any(|x| x.id == r.id) {
                        return Err(RuleError::DuplicateRuleId(r.id));
                    }
                    next.rules.push(r.clone());
                }
                Edit::Replace(r) => {
                    let slot = next.rules.iter_mut().find(|x| x.id == r.id).ok_or(RuleError::UnknownRule(r.id))?;
                    *slot = r.clone();
                }
                Edit::Remove(id) => {
                    let before = next.rules.len();
                    next.rules.retain(|x| x.id != *id);
                    if next.rules.len() == before {
                        return Err(RuleError::UnknownRule(*id));
                    }
                }
                Edit::SetEnabled { id, enabled } => {
                    let slot = next.rules.iter_mut().find(|x| x.id == *id).ok_or(RuleError::UnknownRule(*id))?;
                    slot.enabled = *enabled;
                }
                Edit::SetTimezone(tz) => next.timezone = tz.clone(),
                Edit::SetLocation(l) => next.location = *l,
                Edit::SetPowerOn(p) => next.power_on = *p,
                Edit::SetInterlocks(i) => next.interlocks = i.clone(),
                Edit::SetEnergy(c) => next.energy = c.clone(),
            }
        }
        next.version = self.version.checked_add(1).ok_or_else(|| range_err("version", "exhausted"))?;
        next.validate()?;
        Ok(next)
    }

    /// Replace the whole set with `new`, which must be exactly the next version.
    pub fn replace(&self, new: RuleSet) -> Result<RuleSet, RuleError> {
        let want = self.version.saturating_add(1);
        if new.version != want {
            return Err(RuleError::VersionConflict { expected: new.version.saturating_sub(1), actual: self.version });
        }
        new.validate()?;
        Ok(new)
    }
}
