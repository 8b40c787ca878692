//! The device's protocol core: its state plus an input (a cloud frame, a
//! button press, a reset) gives the frames to send. No sockets and no
//! clock; storage is the [`StateStore`] passed in, time is a `now`
//! argument. The tokio agent only moves bytes.
//!
//! Every change is made on a copy of the state, saved, and only then
//! adopted and reported: if saving fails, nothing changes and nothing is
//! reported, so the device never claims an effect (or accepts a counter, or
//! forgets a failed pairing attempt) that a restart would undo.

use hearth_proto::acl::{AccessList, DeviceContext, Refusal, Role};
use hearth_proto::e2e::{self, Addressed, Content, SealedHeader};
use hearth_proto::capability::{Capability, DeviceKind};
use hearth_proto::ids::{ControllerId, DeviceId};
use hearth_proto::link::{CloudFrame, DeviceFrame, PairOutcome};
use hearth_proto::message::{self, Cause, Command, DeviceState, Outcome, ResultPayload, StatePayload};
use hearth_proto::pairing::{self, PairError, PairRequest, SetupSecret};
use hearth_proto::PROTOCOL_VERSION;
use hearth_rules::model::{Press, RuleSet};
use hearth_rules::safety::{self, SafetyEvent, Source, Verdict};
use hearth_rules::schedule;
use p256::ecdsa::SigningKey;

use crate::error::Error;
use crate::rules::timestamp;
use crate::store::{PersistentState, StateStore};

/// Simulated power draw of an energy plug with its relay on: a 1.2 kW heater.
pub const SIMULATED_LOAD_MW: u64 = 1_200_000;

/// The controller id a refusal is addressed to when the command named none
/// that could be read.
pub fn unknown_controller() -> ControllerId {
    ControllerId::from_bytes([0; ControllerId::BYTES])
}

/// The device's protocol state machine.
pub struct DeviceCore {
    device: DeviceId,
    kind: DeviceKind,
    key: SigningKey,
    secret: SetupSecret,
    state: PersistentState,
    /// The motion sensor's current reading; not persisted (a reboot sees no motion).
    motion: bool,
    /// The simulated load of an energy plug while its relay is on, in mW.
    load_mw: u64,
    /// Safety events since the last [`DeviceCore::take_safety_events`].
    safety_events: Vec<SafetyEvent>,
    /// An energy meter's history (issue 5); `None` on other kinds.
    energy: Option<crate::energy::DeviceEnergy>,
    /// The outputs (relay, dimmer); driven after every saved change.
    driver: Box<dyn crate::driver::Driver>,
    /// The fade the next output change uses (a `SetBrightness`), ms.
    fade_ms: u32,
    /// The latest clock reading any entry point was given (unix seconds).
    clock: u64,
    /// A simulated appliance behind an energy plug (kettle, TV, …) and
    /// since when the relay has been on; `None`: a constant `load_mw`.
    load_sim: Option<(hearth_rules::energy::LoadSim, Option<u64>)>,
    /// When the scheduler's bookkeeping was last saved (see [`DeviceCore::tick`]).
    last_tick_save: u64,
    /// The update client's status (`update.rs`), reported in the state;
    /// `None` on a device without one.
    firmware: Option<message::FirmwareStatus>,
    /// Update commands accepted since the last [`DeviceCore::take_update_requests`].
    update_requests: Vec<crate::update::UpdateRequest>,
    /// Fixed-cadence reporting (ADR 0011): when motion was seen since the
    /// last cadence report (unix seconds), at most [`message::MAX_MOTION_BATCH`].
    motion_batch: Vec<u64>,
    /// When the motion state goes back to "no motion" (the owner's
    /// no-motion delay after the latest registered walk-past); `None` while
    /// there is no motion (issue 5).
    motion_until: Option<u64>,
    /// Fixed-cadence reporting: when the state went to "no motion" since the
    /// last cadence report, bounded like `motion_batch`.
    no_motion_batch: Vec<u64>,
}

/// A motion sensor's reporting cadence when its owner set none (ADR 0011):
/// privacy by default, at the cost of up to this much delay for live motion.
pub const DEFAULT_MOTION_REPORT_EVERY_SECS: u64 = 30;

/// The strongest (closest) simulated walk-past; also the default.
pub const MAX_WALK_STRENGTH: u8 = 10;

/// The least padded body length of a sealed state report on a fixed
/// cadence (ADR 0011). The actual length is this or, when the report would
/// not fit, the padded length of the same report with a full batch of
/// motion, so it never depends on how much motion there was
/// (`a_full_motion_batch_has_the_length_of_none`).
pub const CADENCE_BODY_LEN: usize = 512;

/// How often [`DeviceCore::tick`] saves the scheduler's bookkeeping when
/// nothing switched. Losing up to this much after a crash only means the
/// scheduler re-evaluates that window; an action that switched was saved
/// with its switch, so nothing fires twice.
const TICK_SAVE_SECS: u64 = 60;

/// A device-side refusal of the interlock, as the protocol's reason.
fn refusal(r: safety::Refusal, now: u64) -> Refusal {
    match r {
        safety::Refusal::RateLimited { retry_after_secs, .. } => Refusal::TooManySwitches { retry_after_secs },
        safety::Refusal::OverPowerLockout { until } => {
            let wait = until.as_second().saturating_sub(i64::try_from(now).unwrap_or(i64::MAX)).max(1);
            Refusal::OverPowerLockout { retry_after_secs: u32::try_from(wait).unwrap_or(u32::MAX) }
        }
        // `safety::Refusal` is non-exhaustive; anything new is a refusal to
        // switch, and the latch is the most conservative reading of it.
        _ => Refusal::OverPowerLatched,
    }
}

fn describe(e: &SafetyEvent) -> String {
    match e {
        SafetyEvent::MaxOnTime { on_secs, .. } => format!("switched off after the maximum on-time ({on_secs} s on)"),
        SafetyEvent::OverPower { watts, trip, latched: false, .. } => format!("over-power cut-off at {watts:.0} W (trip {trip})"),
        SafetyEvent::OverPower { watts, latched: true, .. } => {
            format!("over-power cut-off at {watts:.0} W, latched: press the device's button to reset")
        }
        SafetyEvent::Retried { .. } => "switched back on after an over-power cut-off".into(),
        SafetyEvent::Refused { reason, .. } => format!("refused: {reason}"),
    }
}

