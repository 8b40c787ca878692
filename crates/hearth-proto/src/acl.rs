//! The device's access list and its decision function.
//!
//! The device is the only authority over who may control it. The cloud may
//! mirror this list for display but never decides with it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::capability::DeviceKind;
use crate::envelope::{self, Kind};
use crate::ids::{ControllerId, DeviceId};
use crate::keys::PublicKey;
use crate::message::{decode_command, Command, CommandPayload};
use crate::FRESHNESS_WINDOW_SECS;

/// Most controllers one device will hold; bounds the stored state.
pub const MAX_ENTRIES: usize = 64;

/// What a controller may do on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Paired first; may operate, share with any role, and revoke anyone.
    Owner,
    /// May operate, share as member, and revoke members.
    Admin,
    /// May operate the device; may not share.
    Member,
}

/// Limits on one controller's grant, checked by the device (ADR 0006).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scope {
    /// Unix seconds after which the grant is void: commands refused
    /// ([`Refusal::Expired`]) and nothing new is sealed for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<u64>,
    /// May read state but not change anything.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
    /// When this controller switches the relay on, the device switches it
    /// off again after this many seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_on_secs: Option<u64>,
    /// May switch the relay on and off (and read the state, and register
    /// its own key), nothing else: no rules, energy history, access list
    /// or updates. A motion sensor's grant on the device it switches
    /// (issue 5, ADR 0009).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub switch_only: bool,
}

impl Scope {
    /// No limits.
    pub fn is_unrestricted(&self) -> bool {
        self == &Scope::default()
    }

    /// Whether the grant has expired at `now`.
    pub fn expired(&self, now: u64) -> bool {
        self.until.is_some_and(|u| now > u)
    }
}

/// One controller on the access list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclEntry {
    /// The controller's id (derived from `key`).
    pub controller: ControllerId,
    /// Its public key.
    pub key: PublicKey,
    /// Its role.
    pub role: Role,
    /// Unix seconds when it was added.
    pub added_at: u64,
    /// Its HPKE encryption key, once registered (ADR 0006). Reports are
    /// sealed only for entries that have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enc: Option<crate::e2e::EncPublicKey>,
    /// Limits of the grant.
    #[serde(default, skip_serializing_if = "Scope::is_unrestricted")]
    pub scope: Scope,
}

/// Why a device refused a command. Sent back, signed, in the result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Refusal {
    /// The bytes were not a well-formed signed command.
    Malformed,
    /// The signer is not on this device's access list.
    NotPaired,
    /// The signature did not verify with the listed key.
    BadSignature,
    /// The command names another device.
    WrongDevice,
    /// The counter is not above the last one seen from this controller.
    Replayed,
    /// `issued_at` is outside the freshness window.
    Stale,
    /// The controller's role does not allow this command.
    NotPermitted,
    /// This device has no such capability.
    Unsupported,
    /// The controller's grant has expired.
    Expired,
    /// Safety interlock: too many relay switches in the last minute
    /// (protects the relay and the appliance from a flicker attack).
    TooManySwitches {
        /// Seconds until one more switch is allowed.
        retry_after_secs: u32,
    },
    /// Safety interlock: cut off for over-power, waiting before it may go on again.
    OverPowerLockout {
        /// Seconds until the relay may go on again.
        retry_after_secs: u32,
    },
    /// Safety interlock: cut off for over-power too often; only a person at
    /// the device can reset it.
    OverPowerLatched,
    /// The rule set was edited meanwhile: read it again and redo the edit.
    RulesConflict {
        /// The device's current rule-set version.
        current: u64,
    },
    /// The rule set is not valid (parse error or a value out of range).
    InvalidRules,
    /// A value in the command is out of its range (e.g. brightness 0 or
    /// 101 %, a fade over a minute).
    OutOfRange,
}

