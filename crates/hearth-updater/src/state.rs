//! The sans-IO A/B slot state machine (ADR 0004 "Install", "Trial boot").
//!
//! A [`BootRecord`] is the whole truth about which image a device starts.
//! Transitions are methods that either change the record or refuse; the
//! caller persists the record with [`crate::store`] *before* acting on the
//! decision, so a crash between the two never runs ahead of the record.

use serde::{Deserialize, Serialize};

use crate::{Error, Version};

/// How many times a trial slot may be started before it is reverted without
/// waiting for a health report. One: a trial that was started and neither
/// confirmed nor failed (power loss, kill -9 of the supervisor, a hang that
/// outlived the supervisor) is not given a second chance.
pub const MAX_TRIAL_BOOTS: u32 = 1;

/// One of the two slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    /// Slot A.
    A,
    /// Slot B.
    B,
}

impl Slot {
    /// The other slot.
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    /// Directory name under `slots/`.
    pub fn name(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }
}

/// What a slot holds, taken from verified TUF target metadata.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotImage {
    /// Firmware version (`custom.hearth.version`).
    pub version: Version,
    /// Exact length in bytes.
    pub length: u64,
    /// Lower-case hex sha256 of the image.
    pub sha256: String,
}

/// A trial in progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trial {
    /// The slot being tried (always the inactive one).
    pub slot: Slot,
    /// How many times the trial slot has been started.
    pub boots: u32,
}

/// Outcome of the last update attempt, for the agent to report (signed) on its next link.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum UpdateResult {
    /// The trial passed its health check and is now the active slot.
    Committed {
        /// The committed version.
        version: Version,
        /// Its slot.
        slot: Slot,
    },
    /// The trial failed and the device went back to the previous slot.
    Failed {
        /// The version that failed.
        version: Version,
        /// The slot it was in.
        slot: Slot,
        /// Why (exit status, health timeout, interrupted trial, bad checksum).
        reason: String,
    },
    /// `install_command` accepted the image (exit 0): the system updater
    /// owns it now (ADR 0010 "Install command hand-off"). The slots did not change.
    HandedOff {
        /// The version handed over.
        version: Version,
    },
    /// The hand-off failed: the staged image did not verify, the hook
    /// failed or timed out, or it was interrupted. The running image keeps running.
    HandoffFailed {
        /// The version that was staged.
        version: Version,
        /// Why.
        reason: String,
    },
}

/// `boot.json`: which slot to start and what each slot holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootRecord {
    /// The slot that last proved healthy (or the factory slot).
    pub active: Slot,
    /// Slot A's image, if any.
    pub a: Option<SlotImage>,
    /// Slot B's image, if any.
    pub b: Option<SlotImage>,
    /// A trial in progress, if any.
    pub trial: Option<Trial>,
    /// The last update's outcome.
    pub last_result: Option<UpdateResult>,
}

/// What the boot loader should do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BootDecision {
    /// Start `slot` normally.
    Normal {
        /// Slot to start.
        slot: Slot,
    },
    /// Start `slot` as a trial: it must report health within the timeout.
    Trial {
        /// Slot to start.
        slot: Slot,
    },
}

impl BootDecision {
    /// The slot to start.
    pub fn slot(&self) -> Slot {
        match self {
            BootDecision::Normal { slot } | BootDecision::Trial { slot } => *slot,
        }
    }
}

impl BootRecord {
    /// A factory record: `image` in slot A, active, no trial.
    pub fn factory(image: SlotImage) -> Self {
        BootRecord { active: Slot::A, a: Some(image), b: None, trial: None, last_result: None }
    }

    /// The image recorded for `slot`.
    pub fn image(&self, slot: Slot) -> Option<&SlotImage> {
        match slot {
            Slot::A => self.a.as_ref(),
            Slot::B => self.b.as_ref(),
        }
    }

    fn image_mut(&mut self, slot: Slot) -> &mut Option<SlotImage> {
        match slot {
            Slot::A => &mut self.a,
            Slot::B => &mut self.b,
        }
    }

    /// Version of the running (active) slot, if recorded.
    pub fn running_version(&self) -> Option<&Version> {
        self.image(self.active).map(|i| &i.version)
    }

    /// Checks that `offered` may be installed and returns the slot to write
    /// (the inactive one). ADR 0004 "Install": refuse anything not higher than
    /// the running version, and refuse while a trial is undecided (its slot
    /// is the inactive one and must not be overwritten under it).
    ///
    /// # Errors
    /// [`Error::NotNewer`], [`Error::TrialInProgress`].
    pub fn plan_install(&self, offered: &Version) -> Result<Slot, Error> {
        if let Some(t) = &self.trial {
            let version = self.image(t.slot).map_or_else(|| offered.clone(), |i| i.version.clone());
            return Err(Error::TrialInProgress { version });
        }
        if let Some(running) = self.running_version() {
            if offered <= running {
                return Err(Error::NotNewer { offered: offered.clone(), running: running.clone() });
            }
        }
        Ok(self.active.other())
    }

