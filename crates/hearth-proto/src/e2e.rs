//! End-to-end encryption of everything a device reports (ADR 0006).
//!
//! A device turns each signed state report or command result (the *inner*
//! COSE_Sign1 from [`crate::message`]) into a *sealed* envelope:
//!
//! 1. draw a fresh 128-bit content key and a 96-bit nonce;
//! 2. encrypt the inner envelope once with AES-128-GCM (NIST SP 800-38D)
//!    under the content key, the routing header as associated data;
//! 3. for every controller on the access list that registered an
//!    encryption key, seal the content key with HPKE base mode (RFC 9180
//!    §6.1 single-shot `Seal`) for the suite DHKEM(P-256, HKDF-SHA256),
//!    HKDF-SHA256, AES-128-GCM (KEM 0x0010, KDF 0x0001, AEAD 0x0001);
//! 4. sign header, wrapped keys and ciphertext as a COSE_Sign1 (RFC 9052
//!    §4.2) with the device key, content type `hearth.sealed.v1`.
//!
//! The outer signature lets the cloud check origin without reading the
//! body, and stops a co-recipient (who knows the content key) from forging
//! a report to the others. The inner signature is the one every controller
//! already checks, so a decrypted body is verified exactly as before.
//!
//! What the cloud still sees is the routing header: device, content kind,
//! sequence number, time, the addressed controller and counter of a
//! result, the recipient controller ids and the ciphertext length
//! (`docs/security.md`, "What the cloud still sees").

use hpke::{Deserializable, Kem as _, OpModeR, Serializable};
use p256::ecdsa::SigningKey;
use rand::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::envelope::{self, Kind};
use crate::error::malformed;
use crate::ids::{ControllerId, DeviceId};
use crate::keys::PublicKey;
use crate::message::{self, device_key_id, from_cbor, to_cbor, ResultPayload, StatePayload};
use crate::{Error, PROTOCOL_VERSION};

/// The HPKE KEM: DHKEM(P-256, HKDF-SHA256), RFC 9180 §7.1.
pub type Kem = hpke::kem::DhP256HkdfSha256;
/// The HPKE KDF: HKDF-SHA256, RFC 9180 §7.2.
pub type Kdf = hpke::kdf::HkdfSha256;
/// The HPKE AEAD: AES-128-GCM, RFC 9180 §7.3.
pub type HpkeAead = hpke::aead::AesGcm128;

/// Most recipients of one sealed envelope; equals the access list bound.
pub const MAX_RECIPIENTS: usize = crate::acl::MAX_ENTRIES;

/// HPKE `info` (RFC 9180 §5.1): names the purpose so a key sealed here can
/// never be opened as anything else.
const HPKE_INFO: &[u8] = b"hearth/v1/content-key";
/// Prefix of the body's associated data.
const BODY_AAD: &[u8] = b"hearth/v1/sealed-body";
const CONTENT_KEY_LEN: usize = 16;
/// The body plaintext is padded to a multiple of this, so the ciphertext
/// length does not tell the cloud e.g. a power reading of 0 (one CBOR
/// byte) from 1.2 kW (five).
pub const PAD_TO: usize = 256;
const NONCE_LEN: usize = 12;
/// SEC1 uncompressed P-256 point.
const ENC_LEN: usize = 65;

/// A controller's HPKE public key (SEC1 uncompressed P-256 point).
#[derive(Clone, PartialEq, Eq)]
pub struct EncPublicKey(Vec<u8>);

impl EncPublicKey {
    /// Parses and validates a SEC1 point (RFC 9180 §7.1.1 `DeserializePublicKey`).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        <Kem as hpke::Kem>::PublicKey::from_bytes(bytes).map_err(|e| Error::InvalidKey(format!("HPKE key: {e}")))?;
        Ok(Self(bytes.to_vec()))
    }

    /// The encoded point.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// A short fingerprint for people to compare: first 8 bytes of SHA-256, hex.
    pub fn fingerprint(&self) -> String {
        let d = Sha256::digest(&self.0);
        hex::encode(&d[..8])
    }
}

