//! The device's firmware update client (issue 4, ADR 0004 and 0010).
//!
//! A worker thread refreshes TUF metadata from the cloud's repository
//! (`hearth_tuf::client::Updater`: every check of spec section 5), picks the
//! newest target for this hardware model that is newer than the running
//! version and whose signed rollout includes this device, downloads it with
//! the trusted length as the limit, and installs it into the inactive slot
//! (`hearth_updater`). The agent then exits so the supervisor starts the new
//! image on trial; the new agent reports health once it reached the cloud.
//!
//! Trust: the only inputs the worker believes are the `root.json` that
//! shipped with the device (copied in at provisioning, see [`provision`])
//! and metadata chaining to it. The transport is TLS 1.3 trusting only the
//! provisioned cloud CA (`hearth_pki::client_config`), so a network attacker
//! sees nothing (CVE-2013-6950/6951), but the cloud itself is not trusted:
//! it holds only the online timestamp/snapshot keys, and the rollout rules
//! live in target metadata signed by the offline targets key, so the cloud
//! can neither push an image nor widen a staged rollout.
//!
//! The device stores no private key for the repository; the key-scan test
//! (`hearth-updater/tests/it/keyscan.rs`) checks binaries and state.

use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hearth_proto::ids::DeviceId;
use hearth_proto::message::{FirmwareStatus, UpdateMode, UpdatePhase, UpdatePolicy, UpdateProgress};
use hearth_tuf::client::{DirStore, Fetcher, Limits, Updater};
use hearth_tuf::metadata::TargetFile;
use hearth_tuf::FetchError;
use hearth_updater::install::{self, ExpectedImage};
use hearth_updater::state::UpdateResult;
use hearth_updater::Version;
use serde::{Deserialize, Serialize};

/// The update client's settings in the state directory.
pub const CONFIG_FILE: &str = "update.json";
/// Trusted TUF metadata (`root.json` from the factory, then what verified).
pub const METADATA_DIR: &str = "tuf";
/// The last published [`FirmwareStatus`], for `hearth-device show` and tests.
pub const STATUS_FILE: &str = "update-status.json";
/// Where a download lands before it is verified and installed.
const DOWNLOAD_FILE: &str = "update-download.part";
/// The first check after start, so a trial boot reports health first.
const FIRST_CHECK: Duration = Duration::from_secs(2);
/// Progress is reported at most this often (each report is a signed state
/// report whose sequence number is persisted: gentle on flash).
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// Connect, read and write timeout of each repository request.
const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

/// `update.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateConfig {
    /// The repository's base URL, `https://host:port/tuf`: metadata under
    /// `/metadata/`, targets under `/targets/`.
    pub repository_url: String,
    /// This device's hardware model; only targets for it are considered.
    pub hardware_model: String,
    /// Seconds between periodic checks.
    #[serde(default = "default_check_every")]
    pub check_every_secs: u64,
    /// Download and slot-write rate limit in bytes per second (metered
    /// links, slow flash); `None` is unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rate_bytes_per_sec: Option<u64>,
    /// Real hardware: hand the verified image to the system updater (RAUC
    /// or SWUpdate style) instead of the built-in A/B slots. When set, the
    /// agent only stages the verified image (`hearth_updater::handoff::stage`)
    /// and exits; the supervisor re-verifies it and runs *its own*
    /// `--install-command` (ADR 0010). The value here is informational and
    /// never executed: the state directory is agent-writable, and the
    /// sandboxed agent must not choose what runs outside the sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub install_command: Option<Vec<String>>,
}

fn default_check_every() -> u64 {
    6 * 3600
}

