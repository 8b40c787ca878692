//! The Hearth protocol core.
//!
//! Everything here is plain data and pure functions over bytes, keys and an
//! injected clock: no sockets, no files, no tokio. The device agent, the
//! cloud and every controller reuse the same code, so a message is checked
//! the same way wherever it is read, and all of it can be unit-tested and
//! fuzzed in memory.
//!
//! * [`ids`] — device, controller and setup identifiers.
//! * [`capability`] — what a device can do and what a command needs.
//! * [`envelope`] — COSE_Sign1 (RFC 9052) over ECDSA P-256 (ES256).
//! * [`message`] — the signed payloads: commands, results, state reports.
//! * [`e2e`] — HPKE (RFC 9180) end-to-end encryption of device reports.
//! * [`acl`] — the device's access list and its "execute this command?" decision.
//! * [`pairing`] — setup secrets, the label, and the pairing exchange.
//! * [`link`] — frames on the device↔cloud and controller↔cloud links.
#![forbid(unsafe_code)]
// STYLE.md §4 bans unwrap outside tests; inside unit tests a panic is the
// failure report, so the workspace's `unwrap_used` lint is for library code only.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod acl;
pub mod b64;
pub mod capability;
pub mod e2e;
pub mod envelope;
mod hpke_seal;
mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod ids;
pub mod keys;
pub mod link;
pub mod message;
pub mod pairing;

pub use error::Error;

/// Protocol version carried in every signed payload. A device refuses any
/// other value, so a downgrade to an older format has to be signed as such.
pub const PROTOCOL_VERSION: u8 = 1;

/// How far a command's `issued_at` may be from the device's clock, in
/// seconds, before it is refused as stale (or as coming from the future).
pub const FRESHNESS_WINDOW_SECS: u64 = 120;

/// Upper bound for any single frame on a link, and for any signed envelope.
pub const MAX_FRAME_LEN: usize = 64 * 1024;
