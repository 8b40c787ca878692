//! `hearth fw …`: the firmware update repository (TUF 1.0, see
//! docs/adr/0004-firmware-updates.md), and a device's update status and
//! policy (`status`, `policy`, `check`, `approve`: signed commands and the
//! device's signed, sealed answer). The verification and the metadata live
//! in `hearth-tuf`; this is the command-line glue.
//!
//! Root and targets keys are meant to stay offline (pass several
//! `--root-key`/`--targets-key` files, or co-sign later with `hearth fw
//! sign`); snapshot and timestamp keys are online and used by the cloud
//! (`hearth fw publish`, `hearth fw publish-timestamp`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::Subcommand;
use hearth_proto::message::{Command, FirmwareStatus, Outcome, UpdateMode, UpdatePhase, UpdatePolicy, UpdateWindow};
use hearth_tuf::crypto::{KeyKind, SigningKey};
use hearth_tuf::repo::{self, RepoDir, RoleSpec};

/// Firmware repository commands.
#[derive(Subcommand)]
pub enum FwCmd {
    /// Generate a signing key (PKCS#8 PEM, mode 0600) and print its key id.
    Keygen {
        /// Where to write the private key.
        #[arg(long)]
        out: PathBuf,
        /// ECDSA P-256 instead of ed25519.
        #[arg(long)]
        ecdsa: bool,
    },
    /// Create a repository (consistent snapshots) with the given keys and thresholds.
    Init {
        /// Repository directory (served as static files).
        #[arg(long)]
        repo: PathBuf,
        /// Root key files (all sign root v1).
        #[arg(long = "root-key", required = true)]
        root_keys: Vec<PathBuf>,
        /// Root signatures needed.
        #[arg(long, default_value_t = 1)]
        root_threshold: u64,
        /// Targets key files (all sign targets v1).
        #[arg(long = "targets-key", required = true)]
        targets_keys: Vec<PathBuf>,
        /// Targets signatures needed.
        #[arg(long, default_value_t = 1)]
        targets_threshold: u64,
        /// Online snapshot key file.
        #[arg(long)]
        snapshot_key: PathBuf,
        /// Online timestamp key file.
        #[arg(long)]
        timestamp_key: PathBuf,
    },
    /// Add a firmware image as a target (writes targets N+1 signed by the given keys).
    AddTarget {
        /// Repository directory.
        #[arg(long)]
        repo: PathBuf,
        /// The image file.
        #[arg(long)]
        file: PathBuf,
        /// Target path, e.g. `plug-a1/hearth-2.0.0.bin`.
        #[arg(long)]
        name: String,
        /// Firmware version (custom metadata; `--version` is taken by clap).
        #[arg(long = "fw-version")]
        fw_version: String,
        /// Hardware model the image is for (custom metadata).
        #[arg(long)]
        hardware_model: String,
        /// Staged rollout: only this percentage of devices (a stable hash of
        /// each device id), signed with the target so the cloud cannot widen it.
        #[arg(long)]
        rollout_percent: Option<u8>,
        /// Staged rollout: these device ids (repeatable), alone or with a percentage.
        #[arg(long = "rollout-device")]
        rollout_devices: Vec<String>,
        /// Targets key files.
        #[arg(long = "targets-key", required = true)]
        targets_keys: Vec<PathBuf>,
    },
    /// Co-sign the latest metadata of a role (offline threshold signing).
    Sign {
        /// Repository directory.
        #[arg(long)]
        repo: PathBuf,
        /// root, targets, snapshot or timestamp.
        #[arg(long)]
        role: String,
        /// Key files.
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
    },
    /// Online: new snapshot for the current targets, and a new timestamp.
    Publish {
        /// Repository directory.
        #[arg(long)]
        repo: PathBuf,
        /// Snapshot key file.
        #[arg(long)]
        snapshot_key: PathBuf,
        /// Timestamp key file.
        #[arg(long)]
        timestamp_key: PathBuf,
    },
    /// Online: renew the timestamp (run well before it expires).
    PublishTimestamp {
        /// Repository directory.
        #[arg(long)]
        repo: PathBuf,
        /// Timestamp key file.
        #[arg(long)]
        timestamp_key: PathBuf,
    },
    /// Rotate the keys of a role (root included): writes root N+1.
    Rotate {
        /// Repository directory.
        #[arg(long)]
        repo: PathBuf,
        /// root, targets, snapshot or timestamp.
        #[arg(long)]
        role: String,
        /// The role's new key files.
        #[arg(long = "new-key", required = true)]
        new_keys: Vec<PathBuf>,
        /// The role's new threshold.
        #[arg(long, default_value_t = 1)]
        threshold: u64,
        /// Root key files signing the new root: a threshold of the current
        /// root keys, and for a root rotation also of the new ones.
        #[arg(long = "root-key", required = true)]
        root_keys: Vec<PathBuf>,
    },
    /// A device's firmware: version, slot, policy, progress, last result (signed by the device).
    Status {
        /// Device name or id.
        device: String,
        /// Keep printing progress until the update is done (or N seconds pass).
        #[arg(long, value_name = "SECONDS")]
        follow: Option<u64>,
    },
    /// Set a device's update policy (owners and admins).
    Policy {
        /// Device name or id.
        device: String,
        /// automatic or approval.
        mode: String,
        /// Automatic installs only in this daily UTC window, HH:MM-HH:MM.
        #[arg(long)]
        window: Option<String>,
    },
    /// Ask a device to check for firmware now (owners and admins).
    Check {
        /// Device name or id.
        device: String,
    },
    /// Approve a firmware version a device offers (approval policy).
    Approve {
        /// Device name or id.
        device: String,
        /// The offered version.
        #[arg(value_name = "VERSION")]
        fw_version: String,
    },
}