impl Refusal {
    /// A sentence a person can act on.
    pub fn explain(self) -> &'static str {
        match self {
            Refusal::Malformed => "the device could not read the command",
            Refusal::NotPaired => "this controller is not paired with the device",
            Refusal::BadSignature => "the command's signature is not valid",
            Refusal::WrongDevice => "the command was signed for another device",
            Refusal::Replayed => "the command was already used (replay refused)",
            Refusal::Stale => "the command is too old or from the future (check the clock)",
            Refusal::NotPermitted => "this controller's role does not allow that",
            Refusal::Unsupported => "the device cannot do that",
            Refusal::Expired => "this controller's access to the device has expired",
            Refusal::TooManySwitches { .. } => "safety interlock: too many switches in the last minute, try again later",
            Refusal::OverPowerLockout { .. } => "safety interlock: switched off for over-power, try again later",
            Refusal::OverPowerLatched => "safety interlock: switched off for over-power too often; press the device's button to reset",
            Refusal::RulesConflict { .. } => "the rules were changed meanwhile: read them again and redo the edit",
            Refusal::InvalidRules => "the device rejected the rule set as invalid",
            Refusal::OutOfRange => "a value in the command is out of range",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Variants with a number say it; the rest is the plain sentence.
        match self {
            Refusal::TooManySwitches { retry_after_secs } => {
                write!(f, "safety interlock: too many switches, try again in {retry_after_secs} s")
            }
            Refusal::OverPowerLockout { retry_after_secs } => {
                write!(f, "safety interlock: switched off for over-power, try again in {retry_after_secs} s")
            }
            Refusal::RulesConflict { current } => {
                write!(f, "the rules were changed meanwhile (now version {current}): read them again and redo the edit")
            }
            other => f.write_str(other.explain()),
        }
    }
}

/// The device's list of controllers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessList {
    entries: Vec<AclEntry>,
}

/// The highest counter seen per controller. Must be persisted before a
/// command takes effect, or a restart would reopen the replay window.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayState {
    last: BTreeMap<ControllerId, u64>,
}

impl ReplayState {
    /// Records an accepted command. Call only with a [`Decision`] from
    /// [`AccessList::decide`] on this state.
    pub fn commit(&mut self, decision: &Decision) {
        self.last.insert(decision.controller.clone(), decision.counter);
    }

    /// Forgets a controller (when it leaves the access list).
    pub fn forget(&mut self, controller: &ControllerId) {
        self.last.remove(controller);
    }

    /// The last accepted counter of a controller.
    pub fn last(&self, controller: &ControllerId) -> Option<u64> {
        self.last.get(controller).copied()
    }
}

/// A command the device may execute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Who sent it.
    pub controller: ControllerId,
    /// Their role.
    pub role: Role,
    /// Its counter (to commit).
    pub counter: u64,
    /// What to do.
    pub command: Command,
    /// The sender's on-time limit, for the device to enforce.
    pub max_on_secs: Option<u64>,
}

/// A refused command, with what could be learned about its sender so the
/// device can address a signed refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// Why.
    pub reason: Refusal,
    /// The claimed sender, when the envelope named one.
    pub controller: Option<ControllerId>,
    /// The claimed counter, when the payload could be read.
    pub counter: Option<u64>,
}

/// Facts about the device a decision depends on.
#[derive(Debug, Clone, Copy)]
pub struct DeviceContext<'a> {
    /// This device's id.
    pub device: &'a DeviceId,
    /// Its kind (for capability checks).
    pub kind: DeviceKind,
    /// The device clock, unix seconds.
    pub now: u64,
}

impl AccessList {
    /// The entries, in the order they were added.
    pub fn entries(&self) -> &[AclEntry] {
        &self.entries
    }

    /// Whether nobody is paired.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Looks up a controller.
    pub fn get(&self, controller: &ControllerId) -> Option<&AclEntry> {
        self.entries.iter().find(|e| &e.controller == controller)
    }

    /// Adds or replaces a controller. Returns false when the list is full.
    pub fn upsert(&mut self, key: PublicKey, role: Role, now: u64) -> bool {
        let controller = key.controller_id();
        if let Some(e) = self.entries.iter_mut().find(|e| e.controller == controller) {
            e.role = role;
            return true;
        }
        if self.entries.len() >= MAX_ENTRIES {
            return false;
        }
        self.entries.push(AclEntry { controller, key, role, added_at: now, enc: None, scope: Scope::default() });
        true
    }

