//! The device's protocol core: its state plus an input (a cloud frame, a
//! button press, a reset) gives the frames to send. No sockets and no
//! clock; storage is the [`StateStore`] passed in, time is a `now`
//! argument. The tokio agent only moves bytes.
//!
//! Every change is made on a copy of the state, saved, and only then
//! adopted and reported: if saving fails, nothing changes and nothing is
//! reported, so the device never claims an effect (or accepts a counter, or
//! forgets a failed pairing attempt) that a restart would undo.

use hearth_proto::acl::{AccessList, DeviceContext, Role};
use hearth_proto::e2e::{self, Addressed, Content, SealedHeader};
use hearth_proto::capability::{Capability, DeviceKind};
use hearth_proto::ids::{ControllerId, DeviceId};
use hearth_proto::link::{CloudFrame, DeviceFrame, PairOutcome};
use hearth_proto::message::{self, Cause, Command, DeviceState, Outcome, ResultPayload, StatePayload};
use hearth_proto::pairing::{self, PairError, PairRequest, SetupSecret};
use hearth_proto::PROTOCOL_VERSION;
use p256::ecdsa::SigningKey;

use crate::error::Error;
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
        Self { device, kind, key, secret, state, motion: false }
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
        observable(self.kind, &self.state, self.motion)
    }

    /// The setup lookup to announce, while in setup mode.
    pub fn setup_lookup(&self) -> Option<String> {
        self.state.gate.setup_mode.then(|| self.secret.lookup())
    }

    fn save(&mut self, store: &mut dyn StateStore, next: PersistentState) -> Result<(), Error> {
        store.save(&next)?;
        self.state = next;
        Ok(())
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
            state: observable(self.kind, next, motion),
            cause,
        };
        let inner = message::sign_state(&self.key, &payload)?;
        let header =
            SealedHeader { v: PROTOCOL_VERSION, device: self.device.clone(), content: Content::State, seq: next.seq, to: None, at: now };
        let sealed = e2e::seal(&self.key, header, &inner, &next.access.recipients_at(now), &mut rand::rngs::OsRng)?;
        Ok(DeviceFrame::State { envelope: sealed })
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
        match frame {
            CloudFrame::Ping { n } => Ok(vec![DeviceFrame::Pong { n }]),
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
        let mut access_report = None;
        match decision.command {
            Command::SetRelay { on } => next.relay = on,
            Command::Toggle => next.relay = !next.relay,
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
        let after = observable(self.kind, &next, self.motion);
        let access = next.access.clone();
        frames.push(self.result_frame(&access, decision.controller.clone(), decision.counter, Outcome::Done, after, access_report, now)?);
        if changed {
            let cause = Cause::Command { controller: decision.controller.clone() };
            frames.push(self.state_frame(&mut next, self.motion, cause, now)?);
        }
        // Everything is signed before saving, so a signing failure cannot leave
        // an applied command without its answer.
        self.save(store, next)?;
        tracing::info!(controller = %decision.controller, counter = decision.counter, command = ?decision.command, relay = self.state.relay, "executed a command");
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
        let mut next = self.state.clone();
        next.access.clear();
        next.replay = Default::default();
        next.off_at = None;
        next.gate.reset();
        self.save(store, next)?;
        tracing::info!("physical reset: access list cleared, setup mode open");
        Ok(vec![DeviceFrame::Setup { setup_lookup: self.setup_lookup() }])
    }

    /// When the relay must switch itself off, if a limited "on" is running.
    pub fn off_at(&self) -> Option<u64> {
        self.state.off_at.filter(|_| self.state.relay)
    }

    /// The clock advanced: enforces a grant's on-time limit by switching
    /// the relay off (reported as a local change) once `off_at` has passed.
    pub fn tick(&mut self, store: &mut dyn StateStore, now: u64) -> Result<Vec<DeviceFrame>, Error> {
        let Some(at) = self.state.off_at else { return Ok(Vec::new()) };
        if now < at {
            return Ok(Vec::new());
        }
        let mut next = self.state.clone();
        next.off_at = None;
        let mut frames = Vec::new();
        if next.relay {
            next.relay = false;
            frames.push(self.state_frame(&mut next, self.motion, Cause::Local, now)?);
        }
        self.save(store, next)?;
        tracing::info!("on-time limit reached: relay switched off");
        Ok(frames)
    }

    /// The local button: toggles the relay (devices with one) and reports
    /// it. Works with or without a cloud.
    pub fn press_button(&mut self, store: &mut dyn StateStore, now: u64) -> Result<Vec<DeviceFrame>, Error> {
        if !self.kind.has(Capability::Switch) {
            tracing::info!(kind = self.kind.as_str(), "button pressed on a device without a relay; ignored");
            return Ok(Vec::new());
        }
        let mut next = self.state.clone();
        next.relay = !next.relay;
        // A person at the device overrides a remote on-time limit.
        next.off_at = None;
        let report = self.state_frame(&mut next, self.motion, Cause::Local, now)?;
        self.save(store, next)?;
        tracing::info!(relay = self.state.relay, "local button toggled the relay");
        Ok(vec![report])
    }

    /// The motion sensor sees someone walk past: reports motion, then
    /// (the person gone) no motion.
    pub fn walk_past(&mut self, store: &mut dyn StateStore, now: u64) -> Result<Vec<DeviceFrame>, Error> {
        if !self.kind.has(Capability::Motion) {
            return Ok(Vec::new());
        }
        let mut next = self.state.clone();
        let seen = self.state_frame(&mut next, true, Cause::Local, now)?;
        let gone = self.state_frame(&mut next, false, Cause::Local, now)?;
        self.save(store, next)?;
        self.motion = false;
        Ok(vec![seen, gone])
    }
}

fn pair_result(req: u64, outcome: PairOutcome) -> DeviceFrame {
    DeviceFrame::PairResult { req, outcome }
}

/// The reportable state of a device of `kind`: fields it lacks stay absent.
fn observable(kind: DeviceKind, state: &PersistentState, motion: bool) -> DeviceState {
    let relay = kind.has(Capability::Switch).then_some(state.relay);
    let power_mw = kind.has(Capability::EnergyMeter).then_some(if state.relay { SIMULATED_LOAD_MW } else { 0 });
    let motion = kind.has(Capability::Motion).then_some(motion);
    DeviceState { relay, motion, power_mw }
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
        assert_eq!(plug.report(), DeviceState { relay: Some(false), motion: None, power_mw: Some(0) });
        plug.press_button(&mut store, NOW).unwrap();
        assert_eq!(plug.report(), DeviceState { relay: Some(true), motion: None, power_mw: Some(SIMULATED_LOAD_MW) });

        let (mut sensor, secret) = core(DeviceKind::MotionSensor);
        assert_eq!(sensor.report(), DeviceState { relay: None, motion: Some(false), power_mw: None });
        assert!(sensor.press_button(&mut store, NOW).unwrap().is_empty());
        let owner = pair(&mut sensor, &secret, &mut store);
        let me = PublicKey::from(&owner).controller_id();
        let enc = e2e::EncSecretKey::for_controller(&owner);
        let device = sensor.device().clone();
        let reg = command(&owner, &device, 1, Command::RegisterKey { key: enc.public().clone() });
        sensor.handle(CloudFrame::Command { envelope: reg }, &mut store, NOW).unwrap();
        let frames = sensor.walk_past(&mut store, NOW).unwrap();
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
        assert_eq!(states, vec![(1, Some(true)), (2, Some(false))]);
        assert_eq!(sensor.state().seq, 2);
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
}