impl std::fmt::Debug for EncPublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EncPublicKey({})", self.fingerprint())
    }
}

impl Serialize for EncPublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&crate::b64::encode(&self.0))
        } else {
            s.serialize_bytes(&self.0)
        }
    }
}

impl<'de> Deserialize<'de> for EncPublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Accept either form: serde's buffering of internally tagged enums
        // (like `Command`) reports human-readable even inside CBOR.
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a base64url string or a byte string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Vec<u8>, E> {
                crate::b64::decode(v).map_err(E::custom)
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
        }
        let bytes = d.deserialize_any(V)?;
        Self::from_bytes(&bytes).map_err(serde::de::Error::custom)
    }
}

/// A controller's HPKE private key.
pub struct EncSecretKey {
    sk: <Kem as hpke::Kem>::PrivateKey,
    pk: EncPublicKey,
}

impl std::fmt::Debug for EncSecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EncSecretKey(public {})", self.pk.fingerprint())
    }
}

impl EncSecretKey {
    /// RFC 9180 §7.1.3 `DeriveKeyPair(ikm)`.
    pub fn derive(ikm: &[u8]) -> Self {
        let (sk, pk) = Kem::derive_keypair(ikm);
        Self { sk, pk: EncPublicKey(pk.to_bytes().to_vec()) }
    }

    /// The controller's encryption key, derived from its signing key with a
    /// domain-separated hash as the DeriveKeyPair input (ADR 0006): a
    /// distinct key pair (ECDSA and ECDH never share a scalar) kept at the
    /// same protection level as the signing key it comes from.
    pub fn for_controller(signing: &SigningKey) -> Self {
        let mut h = Sha256::new();
        h.update(b"hearth/v1/controller-hpke-ikm");
        h.update(signing.to_bytes());
        Self::derive(&h.finalize())
    }

    /// A fresh random key pair.
    pub fn generate() -> Self {
        let (sk, pk) = Kem::gen_keypair(&mut rand::rngs::OsRng);
        Self { sk, pk: EncPublicKey(pk.to_bytes().to_vec()) }
    }

    /// The public half.
    pub fn public(&self) -> &EncPublicKey {
        &self.pk
    }
}

/// Serde helper for byte strings in CBOR (major type 2), not int arrays.
pub(crate) mod cbor_bytes {
    use serde::de::{self, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
        }
        d.deserialize_byte_buf(V)
    }
}

/// What a sealed envelope holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Content {
    /// A signed [`StatePayload`].
    State,
    /// A signed [`ResultPayload`].
    Result,
}

/// The command a sealed result answers (routing for the cloud).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Addressed {
    /// The controller the command claimed to come from.
    pub controller: ControllerId,
    /// The command's counter.
    pub counter: u64,
}

/// One recipient's HPKE-sealed copy of the content key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Wrapped {
    /// Who can open it.
    pub controller: ControllerId,
    /// HPKE `enc` (the ephemeral public key), RFC 9180 §5.1.1.
    #[serde(with = "cbor_bytes")]
    pub enc: Vec<u8>,
    /// HPKE ciphertext of the content key.
    #[serde(with = "cbor_bytes")]
    pub key: Vec<u8>,
}

/// The routing header everybody (the cloud included) can read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealedHeader {
    /// Protocol version.
    pub v: u8,
    /// The device that sealed it.
    pub device: DeviceId,
    /// What the body is.
    pub content: Content,
    /// The state report's sequence number (0 for results).
    pub seq: u64,
    /// For results: the command answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Addressed>,
    /// Device clock, unix seconds.
    pub at: u64,
}

