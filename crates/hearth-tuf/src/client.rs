//! The TUF client workflow (spec 5, "Detailed client workflow").
//!
//! [`TrustedSet`] holds the metadata trusted so far and performs every
//! verification step; it does no I/O. [`Updater`] drives it: it reads and
//! writes local copies through a [`MetadataStore`] and downloads through a
//! [`Fetcher`], always with a length limit. The time of the update is an
//! argument (spec 5.1), so tests are deterministic.
//!
//! Loading order is root → timestamp → snapshot → targets → delegated
//! targets. As in python-tuf, locally stored timestamp and snapshot are
//! loaded first as *intermediate* metadata even when expired: they then
//! serve as the rollback floor for what the repository sends.

use std::collections::BTreeMap;

use crate::metadata::{Envelope, Root, Snapshot, TargetFile, Targets, Timestamp};
use crate::{Error, FetchError};

/// Downloads bytes, refusing more than `max_len` (spec 5.3.2, 5.4.1, …:
/// "download up to some number of bytes"). Implementations must stop
/// reading once the limit is passed, so endless data cannot exhaust memory.
pub trait Fetcher {
    /// Fetches `url`.
    ///
    /// # Errors
    /// [`FetchError::NotFound`] for 403/404, [`FetchError::TooLong`] past the
    /// limit, others for transport failures.
    fn fetch(&mut self, url: &str, max_len: u64) -> Result<Vec<u8>, FetchError>;

    /// Streams `url` into `out` under the same limit (for images too large
    /// to hold in memory). The default buffers through [`Fetcher::fetch`].
    ///
    /// # Errors
    /// As [`Fetcher::fetch`], plus write errors of `out` as `Transport`.
    fn fetch_to(&mut self, url: &str, max_len: u64, out: &mut dyn std::io::Write) -> Result<u64, FetchError> {
        let data = self.fetch(url, max_len)?;
        out.write_all(&data).map_err(|e| FetchError::Transport(e.to_string()))?;
        Ok(data.len() as u64)
    }
}

/// Local metadata storage; names are non-versioned (`root.json`,
/// `timestamp.json`, `<quoted role>.json`), contents stored byte for byte.
pub trait MetadataStore {
    /// Reads a stored file, `None` if absent or unreadable.
    fn load(&self, name: &str) -> Option<Vec<u8>>;
    /// Replaces a stored file atomically.
    ///
    /// # Errors
    /// [`Error::Io`] on failure.
    fn store(&mut self, name: &str, data: &[u8]) -> Result<(), Error>;
    /// Deletes a stored file (absent is fine).
    ///
    /// # Errors
    /// [`Error::Io`] on failure.
    fn remove(&mut self, name: &str) -> Result<(), Error>;
}

/// Length limits and loop bounds (python-tuf's defaults).
#[derive(Clone, Debug)]
pub struct Limits {
    /// Max bytes of one root file.
    pub root_max: u64,
    /// Max bytes of timestamp.json.
    pub timestamp_max: u64,
    /// Max bytes of snapshot.json when timestamp gives no length.
    pub snapshot_max: u64,
    /// Max bytes of targets metadata when snapshot gives no length.
    pub targets_max: u64,
    /// Max root versions fetched in one refresh (spec 5.3.2 "Y").
    pub max_root_rotations: u64,
    /// Max delegated roles visited in one target search (spec 5.6.7).
    pub max_delegations: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { root_max: 512_000, timestamp_max: 16_384, snapshot_max: 2_000_000, targets_max: 5_000_000, max_root_rotations: 256, max_delegations: 32 }
    }
}

/// Metadata trusted so far in one update cycle, and the checks that admit more.
#[derive(Debug)]
pub struct TrustedSet {
    now: i64,
    root: Root,
    timestamp: Option<Timestamp>,
    snapshot: Option<Snapshot>,
    targets: BTreeMap<String, Targets>,
}

