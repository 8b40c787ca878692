//! Identifiers. Each is validated once when parsed, so inside Hearth a
//! `DeviceId` is always well-formed.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::Error;

fn check_hex(kind: &'static str, s: &str, len: usize) -> Result<(), Error> {
    if s.len() != len {
        return Err(Error::InvalidId { kind, reason: format!("expected {len} characters, got {}", s.len()) });
    }
    if !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(Error::InvalidId { kind, reason: "expected lowercase hex".into() });
    }
    Ok(())
}

macro_rules! hex_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $bytes:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Number of random bytes behind the id.
            pub const BYTES: usize = $bytes;

            /// Builds the id from raw bytes.
            pub fn from_bytes(bytes: [u8; $bytes]) -> Self {
                Self(hex::encode(bytes))
            }

            /// The id as its canonical text form.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self, Error> {
                check_hex($kind, s, $bytes * 2)?;
                Ok(Self(s.to_owned()))
            }
        }

        impl TryFrom<String> for $name {
            type Error = Error;
            fn try_from(s: String) -> Result<Self, Error> {
                check_hex($kind, &s, $bytes * 2)?;
                Ok(Self(s))
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }
    };
}

hex_id!(
    /// A device's identity: 96 random bits chosen by the factory and bound to
    /// the device key by the manufacturer certificate (its subject CN). The
    /// cloud takes it from the certificate, never from a payload.
    DeviceId,
    "device id",
    12
);

hex_id!(
    /// A controller's identity: the first 16 bytes of SHA-256 over its SEC1
    /// uncompressed P-256 public key. Anyone can recompute it from the key,
    /// so it cannot be claimed without the key.
    ControllerId,
    "controller id",
    16
);

impl DeviceId {
    /// A fresh random device id.
    pub fn random() -> Self {
        Self::from_bytes(rand::random())
    }
}

impl ControllerId {
    /// The id of the controller holding this public key.
    pub fn of_key(key: &crate::keys::PublicKey) -> Self {
        let digest = Sha256::digest(key.to_sec1());
        let mut id = [0u8; 16];
        id.copy_from_slice(&digest[..16]);
        Self::from_bytes(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_id_parses_only_canonical_hex() {
        assert!("00112233445566778899aabb".parse::<DeviceId>().is_ok());
        assert!("00112233445566778899AABB".parse::<DeviceId>().is_err());
        assert!("00112233445566778899aab".parse::<DeviceId>().is_err());
        assert!("../etc/passwd/aaaaaaaaaa".parse::<DeviceId>().is_err());
        let json = serde_json::to_string(&"zz".to_string()).unwrap();
        assert!(serde_json::from_str::<DeviceId>(&json).is_err());
    }
}