/// The signed payload of a sealed envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealedPayload {
    /// The readable header (also the body's associated data).
    pub header: SealedHeader,
    /// One wrapped content key per recipient.
    pub recipients: Vec<Wrapped>,
    /// AES-GCM nonce.
    #[serde(with = "cbor_bytes")]
    pub nonce: Vec<u8>,
    /// AES-128-GCM ciphertext of the inner signed envelope.
    #[serde(with = "cbor_bytes")]
    pub body: Vec<u8>,
}

fn body_aad(header: &SealedHeader) -> Result<Vec<u8>, Error> {
    let mut aad = BODY_AAD.to_vec();
    aad.extend(to_cbor(header, "sealed header")?);
    Ok(aad)
}

/// HPKE `aad` for one wrapped key: binds it to this device, this recipient
/// and this body's nonce, so it cannot be moved to another envelope.
fn key_aad(device: &DeviceId, controller: &ControllerId, nonce: &[u8]) -> Vec<u8> {
    let mut aad = device_key_id(device);
    aad.extend(hex::decode(controller.as_str()).unwrap_or_default());
    aad.extend_from_slice(nonce);
    aad
}

/// `len (u16 big-endian) ‖ inner ‖ zeros` up to the next multiple of [`PAD_TO`].
fn pad(inner: &[u8]) -> Result<Vec<u8>, Error> {
    let len = u16::try_from(inner.len()).map_err(|_| Error::Encode("sealed body too long"))?;
    let total = (2 + inner.len()).div_ceil(PAD_TO) * PAD_TO;
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(inner);
    out.resize(total, 0);
    Ok(out)
}

fn unpad(padded: &[u8]) -> Option<Vec<u8>> {
    let len = usize::from(u16::from_be_bytes([*padded.first()?, *padded.get(1)?]));
    padded.get(2..2 + len).map(<[u8]>::to_vec)
}

/// `len (u16 big-endian) ‖ inner ‖ zeros` of exactly `size` bytes, for
/// reports whose length must not vary at all (ADR 0011).
fn pad_exact(inner: &[u8], size: usize) -> Result<Vec<u8>, Error> {
    if 2 + inner.len() > size {
        return Err(Error::Encode("sealed body larger than its fixed size"));
    }
    let mut out = pad(inner)?;
    out.resize(size, 0);
    Ok(out)
}

/// Seals `inner` (a signed envelope) for `recipients` and signs the result
/// with the device key. Steps 1–4 of the module documentation.
pub fn seal<R: RngCore + CryptoRng>(
    device_key: &SigningKey,
    header: SealedHeader,
    inner: &[u8],
    recipients: &[(ControllerId, EncPublicKey)],
    rng: &mut R,
) -> Result<Vec<u8>, Error> {
    seal_padded(device_key, header, inner, recipients, None, rng)
}

/// [`seal`] with the body padded to exactly `size` bytes instead of the
/// next multiple of [`PAD_TO`]: every report of a fixed-cadence device
/// (ADR 0011) then has one length, whether it carries motion events or
/// none. Fails (nothing is sealed) when `inner` does not fit.
pub fn seal_fixed<R: RngCore + CryptoRng>(
    device_key: &SigningKey,
    header: SealedHeader,
    inner: &[u8],
    recipients: &[(ControllerId, EncPublicKey)],
    size: usize,
    rng: &mut R,
) -> Result<Vec<u8>, Error> {
    seal_padded(device_key, header, inner, recipients, Some(size), rng)
}

