//! Repository tools: build and sign the four roles, add targets with
//! Hearth's custom metadata, lay files out for consistent snapshots.
//!
//! Root and targets keys are meant to be offline and used with thresholds
//! (e.g. root 2-of-3); snapshot and timestamp keys are online. Key rotation
//! is a new root version whose envelope carries signatures from a threshold
//! of the old root keys and of the new ones ([`sign`] with both sets).

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Map, Value};

use crate::crypto::{PublicKey, SigningKey};
use crate::metadata::Root;
use crate::{canonical, time, Error};

/// TUF spec version written into new metadata.
pub const SPEC_VERSION: &str = "1.0.31";

/// Keys and threshold for one role.
#[derive(Clone, Debug)]
pub struct RoleSpec {
    /// Public keys allowed to sign.
    pub keys: Vec<PublicKey>,
    /// Signatures needed.
    pub threshold: u64,
}

/// Root `signed` object for the given top-level roles.
///
/// # Errors
/// [`Error::Usage`] if a role is missing or a threshold exceeds its keys.
pub fn root(version: u64, expires: i64, consistent_snapshot: bool, roles: &BTreeMap<String, RoleSpec>) -> Result<Value, Error> {
    let mut keys = Map::new();
    let mut role_map = Map::new();
    for name in crate::metadata::TOP_LEVEL {
        let spec = roles.get(name).ok_or_else(|| Error::Usage(format!("role {name} missing")))?;
        if spec.threshold < 1 || spec.threshold as usize > spec.keys.len() {
            return Err(Error::Usage(format!("{name}: threshold {} with {} keys", spec.threshold, spec.keys.len())));
        }
        let ids: Vec<String> = spec.keys.iter().map(PublicKey::key_id).collect();
        for k in &spec.keys {
            keys.insert(k.key_id(), k.to_value());
        }
        role_map.insert(name.to_owned(), json!({"keyids": ids, "threshold": spec.threshold}));
    }
    Ok(json!({
        "_type": "root", "spec_version": SPEC_VERSION, "version": version, "expires": time::format(expires),
        "consistent_snapshot": consistent_snapshot, "keys": keys, "roles": role_map,
    }))
}

/// A target entry: length, sha256 and sha512, and custom metadata.
pub fn target_entry(data: &[u8], custom: Option<Value>) -> Value {
    let mut v = json!({"length": data.len(), "hashes": hashes(data)});
    if let Some(c) = custom {
        v["custom"] = c;
    }
    v
}

/// Hearth's custom target metadata: firmware version and hardware model.
pub fn firmware_custom(version: &str, hardware_model: &str) -> Value {
    json!({"hearth": {"version": version, "hardware_model": hardware_model}})
}

fn hashes(data: &[u8]) -> Value {
    json!({
        "sha256": hex::encode(ring::digest::digest(&ring::digest::SHA256, data)),
        "sha512": hex::encode(ring::digest::digest(&ring::digest::SHA512, data)),
    })
}

/// Targets `signed` object.
pub fn targets(version: u64, expires: i64, targets: &BTreeMap<String, Value>, delegations: Option<Value>) -> Value {
    let mut v = json!({"_type": "targets", "spec_version": SPEC_VERSION, "version": version, "expires": time::format(expires), "targets": targets});
    if let Some(d) = delegations {
        v["delegations"] = d;
    }
    v
}

/// Snapshot `signed` object listing `(role file, version)` pairs.
pub fn snapshot(version: u64, expires: i64, meta: &[(&str, u64)]) -> Value {
    let m: Map<String, Value> = meta.iter().map(|(n, v)| ((*n).to_owned(), json!({"version": v}))).collect();
    json!({"_type": "snapshot", "spec_version": SPEC_VERSION, "version": version, "expires": time::format(expires), "meta": m})
}

/// Timestamp `signed` object pinning the exact snapshot bytes.
pub fn timestamp(version: u64, expires: i64, snapshot_version: u64, snapshot_bytes: &[u8]) -> Value {
    json!({
        "_type": "timestamp", "spec_version": SPEC_VERSION, "version": version, "expires": time::format(expires),
        "meta": {"snapshot.json": {"version": snapshot_version, "length": snapshot_bytes.len(), "hashes": hashes(snapshot_bytes)}},
    })
}

/// Signs `signed` with each key and returns the envelope as JSON bytes.
///
/// # Errors
/// Non-canonical content or a signing failure.
pub fn sign(signed: &Value, keys: &[&SigningKey]) -> Result<Vec<u8>, Error> {
    add_signatures(&serde_json::to_vec(&json!({"signed": signed, "signatures": []})).map_err(|e| Error::Usage(e.to_string()))?, keys)
}

