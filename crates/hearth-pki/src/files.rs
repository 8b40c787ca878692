//! The on-disk layout of a deployment's PKI directory (`hearth pki init`).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{generate_ca, issue_server_cert, CertifiedKey, Error, Validity};

/// The manufacturer CA certificate (public; the cloud needs it).
pub const MANUFACTURER_CA: &str = "manufacturer-ca.pem";
/// The manufacturer CA key (factory only; keep offline).
pub const MANUFACTURER_CA_KEY: &str = "manufacturer-ca.key";
/// The cloud CA certificate (public; devices and controllers trust it).
pub const CLOUD_CA: &str = "cloud-ca.pem";
/// The cloud CA key (keep offline).
pub const CLOUD_CA_KEY: &str = "cloud-ca.key";
/// The cloud's TLS server certificate.
pub const CLOUD_SERVER_CERT: &str = "cloud-server.pem";
/// The cloud's TLS server key.
pub const CLOUD_SERVER_KEY: &str = "cloud-server.key";

/// A PKI directory.
#[derive(Debug, Clone)]
pub struct PkiDir {
    dir: PathBuf,
}

fn io_err(path: &Path, source: std::io::Error) -> Error {
    Error::Io { path: path.display().to_string(), source }
}

/// Writes a file atomically (temp file, fsync, rename, then fsync of the
/// directory so the rename itself survives a power loss), with mode 0600
/// for secrets. Used for the PKI and for the controller's key and session.
pub fn write_file(path: &Path, contents: &[u8], secret: bool) -> Result<(), Error> {
    let tmp = path.with_extension("tmp");
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if secret { 0o600 } else { 0o644 });
    }
    let mut f = opts.open(&tmp).map_err(|e| io_err(&tmp, e))?;
    f.write_all(contents).and_then(|()| f.sync_all()).map_err(|e| io_err(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| io_err(path, e))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_err(dir, e))
}

impl PkiDir {
    /// Opens an existing PKI directory.
    pub fn open(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Creates both CAs and a cloud server certificate for `names`. Refuses
    /// to overwrite an existing PKI, which would orphan every device.
    pub fn init(dir: impl Into<PathBuf>, names: &[String]) -> Result<Self, Error> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
        let pki = Self { dir };
        if pki.file(MANUFACTURER_CA_KEY).exists() {
            return Err(Error::Io {
                path: pki.file(MANUFACTURER_CA_KEY).display().to_string(),
                source: std::io::Error::new(std::io::ErrorKind::AlreadyExists, "a PKI already exists here"),
            });
        }
        let manufacturer = generate_ca("Hearth manufacturer CA", Validity::days(365 * 25))?;
        let cloud_ca = generate_ca("Hearth cloud CA", Validity::days(365 * 25))?;
        let server = issue_server_cert(&cloud_ca, names, Validity::days(825))?;
        write_file(&pki.file(MANUFACTURER_CA_KEY), manufacturer.key_pem.as_bytes(), true)?;
        write_file(&pki.file(MANUFACTURER_CA), manufacturer.cert_pem.as_bytes(), false)?;
        write_file(&pki.file(CLOUD_CA_KEY), cloud_ca.key_pem.as_bytes(), true)?;
        write_file(&pki.file(CLOUD_CA), cloud_ca.cert_pem.as_bytes(), false)?;
        write_file(&pki.file(CLOUD_SERVER_KEY), server.key_pem.as_bytes(), true)?;
        write_file(&pki.file(CLOUD_SERVER_CERT), server.cert_pem.as_bytes(), false)?;
        Ok(pki)
    }

    /// A file in the directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Reads a file as text.
    pub fn read(&self, name: &str) -> Result<String, Error> {
        let p = self.file(name);
        fs::read_to_string(&p).map_err(|e| io_err(&p, e))
    }

    /// The manufacturer CA with its key (factory use).
    pub fn manufacturer(&self) -> Result<CertifiedKey, Error> {
        Ok(CertifiedKey { cert_pem: self.read(MANUFACTURER_CA)?, key_pem: self.read(MANUFACTURER_CA_KEY)? })
    }

    /// The cloud's server certificate and key.
    pub fn cloud_server(&self) -> Result<CertifiedKey, Error> {
        Ok(CertifiedKey { cert_pem: self.read(CLOUD_SERVER_CERT)?, key_pem: self.read(CLOUD_SERVER_KEY)? })
    }
}
