//! Safety interlocks: a pure state machine between every switching request
//! and the relay.
//!
//! Every path that can move the relay — remote commands, rules, the device's
//! own button — goes through [`Interlock::request`], and the device feeds
//! power readings and the time to [`Interlock::observe`]. The owner
//! configures the limits through the (signed, versioned) rule set, but no
//! *command* can bypass them: there is no "force" flag, the hardware limit
//! cannot be raised by configuration, and a latched over-power cut-off can
//! only be cleared by a person at the device ([`Source::Local`]).

use std::collections::VecDeque;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::model::range_err;
use crate::RuleError;

/// Over-power cut-off settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverPower {
    /// Cut off above this many watts (capped by the hardware rating).
    pub limit_w: u32,
    /// …sustained for this many seconds (1–600).
    pub for_secs: u16,
    /// Wait at least this long before the relay may go on again (10 s – 1 h);
    /// doubled on every further trip.
    pub retry_after_secs: u32,
    /// Trips tolerated before the cut-off latches (0–10).
    pub max_retries: u8,
    /// Switch back on by itself after the wait (e.g. a fridge); otherwise
    /// the relay stays off until someone switches it on.
    #[serde(default)]
    pub auto_retry: bool,
}

/// The owner's interlock settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterlockConfig {
    /// Longest continuous on-time in seconds (60 s – 7 days), if any.
    #[serde(default)]
    pub max_on_secs: Option<u32>,
    /// Most relay switches in any 60-second window (1–30).
    #[serde(default = "default_toggles")]
    pub max_toggles_per_min: u8,
    /// Over-power cut-off; the hardware rating applies even when unset.
    #[serde(default)]
    pub over_power: Option<OverPower>,
}

fn default_toggles() -> u8 {
    6
}

impl Default for InterlockConfig {
    fn default() -> Self {
        InterlockConfig { max_on_secs: None, max_toggles_per_min: default_toggles(), over_power: None }
    }
}

impl InterlockConfig {
    pub(crate) fn validate(&self) -> Result<(), RuleError> {
        if let Some(s) = self.max_on_secs {
            if !(60..=7 * 86_400).contains(&s) {
                return Err(range_err("interlocks.max_on_secs", "must be 60 s … 7 days"));
            }
        }
        if !(1..=30).contains(&self.max_toggles_per_min) {
            return Err(range_err("interlocks.max_toggles_per_min", "must be 1 … 30"));
        }
        if let Some(o) = &self.over_power {
            if o.limit_w == 0 {
                return Err(range_err("interlocks.over_power.limit_w", "must be above 0"));
            }
            if !(1..=600).contains(&o.for_secs) {
                return Err(range_err("interlocks.over_power.for_secs", "must be 1 … 600"));
            }
            if !(10..=3600).contains(&o.retry_after_secs) {
                return Err(range_err("interlocks.over_power.retry_after_secs", "must be 10 … 3600"));
            }
            if o.max_retries > 10 {
                return Err(range_err("interlocks.over_power.max_retries", "must be 0 … 10"));
            }
        }
        Ok(())
    }
}

/// Who asks for a switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// A person at the device (its button).
    Local,
    /// An authorized remote command (cloud or LAN).
    Remote,
    /// One of the device's own rules.
    Rule,
}

/// Why a request was refused; sent back to the requester as the reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Refusal {
    /// Too many switches in the last minute.
    #[error("toggle rate limit: {max} switches per minute; retry in {retry_after_secs} s")]
    RateLimited {
        /// The configured limit.
        max: u8,
        /// Seconds until one more switch is allowed.
        retry_after_secs: u32,
    },
    /// Cut off for over-power; waiting before the next try.
    #[error("over-power cut-off: locked until {until}")]
    OverPowerLockout {
        /// End of the wait.
        until: Timestamp,
    },
    /// Cut off too often; only a person at the device can reset it.
    #[error("over-power cut-off latched: press the device's button to reset")]
    Latched,
}