    /// The switch (ADR 0004): records `image` in the inactive slot and starts
    /// a trial of it. Persisting this record is the single atomic switch point.
    ///
    /// # Errors
    /// As [`BootRecord::plan_install`].
    pub fn start_trial(&mut self, image: SlotImage) -> Result<Slot, Error> {
        let slot = self.plan_install(&image.version)?;
        *self.image_mut(slot) = Some(image);
        self.trial = Some(Trial { slot, boots: 0 });
        Ok(slot)
    }

    /// Decides what to start (ADR 0004 "Crash safety"). With a trial pending
    /// it counts one more boot; a trial already started [`MAX_TRIAL_BOOTS`]
    /// times without a verdict is reverted here. Persist the record before
    /// starting anything.
    pub fn on_boot(&mut self) -> BootDecision {
        if let Some(t) = &mut self.trial {
            if t.boots < MAX_TRIAL_BOOTS {
                t.boots += 1;
                return BootDecision::Trial { slot: t.slot };
            }
            let _ = self.fail_trial("trial was interrupted before reporting health".into());
        }
        BootDecision::Normal { slot: self.active }
    }

    /// The trial reported health: its slot becomes active.
    ///
    /// # Errors
    /// [`Error::NoTrial`].
    pub fn commit_trial(&mut self) -> Result<(), Error> {
        let t = self.trial.take().ok_or(Error::NoTrial)?;
        self.active = t.slot;
        let version = self.image(t.slot).map(|i| i.version.clone()).ok_or(Error::NoTrial)?;
        self.last_result = Some(UpdateResult::Committed { version, slot: t.slot });
        Ok(())
    }

    /// The trial failed: back to the previous slot, failure recorded.
    ///
    /// # Errors
    /// [`Error::NoTrial`].
    pub fn fail_trial(&mut self, reason: String) -> Result<(), Error> {
        let t = self.trial.take().ok_or(Error::NoTrial)?;
        let version = self.image(t.slot).map(|i| i.version.clone()).ok_or(Error::NoTrial)?;
        self.last_result = Some(UpdateResult::Failed { version, slot: t.slot, reason });
        Ok(())
    }

    /// The active slot's image failed verification at boot: if the other
    /// slot holds a recorded image, make it active (it is verified before it
    /// is started in turn). Returns whether there is anything left to try.
    pub fn active_corrupt(&mut self) -> bool {
        let bad = self.active;
        *self.image_mut(bad) = None;
        if self.image(bad.other()).is_some() {
            self.active = bad.other();
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(v: &str) -> SlotImage {
        SlotImage { version: Version::parse(v).unwrap(), length: 1, sha256: "00".into() }
    }

    #[test]
    fn trial_then_commit_switches_active() {
        let mut r = BootRecord::factory(img("1"));
        assert_eq!(r.start_trial(img("2")).unwrap(), Slot::B);
        assert_eq!(r.on_boot(), BootDecision::Trial { slot: Slot::B });
        r.commit_trial().unwrap();
        assert_eq!(r.active, Slot::B);
        assert_eq!(r.on_boot(), BootDecision::Normal { slot: Slot::B });
        assert_eq!(r.plan_install(&Version::parse("3").unwrap()).unwrap(), Slot::A);
    }

    #[test]
    fn failed_trial_keeps_previous_and_records_version() {
        let mut r = BootRecord::factory(img("1"));
        r.start_trial(img("2")).unwrap();
        r.on_boot();
        r.fail_trial("exited".into()).unwrap();
        assert_eq!(r.active, Slot::A);
        assert!(matches!(&r.last_result, Some(UpdateResult::Failed { version, slot: Slot::B, .. }) if version.to_string() == "2"));
    }

    #[test]
    fn interrupted_trial_reverts_on_next_boot() {
        let mut r = BootRecord::factory(img("1"));
        r.start_trial(img("2")).unwrap();
        assert!(matches!(r.on_boot(), BootDecision::Trial { .. }));
        // Power loss here: the next boot must not try the trial again.
        assert_eq!(r.on_boot(), BootDecision::Normal { slot: Slot::A });
        assert!(matches!(r.last_result, Some(UpdateResult::Failed { .. })));
    }

    #[test]
    fn never_downgrade_or_reinstall() {
        let r = BootRecord::factory(img("2.1"));
        for v in ["2.1", "2.0.9", "1", "2.1.0"] {
            assert!(matches!(r.plan_install(&Version::parse(v).unwrap()), Err(Error::NotNewer { .. })), "{v}");
        }
    }

    #[test]
    fn no_install_during_trial() {
        let mut r = BootRecord::factory(img("1"));
        r.start_trial(img("2")).unwrap();
        assert!(matches!(r.plan_install(&Version::parse("3").unwrap()), Err(Error::TrialInProgress { .. })));
    }

    #[test]
    fn corrupt_active_falls_back_to_other_slot_once() {
        let mut r = BootRecord::factory(img("1"));
        r.start_trial(img("2")).unwrap();
        r.on_boot();
        r.commit_trial().unwrap();
        assert!(r.active_corrupt());
        assert_eq!(r.active, Slot::A);
        assert!(!r.active_corrupt());
    }
}
