//! The device's state directory: identity files written once at the
//! factory, and `state.json`, rewritten atomically on every change.
//!
//! | file | mode | written |
//! |---|---|---|
//! | `device.key` | 0600 | factory; the device's P-256 key, PKCS#8 PEM; never leaves |
//! | `device.pem` | 0644 | factory; the manufacturer-signed certificate |
//! | `cloud-ca.pem` | 0644 | factory; the only CA the device trusts for the cloud |
//! | `setup-secret` | 0600 | factory; the typed setup code |
//! | `config.json` | 0644 | factory; id, kind, cloud address, TLS server name |
//! | `label.svg`, `label.txt` | 0600 | factory; the printed label (carries the secret) |
//! | `state.json` | 0600 | agent; relay, access list, replay counters, pairing gate |
//! | `energy-a.bin`, `energy-b.bin` | 0600 | agent (energy plugs); the energy history, two alternating checksummed images |
//! | `agent.lock` | 0600 | agent; held while an agent uses the directory |

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use hearth_proto::acl::{AccessList, ReplayState};
use hearth_proto::capability::DeviceKind;
use hearth_proto::ids::DeviceId;
use hearth_proto::pairing::{PairingGate, SetupSecret};
use p256::ecdsa::SigningKey;
use p256::pkcs8::DecodePrivateKey;
use serde::{Deserialize, Serialize};

use crate::error::{corrupt, io_err, Error};

/// The device's private key.
pub const KEY_FILE: &str = "device.key";
/// The device certificate.
pub const CERT_FILE: &str = "device.pem";
/// The cloud CA the device trusts.
pub const CLOUD_CA_FILE: &str = "cloud-ca.pem";
/// The setup secret (typed code form).
pub const SECRET_FILE: &str = "setup-secret";
/// The factory configuration.
pub const CONFIG_FILE: &str = "config.json";
/// The mutable state.
pub const STATE_FILE: &str = "state.json";
/// The label's QR code.
pub const LABEL_SVG: &str = "label.svg";
/// The label's text (typed code).
pub const LABEL_TXT: &str = "label.txt";
const LOCK_FILE: &str = "agent.lock";

/// Version of the `state.json` format.
pub const STATE_FORMAT: u32 = 1;

/// What the factory decided for this device; fixed for its life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// The device id (also the CN of its certificate).
    pub device: DeviceId,
    /// What the device is.
    pub kind: DeviceKind,
    /// The cloud's device port, `host:port`.
    pub cloud_addr: String,
    /// The name the cloud's certificate must carry.
    pub server_name: String,
}

/// Everything the agent must remember across restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PersistentState {
    /// Format version, [`STATE_FORMAT`].
    pub format: u32,
    /// Relay on (true) or off. Local state: the device keeps it without a cloud.
    pub relay: bool,
    /// Who may control the device.
    pub access: AccessList,
    /// The highest command counter accepted per controller.
    pub replay: ReplayState,
    /// Setup mode and failed pairing attempts.
    pub gate: PairingGate,
    /// The sequence number of the last state report sent.
    pub seq: u64,
    /// When the relay must switch itself off (unix seconds): set when a
    /// controller with an on-time limit switched it on (ADR 0006 scopes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub off_at: Option<u64>,
    /// Rules, scheduler and safety-interlock state (issue 5). Absent in
    /// files written before the device had rules: the defaults apply.
    #[serde(default)]
    pub rules: crate::rules::RulesState,
    /// The owner's firmware update policy and approval (issue 4). Absent in
    /// files written before the device had an update client.
    #[serde(default)]
    pub update: crate::update::UpdatePrefs,
    /// A dimmer's brightness in percent (1–100), kept while it is off so
    /// it comes back at the same level. Absent in older files: full.
    #[serde(default = "full_brightness")]
    pub brightness: u8,
}

fn full_brightness() -> u8 {
    100
}

impl PersistentState {
    /// A factory-fresh device: relay off, nobody paired, in setup mode.
    pub fn factory() -> Self {
        Self {
            format: STATE_FORMAT,
            relay: false,
            access: AccessList::default(),
            replay: ReplayState::default(),
            gate: PairingGate::setup(),
            seq: 0,
            off_at: None,
            rules: crate::rules::RulesState::default(),
            update: crate::update::UpdatePrefs::default(),
            brightness: full_brightness(),
        }
    }
}

/// Where the device core persists its state. The core calls [`StateStore::save`]
/// and only reports an effect after it returned `Ok`.
pub trait StateStore {
    /// Durably stores `state`, replacing the previous one.
    fn save(&mut self, state: &PersistentState) -> Result<(), Error>;

    /// The newest valid energy-history image and its generation (energy
    /// meters, issue 5); `None` when there is none. A store without energy
    /// files has none.
    fn load_energy(&self) -> Option<(hearth_rules::energy::History, u64)> {
        None
    }

