//! Groups and scenes, kept by the controller (issue 5: "groups and scenes
//! on the controller side"). A group is a named list of devices that
//! `hearth on|off|toggle <group>` switches with one signed command per
//! device; a scene is a named list of wanted on/off states applied the
//! same way. Nothing here is sent to the cloud or the devices: each device
//! still decides, per command, by its own access list and interlocks.
//!
//! Stored in `groups.json` in the controller directory, mode 0600, written
//! atomically (temp file, fsync, rename, directory fsync). Devices are kept
//! by id (stable) with the name they had when added (for display).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use hearth_proto::ids::DeviceId;
use serde::{Deserialize, Serialize};

/// The file in the controller directory.
pub const FILE: &str = "groups.json";
/// Most groups (and, separately, scenes) one controller keeps.
pub const MAX_ENTRIES: usize = 64;
/// Most devices in one group or scene.
pub const MAX_MEMBERS: usize = 64;
/// Longest group or scene name, in bytes.
pub const MAX_NAME: usize = 64;
/// Largest `groups.json` read; a bigger file is refused, not loaded.
const MAX_FILE: u64 = 1 << 20;

/// A device in a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    /// The device id.
    pub id: DeviceId,
    /// Its name when it was added.
    pub name: String,
}

/// One device's wanted state in a scene.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SceneStep {
    /// The device id.
    pub id: DeviceId,
    /// Its name when the scene was saved.
    pub name: String,
    /// On or off.
    pub on: bool,
}

/// Everything in `groups.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Groups {
    /// Groups by name.
    #[serde(default)]
    pub groups: BTreeMap<String, Vec<Member>>,
    /// Scenes by name.
    #[serde(default)]
    pub scenes: BTreeMap<String, Vec<SceneStep>>,
}

/// Checks a group or scene name: 1–64 bytes of letters, digits, `-`, `_`, `.`.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !ok {
        bail!("{name:?}: a name is 1–{MAX_NAME} letters, digits, '-', '_' or '.'");
    }
    Ok(())
}

/// Parses a scene step `DEVICE=on|off`.
pub fn parse_step(text: &str) -> Result<(&str, bool)> {
    let (device, state) = text.rsplit_once('=').with_context(|| format!("{text:?}: expected DEVICE=on or DEVICE=off"))?;
    let on = match state {
        "on" => true,
        "off" => false,
        other => bail!("{text:?}: {other:?} is not on or off"),
    };
    if device.is_empty() {
        bail!("{text:?}: no device before '='");
    }
    Ok((device, on))
}

impl Groups {
    /// Reads `groups.json` from `dir` (empty when there is none).
    pub fn load(dir: &Path) -> Result<Self> {
        use std::io::Read;
        let path = dir.join(FILE);
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let mut bytes = Vec::new();
        file.take(MAX_FILE + 1).read_to_end(&mut bytes).with_context(|| format!("reading {}", path.display()))?;
        if bytes.len() as u64 > MAX_FILE {
            bail!("{} is larger than {MAX_FILE} bytes; fix or remove it", path.display());
        }
        let groups: Self = serde_json::from_slice(&bytes).with_context(|| format!("{} is corrupt; fix or remove it", path.display()))?;
        groups.validate().with_context(|| format!("{} is invalid; fix or remove it", path.display()))?;
        Ok(groups)
    }

    /// Writes `groups.json` atomically with mode 0600.
    pub fn save(&self, dir: &Path) -> Result<()> {
        self.validate()?;
        let bytes = serde_json::to_vec_pretty(self)?;
        Ok(hearth_pki::write_file(&dir.join(FILE), &bytes, true)?)
    }

    fn validate(&self) -> Result<()> {
        if self.groups.len() > MAX_ENTRIES || self.scenes.len() > MAX_ENTRIES {
            bail!("at most {MAX_ENTRIES} groups and {MAX_ENTRIES} scenes");
        }
        for (name, members) in &self.groups {
            check_name(name)?;
            if members.len() > MAX_MEMBERS {
                bail!("group {name}: at most {MAX_MEMBERS} devices");
            }
        }
        for (name, steps) in &self.scenes {
            check_name(name)?;
            if steps.len() > MAX_MEMBERS {
                bail!("scene {name}: at most {MAX_MEMBERS} devices");
            }
        }
        Ok(())
    }

    /// Creates an empty group.
    pub fn create(&mut self, name: &str) -> Result<()> {
        check_name(name)?;
        if self.groups.contains_key(name) {
            bail!("group {name} exists already");
        }
        if self.groups.len() >= MAX_ENTRIES {
            bail!("at most {MAX_ENTRIES} groups");
        }
        self.groups.insert(name.to_owned(), Vec::new());
        Ok(())
    }

