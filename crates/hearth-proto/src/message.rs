//! The signed payloads. Each is CBOR (RFC 8949) inside a COSE_Sign1
//! envelope; unknown fields are refused.

use p256::ecdsa::SigningKey;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::acl::Refusal;
use crate::capability::{Capability, DeviceKind};
use crate::envelope::{self, Kind};
use crate::error::malformed;
use crate::ids::{ControllerId, DeviceId};
use crate::keys::PublicKey;
use crate::{Error, PROTOCOL_VERSION};

/// What a controller asks a device to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Command {
    /// Switch the relay on or off.
    SetRelay {
        /// The wanted relay state.
        on: bool,
    },
    /// Flip the relay.
    Toggle,
    /// Set a dimmable light's brightness, 1–100 %, reached over `fade_ms`
    /// (at most 60 s). Switches the light on if it is off (through the
    /// safety interlock like any switch). Dimmers only.
    SetBrightness {
        /// Brightness in percent, 1–100.
        percent: u8,
        /// Fade time in milliseconds, 0 for at once.
        #[serde(default, skip_serializing_if = "is_zero")]
        fade_ms: u32,
    },
    /// Report the current state (read-only).
    GetState,
    /// Report the energy history since `since` (unix seconds), energy
    /// meters only. Answered as [`Outcome::Energy`], only ever sealed, so
    /// the cloud never sees a reading (issue 5).
    GetEnergy {
        /// The oldest time wanted, unix seconds.
        since: u64,
        /// The bucket size; by default the finest whose history still
        /// reaches back to `since`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resolution: Option<EnergyResolution>,
    },
    /// Register (or replace) the sender's own HPKE encryption key, so the
    /// device seals its reports for it (ADR 0006). Signed by the controller
    /// like any command, so nobody else — the cloud included — can set it.
    RegisterKey {
        /// The sender's HPKE public key.
        key: crate::e2e::EncPublicKey,
    },
    /// Add (or change the role of) another controller, with the encryption
    /// key the sender vouches for. Owners only: the device checks the
    /// sender's role, so the cloud relaying it decides nothing.
    AddController {
        /// The new controller's signing key.
        key: PublicKey,
        /// Its HPKE key.
        enc: crate::e2e::EncPublicKey,
        /// Its role.
        role: crate::acl::Role,
        /// Limits of the grant.
        #[serde(default, skip_serializing_if = "crate::acl::Scope::is_unrestricted")]
        scope: crate::acl::Scope,
    },
    /// Report the access list (answered in the result, signed and sealed).
    GetAccess,
    /// Remove a controller: its commands are refused and it is no longer a
    /// recipient of anything sealed from the next frame on. Owners only.
    RemoveController {
        /// Who to remove.
        controller: ControllerId,
    },
    /// Replace the device's rule set (schedules, timers, away mode, motion
    /// rules, safety interlocks) atomically. Owners and admins only. The
    /// device accepts it only if its current version is `base_version`
    /// (optimistic concurrency: two editors cannot silently overwrite each
    /// other) and stores it as version `base_version + 1`.
    SetRules {
        /// The version the edit was made against.
        base_version: u64,
        /// The new rule set, JSON (hearth-rules `RuleSet`; its `version` is ignored).
        rules: String,
    },
    /// Report the rule set (answered as [`Outcome::Rules`], only sealed).
    GetRules,
    /// Set how the device installs firmware updates (issue 4): automatic
    /// (optionally only in a time window) or only after approval. Stored
    /// on the device; owners and admins only.
    SetUpdatePolicy {
        /// The new policy.
        policy: UpdatePolicy,
    },
    /// Check the firmware repository now (and, under the automatic policy,
    /// install what is found at once, window or not). Owners and admins only.
    CheckUpdate,
    /// Approve installing firmware `version` (under the approval policy).
    /// The device still verifies it with TUF and refuses a downgrade; the
    /// approval only lifts the owner's own hold. Owners and admins only.
    ApproveUpdate {
        /// The version the owner saw offered and approves.
        version: String,
    },
}

