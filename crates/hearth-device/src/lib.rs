//! The Hearth device agent: a simulated smart plug, energy plug or motion
//! sensor.
//!
//! * [`provision`] — the factory step: the device makes its own key, gets a
//!   manufacturer certificate, learns the one cloud CA it trusts, and gets a
//!   setup label.
//! * [`protocol`] — the sans-IO protocol core ([`DeviceCore`]): commands,
//!   pairing, reset and buttons over the persisted state.
//! * [`agent`] — the tokio loop: dial the cloud over mutual TLS 1.3,
//!   reconnect with [`backoff`], move frames, serve local events ([`spawn`],
//!   [`run`]).
//! * [`store`] — the state directory and atomic writes.
//! * [`driver`] — the outputs (relay, dimmer with fades) behind a trait;
//!   the simulator's driver by default.
//! * [`energy`] — an energy plug's history (A/B images) and reports.
//! * [`rules`] — the persisted rules and safety-interlock state that
//!   [`DeviceCore`] drives every second.
//! * [`lan`] — the LAN endpoint (same signed commands over local TLS 1.3)
//!   and the LAN client a motion sensor uses to switch its targets; [`mdns`]
//!   — the `_hearth._tcp` responder and browser.
//! * [`update`] — the firmware update client: TUF over TLS to the cloud's
//!   repository, staged rollout and owner policy, install into the inactive
//!   slot, the trial-boot health report (issue 4).
//!
//! Invariants: the device writes nothing to a socket before the TLS
//! handshake verified the cloud against the provisioned CA and name; every
//! change is persisted before it is reported; every command gets a signed
//! answer; the private key never leaves the state directory.
#![forbid(unsafe_code)]

pub mod agent;
pub mod backoff;
pub mod driver;
pub mod lan;
pub mod mdns;
pub mod protocol;
pub mod rules;
mod error;
pub mod energy;
mod provision;
pub mod store;
pub mod update;

pub use agent::{run, spawn, AgentHandle, AgentOptions, Snapshot};
pub use protocol::DeviceCore;
pub use error::Error;
pub use provision::{provision, Provisioned};
