//! placeholder
use serde::{Deserialize, Serialize};
/// Interlocks.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct InterlockConfig {}
impl InterlockConfig { pub(crate) fn validate(&self) -> Result<(), crate::RuleError> { Ok(()) } }
