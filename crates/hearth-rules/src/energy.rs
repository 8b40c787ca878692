//! Energy accounting for energy plugs: bounded history, totals, cost,
//! standby detection, events, and a load simulator.
//!
//! The history is three fixed-size ring buffers — per minute for 24 h, per
//! hour for 90 days, per day for 2 years — so its size never grows
//! ([`HISTORY_BYTES`] serialized). It is crash-safe by design rather than by
//! a database: the serialized image is fixed-size and checksummed, and the
//! device keeps two copies written alternately (A/B). A torn write fails the
//! checksum and [`pick_latest`] falls back to the other copy, losing at most
//! one save interval.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::model::range_err;
use crate::rng::SplitMix64;
use crate::RuleError;

/// Minute slots: 24 hours.
pub const MINUTE_SLOTS: usize = 24 * 60;
/// Hour slots: 90 days.
pub const HOUR_SLOTS: usize = 90 * 24;
/// Day slots: two years.
pub const DAY_SLOTS: usize = 730;
/// A relay on with the load below the standby threshold this long is "standby".
pub const STANDBY_AFTER_SECS: i64 = 60;
/// Samples further apart than this are a gap (device off), not billed.
pub const MAX_SAMPLE_GAP_SECS: i64 = 60;

/// A price per kWh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    /// Thousandths of the currency unit per kWh (e.g. 0.3152 EUR = 315).
    pub per_kwh_milli: u32,
    /// ISO 4217 code, e.g. `EUR`.
    pub currency: String,
}

/// The owner's energy settings.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnergyConfig {
    /// Relay on and load below this (milliwatts) means standby.
    #[serde(default)]
    pub standby_below_mw: Option<u32>,
    /// Report "on for more than N hours".
    #[serde(default)]
    pub long_on_hours: Option<u16>,
    /// Price for the cost figures.
    #[serde(default)]
    pub price: Option<Price>,
}

impl EnergyConfig {
    pub(crate) fn validate(&self) -> Result<(), RuleError> {
        if let Some(mw) = self.standby_below_mw {
            if mw > 100_000 {
                return Err(range_err("energy.standby_below_mw", "must be at most 100 W"));
            }
        }
        if let Some(h) = self.long_on_hours {
            if !(1..=24 * 14).contains(&h) {
                return Err(range_err("energy.long_on_hours", "must be 1 … 336"));
            }
        }
        if let Some(p) = &self.price {
            if p.currency.len() != 3 || !p.currency.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err(range_err("energy.price.currency", "must be an ISO 4217 code like EUR"));
            }
        }
        Ok(())
    }
}

/// One history bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Slot {
    /// Energy in milliwatt-hours.
    pub energy_mwh: u32,
    /// Seconds the relay was on.
    pub on_secs: u32,
}

/// A ring of `N` consecutive buckets ending at `head`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ring {
    slots: Vec<Slot>,
    /// Bucket number of the newest slot; `None` while empty.
    head: Option<i64>,
    /// Longest possible on-time of one bucket (clamps bad input).
    bucket_secs: u32,
}

impl Ring {
    fn new(len: usize, bucket_secs: u32) -> Self {
        Ring { slots: vec![Slot::default(); len], head: None, bucket_secs }
    }

    fn idx(&self, bucket: i64) -> usize {
        bucket.rem_euclid(self.slots.len() as i64) as usize
    }

    fn add(&mut self, bucket: i64, energy_mwh: u32, on_secs: u32) {
        let n = self.slots.len() as i64;
        let head = *self.head.get_or_insert(bucket);
        if bucket > head {
            // Zero the skipped buckets (at most one full turn).
            let from = (head + 1).max(bucket - n + 1);
            for b in from..=bucket {
                let i = self.idx(b);
                self.slots[i] = Slot::default();
            }
            self.head = Some(bucket);
        } else if bucket <= head - n {
            return; // Older than the ring covers.
        }
        let i = self.idx(bucket);
        let s = &mut self.slots[i];
        s.energy_mwh = s.energy_mwh.saturating_add(energy_mwh);
        s.on_secs = s.on_secs.saturating_add(on_secs).min(self.bucket_secs);
    }

    /// The bucket, if the ring still covers it.
    pub fn get(&self, bucket: i64) -> Option<Slot> {
        let head = self.head?;
        (bucket <= head && bucket > head - self.slots.len() as i64).then(|| self.slots[self.idx(bucket)])
    }

    /// Newest bucket number.
    pub fn head(&self) -> Option<i64> {
        self.head
    }

    /// Number of buckets kept.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }
}