    /// Durably writes energy-history image `generation` (the A/B copy
    /// [`crate::energy::image_file`] names). A store without energy files
    /// keeps nothing.
    fn save_energy(&mut self, image: &[u8], generation: u64) -> Result<(), Error> {
        let _ = (image, generation);
        Ok(())
    }
}

/// `state.json` in a state directory.
#[derive(Debug, Clone)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    /// The state file of a state directory.
    pub fn in_dir(dir: &Path) -> Self {
        Self { path: dir.join(STATE_FILE) }
    }

    /// Reads the state. A missing or unreadable file is an error: silently
    /// starting fresh would drop the access list and reopen pairing.
    pub fn load(&self) -> Result<PersistentState, Error> {
        let bytes = fs::read(&self.path).map_err(|e| io_err(&self.path, e))?;
        let state: PersistentState = serde_json::from_slice(&bytes).map_err(|e| corrupt(&self.path, e))?;
        if state.format != STATE_FORMAT {
            return Err(corrupt(&self.path, format!("unknown format {}", state.format)));
        }
        Ok(state)
    }
}

impl StateStore for StateFile {
    fn save(&mut self, state: &PersistentState) -> Result<(), Error> {
        let json = serde_json::to_vec_pretty(state)
            .map_err(|e| Error::InvalidInput { what: "state", reason: e.to_string() })?;
        write_atomic(&self.path, &json, 0o600)
    }

    fn load_energy(&self) -> Option<(hearth_rules::energy::History, u64)> {
        let dir = parent(&self.path);
        // Read at most one image's worth: a planted huge file is not loaded.
        let read = |name: &str| -> Option<Vec<u8>> {
            use std::io::Read;
            let mut bytes = Vec::new();
            let f = File::open(dir.join(name)).ok()?;
            f.take(hearth_rules::energy::HISTORY_BYTES as u64 + 1).read_to_end(&mut bytes).ok()?;
            Some(bytes)
        };
        let [a, b] = crate::energy::IMAGE_FILES.map(read);
        crate::energy::pick_latest(a.as_deref(), b.as_deref())
    }

    fn save_energy(&mut self, image: &[u8], generation: u64) -> Result<(), Error> {
        // Overwritten in place, not renamed: the other copy is the fallback
        // if this write is torn (ADR 0005, "Energy").
        let path = parent(&self.path).join(crate::energy::image_file(generation));
        let mut opts = OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        open_mode(&mut opts, 0o600);
        let mut f = opts.open(&path).map_err(|e| io_err(&path, e))?;
        f.write_all(image).and_then(|()| f.sync_all()).map_err(|e| io_err(&path, e))
    }
}

fn open_mode(opts: &mut OpenOptions, mode: u32) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
}

fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}

fn write_temp(path: &Path, contents: &[u8], mode: u32) -> Result<PathBuf, Error> {
    let tmp = temp_path(path);
    let mut opts = OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    open_mode(&mut opts, mode);
    let mut f = opts.open(&tmp).map_err(|e| io_err(&tmp, e))?;
    // `mode` only applies to newly created files; a leftover temp file from a
    // crash keeps its old mode, so set it explicitly.
    set_mode(&tmp, mode)?;
    f.write_all(contents).and_then(|()| f.sync_all()).map_err(|e| io_err(&tmp, e))?;
    Ok(tmp)
}

fn set_mode(path: &Path, mode: u32) -> Result<(), Error> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(|e| io_err(path, e))?;
    }
    #[cfg(not(unix))]
    let _ = (path, mode);
    Ok(())
}

/// Syncs a directory so a rename inside it survives a power cut.
fn sync_dir(dir: &Path) -> Result<(), Error> {
    #[cfg(unix)]
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_err(dir, e))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Writes a file atomically: temp file, fsync, rename over the target,
/// fsync the directory. A crash leaves the old or the new file, never a mix.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), Error> {
    let tmp = write_temp(path, contents, mode)?;
    fs::rename(&tmp, path).map_err(|e| io_err(path, e))?;
    sync_dir(parent(path))
}

/// Like [`write_atomic`] but fails if `path` exists: the file is linked into
/// place, which (unlike rename) never replaces an existing file.
pub fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), Error> {
    let tmp = write_temp(path, contents, mode)?;
    let linked = fs::hard_link(&tmp, path);
    // The temp name is only a staging area either way.
    let _ = fs::remove_file(&tmp);
    linked.map_err(|e| io_err(path, e))?;
    sync_dir(parent(path))
}

/// Reads a whole text file of the identity, naming it when it is missing.
fn read_identity_file(dir: &Path, file: &'static str) -> Result<String, Error> {
    let path = dir.join(file);
    match fs::read_to_string(&path) {
        Ok(text) => Ok(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(Error::NotProvisioned { dir: dir.to_path_buf(), file })
        }
        Err(e) => Err(io_err(&path, e)),
    }
}

/// Reads `config.json`.
pub fn load_config(dir: &Path) -> Result<DeviceConfig, Error> {
    let text = read_identity_file(dir, CONFIG_FILE)?;
    serde_json::from_str(&text).map_err(|e| corrupt(&dir.join(CONFIG_FILE), e))
}