impl TrustedSet {
    /// Spec 5.2: load the trusted root. It is trusted by fiat (it shipped
    /// with the device), but must still be signed by its own threshold so
    /// that a corrupted file is noticed. Expiry is not checked yet (5.3.9).
    ///
    /// # Errors
    /// Malformed or insufficiently self-signed root.
    pub fn new(root_bytes: &[u8], now: i64) -> Result<Self, Error> {
        let env = Envelope::parse("root", root_bytes)?;
        let root = Root::parse(&env.signed)?;
        root.verify_role("root", &env)?;
        Ok(TrustedSet { now, root, timestamp: None, snapshot: None, targets: BTreeMap::new() })
    }

    /// The trusted root.
    pub fn root(&self) -> &Root {
        &self.root
    }

    /// The trusted timestamp, if loaded.
    pub fn timestamp(&self) -> Option<&Timestamp> {
        self.timestamp.as_ref()
    }

    /// The trusted snapshot, if loaded.
    pub fn snapshot(&self) -> Option<&Snapshot> {
        self.snapshot.as_ref()
    }

    /// A trusted targets role, if loaded.
    pub fn targets(&self, role: &str) -> Option<&Targets> {
        self.targets.get(role)
    }

    /// Spec 5.3.3–5.3.6: accept root version N+1.
    ///
    /// # Errors
    /// Signature threshold of old or new root not met, or version ≠ N+1.
    pub fn update_root(&mut self, data: &[u8]) -> Result<(), Error> {
        if self.timestamp.is_some() {
            return Err(Error::Usage("root cannot be updated after timestamp".into()));
        }
        let env = Envelope::parse("root", data)?;
        let new = Root::parse(&env.signed)?;
        // 5.3.3: signed by a threshold of keys from the trusted root (N) …
        self.root.verify_role("root", &env)?;
        // 5.3.4: rollback: the version must be exactly N+1.
        let want = self.root.common.version + 1;
        if new.common.version != want {
            return Err(Error::BadVersion { role: "root".into(), reason: format!("got {}, expected {want}", new.common.version) });
        }
        // 5.3.3 (cont.): … and by a threshold of keys from the new root (N+1).
        new.verify_role("root", &env)?;
        // 5.3.5: the expiry of an intermediate root does not matter yet.
        // 5.3.6: the new root becomes the trusted root.
        self.root = new;
        Ok(())
    }

    /// Spec 5.3.9: the final root must not be expired.
    ///
    /// # Errors
    /// [`Error::Expired`].
    pub fn check_final_root(&self) -> Result<(), Error> {
        if self.root.common.is_expired(self.now) {
            return Err(Error::Expired { role: "root".into(), expires: self.root.common.expires_str.clone() });
        }
        Ok(())
    }

    /// Spec 5.4.2–5.4.4: accept a timestamp. An expired one is kept as
    /// intermediate (it still bounds rollbacks) and the error returned.
    ///
    /// # Errors
    /// Bad signatures, rollback, equal version (discarded), or expiry.
    pub fn update_timestamp(&mut self, data: &[u8]) -> Result<(), Error> {
        if self.snapshot.is_some() {
            return Err(Error::Usage("timestamp cannot be updated after snapshot".into()));
        }
        self.check_final_root()?;
        let env = Envelope::parse("timestamp", data)?;
        let new = Timestamp::parse(&env.signed)?;
        // 5.4.2: arbitrary software attack: threshold of timestamp keys.
        self.root.verify_role("timestamp", &env)?;
        if let Some(old) = &self.timestamp {
            // 5.4.3.1: rollback: version must not decrease …
            if new.common.version < old.common.version {
                return Err(Error::BadVersion { role: "timestamp".into(), reason: format!("{} < trusted {}", new.common.version, old.common.version) });
            }
            // … and an equal version means nothing new: keep the trusted copy
            // (a changed file under an unchanged version is not accepted).
            if new.common.version == old.common.version {
                return Err(Error::EqualTimestampVersion(new.common.version));
            }
            // 5.4.3.2: the snapshot version it lists must not decrease.
            if new.snapshot_meta.version < old.snapshot_meta.version {
                return Err(Error::BadVersion {
                    role: "timestamp".into(),
                    reason: format!("snapshot version {} < trusted {}", new.snapshot_meta.version, old.snapshot_meta.version),
                });
            }
        }
        self.timestamp = Some(new);
        // 5.4.4: freeze attack: the (now intermediate) timestamp must not be expired.
        self.check_final_timestamp()
    }