    /// Adds devices to a group (a device already in it stays once).
    pub fn add(&mut self, group: &str, devices: impl IntoIterator<Item = Member>) -> Result<()> {
        let members = self.groups.get_mut(group).with_context(|| format!("no group {group}; create it with `hearth group create {group}`"))?;
        for m in devices {
            if !members.iter().any(|x| x.id == m.id) {
                if members.len() >= MAX_MEMBERS {
                    bail!("group {group}: at most {MAX_MEMBERS} devices");
                }
                members.push(m);
            }
        }
        Ok(())
    }

    /// Removes devices from a group, or the whole group when `devices` is empty.
    /// `devices` are names or ids as the user typed them.
    pub fn remove(&mut self, group: &str, devices: &[String]) -> Result<()> {
        if devices.is_empty() {
            return match self.groups.remove(group) {
                Some(_) => Ok(()),
                None => bail!("no group {group}"),
            };
        }
        let members = self.groups.get_mut(group).with_context(|| format!("no group {group}"))?;
        for d in devices {
            let before = members.len();
            members.retain(|m| m.name != *d && m.id.as_str() != d);
            if members.len() == before {
                bail!("{d:?} is not in group {group}");
            }
        }
        Ok(())
    }

    /// The members of a group, if `name` is one.
    pub fn group(&self, name: &str) -> Option<&[Member]> {
        self.groups.get(name).map(Vec::as_slice)
    }

    /// Saves a scene, replacing one of the same name.
    pub fn set_scene(&mut self, name: &str, steps: Vec<SceneStep>) -> Result<()> {
        check_name(name)?;
        if steps.is_empty() {
            bail!("a scene needs at least one DEVICE=on|off");
        }
        if steps.len() > MAX_MEMBERS {
            bail!("scene {name}: at most {MAX_MEMBERS} devices");
        }
        if !self.scenes.contains_key(name) && self.scenes.len() >= MAX_ENTRIES {
            bail!("at most {MAX_ENTRIES} scenes");
        }
        self.scenes.insert(name.to_owned(), steps);
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn member(byte: u8, name: &str) -> Member {
        Member { id: DeviceId::from_bytes([byte; DeviceId::BYTES]), name: name.into() }
    }

    #[test]
    fn groups_are_validated_bounded_and_saved_privately() {
        let dir = tempfile::tempdir().unwrap();
        let mut g = Groups::load(dir.path()).unwrap();
        assert_eq!(g, Groups::default());
        g.create("downstairs").unwrap();
        assert!(g.create("downstairs").is_err());
        for bad in ["", "a b", "../x", &"x".repeat(65)] {
            assert!(g.create(bad).is_err(), "{bad:?}");
        }
        g.add("downstairs", [member(1, "lamp"), member(2, "kettle"), member(1, "lamp")]).unwrap();
        assert_eq!(g.group("downstairs").unwrap().len(), 2, "a device once");
        assert!(g.add("upstairs", [member(3, "fan")]).is_err());
        g.set_scene("evening", vec![SceneStep { id: member(1, "").id, name: "lamp".into(), on: true }]).unwrap();
        assert!(g.set_scene("empty", Vec::new()).is_err());
        g.save(dir.path()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(dir.path().join(FILE)).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(!dir.path().join("groups.tmp").exists(), "no temp file left");
        let again = Groups::load(dir.path()).unwrap();
        assert_eq!(again, g);

        let mut full = Groups::default();
        full.create("big").unwrap();
        assert!(full.add("big", (0..=MAX_MEMBERS as u8).map(|i| member(i, "d"))).is_err());
        for i in 0..MAX_ENTRIES {
            full.create(&format!("g{i}")).unwrap_or(());
        }
        assert!(full.create("one-more").is_err());

        g.remove("downstairs", &["lamp".into()]).unwrap();
        assert_eq!(g.group("downstairs").unwrap(), &[member(2, "kettle")]);
        assert!(g.remove("downstairs", &["lamp".into()]).is_err());
        g.remove("downstairs", &[]).unwrap();
        assert!(g.group("downstairs").is_none());
    }

    #[test]
    fn a_corrupt_or_hostile_file_is_refused_with_its_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), br#"{"groups": {"../etc": []}}"#).unwrap();
        let e = format!("{:#}", Groups::load(dir.path()).unwrap_err());
        assert!(e.contains("groups.json") && e.contains("invalid"), "{e}");
        std::fs::write(dir.path().join(FILE), br#"{"groups": {}, "extra": 1}"#).unwrap();
        assert!(format!("{:#}", Groups::load(dir.path()).unwrap_err()).contains("corrupt"));
        std::fs::write(dir.path().join(FILE), vec![b' '; (MAX_FILE + 2) as usize]).unwrap();
        assert!(format!("{:#}", Groups::load(dir.path()).unwrap_err()).contains("larger"));
    }

    #[test]
    fn scene_steps_parse() {
        assert_eq!(parse_step("lamp=on").unwrap(), ("lamp", true));
        assert_eq!(parse_step("a=b=off").unwrap(), ("a=b", false));
        for bad in ["lamp", "lamp=dim", "=on", "lamp=ON"] {
            assert!(parse_step(bad).is_err(), "{bad}");
        }
    }
}
