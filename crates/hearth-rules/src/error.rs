//! The crate's one error type (STYLE.md §4).

/// Why a rule set, an edit or a stored history was refused.
///
/// Every variant carries enough context (rule id, field, limit) for a
/// controller to show the owner what to fix without guessing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RuleError {
    /// The serialized input was larger than the device accepts.
    #[error("rule set is {len} bytes, more than the limit of {max}")]
    TooLarge {
        /// Size of the input.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The input was not valid JSON for the rule model (unknown fields included).
    #[error("rule set does not parse: {0}")]
    Parse(String),
    /// More rules than the device keeps.
    #[error("{count} rules, more than the limit of {max}")]
    TooManyRules {
        /// Number of rules in the set.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A string field exceeds its bound.
    #[error("{field} is {len} bytes, more than the limit of {max}")]
    StringTooLong {
        /// Which field (e.g. `rule 3 name`).
        field: String,
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A field's value is out of its allowed range.
    #[error("{field}: {reason}")]
    OutOfRange {
        /// Which field.
        field: String,
        /// What is wrong, in words.
        reason: String,
    },
    /// Two rules share an id.
    #[error("rule id {0} is used twice")]
    DuplicateRuleId(u32),
    /// An edit names a rule that is not in the set.
    #[error("no rule with id {0}")]
    UnknownRule(u32),
    /// The edit was prepared against another version (optimistic concurrency).
    #[error("edit is based on version {expected}, but the device has version {actual}")]
    VersionConflict {
        /// The version the editor read.
        expected: u64,
        /// The version the device holds.
        actual: u64,
    },
    /// The IANA time zone is not known to this device's tz database.
    #[error("unknown time zone {0:?}")]
    UnknownTimeZone(String),
    /// A stored energy history failed its integrity check or is malformed.
    #[error("energy history is corrupt: {0}")]
    CorruptHistory(&'static str),
}