    fn check_final_timestamp(&self) -> Result<(), Error> {
        let ts = self.timestamp.as_ref().ok_or_else(|| Error::Usage("no timestamp loaded".into()))?;
        if ts.common.is_expired(self.now) {
            return Err(Error::Expired { role: "timestamp".into(), expires: ts.common.expires_str.clone() });
        }
        Ok(())
    }

    /// Spec 5.5.2–5.5.6: accept a snapshot. `trusted` skips the hash check
    /// for a local copy verified in an earlier cycle (timestamp may have
    /// moved on since). Expired or out-of-date snapshots are kept as
    /// intermediate and the error returned.
    ///
    /// # Errors
    /// Hash/length mismatch, bad signatures, rollback, version mismatch, expiry.
    pub fn update_snapshot(&mut self, data: &[u8], trusted: bool) -> Result<(), Error> {
        if !self.targets.is_empty() {
            return Err(Error::Usage("snapshot cannot be updated after targets".into()));
        }
        self.check_final_timestamp()?;
        let meta = self.timestamp.as_ref().map(|t| t.snapshot_meta.clone()).ok_or_else(|| Error::Usage("no timestamp loaded".into()))?;
        // 5.5.2: length and hashes as listed in timestamp.
        if !trusted {
            meta.verify("snapshot.json", data)?;
        }
        let env = Envelope::parse("snapshot", data)?;
        let new = Snapshot::parse(&env.signed)?;
        // 5.5.3: threshold of snapshot keys.
        self.root.verify_role("snapshot", &env)?;
        // 5.5.5: rollback: every targets file in the trusted snapshot is
        // still listed, with a version not lower.
        if let Some(old) = &self.snapshot {
            for (name, old_meta) in &old.meta {
                let Some(new_meta) = new.meta.get(name) else {
                    return Err(Error::BadVersion { role: "snapshot".into(), reason: format!("{name} removed from snapshot") });
                };
                if new_meta.version < old_meta.version {
                    return Err(Error::BadVersion { role: "snapshot".into(), reason: format!("{name} version {} < trusted {}", new_meta.version, old_meta.version) });
                }
            }
        }
        self.snapshot = Some(new);
        self.check_final_snapshot()
    }

    fn check_final_snapshot(&self) -> Result<(), Error> {
        let snap = self.snapshot.as_ref().ok_or_else(|| Error::Usage("no snapshot loaded".into()))?;
        // 5.5.6: freeze attack.
        if snap.common.is_expired(self.now) {
            return Err(Error::Expired { role: "snapshot".into(), expires: snap.common.expires_str.clone() });
        }
        // 5.5.4: the version must match the one timestamp lists (mix-and-match).
        let want = self.timestamp.as_ref().map_or(0, |t| t.snapshot_meta.version);
        if snap.common.version != want {
            return Err(Error::BadVersion { role: "snapshot".into(), reason: format!("{} but timestamp lists {want}", snap.common.version) });
        }
        Ok(())
    }

