//! Pairing: how the first controller becomes a device's owner through a
//! cloud it does not trust.
//!
//! The factory prints a 128-bit setup secret on the device label (as a QR
//! payload and as a typed code). Both sides derive a MAC key from it with
//! HKDF-SHA256 (RFC 5869) and authenticate their public keys with
//! HMAC-SHA256 (RFC 2104):
//!
//! 1. controller → device: its public key, a fresh nonce, and
//!    `HMAC(K, "pair-request" ‖ controller key ‖ nonce)`;
//! 2. the device checks the MAC (counting failures: after
//!    [`MAX_FAILED_ATTEMPTS`] it leaves setup mode until a physical reset),
//!    adds the controller as owner and answers with its own key, nonce,
//!    `HMAC(K, "pair-response" ‖ device id ‖ device key ‖ controller key ‖
//!    both nonces)` and a confirmation signed with the device key, which
//!    the cloud checks before recording the device under the account.
//!
//! A cloud that watches sees two MACs under a 128-bit secret: nothing to
//! brute-force offline. A cloud that tampers cannot swap either key without
//! the secret, and each online guess burns one of the device's 20 attempts.

use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use p256::ecdsa::SigningKey;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::acl::Role;
use crate::envelope::{self, Kind};
use crate::error::malformed;
use crate::ids::{ControllerId, DeviceId};
use crate::keys::PublicKey;
use crate::message::{device_key_id, from_cbor, to_cbor};
use crate::{Error, PROTOCOL_VERSION};

/// Failed pairing attempts after which a device leaves setup mode (Matter's rule).
pub const MAX_FAILED_ATTEMPTS: u32 = 20;

const NONCE_LEN: usize = 16;
const SECRET_LEN: usize = 16;
const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
const LABEL_PREFIX: &str = "HEARTH:1:";

type HmacSha256 = Hmac<Sha256>;

/// The device's 128-bit setup secret.
#[derive(Clone, PartialEq, Eq)]
pub struct SetupSecret([u8; SECRET_LEN]);

impl std::fmt::Debug for SetupSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SetupSecret(..)")
    }
}

impl SetupSecret {
    /// A fresh secret from the OS RNG.
    pub fn random() -> Self {
        Self(rand::random())
    }

    /// Wraps raw bytes.
    pub fn from_bytes(bytes: [u8; SECRET_LEN]) -> Self {
        Self(bytes)
    }

    /// The raw bytes (for the device's own storage only).
    pub fn as_bytes(&self) -> &[u8; SECRET_LEN] {
        &self.0
    }

    /// The typed fallback code: RFC 4648 base32, in dash-separated groups of four.
    pub fn code(&self) -> String {
        let plain = base32(&self.0);
        plain.as_bytes().chunks(4).map(|c| String::from_utf8_lossy(c).into_owned()).collect::<Vec<_>>().join("-")
    }

    /// Parses a typed code; case, spaces and dashes do not matter.
    pub fn from_code(text: &str) -> Result<Self, Error> {
        let cleaned: String =
            text.chars().filter(|c| !matches!(c, '-' | ' ')).map(|c| c.to_ascii_uppercase()).collect();
        let bytes = unbase32(&cleaned)
            .ok_or_else(|| Error::InvalidSetupCode("expected 26 letters A–Z and digits 2–7".into()))?;
        Ok(Self(bytes))
    }

    /// The value the device announces to the cloud while in setup mode, so a
    /// typed code can be matched to the device. A one-way hash: learning it
    /// tells nothing about the 128-bit secret.
    pub fn lookup(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"hearth/v1/setup-lookup");
        h.update(self.0);
        hex::encode(&h.finalize()[..8])
    }

    fn mac_key(&self) -> [u8; 32] {
        let hk = Hkdf::<Sha256>::new(Some(b"hearth/v1/pairing"), &self.0);
        let mut okm = [0u8; 32];
        // 32 bytes is far below HKDF-SHA256's 8160-byte limit, so expand cannot fail.
        hk.expand(b"mac key", &mut okm).unwrap_or_default();
        okm
    }
}

