//! The device's rules and safety interlocks as persisted state (issue 5,
//! ADR 0005): the owner's rule set, the scheduler's runtime state and the
//! interlock's state machine, all from `hearth-rules`, which does no I/O.
//! [`crate::DeviceCore`] drives them; this module only holds them.

use hearth_rules::model::{PowerOnPolicy, RuleSet};
use hearth_rules::safety::Interlock;
use hearth_rules::schedule::RuntimeState;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// The relay's rating, fixed in firmware (16 A at 230 V). Configuration can
/// only lower the over-power limit, never raise it above this.
pub const HW_LIMIT_W: u32 = 3680;

/// The zone of a device whose owner has not set one yet.
pub const DEFAULT_ZONE: &str = "UTC";

/// Rules, scheduler state and interlock state, saved in `state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesState {
    /// The owner's rule set (version 0 until the first `SetRules`).
    pub set: RuleSet,
    /// What the scheduler must remember between ticks and reboots.
    pub runtime: RuntimeState,
    /// The interlock (a latched over-power cut-off survives a reboot).
    pub interlock: Interlock,
}

impl Default for RulesState {
    fn default() -> Self {
        let mut set = RuleSet::empty(DEFAULT_ZONE);
        // Until the owner says otherwise the relay keeps its last state over a
        // restart, as the device did before it had rules.
        set.power_on = PowerOnPolicy::Last;
        let interlock = Interlock::new(set.interlocks.clone(), HW_LIMIT_W);
        RulesState { set, runtime: RuntimeState::default(), interlock }
    }
}

impl PartialEq for RulesState {
    fn eq(&self, other: &Self) -> bool {
        // `Interlock` keeps its fields private and has no `PartialEq`; the
        // serialized form holds all of it, so comparing that is exact.
        serde_json::to_value(self).ok() == serde_json::to_value(other).ok()
    }
}

impl Eq for RulesState {}

/// A unix-seconds device clock reading as a [`Timestamp`].
pub fn timestamp(now: u64) -> Timestamp {
    // Beyond jiff's range (year 9999) the clock is broken; the epoch keeps
    // the arithmetic defined and every schedule simply not due.
    i64::try_from(now).ok().and_then(|s| Timestamp::from_second(s).ok()).unwrap_or(Timestamp::UNIX_EPOCH)
}