    /// Spec 5.6.2–5.6.5 (and the same for delegated roles, 5.6.7.2):
    /// accept targets metadata for `role`, delegated by `delegator`
    /// (`"root"` for top-level targets).
    ///
    /// # Errors
    /// Missing from snapshot, hash/length mismatch, bad signatures, version
    /// mismatch, expiry.
    pub fn update_targets(&mut self, role: &str, delegator: &str, data: &[u8]) -> Result<(), Error> {
        self.check_final_snapshot()?;
        let snap = self.snapshot.as_ref().ok_or_else(|| Error::Usage("no snapshot loaded".into()))?;
        let meta = snap.meta.get(&format!("{role}.json")).ok_or_else(|| Error::Missing(format!("snapshot does not list {role}.json")))?;
        // 5.6.2: length and hashes as listed in snapshot.
        meta.verify(&format!("{role}.json"), data)?;
        let env = Envelope::parse(role, data)?;
        let new = Targets::parse(role, &env.signed)?;
        // 5.6.3: threshold of the delegator's keys for this role.
        if delegator == "root" {
            self.root.verify_role(role, &env)?;
        } else {
            let parent = self.targets.get(delegator).ok_or_else(|| Error::Usage(format!("delegator {delegator} not loaded")))?;
            let delegations = parent.delegations.as_ref().ok_or_else(|| Error::Missing(format!("{delegator} has no delegations")))?;
            let keys = delegations.role_keys(role).ok_or_else(|| Error::Missing(format!("{delegator} does not delegate to {role}")))?;
            crate::metadata::verify_threshold(role, &delegations.keys, keys, &env)?;
        }
        // 5.6.4: version must match snapshot (mix-and-match, rollback).
        if new.common.version != meta.version {
            return Err(Error::BadVersion { role: role.into(), reason: format!("{} but snapshot lists {}", new.common.version, meta.version) });
        }
        // 5.6.5: freeze attack.
        if new.common.is_expired(self.now) {
            return Err(Error::Expired { role: role.into(), expires: new.common.expires_str.clone() });
        }
        self.targets.insert(role.to_owned(), new);
        Ok(())
    }
}