fn base32(data: &[u8; SECRET_LEN]) -> String {
    let mut out = String::with_capacity(26);
    let (mut buf, mut bits) = (0u32, 0u32);
    for &b in data {
        buf = (buf << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((buf >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((buf << (5 - bits)) & 31) as usize] as char);
    }
    out
}

fn unbase32(text: &str) -> Option<[u8; SECRET_LEN]> {
    if text.len() != 26 {
        return None;
    }
    let mut out = Vec::with_capacity(SECRET_LEN);
    let (mut buf, mut bits) = (0u32, 0u32);
    for c in text.bytes() {
        let v = ALPHABET.iter().position(|&a| a == c)? as u32;
        buf = ((buf << 5) | v) & 0xffff;
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push((buf >> bits) as u8);
        }
    }
    // 26 × 5 = 130 bits: the last two must be zero for a canonical code.
    if buf & ((1 << bits) - 1) != 0 {
        return None;
    }
    out.try_into().ok()
}

/// What a device label carries: the QR payload names the device too; the
/// typed code carries only the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetupLabel {
    /// The device, when known from the QR payload.
    pub device: Option<DeviceId>,
    /// The setup secret.
    pub secret: SetupSecret,
}

impl SetupLabel {
    /// The QR payload: `HEARTH:1:<device id>:<code without dashes>`.
    pub fn qr_payload(&self) -> String {
        let device = self.device.as_ref().map(|d| d.as_str()).unwrap_or("");
        format!("{LABEL_PREFIX}{device}:{}", self.secret.code().replace('-', ""))
    }

    /// Reads a QR payload or a typed code.
    pub fn parse(text: &str) -> Result<Self, Error> {
        let text = text.trim();
        if let Some(rest) = text.strip_prefix(LABEL_PREFIX) {
            let (device, code) =
                rest.split_once(':').ok_or_else(|| Error::InvalidSetupCode("label payload has no code".into()))?;
            let device = if device.is_empty() {
                None
            } else {
                Some(device.parse().map_err(|e: Error| Error::InvalidSetupCode(e.to_string()))?)
            };
            return Ok(Self { device, secret: SetupSecret::from_code(code)? });
        }
        Ok(Self { device: None, secret: SetupSecret::from_code(text)? })
    }
}

/// Controller → device (through the cloud).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairRequest {
    /// The controller's public key, which will become the owner.
    pub controller_key: PublicKey,
    /// 16 fresh random bytes.
    #[serde(with = "crate::b64::bytes")]
    pub nonce: Vec<u8>,
    /// HMAC-SHA256 over the key and nonce under the setup-secret key.
    #[serde(with = "crate::b64::bytes")]
    pub mac: Vec<u8>,
}

/// Device → controller (through the cloud).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairResponse {
    /// The device.
    pub device: DeviceId,
    /// The device's public key (the one in its manufacturer certificate).
    pub device_key: PublicKey,
    /// 16 fresh random bytes.
    #[serde(with = "crate::b64::bytes")]
    pub nonce: Vec<u8>,
    /// HMAC-SHA256 over both keys and nonces under the setup-secret key.
    #[serde(with = "crate::b64::bytes")]
    pub mac: Vec<u8>,
    /// A [`PairConfirmation`] signed by the device key (COSE_Sign1).
    #[serde(with = "crate::b64::bytes")]
    pub confirmation: Vec<u8>,
}

/// The device's signed statement that a controller is now its owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairConfirmation {
    /// Protocol version.
    pub v: u8,
    /// The device.
    pub device: DeviceId,
    /// The controller added.
    pub controller: ControllerId,
    /// Its role.
    pub role: Role,
    /// Device clock, unix seconds.
    pub at: u64,
}

/// Why a device refused to pair. Reported to the controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "error", rename_all = "snake_case", deny_unknown_fields)]
pub enum PairError {
    /// Already paired, or locked after too many failures: needs a physical reset.
    NotInSetupMode,
    /// The MAC did not match the setup secret.
    WrongSecret {
        /// Attempts left before the device leaves setup mode.
        tries_left: u32,
    },
    /// The request could not be read.
    Malformed,
    /// The device's access list is full.
    Full,
}