fn seal_padded<R: RngCore + CryptoRng>(
    device_key: &SigningKey,
    header: SealedHeader,
    inner: &[u8],
    recipients: &[(ControllerId, EncPublicKey)],
    size: Option<usize>,
    rng: &mut R,
) -> Result<Vec<u8>, Error> {
    use aes_gcm::aead::{Aead as _, KeyInit, Payload};
    if recipients.len() > MAX_RECIPIENTS {
        return Err(Error::Encode("too many recipients"));
    }
    // Step 1.
    let mut cek = [0u8; CONTENT_KEY_LEN];
    rng.fill_bytes(&mut cek);
    let mut nonce = [0u8; NONCE_LEN];
    rng.fill_bytes(&mut nonce);
    // Step 2. A content key is used for exactly one message, so the random
    // nonce can never repeat under it.
    let aad = body_aad(&header)?;
    let cipher = aes_gcm::Aes128Gcm::new_from_slice(&cek).map_err(|_| Error::Encode("content key"))?;
    let padded = match size {
        Some(size) => pad_exact(inner, size)?,
        None => pad(inner)?,
    };
    let body = cipher
        .encrypt(&nonce.into(), Payload { msg: &padded, aad: &aad })
        .map_err(|_| Error::Encode("sealed body"))?;
    // Step 3.
    let mut wrapped = Vec::with_capacity(recipients.len());
    for (controller, key) in recipients {
        // RFC 9180 §6.1 single-shot Seal (sender side on `ring`, `hpke_seal`).
        let (enc, ct) = crate::hpke_seal::seal(key.as_bytes(), HPKE_INFO, &key_aad(&header.device, controller, &nonce), &cek)?;
        wrapped.push(Wrapped { controller: controller.clone(), enc: enc.to_vec(), key: ct });
    }
    // Step 4.
    let kid = device_key_id(&header.device);
    let payload = SealedPayload { header, recipients: wrapped, nonce: nonce.to_vec(), body };
    envelope::sign(device_key, Kind::Sealed, &kid, to_cbor(&payload, "sealed envelope")?)
}

/// Whether `bytes` is a sealed envelope (by its protected content type;
/// nothing is verified).
pub fn is_sealed(bytes: &[u8]) -> bool {
    envelope::open(bytes).is_ok_and(|u| u.kind() == Kind::Sealed)
}

/// Verifies the device's outer signature and returns the payload. What the
/// cloud does before it stores or forwards a sealed envelope.
pub fn verify_sealed(bytes: &[u8], device: &DeviceId, key: &PublicKey) -> Result<SealedPayload, Error> {
    let raw = envelope::open(bytes)?.verify_as(Kind::Sealed, key)?;
    let p: SealedPayload = from_cbor(&raw, "sealed envelope")?;
    if p.header.v != PROTOCOL_VERSION {
        return Err(malformed("sealed envelope", format!("protocol version {} is not supported", p.header.v)));
    }
    if &p.header.device != device {
        return Err(malformed("sealed envelope", format!("sealed by device {}, expected {device}", p.header.device)));
    }
    if p.recipients.len() > MAX_RECIPIENTS || p.nonce.len() != NONCE_LEN {
        return Err(malformed("sealed envelope", "bad recipient count or nonce"));
    }
    if (p.header.content == Content::Result) != p.header.to.is_some() {
        return Err(malformed("sealed envelope", "only results are addressed"));
    }
    Ok(p)
}

/// Why a controller could not open a sealed envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenError {
    /// The outer or inner envelope is not validly signed by the device, or
    /// the two disagree: someone tampered with it.
    Forged(Error),
    /// This controller is not among the recipients (not on the device's
    /// access list when it was sealed, or revoked).
    NotARecipient,
    /// Our wrapped key or the body did not decrypt.
    Undecryptable,
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Forged(e) => write!(f, "not authentic: {e}"),
            OpenError::NotARecipient => f.write_str("not encrypted for this controller"),
            OpenError::Undecryptable => f.write_str("could not be decrypted"),
        }
    }
}

impl std::error::Error for OpenError {}

