//! hearth-tuf integration tests: the client workflow (spec 5) against
//! repositories built in memory with the crate's repository tools, at a
//! fixed time, plus a root made and signed by python-tuf.
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use hearth_tuf::client::{Fetcher, Limits, MemStore, MetadataStore, TrustedSet, Updater};
use hearth_tuf::crypto::{KeyKind, PublicKey, SigningKey};
use hearth_tuf::metadata::{Envelope, Root};
use hearth_tuf::repo::{self, RoleSpec};
use hearth_tuf::{Error, FetchError};
use serde_json::{json, Value};

/// 2027-01-15T08:00:00Z: every test runs at this instant.
const NOW: i64 = 1_800_000_000;
const DAY: i64 = 86_400;
const META: &str = "http://repo.test/metadata";
const TARGETS: &str = "http://repo.test/targets";

/// Files served by URL, and every URL requested.
#[derive(Default, Clone)]
struct Server {
    files: BTreeMap<String, Vec<u8>>,
    log: std::rc::Rc<std::cell::RefCell<Vec<String>>>,
}

impl Fetcher for Server {
    fn fetch(&mut self, url: &str, max_len: u64) -> Result<Vec<u8>, FetchError> {
        self.log.borrow_mut().push(url.to_owned());
        let data = self.files.get(url).ok_or(FetchError::NotFound(404))?;
        if data.len() as u64 > max_len {
            return Err(FetchError::TooLong(max_len));
        }
        Ok(data.clone())
    }
}

/// A repository made with `hearth_tuf::repo`, publishing into a [`Server`].
struct TestRepo {
    keys: BTreeMap<&'static str, Vec<SigningKey>>,
    thresholds: BTreeMap<&'static str, u64>,
    root_version: u64,
    consistent: bool,
    targets: BTreeMap<String, Value>,
    targets_version: u64,
    snapshot_version: u64,
    timestamp_version: u64,
    expires: i64,
    delegations: Option<Value>,
    delegated: Vec<(String, u64, Vec<u8>)>,
    server: Server,
}

impl TestRepo {
    fn new(consistent: bool) -> Self {
        let mut keys = BTreeMap::new();
        let mut thresholds = BTreeMap::new();
        for role in ["root", "timestamp", "snapshot", "targets"] {
            let n = if role == "root" { 3 } else { 1 };
            keys.insert(role, (0..n).map(|_| SigningKey::generate(KeyKind::Ed25519).unwrap()).collect());
            thresholds.insert(role, if role == "root" { 2 } else { 1 });
        }
        let mut r = TestRepo {
            keys,
            thresholds,
            root_version: 0,
            consistent,
            targets: BTreeMap::new(),
            targets_version: 0,
            snapshot_version: 0,
            timestamp_version: 0,
            expires: NOW + 7 * DAY,
            delegations: None,
            delegated: Vec::new(),
            server: Server::default(),
        };
        r.publish_root(&[]);
        r.publish();
        r
    }

    fn signers(&self, role: &str) -> Vec<&SigningKey> {
        self.keys[role].iter().collect()
    }

    fn root_value(&self) -> Value {
        let roles = self
            .keys
            .iter()
            .map(|(name, ks)| ((*name).to_owned(), RoleSpec { keys: ks.iter().map(|k| k.public().clone()).collect(), threshold: self.thresholds[name] }))
            .collect();
        repo::root(self.root_version, NOW + 365 * DAY, self.consistent, &roles).unwrap()
    }

    /// Publishes the next root version signed by the current root keys and `extra`.
    fn publish_root(&mut self, extra: &[&SigningKey]) -> Vec<u8> {
        self.root_version += 1;
        let mut signers = self.signers("root");
        signers.extend_from_slice(extra);
        let bytes = repo::sign(&self.root_value(), &signers).unwrap();
        self.server.files.insert(format!("{META}/{}.root.json", self.root_version), bytes.clone());
        bytes
    }

    fn root_v1(&self) -> Vec<u8> {
        self.server.files[&format!("{META}/1.root.json")].clone()
    }