impl UpdateConfig {
    /// Reads `update.json`; `Ok(None)` if the device has no update client.
    ///
    /// # Errors
    /// Unreadable or invalid file.
    pub fn load(dir: &Path) -> anyhow::Result<Option<Self>> {
        let path = dir.join(CONFIG_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let config: UpdateConfig = serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))?;
        Url::parse(&config.repository_url)?;
        Ok(Some(config))
    }

    /// The repository's TCP port (the sandbox allows connecting to it).
    pub fn port(&self) -> Option<u16> {
        Url::parse(&self.repository_url).ok().map(|u| u.port)
    }
}

/// The owner's update choices, persisted with the device state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdatePrefs {
    /// Automatic or approval, and the window.
    #[serde(default)]
    pub policy: UpdatePolicy,
    /// The version last approved under the approval policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved: Option<String>,
}

/// What an accepted, signed command asks the update client to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpdateRequest {
    /// Check now.
    Check,
    /// The owner approved this version.
    Approve(String),
    /// The policy changed.
    Policy(UpdatePolicy),
}

/// What the worker tells the agent.
#[derive(Debug, Clone)]
pub enum Notice {
    /// Report this status (signed, sealed).
    Status(FirmwareStatus),
    /// An image is installed and the trial is set up: exit so the
    /// supervisor starts it.
    Restart,
}

/// Factory step: ship the trusted root with the device and configure the
/// client. Optionally also installs `factory` (image, version) into slot A
/// for the supervisor. The root must be a well-formed, self-signed TUF
/// root (spec 5.2); nothing private is copied.
///
/// # Errors
/// Bad root or URL, or I/O failure.
pub fn provision(dir: &Path, root_json: &[u8], config: &UpdateConfig, factory: Option<(&Path, &str)>) -> anyhow::Result<()> {
    hearth_tuf::client::TrustedSet::new(root_json, hearth_tuf::time::now()).context("the firmware repository's root.json")?;
    Url::parse(&config.repository_url)?;
    let meta = dir.join(METADATA_DIR);
    std::fs::create_dir_all(&meta).with_context(|| format!("creating {}", meta.display()))?;
    hearth_tuf::client::write_atomic(&meta.join("root.json"), root_json)?;
    crate::store::write_atomic(&dir.join(CONFIG_FILE), &serde_json::to_vec_pretty(config)?, 0o644)?;
    if let Some((image, version)) = factory {
        install::provision_factory(dir, image, Version::parse(version)?)?;
    }
    Ok(())
}

/// An `https://host[:port]/path` URL, parsed once.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Url {
    host: String,
    port: u16,
    path: String,
}

impl Url {
    fn parse(url: &str) -> anyhow::Result<Url> {
        // Plain http:// is refused: the repository is always reached over
        // TLS (CVE-2013-6950), even though TUF would catch tampering.
        let rest = url.strip_prefix("https://").with_context(|| format!("{url:?}: the repository URL must start with https://"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (h, p.parse::<u16>().with_context(|| format!("{url:?}: bad port"))?),
            _ => (authority, 443),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        anyhow::ensure!(!host.is_empty(), "{url:?}: no host");
        Ok(Url { host: host.to_owned(), port, path: path.to_owned() })
    }
}

/// TUF's [`Fetcher`] over TLS 1.3 to the cloud, trusting only the
/// provisioned CA (the config comes from `hearth_pki::client_config`; no
/// switch disables its checks).
#[derive(Clone)]
pub struct TlsFetcher {
    config: Arc<rustls::ClientConfig>,
    timeout: Duration,
}

impl TlsFetcher {
    /// A fetcher trusting exactly `cloud_ca_pem`.
    ///
    /// # Errors
    /// An unusable CA.
    pub fn new(cloud_ca_pem: &str) -> anyhow::Result<Self> {
        Ok(TlsFetcher { config: Arc::new(hearth_pki::client_config(cloud_ca_pem, None)?), timeout: HTTP_TIMEOUT })
    }
}

fn transport(e: impl std::fmt::Display) -> FetchError {
    FetchError::Transport(e.to_string())
}

impl Fetcher for TlsFetcher {
    fn fetch(&mut self, url: &str, max_len: u64) -> Result<Vec<u8>, FetchError> {
        let mut body = Vec::new();
        self.fetch_to(url, max_len, &mut body)?;
        Ok(body)
    }

    fn fetch_to(&mut self, url: &str, max_len: u64, out: &mut dyn Write) -> Result<u64, FetchError> {
        let u = Url::parse(url).map_err(|e| transport(format!("{e:#}")))?;
        let addrs = std::net::ToSocketAddrs::to_socket_addrs(&(u.host.as_str(), u.port)).map_err(transport)?;
        let mut last = transport(format!("{} has no address", u.host));
        let mut tcp = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, self.timeout) {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) => last = transport(format!("cannot reach {a}: {e}")),
            }
        }
        let tcp = tcp.ok_or(last)?;
        tcp.set_read_timeout(Some(self.timeout)).map_err(transport)?;
        tcp.set_write_timeout(Some(self.timeout)).map_err(transport)?;
        let name = hearth_pki::server_name(&u.host).map_err(transport)?;
        let conn = rustls::ClientConnection::new(Arc::clone(&self.config), name).map_err(transport)?;
        // rustls completes (and verifies) the handshake before the request
        // is written: nothing leaves before the certificate checked out.
        let stream = rustls::StreamOwned::new(conn, tcp);
        let authority = if u.port == 443 { u.host.clone() } else { format!("{}:{}", u.host, u.port) };
        hearth_tuf::http::get(stream, &authority, &u.path, max_len, out)
    }
}