/// Verifies and decrypts a sealed envelope for controller `me`, returning
/// the header and the inner signed envelope (still to be verified).
pub fn open(
    bytes: &[u8],
    device: &DeviceId,
    device_key: &PublicKey,
    me: &ControllerId,
    sk: &EncSecretKey,
) -> Result<(SealedHeader, Vec<u8>), OpenError> {
    use aes_gcm::aead::{Aead as _, KeyInit, Payload};
    let p = verify_sealed(bytes, device, device_key).map_err(OpenError::Forged)?;
    let w = p.recipients.iter().find(|w| &w.controller == me).ok_or(OpenError::NotARecipient)?;
    if w.enc.len() != ENC_LEN {
        return Err(OpenError::Undecryptable);
    }
    let enc = <Kem as hpke::Kem>::EncappedKey::from_bytes(&w.enc).map_err(|_| OpenError::Undecryptable)?;
    // RFC 9180 §6.1 single-shot Open.
    let cek = hpke::single_shot_open::<HpkeAead, Kdf, Kem>(
        &OpModeR::Base,
        &sk.sk,
        &enc,
        HPKE_INFO,
        &w.key,
        &key_aad(device, me, &p.nonce),
    )
    .map_err(|_| OpenError::Undecryptable)?;
    let cipher = aes_gcm::Aes128Gcm::new_from_slice(&cek).map_err(|_| OpenError::Undecryptable)?;
    let aad = body_aad(&p.header).map_err(|_| OpenError::Undecryptable)?;
    let nonce: [u8; NONCE_LEN] = p.nonce.as_slice().try_into().map_err(|_| OpenError::Undecryptable)?;
    let padded = cipher
        .decrypt(&nonce.into(), Payload { msg: &p.body, aad: &aad })
        .map_err(|_| OpenError::Undecryptable)?;
    let inner = unpad(&padded).ok_or(OpenError::Undecryptable)?;
    Ok((p.header, inner))
}

/// Opens a sealed state report and verifies the inner report, which must
/// agree with the header.
pub fn open_state(
    bytes: &[u8],
    device: &DeviceId,
    device_key: &PublicKey,
    me: &ControllerId,
    sk: &EncSecretKey,
) -> Result<StatePayload, OpenError> {
    let (header, inner) = open(bytes, device, device_key, me, sk)?;
    let s = message::verify_state(&inner, device, device_key).map_err(OpenError::Forged)?;
    if header.content != Content::State || header.seq != s.seq {
        return Err(OpenError::Forged(malformed("sealed envelope", "header disagrees with the report")));
    }
    Ok(s)
}