impl std::fmt::Debug for DeviceCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key and the setup secret are never printed.
        f.debug_struct("DeviceCore")
            .field("device", &self.device)
            .field("kind", &self.kind)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl DeviceCore {
    /// A core over loaded identity and state.
    pub fn new(device: DeviceId, kind: DeviceKind, key: SigningKey, secret: SetupSecret, state: PersistentState) -> Self {
        let mut state = state;
        if state.rules.interlock.relay_on() != state.relay {
            // A state file from before the device had interlocks: teach the
            // interlock the relay's state. A local switch at the epoch is
            // never rate limited (no switches recorded yet), and this runs
            // only when the two disagree.
            let _ = state.rules.interlock.request(state.relay, Source::Local, jiff::Timestamp::UNIX_EPOCH);
        }
        Self { device, kind, key, secret, state, motion: false, load_mw: SIMULATED_LOAD_MW, safety_events: Vec::new(), last_tick_save: 0, energy: kind.has(Capability::EnergyMeter).then(|| crate::energy::DeviceEnergy::new(None)), driver: Box::new(crate::driver::Simulated::new()), fade_ms: 0, clock: 0, load_sim: None, firmware: None, update_requests: Vec::new(), motion_batch: Vec::new(), motion_until: None, no_motion_batch: Vec::new() }
    }

    /// Sets the simulated load an energy plug draws while on (the
    /// simulator's stand-in for a kettle or a heater), in milliwatts.
    pub fn set_simulated_load_mw(&mut self, mw: u64) {
        self.load_mw = mw;
    }

    /// Simulates an appliance on an energy plug (issue 5: "the simulator
    /// takes a load profile"): from the next tick the metered power follows
    /// `profile` (a kettle that switches itself off when it boils, a TV
    /// left in standby, …), with deterministic noise from `seed`.
    pub fn set_load_profile(&mut self, profile: hearth_rules::energy::LoadProfile, seed: u64) {
        self.load_sim = Some((hearth_rules::energy::LoadSim::new(profile, seed), None));
    }

    /// The safety events (max on-time, over-power, …) since the last call.
    pub fn take_safety_events(&mut self) -> Vec<SafetyEvent> {
        std::mem::take(&mut self.safety_events)
    }

    /// The stored rule set.
    pub fn rules(&self) -> &RuleSet {
        &self.state.rules.set
    }

    /// Every relay change goes through here: the interlock decides (ADR
    /// 0005, "no command can override"), and the relay, the scheduler's view
    /// and the interlock agree afterwards. `manual` marks an owner's switch
    /// (remote command or button), which starts a countdown and pauses away
    /// mode. Returns whether the relay changed.
    fn switch(next: &mut PersistentState, on: bool, source: Source, manual: bool, now: u64) -> Result<bool, safety::Refusal> {
        let ts = timestamp(now);
        let verdict = next.rules.interlock.request(on, source, ts);
        let changed = matches!(verdict, Ok(Verdict::Switch(_)));
        if changed {
            next.relay = on;
            if manual {
                let tz = zone(&next.rules.set);
                schedule::manual(&mut next.rules.runtime, &next.rules.set, &tz, on, ts);
            }
        }
        next.rules.runtime.observed(next.relay);
        verdict.map(|_| changed)
    }

    /// Once at start-up, before anything else: the power-on policy (or a
    /// schedule missed while the power was out) sets the relay, through the
    /// interlock like every other change.
    pub fn boot(&mut self, store: &mut dyn StateStore, now: u64) -> Result<(), Error> {
        self.clock = now;
        if let Some(energy) = self.energy.as_mut() {
            // ADR 0005: the newer valid one of the two images, or a fresh history.
            *energy = crate::energy::DeviceEnergy::new(store.load_energy());
        }
        let mut next = self.state.clone();
        let ts = timestamp(now);
        let tz = zone(&next.rules.set);
        // The relay is physically off at power-up; switching off locally is
        // never refused and not counted.
        let _ = next.rules.interlock.request(false, Source::Local, ts);
        next.relay = false;
        let action = schedule::boot(&mut next.rules.runtime, &next.rules.set, &tz, ts);
        if let Err(r) = Self::switch(&mut next, action.on, Source::Rule, false, now) {
            tracing::warn!(reason = %r, "the power-on state was refused by the safety interlock");
        }
        self.save(store, next)?;
        self.last_tick_save = now;
        // Whatever the outputs did while the power was off, drive them to
        // the state the device has decided on.
        self.drive();
        tracing::info!(relay = self.state.relay, cause = ?action.cause, "booted");
        Ok(())
    }

    /// The device id.
    pub fn device(&self) -> &DeviceId {
        &self.device
    }

    /// The device kind.
    pub fn kind(&self) -> DeviceKind {
        self.kind
    }

    /// The persisted state as last saved.
    pub fn state(&self) -> &PersistentState {
        &self.state
    }

    /// The access list.
    pub fn access(&self) -> &AccessList {
        &self.state.access
    }

    /// What the device reports now.
    pub fn report(&self) -> DeviceState {
        self.with_firmware(&self.state, observable(self.kind, &self.state, self.motion, self.load_mw))
    }

    /// Adds the firmware status, with the policy as stored in `persisted`
    /// (the state being reported, which may be the one about to be saved).
    fn with_firmware(&self, persisted: &PersistentState, mut state: DeviceState) -> DeviceState {
        state.firmware = self.firmware.clone().map(|mut f| {
            f.policy = persisted.update.policy.clone();
            f
        });
        state
    }

    /// The update client's status changed (issue 4): remember it and report
    /// it in a signed, sealed state report.
    ///
    /// # Errors
    /// Saving the report's sequence number failed; nothing is sent.
    pub fn set_firmware(&mut self, status: message::FirmwareStatus, store: &mut dyn StateStore, now: u64) -> Result<Vec<DeviceFrame>, Error> {
        self.firmware = Some(status);
        let mut next = self.state.clone();
        let report = self.state_frame(&mut next, self.motion, Cause::Report, now)?;
        self.save(store, next)?;
        Ok(vec![report])
    }

    /// Update commands (check, approve, policy) accepted since the last call,
    /// for the agent to pass to the update client.
    pub fn take_update_requests(&mut self) -> Vec<crate::update::UpdateRequest> {
        std::mem::take(&mut self.update_requests)
    }

    /// The setup lookup to announce, while in setup mode.
    pub fn setup_lookup(&self) -> Option<String> {
        self.state.gate.setup_mode.then(|| self.secret.lookup())
    }

    fn save(&mut self, store: &mut dyn StateStore, next: PersistentState) -> Result<(), Error> {
        store.save(&next)?;
        let moved = next.relay != self.state.relay || next.brightness != self.state.brightness;
        self.state = next;
        // The hardware follows the saved state, never the other way round.
        if moved {
            self.drive();
        }
        Ok(())
    }

    /// Applies the current outputs to the driver (and forgets the fade).
    fn drive(&mut self) {
        let output = crate::driver::Output {
            on: self.state.relay,
            brightness: self.kind.has(Capability::Dimmer).then_some(self.state.brightness),
            fade_ms: std::mem::take(&mut self.fade_ms),
        };
        self.driver.apply(output, self.clock.saturating_mul(1000));
    }

    /// Replaces the output driver (the simulator's by default), e.g. with
    /// one for real hardware; it is driven to the current state at once.
    pub fn set_driver(&mut self, driver: Box<dyn crate::driver::Driver>) {
        self.driver = driver;
        self.drive();
    }

    /// Builds the next state report (seq + 1) on `next`: signed, then
    /// sealed (ADR 0006) for the controllers on `next`'s access list that
    /// registered an encryption key. Never sent in the clear: with nobody to
    /// seal for, the cloud still gets only a sealed envelope nobody can open.
    fn state_frame(&self, next: &mut PersistentState, motion: bool, cause: Cause, now: u64) -> Result<DeviceFrame, Error> {
        next.seq += 1;
        let payload = StatePayload {
            v: PROTOCOL_VERSION,
            device: self.device.clone(),
            kind: self.kind,
            seq: next.seq,
            at: now,
            state: self.with_firmware(next, observable(self.kind, next, motion, self.load_mw)),
            cause,
        };
        let inner = message::sign_state(&self.key, &payload)?;
        let header =
            SealedHeader { v: PROTOCOL_VERSION, device: self.device.clone(), content: Content::State, seq: next.seq, to: None, at: now };
        let recipients = next.access.recipients_at(now);
        let sealed = if self.report_every().is_some() {
            // ADR 0011: on a fixed cadence the length must not depend on
            // motion, so it is sized for the same report with a full batch
            // of the largest timestamps (ECDSA P-256 signatures are fixed
            // length, so signing that twin measures it exactly).
            let mut full = payload;
            full.state.motion = Some(true);
            full.cause = Cause::Cadence {
                motion_at: vec![u64::MAX; message::MAX_MOTION_BATCH],
                no_motion_at: vec![u64::MAX; message::MAX_MOTION_BATCH],
            };
            let full_len = message::sign_state(&self.key, &full)?.len();
            let size = ((full_len.max(inner.len()) + 2).div_ceil(e2e::PAD_TO) * e2e::PAD_TO).max(CADENCE_BODY_LEN);
            e2e::seal_fixed(&self.key, header, &inner, &recipients, size, &mut rand::rngs::OsRng)?
        } else {
            e2e::seal(&self.key, header, &inner, &recipients, &mut rand::rngs::OsRng)?
        };
        Ok(DeviceFrame::State { envelope: sealed })
    }

    /// Fixed-cadence reporting (ADR 0011): how often this device sends its
    /// scheduled report, in seconds, or `None` when it reports each change
    /// at once. The owner's `report_every_secs` decides (0: immediate);
    /// unset, motion sensors use [`DEFAULT_MOTION_REPORT_EVERY_SECS`] and
    /// other kinds report at once.
    pub fn report_every(&self) -> Option<u64> {
        match self.state.rules.set.report_every_secs {
            Some(0) => None,
            Some(n) => Some(u64::from(n)),
            None if self.kind.has(Capability::Motion) => Some(DEFAULT_MOTION_REPORT_EVERY_SECS),
            None => None,
        }
    }

    /// The scheduled report of a device on a fixed cadence (ADR 0011): the
    /// agent calls this every [`DeviceCore::report_every`] seconds of its
    /// link, whether or not anything happened. It carries the motion seen
    /// since the previous one, so nothing motion-related leaves the device
    /// at any other time. Empty when the device is not on a cadence.
    pub fn cadence_report(&mut self, store: &mut dyn StateStore, now: u64) -> Result<Vec<DeviceFrame>, Error> {
        self.clock = now;
        if self.report_every().is_none() {
            return Ok(Vec::new());
        }
        // A no-motion delay that ran out before this report is in it, at
        // its exact time, whether or not a tick saw it first.
        self.expire_motion(now);
        let batch = std::mem::take(&mut self.motion_batch);
        let gone = std::mem::take(&mut self.no_motion_batch);
        let mut next = self.state.clone();
        // The current motion state (issue 5): motion until the no-motion
        // delay after the latest registered walk-past.
        let cause = Cause::Cadence { motion_at: batch.clone(), no_motion_at: gone.clone() };
        let report = match self.state_frame(&mut next, self.motion, cause, now) {
            Ok(r) => r,
            Err(e) => {
                // Not lost: the events go out with the next report.
                self.motion_batch = batch;
                self.no_motion_batch = gone;
                return Err(e);
            }
        };
        if let Err(e) = self.save(store, next) {
            self.motion_batch = batch;
            self.no_motion_batch = gone;
            return Err(e);
        }
        Ok(vec![report])
    }

    /// The link came up: `Hello`, then a signed state report.
    pub fn connected(&mut self, store: &mut dyn StateStore, now: u64) -> Result<Vec<DeviceFrame>, Error> {
        let hello = DeviceFrame::Hello {
            kind: self.kind,
            firmware: env!("CARGO_PKG_VERSION").to_owned(),
            setup_lookup: self.setup_lookup(),
        };
        let mut next = self.state.clone();
        let report = self.state_frame(&mut next, self.motion, Cause::Report, now)?;
        // The seq is persisted before the report leaves, so it never repeats after a restart.
        self.save(store, next)?;
        Ok(vec![hello, report])
    }

    /// Handles one frame from the cloud.
    pub fn handle(&mut self, frame: CloudFrame, store: &mut dyn StateStore, now: u64) -> Result<Vec<DeviceFrame>, Error> {
        self.clock = now;
        match frame {
            CloudFrame::Ping { n } => Ok(vec![DeviceFrame::Pong { n }]),
            // Nothing to answer: the agent's reconnect timing takes the hint.
            CloudFrame::Busy { .. } => Ok(Vec::new()),
            CloudFrame::Command { envelope } => self.command(&envelope, store, now),
            CloudFrame::Pair { req, request } => self.pair(req, &request, store, now),
        }
    }

    fn command(&mut self, envelope: &[u8], store: &mut dyn StateStore, now: u64) -> Result<Vec<DeviceFrame>, Error> {
        let ctx = DeviceContext { device: &self.device, kind: self.kind, now };
        let decision = match self.state.access.decide(ctx, &self.state.replay, envelope) {
            Ok(d) => d,
            Err(refused) => {
                let controller = refused.controller.unwrap_or_else(unknown_controller);
                let counter = refused.counter.unwrap_or(0);
                tracing::warn!(%controller, counter, reason = %refused.reason, "refused a command");
                let access = &self.state.access;
                let refusal = Outcome::Refused { reason: refused.reason };
                return Ok(vec![self.result_frame(access, controller, counter, refusal, self.report(), None, now)?]);
            }
        };
        let mut next = self.state.clone();
        // ADR 0001: the counter is persisted before the command takes effect.
        next.replay.commit(&decision);
        let before = next.relay;
        let brightness_before = next.brightness;
        let mut access_report = None;
        let mut outcome = Outcome::Done;
        let mut update_request = None;
        match decision.command {
            Command::SetRelay { .. } | Command::Toggle => {
                let on = match decision.command {
                    Command::SetRelay { on } => on,
                    _ => !next.relay,
                };
                // The interlock has the last word; a refused switch still
                // used up its counter (committed above), like any refusal
                // after verification.
                if let Err(r) = Self::switch(&mut next, on, Source::Remote, true, now) {
                    tracing::warn!(controller = %decision.controller, reason = %r, "safety interlock refused a remote switch");
                    outcome = Outcome::Refused { reason: refusal(r, now) };
                }
            }
            Command::SetRules { base_version, ref rules } => match replace_rules(&next.rules.set, base_version, rules) {
                Ok(set) => {
                    // Reconfiguring keeps the interlock's history: an edit must
                    // not reset a rate limit or a latched cut-off.
                    next.rules.interlock.reconfigure(set.interlocks.clone());
                    tracing::info!(by = %decision.controller, version = set.version, rules = set.rules.len(), "replaced the rule set");
                    next.rules.set = set;
                }
                Err(reason) => outcome = Outcome::Refused { reason },
            },
            Command::GetRules => {
                outcome = Outcome::Rules { rules: String::from_utf8_lossy(&next.rules.set.to_json()).into_owned() };
            }
            Command::GetEnergy { since, resolution } => {
                outcome = match &self.energy {
                    Some(energy) => {
                        let set = &next.rules.set;
                        let power_mw = observable(self.kind, &next, self.motion, self.load_mw).power_mw.unwrap_or(0);
                        Outcome::Energy { report: energy.report(since, resolution, now, &zone(set), &set.energy, power_mw) }
                    }
                    // `decide` checked the capability, and every meter has a history.
                    None => Outcome::Refused { reason: Refusal::Unsupported },
                };
            }
            Command::SetBrightness { percent, fade_ms } => {
                if !(1..=100).contains(&percent) || fade_ms > message::MAX_FADE_MS {
                    outcome = Outcome::Refused { reason: Refusal::OutOfRange };
                } else {
                    next.brightness = percent;
                    // Dimming an "off" light switches it on, through the interlock.
                    if !next.relay {
                        if let Err(r) = Self::switch(&mut next, true, Source::Remote, true, now) {
                            next.brightness = brightness_before;
                            outcome = Outcome::Refused { reason: refusal(r, now) };
                        }
                    }
                    if outcome == Outcome::Done {
                        self.fade_ms = fade_ms;
                    }
                }
            }
            Command::GetState => {}
            Command::GetAccess => access_report = Some(next.access.entries().to_vec()),
            Command::RegisterKey { ref key } => {
                // `decide` found the sender on the list, so this cannot fail;
                // the key is the sender's own (the command is signed by it).
                next.access.set_enc_key(&decision.controller, key.clone());
                tracing::info!(controller = %decision.controller, fingerprint = %key.fingerprint(), "registered an encryption key");
            }
            Command::AddController { ref key, ref enc, role, ref scope } => {
                // `decide` checked that the sender's role may grant `role`.
                let added = key.controller_id();
                if next.access.upsert(key.clone(), role, now) {
                    next.access.set_enc_key(&added, enc.clone());
                    next.access.set_scope(&added, scope.clone());
                    tracing::info!(by = %decision.controller, controller = %added, ?role, fingerprint = %enc.fingerprint(), "added a controller");
                } else {
                    tracing::warn!(controller = %added, "access list full; controller not added");
                }
            }
            Command::RemoveController { ref controller } => {
                // Takes effect with this very frame: the result below is
                // sealed for the remaining controllers only.
                if next.access.remove(controller) {
                    next.replay.forget(controller);
                    tracing::info!(by = %decision.controller, %controller, "revoked a controller");
                }
            }
            // Issue 4: `decide` let only owners and admins through (config changes).
            Command::SetUpdatePolicy { ref policy } => {
                if policy.window.is_some_and(|w| !w.is_valid()) {
                    outcome = Outcome::Refused { reason: Refusal::Malformed };
                } else {
                    next.update.policy = policy.clone();
                    update_request = Some(crate::update::UpdateRequest::Policy(policy.clone()));
                }
            }
            Command::CheckUpdate | Command::ApproveUpdate { .. } if self.firmware.is_none() => {
                outcome = Outcome::Refused { reason: Refusal::Unsupported };
            }
            Command::CheckUpdate => update_request = Some(crate::update::UpdateRequest::Check),
            Command::ApproveUpdate { ref version } => {
                next.update.approved = Some(version.clone());
                update_request = Some(crate::update::UpdateRequest::Approve(version.clone()));
            }
        }
        let changed = next.relay != before;
        if changed {
            // A limited controller's "on" schedules the automatic off; any
            // other change of the relay cancels a pending one.
            next.off_at = match decision.max_on_secs {
                Some(secs) if next.relay => Some(now.saturating_add(secs)),
                _ => None,
            };
        }
        let mut frames = Vec::with_capacity(2);
        let after = self.with_firmware(&next, observable(self.kind, &next, self.motion, self.load_mw));
        let access = next.access.clone();
        frames.push(self.result_frame(&access, decision.controller.clone(), decision.counter, outcome, after, access_report, now)?);
        if changed || next.brightness != brightness_before {
            let cause = Cause::Command { controller: decision.controller.clone() };
            frames.push(self.state_frame(&mut next, self.motion, cause, now)?);
        }
        // Everything is signed before saving, so a signing failure cannot leave
        // an applied command without its answer.
        self.save(store, next)?;
        self.update_requests.extend(update_request);
        tracing::info!(controller = %decision.controller, counter = decision.counter, command = ?decision.command, relay = self.state.relay, "executed a command");
        // The owner just turned the cadence off (ADR 0011) while motion
        // waited for a scheduled report: it goes out now rather than never.
        // Best effort: the command itself is done and answered either way.
        if self.report_every().is_none() && !(self.motion_batch.is_empty() && self.no_motion_batch.is_empty()) {
            let batch = std::mem::take(&mut self.motion_batch);
            let gone = std::mem::take(&mut self.no_motion_batch);
            let mut next = self.state.clone();
            match self.state_frame(&mut next, self.motion, Cause::Cadence { motion_at: batch, no_motion_at: gone }, now).and_then(|f| self.save(store, next).map(|()| f)) {
                Ok(f) => frames.push(f),
                Err(e) => tracing::warn!(error = %e, "could not report the motion seen before the cadence was turned off"),
            }
        }
        Ok(frames)
    }

    /// A signed result. When the addressed controller can read sealed
    /// envelopes it is sealed for every recipient on `access` (it carries
    /// the state); otherwise it goes out signed but in the clear with the
    /// state left empty, so an unlisted or keyless sender (or a cloud
    /// forging one) learns the refusal reason and nothing about the device.
    #[allow(clippy::too_many_arguments)] // One result, its parts; a struct would only rename them.
    fn result_frame(
        &self,
        access: &AccessList,
        controller: ControllerId,
        counter: u64,
        outcome: Outcome,
        state: DeviceState,
        access_report: Option<Vec<hearth_proto::acl::AclEntry>>,
        now: u64,
    ) -> Result<DeviceFrame, Error> {
        let recipients = access.recipients_at(now);
        let readable = recipients.iter().any(|(c, _)| c == &controller);
        let state = if readable { state } else { DeviceState::default() };
        let access_report = if readable { access_report } else { None };
        // The rule set is sealed or not sent at all.
        let outcome = match outcome {
            Outcome::Rules { .. } | Outcome::Energy { .. } if !readable => Outcome::Refused { reason: Refusal::NotPermitted },
            other => other,
        };
        let to = Addressed { controller: controller.clone(), counter };
        let payload = ResultPayload {
            v: PROTOCOL_VERSION,
            device: self.device.clone(),
            controller,
            counter,
            outcome,
            state,
            at: now,
            access: access_report,
        };
        let inner = message::sign_result(&self.key, &payload)?;
        if !readable {
            return Ok(DeviceFrame::Result { envelope: inner });
        }
        let header =
            SealedHeader { v: PROTOCOL_VERSION, device: self.device.clone(), content: Content::Result, seq: 0, to: Some(to), at: now };
        Ok(DeviceFrame::Result { envelope: e2e::seal(&self.key, header, &inner, &recipients, &mut rand::rngs::OsRng)? })
    }

    fn pair(&mut self, req: u64, request: &PairRequest, store: &mut dyn StateStore, now: u64) -> Result<Vec<DeviceFrame>, Error> {
        let mut next = self.state.clone();
        let was_open = next.gate.setup_mode;
        let controller = request.controller_key.controller_id();
        match next.gate.attempt(&self.secret, request) {
            Ok(()) => {
                if !next.access.upsert(request.controller_key.clone(), Role::Owner, now) {
                    // Nobody was added, so the device stays in setup mode as it was;
                    // closing it here would strand a device without a new owner.
                    tracing::warn!(%controller, "pairing refused: the access list is full");
                    return Ok(vec![pair_result(req, PairOutcome::Err(PairError::Full))]);
                }
                let response = pairing::respond(&self.secret, &self.device, &self.key, request, now)?;
                self.save(store, next)?;
                tracing::info!(%controller, "paired a new owner; setup mode closed");
                Ok(vec![pair_result(req, PairOutcome::Ok(response)), DeviceFrame::Setup { setup_lookup: None }])
            }
            Err(e) => {
                if next != self.state {
                    // The failure count must survive a restart, or rebooting would
                    // give an attacker a fresh budget of guesses.
                    self.save(store, next)?;
                }
                tracing::warn!(%controller, error = %e, failed_attempts = self.state.gate.failed_attempts, "pairing attempt refused");
                let mut frames = vec![pair_result(req, PairOutcome::Err(e))];
                if was_open && !self.state.gate.setup_mode {
                    tracing::warn!("too many failed pairing attempts: setup mode closed until a physical reset");
                    frames.push(DeviceFrame::Setup { setup_lookup: None });
                }
                Ok(frames)
            }
        }
    }

    /// The physical reset button: forget every controller and their
    /// counters, and reopen setup mode with a fresh attempt budget. The
    /// relay keeps its state.
    pub fn reset(&mut self, store: &mut dyn StateStore) -> Result<Vec<DeviceFrame>, Error> {
        // Motion not yet reported belongs to the previous owner.
        self.motion_batch.clear();
        self.no_motion_batch.clear();
        let mut next = self.state.clone();
        next.access.clear();
        next.replay = Default::default();
        next.off_at = None;
        // The next owner starts without the previous owner's rules; the
        // interlock keeps its history (a reset must not clear a latch).
        let fresh = crate::rules::RulesState::default();
        next.rules.interlock.reconfigure(fresh.set.interlocks.clone());
        next.rules.set = fresh.set;
        next.rules.runtime = fresh.runtime;
        next.rules.runtime.observed(next.relay);
        next.gate.reset();
        self.save(store, next)?;
        if let Some(energy) = self.energy.as_mut() {
            // The next owner does not see the previous one's consumption; the
            // wiped image is written on the next tick.
            energy.wipe();
        }
        tracing::info!("physical reset: access list cleared, setup mode open");
        Ok(vec![DeviceFrame::Setup { setup_lookup: self.setup_lookup() }])
    }

    /// When the relay must switch itself off, if a limited "on" is running.
    pub fn off_at(&self) -> Option<u64> {
        self.state.off_at.filter(|_| self.state.relay)
    }

    /// The clock advanced (the agent calls this every second; tests call it
    /// with any `now`, which is the device's injected clock). In order:
    /// a grant's on-time limit, the rules due since the last tick, then the
    /// interlock's own checks (max on-time, over-power on energy plugs).
    /// Every switch goes through the interlock; each change is saved and
    /// then reported with its cause.
    pub fn tick(&mut self, store: &mut dyn StateStore, now: u64) -> Result<Vec<DeviceFrame>, Error> {
        self.clock = now;
        if let Some((sim, on_since)) = self.load_sim.as_mut() {
            // The simulated appliance's draw now, for the meter, the
            // interlock and the reports (what a metering chip would read).
            if self.state.relay {
                let since = *on_since.get_or_insert(now);
                let watts = sim.watts(true, now.saturating_sub(since));
                self.load_mw = (f64::from(watts) * 1000.0).round() as u64;
            } else {
                *on_since = None;
            }
        }
        // A driver with a metering chip measures instead.
        if let Some(mw) = self.driver.power_mw(now.saturating_mul(1000)) {
            self.load_mw = mw;
        }
        let mut next = self.state.clone();
        let mut reports: Vec<Cause> = Vec::new();
        // A motion sensor's no-motion delay ran out (issue 5): on a cadence
        // the time waits in the batch; otherwise it is reported now.
        if self.expire_motion(now).is_some() && self.report_every().is_none() {
            reports.push(Cause::Local);
        }
        // A grant's on-time limit (ADR 0006 scopes).
        if let Some(at) = next.off_at.filter(|at| now >= *at) {
            if !next.relay {
                next.off_at = None;
            } else {
                match Self::switch(&mut next, false, Source::Rule, false, now) {
                    Ok(_) => {
                        next.off_at = None;
                        tracing::info!(at, "on-time limit reached: relay switched off");
                        reports.push(Cause::Local);
                    }
                    // Rate limited: the deadline stays and the next tick retries.
                    Err(r) => tracing::warn!(reason = %r, "on-time limit reached but the switch was refused; retrying"),
                }
            }
        }
        // The device's own rules: they run with or without a cloud.
        let ts = timestamp(now);
        let tz = zone(&next.rules.set);
        let mut due = schedule::tick(&mut next.rules.runtime, &next.rules.set, &tz, ts);
        if !self.kind.has(Capability::Switch) {
            // A sensor has no relay: its rules may be stored, but nothing here
            // may switch (or pretend to).
            due.clear();
        }
        for action in &due {
            match Self::switch(&mut next, action.on, Source::Rule, false, now) {
                Ok(changed) => {
                    if changed {
                        if !next.relay {
                            next.off_at = None;
                        }
                        tracing::info!(rule = ?action.rule, cause = ?action.cause, late = action.late, relay = next.relay, "a rule switched the relay");
                        reports.push(Cause::Rule { rule: action.rule });
                    }
                }
                Err(r) => {
                    tracing::warn!(rule = ?action.rule, reason = %r, "safety interlock refused a rule's switch");
                    if !action.on && next.relay {
                        // A refused "off" (the rate limit) must not be lost:
                        // the scheduler dropped the fired timer, so re-arm it
                        // for the next tick until the relay is off.
                        next.rules.runtime.auto_off_at = Some(timestamp(now.saturating_add(1)));
                    }
                }
            }
        }
        // The interlock's own checks; on an energy plug with the measured
        // (here: simulated) power.
        let load_w = if next.relay { self.load_mw as f32 / 1000.0 } else { 0.0 };
        let watts = self.kind.has(Capability::EnergyMeter).then_some(load_w);
        let obs = next.rules.interlock.observe(ts, watts);
        if let Some(on) = obs.switch {
            next.relay = on;
            next.rules.runtime.observed(on);
            if !on {
                next.off_at = None;
            }
        }
        for e in &obs.events {
            tracing::warn!(event = %describe(e), "safety interlock");
            reports.push(Cause::Interlock { event: describe(e) });
        }
        // Energy meters (issue 5): book the reading, raise "on for more than
        // N hours" and "entered standby", write the history image once a minute.
        let metered_w = if next.relay { self.load_mw as f32 / 1000.0 } else { 0.0 };
        if let Some(energy) = self.energy.as_mut() {
            for event in energy.sample(&next.rules.set.energy, now, &tz, metered_w, next.relay) {
                tracing::info!(%event, "energy event");
                reports.push(Cause::Energy { event });
            }
            if let Some((image, generation)) = energy.image_due(now) {
                if let Err(e) = store.save_energy(&image, generation) {
                    // The rules must keep running; the history is retried next minute.
                    tracing::warn!(error = %e, "could not save the energy history");
                }
                energy.saved(generation, now);
            }
        }
        if reports.is_empty() && next.off_at == self.state.off_at && now < self.last_tick_save.saturating_add(TICK_SAVE_SECS) {
            // Only bookkeeping moved (the scheduler's last evaluation, the
            // interlock's timers): kept in memory, saved once a minute.
            self.state = next;
            return Ok(Vec::new());
        }
        let mut frames = Vec::with_capacity(reports.len());
        for cause in reports {
            frames.push(self.state_frame(&mut next, self.motion, cause, now)?);
        }
        self.save(store, next)?;
        self.last_tick_save = now;
        self.safety_events.extend(obs.events);
        Ok(frames)
    }

    /// The local button: toggles the relay (devices with one) and reports
    /// it. Works with or without a cloud. A person at the device may always
    /// switch off; switching on still goes through the interlock, and when
    /// the over-power cut-off is latched, the press resets the latch instead
    /// (the only way to reset it).
    pub fn press_button(&mut self, store: &mut dyn StateStore, now: u64) -> Result<Vec<DeviceFrame>, Error> {
        self.press(Press::Short, store, now)
    }

    /// A press of the local button: short, long or double (issue 5, button
    /// actions). The owner's button rule for that press decides (toggle,
    /// on, off, on for N seconds); without one, a short press toggles and
    /// the others do nothing. Whatever the rules say, a press while the
    /// over-power cut-off is latched only resets the latch, and every switch
    /// goes through the interlock as a person at the device (`Source::Local`).
    pub fn press(&mut self, press: Press, store: &mut dyn StateStore, now: u64) -> Result<Vec<DeviceFrame>, Error> {
        self.clock = now;
        if !self.kind.has(Capability::Switch) {
            tracing::info!(kind = self.kind.as_str(), "button pressed on a device without a relay; ignored");
            return Ok(Vec::new());
        }
        let mut next = self.state.clone();
        if next.rules.interlock.latched() {
            // Local source: the interlock accepts the reset.
            let _ = next.rules.interlock.reset_latch(Source::Local);
            self.save(store, next)?;
            tracing::info!("button pressed: over-power latch reset");
            return Ok(Vec::new());
        }
        let ts = timestamp(now);
        let tz = zone(&next.rules.set);
        // `schedule::button` already counts the press as manual (away mode
        // paused, countdown started) and arms an "on for N s" timer.
        let (target, manual) = match schedule::button(&mut next.rules.runtime, &next.rules.set, &tz, press, ts) {
            Some(action) => (action.on, false),
            None if press == Press::Short => (!next.relay, true),
            None => {
                tracing::info!(?press, "button press without a rule for it; ignored");
                return Ok(Vec::new());
            }
        };
        if let Err(r) = Self::switch(&mut next, target, Source::Local, manual, now) {
            tracing::warn!(reason = %r, "safety interlock refused the button");
            return Ok(Vec::new());
        }
        if next.relay == self.state.relay {
            // Already in the wanted state ("on" while on): the rule's timer
            // may have been armed, which is saved, but nothing is reported.
            self.save(store, next)?;
            return Ok(Vec::new());
        }
        // A person at the device overrides a remote on-time limit.
        next.off_at = None;
        let report = self.state_frame(&mut next, self.motion, Cause::Local, now)?;
        self.save(store, next)?;
        tracing::info!(relay = self.state.relay, "local button toggled the relay");
        Ok(vec![report])
    }

    /// The motion sensor sees someone walk past close by (the strongest
    /// signal, [`MAX_WALK_STRENGTH`]); see [`DeviceCore::walk_past_with`].
    pub fn walk_past(&mut self, store: &mut dyn StateStore, now: u64) -> Result<Vec<DeviceFrame>, Error> {
        self.walk_past_with(store, now, MAX_WALK_STRENGTH)
    }

    /// The owner's no-motion delay in seconds (issue 5).
    pub fn no_motion_delay(&self) -> u64 {
        u64::from(self.state.rules.set.no_motion_delay_secs.unwrap_or(hearth_rules::model::DEFAULT_NO_MOTION_DELAY_SECS))
    }

    /// Whether a walk-past of `strength` (1 far/weak ..= 10 close/strong)
    /// registers as motion: the simulator's model of the owner's
    /// sensitivity s (1..=10) is a threshold, strength > 10 - s. So
    /// sensitivity 10 registers everything, 1 only the strongest, and the
    /// default 5 anything stronger than 5. A GPIO driver would map the
    /// sensitivity to its PIR's threshold instead (issue 5).
    pub fn registers(&self, strength: u8) -> bool {
        let sensitivity = self.state.rules.set.sensitivity.unwrap_or(hearth_rules::model::DEFAULT_SENSITIVITY);
        strength > MAX_WALK_STRENGTH.saturating_sub(sensitivity)
    }

    /// Whether the motion sensor's state is "motion" now.
    pub fn motion(&self) -> bool {
        self.motion
    }

    /// Ends the motion state if the no-motion delay ran out by `now`; the
    /// time it ran out (the transition's time, not `now`). On a cadence that
    /// time goes into the next report's batch.
    fn expire_motion(&mut self, now: u64) -> Option<u64> {
        let until = self.motion_until.filter(|u| *u <= now)?;
        self.motion = false;
        self.motion_until = None;
        if self.report_every().is_some() {
            if self.no_motion_batch.len() < message::MAX_MOTION_BATCH {
                self.no_motion_batch.push(until);
            } else if let Some(last) = self.no_motion_batch.last_mut() {
                *last = until;
            }
        }
        tracing::info!(at = until, "no motion");
        Some(until)
    }

    /// The motion sensor sees someone walk past with `strength`. Below the
    /// sensitivity's threshold ([`DeviceCore::registers`]) nothing happens.
    /// Otherwise the state is "motion" until the no-motion delay after this
    /// walk-past (a later one extends it); the "no motion" transition comes
    /// from [`DeviceCore::tick`] or the next cadence report.
    /// On a fixed cadence (ADR 0011) nothing is sent now: the motion is
    /// kept for the next scheduled report. Otherwise each walk-past is
    /// reported at once.
    pub fn walk_past_with(&mut self, store: &mut dyn StateStore, now: u64, strength: u8) -> Result<Vec<DeviceFrame>, Error> {
        if !self.kind.has(Capability::Motion) {
            return Ok(Vec::new());
        }
        self.clock = now;
        if !self.registers(strength) {
            tracing::info!(strength, "a walk-past below the sensitivity threshold: ignored");
            return Ok(Vec::new());
        }
        // A delay that ran out before this walk-past is its own transition.
        let ended = self.expire_motion(now);
        self.motion = true;
        self.motion_until = Some(now.saturating_add(self.no_motion_delay()));
        if self.report_every().is_some() {
            if self.motion_batch.len() < message::MAX_MOTION_BATCH {
                self.motion_batch.push(now);
            } else if let Some(last) = self.motion_batch.last_mut() {
                // Bounded: the first ones and the latest are kept.
                *last = now;
                tracing::info!("more motion than one report carries; kept the first and the latest");
            }
            return Ok(Vec::new());
        }
        let mut next = self.state.clone();
        let mut frames = Vec::with_capacity(2);
        if ended.is_some() {
            frames.push(self.state_frame(&mut next, false, Cause::Local, now)?);
        }
        frames.push(self.state_frame(&mut next, true, Cause::Local, now)?);
        self.save(store, next)?;
        Ok(frames)
    }
}