    fn put(&mut self, name: &str, version: u64, bytes: Vec<u8>) {
        if self.consistent && name != "timestamp.json" {
            self.server.files.insert(format!("{META}/{version}.{name}"), bytes);
        } else {
            self.server.files.insert(format!("{META}/{name}"), bytes);
        }
    }

    fn publish(&mut self) {
        self.targets_version += 1;
        let t = repo::targets(self.targets_version, self.expires, &self.targets, self.delegations.clone());
        let t = repo::sign(&t, &self.signers("targets")).unwrap();
        self.put("targets.json", self.targets_version, t);
        let mut meta = vec![("targets.json".to_owned(), self.targets_version)];
        for (name, version, bytes) in self.delegated.clone() {
            self.put(&format!("{name}.json"), version, bytes);
            meta.push((format!("{name}.json"), version));
        }
        self.snapshot_version += 1;
        let meta: Vec<(&str, u64)> = meta.iter().map(|(n, v)| (n.as_str(), *v)).collect();
        let s = repo::sign(&repo::snapshot(self.snapshot_version, self.expires, &meta), &self.signers("snapshot")).unwrap();
        self.put("snapshot.json", self.snapshot_version, s.clone());
        self.publish_timestamp(&s);
    }

    fn publish_timestamp(&mut self, snapshot: &[u8]) {
        self.timestamp_version += 1;
        let ts = repo::timestamp(self.timestamp_version, self.expires, self.snapshot_version, snapshot);
        let ts = repo::sign(&ts, &self.signers("timestamp")).unwrap();
        self.put("timestamp.json", 0, ts);
    }

    fn add_target(&mut self, path: &str, data: &[u8], custom: Option<Value>) {
        self.targets.insert(path.to_owned(), repo::target_entry(data, custom));
        let rel = if self.consistent {
            let h = hex::encode(ring_sha256(data));
            match path.rsplit_once('/') {
                Some((d, f)) => format!("{d}/{h}.{f}"),
                None => format!("{h}.{path}"),
            }
        } else {
            path.to_owned()
        };
        self.server.files.insert(format!("{TARGETS}/{rel}"), data.to_vec());
    }

    fn client(&self) -> Updater<Server, MemStore> {
        let mut store = MemStore::default();
        store.store("root.json", &self.root_v1()).unwrap();
        Updater::new(self.server.clone(), store, META, NOW, Limits::default()).unwrap()
    }
}

fn ring_sha256(data: &[u8]) -> Vec<u8> {
    use sha256_shim::digest;
    digest(data)
}

/// SHA-256 via the crate's own target verification path would be circular;
/// compute it independently from the entry the repo tools wrote.
mod sha256_shim {
    pub fn digest(data: &[u8]) -> Vec<u8> {
        let entry = hearth_tuf::repo::target_entry(data, None);
        hex::decode(entry["hashes"]["sha256"].as_str().unwrap()).unwrap()
    }
}

/// Runs a fresh update cycle at `now` on an existing store.
fn cycle(r: &TestRepo, store: MemStore, now: i64) -> (Result<(), Error>, Updater<Server, MemStore>) {
    let mut up = Updater::new(r.server.clone(), store, META, now, Limits::default()).unwrap();
    (up.refresh(), up)
}

fn version_in(store: &MemStore, name: &str) -> Option<u64> {
    store.files.get(name).map(|b| repo::version_of(b).unwrap())
}

#[test]
fn refresh_and_download_firmware_with_custom_metadata() {
    let mut r = TestRepo::new(false);
    r.add_target("fw/hearth-plug-v2.bin", b"firmware image v2", Some(repo::firmware_custom("2.0.0", "plug-a1")));
    r.publish();
    let mut up = r.client();
    up.refresh().unwrap();
    let info = up.target_info("fw/hearth-plug-v2.bin").unwrap().unwrap();
    assert_eq!(info.custom.as_ref().unwrap()["hearth"]["hardware_model"], "plug-a1");
    assert_eq!(up.download_target(&info, TARGETS).unwrap(), b"firmware image v2");
    let store = up.into_store();
    for (name, url) in [("timestamp.json", format!("{META}/timestamp.json")), ("snapshot.json", format!("{META}/snapshot.json"))] {
        assert_eq!(store.files[name], r.server.files[&url], "{name} stored byte for byte");
    }
}

