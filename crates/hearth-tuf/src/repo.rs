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