/// Whether the target's signed rollout (`custom.hearth.rollout`) includes
/// this device: `{"devices": [ids]}` lists devices, `{"percent": N}` takes
/// the devices whose stable bucket (sha256 of version and device id, mod
/// 100) is below N. Both may be given (either admits). No rollout: all.
pub fn rollout_includes(rollout: Option<&serde_json::Value>, device: &DeviceId, version: &str) -> bool {
    let Some(r) = rollout else { return true };
    let listed = r.get("devices").and_then(|d| d.as_array()).is_some_and(|ids| ids.iter().any(|i| i.as_str() == Some(&device.to_string())));
    let percent = r.get("percent").and_then(serde_json::Value::as_u64);
    if r.get("devices").is_none() && percent.is_none() {
        // An unknown rollout form is read as "not this device": a newer
        // signer's rule we cannot evaluate must not widen the rollout.
        return false;
    }
    listed || percent.is_some_and(|p| rollout_bucket(device, version) < p)
}

/// The device's stable rollout bucket (0–99) for one version: the same
/// device lands in the same bucket every time, and in different buckets
/// for different releases, so the same devices are not always first.
pub fn rollout_bucket(device: &DeviceId, version: &str) -> u64 {
    use sha2::Digest as _;
    let h = sha2::Sha256::new().chain_update(b"hearth-rollout\0").chain_update(version.as_bytes()).chain_update(b"\0").chain_update(device.to_string().as_bytes()).finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&h[..8]);
    u64::from_be_bytes(first) % 100
}

/// A started update client.
#[derive(Debug)]
pub struct UpdateHandle {
    requests: mpsc::Sender<UpdateRequest>,
}

impl UpdateHandle {
    /// Passes an accepted command on (ignored once the worker stopped).
    pub fn request(&self, r: UpdateRequest) {
        let _ = self.requests.send(r);
    }
}