#[test]
fn target_signed_with_a_key_that_is_not_the_targets_key_is_refused() {
    let mut r = TestRepo::new(false);
    r.keys.insert("targets", vec![SigningKey::generate(KeyKind::Ed25519).unwrap()]);
    r.add_target("fw.bin", b"evil", None);
    // Root still names the old targets key; only the signing key changed.
    r.publish();
    let mut up = r.client();
    assert!(matches!(up.refresh(), Err(Error::Threshold { role, .. }) if role == "targets"));
    assert_eq!(version_in(&up.into_store(), "targets.json"), None);
}

#[test]
fn replayed_timestamp_is_refused_and_trusted_copy_kept() {
    let mut r = TestRepo::new(false);
    let old = r.server.files[&format!("{META}/timestamp.json")].clone();
    r.publish();
    let (res, up) = cycle(&r, r.client().into_store(), NOW);
    res.unwrap();
    r.server.files.insert(format!("{META}/timestamp.json"), old);
    let (res, up) = cycle(&r, up.into_store(), NOW);
    assert!(matches!(&res, Err(Error::BadVersion { role, .. }) if role == "timestamp"), "{res:?}");
    assert_eq!(version_in(&up.into_store(), "timestamp.json"), Some(2));
}

#[test]
fn timestamp_expiry_is_checked_at_the_update_time() {
    let r = TestRepo::new(false);
    let (res, _) = cycle(&r, r.client().into_store(), r.expires - 1);
    res.unwrap();
    // Expired means now >= expires (freeze attack, spec 5.4.4).
    let (res, _) = cycle(&r, r.client().into_store(), r.expires);
    assert!(matches!(&res, Err(Error::Expired { role, .. }) if role == "timestamp"), "{res:?}");
}

#[test]
fn snapshot_not_matching_timestamp_is_refused() {
    let mut r = TestRepo::new(false);
    let old_snapshot = r.server.files[&format!("{META}/snapshot.json")].clone();
    r.publish();
    r.server.files.insert(format!("{META}/snapshot.json"), old_snapshot);
    let mut up = r.client();
    // The hashes in timestamp catch the substitution first (spec 5.5.2).
    assert!(matches!(up.refresh(), Err(Error::LengthOrHash { .. })));
}

#[test]
fn root_rotated_twice_with_thresholds_is_followed() {
    let mut r = TestRepo::new(true);
    let mut up_store = r.client().into_store();
    for _ in 0..2 {
        let old = std::mem::replace(r.keys.get_mut("root").unwrap(), (0..3).map(|_| SigningKey::generate(KeyKind::EcdsaP256).unwrap()).collect());
        // New root signed by 2 of the old 3 and all of the new (threshold 2).
        r.publish_root(&[&old[0], &old[1]]);
    }
    r.publish();
    let (res, up) = cycle(&r, up_store, NOW);
    res.unwrap();
    up_store = up.into_store();
    assert_eq!(version_in(&up_store, "root.json"), Some(3));
}

#[test]
fn root_rotation_without_old_threshold_is_refused() {
    let mut r = TestRepo::new(false);
    let old = std::mem::replace(r.keys.get_mut("root").unwrap(), (0..3).map(|_| SigningKey::generate(KeyKind::Ed25519).unwrap()).collect());
    // Only one old key signs: below the old threshold of 2 (spec 5.3.3).
    r.publish_root(&[&old[0]]);
    let mut up = r.client();
    assert!(matches!(up.refresh(), Err(Error::Threshold { role, valid: 1, threshold: 2 }) if role == "root"));
    assert_eq!(up.trusted().root().common.version, 1);
}

