//! The controller's local state: its key pair, the cloud it talks to, its
//! session and the device keys it learned by pairing.
//!
//! Everything lives in one directory (`--config-dir`, `$HEARTH_CONFIG_DIR`,
//! or `$XDG_CONFIG_HOME/hearth`), with mode 0700 for the directory and 0600
//! for the files, because the key signs commands and the token opens the
//! account.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use hearth_proto::ids::DeviceId;
use hearth_proto::keys::PublicKey;
use p256::ecdsa::SigningKey;
use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};
use serde::{Deserialize, Serialize};

const KEY_FILE: &str = "controller.key";
const CONFIG_FILE: &str = "config.json";

/// A device this controller knows the key of (learned, authenticated, at pairing).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KnownDevice {
    /// The name given at pairing.
    pub name: String,
    /// The device's public key.
    pub key: PublicKey,
}

/// The saved settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Base URL of the cloud API, e.g. `https://127.0.0.1:8443`.
    pub cloud: Option<String>,
    /// The cloud CA certificate (PEM) this controller trusts — and nothing else.
    pub cloud_ca_pem: Option<String>,
    /// The manufacturer CA (PEM), to check device certificates handed out by the cloud.
    #[serde(default)]
    pub manufacturer_ca_pem: Option<String>,
    /// The account email.
    pub email: Option<String>,
    /// The session token.
    pub token: Option<String>,
    /// The last command counter used (replay protection needs it to grow).
    #[serde(default)]
    pub counter: u64,
    /// Devices paired by this controller.
    #[serde(default)]
    pub devices: BTreeMap<DeviceId, KnownDevice>,
}

/// The controller's directory.
pub struct Config {
    dir: PathBuf,
    /// The loaded settings.
    pub settings: Settings,
}

impl Config {
    /// The default directory.
    pub fn default_dir() -> Result<PathBuf> {
        if let Some(x) = std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
            return Ok(PathBuf::from(x).join("hearth"));
        }
        let home = std::env::var_os("HOME").context("neither $HOME nor $XDG_CONFIG_HOME is set; pass --config-dir")?;
        Ok(PathBuf::from(home).join(".config").join("hearth"))
    }

    /// Opens (creating if needed) the directory and loads the settings.
    pub fn load(dir: &Path) -> Result<Self> {
        create_private_dir(dir)?;
        let path = dir.join(CONFIG_FILE);
        let settings = match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is corrupt; fix or remove it", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Settings::default(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(Self { dir: dir.to_owned(), settings })
    }

    /// The controller directory (key, session, groups).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Saves the settings atomically.
    pub fn save(&self) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(&self.settings)?;
        Ok(hearth_pki::write_file(&self.dir.join(CONFIG_FILE), &bytes, true)?)
    }

    /// The controller key, generated on first use.
    pub fn key(&self) -> Result<SigningKey> {
        let path = self.dir.join(KEY_FILE);
        match fs::read_to_string(&path) {
            Ok(pem) => SigningKey::from_pkcs8_pem(&pem)
                .map_err(|e| anyhow::anyhow!("{}: not a P-256 PKCS#8 key: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = hearth_proto::keys::generate();
                let pem = key.to_pkcs8_pem(LineEnding::LF).map_err(|e| anyhow::anyhow!("encoding key: {e}"))?;
                hearth_pki::write_file(&path, pem.as_bytes(), true)?;
                Ok(key)
            }
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// The next command counter, saved before it is used so a crash can
    /// never make this controller reuse one (ADR 0001).
    pub fn next_counter(&mut self) -> Result<u64> {
        let now_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        self.settings.counter = now_us.max(self.settings.counter + 1);
        self.save()?;
        Ok(self.settings.counter)
    }

    /// The cloud URL and CA, or an error telling the user to log in.
    pub fn cloud(&self) -> Result<(&str, &str)> {
        match (&self.settings.cloud, &self.settings.cloud_ca_pem) {
            (Some(url), Some(ca)) => Ok((url, ca)),
            _ => bail!("no cloud configured; run `hearth signup` or `hearth login` with --cloud and --ca first"),
        }
    }

    /// The session token, or an error telling the user to log in.
    pub fn token(&self) -> Result<&str> {
        self.settings.token.as_deref().context("not logged in; run `hearth login`")
    }
}

fn create_private_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))
    }
    #[cfg(not(unix))]
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}