/// The device's identity and trust anchors, loaded from a state directory.
pub struct Identity {
    /// The factory configuration.
    pub config: DeviceConfig,
    /// The device's signing key (also its TLS key).
    pub key: SigningKey,
    /// The same key as PKCS#8 PEM, for the TLS client configuration.
    pub key_pem: String,
    /// The device certificate, PEM.
    pub cert_pem: String,
    /// The cloud CA, PEM.
    pub cloud_ca_pem: String,
    /// The setup secret.
    pub secret: SetupSecret,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key and the secret are never printed.
        f.debug_struct("Identity").field("config", &self.config).finish_non_exhaustive()
    }
}

impl Identity {
    /// Loads every identity file of a provisioned device.
    pub fn load(dir: &Path) -> Result<Self, Error> {
        let config = load_config(dir)?;
        let key_path = dir.join(KEY_FILE);
        let key_pem = read_identity_file(dir, KEY_FILE)?;
        warn_if_exposed(&key_path);
        let key = SigningKey::from_pkcs8_pem(&key_pem).map_err(|e| corrupt(&key_path, e))?;
        let cert_pem = read_identity_file(dir, CERT_FILE)?;
        let (cert_device, cert_key) = hearth_pki::certs_from_pem(&cert_pem)
            .and_then(|certs| match certs.first() {
                Some(leaf) => hearth_pki::device_identity(leaf),
                None => Err(hearth_pki::Error::NotADevice("no certificate in the file".into())),
            })
            .map_err(|e| corrupt(&dir.join(CERT_FILE), e))?;
        if cert_device != config.device || cert_key != hearth_proto::keys::PublicKey::from(&key) {
            return Err(corrupt(&dir.join(CERT_FILE), "the certificate does not match the device id and key"));
        }
        let cloud_ca_pem = read_identity_file(dir, CLOUD_CA_FILE)?;
        hearth_pki::certs_from_pem(&cloud_ca_pem).map_err(|e| corrupt(&dir.join(CLOUD_CA_FILE), e))?;
        let secret_path = dir.join(SECRET_FILE);
        let secret = SetupSecret::from_code(read_identity_file(dir, SECRET_FILE)?.trim())
            .map_err(|e| corrupt(&secret_path, e))?;
        Ok(Self { config, key, key_pem, cert_pem, cloud_ca_pem, secret })
    }
}

fn warn_if_exposed(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = fs::metadata(path) {
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(path = %path.display(), "the device key is readable by other users; it should be mode 0600");
            }
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

/// An exclusive claim on a state directory, released on drop. Two agents
/// on one directory would each persist their own view and undo the other's
/// replay counters.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Takes the lock or fails at once with [`Error::Locked`].
    pub fn acquire(dir: &Path) -> Result<Self, Error> {
        let path = dir.join(LOCK_FILE);
        let mut opts = OpenOptions::new();
        opts.write(true).create(true).truncate(false);
        open_mode(&mut opts, 0o600);
        let file = opts.open(&path).map_err(|e| io_err(&path, e))?;
        // A lock released a moment ago can still be held for a few
        // milliseconds by a process being forked elsewhere (the child keeps a
        // copy of the descriptor until it execs), so retry briefly before
        // calling the directory busy.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(Self { _file: file }),
                Err(fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(fs::TryLockError::WouldBlock) => return Err(Error::Locked { dir: dir.to_path_buf() }),
                Err(fs::TryLockError::Error(e)) => return Err(io_err(&path, e)),
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_unknown_fields_are_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = StateFile::in_dir(dir.path());
        let mut state = PersistentState::factory();
        state.relay = true;
        state.seq = 9;
        file.save(&state).unwrap();
        assert_eq!(file.load().unwrap(), state);
        assert!(!dir.path().join("state.json.tmp").exists());

        let mut json: serde_json::Value = serde_json::from_slice(&fs::read(dir.path().join(STATE_FILE)).unwrap()).unwrap();
        json["surprise"] = serde_json::Value::Bool(true);
        fs::write(dir.path().join(STATE_FILE), serde_json::to_vec(&json).unwrap()).unwrap();
        assert!(matches!(file.load(), Err(Error::Corrupt { .. })));

        fs::write(dir.path().join(STATE_FILE), b"{\"format\":1,\"relay\":tr").unwrap();
        let err = file.load().unwrap_err();
        assert!(matches!(err, Error::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("state.json"), "{err}");
    }

    #[test]
    fn write_new_never_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        write_new(&p, b"one", 0o600).unwrap();
        assert!(write_new(&p, b"two", 0o600).is_err());
        assert_eq!(fs::read(&p).unwrap(), b"one");
        assert!(!dir.path().join("k.tmp").exists());
    }

    #[test]
    fn second_lock_on_a_directory_is_refused_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(dir.path()).unwrap();
        assert!(matches!(DirLock::acquire(dir.path()), Err(Error::Locked { .. })));
        drop(first);
        DirLock::acquire(dir.path()).unwrap();
    }
}