#[test]
fn oversized_target_is_cut_at_the_trusted_length() {
    let mut r = TestRepo::new(false);
    r.add_target("fw.bin", b"12345", None);
    r.server.files.insert(format!("{TARGETS}/fw.bin"), b"123456".to_vec());
    r.publish();
    let mut up = r.client();
    let info = up.target_info("fw.bin").unwrap().unwrap();
    assert!(matches!(up.download_target(&info, TARGETS), Err(Error::Fetch { source: FetchError::TooLong(5), .. })));
}

#[test]
fn consistent_snapshot_requests_versioned_metadata_and_hash_prefixed_targets() {
    let mut r = TestRepo::new(true);
    r.add_target("dir/file.bin", b"abc", None);
    r.publish();
    let mut up = r.client();
    let info = up.target_info("dir/file.bin").unwrap().unwrap();
    up.download_target(&info, TARGETS).unwrap();
    let log = r.server.log.borrow().clone();
    let h = hex::encode(ring_sha256(b"abc"));
    assert!(log.contains(&format!("{META}/2.snapshot.json")), "{log:?}");
    assert!(log.contains(&format!("{META}/2.targets.json")), "{log:?}");
    assert!(log.contains(&format!("{TARGETS}/dir/{h}.file.bin")), "{log:?}");
}

/// Spec 5.7.3 with spec 4.5 TARGETPATH: a target path holding a space,
/// non-ASCII or CR/LF is requested percent-encoded, so no raw byte of it
/// reaches the HTTP request line (where CR/LF would start a new header).
#[test]
fn target_paths_with_spaces_and_control_characters_are_percent_encoded_in_the_url() {
    for consistent in [true, false] {
        let mut r = TestRepo::new(consistent);
        let path = "fw images/v2 \u{e4}\r\nX-Injected: 1.bin";
        r.add_target(path, b"odd name", None);
        // Serve it where a static server would find it: under the encoded URL.
        let h = hex::encode(ring_sha256(b"odd name"));
        let raw = if consistent { format!("{TARGETS}/fw images/{h}.v2 \u{e4}\r\nX-Injected: 1.bin") } else { format!("{TARGETS}/{path}") };
        let data = r.server.files.remove(&raw).unwrap();
        let encoded = if consistent {
            format!("{TARGETS}/fw%20images/{h}.v2%20%C3%A4%0D%0AX-Injected:%201.bin")
        } else {
            format!("{TARGETS}/fw%20images/v2%20%C3%A4%0D%0AX-Injected:%201.bin")
        };
        r.server.files.insert(encoded.clone(), data);
        r.publish();
        let mut up = r.client();
        let info = up.target_info(path).unwrap().unwrap();
        assert_eq!(up.download_target(&info, TARGETS).unwrap(), b"odd name");
        let log = r.server.log.borrow().clone();
        assert_eq!(log.last(), Some(&encoded), "{log:?}");
        assert!(log.iter().all(|u| !u.contains(['\r', '\n', ' '])), "{log:?}");
    }
}

#[test]
fn same_timestamp_version_with_changed_content_is_discarded() {
    let mut r = TestRepo::new(false);
    let (res, up) = cycle(&r, r.client().into_store(), NOW);
    res.unwrap();
    let store = up.into_store();
    let before = store.files["timestamp.json"].clone();
    r.expires += DAY;
    r.timestamp_version -= 1;
    let snap = r.server.files[&format!("{META}/snapshot.json")].clone();
    r.publish_timestamp(&snap);
    assert_ne!(r.server.files[&format!("{META}/timestamp.json")], before);
    let (res, up) = cycle(&r, store, NOW);
    res.unwrap();
    assert_eq!(up.into_store().files["timestamp.json"], before);
}

