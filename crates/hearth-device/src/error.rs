use std::path::{Path, PathBuf};

/// Everything that can go wrong on the device side.
///
/// Faults of the device's own storage (files, permissions, corruption) are
/// kept apart from faults of the peers it talks to, which the agent logs and
/// survives (see [`crate::agent`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading or writing a file in the state directory failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A state or identity file exists but cannot be read. The agent stops
    /// rather than silently starting over, which would drop the access list
    /// and reopen pairing.
    #[error("{} is corrupt: {reason} (restore it or re-provision the device)", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What was wrong with it.
        reason: String,
    },
    /// Provisioning found an identity in the state directory already.
    #[error("{} already holds a device identity ({file} exists); refusing to overwrite it", dir.display())]
    AlreadyProvisioned {
        /// The state directory.
        dir: PathBuf,
        /// The file that gave it away.
        file: &'static str,
    },
    /// The state directory holds no (complete) device identity.
    #[error("{} is not a provisioned device state directory ({file} is missing)", dir.display())]
    NotProvisioned {
        /// The state directory.
        dir: PathBuf,
        /// The missing file.
        file: &'static str,
    },
    /// Another agent process (or task) is using the state directory.
    #[error("{} is in use by another hearth-device agent (use SIGUSR1 to reset a running agent)", dir.display())]
    Locked {
        /// The state directory.
        dir: PathBuf,
    },
    /// A provisioning input was not usable.
    #[error("invalid {what}: {reason}")]
    InvalidInput {
        /// Which input.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// Certificate or TLS setup failed.
    #[error(transparent)]
    Pki(#[from] hearth_pki::Error),
    /// Encoding one of our own protocol messages failed (a bug, not a peer fault).
    #[error("could not build a protocol message: {0}")]
    Proto(#[from] hearth_proto::Error),
}

pub(crate) fn io_err(path: &Path, source: std::io::Error) -> Error {
    Error::Io { path: path.to_path_buf(), source }
}

pub(crate) fn corrupt(path: &Path, reason: impl std::fmt::Display) -> Error {
    Error::Corrupt { path: path.to_path_buf(), reason: reason.to_string() }
}
