//! The state directory on disk and the atomic record write.
//!
//! Layout (ADR 0004): `DIR/boot.json` (the [`BootRecord`]) and
//! `DIR/slots/{a,b}/image`. `boot.json` is only ever replaced by
//! [`save_record`]: write a temp file, fsync it, rename it over the old one,
//! fsync the directory. A crash at any point leaves either the old or the new
//! record, never a torn one, and once `save_record` returns the new record
//! survives power loss.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::state::{BootRecord, Slot, SlotImage};
use crate::Error;

/// The record's file name in the state directory.
pub const RECORD: &str = "boot.json";

/// Environment variable naming a crash point at which the process stops
/// (see [`crash_point`]). Used by the crash tests to kill -9 the process at an
/// exact step; it can only stop the process, never skip a check, and is
/// ignored unless built with the test-only `crash-points` feature.
pub const CRASH_ENV: &str = "HEARTH_UPDATER_CRASH_AT";

/// Named steps where a crash test can interrupt an install or a boot.
pub mod steps {
    /// Half of the image is written to the inactive slot, nothing synced.
    pub const SLOT_WRITE: &str = "slot-write";
    /// The slot image is written and synced; the record is not touched yet.
    pub const SLOT_SYNCED: &str = "slot-synced";
    /// The new record's temp file is written and synced, not yet renamed.
    pub const SWITCH_BEFORE_RENAME: &str = "switch-before-rename";
    /// The record is renamed into place, the directory not yet synced.
    pub const SWITCH_AFTER_RENAME: &str = "switch-after-rename";
    /// The supervisor has started a trial and is waiting for its health report.
    pub const TRIAL_RUNNING: &str = "trial-running";
    /// Hand-off: the staged image is written and synced, its record not yet.
    pub const HANDOFF_STAGED: &str = "handoff-staged";
    /// Hand-off: the supervisor re-verified the stage, not yet marked running.
    pub const HANDOFF_VERIFIED: &str = "handoff-verified";
    /// Hand-off: the record is marked running, the hook not yet started.
    pub const HANDOFF_MARKED: &str = "handoff-marked";
}

/// Crash-test hook: if [`CRASH_ENV`] names `step`, print `CRASHPOINT <step>`
/// to stderr and stop here until killed (the test then sends SIGKILL, the
/// real kill -9, so nothing after this point runs and no buffers are flushed).
/// Compiled in only with the `crash-points` feature, which only this crate's
/// own tests enable; otherwise it does nothing and reads no environment.
pub fn crash_point(step: &str) {
    #[cfg(feature = "crash-points")]
    if std::env::var_os(CRASH_ENV).is_some_and(|v| v == step) {
        eprintln!("CRASHPOINT {step}");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
    #[cfg(not(feature = "crash-points"))]
    let _ = step;
}

/// Path of `slot`'s image.
pub fn slot_image(dir: &Path, slot: Slot) -> PathBuf {
    dir.join("slots").join(slot.name()).join("image")
}

/// Path of `boot.json`.
pub fn record_path(dir: &Path) -> PathBuf {
    dir.join(RECORD)
}

/// Reads `boot.json`.
///
/// # Errors
/// [`Error::Io`] (including not found), [`Error::BadRecord`].
pub fn load_record(dir: &Path) -> Result<BootRecord, Error> {
    let path = record_path(dir);
    let bytes = read_small(&path).map_err(Error::io("read", &path))?;
    serde_json::from_slice(&bytes).map_err(|e| Error::BadRecord { path, reason: e.to_string() })
}

/// Replaces `boot.json` atomically and durably: temp + fsync + rename + fsync dir.
///
/// # Errors
/// [`Error::Io`].
pub fn save_record(dir: &Path, record: &BootRecord) -> Result<(), Error> {
    let path = record_path(dir);
    // The pid keeps two writers (supervisor and agent) off each other's temp
    // file; the rename itself is what serialises them.
    let tmp = dir.join(format!("{RECORD}.tmp.{}", std::process::id()));
    // serde_json cannot fail on this plain data (no maps with non-string keys).
    let bytes = serde_json::to_vec_pretty(record).map_err(|e| Error::BadRecord { path: path.clone(), reason: e.to_string() })?;
    let mut f = create_temp(&tmp)?;
    f.write_all(&bytes).map_err(Error::io("write", &tmp))?;
    f.sync_all().map_err(Error::io("fsync", &tmp))?;
    drop(f);
    crash_point(steps::SWITCH_BEFORE_RENAME);
    fs::rename(&tmp, &path).map_err(Error::io("rename", &path))?;
    crash_point(steps::SWITCH_AFTER_RENAME);
    sync_dir(dir)
}

/// Largest `boot.json` / `pending-install.json` read (both are a few hundred bytes).
pub const MAX_RECORD: u64 = 64 * 1024;

/// Opens a file in the state directory without following a symlink
/// (`O_NOFOLLOW`) and without blocking on a FIFO (`O_NONBLOCK`), and requires
/// a regular file (fstat of the opened descriptor, so no check-then-open
/// race). The state directory is writable by the sandboxed agent while the
/// supervisor reads it as root: a planted symlink to a root-only file, a
/// device or a FIFO is refused instead of read (DESIGN.md §3, "Firmware";
/// ADR 0010).
///
/// # Errors
/// The OS error; `ELOOP` for a symlink, `InvalidData` for a non-regular file.
pub fn open_regular(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let f = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC).open(path)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "not a regular file"));
    }
    Ok(f)
}

