//! `hearth web-vectors` (hidden): the Rust side of the web app's crypto
//! interop tests (tests/web, ADR 0007). It makes envelopes with
//! hearth-proto for the browser to open, and checks envelopes the browser
//! made, so both directions are tested against the one implementation the
//! devices run. Not for users: it signs with a throwaway device key.

use anyhow::{bail, Context, Result};
use hearth_proto::capability::DeviceKind;
use hearth_proto::e2e::{self, Content, EncPublicKey, SealedHeader};
use hearth_proto::ids::{ControllerId, DeviceId};
use hearth_proto::keys::PublicKey;
use hearth_proto::message::{self, Cause, DeviceState, Outcome, ResultPayload, StatePayload};
use hearth_proto::{b64, envelope, PROTOCOL_VERSION};
use serde_json::json;

/// What to do.
#[derive(clap::Subcommand, Debug)]
pub enum Cmd {
    /// Print a throwaway device's key and a signed, a sealed and a forged
    /// report for the given recipient, as JSON.
    Seal {
        /// The recipient's controller id (hex).
        #[arg(long)]
        controller: ControllerId,
        /// The recipient's HPKE public key (base64url SEC1).
        #[arg(long)]
        enc_key: String,
    },
    /// Verify a command envelope made elsewhere with the signer's public
    /// key and print its payload as JSON; exit 1 if it does not verify.
    CheckCommand {
        /// The signer's public key (base64url SEC1).
        #[arg(long)]
        key: String,
        /// The COSE_Sign1 command (base64url).
        #[arg(long)]
        envelope: String,
    },
}

/// Runs one action, printing JSON on stdout.
pub fn run(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Seal { controller, enc_key } => seal(controller, &enc_key),
        Cmd::CheckCommand { key, envelope } => check_command(&key, &envelope),
    }
}

fn seal(me: ControllerId, enc_key: &str) -> Result<()> {
    let enc = EncPublicKey::from_bytes(&b64::decode(enc_key)?).context("the recipient's HPKE key")?;
    let key = hearth_proto::keys::generate();
    let device = DeviceId::random();
    let at = 1_800_000_000;
    let state = StatePayload {
        v: PROTOCOL_VERSION,
        device: device.clone(),
        kind: DeviceKind::EnergyPlug,
        seq: 41,
        at,
        state: DeviceState { relay: Some(true), power_mw: Some(1_234_567), ..DeviceState::default() },
        cause: Cause::Interlock { event: "over-power test".into() },
    };
    let plain = message::sign_state(&key, &state)?;
    // A second recipient, so the browser must pick its own wrapped key.
    let other = e2e::EncSecretKey::generate();
    let other_id = ControllerId::from_bytes(rand::random());
    let recipients = [(other_id, other.public().clone()), (me.clone(), enc)];
    let header = |content, seq, to| SealedHeader { v: PROTOCOL_VERSION, device: device.clone(), content, seq, to, at };
    let sealed = e2e::seal(&key, header(Content::State, 41, None), &plain, &recipients, &mut rand::rngs::OsRng)?;
    let result = ResultPayload {
        v: PROTOCOL_VERSION,
        device: device.clone(),
        controller: me.clone(),
        counter: 1_700_000_000_123,
        outcome: Outcome::Refused { reason: hearth_proto::acl::Refusal::TooManySwitches { retry_after_secs: 42 } },
        state: DeviceState { relay: Some(false), power_mw: Some(0), ..DeviceState::default() },
        at,
        access: None,
    };
    let to = e2e::Addressed { controller: me.clone(), counter: result.counter };
    let inner = message::sign_result(&key, &result)?;
    let sealed_result = e2e::seal(&key, header(Content::Result, 0, Some(to)), &inner, &recipients, &mut rand::rngs::OsRng)?;
    // The same report sealed by another key: the browser must call it forged.
    let forger = hearth_proto::keys::generate();
    let forged = e2e::seal(&forger, header(Content::State, 41, None), &plain, &recipients, &mut rand::rngs::OsRng)?;
    // Sealed only for someone else: "not for this controller".
    let not_mine = e2e::seal(&key, header(Content::State, 41, None), &plain, &recipients[..1], &mut rand::rngs::OsRng)?;
    let out = json!({
        "device": device,
        "device_key": b64::encode(PublicKey::from(&key).to_sec1()),
        "state_plain": b64::encode(&plain),
        "state_sealed": b64::encode(&sealed),
        "result_sealed": b64::encode(&sealed_result),
        "state_forged": b64::encode(&forged),
        "state_not_mine": b64::encode(&not_mine),
        "expect_state": state,
        "expect_result": result,
    });
    println!("{out}");
    Ok(())
}

fn check_command(key: &str, env: &str) -> Result<()> {
    let key = PublicKey::from_sec1(&b64::decode(key)?).context("the signer's key")?;
    let bytes = b64::decode(env)?;
    let payload = envelope::open(&bytes)?.verify_as(envelope::Kind::Command, &key).context("the command's signature")?;
    let p = message::decode_command(&payload)?;
    if p.controller != key.controller_id() {
        bail!("the command names controller {}, but the key is {}", p.controller, key.controller_id());
    }
    println!("{}", serde_json::to_string(&p)?);
    Ok(())
}
