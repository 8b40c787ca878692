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

/// The armed cross-device motion rules on a sensor (issue 5), as targets
/// for [`crate::lan::spawn_motion_sender`]. Targets whose id or key do not
/// parse are skipped with a warning (the set was validated for shape, not
/// for key encoding). `cadence`: the sensor reports on a fixed cadence
/// (ADR 0011); then a target may be reached through the cloud link only
/// if the owner allowed it in the rule (`allow_cloud`), since a command
/// sent at motion time shows the cloud when someone walked past.
pub fn motion_targets(set: &RuleSet, now: u64, cadence: bool) -> Vec<crate::lan::Target> {
    let tz = set.time_zone().unwrap_or(jiff::tz::TimeZone::UTC);
    hearth_rules::schedule::motion_targets(set, &tz, timestamp(now))
        .into_iter()
        .filter_map(|(t, off_after_secs)| {
            let device = t.device.parse().ok();
            let key = hearth_proto::b64::decode(&t.key).ok().and_then(|k| hearth_proto::keys::PublicKey::from_sec1(&k).ok());
            match (device, key) {
                (Some(device), Some(key)) => Some(crate::lan::Target {
                    device,
                    key,
                    addr: t.lan.clone(),
                    off_after_secs,
                    cloud_path: t.allow_cloud || !cadence,
                }),
                _ => {
                    tracing::warn!(target = %t.device, "motion rule: unreadable target id or key; skipped");
                    None
                }
            }
        })
        .collect()
}
