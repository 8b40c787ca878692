//! The factory step: give a device its identity, its trust anchor and its
//! setup label.

use std::fs;
use std::path::{Path, PathBuf};

use hearth_pki::{CertifiedKey, Validity};
use hearth_proto::capability::DeviceKind;
use hearth_proto::ids::DeviceId;
use hearth_proto::keys::{self, PublicKey};
use hearth_proto::pairing::{SetupLabel, SetupSecret};
use p256::pkcs8::{EncodePrivateKey, LineEnding};

use crate::error::{io_err, Error};
use crate::store::{
    self, DeviceConfig, PersistentState, StateFile, StateStore, CERT_FILE, CLOUD_CA_FILE, CONFIG_FILE, KEY_FILE,
    LABEL_SVG, LABEL_TXT, SECRET_FILE, STATE_FILE,
};

/// Device certificates outlive the device (IEEE 802.1AR suggests no expiry
/// at all); 20 years is longer than any plug's service life.
const DEVICE_CERT_DAYS: i64 = 365 * 20;

/// What provisioning produced.
#[derive(Debug, Clone)]
pub struct Provisioned {
    /// The new device's id.
    pub device: DeviceId,
    /// Its setup label (device id and setup secret).
    pub label: SetupLabel,
    /// The label's QR code, SVG.
    pub label_svg: PathBuf,
    /// The label's text with the typed setup code.
    pub label_txt: PathBuf,
}

/// Checks `host:port`.
fn check_cloud_addr(addr: &str) -> Result<(), Error> {
    let bad = |reason: &str| Error::InvalidInput { what: "cloud address", reason: format!("{addr:?}: {reason}") };
    let (host, port) = addr.rsplit_once(':').ok_or_else(|| bad("expected HOST:PORT"))?;
    if host.is_empty() {
        return Err(bad("the host is empty"));
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok(()),
        _ => Err(bad("the port must be 1-65535")),
    }
}

/// Factory step: the device generates its own P-256 key in `state_dir`
/// (PKCS#8 PEM, mode 0600; it never leaves), makes a CSR, the factory
/// signs it with the manufacturer CA, and the device stores its
/// certificate, the cloud CA it must trust, its configuration and a fresh
/// setup secret (0600). Writes the setup label: a QR code (SVG) of
/// [`SetupLabel::qr_payload`] and `label.txt` with the typed code.
///
/// Refuses to overwrite an existing identity. If a step fails, the files
/// it already wrote are removed again so the directory can be reused.
pub fn provision(
    state_dir: &Path,
    manufacturer: &CertifiedKey,
    cloud_ca_pem: &str,
    kind: DeviceKind,
    cloud_addr: &str,
    server_name: &str,
) -> anyhow::Result<Provisioned> {
    check_cloud_addr(cloud_addr)?;
    hearth_pki::server_name(server_name)?;
    hearth_pki::certs_from_pem(cloud_ca_pem)
        .map_err(|e| Error::InvalidInput { what: "cloud CA", reason: e.to_string() })?;
    create_private_dir(state_dir)?;
    for file in [KEY_FILE, CONFIG_FILE, STATE_FILE, CERT_FILE, SECRET_FILE] {
        if state_dir.join(file).exists() {
            return Err(Error::AlreadyProvisioned { dir: state_dir.to_path_buf(), file }.into());
        }
    }
    // The key is written with a no-replace link, so two concurrent factory
    // runs on one directory cannot both succeed.
    let key = keys::generate();
    let key_pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| Error::InvalidInput { what: "device key", reason: e.to_string() })?;
    store::write_new(&state_dir.join(KEY_FILE), key_pem.as_bytes(), 0o600).map_err(|e| match e {
        Error::Io { source, .. } if source.kind() == std::io::ErrorKind::AlreadyExists => {
            Error::AlreadyProvisioned { dir: state_dir.to_path_buf(), file: KEY_FILE }
        }
        other => other,
    })?;
    let device = DeviceId::random();
    let result = finish(state_dir, &device, &key, manufacturer, cloud_ca_pem, kind, cloud_addr, server_name);
    if result.is_err() {
        for file in [CONFIG_FILE, STATE_FILE, LABEL_SVG, LABEL_TXT, SECRET_FILE, CLOUD_CA_FILE, CERT_FILE, KEY_FILE] {
            // Best effort: the original error is what the caller needs to see.
            let _ = fs::remove_file(state_dir.join(file));
        }
    }
    Ok(result?)
}

