//! Hearth firmware install: A/B slots, trial boot, automatic fallback (ADR 0004, issue 4).
//!
//! The TUF client in `hearth-tuf` decides *which* image may be installed; this
//! crate decides *how* it gets onto the device without ever leaving the device
//! unable to start a verified image.
//!
//! * [`state`] — the sans-IO slot state machine over a [`state::BootRecord`]:
//!   slots A/B, the active slot, an optional trial, the last update result.
//!   No I/O, no clock: every transition is a plain function, unit-tested in memory.
//! * [`store`] — the on-disk layout (`boot.json`, `slots/{a,b}/image`) and the
//!   atomic record write (temp file + fsync + rename + directory fsync).
//! * [`install`] — [`install::install_to_inactive`] streams a TUF-verified
//!   image into the inactive slot and switches into trial mode with one
//!   atomic rename.
//! * [`handoff`] — the `install_command` hand-off for real hardware
//!   (RAUC/SWUpdate style): the sandboxed agent stages the verified image,
//!   the supervisor re-verifies it and runs the hook, at most once.
//! * [`supervisor`] — the simulator's boot loader: verifies the boot slot's
//!   checksum, starts it, runs the trial health check and falls back by itself.
//!
//! # The health contract (agent side)
//! The supervisor starts the agent with these environment variables:
//! `HEARTH_HEALTH_FILE` (a path), `HEARTH_SLOT` (`a` or `b`),
//! `HEARTH_FIRMWARE_VERSION`, and `HEARTH_TRIAL` (`1` in a trial boot, else `0`).
//! In a trial boot, once the agent has reached the cloud and passed its
//! self-test, it creates the file named by `HEARTH_HEALTH_FILE` (contents
//! ignored). The supervisor then commits the trial. If the agent exits before,
//! or the file does not appear within the health timeout, the supervisor kills
//! it, switches back to the previous slot and records the failed version in
//! `boot.json` (`last_result`), which the agent reports on its next link.
//! Outside a trial, creating the file is harmless.
//!
//! # Installing from the agent
//! After the TUF client (`hearth_tuf::client::Updater`) has downloaded and
//! verified a target: build [`install::ExpectedImage::from_target`] with the
//! device's hardware model, call [`install::install_to_inactive`] (or
//! [`handoff::stage`] when an `install_command` hand-off is configured),
//! then exit; the supervisor sees the pending trial and starts it. Install
//! only while `boot.json` has no trial (a trial's slot is the inactive one;
//! [`state::BootRecord::plan_install`] refuses otherwise). Report
//! `last_result`, the active slot and its version from [`store::load_record`].
//!
//! # Crash safety
//! The only switch point is the rename of `boot.json`. Before it the old slot
//! is active and the partly written slot is never referenced; after it the
//! trial is started at most [`state::MAX_TRIAL_BOOTS`] times before it is
//! reverted. Every start checks the boot slot's length and sha256 against the
//! values recorded from verified TUF target metadata.
#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod handoff;
pub mod install;
pub mod state;
pub mod store;
pub mod supervisor;
mod error;
mod version;

pub use error::Error;
pub use version::Version;