/// The whole bounded history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct History {
    /// Per minute (bucket = unix minute).
    pub minutes: Ring,
    /// Per hour (bucket = unix hour).
    pub hours: Ring,
    /// Per local day (bucket = days since 1970-01-01 of the local date).
    pub days: Ring,
    /// Lifetime energy, mWh.
    pub total_mwh: u64,
    /// Lifetime on-time, seconds.
    pub total_on_secs: u64,
}

impl Default for History {
    fn default() -> Self {
        History {
            minutes: Ring::new(MINUTE_SLOTS, 60),
            hours: Ring::new(HOUR_SLOTS, 3600),
            days: Ring::new(DAY_SLOTS, 86_400),
            total_mwh: 0,
            total_on_secs: 0,
        }
    }
}

const MAGIC: &[u8; 8] = b"HRTHEH01";
/// Size of a serialized history: header, three rings, checksum.
pub const HISTORY_BYTES: usize = 8 + 8 + 3 * 9 + 16 + (MINUTE_SLOTS + HOUR_SLOTS + DAY_SLOTS) * 8 + 4;

/// CRC-32 (IEEE 802.3, reflected, poly 0xEDB88320) — detects torn writes.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

impl History {
    /// Record energy and on-time at `now` (minute/hour) and `local_day`.
    pub fn add(&mut self, now: Timestamp, local_day: i64, energy_mwh: u32, on_secs: u32) {
        let s = now.as_second();
        self.minutes.add(s.div_euclid(60), energy_mwh, on_secs);
        self.hours.add(s.div_euclid(3600), energy_mwh, on_secs);
        self.days.add(local_day, energy_mwh, on_secs);
        self.total_mwh = self.total_mwh.saturating_add(u64::from(energy_mwh));
        self.total_on_secs = self.total_on_secs.saturating_add(u64::from(on_secs));
    }

    /// Serialize to the fixed-size image. `generation` increases with every
    /// save so [`pick_latest`] can tell the newer of two copies.
    pub fn to_bytes(&self, generation: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(HISTORY_BYTES);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&generation.to_le_bytes());
        for r in [&self.minutes, &self.hours, &self.days] {
            out.push(u8::from(r.head.is_some()));
            out.extend_from_slice(&r.head.unwrap_or(0).to_le_bytes());
        }
        out.extend_from_slice(&self.total_mwh.to_le_bytes());
        out.extend_from_slice(&self.total_on_secs.to_le_bytes());
        for r in [&self.minutes, &self.hours, &self.days] {
            for s in &r.slots {
                out.extend_from_slice(&s.energy_mwh.to_le_bytes());
                out.extend_from_slice(&s.on_secs.to_le_bytes());
            }
        }
        let crc = crc32(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Parse an image; any damage is an error, never a panic.
    pub fn from_bytes(b: &[u8]) -> Result<(History, u64), RuleError> {
        if b.len() != HISTORY_BYTES {
            return Err(RuleError::CorruptHistory("wrong length"));
        }
        let (body, crc) = b.split_at(HISTORY_BYTES - 4);
        if crc32(body) != u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]) {
            return Err(RuleError::CorruptHistory("checksum mismatch"));
        }
        if &body[..8] != MAGIC {
            return Err(RuleError::CorruptHistory("unknown format"));
        }
        let mut pos = 8;
        let mut take = |n: usize| {
            let s = &body[pos..pos + n];
            pos += n;
            s
        };
        let u64_at = |s: &[u8]| {
            let mut a = [0u8; 8];
            a.copy_from_slice(s);
            u64::from_le_bytes(a)
        };
        let u32_at = |s: &[u8]| u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
        let generation = u64_at(take(8));
        let mut h = History::default();
        let mut heads = [None; 3];
        for head in &mut heads {
            let present = take(1)[0];
            let v = u64_at(take(8)) as i64;
            *head = match present {
                0 => None,
                1 => Some(v),
                _ => return Err(RuleError::CorruptHistory("bad ring header")),
            };
        }
        h.total_mwh = u64_at(take(8));
        h.total_on_secs = u64_at(take(8));
        for (r, head) in [&mut h.minutes, &mut h.hours, &mut h.days].into_iter().zip(heads) {
            r.head = head;
            for s in r.slots.iter_mut() {
                s.energy_mwh = u32_at(take(4));
                s.on_secs = u32_at(take(4));
                if s.on_secs > r.bucket_secs {
                    return Err(RuleError::CorruptHistory("on-time longer than its bucket"));
                }
            }
        }
        Ok((h, generation))
    }
}

/// The bucket size of a history query: each ring answers for the span it
/// covers (minutes for 24 h, hours for 90 days, local days for 2 years).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resolution {
    /// Per minute; bucket = unix minute.
    Minute,
    /// Per hour; bucket = unix hour.
    Hour,
    /// Per local day; bucket = days since 1970-01-01 of the local date.
    Day,
}