impl std::fmt::Display for PairError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PairError::NotInSetupMode => {
                f.write_str("the device is not in setup mode (already paired or locked); reset it to pair again")
            }
            PairError::WrongSecret { tries_left } => write!(f, "wrong setup code, {tries_left} tries left"),
            PairError::Malformed => f.write_str("the device could not read the pairing request"),
            PairError::Full => f.write_str("the device's access list is full"),
        }
    }
}

fn request_mac(key: &[u8; 32], controller: &PublicKey, nonce: &[u8]) -> HmacSha256 {
    // 32-byte keys are always accepted by HMAC.
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC accepts any key length");
    mac.update(b"hearth/v1/pair-request");
    mac.update(&controller.to_sec1());
    mac.update(nonce);
    mac
}

fn response_mac(key: &[u8; 32], device: &DeviceId, device_key: &PublicKey, req: &PairRequest, nonce: &[u8]) -> HmacSha256 {
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC accepts any key length");
    mac.update(b"hearth/v1/pair-response");
    mac.update(&device_key_id(device));
    mac.update(&device_key.to_sec1());
    mac.update(&req.controller_key.to_sec1());
    mac.update(&req.nonce);
    mac.update(nonce);
    mac
}

/// The device's pairing state: persisted with the access list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairingGate {
    /// Whether the device accepts pairing requests.
    pub setup_mode: bool,
    /// Failed attempts since the last reset.
    pub failed_attempts: u32,
}

impl PairingGate {
    /// A factory-fresh (or just reset) device.
    pub fn setup() -> Self {
        Self { setup_mode: true, failed_attempts: 0 }
    }

    /// The physical reset: back into setup mode with a fresh attempt budget.
    pub fn reset(&mut self) {
        *self = Self::setup();
    }

    /// Checks a request against the setup secret, counting a failure, and
    /// on success closes setup mode. The caller must persist the gate (and,
    /// on success, the new owner) before answering.
    pub fn attempt(&mut self, secret: &SetupSecret, req: &PairRequest) -> Result<(), PairError> {
        if !self.setup_mode {
            return Err(PairError::NotInSetupMode);
        }
        if req.nonce.len() != NONCE_LEN {
            return Err(PairError::Malformed);
        }
        let ok = request_mac(&secret.mac_key(), &req.controller_key, &req.nonce).verify_slice(&req.mac).is_ok();
        if !ok {
            // Saturating: the gate is read back from a file, and a wrapped
            // counter would hand a locked device a fresh set of guesses.
            self.failed_attempts = self.failed_attempts.saturating_add(1);
            let tries_left = MAX_FAILED_ATTEMPTS.saturating_sub(self.failed_attempts);
            if tries_left == 0 {
                self.setup_mode = false;
            }
            return Err(PairError::WrongSecret { tries_left });
        }
        self.setup_mode = false;
        self.failed_attempts = 0;
        Ok(())
    }
}

/// Builds the device's answer once [`PairingGate::attempt`] succeeded.
pub fn respond(
    secret: &SetupSecret,
    device: &DeviceId,
    device_key: &SigningKey,
    req: &PairRequest,
    now: u64,
) -> Result<PairResponse, Error> {
    let nonce: [u8; NONCE_LEN] = rand::random();
    let device_pub = PublicKey::from(device_key);
    let mac = response_mac(&secret.mac_key(), device, &device_pub, req, &nonce).finalize().into_bytes().to_vec();
    let confirmation = PairConfirmation {
        v: PROTOCOL_VERSION,
        device: device.clone(),
        controller: req.controller_key.controller_id(),
        role: Role::Owner,
        at: now,
    };
    let confirmation =
        envelope::sign(device_key, Kind::PairConfirmation, &device_key_id(device), to_cbor(&confirmation, "confirmation")?)?;
    Ok(PairResponse { device: device.clone(), device_key: device_pub, nonce: nonce.to_vec(), mac, confirmation })
}

/// Verifies a device's pairing confirmation with its (certified) key.
pub fn verify_confirmation(bytes: &[u8], device: &DeviceId, key: &PublicKey) -> Result<PairConfirmation, Error> {
    let payload = envelope::open(bytes)?.verify_as(Kind::PairConfirmation, key)?;
    let c: PairConfirmation = from_cbor(&payload, "confirmation")?;
    if c.v != PROTOCOL_VERSION || &c.device != device {
        return Err(malformed("confirmation", "wrong version or device"));
    }
    Ok(c)
}