/// Starts the worker if the state directory has an `update.json`.
///
/// # Errors
/// An invalid `update.json` or trusted root.
pub fn start(
    dir: &Path,
    device: DeviceId,
    cloud_ca_pem: &str,
    prefs: UpdatePrefs,
    notify: impl Fn(Notice) + Send + 'static,
) -> anyhow::Result<Option<UpdateHandle>> {
    let Some(config) = UpdateConfig::load(dir)? else { return Ok(None) };
    let root = std::fs::read(dir.join(METADATA_DIR).join("root.json")).context("the trusted root.json of the update client")?;
    hearth_tuf::client::TrustedSet::new(&root, hearth_tuf::time::now()).context("the trusted root.json of the update client")?;
    let fetcher = TlsFetcher::new(cloud_ca_pem)?;
    let (tx, rx) = mpsc::channel();
    let mut worker = Worker {
        dir: dir.to_path_buf(),
        device,
        config,
        prefs,
        fetcher,
        reporter: Reporter { dir: dir.to_path_buf(), status: FirmwareStatus::default(), notify: Box::new(notify), last: None },
    };
    worker.reporter.status.version = running_version();
    worker.reporter.status.slot = std::env::var("HEARTH_SLOT").ok().filter(|s| !s.is_empty());
    std::thread::Builder::new().name("hearth-update".into()).spawn(move || worker.run(&rx)).context("starting the update thread")?;
    Ok(Some(UpdateHandle { requests: tx }))
}

/// The version of the image that is running: what the supervisor started
/// (from `boot.json`, which records verified target metadata), or the
/// build's own version without a supervisor.
fn running_version() -> String {
    std::env::var("HEARTH_FIRMWARE_VERSION").ok().filter(|v| Version::parse(v).is_ok()).unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_owned())
}

/// The trial-boot health report (ADR 0004, "Trial boot"): called once the
/// agent reached the cloud over verified TLS and saved its state. In a
/// trial it also checks that the update client can still load its trusted
/// root (an image that cannot update itself must not be committed), then
/// creates the supervisor's marker file.
///
/// The marker lives in the state directory the supervisor and the agent
/// share (`hearth_updater::supervisor::health_file`). It is created by its
/// file name inside `dir`: the sandboxed agent works from inside that
/// directory and, having dropped root, may no longer traverse its parents.
pub fn report_healthy(dir: &Path) {
    if std::env::var("HEARTH_TRIAL").as_deref() != Ok("1") {
        return;
    }
    let Some(marker) = std::env::var_os("HEARTH_HEALTH_FILE") else { return };
    let Some(name) = Path::new(&marker).file_name() else { return };
    let marker = dir.join(name);
    if let Ok(Some(_)) = UpdateConfig::load(dir) {
        let root = std::fs::read(dir.join(METADATA_DIR).join("root.json")).unwrap_or_default();
        if let Err(e) = hearth_tuf::client::TrustedSet::new(&root, hearth_tuf::time::now()) {
            tracing::error!(error = %e, "self-test failed: the update client's trusted root does not load; not reporting health");
            return;
        }
    }
    match File::create(&marker) {
        Ok(_) => tracing::info!(version = %running_version(), "trial boot healthy: reached the cloud and passed the self-test"),
        Err(e) => tracing::error!(error = %e, "could not write the health marker"),
    }
}

struct Reporter {
    dir: PathBuf,
    status: FirmwareStatus,
    notify: Box<dyn Fn(Notice) + Send>,
    last: Option<Instant>,
}

impl Reporter {
    fn publish(&mut self) {
        self.last = Some(Instant::now());
        // Best effort: the signed report is what controllers rely on.
        if let Ok(json) = serde_json::to_vec_pretty(&self.status) {
            let _ = crate::store::write_atomic(&self.dir.join(STATUS_FILE), &json, 0o644);
        }
        (self.notify)(Notice::Status(self.status.clone()));
    }

    fn progress(&mut self, done: u64, total: u64) {
        self.status.progress = Some(UpdateProgress { done, total });
        if done == 0 || done == total || self.last.is_none_or(|t| t.elapsed() >= PROGRESS_EVERY) {
            self.publish();
        }
    }
}

/// Counts bytes, reports progress and keeps to the rate limit.
struct Meter<'a, T> {
    inner: T,
    done: u64,
    total: u64,
    rate: Option<u64>,
    started: Instant,
    reporter: &'a mut Reporter,
}

