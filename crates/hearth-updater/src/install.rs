//! Installing a verified image into the inactive slot. (The external
//! updater hand-off, `install_command`, is in [`crate::handoff`].)

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::state::{Slot, SlotImage};
use crate::store::{self, steps};
use crate::{Error, Version};

/// What the TUF target metadata promises about an image: the install checks
/// the bytes against exactly this.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpectedImage {
    /// Target path (for messages).
    pub target: String,
    /// `custom.hearth.version`.
    pub version: Version,
    /// Exact length (TUF `length`).
    pub length: u64,
    /// sha256 from TUF `hashes`.
    pub sha256: [u8; 32],
}

impl ExpectedImage {
    /// Takes version, length and sha256 from a target that the TUF client
    /// has already verified (spec 5.7: the targets role signed it), and
    /// checks `custom.hearth.hardware_model` against this device's model
    /// (ADR 0004 "Install": refuse an image for other hardware).
    ///
    /// # Errors
    /// [`Error::Target`] if custom metadata or a sha256 is missing or the
    /// model differs; [`Error::BadVersion`].
    pub fn from_target(target: &hearth_tuf::metadata::TargetFile, hardware_model: &str) -> Result<Self, Error> {
        let err = |reason: &str| Error::Target { target: target.path.clone(), reason: reason.to_owned() };
        let hearth = target.custom.as_ref().and_then(|c| c.get("hearth")).ok_or_else(|| err("no custom.hearth metadata"))?;
        let version = hearth.get("version").and_then(|v| v.as_str()).ok_or_else(|| err("no custom.hearth.version"))?;
        let model = hearth.get("hardware_model").and_then(|v| v.as_str()).ok_or_else(|| err("no custom.hearth.hardware_model"))?;
        if model != hardware_model {
            return Err(err(&format!("hardware model {model:?}, this device is {hardware_model:?}")));
        }
        let sha = target.hashes.get("sha256").ok_or_else(|| err("no sha256 hash"))?;
        let sha256: [u8; 32] = sha.as_slice().try_into().map_err(|_| err("sha256 is not 32 bytes"))?;
        Ok(ExpectedImage { target: target.path.clone(), version: Version::parse(version)?, length: target.length, sha256 })
    }

    fn slot_image(&self) -> SlotImage {
        SlotImage { version: self.version.clone(), length: self.length, sha256: hex::encode(self.sha256) }
    }
}

/// Streams `src` into `out`, never writing past the trusted length, hashing
/// as it goes (TUF spec 5.7.2 applied to the bytes that land on disk), then
/// fsyncs. Fails on a short or long stream or a hash mismatch.
pub(crate) fn copy_verified(mut src: impl Read, out: &mut File, path: &Path, expected: &ExpectedImage) -> Result<(), Error> {
    let verr = |reason: String| Error::Verify { what: expected.target.clone(), reason };
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut written = 0u64;
    let half = expected.length / 2;
    loop {
        let n = src.read(&mut buf).map_err(Error::io("read image for", path))?;
        if n == 0 {
            break;
        }
        if written + n as u64 > expected.length {
            // Endless-data defence: stop at the limit instead of filling the disk.
            return Err(verr(format!("longer than the trusted {} bytes", expected.length)));
        }
        out.write_all(&buf[..n]).map_err(Error::io("write", path))?;
        h.update(&buf[..n]);
        let before = written;
        written += n as u64;
        if before <= half && written > half {
            store::crash_point(steps::SLOT_WRITE);
        }
    }
    if written != expected.length {
        return Err(verr(format!("length {written} != {}", expected.length)));
    }
    if h.finalize()[..] != expected.sha256[..] {
        return Err(verr("sha256 mismatch".into()));
    }
    out.sync_all().map_err(Error::io("fsync", path))
}

/// Writes a verified image into the inactive slot and switches into trial
/// mode (ADR 0004 "Install"):
///
/// 1. refuse a version not higher than the running one, or a second trial;
/// 2. stream into `slots/<inactive>/image` with the TUF length as the limit,
///    hashing while writing, fsync file and directory;
/// 3. read the slot back and verify length and sha256 again (what is on disk
///    is what will boot);
/// 4. switch: rewrite `boot.json` with the image recorded and a trial set —
///    its atomic rename is the single switch point.
///
/// The caller then restarts into the supervisor (the agent exits; the
/// supervisor sees the pending trial and starts it).
///
/// # Errors
/// [`Error::NotNewer`], [`Error::TrialInProgress`], [`Error::Verify`], [`Error::Io`].
pub fn install_to_inactive(dir: &Path, src: impl Read, expected: &ExpectedImage) -> Result<Slot, Error> {
    let mut record = store::load_record(dir)?;
    let slot = record.plan_install(&expected.version)?;
    let path = store::slot_image(dir, slot);
    let mut out = store::create_slot_file(dir, slot)?;
    copy_verified(src, &mut out, &path, expected)?;
    drop(out);
    store::sync_slot_dirs(dir, slot)?;
    let image = expected.slot_image();
    store::verify_slot(dir, slot, &image)?;
    store::crash_point(steps::SLOT_SYNCED);
    let switched = record.start_trial(image)?;
    store::save_record(dir, &record)?;
    Ok(switched)
}

/// [`install_to_inactive`] from a file (e.g. the TUF client's download).
///
/// # Errors
/// As [`install_to_inactive`].
pub fn install_file_to_inactive(dir: &Path, image: &Path, expected: &ExpectedImage) -> Result<Slot, Error> {
    let f = File::open(image).map_err(Error::io("open", image))?;
    install_to_inactive(dir, f, expected)
}

/// Factory provisioning: copies the factory image into slot A and writes a
/// fresh `boot.json` recording its length and sha256 (the factory image is
/// trusted by construction; every later image comes through TUF).
///
/// # Errors
/// [`Error::Io`]; [`Error::BadRecord`] if `boot.json` already exists.
pub fn provision_factory(dir: &Path, image: &Path, version: Version) -> Result<(), Error> {
    let record_path = store::record_path(dir);
    if record_path.exists() {
        return Err(Error::BadRecord { path: record_path, reason: "already provisioned".into() });
    }
    let (sha, length) = store::hash_file(image)?;
    let sha256: [u8; 32] = hex::decode(&sha).ok().and_then(|b| b.try_into().ok()).ok_or_else(|| Error::Verify { what: "factory image".into(), reason: "hash".into() })?;
    let expected = ExpectedImage { target: image.display().to_string(), version: version.clone(), length, sha256 };
    let path = store::slot_image(dir, Slot::A);
    let mut out = store::create_slot_file(dir, Slot::A)?;
    copy_verified(File::open(image).map_err(Error::io("open", image))?, &mut out, &path, &expected)?;
    drop(out);
    store::sync_slot_dirs(dir, Slot::A)?;
    store::save_record(dir, &crate::state::BootRecord::factory(expected.slot_image()))
}