    /// Whether `controller` is the only owner on the list.
    fn is_last_owner(&self, controller: &ControllerId) -> bool {
        let owners: Vec<_> = self.entries.iter().filter(|e| e.role == Role::Owner).collect();
        owners.len() == 1 && &owners[0].controller == controller
    }

    /// Sets a listed controller's grant limits. Returns false when the
    /// controller is not listed.
    pub fn set_scope(&mut self, controller: &ControllerId, scope: Scope) -> bool {
        match self.entries.iter_mut().find(|e| &e.controller == controller) {
            Some(e) => {
                e.scope = scope;
                true
            }
            None => false,
        }
    }

    /// [`AccessList::recipients`] without grants expired at `now`.
    pub fn recipients_at(&self, now: u64) -> Vec<(ControllerId, crate::e2e::EncPublicKey)> {
        self.entries
            .iter()
            .filter(|e| !e.scope.expired(now))
            .filter_map(|e| e.enc.clone().map(|k| (e.controller.clone(), k)))
            .collect()
    }

    /// Sets a listed controller's encryption key. Returns false when the
    /// controller is not listed.
    pub fn set_enc_key(&mut self, controller: &ControllerId, key: crate::e2e::EncPublicKey) -> bool {
        match self.entries.iter_mut().find(|e| &e.controller == controller) {
            Some(e) => {
                e.enc = Some(key);
                true
            }
            None => false,
        }
    }

    /// The controllers a report is sealed for: every listed controller with
    /// a registered encryption key (removed ones are simply absent, so they
    /// get no new ciphertext).
    pub fn recipients(&self) -> Vec<(ControllerId, crate::e2e::EncPublicKey)> {
        self.entries.iter().filter_map(|e| e.enc.clone().map(|k| (e.controller.clone(), k))).collect()
    }

    /// Removes one controller. Returns whether it was listed.
    pub fn remove(&mut self, controller: &ControllerId) -> bool {
        let before = self.entries.len();
        self.entries.retain(|e| &e.controller != controller);
        self.entries.len() != before
    }

