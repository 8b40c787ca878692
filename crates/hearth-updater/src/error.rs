//! The crate's error type.

use std::path::PathBuf;

use crate::Version;

/// Everything that can go wrong while installing or booting an image.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done (open, write, fsync, rename…).
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// `boot.json` could not be parsed.
    #[error("boot record {path}: {reason}")]
    BadRecord {
        /// The record's path.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The offered image is not newer than the running one (never downgrade).
    #[error("version {offered} is not higher than the running {running}")]
    NotNewer {
        /// Version in the target metadata.
        offered: Version,
        /// Version of the running (active) slot.
        running: Version,
    },
    /// A trial is already in progress; it must be committed or reverted first.
    #[error("a trial of {version} is in progress")]
    TrialInProgress {
        /// The version under trial.
        version: Version,
    },
    /// No trial is in progress (commit or revert without one).
    #[error("no trial in progress")]
    NoTrial,
    /// The image's bytes do not match the trusted length or sha256.
    #[error("image {what}: {reason}")]
    Verify {
        /// Which image (slot or source).
        what: String,
        /// Length or hash mismatch details.
        reason: String,
    },
    /// Target metadata lacks what an install needs, or is for another model.
    #[error("target {target}: {reason}")]
    Target {
        /// Target path.
        target: String,
        /// What was missing or wrong.
        reason: String,
    },
    /// A version string could not be parsed.
    #[error("bad version {0:?}: expected dotted decimal numbers like 2.0.1")]
    BadVersion(String),
    /// The external `install_command` failed.
    #[error("install command {command}: {reason}")]
    InstallCommand {
        /// The command run.
        command: String,
        /// Exit status or spawn error.
        reason: String,
    },
    /// No slot holds an image that passes verification.
    #[error("no bootable slot: {0}")]
    NoBootableSlot(String),
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { op, path, source }
    }
}
