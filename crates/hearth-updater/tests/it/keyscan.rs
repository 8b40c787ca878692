//! No private key on the device (issue 4, ADR 0004): scan the built device
//! binaries and a provisioned device state directory for the private keys of
//! a TUF repository made in the test, in every form they could leak in.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use hearth_tuf::crypto::{KeyKind, SigningKey};
use hearth_tuf::metadata::Targets;
use hearth_tuf::repo::{self, RepoDir, RoleSpec};
use hearth_updater::install::{self, ExpectedImage};
use hearth_updater::store;

const NOW: i64 = 1_800_000_000;

/// Byte patterns that reveal one private key: the PEM body, the PKCS#8 DER,
/// and the raw 32-byte secret (ed25519 seed or P-256 scalar).
fn needles(key: &SigningKey) -> Vec<(String, Vec<u8>)> {
    let pem = key.to_pem();
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD.decode(&b64).unwrap();
    // Both ring PKCS#8 layouts carry the secret as the first OCTET STRING of
    // 32 bytes (`04 20`): ed25519 `… 04 22 04 20 <seed>`, P-256
    // `… 02 01 01 04 20 <scalar>`; nothing before it contains `04 20`.
    let at = der.windows(2).position(|w| w == [0x04, 0x20]).unwrap() + 2;
    let scalar = der[at..at + 32].to_vec();
    let first_pem_line = pem.lines().nth(1).unwrap().as_bytes().to_vec();
    vec![("PEM body line".into(), first_pem_line), ("PKCS#8 DER".into(), der), ("raw 32-byte secret".into(), scalar)]
}

/// The bytes after a `PRIVATE KEY-----` label start an actual PEM block
/// (a newline and base64), as opposed to the bare label strings that PEM
/// parsers in a binary legitimately hold.
fn starts_pem_body(rest: &[u8]) -> bool {
    let rest = rest.strip_prefix(b"\r").unwrap_or(rest);
    let Some(rest) = rest.strip_prefix(b"\n") else { return false };
    rest.len() >= 40 && rest[..40].iter().all(|b| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/')
}

const PEM_LABEL: &[u8] = b"PRIVATE KEY-----";

/// Every finding in `data`, as "what: which". One pass indexed by the first
/// two bytes of each pattern, so tens of MiB of debug binary scan in well
/// under a second even in an unoptimised test build.
fn scan(data: &[u8], keys: &[(String, SigningKey)]) -> Vec<String> {
    let mut patterns: Vec<(String, Vec<u8>)> = keys.iter().flat_map(|(role, key)| needles(key).into_iter().map(move |(what, n)| (format!("{role} key as {what}"), n))).collect();
    patterns.push(("a PEM private key block".into(), PEM_LABEL.to_vec()));
    let mut index: Vec<Vec<usize>> = vec![Vec::new(); 1 << 16];
    for (i, (_, p)) in patterns.iter().enumerate() {
        index[usize::from(u16::from_be_bytes([p[0], p[1]]))].push(i);
    }
    let mut found = std::collections::BTreeSet::new();
    for pos in 0..data.len().saturating_sub(1) {
        let bucket = &index[usize::from(u16::from_be_bytes([data[pos], data[pos + 1]]))];
        for &i in bucket {
            let (what, p) = &patterns[i];
            if data[pos..].starts_with(p) && (p.as_slice() != PEM_LABEL || starts_pem_body(&data[pos + p.len()..])) {
                found.insert(what.clone());
            }
        }
    }
    found.into_iter().collect()
}

fn has_pem_private_key_block(data: &[u8]) -> bool {
    scan(data, &[]).iter().any(|f| f.contains("PEM private key block"))
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

fn repo_keys() -> Vec<(String, SigningKey)> {
    let mut keys = Vec::new();
    for (role, kind, n) in [("root", KeyKind::Ed25519, 3), ("targets", KeyKind::EcdsaP256, 2), ("snapshot", KeyKind::Ed25519, 1), ("timestamp", KeyKind::EcdsaP256, 1)] {
        for _ in 0..n {
            keys.push((role.to_owned(), SigningKey::generate(kind).unwrap()));
        }
    }
    keys
}

fn role<'a>(keys: &'a [(String, SigningKey)], name: &str) -> Vec<&'a SigningKey> {
    keys.iter().filter(|(r, _)| r == name).map(|(_, k)| k).collect()
}