    /// Removes every entry (factory reset).
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// Decides whether to execute a signed command. The steps, in order:
    ///
    /// 1. decode the COSE_Sign1 envelope and require the command content type;
    /// 2. find the signer (key id) on this access list;
    /// 3. verify the signature with that entry's key, and only then read the payload;
    /// 4. the payload must name this device and the same controller;
    /// 5. `issued_at` within [`FRESHNESS_WINDOW_SECS`] of the device clock
    ///    (a revoke may be older: see the step's comment);
    /// 6. `counter` strictly above the last one accepted from this controller;
    /// 7. the device has the capability and the role allows the command.
    ///
    /// Pure: nothing changes until the caller commits the decision's counter.
    pub fn decide(&self, ctx: DeviceContext<'_>, replay: &ReplayState, bytes: &[u8]) -> Result<Decision, Refused> {
        let refuse = |reason, controller: Option<&ControllerId>, counter| Refused {
            reason,
            controller: controller.cloned(),
            counter,
        };
        // Step 1.
        let unverified = envelope::open(bytes).map_err(|_| refuse(Refusal::Malformed, None, None))?;
        if unverified.kind() != Kind::Command {
            return Err(refuse(Refusal::Malformed, None, None));
        }
        // Step 2.
        let kid: [u8; ControllerId::BYTES] =
            unverified.key_id().try_into().map_err(|_| refuse(Refusal::Malformed, None, None))?;
        let claimed = ControllerId::from_bytes(kid);
        // The claimed counter is read before any check only to address the
        // signed refusal, so the sender can match it; nothing else uses it.
        let claimed_counter = crate::message::peek_counter(&unverified);
        let Some(entry) = self.get(&claimed) else {
            return Err(refuse(Refusal::NotPaired, Some(&claimed), claimed_counter));
        };
        // Step 3.
        let payload = unverified
            .verify(&entry.key)
            .map_err(|_| refuse(Refusal::BadSignature, Some(&claimed), claimed_counter))?;
        let cmd: CommandPayload =
            decode_command(&payload).map_err(|_| refuse(Refusal::Malformed, Some(&claimed), claimed_counter))?;
        let counter = Some(cmd.counter);
        // Step 4.
        if cmd.controller != entry.controller {
            return Err(refuse(Refusal::Malformed, Some(&claimed), counter));
        }
        if &cmd.device != ctx.device {
            return Err(refuse(Refusal::WrongDevice, Some(&claimed), counter));
        }
        // Step 5. Off-spec for revokes: a `RemoveController` signed in the
        // past is accepted however old it is, so a revoke the cloud held for
        // a device that was offline (issue 3: "before anything else on
        // reconnect") still takes effect. This is safe because a revoke only
        // takes access away, and step 6 still orders it: once the device
        // accepted any later command of the same controller, the held revoke
        // is refused as replayed. Step 6 forgets a removed controller's
        // counter, so the exemption holds only for a revoke issued no earlier
        // than the current entries of its signer and of its target were
        // added: a revoke from before a re-add (of either) gets the normal
        // window, and cannot undo the re-add. One from the future is refused
        // as usual.
        let revoke_from_the_past = match &cmd.command {
            Command::RemoveController { controller } => {
                cmd.issued_at <= ctx.now
                    && cmd.issued_at >= entry.added_at
                    && self.get(controller).is_none_or(|target| cmd.issued_at >= target.added_at)
            }
            _ => false,
        };
        if cmd.issued_at.abs_diff(ctx.now) > FRESHNESS_WINDOW_SECS && !revoke_from_the_past {
            return Err(refuse(Refusal::Stale, Some(&claimed), counter));
        }
        // Step 6.
        if replay.last(&entry.controller).is_some_and(|last| cmd.counter <= last) {
            return Err(refuse(Refusal::Replayed, Some(&claimed), counter));
        }
        // Step 7.
        if let Some(cap) = cmd.command.needs() {
            if !ctx.kind.has(cap) {
                return Err(refuse(Refusal::Unsupported, Some(&claimed), counter));
            }
        }
        if entry.scope.expired(ctx.now) {
            return Err(refuse(Refusal::Expired, Some(&claimed), counter));
        }
        let own_key = matches!(cmd.command, Command::RegisterKey { .. });
        if entry.scope.read_only && cmd.command.is_write() && !own_key {
            return Err(refuse(Refusal::NotPermitted, Some(&claimed), counter));
        }
        let switching = matches!(cmd.command, Command::SetRelay { .. } | Command::Toggle | Command::GetState);
        if entry.scope.switch_only && !switching && !own_key {
            return Err(refuse(Refusal::NotPermitted, Some(&claimed), counter));
        }
        let is_member_or_new = |c: &ControllerId| self.get(c).is_none_or(|t| t.role == Role::Member);
        let allowed = match (&cmd.command, entry.role) {
            // Rules and safety interlocks: owners and admins only (a member,
            // even an unrestricted one, may switch but not reconfigure).
            (c, role) if c.is_config_change() => matches!(role, Role::Owner | Role::Admin),
            (c, _) if !c.is_access_change() => true,
            // Nobody may leave the device without an owner (only the reset
            // button recovers from that).
            (Command::RemoveController { controller }, _) if self.is_last_owner(controller) => false,
            (Command::AddController { key, role, .. }, _) if *role != Role::Owner && self.is_last_owner(&key.controller_id()) => false,
            (_, Role::Owner) => true,
            // An admin shares as member only, and touches members only (so it
            // cannot demote or re-key an owner or another admin).
            (Command::AddController { key, role, .. }, Role::Admin) => *role == Role::Member && is_member_or_new(&key.controller_id()),
            (Command::RemoveController { controller }, Role::Admin) => is_member_or_new(controller),
            _ => false,
        };
        if !allowed {
            return Err(refuse(Refusal::NotPermitted, Some(&claimed), counter));
        }
        Ok(Decision {
            controller: entry.controller.clone(),
            role: entry.role,
            counter: cmd.counter,
            command: cmd.command,
            max_on_secs: entry.scope.max_on_secs,
        })
    }
}