/// What the interlock reports.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SafetyEvent {
    /// Switched off after the maximum continuous on-time.
    MaxOnTime {
        /// When.
        at: Timestamp,
        /// How long it had been on.
        on_secs: i64,
    },
    /// Switched off for over-power.
    OverPower {
        /// When.
        at: Timestamp,
        /// The reading that confirmed it.
        watts: f32,
        /// Consecutive trip number.
        trip: u8,
        /// Whether the cut-off is now latched.
        latched: bool,
    },
    /// Switched back on by the over-power auto-retry.
    Retried {
        /// When.
        at: Timestamp,
    },
    /// A request was refused.
    Refused {
        /// When.
        at: Timestamp,
        /// Who asked.
        source: Source,
        /// Why not.
        reason: Refusal,
    },
}

/// Outcome of an accepted request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Switch the relay to this state.
    Switch(bool),
    /// Already in that state: nothing to do, nothing counted.
    Unchanged,
}

/// Forced relay changes from [`Interlock::observe`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Observation {
    /// `Some(state)` when the relay must be switched now.
    pub switch: Option<bool>,
    /// Events to report.
    pub events: Vec<SafetyEvent>,
}

/// Defaults for the hardware-rating cut-off when the owner set none.
const HW_FOR_SECS: u16 = 2;
const HW_RETRY_AFTER_SECS: u32 = 60;
const HW_MAX_RETRIES: u8 = 3;
/// A load that ran this long without over-power clears the trip count.
const TRIP_RESET_SECS: i64 = 600;

/// The interlock state machine. Serializable so the device persists it
/// (a latched cut-off survives a reboot).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Interlock {
    cfg: InterlockConfig,
    hw_limit_w: u32,
    relay_on: bool,
    on_since: Option<Timestamp>,
    /// Instants of the switches in the last minute (at most the limit).
    toggles: VecDeque<Timestamp>,
    over_since: Option<Timestamp>,
    clean_since: Option<Timestamp>,
    trips: u8,
    lockout_until: Option<Timestamp>,
    latched: bool,
}

impl Interlock {
    /// A fresh interlock for a relay that is off. `hw_limit_w` is the relay's
    /// rating, fixed in firmware; configuration can only lower it.
    pub fn new(cfg: InterlockConfig, hw_limit_w: u32) -> Self {
        Interlock {
            cfg,
            hw_limit_w,
            relay_on: false,
            on_since: None,
            toggles: VecDeque::new(),
            over_since: None,
            clean_since: None,
            trips: 0,
            lockout_until: None,
            latched: false,
        }
    }

    /// Take new settings (after a rule-set edit) without forgetting the
    /// history: an edit must not reset a rate limit or a latch.
    pub fn reconfigure(&mut self, cfg: InterlockConfig) {
        self.cfg = cfg;
    }

    /// Whether the relay is on, as far as the interlock knows.
    pub fn relay_on(&self) -> bool {
        self.relay_on
    }

    /// Whether the over-power cut-off is latched.
    pub fn latched(&self) -> bool {
        self.latched
    }

    fn over_power(&self) -> OverPower {
        match &self.cfg.over_power {
            Some(o) => OverPower { limit_w: o.limit_w.min(self.hw_limit_w), ..o.clone() },
            None => OverPower {
                limit_w: self.hw_limit_w,
                for_secs: HW_FOR_SECS,
                retry_after_secs: HW_RETRY_AFTER_SECS,
                max_retries: HW_MAX_RETRIES,
                auto_retry: false,
            },
        }
    }

    fn set(&mut self, on: bool, now: Timestamp, counted: bool) {
        if counted {
            self.toggles.push_back(now);
        }
        self.relay_on = on;
        self.on_since = on.then_some(now);
        self.over_since = None;
        self.clean_since = on.then_some(now);
    }

