//! Hearth firmware updates on The Update Framework (TUF 1.0).
//!
//! The crate is a sans-IO-ish TUF client plus the tools that build a
//! repository for it:
//!
//! * [`canonical`] — OLPC canonical JSON, the bytes TUF signatures cover.
//! * [`crypto`] — public keys (ed25519, ecdsa-sha2-nistp256, rsassa-pss-sha256)
//!   and signature verification; key generation and signing for repository tools.
//! * [`metadata`] — the four top-level roles and delegated targets, parsed
//!   once at the edge into checked types.
//! * [`client`] — the detailed client workflow of TUF spec section 5 over a
//!   small [`client::Fetcher`] and [`client::MetadataStore`]; time is passed in.
//! * [`http`] — a minimal blocking HTTP/1.1 GET fetcher with length limits,
//!   enough for the conformance CLI against plain-HTTP test repositories.
//! * [`repo`] — repository tools: keys, roles with thresholds, targets with
//!   Hearth's custom metadata, signing, consistent snapshots, key rotation.
#![forbid(unsafe_code)]
// STYLE.md §4 bans unwrap outside tests; inside unit tests a panic is the
// failure report.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod canonical;
pub mod client;
pub mod crypto;
mod error;
pub mod http;
pub mod metadata;
pub mod repo;
pub mod time;

pub use error::{Error, FetchError};