/// Reads a small record file through [`open_regular`], refusing one over
/// [`MAX_RECORD`] bytes (a planted `/dev/zero`-like file cannot exhaust memory).
///
/// # Errors
/// The OS error (`NotFound` kept as is); `InvalidData` when too large.
pub fn read_small(path: &Path) -> std::io::Result<Vec<u8>> {
    let f = open_regular(path)?;
    let mut bytes = Vec::new();
    f.take(MAX_RECORD + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_RECORD {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("larger than {MAX_RECORD} bytes")));
    }
    Ok(bytes)
}

/// Creates a temp file for an atomic replace in the state directory, safely
/// when root writes into a directory the sandboxed agent can write: a stale
/// entry (possibly a planted symlink; `remove_file` removes the link, not its
/// target) is removed first, then the file is created with `O_CREAT|O_EXCL`
/// (`create_new`) and `O_NOFOLLOW`, so a symlink planted in between makes
/// the create fail instead of redirecting root's write.
///
/// # Errors
/// [`Error::Io`].
pub(crate) fn create_temp(tmp: &Path) -> Result<File, Error> {
    use std::os::unix::fs::OpenOptionsExt as _;
    match fs::remove_file(tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io("remove stale", tmp)(e)),
    }
    OpenOptions::new().write(true).create_new(true).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(tmp).map_err(Error::io("create", tmp))
}

/// fsyncs a directory so a rename or create in it is durable.
///
/// # Errors
/// [`Error::Io`].
pub fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(Error::io("fsync dir", dir))
}

/// Hex sha256 and length of a file, read in chunks.
///
/// # Errors
/// [`Error::Io`].
pub fn hash_file(path: &Path) -> Result<(String, u64), Error> {
    let f = File::open(path).map_err(Error::io("open", path))?;
    hash_reader(f, path)
}

/// Like [`hash_file`] for a file in the agent-writable state directory:
/// opened with [`open_regular`] (no symlink, no FIFO or device) and read
/// to at most `max + 1` bytes, so a caller comparing against a trusted
/// length `max` sees "too long" without reading an unbounded file.
///
/// # Errors
/// [`Error::Io`] (a symlink or non-regular file included).
pub fn hash_state_file(path: &Path, max: u64) -> Result<(String, u64), Error> {
    let f = open_regular(path).map_err(Error::io("open", path))?;
    hash_reader(f.take(max.saturating_add(1)), path)
}

fn hash_reader(mut f: impl Read, path: &Path) -> Result<(String, u64), Error> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(Error::io("read", path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        len += n as u64;
    }
    Ok((hex::encode(h.finalize()), len))
}

/// Checks `slot`'s image against its recorded length and sha256 (ADR 0004:
/// "its hash is checked at every start").
///
/// # Errors
/// [`Error::Verify`] on mismatch or a missing image; [`Error::Io`].
pub fn verify_slot(dir: &Path, slot: Slot, image: &SlotImage) -> Result<(), Error> {
    let path = slot_image(dir, slot);
    let what = format!("slot {}", slot.name());
    if !path.exists() {
        return Err(Error::Verify { what, reason: "missing".into() });
    }
    let (sha, len) = hash_state_file(&path, image.length)?;
    if len != image.length {
        return Err(Error::Verify { what, reason: format!("length {len} != {}", image.length) });
    }
    if sha != image.sha256 {
        return Err(Error::Verify { what, reason: "sha256 mismatch".into() });
    }
    Ok(())
}

/// Opens `slot`'s image for writing (created 0755: for the simulator the
/// image is the agent executable), truncating what was there.
/// Makes a slot image durable by name: fsyncs `slots/<s>/`, `slots/` and the
/// state directory, since the slot directory may have been created just now.
pub(crate) fn sync_slot_dirs(dir: &Path, slot: Slot) -> Result<(), Error> {
    let slots = dir.join("slots");
    sync_dir(&slots.join(slot.name()))?;
    sync_dir(&slots)?;
    sync_dir(dir)
}

pub(crate) fn create_slot_file(dir: &Path, slot: Slot) -> Result<File, Error> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = slot_image(dir, slot);
    let parent = path.parent().unwrap_or(dir);
    fs::create_dir_all(parent).map_err(Error::io("create dir", parent))?;
    OpenOptions::new().write(true).create(true).truncate(true).mode(0o755).open(&path).map_err(Error::io("create", &path))
}