    fn prune(&mut self, now: Timestamp) {
        while self.toggles.front().is_some_and(|t| now.as_second() - t.as_second() >= 60) {
            self.toggles.pop_front();
        }
    }

    /// Ask to switch. `Err` carries the reason to send back to the requester.
    pub fn request(&mut self, on: bool, source: Source, now: Timestamp) -> Result<Verdict, Refusal> {
        if on == self.relay_on {
            return Ok(Verdict::Unchanged);
        }
        // A person at the device may always switch off: stopping a load is
        // never the unsafe direction, and the flicker attack is remote.
        let local_off = !on && source == Source::Local;
        if on {
            if self.latched {
                return Err(Refusal::Latched);
            }
            if let Some(until) = self.lockout_until {
                if now < until {
                    return Err(Refusal::OverPowerLockout { until });
                }
                self.lockout_until = None;
            }
        }
        self.prune(now);
        let max = self.cfg.max_toggles_per_min;
        if !local_off && self.toggles.len() >= usize::from(max) {
            let oldest = self.toggles.front().map_or(0, |t| t.as_second());
            let retry = (oldest + 60 - now.as_second()).max(1) as u32;
            return Err(Refusal::RateLimited { max, retry_after_secs: retry });
        }
        self.set(on, now, !local_off);
        Ok(Verdict::Switch(on))
    }

    /// A person at the device reset the latch (long press, say). Remote
    /// sources are refused: that is the point of the latch.
    pub fn reset_latch(&mut self, source: Source) -> Result<(), Refusal> {
        if source != Source::Local {
            return Err(Refusal::Latched);
        }
        self.latched = false;
        self.trips = 0;
        self.lockout_until = None;
        Ok(())
    }

    /// Feed the time and, on energy plugs, the current power reading.
    /// Returns a forced switch (if any) and events. Call at least once a
    /// second while the relay is on.
    pub fn observe(&mut self, now: Timestamp, watts: Option<f32>) -> Observation {
        let mut obs = Observation::default();
        if !self.relay_on {
            // Auto-retry after an over-power lockout.
            let op = self.over_power();
            if op.auto_retry && !self.latched && self.lockout_until.is_some_and(|u| now >= u) {
                self.lockout_until = None;
                self.set(true, now, true);
                obs.switch = Some(true);
                obs.events.push(SafetyEvent::Retried { at: now });
            }
            return obs;
        }
        if let (Some(max), Some(since)) = (self.cfg.max_on_secs, self.on_since) {
            let on_secs = now.as_second() - since.as_second();
            if on_secs >= i64::from(max) {
                self.set(false, now, false);
                obs.switch = Some(false);
                obs.events.push(SafetyEvent::MaxOnTime { at: now, on_secs });
                return obs;
            }
        }
        let Some(w) = watts else { return obs };
        let op = self.over_power();
        // NaN readings count as over-power: a broken meter must fail safe.
        if w.is_nan() || w > op.limit_w as f32 {
            let since = *self.over_since.get_or_insert(now);
            self.clean_since = None;
            if now.as_second() - since.as_second() >= i64::from(op.for_secs) {
                self.trips = self.trips.saturating_add(1);
                self.latched = self.trips > op.max_retries;
                if !self.latched {
                    // Exponential backoff: 1×, 2×, 4× … the configured wait.
                    let wait = i64::from(op.retry_after_secs) << (self.trips - 1).min(10);
                    self.lockout_until = Timestamp::from_second(now.as_second() + wait).ok();
                }
                self.set(false, now, false);
                obs.switch = Some(false);
                obs.events.push(SafetyEvent::OverPower { at: now, watts: w, trip: self.trips, latched: self.latched });
            }
        } else {
            self.over_since = None;
            let clean = *self.clean_since.get_or_insert(now);
            if now.as_second() - clean.as_second() >= TRIP_RESET_SECS {
                self.trips = 0;
            }
        }
        obs
    }
}