fn pair_result(req: u64, outcome: PairOutcome) -> DeviceFrame {
    DeviceFrame::PairResult { req, outcome }
}

/// The zone of a rule set; UTC if the local tzdb does not know it (it was
/// checked when the set was accepted, so this is a lost tzdb, not a typo).
fn zone(set: &RuleSet) -> jiff::tz::TimeZone {
    set.time_zone().unwrap_or(jiff::tz::TimeZone::UTC)
}

/// Validates a `SetRules`: the edit must be based on the current version,
/// parse and validate, and name a zone the device knows. The stored set is
/// `base_version + 1`, whatever version the sender wrote in the JSON.
fn replace_rules(current: &RuleSet, base_version: u64, json: &str) -> Result<RuleSet, Refusal> {
    if base_version != current.version {
        return Err(Refusal::RulesConflict { current: current.version });
    }
    let mut new = RuleSet::from_json(json.as_bytes()).map_err(|e| {
        tracing::warn!(error = %e, "rejected a rule set");
        Refusal::InvalidRules
    })?;
    new.version = current.version.saturating_add(1);
    if new.time_zone().is_err() {
        tracing::warn!(zone = %new.timezone, "rejected a rule set: unknown time zone");
        return Err(Refusal::InvalidRules);
    }
    current.replace(new).map_err(|_| Refusal::InvalidRules)
}