#[allow(clippy::too_many_arguments)]
fn finish(
    dir: &Path,
    device: &DeviceId,
    key: &p256::ecdsa::SigningKey,
    manufacturer: &CertifiedKey,
    cloud_ca_pem: &str,
    kind: DeviceKind,
    cloud_addr: &str,
    server_name: &str,
) -> Result<Provisioned, Error> {
    let csr = hearth_pki::device_csr(key, device)?;
    let cert_pem = hearth_pki::sign_device_csr(manufacturer, &csr, device, Validity::days(DEVICE_CERT_DAYS))?;
    // The device checks what the factory handed back: a certificate chaining
    // to the manufacturer CA, for its own id and its own key.
    let leaf = hearth_pki::certs_from_pem(&cert_pem)?
        .into_iter()
        .next()
        .ok_or_else(|| Error::InvalidInput { what: "device certificate", reason: "empty".into() })?;
    let (cert_device, cert_key) = hearth_pki::verify_device_cert(&manufacturer.cert_pem, &leaf)?;
    if &cert_device != device || cert_key != PublicKey::from(key) {
        return Err(Error::InvalidInput {
            what: "device certificate",
            reason: "the factory returned a certificate for another id or key".into(),
        });
    }
    store::write_atomic(&dir.join(CERT_FILE), cert_pem.as_bytes(), 0o644)?;
    store::write_atomic(&dir.join(CLOUD_CA_FILE), cloud_ca_pem.as_bytes(), 0o644)?;

    let secret = SetupSecret::random();
    store::write_atomic(&dir.join(SECRET_FILE), format!("{}\n", secret.code()).as_bytes(), 0o600)?;
    StateFile::in_dir(dir).save(&PersistentState::factory())?;

    let label = SetupLabel { device: Some(device.clone()), secret };
    let (label_svg, label_txt) = (dir.join(LABEL_SVG), dir.join(LABEL_TXT));
    let svg = qrcode::QrCode::new(label.qr_payload().as_bytes())
        .map_err(|e| Error::InvalidInput { what: "label", reason: e.to_string() })?
        .render::<qrcode::render::svg::Color<'_>>()
        .min_dimensions(256, 256)
        .build();
    // The label carries the setup secret, so only the owner of the directory may read it.
    store::write_atomic(&label_svg, svg.as_bytes(), 0o600)?;
    // Just the typed code: tools read this file back as the code (see `hearth demo`).
    let text = format!("{}\n", label.secret.code());
    store::write_atomic(&label_txt, text.as_bytes(), 0o600)?;

    // Written last: a directory with a config file is a complete identity.
    let config = DeviceConfig {
        device: device.clone(),
        kind,
        cloud_addr: cloud_addr.to_owned(),
        server_name: server_name.to_owned(),
    };
    let json = serde_json::to_vec_pretty(&config)
        .map_err(|e| Error::InvalidInput { what: "config", reason: e.to_string() })?;
    store::write_atomic(&dir.join(CONFIG_FILE), &json, 0o644)?;
    tracing::info!(%device, kind = kind.as_str(), dir = %dir.display(), "provisioned a device");
    Ok(Provisioned { device: device.clone(), label, label_svg, label_txt })
}

fn create_private_dir(dir: &Path) -> Result<(), Error> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(|e| io_err(dir, e))?;
    // The directory may have existed already (with the umask's mode); it is
    // about to hold the private key, so only its owner may list or enter it.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|e| io_err(dir, e))?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn cloud_addresses_are_checked() {
        for ok in ["localhost:8444", "127.0.0.1:1", "[::1]:8444", "cloud.example:65535"] {
            assert!(check_cloud_addr(ok).is_ok(), "{ok}");
        }
        for bad in ["localhost", ":8444", "host:0", "host:65536", "host:port"] {
            assert!(check_cloud_addr(bad).is_err(), "{bad}");
        }
    }
}