#[test]
fn delegation_search_honours_terminating_and_patterns() {
    let mut r = TestRepo::new(false);
    let fw_key = SigningKey::generate(KeyKind::Ed25519).unwrap();
    let all_key = SigningKey::generate(KeyKind::Ed25519).unwrap();
    r.delegations = Some(json!({
        "keys": {fw_key.public().key_id(): fw_key.public().to_value(), all_key.public().key_id(): all_key.public().to_value()},
        "roles": [
            {"name": "firmware", "keyids": [fw_key.public().key_id()], "threshold": 1, "terminating": true, "paths": ["fw/*.bin"]},
            {"name": "all", "keyids": [all_key.public().key_id()], "threshold": 1, "terminating": false, "paths": ["*", "fw/*"]},
        ],
    }));
    let fw_targets: BTreeMap<String, Value> = [("fw/a.bin".to_owned(), repo::target_entry(b"a", None))].into();
    let all_targets: BTreeMap<String, Value> =
        [("fw/b.bin".to_owned(), repo::target_entry(b"b", None)), ("notes".to_owned(), repo::target_entry(b"n", None))].into();
    r.delegated = vec![
        ("firmware".into(), 1, repo::sign(&repo::targets(1, r.expires, &fw_targets, None), &[&fw_key]).unwrap()),
        ("all".into(), 1, repo::sign(&repo::targets(1, r.expires, &all_targets, None), &[&all_key]).unwrap()),
    ];
    r.publish();
    let mut up = r.client();
    assert!(up.target_info("fw/a.bin").unwrap().is_some());
    assert!(up.target_info("notes").unwrap().is_some());
    // "firmware" is terminating for fw/*.bin, so "all" is never asked.
    assert!(up.target_info("fw/b.bin").unwrap().is_none());
    assert!(up.target_info("fw/x/y.bin").unwrap().is_none());
}

#[test]
fn python_tuf_root_with_ed25519_ecdsa_and_rsa_verifies() {
    let bytes = include_bytes!("fixtures/python_root_3of3.json");
    let set = TrustedSet::new(bytes, NOW).unwrap();
    assert_eq!(set.root().roles["root"].threshold, 3);
    // Key ids are SHA-256 of the canonical key: same as python-tuf computes.
    for (id, key) in &set.root().keys {
        assert_eq!(&key.key_id(), id);
    }
    // Any change to the signed part, even in an unknown field, breaks it.
    let tampered = String::from_utf8(bytes.to_vec()).unwrap().replace("stay signed", "stay signeD");
    assert!(matches!(TrustedSet::new(tampered.as_bytes(), NOW), Err(Error::Threshold { .. })));
}

#[test]
fn root_with_unknown_key_type_still_loads() {
    let k = SigningKey::generate(KeyKind::Ed25519).unwrap();
    let odd = PublicKey::from_value(&json!({"keytype": "future", "scheme": "future", "keyval": {"public": "x"}})).unwrap();
    let roles = ["root", "timestamp", "snapshot", "targets"]
        .into_iter()
        .map(|n| (n.to_owned(), RoleSpec { keys: vec![k.public().clone(), odd.clone()], threshold: 1 }))
        .collect();
    let v = repo::root(1, NOW + DAY, false, &roles).unwrap();
    let bytes = repo::sign(&v, &[&k]).unwrap();
    let env = Envelope::parse("root", &bytes).unwrap();
    Root::parse(&env.signed).unwrap().verify_role("root", &env).unwrap();
}

/// Serves a [`repo::RepoDir`] directory as if over HTTP.
struct DirFetcher(std::path::PathBuf);

impl Fetcher for DirFetcher {
    fn fetch(&mut self, url: &str, max_len: u64) -> Result<Vec<u8>, FetchError> {
        let rel = url.strip_prefix("http://repo.test/").ok_or(FetchError::NotFound(404))?;
        let data = std::fs::read(self.0.join(rel)).map_err(|_| FetchError::NotFound(404))?;
        if data.len() as u64 > max_len {
            return Err(FetchError::TooLong(max_len));
        }
        Ok(data)
    }
}

fn keys(n: usize) -> Vec<SigningKey> {
    (0..n).map(|_| SigningKey::generate(KeyKind::Ed25519).unwrap()).collect()
}

