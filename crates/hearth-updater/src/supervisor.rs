//! The simulator's boot loader (ADR 0004 "Trial boot"): start the boot
//! slot's image after checking its checksum, run the trial health check,
//! and fall back to the previous slot by itself.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::state::{BootDecision, Slot};
use crate::store::{self, steps};
use crate::Error;

/// File name of the health marker in the state directory (see the crate docs).
pub const HEALTH_FILE: &str = "health-ok";

/// How often the trial's health marker and exit status are polled.
const POLL: Duration = Duration::from_millis(50);

/// Path of the health marker.
pub fn health_file(dir: &Path) -> PathBuf {
    dir.join(HEALTH_FILE)
}

/// Runs the boot loop until an agent started outside a trial exits with no
/// trial pending; returns that agent's exit code (1 if killed by a signal).
///
/// Each round: count the boot in `boot.json` (persisted before anything is
/// started, so an interrupted trial is reverted next time), verify the boot
/// slot's length and sha256, start it with `agent_args`, and in a trial wait
/// at most `health_timeout` for the health marker. An agent that exits after
/// installing an update (a trial now pending) is followed by a trial boot.
///
/// # Errors
/// [`Error::NoBootableSlot`] when neither slot verifies; [`Error::Io`],
/// [`Error::BadRecord`].
pub fn run(dir: &Path, health_timeout: Duration, agent_args: &[OsString]) -> Result<i32, Error> {
    run_with(dir, health_timeout, None, agent_args)
}

/// [`run`] with an `install_command` for hand-offs ([`crate::handoff`]):
/// before every agent start (so never while an agent runs) a pending
/// hand-off is re-verified and applied, at most once, and its result
/// recorded in `boot.json` for the agent to report. Without `install`, a
/// pending hand-off is discarded and recorded as failed.
///
/// # Errors
/// As [`run`].
pub fn run_with(dir: &Path, health_timeout: Duration, install: Option<&crate::handoff::InstallCommand>, agent_args: &[OsString]) -> Result<i32, Error> {
    loop {
        crate::handoff::apply_pending(dir, install)?;
        let mut record = store::load_record(dir)?;
        let decision = record.on_boot();
        let slot = decision.slot();
        let trial = matches!(decision, BootDecision::Trial { .. });
        // ADR 0004 "Crash safety": the device only ever starts an image whose
        // hash matches what verified target metadata said.
        let verified = match record.image(slot) {
            Some(image) => store::verify_slot(dir, slot, image),
            None => Err(Error::Verify { what: format!("slot {}", slot.name()), reason: "no image recorded".into() }),
        };
        if let Err(e) = verified {
            eprintln!("hearth-device-supervisor: {e}");
            if trial {
                record.fail_trial(format!("image failed verification: {e}"))?;
            } else if !record.active_corrupt() {
                return Err(Error::NoBootableSlot(e.to_string()));
            }
            store::save_record(dir, &record)?;
            continue;
        }
        store::save_record(dir, &record)?;
        let marker = health_file(dir);
        match std::fs::remove_file(&marker) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("remove", &marker)(e)),
        }
        let version = record.image(slot).map(|i| i.version.to_string()).unwrap_or_default();
        let mut child = spawn(dir, slot, &version, trial, agent_args)?;
        if trial {
            store::crash_point(steps::TRIAL_RUNNING);
            match wait_for_health(&mut child, &marker, health_timeout)? {
                Health::Ok => record.commit_trial()?,
                Health::Failed(reason) => {
                    eprintln!("hearth-device-supervisor: trial of {version} failed: {reason}; back to slot {}", record.active.name());
                    record.fail_trial(reason)?;
                    store::save_record(dir, &record)?;
                    continue;
                }
            }
            store::save_record(dir, &record)?;
        }
        let status = child.wait().map_err(Error::io("wait for agent", store::slot_image(dir, slot)))?;
        // The agent may have installed an update and exited to start it, or
        // staged one for the install command.
        if store::load_record(dir)?.trial.is_some() || crate::handoff::pending_path(dir).exists() {
            continue;
        }
        return Ok(status.code().unwrap_or(1));
    }
}

fn spawn(dir: &Path, slot: Slot, version: &str, trial: bool, args: &[OsString]) -> Result<Child, Error> {
    let image = store::slot_image(dir, slot);
    Command::new(&image)
        .args(args)
        .env("HEARTH_HEALTH_FILE", health_file(dir))
        .env("HEARTH_SLOT", slot.name())
        .env("HEARTH_FIRMWARE_VERSION", version)
        .env("HEARTH_TRIAL", if trial { "1" } else { "0" })
        .spawn()
        .map_err(Error::io("start agent", image))
}

enum Health {
    Ok,
    Failed(String),
}

fn wait_for_health(child: &mut Child, marker: &Path, timeout: Duration) -> Result<Health, Error> {
    let start = Instant::now();
    loop {
        // The marker is checked before the exit status: an agent that reports
        // health and then exits (to install the next update) passed its trial.
        if marker.exists() {
            return Ok(Health::Ok);
        }
        if let Some(status) = child.try_wait().map_err(Error::io("wait for agent", marker))? {
            if marker.exists() {
                return Ok(Health::Ok);
            }
            return Ok(Health::Failed(format!("agent exited ({status}) before reporting health")));
        }
        if start.elapsed() >= timeout {
            // Kill (SIGKILL) and reap so the failed version cannot keep running
            // alongside the previous one.
            let _ = child.kill();
            let _ = child.wait();
            return Ok(Health::Failed(format!("no health report within {}s", timeout.as_secs_f32())));
        }
        std::thread::sleep(POLL);
    }
}
