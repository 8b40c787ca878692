use thiserror::Error;

/// Everything that can go wrong while decoding or checking protocol data.
///
/// Variants caused by a peer (bad bytes, bad signatures) are kept apart from
/// misuse by the caller ([`Error::Encode`]).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// An identifier did not have the expected shape.
    #[error("invalid {kind}: {reason}")]
    InvalidId {
        /// Which kind of identifier ("device id", "controller id", ...).
        kind: &'static str,
        /// What was wrong with it.
        reason: String,
    },
    /// A public key could not be parsed as a P-256 SEC1 point.
    #[error("invalid public key: {0}")]
    InvalidKey(String),
    /// Bytes from a peer were not a well-formed message.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// The kind of message being decoded.
        what: &'static str,
        /// Why it was rejected.
        reason: String,
    },
    /// A message was larger than the protocol allows.
    #[error("{what} is {len} bytes, the limit is {limit}")]
    TooLarge {
        /// The kind of message.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The limit it exceeded.
        limit: usize,
    },
    /// A signature did not verify with the expected key.
    #[error("signature check failed for {what}")]
    BadSignature {
        /// The kind of message whose signature failed.
        what: &'static str,
    },
    /// A setup code or label could not be read.
    #[error("invalid setup code: {0}")]
    InvalidSetupCode(String),
    /// Our own data could not be encoded (a bug, not a peer fault).
    #[error("could not encode {0}")]
    Encode(&'static str),
}

pub(crate) fn malformed(what: &'static str, reason: impl std::fmt::Display) -> Error {
    Error::Malformed { what, reason: reason.to_string() }
}