fn spec(keys: &[SigningKey], threshold: u64) -> RoleSpec {
    RoleSpec { keys: keys.iter().map(|k| k.public().clone()).collect(), threshold }
}

#[test]
fn repository_tools_thresholds_publish_and_rotation_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let (root_keys, targets_keys, snap, ts) = (keys(3), keys(2), keys(1), keys(1));
    let roles: BTreeMap<String, RoleSpec> = [
        ("root".to_owned(), spec(&root_keys, 2)),
        ("targets".to_owned(), spec(&targets_keys, 2)),
        ("snapshot".to_owned(), spec(&snap, 1)),
        ("timestamp".to_owned(), spec(&ts, 1)),
    ]
    .into();
    let repo = repo::RepoDir::init(tmp.path(), &roles, &[&root_keys[0], &root_keys[1]], &[&targets_keys[0], &targets_keys[1]], &snap[0], &ts[0], NOW).unwrap();
    let root_v1 = std::fs::read(repo.metadata_path("root")).unwrap();
    let client = |now| {
        let mut store = MemStore::default();
        store.store("root.json", &root_v1).unwrap();
        Updater::new(DirFetcher(tmp.path().to_owned()), store, META, now, Limits::default()).unwrap()
    };
    client(NOW).refresh().unwrap();

    // One targets signature of the two required: devices refuse it.
    repo.add_target("plug/fw.bin", b"image v2", Some(repo::firmware_custom("2.0.0", "plug-a1")), &[&targets_keys[0]], NOW).unwrap();
    repo.publish(&snap[0], &ts[0], NOW).unwrap();
    assert!(matches!(client(NOW).refresh(), Err(Error::Threshold { valid: 1, threshold: 2, .. })));
    // The second key holder signs offline; the cloud republishes.
    repo.sign_role("targets", &[&targets_keys[1]]).unwrap();
    repo.publish(&snap[0], &ts[0], NOW).unwrap();
    let mut up = client(NOW);
    let info = up.target_info("plug/fw.bin").unwrap().unwrap();
    assert_eq!(info.custom.as_ref().unwrap()["hearth"]["version"], "2.0.0");
    assert_eq!(up.download_target(&info, TARGETS).unwrap(), b"image v2");

    // Rotate root (old 2-of-3 and new 2-of-3 sign), then the timestamp key.
    let new_root = keys(3);
    repo.rotate("root", spec(&new_root, 2), &[&root_keys[1], &root_keys[2], &new_root[0], &new_root[1]], NOW).unwrap();
    let new_ts = keys(1);
    repo.rotate("timestamp", spec(&new_ts, 1), &[&new_root[0], &new_root[2]], NOW).unwrap();
    repo.renew_timestamp(&new_ts[0], NOW).unwrap();
    let mut up = client(NOW);
    up.refresh().unwrap();
    assert_eq!(up.trusted().root().common.version, 3);

    // The cloud must renew the timestamp: a day later it has expired.
    assert!(matches!(client(NOW + 86_400).refresh(), Err(Error::Expired { role, .. }) if role == "timestamp"));
    repo.renew_timestamp(&new_ts[0], NOW + 86_400).unwrap();
    client(NOW + 86_400).refresh().unwrap();
}

#[test]
fn root_rotation_signed_by_new_keys_only_is_refused_by_tools_output() {
    let tmp = tempfile::tempdir().unwrap();
    let (root_keys, t, s, ts) = (keys(2), keys(1), keys(1), keys(1));
    let roles: BTreeMap<String, RoleSpec> =
        [("root".to_owned(), spec(&root_keys, 2)), ("targets".to_owned(), spec(&t, 1)), ("snapshot".to_owned(), spec(&s, 1)), ("timestamp".to_owned(), spec(&ts, 1))].into();
    let repo = repo::RepoDir::init(tmp.path(), &roles, &[&root_keys[0], &root_keys[1]], &[&t[0]], &s[0], &ts[0], NOW).unwrap();
    let root_v1 = std::fs::read(repo.metadata_path("root")).unwrap();
    let attacker = keys(2);
    repo.rotate("root", spec(&attacker, 2), &[&attacker[0], &attacker[1]], NOW).unwrap();
    let mut store = MemStore::default();
    store.store("root.json", &root_v1).unwrap();
    let mut up = Updater::new(DirFetcher(tmp.path().to_owned()), store, META, NOW, Limits::default()).unwrap();
    assert!(matches!(up.refresh(), Err(Error::Threshold { valid: 0, threshold: 2, .. })));
}