/// How a device installs firmware updates the repository offers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdatePolicy {
    /// Automatic or per-update approval.
    pub mode: UpdateMode,
    /// Automatic installs start only inside this daily window (UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<UpdateWindow>,
}

/// Whether updates need the owner's approval.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpdateMode {
    /// Install verified updates by itself (the default: security fixes
    /// should not wait for someone to open an app).
    #[default]
    Automatic,
    /// Offer each update and install it only after [`Command::ApproveUpdate`].
    Approval,
}

/// A daily window in minutes after midnight UTC, `start` inclusive, `end`
/// exclusive; `start > end` wraps past midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateWindow {
    /// First minute of the day (0–1439).
    pub start_min: u16,
    /// Minute the window closes (0–1439).
    pub end_min: u16,
}

impl UpdateWindow {
    /// Whether both ends are minutes of a day and the window is not empty.
    pub fn is_valid(&self) -> bool {
        self.start_min < 1440 && self.end_min < 1440 && self.start_min != self.end_min
    }

    /// Whether unix time `now` falls inside the window.
    pub fn contains(&self, now: u64) -> bool {
        let m = u16::try_from(now % 86_400 / 60).unwrap_or(0);
        if self.start_min <= self.end_min {
            (self.start_min..self.end_min).contains(&m)
        } else {
            m >= self.start_min || m < self.end_min
        }
    }
}

/// Where an update stands on the device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpdatePhase {
    /// Nothing in progress.
    #[default]
    Idle,
    /// Refreshing TUF metadata.
    Checking,
    /// A verified update is offered and waits for [`Command::ApproveUpdate`].
    AwaitingApproval,
    /// Downloading the image (see `progress`).
    Downloading,
    /// Writing the image into the inactive slot (see `progress`).
    Installing,
    /// Installed; the device restarts into the new image on trial.
    Restarting,
}

/// Bytes done of a download or slot write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateProgress {
    /// Bytes done.
    pub done: u64,
    /// Bytes in all (the length from signed target metadata).
    pub total: u64,
}

/// The firmware part of a device's signed state (issue 4).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirmwareStatus {
    /// The running firmware version.
    pub version: String,
    /// The running slot (`a`/`b`), when the device has A/B slots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<String>,
    /// The stored update policy.
    pub policy: UpdatePolicy,
    /// What the updater is doing.
    pub phase: UpdatePhase,
    /// Download or install progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<UpdateProgress>,
    /// The version offered, being installed, or awaiting approval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offered: Option<String>,
    /// When the repository was last checked (unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checked_at: Option<u64>,
    /// The outcome of the last check, for people (e.g. why an update was refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_check: Option<String>,
    /// The outcome of the last install (committed, or failed and rolled back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_result: Option<String>,
}

impl Command {
    /// The capability a device needs to execute this command, if any.
    pub fn needs(&self) -> Option<Capability> {
        match self {
            Command::SetRelay { .. } | Command::Toggle => Some(Capability::Switch),
            Command::GetEnergy { .. } => Some(Capability::EnergyMeter),
            Command::SetBrightness { .. } => Some(Capability::Dimmer),
            Command::GetState
            | Command::GetAccess
            | Command::SetRules { .. }
            | Command::GetRules
            | Command::RegisterKey { .. }
            | Command::AddController { .. }
            | Command::RemoveController { .. }
            | Command::SetUpdatePolicy { .. }
            | Command::CheckUpdate
            | Command::ApproveUpdate { .. } => None,
        }
    }

    /// Whether the command changes who may use the device (owners only).
    pub fn is_access_change(&self) -> bool {
        matches!(self, Command::AddController { .. } | Command::RemoveController { .. })
    }

    /// Whether the command changes anything on the device.
    pub fn is_write(&self) -> bool {
        !matches!(self, Command::GetState | Command::GetAccess | Command::GetRules | Command::GetEnergy { .. })
    }

    /// Whether the command changes the device's configuration (rules and
    /// safety interlocks): owners and admins only.
    pub fn is_config_change(&self) -> bool {
        matches!(
            self,
            Command::SetRules { .. } | Command::SetUpdatePolicy { .. } | Command::CheckUpdate | Command::ApproveUpdate { .. }
        )
    }
}