/// Adds signatures to an existing envelope (offline threshold signing:
/// each key holder runs this in turn).
///
/// # Errors
/// Malformed envelope, or a signing failure.
pub fn add_signatures(envelope: &[u8], keys: &[&SigningKey]) -> Result<Vec<u8>, Error> {
    let mut v: Value = serde_json::from_slice(envelope).map_err(|e| Error::malformed("envelope", e.to_string()))?;
    let msg = canonical::encode(v.get("signed").ok_or_else(|| Error::malformed("envelope", "no signed"))?)?;
    let sigs = v.get_mut("signatures").and_then(Value::as_array_mut).ok_or_else(|| Error::malformed("envelope", "no signatures"))?;
    for k in keys {
        let keyid = k.public().key_id();
        sigs.retain(|s| s.get("keyid").and_then(Value::as_str) != Some(keyid.as_str()));
        sigs.push(json!({"keyid": keyid, "sig": hex::encode(k.sign(&msg)?)}));
    }
    serde_json::to_vec_pretty(&v).map_err(|e| Error::Usage(e.to_string()))
}

/// Reads the `version` of an envelope's signed part.
///
/// # Errors
/// Malformed envelope.
pub fn version_of(envelope: &[u8]) -> Result<u64, Error> {
    let v: Value = serde_json::from_slice(envelope).map_err(|e| Error::malformed("envelope", e.to_string()))?;
    v.pointer("/signed/version").and_then(Value::as_u64).ok_or_else(|| Error::malformed("envelope", "no version"))
}