#[test]
fn scanner_finds_each_form_of_a_planted_key() {
    // The scan below is only worth something if it can fail.
    let keys = repo_keys();
    for (role, key) in &keys {
        for (what, needle) in needles(key) {
            let mut blob = vec![0x5a; 1000];
            blob.extend_from_slice(&needle);
            blob.extend_from_slice(&[0xa5; 1000]);
            assert!(!scan(&blob, &keys).is_empty(), "{role}/{what} not found");
        }
        assert!(has_pem_private_key_block(key.to_pem().as_bytes()));
    }
    assert!(!has_pem_private_key_block(b"expected -----BEGIN PRIVATE KEY-----\n or a certificate"));
}

#[test]
fn no_repository_private_key_in_device_binaries_or_state_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = repo_keys();
    let spec = |name: &str, threshold| RoleSpec { keys: role(&keys, name).iter().map(|k| k.public().clone()).collect(), threshold };
    let roles: BTreeMap<String, RoleSpec> =
        [("root".to_owned(), spec("root", 2)), ("targets".to_owned(), spec("targets", 1)), ("snapshot".to_owned(), spec("snapshot", 1)), ("timestamp".to_owned(), spec("timestamp", 1))].into();
    let repo_dir = tmp.path().join("repo");
    let r = role(&keys, "root");
    let t = role(&keys, "targets");
    let repo = RepoDir::init(&repo_dir, &roles, &r[..2], &t, role(&keys, "snapshot")[0], role(&keys, "timestamp")[0], NOW).unwrap();
    let image = format!("#!/bin/sh\nexit 0\n# {}\n", "y".repeat(1000)).into_bytes();
    repo.add_target("fw/hearth-sim-2", &image, Some(repo::firmware_custom("2.0.0", "hearth-sim")), &t, NOW).unwrap();
    repo.publish(role(&keys, "snapshot")[0], role(&keys, "timestamp")[0], NOW).unwrap();

    // A provisioned device: trusted root.json, factory v1, then v2 installed
    // from the repository's (signed) target metadata.
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::copy(repo.metadata_path("root"), state.join("root.json")).unwrap();
    let factory = tmp.path().join("factory");
    std::fs::write(&factory, b"#!/bin/sh\nexit 0\n").unwrap();
    install::provision_factory(&state, &factory, "1.0.0".parse().unwrap()).unwrap();
    let targets_json: serde_json::Value = serde_json::from_slice(&std::fs::read(repo.metadata_path("targets")).unwrap()).unwrap();
    let targets = Targets::parse("targets", &targets_json["signed"]).unwrap();
    let target = &targets.targets["fw/hearth-sim-2"];
    assert!(ExpectedImage::from_target(target, "other-model").is_err(), "image for other hardware refused");
    let expected = ExpectedImage::from_target(target, "hearth-sim").unwrap();
    install::install_to_inactive(&state, &image[..], &expected).unwrap();
    assert!(store::load_record(&state).unwrap().trial.is_some());

    let mut scanned = Vec::new();
    for file in files_under(&state) {
        let found = scan(&std::fs::read(&file).unwrap(), &keys);
        assert!(found.is_empty(), "{}: {found:?}", file.display());
        scanned.push(file);
    }
    assert!(scanned.len() >= 4, "{scanned:?}");

    // Built binaries: ours always; the device agent if it was built into the
    // same target directory (target/debug/hearth-device next to deps/).
    let mut binaries = vec![PathBuf::from(super::UPDATER), PathBuf::from(super::SUPERVISOR)];
    let agent = std::env::current_exe().unwrap().parent().and_then(Path::parent).map(|d| d.join("hearth-device"));
    match agent.filter(|p| p.is_file()) {
        Some(p) => binaries.push(p),
        None => eprintln!("SKIP: hearth-device binary not built next to the test binary; run `cargo build -p hearth-device` to include it"),
    }
    for bin in binaries {
        let data = std::fs::read(&bin).unwrap();
        let found = scan(&data, &keys);
        assert!(found.is_empty(), "{}: {found:?}", bin.display());
        eprintln!("scanned {} ({} bytes): clean", bin.display(), data.len());
    }
}