/// Controller → device. Signed by the controller; `kid` is its controller id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandPayload {
    /// Protocol version, always [`PROTOCOL_VERSION`].
    pub v: u8,
    /// The device this command is for; a device refuses commands for others.
    pub device: DeviceId,
    /// The signer; must match the envelope's key id.
    pub controller: ControllerId,
    /// Strictly increasing per controller (replay protection).
    pub counter: u64,
    /// Unix seconds when the controller signed it (freshness).
    pub issued_at: u64,
    /// What to do.
    pub command: Command,
}

/// The state a device reports. Fields a device does not have are absent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceState {
    /// Relay on/off, for devices with [`Capability::Switch`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<bool>,
    /// Motion detected, for motion sensors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub motion: Option<bool>,
    /// Instantaneous power in milliwatts, for energy meters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_mw: Option<u64>,
    /// Firmware version, slot, update policy, progress and last result,
    /// for devices with an update client (issue 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<FirmwareStatus>,
    /// Brightness in percent (the level it has when on), for dimmers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub brightness: Option<u8>,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// Longest fade a [`Command::SetBrightness`] may ask for, in milliseconds.
pub const MAX_FADE_MS: u32 = 60_000;

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case", deny_unknown_fields)]
pub enum Outcome {
    /// The device executed the command.
    Done,
    /// The device refused it, and why.
    Refused {
        /// The reason.
        reason: Refusal,
    },
    /// The answer to [`Command::GetRules`]: the stored rule set as JSON.
    /// Only ever sent inside a sealed result.
    Rules {
        /// The rule set (hearth-rules `RuleSet` JSON), with its version.
        rules: String,
    },
    /// The answer to [`Command::GetEnergy`]. Only ever sent sealed.
    Energy {
        /// The history and totals.
        report: EnergyReport,
    },
}

/// The bucket size of an energy history (hearth-rules `energy::Resolution`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnergyResolution {
    /// Per minute (the last 24 h); bucket = unix minute.
    Minute,
    /// Per hour (the last 90 days); bucket = unix hour.
    Hour,
    /// Per local day (the last 2 years); bucket = days since 1970-01-01 of
    /// the local date in `timezone`.
    Day,
}

/// Most buckets one [`EnergyReport`] carries (90 days of hours), so an
/// answer always fits a frame.
pub const MAX_ENERGY_BUCKETS: usize = 2160;

/// An energy meter's history and totals, as the device keeps them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnergyReport {
    /// The bucket size (absent only in an empty report).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolution: Option<EnergyResolution>,
    /// Bucket number of the first entry.
    pub first: i64,
    /// Energy per bucket, milliwatt-hours, oldest first.
    pub energy_mwh: Vec<u32>,
    /// Seconds the relay was on per bucket.
    pub on_secs: Vec<u32>,
    /// Energy today (local day), mWh.
    pub today_mwh: u64,
    /// On-time today, seconds.
    pub today_on_secs: u64,
    /// Lifetime energy, mWh.
    pub total_mwh: u64,
    /// Lifetime on-time, seconds.
    pub total_on_secs: u64,
    /// Power now, milliwatts.
    pub power_mw: u64,
    /// Relay on with the load below the owner's standby threshold.
    pub standby: bool,
    /// The device's zone (day buckets are its local days).
    pub timezone: String,
    /// Price per kWh in thousandths of `currency`, if the owner set one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price_per_kwh_milli: Option<u32>,
    /// ISO 4217 currency of the price.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
}

/// Device → controller: the answer to one command. Signed by the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResultPayload {
    /// Protocol version.
    pub v: u8,
    /// The device answering.
    pub device: DeviceId,
    /// The controller the command claimed to come from.
    pub controller: ControllerId,
    /// The command's counter, so the controller can match the answer.
    pub counter: u64,
    /// Done or refused.
    pub outcome: Outcome,
    /// The device's state after the command.
    pub state: DeviceState,
    /// Device clock, unix seconds.
    pub at: u64,
    /// The access list, in answer to [`Command::GetAccess`] (and only in a
    /// sealed result).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<Vec<crate::acl::AclEntry>>,
}