impl Resolution {
    /// The finest resolution whose ring still covers `secs_back` seconds
    /// before now.
    pub fn for_span(secs_back: i64) -> Self {
        if secs_back <= MINUTE_SLOTS as i64 * 60 {
            Resolution::Minute
        } else if secs_back <= HOUR_SLOTS as i64 * 3600 {
            Resolution::Hour
        } else {
            Resolution::Day
        }
    }

    /// The bucket holding `now` (`local_day` for [`Resolution::Day`]).
    pub fn bucket(self, now: Timestamp, local_day: i64) -> i64 {
        match self {
            Resolution::Minute => now.as_second().div_euclid(60),
            Resolution::Hour => now.as_second().div_euclid(3600),
            Resolution::Day => local_day,
        }
    }
}

/// A contiguous run of buckets from a history query, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Series {
    /// The bucket size.
    pub resolution: Resolution,
    /// Bucket number of `slots[0]` (see [`Resolution`]).
    pub first: i64,
    /// One slot per bucket; buckets with nothing recorded are zero.
    pub slots: Vec<Slot>,
}

impl History {
    fn ring(&self, res: Resolution) -> &Ring {
        match res {
            Resolution::Minute => &self.minutes,
            Resolution::Hour => &self.hours,
            Resolution::Day => &self.days,
        }
    }

    /// The buckets `from ..= to` at `res`, clamped to what the ring covers
    /// (never more than its capacity, never after `to`). Bounded by
    /// construction: at most [`HOUR_SLOTS`] slots, whatever is asked.
    pub fn series(&self, res: Resolution, from: i64, to: i64) -> Series {
        let ring = self.ring(res);
        let cap = ring.capacity() as i64;
        let first = from.max(to.saturating_sub(cap - 1));
        let slots = if first > to { Vec::new() } else { (first..=to).map(|b| ring.get(b).unwrap_or_default()).collect() };
        Series { resolution: res, first, slots }
    }
}

/// The day-bucket number for `now` in the device's zone: days since
/// 1970-01-01 of the local date (what [`History::add`] and [`Meter::sample`]
/// take as `local_day`).
pub fn local_day(now: Timestamp, tz: &jiff::tz::TimeZone) -> i64 {
    crate::sun::days_from_civil(now.to_zoned_datetime(tz.clone()).date())
}

/// The A/B scheme: of two stored copies, the valid one with the higher
/// generation. `None` if neither is valid (a first boot).
pub fn pick_latest(a: Option<&[u8]>, b: Option<&[u8]>) -> Option<(History, u64)> {
    let a = a.and_then(|x| History::from_bytes(x).ok());
    let b = b.and_then(|x| History::from_bytes(x).ok());
    match (a, b) {
        (Some(a), Some(b)) => Some(if b.1 > a.1 { b } else { a }),
        (a, b) => a.or(b),
    }
}

/// Events the meter raises.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnergyEvent {
    /// The relay has been on longer than the configured hours.
    LongOn {
        /// On since.
        since: Timestamp,
        /// The configured threshold.
        hours: u16,
    },
    /// Relay on, load below the standby threshold.
    EnteredStandby {
        /// When the load dropped.
        since: Timestamp,
    },
    /// Load back above the threshold, or relay off.
    LeftStandby {
        /// When.
        at: Timestamp,
    },
}

/// Accounting state: the history plus what is needed between samples.
/// (Over-power is the interlock's job and reported as a safety event.)
#[derive(Debug, Clone, Default)]
pub struct Meter {
    /// The bounded history.
    pub history: History,
    last: Option<(Timestamp, f32, bool)>,
    /// Sub-mWh remainder, so frequent small samples do not round away.
    carry_mwh: f64,
    on_since: Option<Timestamp>,
    long_on_reported: bool,
    low_since: Option<Timestamp>,
    in_standby: bool,
}

impl Meter {
    /// A meter continuing a stored history.
    pub fn with_history(history: History) -> Self {
        Meter { history, ..Default::default() }
    }

    /// Whether the load is in standby now.
    pub fn in_standby(&self) -> bool {
        self.in_standby
    }

