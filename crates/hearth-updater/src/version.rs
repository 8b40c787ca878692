//! Firmware versions: dotted decimal numbers compared numerically.

use std::cmp::Ordering;
use std::fmt;

use crate::Error;

/// A firmware version such as `2.0.1` (from `custom.hearth.version` in TUF
/// target metadata). Compared component by component as numbers, missing
/// components count as 0, so `2` == `2.0` < `2.0.1` < `10`.
#[derive(Clone, Debug, Eq)]
pub struct Version {
    parts: Vec<u64>,
    text: String,
}

impl Version {
    /// Parses `N(.N)*` with at most 8 components.
    ///
    /// # Errors
    /// [`Error::BadVersion`] for anything else.
    pub fn parse(s: &str) -> Result<Self, Error> {
        let bad = || Error::BadVersion(s.to_owned());
        if s.is_empty() {
            return Err(bad());
        }
        let parts = s
            .split('.')
            .map(|p| if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) { p.parse::<u64>().map_err(|_| bad()) } else { Err(bad()) })
            .collect::<Result<Vec<_>, _>>()?;
        if parts.len() > 8 {
            return Err(bad());
        }
        Ok(Version { parts, text: s.to_owned() })
    }

    fn normalized(&self) -> &[u64] {
        let end = self.parts.iter().rposition(|&p| p != 0).map_or(0, |i| i + 1);
        &self.parts[..end]
    }
}

impl PartialEq for Version {
    fn eq(&self, other: &Self) -> bool {
        self.normalized() == other.normalized()
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        self.normalized().cmp(other.normalized())
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl serde::Serialize for Version {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> serde::Deserialize<'de> for Version {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Version::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl std::str::FromStr for Version {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Version::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        Version::parse(s).unwrap()
    }

    #[test]
    fn numeric_order_not_lexical() {
        assert!(v("10") > v("9"));
        assert!(v("2.0.1") > v("2"));
        assert_eq!(v("2"), v("2.0.0"));
        assert!(v("1.10") > v("1.9"));
    }

    #[test]
    fn rejects_garbage() {
        for s in ["", "1..2", "v1", "1.-2", "1.2a", " 1"] {
            assert!(Version::parse(s).is_err(), "{s}");
        }
    }
}
