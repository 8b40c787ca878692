//! The `install_command` hand-off (issue 4 "For real hardware", ADR 0010
//! "Install command hand-off"): the sandboxed agent verifies and stages, the
//! unsandboxed supervisor re-verifies and runs the system updater.
//!
//! The agent's seccomp filter forbids starting programs, so the agent never
//! runs the hook. Instead:
//!
//! 1. **Stage (agent, sandboxed)** — [`stage`]: refuse a version not higher
//!    than the running one or a second pending hand-off; stream the
//!    TUF-verified image into `DIR/`[`STAGED_IMAGE`] with the trusted length
//!    as the limit and the sha256 checked (TUF spec 5.7.2–5.7.3 applied to
//!    the bytes on disk), fsync; then write `DIR/`[`PENDING`] (version, target,
//!    length, sha256, `state: staged`) atomically. The agent then exits, as
//!    it does for the slot switch.
//! 2. **Apply (supervisor, outside the sandbox)** — [`apply_pending`], called
//!    before every agent start, i.e. only while no agent runs: re-check the
//!    version against `boot.json`'s running version and the staged file's
//!    length and sha256 against the record; durably mark the record
//!    `state: running` (*before* the hook starts); run the supervisor's own
//!    `--install-command` (never a command read from the agent-writable
//!    state directory) with the image path, bounded in time; record
//!    [`UpdateResult::HandedOff`] or [`UpdateResult::HandoffFailed`] in
//!    `boot.json`; delete the stage.
//!
//! # Crash safety: at most once
//! The hook runs **at most once** per staged image. A kill -9 or power loss
//! * while staging (no record yet) — the orphan stage is deleted, nothing runs;
//! * after the record, before the `running` mark — the next start verifies
//!   again and runs the hook (it never ran);
//! * after the `running` mark — the hook may or may not have run (or
//!   finished): it is **not** run again; the stage is discarded and
//!   `HandoffFailed` ("interrupted … outcome unknown") is recorded, so the
//!   owner can retry (a failed version is not retried automatically).
//!
//! The A/B slots and `boot.json`'s active slot are never touched, so at every
//! step the device keeps starting the verified image it was running; what
//! the system updater does with the image (its own slots, a reboot) is up to
//! it.
//!
//! # What the hook trusts
//! The staged image was verified by the agent's TUF client; the supervisor's
//! re-check proves only that the bytes are the ones the agent recorded (no
//! torn or swapped file). It does not re-verify TUF metadata (the trusted
//! metadata lives in the agent-writable state directory), so a compromised
//! agent could stage an image of its choice: the system updater must check
//! its own signature on the bundle (RAUC and SWUpdate both do).

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::install::{copy_verified, ExpectedImage};
use crate::state::UpdateResult;
use crate::store::{self, steps};
use crate::{Error, Version};

/// The pending hand-off record in the state directory.
pub const PENDING: &str = "pending-install.json";
/// The staged image in the state directory.
pub const STAGED_IMAGE: &str = "staged-install.img";
/// How often a running hook is polled.
const POLL: Duration = Duration::from_millis(50);

/// Where a hand-off is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PendingState {
    /// Staged and recorded by the agent; the hook has not started.
    Staged,
    /// The supervisor is about to start (or has started) the hook.
    Running,
}

/// `pending-install.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PendingInstall {
    /// Target path from the TUF metadata.
    pub target: String,
    /// `custom.hearth.version`.
    pub version: Version,
    /// Trusted length.
    pub length: u64,
    /// Trusted sha256, lower-case hex.
    pub sha256: String,
    /// Progress.
    pub state: PendingState,
}

/// Longest target path accepted in a pending record.
pub const MAX_TARGET_LEN: usize = 255;
/// Longest version string accepted in a pending record.
pub const MAX_VERSION_LEN: usize = 64;

impl PendingInstall {
    /// The record comes from the agent-writable state directory and its
    /// strings reach the hook's environment: strict charset and length.
    /// Target (a TUF target path, or the image path for the CLI `stage`;
    /// only a label for the hook, never opened): 1–[`MAX_TARGET_LEN`] bytes
    /// of ASCII letters, digits and `._-+~@/`; version:
    /// at most [`MAX_VERSION_LEN`] bytes (its charset is already digits and
    /// dots, [`Version::parse`]); sha256: 64 lower-case hex digits.
    ///
    /// # Errors
    /// What is wrong.
    pub fn validate(&self) -> Result<(), String> {
        let t = &self.target;
        let charset_ok = t.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-+~@/".contains(&b));
        if t.is_empty() || t.len() > MAX_TARGET_LEN || !charset_ok {
            return Err(format!("target {:?} is not a plain target path (at most {MAX_TARGET_LEN} bytes of [A-Za-z0-9._-+~@/])", t.chars().take(80).collect::<String>()));
        }
        if self.version.to_string().len() > MAX_VERSION_LEN {
            return Err(format!("version longer than {MAX_VERSION_LEN} bytes"));
        }
        if self.sha256.len() != 64 || !self.sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err("sha256 is not 64 lower-case hex digits".into());
        }
        Ok(())
    }
}