/// Why the device's state changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "by", rename_all = "snake_case", deny_unknown_fields)]
pub enum Cause {
    /// A controller's command.
    Command {
        /// Who sent it.
        controller: ControllerId,
    },
    /// Something on the device itself (button, sensor, boot).
    Local,
    /// One of the device's own rules (schedule, timer, away mode, motion).
    Rule {
        /// The rule's id, when a single rule caused it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rule: Option<u32>,
    },
    /// A safety interlock switched the relay (max on-time, over-power).
    Interlock {
        /// What happened, for people.
        event: String,
    },
    /// A periodic or on-connect report with no change.
    Report,
    /// The energy meter noticed something ("on for more than N hours",
    /// "entered standby"); over-power is an [`Cause::Interlock`] event.
    Energy {
        /// What happened, for people.
        event: String,
    },
    /// A fixed-cadence report (ADR 0011): sent on schedule whether or not
    /// anything happened, so its timing tells the cloud nothing.
    Cadence {
        /// Device-clock times (unix seconds) of the motion seen since the
        /// previous report, oldest first, at most [`MAX_MOTION_BATCH`].
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        motion_at: Vec<u64>,
        /// Device-clock times (unix seconds) the state went from motion to
        /// no motion (the owner's no-motion delay after the last walk-past)
        /// since the previous report, oldest first, at most
        /// [`MAX_MOTION_BATCH`] (issue 5).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        no_motion_at: Vec<u64>,
    },
}

/// Device → all controllers: the current state. Signed by the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatePayload {
    /// Protocol version.
    pub v: u8,
    /// The reporting device.
    pub device: DeviceId,
    /// What kind of device it is.
    pub kind: DeviceKind,
    /// Increases with every report the device makes (persisted), so a
    /// controller can ignore an older report delivered late or replayed.
    pub seq: u64,
    /// Device clock, unix seconds.
    pub at: u64,
    /// The state.
    pub state: DeviceState,
    /// Why this report was made.
    pub cause: Cause,
}

/// Most motion events one fixed-cadence report carries; a device that saw
/// more in one period keeps the first ones and the latest (ADR 0011).
pub const MAX_MOTION_BATCH: usize = 16;

pub(crate) fn to_cbor<T: Serialize>(value: &T, what: &'static str) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    ciborium::into_writer(value, &mut out).map_err(|_| Error::Encode(what))?;
    Ok(out)
}

pub(crate) fn from_cbor<T: DeserializeOwned>(bytes: &[u8], what: &'static str) -> Result<T, Error> {
    // ciborium bounds recursion itself; sizes are bounded by the envelope limit.
    ciborium::from_reader(bytes).map_err(|e| malformed(what, e))
}

fn check_version(v: u8, what: &'static str) -> Result<(), Error> {
    if v == PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(malformed(what, format!("protocol version {v} is not supported")))
    }
}

/// Signs a command with the controller's key.
pub fn sign_command(key: &SigningKey, payload: &CommandPayload) -> Result<Vec<u8>, Error> {
    let id = ControllerId::of_key(&PublicKey::from(key));
    if id != payload.controller {
        return Err(Error::Encode("command signed by a key that is not its controller"));
    }
    envelope::sign(key, Kind::Command, &hex::decode(id.as_str()).map_err(|_| Error::Encode("id"))?, to_cbor(payload, "command")?)
}

/// Decodes a command payload that has already been verified.
pub fn decode_command(verified_payload: &[u8]) -> Result<CommandPayload, Error> {
    let p: CommandPayload = from_cbor(verified_payload, "command")?;
    check_version(p.v, "command")?;
    Ok(p)
}

/// The key id a device signs with: its raw device id bytes.
pub fn device_key_id(device: &DeviceId) -> Vec<u8> {
    // A DeviceId is always valid lowercase hex, so this decode cannot fail.
    hex::decode(device.as_str()).unwrap_or_default()
}

/// Signs a command result with the device's key.
pub fn sign_result(key: &SigningKey, payload: &ResultPayload) -> Result<Vec<u8>, Error> {
    envelope::sign(key, Kind::CommandResult, &device_key_id(&payload.device), to_cbor(payload, "result")?)
}

