//! Hearth's public-key infrastructure and TLS settings.
//!
//! Two certificate authorities per deployment:
//!
//! * the **manufacturer CA** signs one certificate per device at the
//!   factory. Its subject CN is the device id; the key inside is the one the
//!   device generated itself. The cloud accepts device links only with a
//!   chain to this CA and takes the device id from the certificate.
//! * the **cloud CA** signs the cloud's TLS server certificate. Devices and
//!   controllers trust this CA alone — never the system roots.
//!
//! Every TLS configuration built here speaks TLS 1.3 only, uses the ring
//! provider, and has no switch to turn verification off.
#![forbid(unsafe_code)]

mod files;

use std::sync::Arc;

use hearth_proto::ids::DeviceId;
use hearth_proto::keys::PublicKey;
use p256::pkcs8::EncodePrivateKey;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use time::{Duration, OffsetDateTime};

pub use files::{write_file, PkiDir, CLOUD_CA, CLOUD_SERVER_CERT, CLOUD_SERVER_KEY, MANUFACTURER_CA};

/// Errors from certificate handling.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Generating or signing a certificate failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// PEM or DER input could not be read.
    #[error("could not read {what}: {reason}")]
    Parse {
        /// What was being read.
        what: &'static str,
        /// Why it failed.
        reason: String,
    },
    /// A TLS configuration could not be built.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// A certificate chain did not verify.
    #[error("certificate rejected: {0}")]
    Rejected(String),
    /// A certificate did not carry a Hearth device identity.
    #[error("not a device certificate: {0}")]
    NotADevice(String),
    /// Reading or writing PKI files failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
}

fn parse_err(what: &'static str, e: impl std::fmt::Display) -> Error {
    Error::Parse { what, reason: e.to_string() }
}

/// A validity period for a certificate.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    /// Not valid before.
    pub not_before: OffsetDateTime,
    /// Not valid after.
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From one hour ago (clock skew) for `days` days.
    pub fn days(days: i64) -> Self {
        let now = OffsetDateTime::now_utc();
        Self { not_before: now - Duration::hours(1), not_after: now + Duration::days(days) }
    }
}

/// A CA: its certificate and signing key, both PEM.
#[derive(Clone)]
pub struct CertifiedKey {
    /// The certificate (or chain, leaf first), PEM.
    pub cert_pem: String,
    /// The private key, PKCS#8 PEM. Never logged.
    pub key_pem: String,
}

impl std::fmt::Debug for CertifiedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertifiedKey").field("cert_pem", &self.cert_pem).finish_non_exhaustive()
    }
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Hearth");
    dn.push(DnType::CommonName, cn);
    dn
}

/// Creates a self-signed CA (P-256) that may sign end-entity certificates only.
pub fn generate_ca(common_name: &str, validity: Validity) -> Result<CertifiedKey, Error> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = dn(common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    let cert = params.self_signed(&key)?;
    Ok(CertifiedKey { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

fn issuer(ca: &CertifiedKey) -> Result<Issuer<'static, KeyPair>, Error> {
    let key = KeyPair::from_pem(&ca.key_pem)?;
    Ok(Issuer::from_ca_cert_pem(&ca.cert_pem, key)?)
}

/// Issues a TLS server certificate for `names` (DNS names or IP addresses),
/// signed by `ca`. The returned chain is the leaf alone; clients hold the CA.
pub fn issue_server_cert(ca: &CertifiedKey, names: &[String], validity: Validity) -> Result<CertifiedKey, Error> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::new(names.to_vec())?;
    params.distinguished_name = dn(names.first().map(String::as_str).unwrap_or("hearth-cloud"));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    let cert = params.signed_by(&key, &issuer(ca)?)?;
    Ok(CertifiedKey { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// The device side of provisioning: a certificate signing request made with
/// the device's own key. The private key stays with the caller.
pub fn device_csr(device_key: &p256::ecdsa::SigningKey, device: &DeviceId) -> Result<String, Error> {
    let der = device_key.to_pkcs8_der().map_err(|e| parse_err("device key", e))?;
    let key = KeyPair::try_from(der.as_bytes())?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = dn(device.as_str());
    Ok(params.serialize_request(&key)?.pem()?)
}

/// The factory side: signs a device's CSR with the manufacturer CA. The
/// subject is set by the factory (CN = `device`), whatever the CSR asked for.
pub fn sign_device_csr(
    manufacturer: &CertifiedKey,
    csr_pem: &str,
    device: &DeviceId,
    validity: Validity,
) -> Result<String, Error> {
    let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
    csr.params.distinguished_name = dn(device.as_str());
    csr.params.subject_alt_names.clear();
    csr.params.is_ca = IsCa::ExplicitNoCa;
    csr.params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    csr.params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    csr.params.not_before = validity.not_before;
    csr.params.not_after = validity.not_after;
    Ok(csr.signed_by(&issuer(manufacturer)?)?.pem())
}

/// Reads every certificate in a PEM text.
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| parse_err("certificate PEM", e))?;
    if certs.is_empty() {
        return Err(parse_err("certificate PEM", "no certificate found"));
    }
    Ok(certs)
}

/// Reads a private key from PEM.
pub fn key_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| parse_err("private key PEM", e))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca_pem: &str) -> Result<RootCertStore, Error> {
    let mut store = RootCertStore::empty();
    for cert in certs_from_pem(ca_pem)? {
        store.add(cert)?;
    }
    Ok(store)
}

