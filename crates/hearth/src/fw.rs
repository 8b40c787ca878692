//! `hearth fw …`: the firmware update repository (TUF 1.0, see
//! docs/adr/0004-firmware-updates.md). The verification and the metadata
//! live in `hearth-tuf`; this is the command-line glue.
//!
//! Root and targets keys are meant to stay offline (pass several
//! `--root-key`/`--targets-key` files, or co-sign later with `hearth fw
//! sign`); snapshot and timestamp keys are online and used by the cloud
//! (`hearth fw publish`, `hearth fw publish-timestamp`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
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
        FwCmd::AddTarget { repo, file, name, fw_version: version, hardware_model, targets_keys } => {
            let image = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let keys = load_keys(&targets_keys)?;
            let k: Vec<&SigningKey> = keys.iter().collect();
            let v = RepoDir::open(&repo).add_target(&name, &image, Some(repo::firmware_custom(&version, &hardware_model)), &k, now)?;
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
    }
    Ok(())
}
