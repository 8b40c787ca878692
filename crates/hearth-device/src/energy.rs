//! The energy plug's own history (issue 5, ADR 0005 "Energy"): the
//! hearth-rules [`Meter`] fed with the measured (here: simulated) power on
//! every tick, its fixed-size rings persisted as two alternating checksummed
//! images, and the reports controllers read with a signed `GetEnergy`
//! (answered only sealed, so the cloud never holds a reading).
//!
//! Crash safety is the rules core's A/B scheme: image `n` goes to
//! `energy-a.bin` or `energy-b.bin` by the parity of its generation, so a
//! torn write damages only the copy being written; its checksum fails and
//! [`pick_latest`] takes the other, losing at most [`SAVE_EVERY_SECS`] of
//! history. The images are 34,703 bytes each whatever the device's age.
//!
//! Not persisted: the meter's between-sample state (the running on-period
//! and standby timers), so "on for more than N hours" counts from the
//! restart after a power cut.

use hearth_proto::message::{EnergyReport, EnergyResolution};
use hearth_rules::energy::{self, EnergyConfig, EnergyEvent, History, Meter, Resolution};
use jiff::tz::TimeZone;

use crate::rules::timestamp;

/// How often the history image is written while the device runs.
pub const SAVE_EVERY_SECS: u64 = 60;

/// The two image files, chosen by the generation's parity.
pub const IMAGE_FILES: [&str; 2] = ["energy-a.bin", "energy-b.bin"];

/// The file an image of `generation` is written to.
pub fn image_file(generation: u64) -> &'static str {
    IMAGE_FILES[(generation % 2) as usize]
}

/// Of the two stored images (either may be missing or torn), the newest
/// valid one.
pub fn pick_latest(a: Option<&[u8]>, b: Option<&[u8]>) -> Option<(History, u64)> {
    energy::pick_latest(a, b)
}

/// An energy meter's runtime: the meter, its image generation and when it
/// was last written.
#[derive(Debug, Clone)]
pub struct DeviceEnergy {
    meter: Meter,
    generation: u64,
    saved_at: Option<u64>,
}

impl DeviceEnergy {
    /// A meter continuing `stored` (history and image generation), or a
    /// fresh one.
    pub fn new(stored: Option<(History, u64)>) -> Self {
        let (history, generation) = stored.unwrap_or_default();
        Self { meter: Meter::with_history(history), generation, saved_at: None }
    }

    /// The history.
    pub fn history(&self) -> &History {
        &self.meter.history
    }

    /// Feeds one reading; returns the events to report, for people.
    pub fn sample(&mut self, cfg: &EnergyConfig, now: u64, tz: &TimeZone, watts: f32, relay_on: bool) -> Vec<String> {
        let ts = timestamp(now);
        let day = energy::local_day(ts, tz);
        self.meter
            .sample(cfg, ts, day, watts, relay_on)
            .into_iter()
            .filter_map(|e| match e {
                EnergyEvent::LongOn { hours, .. } => Some(format!("on for more than {hours} h")),
                EnergyEvent::EnteredStandby { .. } => Some("entered standby".to_owned()),
                // Worth a log line, not a report of its own: the next
                // state change reports the new power anyway.
                EnergyEvent::LeftStandby { .. } => {
                    tracing::info!("left standby");
                    None
                }
            })
            .collect()
    }

    /// The next image to write and its generation, once [`SAVE_EVERY_SECS`]
    /// passed since the last one (or at once after a start). The caller
    /// calls [`DeviceEnergy::saved`] when it is durable.
    pub fn image_due(&self, now: u64) -> Option<(Vec<u8>, u64)> {
        let due = self.saved_at.is_none_or(|at| now >= at.saturating_add(SAVE_EVERY_SECS));
        due.then(|| {
            let generation = self.generation.wrapping_add(1);
            (self.meter.history.to_bytes(generation), generation)
        })
    }

    /// An image of `generation` was written.
    pub fn saved(&mut self, generation: u64, now: u64) {
        self.generation = generation;
        self.saved_at = Some(now);
    }

    /// Forgets everything (factory reset: a new owner does not see the
    /// previous owner's consumption); the next image is due at once.
    pub fn wipe(&mut self) {
        let generation = self.generation;
        *self = Self::new(None);
        self.generation = generation;
    }

    /// The answer to `GetEnergy { since, resolution }` at `now`.
    pub fn report(&self, since: u64, resolution: Option<EnergyResolution>, now: u64, tz: &TimeZone, cfg: &EnergyConfig, power_mw: u64) -> EnergyReport {
        let (ts, since_ts) = (timestamp(now), timestamp(since.min(now)));
        let res = match resolution {
            Some(EnergyResolution::Minute) => Resolution::Minute,
            Some(EnergyResolution::Hour) => Resolution::Hour,
            Some(EnergyResolution::Day) => Resolution::Day,
            None => Resolution::for_span(ts.as_second() - since_ts.as_second()),
        };
        let today = energy::local_day(ts, tz);
        let series = self.meter.history.series(res, res.bucket(since_ts, energy::local_day(since_ts, tz)), res.bucket(ts, today));
        let today_slot = self.meter.day(today);
        let (total_mwh, total_on_secs) = self.meter.total();
        EnergyReport {
            resolution: Some(match series.resolution {
                Resolution::Minute => EnergyResolution::Minute,
                Resolution::Hour => EnergyResolution::Hour,
                Resolution::Day => EnergyResolution::Day,
            }),
            first: series.first,
            energy_mwh: series.slots.iter().map(|s| s.energy_mwh).collect(),
            on_secs: series.slots.iter().map(|s| s.on_secs).collect(),
            today_mwh: u64::from(today_slot.energy_mwh),
            today_on_secs: u64::from(today_slot.on_secs),
            total_mwh,
            total_on_secs,
            power_mw,
            standby: self.meter.in_standby(),
            timezone: tz.iana_name().unwrap_or("UTC").to_owned(),
            price_per_kwh_milli: cfg.price.as_ref().map(|p| p.per_kwh_milli),
            currency: cfg.price.as_ref().map(|p| p.currency.clone()),
        }
    }
}