/// Path of the pending record.
pub fn pending_path(dir: &Path) -> PathBuf {
    dir.join(PENDING)
}

/// Path of the staged image.
pub fn staged_path(dir: &Path) -> PathBuf {
    dir.join(STAGED_IMAGE)
}

/// Reads the pending record, if any.
///
/// # Errors
/// [`Error::Io`], [`Error::BadRecord`].
pub fn load_pending(dir: &Path) -> Result<Option<PendingInstall>, Error> {
    let path = pending_path(dir);
    // No symlink, FIFO or oversized file: the supervisor reads this as root.
    match store::read_small(&path) {
        Ok(bytes) => {
            let p: PendingInstall = serde_json::from_slice(&bytes).map_err(|e| Error::BadRecord { path: path.clone(), reason: e.to_string() })?;
            p.validate().map_err(|reason| Error::BadRecord { path, reason })?;
            Ok(Some(p))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io("read", &path)(e)),
    }
}

fn save_pending(dir: &Path, pending: &PendingInstall) -> Result<(), Error> {
    let path = pending_path(dir);
    let tmp = dir.join(format!("{PENDING}.tmp.{}", std::process::id()));
    let bytes = serde_json::to_vec_pretty(pending).map_err(|e| Error::BadRecord { path: path.clone(), reason: e.to_string() })?;
    // Root writes here into the agent-writable directory: no symlink follow.
    let mut f = store::create_temp(&tmp)?;
    f.write_all(&bytes).map_err(Error::io("write", &tmp))?;
    f.sync_all().map_err(Error::io("fsync", &tmp))?;
    drop(f);
    std::fs::rename(&tmp, &path).map_err(Error::io("rename", &path))?;
    store::sync_dir(dir)
}

fn remove_if_present(path: &Path) -> Result<(), Error> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove", path)(e)),
    }
}

/// Drops the stage: the image first, then the record (a crash in between
/// leaves a record whose image is missing, which fails verification and is
/// discarded without running anything).
fn discard(dir: &Path) -> Result<(), Error> {
    remove_if_present(&staged_path(dir))?;
    remove_if_present(&pending_path(dir))?;
    store::sync_dir(dir)
}

/// Agent side: stages a TUF-verified image for the supervisor's
/// `install_command` (see the module docs, step 1).
///
/// # Errors
/// [`Error::NotNewer`]; [`Error::InstallCommand`] when a hand-off is
/// already pending; [`Error::Verify`] (too long, short, or wrong hash); [`Error::Io`].
pub fn stage(dir: &Path, running: &Version, src: impl Read, expected: &ExpectedImage) -> Result<(), Error> {
    if expected.version <= *running {
        return Err(Error::NotNewer { offered: expected.version.clone(), running: running.clone() });
    }
    if let Some(p) = load_pending(dir)? {
        return Err(Error::InstallCommand { command: "hand-off".into(), reason: format!("{} is already staged for the system updater", p.version) });
    }
    let pending = PendingInstall {
        target: expected.target.clone(),
        version: expected.version.clone(),
        length: expected.length,
        sha256: hex::encode(expected.sha256),
        state: PendingState::Staged,
    };
    // The supervisor refuses a record that fails this; refuse it here first.
    pending.validate().map_err(|reason| Error::Target { target: expected.target.clone(), reason })?;
    let path = staged_path(dir);
    let result = (|| {
        let mut out = File::create(&path).map_err(Error::io("create", &path))?;
        copy_verified(src, &mut out, &path, expected)?;
        drop(out);
        store::sync_dir(dir)?;
        store::crash_point(steps::HANDOFF_STAGED);
        save_pending(dir, &pending)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&path);
    }
    result
}

/// The supervisor's `install_command`: program, arguments and time limit.
/// It comes from the supervisor's own command line, never from the state
/// directory the sandboxed agent can write.
#[derive(Clone, Debug)]
pub struct InstallCommand {
    /// Program and leading arguments; the image path is appended.
    pub argv: Vec<String>,
    /// The hook is killed (SIGKILL) after this long and counts as failed.
    pub timeout: Duration,
}