impl<'a, T> Meter<'a, T> {
    fn new(inner: T, total: u64, rate: Option<u64>, reporter: &'a mut Reporter) -> Self {
        reporter.progress(0, total);
        Meter { inner, done: 0, total, rate, started: Instant::now(), reporter }
    }

    fn account(&mut self, n: usize) {
        self.done += n as u64;
        if let Some(rate) = self.rate.filter(|r| *r > 0) {
            let due = Duration::from_secs_f64(self.done as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(self.started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        self.reporter.progress(self.done.min(self.total), self.total);
    }
}

impl<T: Write> Write for Meter<'_, T> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.account(n);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl<T: Read> Read for Meter<'_, T> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.account(n);
        Ok(n)
    }
}

/// Why a check was made.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Trigger {
    Timer,
    Owner,
}

enum Found {
    /// Nothing to install; the message says why.
    Nothing(String),
    /// Waiting for the owner's approval of this version.
    Offer(String),
    /// Installed this version; restart into it.
    Installed(String),
}

struct Worker {
    dir: PathBuf,
    device: DeviceId,
    config: UpdateConfig,
    prefs: UpdatePrefs,
    fetcher: TlsFetcher,
    reporter: Reporter,
}

impl Worker {
    fn run(&mut self, rx: &mpsc::Receiver<UpdateRequest>) {
        self.refresh_boot_result();
        self.reporter.publish();
        let every = Duration::from_secs(self.config.check_every_secs.max(1));
        let mut next = Instant::now() + FIRST_CHECK;
        loop {
            let trigger = match rx.recv_timeout(next.saturating_duration_since(Instant::now())) {
                Ok(UpdateRequest::Policy(p)) => {
                    self.prefs.policy = p;
                    self.reporter.status.policy = self.prefs.policy.clone();
                    self.reporter.publish();
                    continue;
                }
                Ok(UpdateRequest::Approve(v)) => {
                    self.prefs.approved = Some(v);
                    Trigger::Owner
                }
                Ok(UpdateRequest::Check) => Trigger::Owner,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    next = Instant::now() + every;
                    Trigger::Timer
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            };
            if self.check(trigger) {
                (self.reporter.notify)(Notice::Restart);
                return;
            }
        }
    }

    /// Reads the last install's outcome from `boot.json`.
    fn refresh_boot_result(&mut self) {
        let Ok(record) = hearth_updater::store::load_record(&self.dir) else { return };
        self.reporter.status.last_result = record.last_result.as_ref().map(|r| match r {
            UpdateResult::Committed { version, slot } => format!("{version} installed and committed in slot {}", slot.name()),
            UpdateResult::Failed { version, slot, reason } => format!("{version} failed its trial in slot {} and was rolled back: {reason}", slot.name()),
            UpdateResult::HandedOff { version } => format!("{version} verified and handed to the system updater (install command exited 0)"),
            UpdateResult::HandoffFailed { version, reason } => format!("{version} was not handed to the system updater: {reason}"),
        });
    }

    fn last_failed(&self) -> Option<Version> {
        match hearth_updater::store::load_record(&self.dir).ok()?.last_result? {
            UpdateResult::Failed { version, .. } | UpdateResult::HandoffFailed { version, .. } => Some(version),
            UpdateResult::Committed { .. } | UpdateResult::HandedOff { .. } => None,
        }
    }

    fn last_handed_off(&self) -> Option<Version> {
        match hearth_updater::store::load_record(&self.dir).ok()?.last_result? {
            UpdateResult::HandedOff { version } => Some(version),
            _ => None,
        }
    }