/// Writes a target file where clients will look for it: at its path, and
/// under consistent snapshots also as `dir/<hash>.name` for each hash that
/// [`target_entry`] lists (a client may pick either).
///
/// # Errors
/// I/O failure.
pub fn write_target(targets_dir: &Path, path: &str, data: &[u8], consistent: bool) -> Result<(), Error> {
    let io = |what: &Path| {
        let what = what.display().to_string();
        move |source| Error::Io { what, source }
    };
    let plain = targets_dir.join(path);
    if let Some(parent) = plain.parent() {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    std::fs::write(&plain, data).map_err(io(&plain))?;
    if consistent {
        let name = plain.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        for digest in [&ring::digest::SHA256, &ring::digest::SHA512] {
            let hashed = plain.with_file_name(format!("{}.{name}", hex::encode(ring::digest::digest(digest, data))));
            std::fs::write(&hashed, data).map_err(io(&hashed))?;
        }
    }
    Ok(())
}

/// How long each role's metadata stays valid, in seconds.
#[derive(Clone, Copy, Debug)]
pub struct Lifetimes {
    /// Root (offline; renewed rarely).
    pub root: i64,
    /// Targets (offline).
    pub targets: i64,
    /// Snapshot (online).
    pub snapshot: i64,
    /// Timestamp (online; the cloud renews it well before this runs out).
    pub timestamp: i64,
}

impl Default for Lifetimes {
    fn default() -> Self {
        const DAY: i64 = 86_400;
        Lifetimes { root: 365 * DAY, targets: 90 * DAY, snapshot: 7 * DAY, timestamp: DAY }
    }
}

/// A repository on disk: `DIR/metadata/` (versioned `N.role.json` for
/// consistent snapshots plus the plain `role.json` of the latest) and
/// `DIR/targets/` (images under `dir/<hash>.name`). Static files: the cloud
/// serves the directory as it is.
#[derive(Clone, Debug)]
pub struct RepoDir {
    dir: std::path::PathBuf,
    /// Metadata lifetimes used when re-signing.
    pub lifetimes: Lifetimes,
}

impl RepoDir {
    /// Opens an existing repository.
    pub fn open(dir: impl Into<std::path::PathBuf>) -> Self {
        RepoDir { dir: dir.into(), lifetimes: Lifetimes::default() }
    }

    fn meta(&self) -> std::path::PathBuf {
        self.dir.join("metadata")
    }

    /// Path of the latest `role.json`.
    pub fn metadata_path(&self, role: &str) -> std::path::PathBuf {
        self.meta().join(format!("{role}.json"))
    }

    fn io(what: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
        move |source| Error::Io { what: what.display().to_string(), source }
    }

    fn read_signed(&self, role: &str) -> Result<Value, Error> {
        let path = self.metadata_path(role);
        let bytes = std::fs::read(&path).map_err(Self::io(&path))?;
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| Error::malformed(role, e.to_string()))?;
        v.get("signed").cloned().ok_or_else(|| Error::malformed(role, "no signed"))
    }

    fn write(&self, role: &str, version: u64, envelope: &[u8]) -> Result<(), Error> {
        let meta = self.meta();
        std::fs::create_dir_all(&meta).map_err(Self::io(&meta))?;
        // Timestamp is always fetched by its plain name (spec 5.4.1).
        if role != "timestamp" {
            crate::client::write_atomic(&meta.join(format!("{version}.{role}.json")), envelope)?;
        }
        crate::client::write_atomic(&self.metadata_path(role), envelope)
    }

    /// Creates a repository with consistent snapshots: root v1 signed by
    /// `root_signers`, empty targets v1, snapshot v1 and timestamp v1.
    ///
    /// # Errors
    /// Bad role specs (threshold > keys), missing signers, I/O.
    pub fn init(
        dir: impl Into<std::path::PathBuf>,
        roles: &BTreeMap<String, RoleSpec>,
        root_signers: &[&SigningKey],
        targets_signers: &[&SigningKey],
        snapshot_key: &SigningKey,
        timestamp_key: &SigningKey,
        now: i64,
    ) -> Result<Self, Error> {
        let repo = Self::open(dir);
        if repo.metadata_path("root").exists() {
            return Err(Error::Usage(format!("{} already holds a repository", repo.dir.display())));
        }
        let root_v = root(1, now + repo.lifetimes.root, true, roles)?;
        repo.write("root", 1, &sign(&root_v, root_signers)?)?;
        repo.write("targets", 1, &sign(&targets(1, now + repo.lifetimes.targets, &BTreeMap::new(), None), targets_signers)?)?;
        repo.publish(snapshot_key, timestamp_key, now)?;
        Ok(repo)
    }

    /// Adds (or replaces) a target image and writes targets N+1 signed by
    /// `targets_signers` (offline keys; more can be added with
    /// [`RepoDir::sign_role`] to reach a threshold). Call
    /// [`RepoDir::publish`] afterwards to make it visible.
    ///
    /// # Errors
    /// I/O or signing failure.
    pub fn add_target(&self, path: &str, image: &[u8], custom: Option<Value>, targets_signers: &[&SigningKey], now: i64) -> Result<u64, Error> {
        let current = self.read_signed("targets")?;
        let mut list: BTreeMap<String, Value> = current.get("targets").and_then(Value::as_object).map(|m| m.clone().into_iter().collect()).unwrap_or_default();
        list.insert(path.to_owned(), target_entry(image, custom));
        let version = current.get("version").and_then(Value::as_u64).unwrap_or(0) + 1;
        let t = targets(version, now + self.lifetimes.targets, &list, current.get("delegations").cloned());
        write_target(&self.dir.join("targets"), path, image, true)?;
        self.write("targets", version, &sign(&t, targets_signers)?)?;
        Ok(version)
    }

    /// Adds signatures to the latest `role` metadata (offline threshold
    /// signing by several key holders in turn).
    ///
    /// # Errors
    /// I/O or signing failure.
    pub fn sign_role(&self, role: &str, keys: &[&SigningKey]) -> Result<(), Error> {
        let path = self.metadata_path(role);
        let bytes = std::fs::read(&path).map_err(Self::io(&path))?;
        let signed = add_signatures(&bytes, keys)?;
        self.write(role, version_of(&signed)?, &signed)
    }

    /// Online step: snapshot N+1 listing the current targets version, and a
    /// timestamp N+1 pinning it.
    ///
    /// # Errors
    /// I/O or signing failure.
    pub fn publish(&self, snapshot_key: &SigningKey, timestamp_key: &SigningKey, now: i64) -> Result<(), Error> {
        let targets_version = self.read_signed("targets")?.get("version").and_then(Value::as_u64).unwrap_or(1);
        let snapshot_version = self.read_signed("snapshot").ok().and_then(|s| s.get("version").and_then(Value::as_u64)).unwrap_or(0) + 1;
        let snap = sign(&snapshot(snapshot_version, now + self.lifetimes.snapshot, &[("targets.json", targets_version)]), &[snapshot_key])?;
        self.write("snapshot", snapshot_version, &snap)?;
        self.renew_timestamp(timestamp_key, now)
    }

    /// Online step run by the cloud before the timestamp expires: timestamp
    /// N+1 for the current snapshot.
    ///
    /// # Errors
    /// I/O or signing failure.
    pub fn renew_timestamp(&self, timestamp_key: &SigningKey, now: i64) -> Result<(), Error> {
        let snap_path = self.metadata_path("snapshot");
        let snap = std::fs::read(&snap_path).map_err(Self::io(&snap_path))?;
        let snapshot_version = version_of(&snap)?;
        let ts_version = self.read_signed("timestamp").ok().and_then(|s| s.get("version").and_then(Value::as_u64)).unwrap_or(0) + 1;
        let ts = sign(&timestamp(ts_version, now + self.lifetimes.timestamp, snapshot_version, &snap), &[timestamp_key])?;
        self.write("timestamp", ts_version, &ts)
    }

    /// Key rotation for any top-level role, root included: root N+1 with
    /// `role` now held by `new` keys. It must carry signatures from a
    /// threshold of the old root keys and (for a root rotation) of the new
    /// ones (spec 5.3.3), so pass both sets in `root_signers`.
    ///
    /// # Errors
    /// Bad spec, I/O or signing failure.
    pub fn rotate(&self, role: &str, new: RoleSpec, root_signers: &[&SigningKey], now: i64) -> Result<u64, Error> {
        let current = Root::parse(&self.read_signed("root")?)?;
        let mut roles: BTreeMap<String, RoleSpec> = BTreeMap::new();
        for (name, rk) in &current.roles {
            let keys = rk.keyids.iter().filter_map(|id| current.keys.get(id).cloned()).collect();
            roles.insert(name.clone(), RoleSpec { keys, threshold: rk.threshold });
        }
        roles.insert(role.to_owned(), new);
        let version = current.common.version + 1;
        let v = self::root(version, now + self.lifetimes.root, current.consistent_snapshot, &roles)?;
        self.write("root", version, &sign(&v, root_signers)?)?;
        Ok(version)
    }
}
