//! Frames on the two persistent links (see `docs/adr/0002-links-and-framing.md`).
//!
//! Device ↔ cloud: a TLS 1.3 mutual-TLS stream carrying length-prefixed
//! JSON frames — a 4-byte big-endian length, then that many bytes of JSON,
//! at most [`MAX_FRAME_LEN`]. Controller ↔ cloud: WebSocket text messages
//! holding the JSON types below. Signed envelopes travel as base64url.
//!
//! The cloud reads only the routing fields; the envelopes are end-to-end.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::capability::DeviceKind;
use crate::error::malformed;
use crate::ids::DeviceId;
use crate::pairing::{PairError, PairRequest, PairResponse};
use crate::{Error, MAX_FRAME_LEN};

/// Device → cloud.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum DeviceFrame {
    /// First frame after the TLS handshake.
    Hello {
        /// What the device is.
        kind: DeviceKind,
        /// Its firmware version.
        firmware: String,
        /// While in setup mode: the lookup value of its setup secret.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        setup_lookup: Option<String>,
    },
    /// A signed command result (for the account's controllers).
    Result {
        /// COSE_Sign1 bytes.
        #[serde(with = "crate::b64::bytes")]
        envelope: Vec<u8>,
    },
    /// A signed state report (for the account's controllers).
    State {
        /// COSE_Sign1 bytes.
        #[serde(with = "crate::b64::bytes")]
        envelope: Vec<u8>,
    },
    /// The answer to a [`CloudFrame::Pair`].
    PairResult {
        /// The request number it answers.
        req: u64,
        /// The device's answer.
        #[serde(flatten)]
        outcome: PairOutcome,
    },
    /// Setup mode changed (closed by pairing or lockout, opened by reset).
    Setup {
        /// The lookup value while in setup mode, none otherwise.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        setup_lookup: Option<String>,
    },
    /// Answer to a ping.
    Pong {
        /// The ping's number.
        n: u64,
    },
    /// A command this device signed as a controller of device `to` (a
    /// motion sensor's rule, ADR 0009). The cloud forwards it only to a
    /// device of the same owner account; `to` decides with its own access
    /// list, and its result goes to the owner's controllers as usual.
    Command {
        /// The target device.
        to: DeviceId,
        /// The signed command envelope.
        #[serde(with = "crate::b64::bytes")]
        envelope: Vec<u8>,
    },
}

/// A device's answer to a pairing request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum PairOutcome {
    /// Paired.
    Ok(PairResponse),
    /// Refused.
    Err(PairError),
}

/// Cloud → device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum CloudFrame {
    /// A signed command from a controller.
    Command {
        /// COSE_Sign1 bytes.
        #[serde(with = "crate::b64::bytes")]
        envelope: Vec<u8>,
    },
    /// A pairing request from a controller.
    Pair {
        /// Request number, echoed in the answer.
        req: u64,
        /// The controller's request.
        request: PairRequest,
    },
    /// Liveness check; the device answers with [`DeviceFrame::Pong`].
    Ping {
        /// Echoed back.
        n: u64,
    },
    /// The cloud is too busy to register this link and closes it (issue 8,
    /// reconnect storms): redial no sooner than `retry_after` seconds. The
    /// device adds its own jitter on top, so devices turned away together
    /// spread out. Not authenticated beyond the link's TLS, so a device
    /// caps what it honours (`hearth_device::backoff`).
    Busy {
        /// Seconds to wait before redialling.
        retry_after: u32,
    },
}

/// Cloud → controller (WebSocket text messages).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControllerPush {
    /// A signed command result from a device of this account.
    Result {
        /// Which device (from its certificate, checked by the cloud).
        device: DeviceId,
        /// COSE_Sign1 bytes, to verify with the device key.
        #[serde(with = "crate::b64::bytes")]
        envelope: Vec<u8>,
    },
    /// A signed state report from a device of this account.
    State {
        /// Which device.
        device: DeviceId,
        /// COSE_Sign1 bytes.
        #[serde(with = "crate::b64::bytes")]
        envelope: Vec<u8>,
    },
    /// A device of this account came online or went offline.
    Presence {
        /// Which device.
        device: DeviceId,
        /// Whether its link is up.
        online: bool,
    },
    /// A command could not be delivered.
    Undeliverable {
        /// The device it was for.
        device: DeviceId,
        /// Why, for a person.
        message: String,
    },
}