    /// One check; returns true when an image was installed.
    fn check(&mut self, trigger: Trigger) -> bool {
        self.refresh_boot_result();
        let s = &mut self.reporter.status;
        s.phase = UpdatePhase::Checking;
        s.progress = None;
        self.reporter.publish();
        let result = self.try_update(trigger);
        let _ = std::fs::remove_file(self.dir.join(DOWNLOAD_FILE));
        let s = &mut self.reporter.status;
        s.checked_at = Some(hearth_tuf::time::now().max(0).unsigned_abs());
        s.progress = None;
        let installed = match result {
            Ok(Found::Nothing(msg)) => {
                tracing::info!("firmware check: {msg}");
                s.phase = UpdatePhase::Idle;
                s.offered = None;
                s.last_check = Some(msg);
                false
            }
            Ok(Found::Offer(v)) => {
                tracing::info!(version = %v, "firmware update verified and waiting for the owner's approval");
                s.phase = UpdatePhase::AwaitingApproval;
                s.last_check = Some(format!("{v} is available and waits for approval"));
                s.offered = Some(v);
                false
            }
            Ok(Found::Installed(v)) => {
                if self.config.install_command.is_some() {
                    tracing::info!(version = %v, "firmware verified and staged for the supervisor's install command; exiting");
                } else {
                    tracing::info!(version = %v, "firmware installed into the inactive slot; restarting into it on trial");
                }
                s.phase = UpdatePhase::Restarting;
                s.last_check = Some(format!("{v} verified and installed; restarting"));
                s.offered = Some(v);
                true
            }
            Err(e) => {
                let msg = format!("update refused: {e:#}");
                tracing::warn!("{msg}");
                s.phase = UpdatePhase::Idle;
                s.offered = None;
                s.last_check = Some(msg);
                false
            }
        };
        self.reporter.publish();
        installed
    }

    fn try_update(&mut self, trigger: Trigger) -> anyhow::Result<Found> {
        let now = hearth_tuf::time::now();
        let base = self.config.repository_url.trim_end_matches('/').to_owned();
        let store = DirStore::new(self.dir.join(METADATA_DIR));
        // Spec 5.1: one update cycle with one fixed time.
        let mut up = Updater::new(self.fetcher.clone(), store, &format!("{base}/metadata/"), now, Limits::default())?;
        self.choose_and_install(&mut up, &base, trigger, now)
    }