#[test]
fn streamed_target_with_wrong_bytes_of_the_right_length_is_refused() {
    let mut r = TestRepo::new(true);
    r.add_target("fw.bin", b"good image", None);
    let key = format!("{TARGETS}/{}.fw.bin", hex::encode(ring_sha256(b"good image")));
    r.server.files.insert(key, b"evil image".to_vec());
    r.publish();
    let mut up = r.client();
    let info = up.target_info("fw.bin").unwrap().unwrap();
    let res = up.download_target_to(&info, TARGETS, Vec::new());
    assert!(matches!(res, Err(Error::LengthOrHash { ref reason, .. }) if reason.contains("mismatch")), "{:?}", res.map(|_| ()));
}

/// Stable-Rust stand-in for a fuzzer over the metadata parsers: thousands of
/// deterministic byte mutations of real signed metadata. None may panic,
/// and a mutated root is accepted only if what it signs is unchanged.
#[test]
fn mutated_metadata_never_panics_and_never_verifies_with_changed_content() {
    let bytes = include_bytes!("fixtures/python_root_3of3.json").to_vec();
    let original = Envelope::parse("root", &bytes).unwrap().signed_bytes;
    let r = TestRepo::new(false);
    let others: Vec<Vec<u8>> = ["timestamp.json", "snapshot.json", "targets.json"].iter().map(|n| r.server.files[&format!("{META}/{n}")].clone()).collect();
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        // xorshift64*: deterministic, no dependency.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let mut accepted = 0;
    for i in 0..4000 {
        let mut m = if i % 4 == 0 { bytes.clone() } else { others[i % 3].clone() };
        for _ in 0..(1 + next() % 4) {
            let pos = (next() % m.len() as u64) as usize;
            match next() % 3 {
                0 => m[pos] = (next() & 0xff) as u8,
                1 => {
                    m.remove(pos);
                }
                _ => m.insert(pos, b"{}[]\",:0-e\\"[(next() % 11) as usize]),
            }
        }
        if i % 4 == 0 {
            if TrustedSet::new(&m, NOW).is_ok() {
                accepted += 1;
                assert_eq!(Envelope::parse("root", &m).unwrap().signed_bytes, original, "mutation {i} changed signed content yet verified");
            }
        } else if let Ok(env) = Envelope::parse("x", &m) {
            let _ = hearth_tuf::metadata::Timestamp::parse(&env.signed);
            let _ = hearth_tuf::metadata::Snapshot::parse(&env.signed);
            let _ = hearth_tuf::metadata::Targets::parse("targets", &env.signed);
        }
    }
    // Whitespace-only mutations may still verify; most mutations must not.
    assert!(accepted < 400, "{accepted} mutated roots verified");
}

/// A tiny HTTP/1.1 server on 127.0.0.1 serving a directory, answering
/// either with Content-Length or chunked, for the real HTTP fetcher and the
/// conformance binary. The thread lives until the test process ends.
fn serve_dir(dir: std::path::PathBuf, chunked: bool) -> String {
    use std::io::{BufRead, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            // Like any static file server: the request-target is percent-decoded.
            let path = percent_decode(line.split_whitespace().nth(1).unwrap_or("/"));
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap() == 0 || h == "\r\n" {
                    break;
                }
            }
            match std::fs::read(dir.join(path.trim_start_matches('/'))) {
                Err(_) => {
                    let _ = stream.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                }
                Ok(body) if chunked => {
                    let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n");
                    for chunk in body.chunks(7) {
                        let _ = write!(stream, "{:x}\r\n", chunk.len());
                        let _ = stream.write_all(chunk);
                        let _ = stream.write_all(b"\r\n");
                    }
                    let _ = stream.write_all(b"0\r\n\r\n");
                }
                Ok(body) => {
                    let _ = write!(stream, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
                    let _ = stream.write_all(&body);
                }
            }
        }
    });
    base
}