/// Supervisor side: applies a pending hand-off, if any (module docs, step 2).
/// Call only while no agent runs. Returns the recorded result.
///
/// # Errors
/// [`Error::Io`], [`Error::BadRecord`] (state directory or `boot.json`
/// unusable). A hook failure is not an error: it is recorded.
pub fn apply_pending(dir: &Path, command: Option<&InstallCommand>) -> Result<Option<UpdateResult>, Error> {
    let pending = match load_pending(dir) {
        Ok(Some(p)) => p,
        Ok(None) => {
            // Interrupted while staging: nothing was recorded, nothing runs.
            if staged_path(dir).exists() {
                eprintln!("hearth-device-supervisor: discarding an unrecorded staged image (interrupted while staging)");
                discard(dir)?;
            }
            return Ok(None);
        }
        Err(e) => {
            // Atomic writes cannot tear the record: this is tampering or a
            // foreign file. Never run anything on it.
            eprintln!("hearth-device-supervisor: discarding a bad hand-off record: {e}");
            discard(dir)?;
            return Ok(None);
        }
    };
    let mut record = store::load_record(dir)?;
    let version = pending.version.clone();
    let outcome = if pending.state == PendingState::Running {
        // At most once: the hook may have run; it is not run again.
        match &record.last_result {
            // The result was recorded; only the cleanup was interrupted.
            Some(r @ (UpdateResult::HandedOff { version: v } | UpdateResult::HandoffFailed { version: v, .. })) if *v == version => {
                let r = r.clone();
                discard(dir)?;
                return Ok(Some(r));
            }
            _ => Err("interrupted while the install command ran; outcome unknown, not run again".to_owned()),
        }
    } else {
        check_and_run(dir, &pending, &mut record, command)
    };
    record.last_result = Some(match outcome {
        Ok(()) => UpdateResult::HandedOff { version },
        Err(reason) => {
            eprintln!("hearth-device-supervisor: hand-off of {version} failed: {reason}");
            UpdateResult::HandoffFailed { version, reason }
        }
    });
    // Result first, then the stage: a crash in between leaves a `running`
    // record whose result is already in boot.json (handled above).
    store::save_record(dir, &record)?;
    discard(dir)?;
    Ok(record.last_result)
}

fn check_and_run(dir: &Path, pending: &PendingInstall, record: &mut crate::state::BootRecord, command: Option<&InstallCommand>) -> Result<(), String> {
    let Some(command) = command else {
        return Err("the supervisor has no --install-command configured".into());
    };
    if let Some(running) = record.running_version() {
        if pending.version <= *running {
            return Err(format!("version {} is not higher than the running {running}", pending.version));
        }
    }
    // Re-verify what is on disk against the record (ADR 0010): a torn,
    // truncated or swapped file never reaches the hook.
    let path = staged_path(dir);
    // No symlink, FIFO or device (a root-only file's length or a hang), and
    // never more than length + 1 bytes read.
    let (sha, len) = store::hash_state_file(&path, pending.length).map_err(|e| format!("staged image: {e}"))?;
    if len != pending.length {
        return Err(format!("staged image length {len} != recorded {}", pending.length));
    }
    if sha != pending.sha256 {
        return Err("staged image sha256 does not match the record".into());
    }
    store::crash_point(steps::HANDOFF_VERIFIED);
    // Clear an older result first, so one for the same version left by an
    // earlier hand-off is not taken for this attempt's after a crash.
    if record.last_result.take().is_some() {
        store::save_record(dir, record).map_err(|e| e.to_string())?;
    }
    save_pending(dir, &PendingInstall { state: PendingState::Running, ..pending.clone() }).map_err(|e| e.to_string())?;
    store::crash_point(steps::HANDOFF_MARKED);
    run_hook(command, &path, pending)
}

/// Runs `argv… <image>` (no shell) with `HEARTH_UPDATE_VERSION`,
/// `HEARTH_UPDATE_SHA256` (hex), `HEARTH_UPDATE_LENGTH`,
/// `HEARTH_UPDATE_TARGET`; exit status 0 within the time limit is success.
fn run_hook(command: &InstallCommand, image: &Path, pending: &PendingInstall) -> Result<(), String> {
    let (program, args) = command.argv.split_first().ok_or("empty install command")?;
    let mut child = Command::new(program)
        .args(args)
        .arg(image)
        .env("HEARTH_UPDATE_VERSION", pending.version.to_string())
        .env("HEARTH_UPDATE_SHA256", &pending.sha256)
        .env("HEARTH_UPDATE_LENGTH", pending.length.to_string())
        .env("HEARTH_UPDATE_TARGET", &pending.target)
        .spawn()
        .map_err(|e| format!("install command {program}: {e}"))?;
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => return Err(format!("install command {program}: {status}")),
            Ok(None) => {}
            Err(e) => return Err(format!("install command {program}: wait: {e}")),
        }
        if start.elapsed() >= command.timeout {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("install command {program}: no exit within {}s, killed", command.timeout.as_secs_f32()));
        }
        std::thread::sleep(POLL);
    }
}