/// The controller's side of one pairing attempt.
#[derive(Debug)]
pub struct PendingPairing {
    secret: SetupSecret,
    request: PairRequest,
}

/// A device the controller has paired with and authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairedDevice {
    /// Its id.
    pub device: DeviceId,
    /// Its public key, authenticated by the setup secret.
    pub device_key: PublicKey,
}

impl PendingPairing {
    /// Starts pairing: builds the request to send.
    pub fn start(secret: SetupSecret, controller: &SigningKey) -> Self {
        Self::start_with_nonce(secret, controller, rand::random())
    }

    /// [`PendingPairing::start`] with a chosen nonce. Crate-private: only
    /// the fuzzing fixture needs a deterministic request, and a caller that
    /// reused nonces would weaken the response MAC's freshness.
    pub(crate) fn start_with_nonce(secret: SetupSecret, controller: &SigningKey, nonce: [u8; NONCE_LEN]) -> Self {
        let controller_key = PublicKey::from(controller);
        let mac = request_mac(&secret.mac_key(), &controller_key, &nonce).finalize().into_bytes().to_vec();
        Self { secret, request: PairRequest { controller_key, nonce: nonce.to_vec(), mac } }
    }

    /// The request to send to the device.
    pub fn request(&self) -> &PairRequest {
        &self.request
    }

    /// Checks the device's answer: the MAC proves it holds the setup secret
    /// and binds its key to ours; the confirmation must name us as owner.
    pub fn finish(&self, resp: &PairResponse, expected: Option<&DeviceId>) -> Result<PairedDevice, Error> {
        if let Some(want) = expected {
            if want != &resp.device {
                return Err(malformed("pairing response", format!("answered by {}, expected {want}", resp.device)));
            }
        }
        if resp.nonce.len() != NONCE_LEN {
            return Err(malformed("pairing response", "bad nonce length"));
        }
        response_mac(&self.secret.mac_key(), &resp.device, &resp.device_key, &self.request, &resp.nonce)
            .verify_slice(&resp.mac)
            .map_err(|_| Error::BadSignature { what: "pairing response (setup secret MAC)" })?;
        let c = verify_confirmation(&resp.confirmation, &resp.device, &resp.device_key)?;
        if c.controller != self.request.controller_key.controller_id() || c.role != Role::Owner {
            return Err(malformed("confirmation", "does not name this controller as owner"));
        }
        Ok(PairedDevice { device: resp.device.clone(), device_key: resp.device_key.clone() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_round_trips_and_rejects_noncanonical() {
        let s = SetupSecret::from_bytes([0xff; 16]);
        assert_eq!(s.code(), "7777-7777-7777-7777-7777-7777-74");
        assert_eq!(SetupSecret::from_code("7777 7777 7777 7777 7777 7777 74").unwrap(), s);
        assert!(SetupSecret::from_code("7777-7777-7777-7777-7777-7777-77").is_err());
        let z = SetupSecret::from_bytes([0; 16]);
        assert_eq!(z.code(), "AAAA-AAAA-AAAA-AAAA-AAAA-AAAA-AA");
        // RFC 4648 §10 vector "foobar" → MZXW6YTBOI, checked on a prefix.
        let mut b = [0u8; 16];
        b[..6].copy_from_slice(b"foobar");
        assert!(SetupSecret::from_bytes(b).code().replace('-', "").starts_with("MZXW6YTBOI"));
        for _ in 0..100 {
            let r = SetupSecret::random();
            assert_eq!(SetupSecret::from_code(&r.code().to_lowercase()).unwrap(), r);
        }
    }

    #[test]
    fn label_payload_round_trips() {
        let label = SetupLabel { device: Some(DeviceId::random()), secret: SetupSecret::random() };
        assert_eq!(SetupLabel::parse(&label.qr_payload()).unwrap(), label);
        let typed = SetupLabel::parse(&label.secret.code()).unwrap();
        assert_eq!(typed.secret, label.secret);
        assert_eq!(typed.device, None);
    }
}