/// Verifies a command result from `device` with the device's public key.
pub fn verify_result(bytes: &[u8], device: &DeviceId, key: &PublicKey) -> Result<ResultPayload, Error> {
    let payload = envelope::open(bytes)?.verify_as(Kind::CommandResult, key)?;
    let p: ResultPayload = from_cbor(&payload, "result")?;
    check_version(p.v, "result")?;
    if &p.device != device {
        return Err(malformed("result", format!("signed for device {}, expected {device}", p.device)));
    }
    Ok(p)
}

/// Signs a state report with the device's key.
pub fn sign_state(key: &SigningKey, payload: &StatePayload) -> Result<Vec<u8>, Error> {
    envelope::sign(key, Kind::StateReport, &device_key_id(&payload.device), to_cbor(payload, "state report")?)
}

/// Verifies a state report from `device` with the device's public key.
pub fn verify_state(bytes: &[u8], device: &DeviceId, key: &PublicKey) -> Result<StatePayload, Error> {
    let payload = envelope::open(bytes)?.verify_as(Kind::StateReport, key)?;
    let p: StatePayload = from_cbor(&payload, "state report")?;
    check_version(p.v, "state report")?;
    if &p.device != device {
        return Err(malformed("state report", format!("signed for device {}, expected {device}", p.device)));
    }
    Ok(p)
}

/// Reads the device id a result or state envelope claims, without
/// verifying it (for routing and for picking the key to verify with).
pub fn claimed_device(bytes: &[u8]) -> Result<DeviceId, Error> {
    let u = envelope::open(bytes)?;
    let id: [u8; DeviceId::BYTES] =
        u.key_id().try_into().map_err(|_| malformed("envelope", "key id is not a device id"))?;
    Ok(DeviceId::from_bytes(id))
}

/// Routing facts read from an envelope *without* verifying it: the claimed
/// controller and counter of a command or of a result. The cloud uses them
/// only to match a result to the request waiting for it; nothing is trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peek {
    /// The claimed device.
    pub device: DeviceId,
    /// The claimed controller.
    pub controller: ControllerId,
    /// The claimed counter.
    pub counter: u64,
}

/// The counter a command envelope claims, unverified (to address a refusal).
pub(crate) fn peek_counter(u: &envelope::Unverified) -> Option<u64> {
    from_cbor::<CommandPayload>(&u.clone().into_unverified_payload(), "command").ok().map(|p| p.counter)
}

/// Reads the routing facts of a command envelope without verifying it.
pub fn peek_command(bytes: &[u8]) -> Result<Peek, Error> {
    let u = envelope::open(bytes)?;
    if u.kind() != Kind::Command {
        return Err(malformed("command", "envelope is not a command"));
    }
    let p: CommandPayload = from_cbor(&u.into_unverified_payload(), "command")?;
    Ok(Peek { device: p.device, controller: p.controller, counter: p.counter })
}

/// Reads the routing facts of a result envelope without verifying it.
pub fn peek_result(bytes: &[u8]) -> Result<Peek, Error> {
    let u = envelope::open(bytes)?;
    if u.kind() != Kind::CommandResult {
        return Err(malformed("result", "envelope is not a command result"));
    }
    let p: ResultPayload = from_cbor(&u.into_unverified_payload(), "result")?;
    Ok(Peek { device: p.device, controller: p.controller, counter: p.counter })
}

/// Whether a command envelope claims to be a revoke (`RemoveController`),
/// read *without* verifying it. The cloud uses it only to decide which
/// commands for an offline device it keeps to deliver first on reconnect
/// (issue 3); the device verifies everything itself.
pub fn peek_is_revoke(bytes: &[u8]) -> bool {
    envelope::open(bytes)
        .ok()
        .filter(|u| u.kind() == Kind::Command)
        .and_then(|u| from_cbor::<CommandPayload>(&u.into_unverified_payload(), "command").ok())
        .is_some_and(|p| matches!(p.command, Command::RemoveController { .. }))
}