/// Whether the command talks to a device (needs a controller config).
pub fn is_device_command(cmd: &FwCmd) -> bool {
    matches!(cmd, FwCmd::Status { .. } | FwCmd::Policy { .. } | FwCmd::Check { .. } | FwCmd::Approve { .. })
}

fn parse_hhmm(t: &str) -> Result<u16> {
    let (h, m) = t.split_once(':').with_context(|| format!("{t:?}: expected HH:MM"))?;
    let (h, m): (u16, u16) = (h.parse()?, m.parse()?);
    if h > 23 || m > 59 {
        bail!("{t:?} is not a time of day");
    }
    Ok(h * 60 + m)
}

/// Parses `HH:MM-HH:MM` (UTC) into a window.
pub fn parse_window(text: &str) -> Result<UpdateWindow> {
    let (a, b) = text.split_once('-').with_context(|| format!("{text:?}: expected HH:MM-HH:MM"))?;
    let w = UpdateWindow { start_min: parse_hhmm(a.trim())?, end_min: parse_hhmm(b.trim())? };
    if !w.is_valid() {
        bail!("{text:?}: the window is empty");
    }
    Ok(w)
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

/// One status as lines a person reads.
pub fn describe(s: &FirmwareStatus) -> String {
    let mut out = format!("firmware {}", s.version);
    if let Some(slot) = &s.slot {
        out.push_str(&format!(" (slot {slot})"));
    }
    let mode = match s.policy.mode {
        UpdateMode::Automatic => "automatic",
        UpdateMode::Approval => "approval",
    };
    out.push_str(&format!(", updates: {mode}"));
    if let Some(w) = s.policy.window {
        out.push_str(&format!(" {:02}:{:02}-{:02}:{:02} UTC", w.start_min / 60, w.start_min % 60, w.end_min / 60, w.end_min % 60));
    }
    let offered = s.offered.as_deref().unwrap_or("?");
    let phase = match s.phase {
        UpdatePhase::Idle => "idle".to_owned(),
        UpdatePhase::Checking => "checking the repository".to_owned(),
        UpdatePhase::AwaitingApproval => format!("{offered} available: approve with `hearth fw approve <device> {offered}`"),
        UpdatePhase::Downloading => format!("downloading {offered}"),
        UpdatePhase::Installing => format!("installing {offered} into the inactive slot"),
        UpdatePhase::Restarting => format!("restarting into {offered} (trial)"),
    };
    out.push_str(&format!("\n  update: {phase}"));
    if let Some(p) = s.progress.filter(|_| matches!(s.phase, UpdatePhase::Downloading | UpdatePhase::Installing)) {
        let pct = (p.done * 100).checked_div(p.total).unwrap_or(100);
        out.push_str(&format!(" {pct}% ({} of {})", mib(p.done), mib(p.total)));
    }
    if let Some(c) = &s.last_check {
        out.push_str(&format!("\n  last check: {c}"));
    }
    if let Some(r) = &s.last_result {
        out.push_str(&format!("\n  last install: {r}"));
    }
    out
}

/// Runs a device-side `hearth fw` command with the controller's config.
///
/// # Errors
/// No session, an unknown device, or a failed request.
pub async fn run_device(cmd: FwCmd, cfg: &mut hearth::config::Config) -> Result<u8> {
    use hearth::controller::{device_key, list, resolve, send, EXIT_REFUSED};
    let wanted = match &cmd {
        FwCmd::Status { device, .. } | FwCmd::Policy { device, .. } | FwCmd::Check { device } | FwCmd::Approve { device, .. } => device.clone(),
        _ => bail!("not a device command"),
    };
    let devices = list(cfg).await?;
    let dev = resolve(&devices, &wanted)?.clone();
    let (key, _) = device_key(cfg, &dev).ok_or_else(|| anyhow!("cannot check {}'s answer: this controller did not pair it and has no manufacturer CA", dev.name))?;
    let command = match cmd {
        FwCmd::Status { follow: None, .. } => Command::GetState,
        FwCmd::Status { follow: Some(secs), .. } => return follow(cfg, &dev, &key, secs).await,
        FwCmd::Policy { mode, window, .. } => {
            let mode = match mode.as_str() {
                "automatic" | "auto" => UpdateMode::Automatic,
                "approval" => UpdateMode::Approval,
                other => bail!("unknown policy {other:?}: automatic or approval"),
            };
            Command::SetUpdatePolicy { policy: UpdatePolicy { mode, window: window.as_deref().map(parse_window).transpose()? } }
        }
        FwCmd::Check { .. } => Command::CheckUpdate,
        FwCmd::Approve { fw_version, .. } => Command::ApproveUpdate { version: fw_version },
        _ => bail!("not a device command"),
    };
    let (r, _) = send(cfg, &dev.id, &key, command).await?;
    if let Outcome::Refused { reason } = r.outcome {
        eprintln!("{} refused: {reason}", dev.name);
        return Ok(EXIT_REFUSED);
    }
    match &r.state.firmware {
        Some(f) => println!("{}: {} (signed by the device)", dev.name, describe(f)),
        None => println!("{}: no firmware update client on this device", dev.name),
    }
    Ok(0)
}

/// `hearth fw status --follow`: prints each change until the device is
/// idle again (or waits for approval), across the restart into the trial.
async fn follow(cfg: &mut hearth::config::Config, dev: &hearth::controller::ListedDevice, key: &hearth_proto::keys::PublicKey, secs: u64) -> Result<u8> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    let mut last = String::new();
    let mut busy = false;
    while std::time::Instant::now() < deadline {
        // While the device restarts it is offline: keep asking.
        if let Ok((r, _)) = hearth::controller::send(cfg, &dev.id, key, Command::GetState).await {
            if let Some(f) = &r.state.firmware {
                let text = describe(f);
                if text != last {
                    println!("{}: {text}", dev.name);
                    last = text;
                }
                let settled = matches!(f.phase, UpdatePhase::Idle | UpdatePhase::AwaitingApproval);
                if settled && busy {
                    return Ok(0);
                }
                busy |= !settled;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    Ok(0)
}

fn load_key(path: &Path) -> Result<SigningKey> {
    let pem = std::fs::read_to_string(path).with_context(|| format!("reading key {}", path.display()))?;
    SigningKey::from_pem(&pem).with_context(|| format!("key {}", path.display()))
}

fn load_keys(paths: &[PathBuf]) -> Result<Vec<SigningKey>> {
    paths.iter().map(|p| load_key(p)).collect()
}

fn spec(keys: &[SigningKey], threshold: u64) -> RoleSpec {
    RoleSpec { keys: keys.iter().map(|k| k.public().clone()).collect(), threshold }
}

fn write_private(path: &Path, pem: &str) -> Result<()> {
    use std::io::Write as _;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path).with_context(|| format!("creating {} (it must not exist yet)", path.display()))?;
    f.write_all(pem.as_bytes())?;
    Ok(())
}

/// Runs one `hearth fw` command.
///
/// # Errors
/// Bad key files, a malformed repository, or I/O failures.
pub fn run(cmd: FwCmd) -> Result<()> {
    let now = hearth_tuf::time::now();
    match cmd {
        FwCmd::Keygen { out, ecdsa } => {
            let key = SigningKey::generate(if ecdsa { KeyKind::EcdsaP256 } else { KeyKind::Ed25519 })?;
            write_private(&out, &key.to_pem())?;
            println!("{}", key.public().key_id());
        }
        FwCmd::Init { repo, root_keys, root_threshold, targets_keys, targets_threshold, snapshot_key, timestamp_key } => {
            let (root_keys, targets_keys) = (load_keys(&root_keys)?, load_keys(&targets_keys)?);
            let (snapshot, timestamp) = (load_key(&snapshot_key)?, load_key(&timestamp_key)?);
            let roles: BTreeMap<String, RoleSpec> = [
                ("root".to_owned(), spec(&root_keys, root_threshold)),
                ("targets".to_owned(), spec(&targets_keys, targets_threshold)),
                ("snapshot".to_owned(), spec(std::slice::from_ref(&snapshot), 1)),
                ("timestamp".to_owned(), spec(std::slice::from_ref(&timestamp), 1)),
            ]
            .into();
            let r: Vec<&SigningKey> = root_keys.iter().collect();
            let t: Vec<&SigningKey> = targets_keys.iter().collect();
            let repo_dir = RepoDir::init(&repo, &roles, &r, &t, &snapshot, &timestamp, now)?;
            println!("Created a firmware repository in {}; devices ship with {}", repo.display(), repo_dir.metadata_path("root").display());
        }
        FwCmd::AddTarget { repo, file, name, fw_version: version, hardware_model, rollout_percent, rollout_devices, targets_keys } => {
            let image = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let keys = load_keys(&targets_keys)?;
            let k: Vec<&SigningKey> = keys.iter().collect();
            let mut custom = repo::firmware_custom(&version, &hardware_model);
            if rollout_percent.is_some() || !rollout_devices.is_empty() {
                if rollout_percent.is_some_and(|p| p > 100) {
                    bail!("--rollout-percent is 0 to 100");
                }
                let mut r = serde_json::Map::new();
                if let Some(p) = rollout_percent {
                    r.insert("percent".into(), p.into());
                }
                if !rollout_devices.is_empty() {
                    r.insert("devices".into(), rollout_devices.into());
                }
                custom["hearth"]["rollout"] = serde_json::Value::Object(r);
            }
            let v = RepoDir::open(&repo).add_target(&name, &image, Some(custom), &k, now)?;
            println!("targets v{v}: {name} ({} bytes, firmware {version} for {hardware_model}); run `hearth fw publish` to release it", image.len());
        }
        FwCmd::Sign { repo, role, keys } => {
            if !hearth_tuf::metadata::TOP_LEVEL.contains(&role.as_str()) {
                bail!("unknown role {role:?}");
            }
            let keys = load_keys(&keys)?;
            let k: Vec<&SigningKey> = keys.iter().collect();
            RepoDir::open(&repo).sign_role(&role, &k)?;
        }
        FwCmd::Publish { repo, snapshot_key, timestamp_key } => {
            RepoDir::open(&repo).publish(&load_key(&snapshot_key)?, &load_key(&timestamp_key)?, now)?;
        }
        FwCmd::PublishTimestamp { repo, timestamp_key } => {
            RepoDir::open(&repo).renew_timestamp(&load_key(&timestamp_key)?, now)?;
        }
        FwCmd::Rotate { repo, role, new_keys, threshold, root_keys } => {
            if !hearth_tuf::metadata::TOP_LEVEL.contains(&role.as_str()) {
                bail!("unknown role {role:?}");
            }
            let (new, signers) = (load_keys(&new_keys)?, load_keys(&root_keys)?);
            let s: Vec<&SigningKey> = signers.iter().collect();
            let v = RepoDir::open(&repo).rotate(&role, spec(&new, threshold), &s, now)?;
            println!("root v{v}: {role} now held by {} key(s), threshold {threshold}", new.len());
        }
        FwCmd::Status { .. } | FwCmd::Policy { .. } | FwCmd::Check { .. } | FwCmd::Approve { .. } => {
            bail!("device commands run through `run_device`")
        }
    }
    Ok(())
}