/// The TLS client configuration for a device or a controller: TLS 1.3 only,
/// trusting `trusted_ca_pem` alone (never the system roots), with an
/// optional client certificate for mutual TLS.
pub fn client_config(trusted_ca_pem: &str, identity: Option<&CertifiedKey>) -> Result<ClientConfig, Error> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(trusted_ca_pem)?);
    let config = match identity {
        Some(id) => builder.with_client_auth_cert(certs_from_pem(&id.cert_pem)?, key_from_pem(&id.key_pem)?)?,
        None => builder.with_no_client_auth(),
    };
    Ok(config)
}

/// The cloud's TLS server configuration. With `client_ca_pem`, a client
/// certificate chaining to that CA is required (the device port); without,
/// none is asked for (the controller/API port).
pub fn server_config(server: &CertifiedKey, client_ca_pem: Option<&str>, alpn: &[&[u8]]) -> Result<ServerConfig, Error> {
    let builder = ServerConfig::builder_with_provider(provider()).with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match client_ca_pem {
        Some(ca) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
                .build()
                .map_err(|e| Error::Rejected(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs_from_pem(&server.cert_pem)?, key_from_pem(&server.key_pem)?)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// Parses a server name (DNS name or IP address) for a TLS client.
pub fn server_name(name: &str) -> Result<ServerName<'static>, Error> {
    ServerName::try_from(name.to_owned()).map_err(|e| parse_err("server name", e))
}

/// Reads the device identity out of a certificate that has already been
/// verified (by the TLS handshake or by [`verify_device_cert`]): the device
/// id from the subject CN and the P-256 key from the SPKI.
pub fn device_identity(cert: &CertificateDer<'_>) -> Result<(DeviceId, PublicKey), Error> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert).map_err(|e| Error::NotADevice(e.to_string()))?;
    let cn = x509
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or_else(|| Error::NotADevice("no subject common name".into()))?;
    let device: DeviceId = cn.parse().map_err(|e: hearth_proto::Error| Error::NotADevice(e.to_string()))?;
    let spki = x509.public_key().subject_public_key.data.as_ref();
    let key = PublicKey::from_sec1(spki).map_err(|e| Error::NotADevice(e.to_string()))?;
    Ok((device, key))
}

/// Verifies a device certificate against the manufacturer CA (as a TLS
/// client certificate, at the current time) and returns its identity.
pub fn verify_device_cert(manufacturer_ca_pem: &str, cert: &CertificateDer<'_>) -> Result<(DeviceId, PublicKey), Error> {
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(manufacturer_ca_pem)?), provider())
        .build()
        .map_err(|e| Error::Rejected(e.to_string()))?;
    verifier.verify_client_cert(cert, &[], UnixTime::now()).map_err(|e| Error::Rejected(e.to_string()))?;
    device_identity(cert)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device_cert(manufacturer: &CertifiedKey) -> (DeviceId, p256::ecdsa::SigningKey, CertificateDer<'static>) {
        let id = DeviceId::random();
        let key = hearth_proto::keys::generate();
        let csr = device_csr(&key, &id).unwrap();
        let pem = sign_device_csr(manufacturer, &csr, &id, Validity::days(1)).unwrap();
        (id, key, certs_from_pem(&pem).unwrap().remove(0))
    }

    #[test]
    fn device_identity_comes_from_the_manufacturer_certificate() {
        let manufacturer = generate_ca("m", Validity::days(1)).unwrap();
        let (id, key, cert) = device_cert(&manufacturer);
        let (got_id, got_key) = verify_device_cert(&manufacturer.cert_pem, &cert).unwrap();
        assert_eq!(got_id, id);
        assert_eq!(got_key, PublicKey::from(&key));
    }

    #[test]
    fn a_device_certificate_from_another_ca_is_rejected() {
        let manufacturer = generate_ca("m", Validity::days(1)).unwrap();
        let other = generate_ca("other", Validity::days(1)).unwrap();
        let (_, _, cert) = device_cert(&other);
        assert!(matches!(verify_device_cert(&manufacturer.cert_pem, &cert), Err(Error::Rejected(_))));
    }

    #[test]
    fn the_factory_sets_the_subject_whatever_the_csr_asked() {
        let manufacturer = generate_ca("m", Validity::days(1)).unwrap();
        let key = hearth_proto::keys::generate();
        let claimed = DeviceId::random();
        let assigned = DeviceId::random();
        let csr = device_csr(&key, &claimed).unwrap();
        let pem = sign_device_csr(&manufacturer, &csr, &assigned, Validity::days(1)).unwrap();
        let cert = certs_from_pem(&pem).unwrap().remove(0);
        assert_eq!(device_identity(&cert).unwrap().0, assigned);
    }

    #[test]
    fn an_expired_device_certificate_is_rejected() {
        let manufacturer = generate_ca("m", Validity::days(1)).unwrap();
        let key = hearth_proto::keys::generate();
        let id = DeviceId::random();
        let now = OffsetDateTime::now_utc();
        let past = Validity { not_before: now - Duration::days(10), not_after: now - Duration::days(1) };
        let pem = sign_device_csr(&manufacturer, &device_csr(&key, &id).unwrap(), &id, past).unwrap();
        let cert = certs_from_pem(&pem).unwrap().remove(0);
        assert!(verify_device_cert(&manufacturer.cert_pem, &cert).is_err());
    }

    #[test]
    fn pki_init_keeps_keys_private_and_refuses_to_overwrite() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let pki = PkiDir::init(dir.path().join("pki"), &["localhost".into()]).unwrap();
        for key in [files::MANUFACTURER_CA_KEY, files::CLOUD_CA_KEY, CLOUD_SERVER_KEY] {
            let mode = std::fs::metadata(pki.file(key)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{key}");
        }
        assert!(PkiDir::init(dir.path().join("pki"), &["localhost".into()]).is_err());
    }
}