/// The reportable state of a device of `kind`: fields it lacks stay absent.
fn observable(kind: DeviceKind, state: &PersistentState, motion: bool, load_mw: u64) -> DeviceState {
    let relay = kind.has(Capability::Switch).then_some(state.relay);
    let power_mw = kind.has(Capability::EnergyMeter).then_some(if state.relay { load_mw } else { 0 });
    let motion = kind.has(Capability::Motion).then_some(motion);
    let brightness = kind.has(Capability::Dimmer).then_some(state.brightness);
    DeviceState { relay, motion, power_mw, firmware: None, brightness }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use hearth_proto::keys::{self, PublicKey};
    use hearth_proto::message::CommandPayload;
    use hearth_proto::pairing::PendingPairing;

    /// A store that keeps the last saved state, or fails on demand.
    #[derive(Default)]
    struct Memory {
        saved: Option<PersistentState>,
        fail: bool,
    }

    impl StateStore for Memory {
        fn save(&mut self, state: &PersistentState) -> Result<(), Error> {
            if self.fail {
                return Err(Error::Io { path: "memory".into(), source: std::io::Error::other("disk full") });
            }
            self.saved = Some(state.clone());
            Ok(())
        }
    }

    const NOW: u64 = 1_800_000_000;

    fn core(kind: DeviceKind) -> (DeviceCore, SetupSecret) {
        let secret = SetupSecret::random();
        (DeviceCore::new(DeviceId::random(), kind, keys::generate(), secret.clone(), PersistentState::factory()), secret)
    }

    fn pair(core: &mut DeviceCore, secret: &SetupSecret, store: &mut Memory) -> SigningKey {
        let controller = keys::generate();
        let pending = PendingPairing::start(secret.clone(), &controller);
        let frames = core.handle(CloudFrame::Pair { req: 1, request: pending.request().clone() }, store, NOW).unwrap();
        assert!(matches!(&frames[0], DeviceFrame::PairResult { outcome: PairOutcome::Ok(_), .. }));
        controller
    }

    fn command(key: &SigningKey, device: &DeviceId, counter: u64, command: Command) -> Vec<u8> {
        command_at(key, device, counter, command, NOW)
    }

    fn command_at(key: &SigningKey, device: &DeviceId, counter: u64, command: Command, issued_at: u64) -> Vec<u8> {
        let payload =
            CommandPayload { v: 1, device: device.clone(), controller: PublicKey::from(key).controller_id(), counter, issued_at, command };
        message::sign_command(key, &payload).unwrap()
    }

    #[test]
    fn a_command_whose_state_cannot_be_saved_has_no_effect_and_no_answer() {
        let (mut core, secret) = core(DeviceKind::Plug);
        let mut store = Memory::default();
        let controller = pair(&mut core, &secret, &mut store);
        store.fail = true;
        let env = command(&controller, &core.device.clone(), 1, Command::SetRelay { on: true });
        assert!(core.handle(CloudFrame::Command { envelope: env.clone() }, &mut store, NOW).is_err());
        assert!(!core.state().relay);
        assert_eq!(core.state().replay.last(&PublicKey::from(&controller).controller_id()), None);
        // Once storage works again the same command is accepted: its counter was never committed.
        store.fail = false;
        let frames = core.handle(CloudFrame::Command { envelope: env }, &mut store, NOW).unwrap();
        assert_eq!(frames.len(), 2);
        assert!(core.state().relay);
        assert_eq!(store.saved.as_ref().map(|s| s.relay), Some(true));
    }

    #[test]
    fn a_failed_pairing_attempt_is_saved_before_it_is_answered() {
        let (mut core, _) = core(DeviceKind::Plug);
        let mut store = Memory::default();
        let wrong = PendingPairing::start(SetupSecret::random(), &keys::generate());
        let frames = core.handle(CloudFrame::Pair { req: 4, request: wrong.request().clone() }, &mut store, NOW).unwrap();
        assert_eq!(frames, vec![pair_result(4, PairOutcome::Err(PairError::WrongSecret { tries_left: 19 }))]);
        assert_eq!(store.saved.map(|s| s.gate.failed_attempts), Some(1));

        let mut failing = Memory { fail: true, ..Memory::default() };
        assert!(core.handle(CloudFrame::Pair { req: 5, request: wrong.request().clone() }, &mut failing, NOW).is_err());
        assert_eq!(core.state().gate.failed_attempts, 1);
    }

    #[test]
    fn reports_carry_only_the_fields_of_the_kind() {
        let mut store = Memory::default();
        let (mut plug, _) = core(DeviceKind::EnergyPlug);
        assert_eq!(plug.report(), DeviceState { relay: Some(false), motion: None, power_mw: Some(0), firmware: None, brightness: None });
        plug.press_button(&mut store, NOW).unwrap();
        assert_eq!(plug.report(), DeviceState { relay: Some(true), motion: None, power_mw: Some(SIMULATED_LOAD_MW), firmware: None, brightness: None });

        let (mut sensor, secret) = core(DeviceKind::MotionSensor);
        assert_eq!(sensor.report(), DeviceState { relay: None, motion: Some(false), power_mw: None, firmware: None, brightness: None });
        assert!(sensor.press_button(&mut store, NOW).unwrap().is_empty());
        let owner = pair(&mut sensor, &secret, &mut store);
        let me = PublicKey::from(&owner).controller_id();
        let enc = e2e::EncSecretKey::for_controller(&owner);
        let device = sensor.device().clone();
        let reg = command(&owner, &device, 1, Command::RegisterKey { key: enc.public().clone() });
        sensor.handle(CloudFrame::Command { envelope: reg }, &mut store, NOW).unwrap();
        // On its default cadence (ADR 0011) the motion waits for the scheduled report.
        assert!(sensor.walk_past(&mut store, NOW).unwrap().is_empty());
        let frames = sensor.cadence_report(&mut store, NOW + DEFAULT_MOTION_REPORT_EVERY_SECS).unwrap();
        let key = PublicKey::from(&sensor.key);
        let states: Vec<(u64, Option<bool>)> = frames
            .iter()
            .map(|f| match f {
                DeviceFrame::State { envelope } => {
                    let s = e2e::open_state(envelope, &device, &key, &me, &enc).unwrap();
                    (s.seq, s.state.motion)
                }
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(states, vec![(1, Some(true))]);
        assert_eq!(sensor.state().seq, 1);
    }

    #[test]
    fn reports_are_sealed_only_for_registered_controllers_and_reset_forgets_them() {
        let mut store = Memory::default();
        let (mut plug, secret) = core(DeviceKind::EnergyPlug);
        let owner = pair(&mut plug, &secret, &mut store);
        let me = PublicKey::from(&owner).controller_id();
        let enc = e2e::EncSecretKey::for_controller(&owner);
        let device = plug.device().clone();
        let key = PublicKey::from(&plug.key);
        // Before the key is registered, nobody can read a report.
        let frames = plug.press_button(&mut store, NOW).unwrap();
        let DeviceFrame::State { envelope } = &frames[0] else { panic!() };
        assert_eq!(e2e::open_state(envelope, &device, &key, &me, &enc), Err(e2e::OpenError::NotARecipient));
        let reg = command(&owner, &device, 1, Command::RegisterKey { key: enc.public().clone() });
        let frames = plug.handle(CloudFrame::Command { envelope: reg }, &mut store, NOW).unwrap();
        let DeviceFrame::Result { envelope } = &frames[0] else { panic!() };
        assert_eq!(e2e::open_result(envelope, &device, &key, &me, &enc).unwrap().outcome, Outcome::Done);
        let frames = plug.press_button(&mut store, NOW).unwrap();
        let DeviceFrame::State { envelope } = &frames[0] else { panic!() };
        assert_eq!(e2e::open_state(envelope, &device, &key, &me, &enc).unwrap().state.power_mw, Some(0));
        // A factory reset forgets the controller and its encryption key.
        plug.reset(&mut store).unwrap();
        assert!(plug.access().recipients().is_empty());
        let frames = plug.press_button(&mut store, NOW).unwrap();
        let DeviceFrame::State { envelope } = &frames[0] else { panic!() };
        assert_eq!(e2e::open_state(envelope, &device, &key, &me, &enc), Err(e2e::OpenError::NotARecipient));
    }

    fn result_of(frames: &[DeviceFrame], core: &DeviceCore, who: &SigningKey) -> ResultPayload {
        let DeviceFrame::Result { envelope } = &frames[0] else { panic!("expected a result") };
        let key = PublicKey::from(&core.key);
        if e2e::is_sealed(envelope) {
            let me = PublicKey::from(who).controller_id();
            e2e::open_result(envelope, core.device(), &key, &me, &e2e::EncSecretKey::for_controller(who)).unwrap()
        } else {
            message::verify_result(envelope, core.device(), &key).unwrap()
        }
    }

    fn share(core: &mut DeviceCore, store: &mut Memory, by: &SigningKey, counter: u64, role: Role, scope: hearth_proto::acl::Scope) -> (SigningKey, Outcome) {
        let new = keys::generate();
        let cmd = Command::AddController { key: PublicKey::from(&new), enc: e2e::EncSecretKey::for_controller(&new).public().clone(), role, scope };
        let device = core.device().clone();
        let frames = core.handle(CloudFrame::Command { envelope: command(by, &device, counter, cmd) }, store, NOW).unwrap();
        let outcome = result_of(&frames, core, by).outcome;
        (new, outcome)
    }

    #[test]
    fn scoped_grants_are_enforced_by_the_device() {
        use hearth_proto::acl::{Refusal, Scope};
        let mut store = Memory::default();
        let (mut plug, secret) = core(DeviceKind::Plug);
        let owner = pair(&mut plug, &secret, &mut store);
        let device = plug.device().clone();
        let reg = Command::RegisterKey { key: e2e::EncSecretKey::for_controller(&owner).public().clone() };
        plug.handle(CloudFrame::Command { envelope: command(&owner, &device, 0, reg) }, &mut store, NOW).unwrap();
        let run = |core: &mut DeviceCore, store: &mut Memory, who: &SigningKey, counter: u64, cmd: Command, now: u64| {
            let frames = core.handle(CloudFrame::Command { envelope: command_at(who, &device, counter, cmd, now) }, store, now).unwrap();
            result_of(&frames, core, who)
        };

        // An admin may share as member only.
        let (admin, o) = share(&mut plug, &mut store, &owner, 1, Role::Admin, Scope::default());
        assert_eq!(o, Outcome::Done);
        let (_, o) = share(&mut plug, &mut store, &admin, 1, Role::Owner, Scope::default());
        assert_eq!(o, Outcome::Refused { reason: Refusal::NotPermitted });
        // …and can neither demote nor remove the owner; nor can the owner
        // leave the device without an owner.
        let owner_id = PublicKey::from(&owner).controller_id();
        let demote = Command::AddController {
            key: PublicKey::from(&owner),
            enc: e2e::EncSecretKey::generate().public().clone(),
            role: Role::Member,
            scope: Scope::default(),
        };
        assert_eq!(run(&mut plug, &mut store, &admin, 10, demote.clone(), NOW).outcome, Outcome::Refused { reason: Refusal::NotPermitted });
        let remove = Command::RemoveController { controller: owner_id.clone() };
        assert_eq!(run(&mut plug, &mut store, &admin, 11, remove.clone(), NOW).outcome, Outcome::Refused { reason: Refusal::NotPermitted });
        assert_eq!(run(&mut plug, &mut store, &owner, 10, remove, NOW).outcome, Outcome::Refused { reason: Refusal::NotPermitted });
        assert_eq!(run(&mut plug, &mut store, &owner, 11, demote, NOW).outcome, Outcome::Refused { reason: Refusal::NotPermitted });
        assert_eq!(plug.access().get(&owner_id).map(|e| e.role), Some(Role::Owner));
        // A member limited to 15 minutes on: the device switches off by itself.
        let limited = Scope { max_on_secs: Some(900), ..Scope::default() };
        let (member, o) = share(&mut plug, &mut store, &admin, 2, Role::Member, limited);
        assert_eq!(o, Outcome::Done);
        assert_eq!(run(&mut plug, &mut store, &member, 1, Command::SetRelay { on: true }, NOW).outcome, Outcome::Done);
        assert_eq!(plug.off_at(), Some(NOW + 900));
        assert!(plug.tick(&mut store, NOW + 899).unwrap().is_empty());
        assert_eq!(plug.tick(&mut store, NOW + 900).unwrap().len(), 1);
        assert!(!plug.state().relay);
        assert_eq!(store.saved.as_ref().map(|s| (s.relay, s.off_at)), Some((false, None)));
        // The owner's "on" has no limit.
        assert_eq!(run(&mut plug, &mut store, &owner, 12, Command::SetRelay { on: true }, NOW).outcome, Outcome::Done);
        assert_eq!(plug.off_at(), None);

        // Read-only: may read, may not switch.
        let (reader, _) = share(&mut plug, &mut store, &owner, 13, Role::Member, Scope { read_only: true, ..Scope::default() });
        assert_eq!(run(&mut plug, &mut store, &reader, 1, Command::GetState, NOW).outcome, Outcome::Done);
        assert_eq!(run(&mut plug, &mut store, &reader, 2, Command::Toggle, NOW).outcome, Outcome::Refused { reason: Refusal::NotPermitted });

        // Valid until NOW + 60: afterwards refused, and no longer a recipient.
        let (guest, _) = share(&mut plug, &mut store, &owner, 14, Role::Member, Scope { until: Some(NOW + 60), ..Scope::default() });
        assert_eq!(run(&mut plug, &mut store, &guest, 1, Command::Toggle, NOW + 30).outcome, Outcome::Done);
        let late = run(&mut plug, &mut store, &guest, 2, Command::Toggle, NOW + 61);
        assert_eq!((late.outcome, late.state), (Outcome::Refused { reason: Refusal::Expired }, DeviceState::default()));
        let guest_id = PublicKey::from(&guest).controller_id();
        assert!(plug.access().recipients_at(NOW + 61).iter().all(|(c, _)| c != &guest_id));

        // The access list as the device reports it, signed and sealed.
        let listed = run(&mut plug, &mut store, &owner, 15, Command::GetAccess, NOW).access.unwrap();
        let roles: Vec<Role> = listed.iter().map(|e| e.role).collect();
        assert_eq!(roles, vec![Role::Owner, Role::Admin, Role::Member, Role::Member, Role::Member]);
        assert_eq!(listed[2].scope.max_on_secs, Some(900));
    }

    /// A paired plug of `kind` whose owner registered its encryption key.
    fn owned(kind: DeviceKind) -> (DeviceCore, Memory, SigningKey) {
        let (mut core, secret) = core(kind);
        let mut store = Memory::default();
        let owner = pair(&mut core, &secret, &mut store);
        let device = core.device().clone();
        let reg = Command::RegisterKey { key: e2e::EncSecretKey::for_controller(&owner).public().clone() };
        core.handle(CloudFrame::Command { envelope: command(&owner, &device, 0, reg) }, &mut store, NOW).unwrap();
        (core, store, owner)
    }

    /// Sends `cmd` signed by `who` at `now`; returns the (opened) result.
    fn send(core: &mut DeviceCore, store: &mut Memory, who: &SigningKey, counter: u64, cmd: Command, now: u64) -> ResultPayload {
        let device = core.device().clone();
        let frames = core.handle(CloudFrame::Command { envelope: command_at(who, &device, counter, cmd, now) }, store, now).unwrap();
        result_of(&frames, core, who)
    }

    fn set_rules(core: &mut DeviceCore, store: &mut Memory, owner: &SigningKey, counter: u64, rules: serde_json::Value) -> Outcome {
        let base_version = core.rules().version;
        send(core, store, owner, counter, Command::SetRules { base_version, rules: rules.to_string() }, NOW).outcome
    }

    /// The causes of the state reports among `frames`, opened as the owner.
    fn causes(frames: &[DeviceFrame], core: &DeviceCore, owner: &SigningKey) -> Vec<Cause> {
        let key = PublicKey::from(&core.key);
        let me = PublicKey::from(owner).controller_id();
        let enc = e2e::EncSecretKey::for_controller(owner);
        frames
            .iter()
            .filter_map(|f| match f {
                DeviceFrame::State { envelope } => Some(e2e::open_state(envelope, core.device(), &key, &me, &enc).unwrap().cause),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_flood_of_remote_switches_cannot_exceed_the_toggle_limit() {
        let (mut plug, mut store, owner) = owned(DeviceKind::Plug);
        let rules = serde_json::json!({"version": 1, "timezone": "UTC", "interlocks": {"max_toggles_per_min": 6}});
        assert_eq!(set_rules(&mut plug, &mut store, &owner, 1, rules), Outcome::Done);
        let mut counter = 2;
        let mut switches: Vec<u64> = Vec::new();
        let mut refused = 0;
        for s in 0..150 {
            let now = NOW + s;
            // Four alternating commands a second from a compromised controller.
            for i in 0..4 {
                let before = plug.state().relay;
                let r = send(&mut plug, &mut store, &owner, counter, Command::SetRelay { on: i % 2 == 0 }, now);
                counter += 1;
                if plug.state().relay != before {
                    switches.push(now);
                }
                if let Outcome::Refused { reason } = r.outcome {
                    assert!(matches!(reason, Refusal::TooManySwitches { retry_after_secs: 1..=60 }), "{reason:?}");
                    assert!(reason.to_string().starts_with("safety interlock: too many switches, try again in "), "{reason}");
                    refused += 1;
                }
            }
            plug.tick(&mut store, now).unwrap();
        }
        // Never more than six switches in any 60-second window…
        for (i, t) in switches.iter().enumerate() {
            assert!(switches[i..].iter().take_while(|u| **u < t + 60).count() <= 6, "window at {t}: {switches:?}");
        }
        // …and the limit is reached, not just never tested: six in each of
        // the three minutes.
        assert_eq!(switches.len(), 18);
        // Half the commands ask for the state the relay has (unchanged, not
        // refused); nearly all of the other half are refused.
        assert!(refused > 250, "{refused}");
        // The interlock's history is saved with the relay it protects.
        assert_eq!(store.saved.as_ref().map(|s| s.relay), Some(plug.state().relay));
    }

    #[test]
    fn the_maximum_on_time_switches_off_with_an_event() {
        let (mut plug, mut store, owner) = owned(DeviceKind::Plug);
        let rules = serde_json::json!({"version": 1, "timezone": "UTC", "interlocks": {"max_on_secs": 120}});
        assert_eq!(set_rules(&mut plug, &mut store, &owner, 1, rules), Outcome::Done);
        assert_eq!(send(&mut plug, &mut store, &owner, 2, Command::SetRelay { on: true }, NOW).outcome, Outcome::Done);
        for s in 1..120 {
            assert!(plug.tick(&mut store, NOW + s).unwrap().is_empty(), "at {s}");
        }
        assert!(plug.state().relay);
        let frames = plug.tick(&mut store, NOW + 120).unwrap();
        assert!(!plug.state().relay);
        assert_eq!(store.saved.as_ref().map(|s| s.relay), Some(false));
        let causes = causes(&frames, &plug, &owner);
        assert!(matches!(&causes[..], [Cause::Interlock { event }] if event.contains("maximum on-time")), "{causes:?}");
        assert!(matches!(plug.take_safety_events()[..], [SafetyEvent::MaxOnTime { on_secs: 120, .. }]));
    }

    #[test]
    fn an_over_power_load_is_cut_off_and_only_the_button_resets_the_latch() {
        let (mut plug, mut store, owner) = owned(DeviceKind::EnergyPlug);
        let rules = serde_json::json!({"version": 1, "timezone": "UTC",
            "interlocks": {"over_power": {"limit_w": 1500, "for_secs": 3, "retry_after_secs": 60, "max_retries": 0}}});
        assert_eq!(set_rules(&mut plug, &mut store, &owner, 1, rules), Outcome::Done);
        // A 2 kW load on a plug limited to 1.5 kW.
        plug.set_simulated_load_mw(2_000_000);
        assert_eq!(send(&mut plug, &mut store, &owner, 2, Command::SetRelay { on: true }, NOW).outcome, Outcome::Done);
        let mut frames = Vec::new();
        for s in 0..=5 {
            frames.extend(plug.tick(&mut store, NOW + s).unwrap());
        }
        assert!(!plug.state().relay, "still on after 5 s over the limit");
        let events = plug.take_safety_events();
        assert!(matches!(events[..], [SafetyEvent::OverPower { latched: true, .. }]), "{events:?}");
        assert!(matches!(&causes(&frames, &plug, &owner)[..], [Cause::Interlock { event }] if event.contains("over-power")));
        // No remote command switches it back on, not even the owner's…
        let r = send(&mut plug, &mut store, &owner, 3, Command::SetRelay { on: true }, NOW + 10);
        assert_eq!(r.outcome, Outcome::Refused { reason: Refusal::OverPowerLatched });
        assert_eq!(r.state.power_mw, Some(0));
        // …nor does a restart clear the latch.
        let saved = store.saved.clone().unwrap();
        let mut rebooted = DeviceCore::new(plug.device.clone(), plug.kind, plug.key.clone(), plug.secret.clone(), saved);
        rebooted.boot(&mut store, NOW + 20).unwrap();
        let r = send(&mut rebooted, &mut store, &owner, 4, Command::SetRelay { on: true }, NOW + 21);
        assert_eq!(r.outcome, Outcome::Refused { reason: Refusal::OverPowerLatched });
        // A person at the device resets it; then the owner may switch again.
        assert!(rebooted.press_button(&mut store, NOW + 30).unwrap().is_empty());
        assert!(!rebooted.state().relay);
        assert_eq!(send(&mut rebooted, &mut store, &owner, 5, Command::SetRelay { on: true }, NOW + 31).outcome, Outcome::Done);
    }

    #[test]
    fn rules_are_versioned_owner_only_and_read_back_sealed() {
        let (mut plug, mut store, owner) = owned(DeviceKind::Plug);
        let rules = serde_json::json!({"version": 7, "timezone": "Europe/Berlin",
            "rules": [{"id": 1, "name": "off after 30 min", "kind": {"countdown": {"off_after_secs": 1800}}}]});
        let set = |base_version, rules: &serde_json::Value| Command::SetRules { base_version, rules: rules.to_string() };
        // A stale base version is refused and changes nothing.
        let r = send(&mut plug, &mut store, &owner, 1, set(3, &rules), NOW);
        assert_eq!(r.outcome, Outcome::Refused { reason: Refusal::RulesConflict { current: 0 } });
        assert_eq!(send(&mut plug, &mut store, &owner, 2, set(0, &rules), NOW).outcome, Outcome::Done);
        // Stored as version 1 whatever the file said; a second edit on 0 conflicts.
        assert_eq!(plug.rules().version, 1);
        assert_eq!(store.saved.as_ref().map(|s| s.rules.set.version), Some(1));
        let r = send(&mut plug, &mut store, &owner, 3, set(0, &rules), NOW);
        assert_eq!(r.outcome, Outcome::Refused { reason: Refusal::RulesConflict { current: 1 } });
        // Invalid sets are refused: out of range, unknown field, unknown zone.
        for (bad, counter) in [
            serde_json::json!({"version": 1, "timezone": "UTC", "interlocks": {"max_toggles_per_min": 99}}),
            serde_json::json!({"version": 1, "timezone": "UTC", "force": true}),
            serde_json::json!({"version": 1, "timezone": "Mars/Olympus"}),
        ]
        .iter()
        .zip(10..)
        {
            let r = send(&mut plug, &mut store, &owner, counter, set(1, bad), NOW);
            assert_eq!(r.outcome, Outcome::Refused { reason: Refusal::InvalidRules }, "{bad}");
        }
        assert_eq!(plug.rules().version, 1);
        // Read back, inside the sealed result.
        let Outcome::Rules { rules: back } = send(&mut plug, &mut store, &owner, 20, Command::GetRules, NOW).outcome else { panic!() };
        let back = RuleSet::from_json(back.as_bytes()).unwrap();
        assert_eq!((back.version, back.timezone.as_str(), back.rules.len()), (1, "Europe/Berlin", 1));
        // A member may switch and read the rules, but not change them.
        let (member, _) = share(&mut plug, &mut store, &owner, 21, Role::Member, hearth_proto::acl::Scope::default());
        let r = send(&mut plug, &mut store, &member, 1, set(1, &rules), NOW);
        assert_eq!(r.outcome, Outcome::Refused { reason: Refusal::NotPermitted });
        assert!(matches!(send(&mut plug, &mut store, &member, 2, Command::GetRules, NOW).outcome, Outcome::Rules { .. }));
        // An admin may change them.
        let (admin, _) = share(&mut plug, &mut store, &owner, 22, Role::Admin, hearth_proto::acl::Scope::default());
        assert_eq!(send(&mut plug, &mut store, &admin, 1, set(1, &rules), NOW).outcome, Outcome::Done);
        assert_eq!(plug.rules().version, 2);
    }

    #[test]
    fn rules_run_without_a_cloud_and_survive_a_restart() {
        // NOW is 2027-01-15 08:00:00 UTC. A schedule at 08:01 and a
        // 60-second countdown; no cloud anywhere, only the core's clock.
        let (mut plug, mut store, owner) = owned(DeviceKind::Plug);
        let rules = serde_json::json!({"version": 1, "timezone": "UTC", "power_on": "last", "rules": [
            {"id": 1, "name": "morning", "kind": {"schedule": {"days": ["mon","tue","wed","thu","fri","sat","sun"], "at": {"clock": "08:01"}, "action": "on"}}},
            {"id": 2, "name": "countdown", "kind": {"countdown": {"off_after_secs": 60}}}]});
        assert_eq!(set_rules(&mut plug, &mut store, &owner, 1, rules), Outcome::Done);
        let mut causes_seen = Vec::new();
        let mut changes = Vec::new();
        for s in 0..=200 {
            let before = plug.state().relay;
            let frames = plug.tick(&mut store, NOW + s).unwrap();
            causes_seen.extend(causes(&frames, &plug, &owner));
            if plug.state().relay != before {
                changes.push((s, plug.state().relay));
            }
        }
        // On at 08:01 by the schedule, off 60 s later by the countdown.
        assert_eq!(changes, vec![(60, true), (120, false)]);
        assert_eq!(causes_seen, vec![Cause::Rule { rule: Some(1) }, Cause::Rule { rule: None }]);
        // The button starts the countdown too.
        plug.press_button(&mut store, NOW + 300).unwrap();
        assert!(plug.state().relay);
        // A restart keeps the rules and the running countdown.
        let saved = store.saved.clone().unwrap();
        let mut rebooted = DeviceCore::new(plug.device.clone(), plug.kind, plug.key.clone(), plug.secret.clone(), saved);
        rebooted.boot(&mut store, NOW + 310).unwrap();
        assert_eq!(rebooted.rules().version, 1);
        assert!(rebooted.state().relay, "power-on policy 'last' keeps it on");
        for s in 311..360 {
            rebooted.tick(&mut store, NOW + s).unwrap();
            assert!(rebooted.state().relay, "off early at {s}");
        }
        rebooted.tick(&mut store, NOW + 360).unwrap();
        assert!(!rebooted.state().relay);
    }

    #[test]
    fn a_countdown_off_refused_by_the_rate_limit_is_retried_until_it_goes_through() {
        let (mut plug, mut store, owner) = owned(DeviceKind::Plug);
        let rules = serde_json::json!({"version": 1, "timezone": "UTC", "interlocks": {"max_toggles_per_min": 3},
            "rules": [{"id": 1, "name": "cd", "kind": {"countdown": {"off_after_secs": 5}}}]});
        assert_eq!(set_rules(&mut plug, &mut store, &owner, 1, rules), Outcome::Done);
        // Three switches at NOW use up the minute; the last one is "on".
        for (counter, on) in [(2, true), (3, false), (4, true)] {
            assert_eq!(send(&mut plug, &mut store, &owner, counter, Command::SetRelay { on }, NOW).outcome, Outcome::Done);
        }
        // The countdown is due at NOW + 5 but refused until the window reopens.
        for s in 1..60 {
            plug.tick(&mut store, NOW + s).unwrap();
            assert!(plug.state().relay, "off at {s} despite the limit");
        }
        plug.tick(&mut store, NOW + 60).unwrap();
        assert!(!plug.state().relay, "the refused countdown was lost");
    }

    /// The owner's view of the state reports among `frames`.
    fn reports(frames: &[DeviceFrame], core: &DeviceCore, owner: &SigningKey) -> Vec<(usize, StatePayload)> {
        let key = PublicKey::from(&core.key);
        let me = PublicKey::from(owner).controller_id();
        let enc = e2e::EncSecretKey::for_controller(owner);
        frames
            .iter()
            .filter_map(|f| match f {
                DeviceFrame::State { envelope } => Some((envelope.len(), e2e::open_state(envelope, core.device(), &key, &me, &enc).unwrap())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_full_motion_batch_has_the_length_of_none() {
        // ADR 0011. Long firmware texts too: the fixed length grows with
        // them, never with the motion.
        for text_len in [0, 300, 2000] {
            let (mut sensor, mut store, owner) = owned(DeviceKind::MotionSensor);
            assert_eq!(sensor.report_every(), Some(DEFAULT_MOTION_REPORT_EVERY_SECS), "on by default on a motion sensor");
            let status = message::FirmwareStatus { version: "1.0.0".into(), last_result: Some("x".repeat(text_len)), ..Default::default() };
            sensor.set_firmware(status, &mut store, NOW).unwrap();
            let quiet = reports(&sensor.cadence_report(&mut store, NOW).unwrap(), &sensor, &owner);
            for i in 0..20 {
                assert_eq!(sensor.walk_past(&mut store, NOW + i).unwrap(), Vec::new(), "motion sends nothing by itself");
            }
            let busy = reports(&sensor.cadence_report(&mut store, NOW + 20).unwrap(), &sensor, &owner);
            assert_eq!((quiet.len(), busy.len()), (1, 1));
            assert_eq!(quiet[0].0, busy[0].0, "a full batch has the length of an empty one (firmware text {text_len} B)");
            assert_eq!(quiet[0].1.cause, Cause::Cadence { motion_at: Vec::new(), no_motion_at: Vec::new() });
            assert_eq!(quiet[0].1.state.motion, Some(false));
            let Cause::Cadence { motion_at, no_motion_at } = &busy[0].1.cause else { panic!("{:?}", busy[0].1.cause) };
            assert_eq!(no_motion_at, &Vec::<u64>::new(), "still within the no-motion delay");
            // Bounded: the first fifteen and the latest.
            let mut want: Vec<u64> = (0..15).map(|i| NOW + i).collect();
            want.push(NOW + 19);
            assert_eq!(motion_at, &want);
            assert_eq!(busy[0].1.state.motion, Some(true));
            // Full batches of both motion and no motion (issue 5): 20
            // walk-pasts, each past the shortest no-motion delay.
            assert_eq!(set_rules(&mut sensor, &mut store, &owner, 1, serde_json::json!({"version": 1, "timezone": "UTC", "no_motion_delay_secs": 10})), Outcome::Done);
            for i in 0..20 {
                assert_eq!(sensor.walk_past(&mut store, NOW + 100 + 20 * i).unwrap(), Vec::new());
                assert_eq!(sensor.tick(&mut store, NOW + 110 + 20 * i).unwrap(), Vec::new(), "no motion sends nothing by itself");
            }
            let both = reports(&sensor.cadence_report(&mut store, NOW + 600).unwrap(), &sensor, &owner);
            assert_eq!(quiet[0].0, both[0].0, "full batches have the length of an empty one (firmware text {text_len} B)");
            let Cause::Cadence { motion_at, no_motion_at } = &both[0].1.cause else { panic!("{:?}", both[0].1.cause) };
            assert_eq!((motion_at.len(), no_motion_at.len()), (message::MAX_MOTION_BATCH, message::MAX_MOTION_BATCH));
            assert_eq!(no_motion_at.last(), Some(&(NOW + 110 + 20 * 19)));
            assert_eq!(both[0].1.state.motion, Some(false));
        }
    }

    #[test]
    fn no_motion_comes_exactly_the_delay_after_the_latest_walk_past() {
        // Issue 5, injected time: the state is "motion" until the owner's
        // no-motion delay after the latest registered walk-past.
        let (mut sensor, mut store, owner) = owned(DeviceKind::MotionSensor);
        assert_eq!(sensor.no_motion_delay(), 60, "the default");
        assert_eq!(set_rules(&mut sensor, &mut store, &owner, 1, serde_json::json!({"version": 0, "timezone": "UTC", "no_motion_delay_secs": 120})), Outcome::Done);
        assert_eq!(sensor.no_motion_delay(), 120);
        sensor.walk_past(&mut store, NOW).unwrap();
        assert!(sensor.motion());
        sensor.tick(&mut store, NOW + 119).unwrap();
        assert!(sensor.motion(), "one second before the delay");
        // Motion again extends it: 120 s from the second walk-past.
        sensor.walk_past(&mut store, NOW + 100).unwrap();
        sensor.tick(&mut store, NOW + 120).unwrap();
        assert!(sensor.motion(), "re-triggered motion extends the delay");
        sensor.tick(&mut store, NOW + 219).unwrap();
        assert!(sensor.motion());
        assert_eq!(sensor.tick(&mut store, NOW + 220).unwrap(), Vec::new(), "on a cadence nothing is sent now");
        assert!(!sensor.motion(), "no motion exactly the delay after the latest walk-past");
        // The transition is in the next scheduled report, at its exact time.
        let r = reports(&sensor.cadence_report(&mut store, NOW + 230).unwrap(), &sensor, &owner);
        assert_eq!(r[0].1.cause, Cause::Cadence { motion_at: vec![NOW, NOW + 100], no_motion_at: vec![NOW + 220] });
        assert_eq!(r[0].1.state.motion, Some(false));
        // Without a tick in between, the cadence report itself sees the delay run out.
        sensor.walk_past(&mut store, NOW + 300).unwrap();
        let r = reports(&sensor.cadence_report(&mut store, NOW + 500).unwrap(), &sensor, &owner);
        assert_eq!(r[0].1.cause, Cause::Cadence { motion_at: vec![NOW + 300], no_motion_at: vec![NOW + 420] });
        // Immediate reports: motion at once, no motion from the tick that
        // reaches the delay, not with the walk-past.
        assert_eq!(set_rules(&mut sensor, &mut store, &owner, 2, serde_json::json!({"version": 1, "timezone": "UTC", "no_motion_delay_secs": 10, "report_every_secs": 0})), Outcome::Done);
        let seen = sensor.walk_past(&mut store, NOW + 600).unwrap();
        assert_eq!(causes(&seen, &sensor, &owner), vec![Cause::Local]);
        assert_eq!(reports(&seen, &sensor, &owner)[0].1.state.motion, Some(true));
        assert!(sensor.tick(&mut store, NOW + 609).unwrap().is_empty());
        let gone = sensor.tick(&mut store, NOW + 610).unwrap();
        assert_eq!(reports(&gone, &sensor, &owner).iter().map(|r| r.1.state.motion).collect::<Vec<_>>(), vec![Some(false)]);
        for (counter, bad) in [(3, 9), (4, 3601)] {
            let json = serde_json::json!({"version": 2, "timezone": "UTC", "no_motion_delay_secs": bad});
            assert_eq!(set_rules(&mut sensor, &mut store, &owner, counter, json), Outcome::Refused { reason: Refusal::InvalidRules }, "{bad} s");
        }
    }

    #[test]
    fn a_walk_past_registers_only_above_the_sensitivity_threshold() {
        // Issue 5: strength s registers if s > 10 - sensitivity.
        let (mut sensor, mut store, owner) = owned(DeviceKind::MotionSensor);
        // Default sensitivity 5: 5 is ignored, 6 registers.
        assert_eq!(sensor.walk_past_with(&mut store, NOW, 5).unwrap(), Vec::new());
        assert!(!sensor.motion(), "a weak walk-past below the threshold is ignored");
        sensor.walk_past_with(&mut store, NOW + 1, 6).unwrap();
        assert!(sensor.motion());
        let r = reports(&sensor.cadence_report(&mut store, NOW + 30).unwrap(), &sensor, &owner);
        assert_eq!(r[0].1.cause, Cause::Cadence { motion_at: vec![NOW + 1], no_motion_at: Vec::new() }, "only the registered one");
        // Sensitivity 8: strength 3 registers, 2 does not; 10 registers everything, 1 only 10.
        for (counter, (sensitivity, ignored, registered)) in [(8u8, 2u8, 3u8), (10, 0, 1), (1, 9, 10)].into_iter().enumerate() {
            let (mut sensor, mut store, owner) = owned(DeviceKind::MotionSensor);
            let json = serde_json::json!({"version": 0, "timezone": "UTC", "sensitivity": sensitivity});
            assert_eq!(set_rules(&mut sensor, &mut store, &owner, counter as u64 + 1, json), Outcome::Done);
            assert!(sensor.walk_past_with(&mut store, NOW, ignored).unwrap().is_empty());
            assert!(!sensor.motion(), "sensitivity {sensitivity}, strength {ignored}");
            sensor.walk_past_with(&mut store, NOW, registered).unwrap();
            assert!(sensor.motion(), "sensitivity {sensitivity}, strength {registered}");
        }
        for (counter, bad) in [(1, 0), (2, 11)] {
            let json = serde_json::json!({"version": 0, "timezone": "UTC", "sensitivity": bad});
            assert_eq!(set_rules(&mut sensor, &mut store, &owner, 10 + counter, json), Outcome::Refused { reason: Refusal::InvalidRules }, "{bad}");
        }
    }

    #[test]
    fn the_owner_sets_the_cadence_or_immediate_reports() {
        let (mut sensor, mut store, owner) = owned(DeviceKind::MotionSensor);
        let rules = |every: u32| serde_json::json!({"version": 0, "timezone": "UTC", "report_every_secs": every});
        for (counter, bad) in [1, 9, 601, 86_400].into_iter().enumerate() {
            assert_eq!(set_rules(&mut sensor, &mut store, &owner, counter as u64 + 1, rules(bad)), Outcome::Refused { reason: Refusal::InvalidRules }, "{bad} s");
        }
        assert_eq!(set_rules(&mut sensor, &mut store, &owner, 10, rules(600)), Outcome::Done);
        assert_eq!(sensor.report_every(), Some(600));
        assert!(sensor.walk_past(&mut store, NOW).unwrap().is_empty());
        // Immediate: motion still waiting goes out with the change, and each
        // new motion has its own report (no motion follows after the delay).
        let base_version = sensor.rules().version;
        let device = sensor.device().clone();
        let off = Command::SetRules { base_version, rules: rules(0).to_string() };
        let frames = sensor.handle(CloudFrame::Command { envelope: command_at(&owner, &device, 11, off, NOW) }, &mut store, NOW).unwrap();
        assert_eq!(result_of(&frames, &sensor, &owner).outcome, Outcome::Done);
        assert_eq!(causes(&frames, &sensor, &owner), vec![Cause::Cadence { motion_at: vec![NOW], no_motion_at: Vec::new() }]);
        assert_eq!(sensor.report_every(), None);
        let frames = sensor.walk_past(&mut store, NOW).unwrap();
        assert_eq!(causes(&frames, &sensor, &owner), vec![Cause::Local]);
        assert_eq!(sensor.cadence_report(&mut store, NOW).unwrap(), Vec::new());
        // Other kinds report at once unless their owner sets a cadence.
        let (plug, _, _) = owned(DeviceKind::Plug);
        assert_eq!(plug.report_every(), None);
    }

    #[test]
    fn rules_never_switch_a_device_without_a_relay() {
        let (mut sensor, mut store, owner) = owned(DeviceKind::MotionSensor);
        let rules = serde_json::json!({"version": 1, "timezone": "UTC", "rules": [
            {"id": 1, "name": "morning", "kind": {"schedule": {"days": ["mon","tue","wed","thu","fri","sat","sun"], "at": {"clock": "08:01"}, "action": "on"}}}]});
        assert_eq!(set_rules(&mut sensor, &mut store, &owner, 1, rules), Outcome::Done);
        for s in 0..=90 {
            assert!(sensor.tick(&mut store, NOW + s).unwrap().is_empty());
        }
        assert!(!sensor.state().relay);
    }

    /// Issue 4: the update policy, approval and "check now" are signed
    /// commands for owners and admins; they are persisted before the answer
    /// and handed to the update client, and the policy is in the signed state.
    #[test]
    fn update_commands_are_for_owners_and_admins_and_reach_the_update_client() {
        use crate::update::UpdateRequest;
        use hearth_proto::acl::Scope;
        use hearth_proto::message::{FirmwareStatus, UpdateMode, UpdatePolicy, UpdateWindow};
        let (mut plug, mut store, owner) = owned(DeviceKind::Plug);
        // Without an update client there is nothing to check or approve.
        let r = send(&mut plug, &mut store, &owner, 1, Command::CheckUpdate, NOW);
        assert_eq!(r.outcome, Outcome::Refused { reason: Refusal::Unsupported });
        assert!(r.state.firmware.is_none());
        plug.set_firmware(FirmwareStatus { version: "1.0.0".into(), ..FirmwareStatus::default() }, &mut store, NOW).unwrap();

        let policy = UpdatePolicy { mode: UpdateMode::Approval, window: Some(UpdateWindow { start_min: 120, end_min: 300 }) };
        let (member, o) = share(&mut plug, &mut store, &owner, 2, Role::Member, Scope::default());
        assert_eq!(o, Outcome::Done);
        for (counter, cmd) in [(1, Command::SetUpdatePolicy { policy: policy.clone() }), (2, Command::CheckUpdate), (3, Command::ApproveUpdate { version: "2.0.0".into() })] {
            let r = send(&mut plug, &mut store, &member, counter, cmd, NOW);
            assert_eq!(r.outcome, Outcome::Refused { reason: Refusal::NotPermitted });
        }
        assert!(plug.take_update_requests().is_empty());
        assert_eq!(plug.state().update.policy, UpdatePolicy::default(), "a member changed nothing");

        let r = send(&mut plug, &mut store, &owner, 3, Command::SetUpdatePolicy { policy: policy.clone() }, NOW);
        assert_eq!(r.outcome, Outcome::Done);
        assert_eq!(store.saved.as_ref().map(|s| s.update.policy.clone()), Some(policy.clone()), "persisted before the answer");
        assert_eq!(r.state.firmware.map(|f| f.policy), Some(policy.clone()), "reported in the signed state");
        assert_eq!(send(&mut plug, &mut store, &owner, 4, Command::ApproveUpdate { version: "2.0.0".into() }, NOW).outcome, Outcome::Done);
        assert_eq!(send(&mut plug, &mut store, &owner, 5, Command::CheckUpdate, NOW).outcome, Outcome::Done);
        assert_eq!(
            plug.take_update_requests(),
            vec![UpdateRequest::Policy(policy.clone()), UpdateRequest::Approve("2.0.0".into()), UpdateRequest::Check]
        );
        assert_eq!(plug.state().update.approved.as_deref(), Some("2.0.0"));

        // An empty window is refused and the stored policy kept.
        let empty = UpdatePolicy { mode: UpdateMode::Automatic, window: Some(UpdateWindow { start_min: 5, end_min: 5 }) };
        let r = send(&mut plug, &mut store, &owner, 6, Command::SetUpdatePolicy { policy: empty }, NOW);
        assert_eq!(r.outcome, Outcome::Refused { reason: Refusal::Malformed });
        assert_eq!(plug.state().update.policy, policy);
    }
}