/// `%XX` → byte; the test server's half of RFC 3986 2.1.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (b[i], b.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok())) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn run_cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_hearth-tuf-conformance")).args(args).output().unwrap()
}

#[test]
fn conformance_cli_over_real_http_with_and_without_chunked_bodies() {
    for chunked in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let (root_keys, t, s, ts) = (keys(1), keys(1), keys(1), keys(1));
        let roles: BTreeMap<String, RoleSpec> =
            [("root".to_owned(), spec(&root_keys, 1)), ("targets".to_owned(), spec(&t, 1)), ("snapshot".to_owned(), spec(&s, 1)), ("timestamp".to_owned(), spec(&ts, 1))].into();
        let now = hearth_tuf::time::now();
        let repo_dir = tmp.path().join("repo");
        let repo = repo::RepoDir::init(&repo_dir, &roles, &[&root_keys[0]], &[&t[0]], &s[0], &ts[0], now).unwrap();
        repo.add_target("dir/fw.bin", b"firmware over http", Some(repo::firmware_custom("2.0.0", "plug-a1")), &[&t[0]], now).unwrap();
        // A target path with a space and non-ASCII (spec 4.5 TARGETPATH is
        // any string): its URL must be percent-encoded, or the space ends
        // the HTTP request-target and the server answers for another file.
        repo.add_target("dir/fw image ä.bin", b"spaced firmware", None, &[&t[0]], now).unwrap();
        repo.publish(&s[0], &ts[0], now).unwrap();
        // init (no network), refresh (root 2 → 404, timestamp, snapshot, targets), download (again + target).
        let base = serve_dir(repo_dir.clone(), chunked);
        let mdir = tmp.path().join("md");
        let tdir = tmp.path().join("td");
        let root = repo_dir.join("metadata/1.root.json");
        let md = mdir.to_str().unwrap();
        let murl = format!("{base}/metadata");
        let turl = format!("{base}/targets");
        assert!(run_cli(&["--metadata-dir", md, "init", root.to_str().unwrap()]).status.success());
        let out = run_cli(&["--metadata-url", &murl, "--metadata-dir", md, "refresh"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(std::fs::read(mdir.join("timestamp.json")).unwrap(), std::fs::read(repo_dir.join("metadata/timestamp.json")).unwrap());
        let out = run_cli(&["--metadata-dir", md, "--metadata-url", &murl, "--target-name", "dir/fw.bin", "--target-base-url", &turl, "--target-dir", tdir.to_str().unwrap(), "download"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(std::fs::read(tdir.join("dir%2Ffw.bin")).unwrap(), b"firmware over http");
        let out = run_cli(&["--metadata-dir", md, "--metadata-url", &murl, "--target-name", "dir/fw image ä.bin", "--target-base-url", &turl, "--target-dir", tdir.to_str().unwrap(), "download"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(std::fs::read(tdir.join("dir%2Ffw%20image%20%C3%A4.bin")).unwrap(), b"spaced firmware");
    }
}

#[test]
fn conformance_cli_exits_1_on_bad_usage_and_unreachable_repository() {
    let tmp = tempfile::tempdir().unwrap();
    let md = tmp.path().to_str().unwrap();
    assert_eq!(run_cli(&["--metadata-dir", md, "refresh"]).status.code(), Some(1), "no --metadata-url");
    assert_eq!(run_cli(&["--metadata-dir", md, "frobnicate"]).status.code(), Some(1));
    assert_eq!(run_cli(&["--metadata-dir", md, "--metadata-url", "http://127.0.0.1:9/m", "refresh"]).status.code(), Some(1), "no root.json");
}
