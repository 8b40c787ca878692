//! Hearth's on-device rules core.
//!
//! Everything a plug, switch or light decides on its own lives here as plain
//! data and pure functions: the rule model and its versioned edits
//! ([`model`]), sunrise and sunset ([`sun`]), the scheduler with its
//! exactly-once, offline and DST semantics ([`schedule`]), the safety
//! interlocks no remote command can override ([`safety`]) and energy
//! accounting with a bounded history ([`energy`]).
//!
//! Architecture invariant: this crate does no I/O and does not depend on
//! tokio. Time comes in as a [`jiff::Timestamp`] argument, randomness as a
//! seed ([`rng::SplitMix64`]), and persistence is the caller's job (every
//! state type serializes). The device drives it; ADR 0005 says what runs
//! where.
#![forbid(unsafe_code)]

pub mod energy;
mod error;
pub mod model;
pub mod rng;
pub mod safety;
pub mod schedule;
pub mod sun;

pub use error::RuleError;
/// The time library of this crate's API, so callers (the CLI rendering a
/// device's local days) use the same types without a second dependency.
pub use jiff;