/// Opens a sealed command result and verifies the inner result, which must
/// agree with the header.
pub fn open_result(
    bytes: &[u8],
    device: &DeviceId,
    device_key: &PublicKey,
    me: &ControllerId,
    sk: &EncSecretKey,
) -> Result<ResultPayload, OpenError> {
    let (header, inner) = open(bytes, device, device_key, me, sk)?;
    let r = message::verify_result(&inner, device, device_key).map_err(OpenError::Forged)?;
    let agrees = header
        .to
        .as_ref()
        .is_some_and(|to| header.content == Content::Result && to.controller == r.controller && to.counter == r.counter);
    if !agrees {
        return Err(OpenError::Forged(malformed("sealed envelope", "header disagrees with the result")));
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capability::DeviceKind;
    use crate::keys;
    use crate::message::{Cause, DeviceState};

    fn state(device: &DeviceId, seq: u64) -> StatePayload {
        StatePayload {
            v: PROTOCOL_VERSION,
            device: device.clone(),
            kind: DeviceKind::EnergyPlug,
            seq,
            at: 1_800_000_000,
            state: DeviceState { relay: Some(true), motion: None, power_mw: Some(1_234_567), firmware: None, brightness: None },
            cause: Cause::Local,
        }
    }

    fn header(device: &DeviceId, seq: u64) -> SealedHeader {
        SealedHeader { v: PROTOCOL_VERSION, device: device.clone(), content: Content::State, seq, to: None, at: 1_800_000_000 }
    }

    #[test]
    fn round_trip_for_each_recipient_only() {
        let dk = keys::generate();
        let dpk = PublicKey::from(&dk);
        let device = DeviceId::random();
        let (a, b, c) = (EncSecretKey::generate(), EncSecretKey::generate(), EncSecretKey::generate());
        let (ida, idb, idc) = (
            PublicKey::from(&keys::generate()).controller_id(),
            PublicKey::from(&keys::generate()).controller_id(),
            PublicKey::from(&keys::generate()).controller_id(),
        );
        let inner = message::sign_state(&dk, &state(&device, 7)).unwrap();
        let recips = vec![(ida.clone(), a.public().clone()), (idb.clone(), b.public().clone())];
        let sealed = seal(&dk, header(&device, 7), &inner, &recips, &mut rand::rngs::OsRng).unwrap();
        assert!(is_sealed(&sealed));
        assert_eq!(open_state(&sealed, &device, &dpk, &ida, &a).unwrap(), state(&device, 7));
        assert_eq!(open_state(&sealed, &device, &dpk, &idb, &b).unwrap(), state(&device, 7));
        assert_eq!(open_state(&sealed, &device, &dpk, &idc, &c), Err(OpenError::NotARecipient));
        // c claims a's slot: its key cannot open a's wrapped content key.
        assert_eq!(open_state(&sealed, &device, &dpk, &ida, &c), Err(OpenError::Undecryptable));
        // The plaintext power reading is nowhere in the sealed bytes.
        let needle = to_cbor(&1_234_567u64, "n").unwrap();
        assert!(!sealed.windows(needle.len()).any(|w| w == needle.as_slice()));
    }

    #[test]
    fn tampering_is_detected() {
        let dk = keys::generate();
        let dpk = PublicKey::from(&dk);
        let device = DeviceId::random();
        let a = EncSecretKey::generate();
        let ida = PublicKey::from(&keys::generate()).controller_id();
        let inner = message::sign_state(&dk, &state(&device, 3)).unwrap();
        let sealed = seal(&dk, header(&device, 3), &inner, &[(ida.clone(), a.public().clone())], &mut rand::rngs::OsRng).unwrap();
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x01;
            assert!(open_state(&bad, &device, &dpk, &ida, &a).is_err(), "byte {i}");
        }
        // A co-recipient (knowing the content key) re-sealing with its own
        // key cannot produce the device's outer signature.
        let forger = keys::generate();
        let forged = seal(&forger, header(&device, 3), &inner, &[(ida.clone(), a.public().clone())], &mut rand::rngs::OsRng).unwrap();
        assert!(matches!(open_state(&forged, &device, &dpk, &ida, &a), Err(OpenError::Forged(_))));
        // A header claiming another seq than the inner report is refused.
        let lying = seal(&dk, header(&device, 4), &inner, &[(ida.clone(), a.public().clone())], &mut rand::rngs::OsRng).unwrap();
        assert!(matches!(open_state(&lying, &device, &dpk, &ida, &a), Err(OpenError::Forged(_))));
    }

    #[test]
    fn register_key_commands_round_trip() {
        let k = keys::generate();
        let payload = crate::message::CommandPayload {
            v: PROTOCOL_VERSION,
            device: DeviceId::random(),
            controller: PublicKey::from(&k).controller_id(),
            counter: 1,
            issued_at: 5,
            command: crate::message::Command::RegisterKey { key: EncSecretKey::generate().public().clone() },
        };
        let bytes = to_cbor(&payload, "command").unwrap();
        assert_eq!(crate::message::decode_command(&bytes).unwrap(), payload);
    }

    #[test]
    fn ciphertext_length_does_not_depend_on_the_reading() {
        let dk = keys::generate();
        let device = DeviceId::random();
        let a = EncSecretKey::generate();
        let ida = PublicKey::from(&keys::generate()).controller_id();
        let sealed_len = |power: u64| {
            let mut st = state(&device, 1);
            st.state.power_mw = Some(power);
            st.state.relay = Some(power > 0);
            let inner = message::sign_state(&dk, &st).unwrap();
            seal(&dk, header(&device, 1), &inner, &[(ida.clone(), a.public().clone())], &mut rand::rngs::OsRng).unwrap().len()
        };
        assert_eq!(sealed_len(0), sealed_len(1_200_000));
        assert_eq!(unpad(&pad(b"abc").unwrap()).unwrap(), b"abc");
        assert_eq!(pad(&[0; 254]).unwrap().len(), PAD_TO);
        assert_eq!(pad(&[0; 255]).unwrap().len(), 2 * PAD_TO);
        assert_eq!(unpad(&[0, 9, 1]), None);
        assert_eq!(pad_exact(b"abc", 1024).unwrap().len(), 1024);
        assert_eq!(unpad(&pad_exact(b"abc", 1024).unwrap()).unwrap(), b"abc");
        assert!(pad_exact(&[0; 1023], 1024).is_err(), "a body that does not fit is refused, not grown");
    }

    /// RFC 9180 Appendix A.3.1 (DHKEM(P-256, HKDF-SHA256), HKDF-SHA256,
    /// AES-128-GCM, base mode), from the CFRG test-vectors file
    /// (test-vectors-5f503c5.json): key derivation, the encapsulated key,
    /// and sequence-0 decryption through this crate's suite types.
    #[test]
    fn rfc9180_a_3_1_base_vector() {
        let h = |s: &str| hex::decode(s).unwrap();
        let info = h("4f6465206f6e2061204772656369616e2055726e");
        let ikm_e = h("4270e54ffd08d79d5928020af4686d8f6b7d35dbe470265f1f5aa22816ce860e");
        let pk_em = h("04a92719c6195d5085104f469a8b9814d5838ff72b60501e2c4466e5e67b325ac98536d7b61a1af4b78e5b7f951c0900be863c403ce65c9bfcb9382657222d18c4");
        let ikm_r = h("668b37171f1072f3cf12ea8a236a45df23fc13b82af3609ad1e354f6ef817550");
        let sk_rm = h("f3ce7fdae57e1a310d87f1ebbde6f328be0a99cdbcadf4d6589cf29de4b8ffd2");
        let pk_rm = h("04fe8c19ce0905191ebc298a9245792531f26f0cece2460639e8bc39cb7f706a826a779b4cf969b8a0e539c7f62fb3d30ad6aa8f80e30f1d128aafd68a2ce72ea0");
        let aad = h("436f756e742d30");
        let ct = h("5ad590bb8baa577f8619db35a36311226a896e7342a6d836d8b7bcd2f20b6c7f9076ac232e3ab2523f39513434");
        let pt = h("4265617574792069732074727574682c20747275746820626561757479");

        let (sk_e, pk_e) = Kem::derive_keypair(&ikm_e);
        assert_eq!(pk_e.to_bytes()[..], pk_em[..]);
        assert_ne!(sk_e.to_bytes()[..], sk_rm[..]);
        let r = EncSecretKey::derive(&ikm_r);
        assert_eq!(r.sk.to_bytes()[..], sk_rm[..]);
        assert_eq!(r.public().as_bytes(), pk_rm.as_slice());

        let enc = <Kem as hpke::Kem>::EncappedKey::from_bytes(&pk_em).unwrap();
        let opened = hpke::single_shot_open::<HpkeAead, Kdf, Kem>(&OpModeR::Base, &r.sk, &enc, &info, &ct, &aad).unwrap();
        assert_eq!(opened, pt);
        // One flipped ciphertext bit and the AEAD refuses.
        let mut bad = ct.clone();
        bad[0] ^= 1;
        assert!(hpke::single_shot_open::<HpkeAead, Kdf, Kem>(&OpModeR::Base, &r.sk, &enc, &info, &bad, &aad).is_err());
    }
}
