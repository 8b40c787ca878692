//! P-256 keys as Hearth stores and sends them.

use std::fmt;

use p256::ecdsa::{SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::ids::ControllerId;
use crate::Error;

/// A P-256 public key, carried as its SEC1 uncompressed point (65 bytes,
/// the form WebCrypto's `raw` export produces).
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

impl PublicKey {
    /// Parses a SEC1 point (compressed or uncompressed).
    pub fn from_sec1(bytes: &[u8]) -> Result<Self, Error> {
        VerifyingKey::from_sec1_bytes(bytes).map(Self).map_err(|e| Error::InvalidKey(e.to_string()))
    }

    /// The SEC1 uncompressed encoding.
    pub fn to_sec1(&self) -> Vec<u8> {
        self.0.to_encoded_point(false).as_bytes().to_vec()
    }

    /// The verifying key for signature checks.
    pub fn verifying_key(&self) -> &VerifyingKey {
        &self.0
    }

    /// The controller id derived from this key.
    pub fn controller_id(&self) -> ControllerId {
        ControllerId::of_key(self)
    }
}

impl From<VerifyingKey> for PublicKey {
    fn from(k: VerifyingKey) -> Self {
        Self(k)
    }
}

impl From<&SigningKey> for PublicKey {
    fn from(k: &SigningKey) -> Self {
        Self(*k.verifying_key())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", crate::b64::encode(self.to_sec1()))
    }
}

impl Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::b64::encode(self.to_sec1()))
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let bytes = crate::b64::decode(&text).map_err(serde::de::Error::custom)?;
        Self::from_sec1(&bytes).map_err(serde::de::Error::custom)
    }
}

/// Generates a fresh P-256 signing key from the operating system's RNG.
pub fn generate() -> SigningKey {
    SigningKey::random(&mut rand::rngs::OsRng)
}
