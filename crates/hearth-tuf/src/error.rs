//! The crate's one error type.

/// Everything that can go wrong while verifying or building TUF metadata.
///
/// Repository faults (bad signatures, rollbacks, expired metadata, bad
/// lengths) are kept apart from local faults (I/O, misuse) so a caller can
/// report an attack differently from a broken disk.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Metadata could not be parsed or breaks the metadata format (spec 4).
    #[error("malformed {role} metadata: {reason}")]
    Malformed {
        /// Role (or file) that failed to parse.
        role: String,
        /// What was wrong.
        reason: String,
    },
    /// Fewer than threshold valid signatures from the role's keys.
    #[error("{role}: {valid} valid signature(s), threshold is {threshold}")]
    Threshold {
        /// Role whose signatures were checked.
        role: String,
        /// Distinct keys with a valid signature.
        valid: usize,
        /// Required number.
        threshold: u64,
    },
    /// A version number broke the rollback rules (spec 5.3.4, 5.4.3, 5.5.5, 5.6.4).
    #[error("{role}: bad version: {reason}")]
    BadVersion {
        /// Role concerned.
        role: String,
        /// What was expected.
        reason: String,
    },
    /// New timestamp has the same version as the trusted one (spec 5.4.3.1):
    /// not an attack, the new copy is discarded.
    #[error("timestamp: same version {0} as trusted, new copy discarded")]
    EqualTimestampVersion(u64),
    /// Metadata has expired (freeze attack, spec 5.3.9, 5.4.4, 5.5.6, 5.6.5).
    #[error("{role} metadata expired at {expires}")]
    Expired {
        /// Role concerned.
        role: String,
        /// Expiry in the metadata.
        expires: String,
    },
    /// Length or hash of downloaded data does not match trusted metadata.
    #[error("{what}: {reason}")]
    LengthOrHash {
        /// File concerned.
        what: String,
        /// Which check failed.
        reason: String,
    },
    /// Metadata needed by the workflow is missing from its parent.
    #[error("{0}")]
    Missing(String),
    /// Downloading failed.
    #[error("fetch {url}")]
    Fetch {
        /// What was requested.
        url: String,
        /// Why it failed.
        source: FetchError,
    },
    /// Local storage failed.
    #[error("local storage {what}: {source}")]
    Io {
        /// File or directory concerned.
        what: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// Misuse of the API or a bad argument (not caused by the repository).
    #[error("{0}")]
    Usage(String),
    /// Key handling failed (parsing, generation, signing).
    #[error("key: {0}")]
    Key(String),
}

/// Why a fetch failed; `NotFound` is separate because spec 5.3.2 treats a
/// missing next root as "no newer root" rather than an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// HTTP 403 or 404.
    #[error("not found (HTTP {0})")]
    NotFound(u16),
    /// Any other non-success HTTP status.
    #[error("HTTP status {0}")]
    Status(u16),
    /// The server sent more than the length limit; the download was aborted.
    #[error("more than {0} bytes, aborted")]
    TooLong(u64),
    /// Network or protocol error.
    #[error("{0}")]
    Transport(String),
}

impl Error {
    pub(crate) fn malformed(role: &str, reason: impl Into<String>) -> Self {
        Error::Malformed { role: role.to_owned(), reason: reason.into() }
    }
}
