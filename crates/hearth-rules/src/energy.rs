//! placeholder
use serde::{Deserialize, Serialize};
/// Energy.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct EnergyConfig {}
impl EnergyConfig { pub(crate) fn validate(&self) -> Result<(), crate::RuleError> { Ok(()) } }