    /// Feed one reading. The energy since the previous reading (at the
    /// previous power) is booked at `now`; with samples every few seconds
    /// at most one sample's worth lands in the neighbouring bucket.
    pub fn sample(&mut self, cfg: &EnergyConfig, now: Timestamp, local_day: i64, watts: f32, relay_on: bool) -> Vec<EnergyEvent> {
        let mut events = Vec::new();
        let watts = if watts.is_finite() && watts > 0.0 { watts } else { 0.0 };
        if let Some((prev_t, prev_w, prev_on)) = self.last {
            let dt = now.as_second() - prev_t.as_second();
            if dt > 0 && dt <= MAX_SAMPLE_GAP_SECS {
                let e = f64::from(prev_w) * dt as f64 / 3.6 + self.carry_mwh;
                let whole = e.floor().min(f64::from(u32::MAX));
                self.carry_mwh = e - whole;
                let on = if prev_on { dt as u32 } else { 0 };
                self.history.add(now, local_day, whole as u32, on);
            }
        }
        if now >= self.last.map_or(now, |l| l.0) {
            self.last = Some((now, watts, relay_on));
        }
        // On-period tracking for "on for more than N hours".
        if relay_on {
            let since = *self.on_since.get_or_insert(now);
            if let Some(h) = cfg.long_on_hours {
                if !self.long_on_reported && now.as_second() - since.as_second() > i64::from(h) * 3600 {
                    self.long_on_reported = true;
                    events.push(EnergyEvent::LongOn { since, hours: h });
                }
            }
        } else {
            self.on_since = None;
            self.long_on_reported = false;
        }
        // Standby: relay on, load below threshold for STANDBY_AFTER_SECS.
        let low = relay_on && cfg.standby_below_mw.is_some_and(|mw| watts * 1000.0 < mw as f32);
        if low {
            let since = *self.low_since.get_or_insert(now);
            if !self.in_standby && now.as_second() - since.as_second() >= STANDBY_AFTER_SECS {
                self.in_standby = true;
                events.push(EnergyEvent::EnteredStandby { since });
            }
        } else {
            self.low_since = None;
            if self.in_standby {
                self.in_standby = false;
                events.push(EnergyEvent::LeftStandby { at: now });
            }
        }
        events
    }

    /// Energy and on-time of a local day (days since 1970-01-01).
    pub fn day(&self, local_day: i64) -> Slot {
        self.history.days.get(local_day).unwrap_or_default()
    }

    /// Lifetime energy (mWh) and on-time (s).
    pub fn total(&self) -> (u64, u64) {
        (self.history.total_mwh, self.history.total_on_secs)
    }
}

/// Cost of `energy_mwh` at `price`, in thousandths of the currency unit,
/// rounded to nearest. Integer arithmetic: no float drift in bills.
pub fn cost_milli(energy_mwh: u64, price: &Price) -> u64 {
    // mWh × milli/kWh = 10⁻⁹ units; /10⁶ gives thousandths. u128 cannot overflow here.
    let v = (u128::from(energy_mwh) * u128::from(price.per_kwh_milli) + 500_000) / 1_000_000;
    u64::try_from(v).unwrap_or(u64::MAX)
}

/// A simulated load for the device simulator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum LoadProfile {
    /// A fixed draw.
    Constant {
        /// Watts.
        watts: f32,
    },
    /// A kettle: full power until it boils, then its thermostat cuts out
    /// (relay still on, 0 W — which standby detection notices).
    Kettle {
        /// Heating power.
        watts: f32,
        /// Seconds to boil.
        boil_secs: u32,
    },
    /// A TV: watched for a while, then left in standby.
    TvStandby {
        /// Power while watched.
        active_watts: f32,
        /// Power in standby.
        standby_watts: f32,
        /// Seconds watched after switching on.
        active_secs: u32,
    },
}

/// Deterministic load simulator (seeded noise).
#[derive(Debug, Clone)]
pub struct LoadSim {
    profile: LoadProfile,
    rng: SplitMix64,
}

impl LoadSim {
    /// A simulator with reproducible noise.
    pub fn new(profile: LoadProfile, seed: u64) -> Self {
        LoadSim { profile, rng: SplitMix64::new(seed) }
    }

    /// Power drawn `secs_on` seconds after the relay went on (0 W when off).
    pub fn watts(&mut self, relay_on: bool, secs_on: u64) -> f32 {
        if !relay_on {
            return 0.0;
        }
        // ±2 % noise, as a real meter shows.
        let noise = 1.0 + (self.rng.unit() as f32 - 0.5) * 0.04;
        match self.profile {
            LoadProfile::Constant { watts } => watts * noise,
            LoadProfile::Kettle { watts, boil_secs } => {
                if secs_on < u64::from(boil_secs) {
                    watts * noise
                } else {
                    0.0
                }
            }
            LoadProfile::TvStandby { active_watts, standby_watts, active_secs } => {
                if secs_on < u64::from(active_secs) {
                    active_watts * noise
                } else {
                    standby_watts * noise
                }
            }
        }
    }
}