    fn choose_and_install(&mut self, up: &mut Updater<TlsFetcher, DirStore>, base: &str, trigger: Trigger, now: i64) -> anyhow::Result<Found> {
        // Spec 5.3–5.6: root chain, timestamp, snapshot, targets, every check.
        up.refresh()?;
        let running = Version::parse(&self.reporter.status.version)?;
        let model = self.config.hardware_model.clone();
        let targets = up.trusted().targets("targets").context("no trusted targets")?.targets.clone();
        let mut newest: Option<Version> = None;
        let mut staged: Option<Version> = None;
        let mut best: Option<(Version, TargetFile)> = None;
        for t in targets.values() {
            let Some(h) = t.custom.as_ref().and_then(|c| c.get("hearth")) else { continue };
            if h.get("hardware_model").and_then(|m| m.as_str()) != Some(model.as_str()) {
                continue;
            }
            let Some(Ok(v)) = h.get("version").and_then(|v| v.as_str()).map(Version::parse) else { continue };
            if newest.as_ref().is_none_or(|n| v > *n) {
                newest = Some(v.clone());
            }
            if v <= running {
                continue;
            }
            if !rollout_includes(h.get("rollout"), &self.device, &v.to_string()) {
                staged = staged.filter(|s| *s > v).or(Some(v));
                continue;
            }
            if best.as_ref().is_none_or(|(b, _)| v > *b) {
                best = Some((v, t.clone()));
            }
        }
        let Some((version, info)) = best else {
            return Ok(Found::Nothing(match (newest, staged) {
                (_, Some(s)) => format!("{s} is in a staged rollout that does not include this device yet; running {running}"),
                (Some(n), None) if n < running => format!("the repository's newest firmware for {model} is {n}, lower than the running {running}: downgrade refused"),
                (Some(_), None) => format!("up to date: running {running}"),
                (None, None) => format!("the repository has no firmware for {model}"),
            }));
        };
        let v = version.to_string();
        // A version whose trial failed is not retried by itself (no boot
        // loop); the owner can ask for it again.
        if trigger == Trigger::Timer && self.last_failed().is_some_and(|f| f == version) {
            return Ok(Found::Nothing(format!("{v} failed its trial before; not retried automatically (check or approve to retry)")));
        }
        // After a hand-off the system updater owns the switch (and the
        // reboot); `boot.json` still names the old version, so do not hand
        // the same version over again by timer.
        if trigger == Trigger::Timer && self.last_handed_off().is_some_and(|h| h == version) {
            return Ok(Found::Nothing(format!("{v} was handed to the system updater; waiting for it to start {v}")));
        }
        match self.prefs.policy.mode {
            UpdateMode::Approval if self.prefs.approved.as_deref() != Some(v.as_str()) => return Ok(Found::Offer(v)),
            UpdateMode::Automatic if trigger == Trigger::Timer && self.prefs.policy.window.is_some_and(|w| !w.contains(now.max(0).unsigned_abs())) => {
                return Ok(Found::Nothing(format!("{v} is available and will be installed in the update window")));
            }
            _ => {}
        }
        // Without the supervisor (no boot.json) there is nowhere to install
        // to and nobody to run an install command (the sandboxed agent cannot,
        // ADR 0010): say so before downloading anything.
        if !hearth_updater::store::record_path(&self.dir).exists() {
            return Ok(Found::Nothing(format!("{v} is available, but this device has no A/B slots to install it into (run it under hearth-device-supervisor)")));
        }
        // 5.7: the target's hardware model is checked again with the
        // length and sha256 the install verifies against.
        let expected = ExpectedImage::from_target(&info, &model)?;
        let part = self.dir.join(DOWNLOAD_FILE);
        let rate = self.config.max_rate_bytes_per_sec;
        {
            let s = &mut self.reporter.status;
            s.phase = UpdatePhase::Downloading;
            s.offered = Some(v.clone());
            let file = File::create(&part).with_context(|| format!("creating {}", part.display()))?;
            let meter = Meter::new(file, info.length, rate, &mut self.reporter);
            // 5.7.2–5.7.3: streamed with the trusted length as the limit,
            // length and hashes checked before the file is used.
            let meter = up.download_target_to(&info, &format!("{base}/targets/"), meter)?;
            meter.inner.sync_all().context("syncing the download")?;
        }
        self.reporter.status.phase = UpdatePhase::Installing;
        let src = File::open(&part).with_context(|| format!("opening {}", part.display()))?;
        let meter = Meter::new(src, info.length, rate, &mut self.reporter);
        match &self.config.install_command {
            // The sandbox forbids starting programs: stage for the
            // supervisor, which runs the hook outside it (ADR 0010).
            Some(_) => hearth_updater::handoff::stage(&self.dir, &running, meter, &expected)?,
            None => {
                install::install_to_inactive(&self.dir, meter, &expected)?;
            }
        }
        Ok(Found::Installed(v))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn urls_must_be_https() {
        assert_eq!(Url::parse("https://localhost:8443/tuf").unwrap(), Url { host: "localhost".into(), port: 8443, path: "/tuf".into() });
        assert_eq!(Url::parse("https://[::1]:9/x/").unwrap(), Url { host: "::1".into(), port: 9, path: "/x/".into() });
        assert_eq!(Url::parse("https://example.com").unwrap().port, 443);
        for bad in ["http://localhost:8443/tuf", "ftp://x", "https://:1/", "https://h:99999/"] {
            assert!(Url::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rollout_is_stable_per_device_and_bounded_by_the_signed_percentage() {
        let ids: Vec<DeviceId> = (0..400).map(|_| DeviceId::random()).collect();
        let pct = |p: u64| serde_json::json!({ "percent": p });
        for id in &ids {
            assert_eq!(rollout_bucket(id, "2.0.0"), rollout_bucket(id, "2.0.0"));
            assert!(rollout_includes(None, id, "2.0.0"));
            assert!(rollout_includes(Some(&pct(100)), id, "2.0.0"));
            assert!(!rollout_includes(Some(&pct(0)), id, "2.0.0"));
        }
        let in25 = ids.iter().filter(|id| rollout_includes(Some(&pct(25)), id, "2.0.0")).count();
        assert!((60..=140).contains(&in25), "25% of 400 devices, got {in25}");
        // Growing the percentage only adds devices.
        for id in &ids {
            if rollout_includes(Some(&pct(10)), id, "2.0.0") {
                assert!(rollout_includes(Some(&pct(50)), id, "2.0.0"));
            }
        }
        let listed = serde_json::json!({ "devices": [ids[0].to_string()] });
        assert!(rollout_includes(Some(&listed), &ids[0], "2.0.0"));
        assert!(!rollout_includes(Some(&listed), &ids[1], "2.0.0"));
        assert!(!rollout_includes(Some(&serde_json::json!({ "group": "beta" })), &ids[0], "2.0.0"), "unknown forms admit nobody");
    }

    /// Serves one HTTPS request with `server`'s certificate, answering `body`.
    fn one_shot_server(server: &hearth_pki::CertifiedKey, body: &'static [u8]) -> (u16, std::thread::JoinHandle<()>) {
        let config = Arc::new(hearth_pki::server_config(server, None, &[]).unwrap());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let t = std::thread::spawn(move || {
            let (tcp, _) = listener.accept().unwrap();
            tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let conn = rustls::ServerConnection::new(config).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            // Read the request head; a client that rejects the certificate
            // never sends one (the handshake fails first).
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match tls.read(&mut buf) {
                    Ok(n) if n > 0 => req.extend_from_slice(&buf[..n]),
                    _ => return,
                }
            }
            let _ = write!(tls, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
            let _ = tls.write_all(body);
            let _ = tls.flush();
        });
        (port, t)
    }

    /// CVE-2013-6951: the update client trusts only the provisioned CA.
    #[test]
    fn the_repository_is_reached_only_over_tls_from_the_provisioned_ca() {
        let days = hearth_pki::Validity::days(1);
        let cloud_ca = hearth_pki::generate_ca("cloud CA", days).unwrap();
        let rogue_ca = hearth_pki::generate_ca("rogue CA", days).unwrap();
        let names = ["127.0.0.1".to_owned()];
        let genuine = hearth_pki::issue_server_cert(&cloud_ca, &names, days).unwrap();
        let rogue = hearth_pki::issue_server_cert(&rogue_ca, &names, days).unwrap();

        let mut fetcher = TlsFetcher::new(&cloud_ca.cert_pem).unwrap();
        let (port, t) = one_shot_server(&genuine, b"metadata");
        assert_eq!(fetcher.fetch(&format!("https://127.0.0.1:{port}/tuf/metadata/timestamp.json"), 100).unwrap(), b"metadata");
        t.join().unwrap();

        let (port, t) = one_shot_server(&rogue, b"forged");
        let err = fetcher.fetch(&format!("https://127.0.0.1:{port}/tuf/metadata/timestamp.json"), 100).unwrap_err();
        assert!(err.to_string().to_lowercase().contains("certificate"), "{err}");
        t.join().unwrap();
    }

    #[test]
    fn window_wraps_midnight() {
        use hearth_proto::message::UpdateWindow;
        let w = UpdateWindow { start_min: 23 * 60, end_min: 2 * 60 };
        assert!(w.is_valid());
        assert!(w.contains(23 * 3600 + 30 * 60));
        assert!(w.contains(86_400 + 3600));
        assert!(!w.contains(3 * 3600));
        assert!(!UpdateWindow { start_min: 5, end_min: 5 }.is_valid());
        assert!(!UpdateWindow { start_min: 1440, end_min: 5 }.is_valid());
    }
}