/// Percent-encodes a role name or target path for use as one file name
/// (every byte but `A-Za-z0-9_.-~`), as python-tuf's `quote(name, "")`.
pub fn quote(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"_.-~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Percent-encodes a target path for the URL of spec 5.7.3 ("download the
/// target ... from the target URL"), leaving `/` as the separator.
///
/// A target path is any string the targets role signed (spec 4.5
/// "TARGETPATH"), so it may hold spaces, non-ASCII or control characters
/// that are not allowed in an HTTP request line (RFC 9112 3.2, RFC 3986
/// 3.3): sent raw they break the request (a space ends the request-target)
/// or, with CR/LF, would add header lines. Every byte outside RFC 3986's
/// unreserved, sub-delims, `:`, `@`, `/` and `?` is encoded as `%XX`; an
/// existing `%XX` escape and `?` are kept as they are, which is the URL the
/// reference client (python-tuf over urllib3) requests for the same path.
pub fn encode_target_path(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(bytes.len());
    for (i, &b) in bytes.iter().enumerate() {
        let keep = b.is_ascii_alphanumeric()
            || b"-._~!$&'()*+,;=:@/?".contains(&b)
            || (b == b'%' && bytes.get(i + 1..i + 3).is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)));
        if keep {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Drives [`TrustedSet`] with local storage and a fetcher.
pub struct Updater<F, S> {
    fetcher: F,
    store: S,
    metadata_url: String,
    limits: Limits,
    trusted: TrustedSet,
    refreshed: bool,
}

impl<F: Fetcher, S: MetadataStore> Updater<F, S> {
    /// Spec 5.1–5.2: starts an update cycle at `now` from the stored
    /// `root.json`.
    ///
    /// # Errors
    /// Missing or invalid local root.
    pub fn new(fetcher: F, store: S, metadata_url: &str, now: i64, limits: Limits) -> Result<Self, Error> {
        let root = store.load("root.json").ok_or_else(|| Error::Missing("no trusted root.json in local metadata".into()))?;
        let trusted = TrustedSet::new(&root, now)?;
        let metadata_url = if metadata_url.ends_with('/') { metadata_url.to_owned() } else { format!("{metadata_url}/") };
        Ok(Updater { fetcher, store, metadata_url, limits, trusted, refreshed: false })
    }

    /// The trusted metadata.
    pub fn trusted(&self) -> &TrustedSet {
        &self.trusted
    }

    /// Gives back the store (tests inspect it).
    pub fn into_store(self) -> S {
        self.store
    }

    fn download(&mut self, file: &str, max_len: u64) -> Result<Vec<u8>, Error> {
        let url = format!("{}{file}", self.metadata_url);
        self.fetcher.fetch(&url, max_len).map_err(|source| Error::Fetch { url, source })
    }

    /// Spec 5.3–5.6: updates root, timestamp, snapshot and top-level targets.
    ///
    /// # Errors
    /// Any failed check; the caller must not use targets after an error.
    pub fn refresh(&mut self) -> Result<(), Error> {
        self.load_root()?;
        self.load_timestamp()?;
        self.load_snapshot()?;
        self.load_targets("targets", "root")?;
        self.refreshed = true;
        Ok(())
    }

    fn load_root(&mut self) -> Result<(), Error> {
        // 5.3.1–5.3.8: fetch N+1 until the repository has none (or the bound).
        for _ in 0..self.limits.max_root_rotations {
            let next = self.trusted.root.common.version + 1;
            // 5.3.2: download version N+1, up to a byte limit; absent means done.
            let data = match self.download(&format!("{next}.root.json"), self.limits.root_max) {
                Ok(d) => d,
                Err(Error::Fetch { source: FetchError::NotFound(_), .. }) => break,
                Err(e) => return Err(e),
            };
            self.trusted.update_root(&data)?;
            // 5.3.7: persist the new root as soon as it is trusted.
            self.store.store("root.json", &data)?;
        }
        // 5.3.9: freeze attack on the final root.
        self.trusted.check_final_root()?;
        // 5.3.10: timestamp or snapshot keys rotated. Off-spec in form, not
        // in effect: the stored copies are not deleted but they are only
        // ever used after verifying them against the new root, where a copy
        // signed by rotated-out keys fails and is ignored, so the repository
        // can recover from a fast-forward attack. Keeping the files (as
        // python-tuf does) leaves the last good state on disk when the
        // update fails; the conformance suite checks that.
        // 5.3.11: consistent_snapshot is read from the trusted root where needed.
        Ok(())
    }

    fn load_timestamp(&mut self) -> Result<(), Error> {
        // The stored timestamp, if still verifiable, is the rollback floor;
        // failing to load it is not an error (it may be absent or signed by
        // rotated keys).
        if let Some(local) = self.store.load("timestamp.json") {
            let _ignored = self.trusted.update_timestamp(&local);
        }
        // 5.4.1: download timestamp.json (never versioned), up to a limit.
        let data = self.download("timestamp.json", self.limits.timestamp_max)?;
        match self.trusted.update_timestamp(&data) {
            Ok(()) => {}
            // 5.4.3.1: same version: keep the trusted copy, nothing new.
            Err(Error::EqualTimestampVersion(_)) => return self.trusted.check_final_timestamp(),
            Err(e) => return Err(e),
        }
        // 5.4.5: persist.
        self.store.store("timestamp.json", &data)
    }

    fn load_snapshot(&mut self) -> Result<(), Error> {
        // A stored snapshot that still matches timestamp saves a download.
        if let Some(local) = self.store.load("snapshot.json") {
            if self.trusted.update_snapshot(&local, true).is_ok() {
                return Ok(());
            }
        }
        let meta = self.trusted.timestamp.as_ref().map(|t| t.snapshot_meta.clone()).ok_or_else(|| Error::Usage("no timestamp".into()))?;
        let max = meta.length.unwrap_or(self.limits.snapshot_max);
        // 5.5.1: consistent snapshots name the file by the version timestamp lists.
        let name = if self.trusted.root.consistent_snapshot { format!("{}.snapshot.json", meta.version) } else { "snapshot.json".to_owned() };
        let data = self.download(&name, max)?;
        self.trusted.update_snapshot(&data, false)?;
        // 5.5.7: persist.
        self.store.store("snapshot.json", &data)
    }

    fn load_targets(&mut self, role: &str, delegator: &str) -> Result<(), Error> {
        if self.trusted.targets.contains_key(role) {
            return Ok(());
        }
        let file = format!("{}.json", quote(role));
        if let Some(local) = self.store.load(&file) {
            if self.trusted.update_targets(role, delegator, &local).is_ok() {
                return Ok(());
            }
        }
        let snap = self.trusted.snapshot.as_ref().ok_or_else(|| Error::Usage("no snapshot".into()))?;
        let meta = snap.meta.get(&format!("{role}.json")).ok_or_else(|| Error::Missing(format!("role {role} is delegated but not in snapshot")))?;
        let max = meta.length.unwrap_or(self.limits.targets_max);
        // 5.6.1: consistent snapshots name the file by the version snapshot lists.
        let name = if self.trusted.root.consistent_snapshot { format!("{}.{}", meta.version, file) } else { file.clone() };
        let data = self.download(&name, max)?;
        self.trusted.update_targets(role, delegator, &data)?;
        // 5.6.6: persist.
        self.store.store(&file, &data)
    }

    /// Spec 5.6.7: finds the target by a preorder depth-first search of
    /// delegations, loading delegated roles on the way. `Ok(None)` means no
    /// trusted role lists the target.
    ///
    /// # Errors
    /// Refresh failures or a delegated role failing verification.
    pub fn target_info(&mut self, path: &str) -> Result<Option<TargetFile>, Error> {
        if !self.refreshed {
            self.refresh()?;
        }
        let mut to_visit: Vec<(String, String)> = vec![("targets".into(), "root".into())];
        let mut visited: Vec<String> = Vec::new();
        while visited.len() <= self.limits.max_delegations {
            let Some((role, parent)) = to_visit.pop() else { break };
            // 5.6.7.1: skip roles already visited, so delegation cycles end.
            if visited.contains(&role) {
                continue;
            }
            self.load_targets(&role, &parent)?;
            let targets = self.trusted.targets.get(&role).ok_or_else(|| Error::Missing(format!("{role} not loaded")))?;
            // 5.6.7.1 (cont.): if this role lists the target, it is the answer.
            if let Some(t) = targets.targets.get(path) {
                return Ok(Some(t.clone()));
            }
            visited.push(role.clone());
            // 5.6.7.2: otherwise descend into roles delegated this path, in
            // listed order; a terminating match discards the rest of the
            // search (5.6.7.2, "terminating delegation").
            if let Some(d) = &targets.delegations {
                let mut children = Vec::new();
                for (name, terminating) in d.roles_for(path) {
                    children.push((name, role.clone()));
                    if terminating {
                        to_visit.clear();
                        break;
                    }
                }
                children.reverse();
                to_visit.extend(children);
            }
        }
        Ok(None)
    }

    /// Spec 5.7.2: downloads a target and checks length and hashes.
    /// With consistent snapshots the file is requested as
    /// `dir/<hash>.name`. The download stops at the trusted length.
    ///
    /// # Errors
    /// Fetch failure or length/hash mismatch.
    pub fn download_target(&mut self, info: &TargetFile, target_base_url: &str) -> Result<Vec<u8>, Error> {
        self.download_target_to(info, target_base_url, Vec::with_capacity(usize::try_from(info.length.min(1 << 20)).unwrap_or(0)))
    }

    /// Like [`Updater::download_target`] but streams into `out`, hashing on
    /// the way (spec 5.7.2); `out` holds untrusted bytes unless this
    /// returns `Ok`. Memory use does not grow with the image.
    ///
    /// # Errors
    /// Fetch failure, more bytes than trusted, or length/hash mismatch.
    pub fn download_target_to<W: std::io::Write>(&mut self, info: &TargetFile, target_base_url: &str, out: W) -> Result<W, Error> {
        let url = self.target_url(info, target_base_url);
        let mut verifier = crate::metadata::VerifyingWriter::new(info, out)?;
        self.fetcher.fetch_to(&url, info.length, &mut verifier).map_err(|source| Error::Fetch { url, source })?;
        verifier.finish()
    }

    fn target_url(&self, info: &TargetFile, target_base_url: &str) -> String {
        let base = if target_base_url.ends_with('/') { target_base_url.to_owned() } else { format!("{target_base_url}/") };
        let rel = if self.trusted.root.consistent_snapshot {
            let digest = info.hashes.get(&info.first_hash).map(hex::encode).unwrap_or_default();
            match info.path.rsplit_once('/') {
                Some((dir, file)) => format!("{dir}/{digest}.{file}"),
                None => format!("{digest}.{}", info.path),
            }
        } else {
            info.path.clone()
        };
        format!("{base}{}", encode_target_path(&rel))
    }
}

/// A [`MetadataStore`] on a directory; writes go through a temporary file
/// and a rename so a crash leaves either the old or the new file.
#[derive(Debug, Clone)]
pub struct DirStore {
    dir: std::path::PathBuf,
}

impl DirStore {
    /// Uses `dir` (which must exist).
    pub fn new(dir: impl Into<std::path::PathBuf>) -> Self {
        DirStore { dir: dir.into() }
    }
}

impl MetadataStore for DirStore {
    fn load(&self, name: &str) -> Option<Vec<u8>> {
        std::fs::read(self.dir.join(name)).ok()
    }

    fn store(&mut self, name: &str, data: &[u8]) -> Result<(), Error> {
        write_atomic(&self.dir.join(name), data)
    }

    fn remove(&mut self, name: &str) -> Result<(), Error> {
        match std::fs::remove_file(self.dir.join(name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::Io { what: name.into(), source: e }),
            _ => Ok(()),
        }
    }
}

/// Writes `data` to `path` via a temporary sibling and rename.
///
/// # Errors
/// [`Error::Io`].
pub fn write_atomic(path: &std::path::Path, data: &[u8]) -> Result<(), Error> {
    use std::io::Write as _;
    let io = |source| Error::Io { what: path.display().to_string(), source };
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(data).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// An in-memory [`MetadataStore`] for tests and simulations.
#[derive(Debug, Default, Clone)]
pub struct MemStore {
    /// Stored files by name.
    pub files: BTreeMap<String, Vec<u8>>,
}

impl MetadataStore for MemStore {
    fn load(&self, name: &str) -> Option<Vec<u8>> {
        self.files.get(name).cloned()
    }

    fn store(&mut self, name: &str, data: &[u8]) -> Result<(), Error> {
        self.files.insert(name.to_owned(), data.to_vec());
        Ok(())
    }

    fn remove(&mut self, name: &str) -> Result<(), Error> {
        self.files.remove(name);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_paths_are_encoded_for_the_request_line() {
        assert_eq!(encode_target_path("dir/a b.bin"), "dir/a%20b.bin");
        assert_eq!(encode_target_path("x\r\nHost: evil"), "x%0D%0AHost:%20evil");
        assert_eq!(encode_target_path("\u{e4}#"), "%C3%A4%23");
        assert_eq!(encode_target_path("100%.bin"), "100%25.bin");
        assert_eq!(encode_target_path("%41?q=1&r"), "%41?q=1&r");
        assert_eq!(encode_target_path("plain/fw-1.2_x~.bin"), "plain/fw-1.2_x~.bin");
    }

    #[test]
    fn quote_like_python() {
        assert_eq!(quote("a/b c.txt"), "a%2Fb%20c.txt");
        assert_eq!(quote("role-1_x.~"), "role-1_x.~");
    }
}