/// Controller → cloud (WebSocket text messages).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControllerFrame {
    /// Deliver a signed command to a device of this account.
    Command {
        /// The device.
        device: DeviceId,
        /// COSE_Sign1 bytes.
        #[serde(with = "crate::b64::bytes")]
        envelope: Vec<u8>,
    },
}

/// Encodes one length-prefixed frame.
pub fn encode_frame<T: Serialize>(frame: &T) -> Result<Vec<u8>, Error> {
    let body = serde_json::to_vec(frame).map_err(|_| Error::Encode("frame"))?;
    if body.len() > MAX_FRAME_LEN {
        return Err(Error::TooLarge { what: "frame", len: body.len(), limit: MAX_FRAME_LEN });
    }
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Reads the body length from a frame header, enforcing the limit before
/// anything is allocated.
pub fn frame_len(header: [u8; 4]) -> Result<usize, Error> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME_LEN {
        return Err(Error::TooLarge { what: "frame", len, limit: MAX_FRAME_LEN });
    }
    Ok(len)
}

/// Decodes one frame body.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, Error> {
    if body.len() > MAX_FRAME_LEN {
        return Err(Error::TooLarge { what: "frame", len: body.len(), limit: MAX_FRAME_LEN });
    }
    serde_json::from_slice(body).map_err(|e| malformed("frame", e))
}

/// Decodes the first complete frame in `buf`, returning it and the number
/// of bytes used, or `None` when more bytes are needed.
pub fn decode_frame<T: DeserializeOwned>(buf: &[u8]) -> Result<Option<(T, usize)>, Error> {
    let Some(header) = buf.get(..4) else { return Ok(None) };
    let len = frame_len([header[0], header[1], header[2], header[3]])?;
    let Some(body) = buf.get(4..4 + len) else { return Ok(None) };
    Ok(Some((decode_body(body)?, 4 + len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let f = CloudFrame::Ping { n: 7 };
        let bytes = encode_frame(&f).unwrap();
        assert_eq!(&bytes[4..], br#"{"type":"ping","n":7}"#);
        assert_eq!(decode_frame::<CloudFrame>(&bytes).unwrap(), Some((f, bytes.len())));
        assert_eq!(decode_frame::<CloudFrame>(&bytes[..5]).unwrap(), None);
    }

    #[test]
    fn the_busy_frame_has_a_fixed_shape() {
        let f = CloudFrame::Busy { retry_after: 10 };
        let bytes = encode_frame(&f).unwrap();
        assert_eq!(&bytes[4..], br#"{"type":"busy","retry_after":10}"#);
        assert_eq!(decode_frame::<CloudFrame>(&bytes).unwrap(), Some((f, bytes.len())));
        assert!(decode_body::<CloudFrame>(br#"{"type":"busy","retry_after":-1}"#).is_err());
    }

    #[test]
    fn unknown_fields_and_types_are_refused() {
        assert!(decode_body::<CloudFrame>(br#"{"type":"ping","n":7,"x":1}"#).is_err());
        assert!(decode_body::<CloudFrame>(br#"{"type":"reboot"}"#).is_err());
        assert!(decode_body::<DeviceFrame>(br#"{"type":"pair_result","req":1,"err":{"error":"full"},"x":2}"#).is_err());
        let ok: DeviceFrame = decode_body(br#"{"type":"pair_result","req":1,"err":{"error":"full"}}"#).unwrap();
        assert_eq!(ok, DeviceFrame::PairResult { req: 1, outcome: PairOutcome::Err(PairError::Full) });
    }

    #[test]
    fn oversized_header_is_refused_before_allocation() {
        assert!(matches!(frame_len([0xff, 0xff, 0xff, 0xff]), Err(Error::TooLarge { .. })));
    }
}
