use std::fs;
use std::os::unix::fs::PermissionsExt;

use hearth_proto::capability::DeviceKind;
use hearth_proto::pairing::SetupLabel;

use crate::support::{Device, Pki};

fn mode(path: &std::path::Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn provision_keeps_the_key_private_and_writes_a_label() {
    let pki = Pki::new();
    let dev = Device::new(&pki, DeviceKind::Plug);
    let dir = dev.dir.path();

    let key = fs::read_to_string(dir.join("device.key")).unwrap();
    assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"), "PKCS#8 PEM expected");
    assert_eq!(mode(&dir.join("device.key")), 0o600);
    assert_eq!(mode(&dir.join("setup-secret")), 0o600);
    assert_eq!(mode(dir), 0o700);

    // The certificate chains to the manufacturer CA and names this device.
    let cert = hearth_pki::certs_from_pem(&fs::read_to_string(dir.join("device.pem")).unwrap()).unwrap();
    let (id, _) = hearth_pki::verify_device_cert(&pki.manufacturer.cert_pem, &cert[0]).unwrap();
    assert_eq!(&id, dev.id());

    // The label: a QR code of the payload, and the typed code.
    let svg = fs::read_to_string(&dev.prov.label_svg).unwrap();
    assert!(svg.contains("<svg"), "QR label must be SVG");
    let txt = fs::read_to_string(&dev.prov.label_txt).unwrap();
    assert_eq!(txt.trim(), dev.secret().code(), "label text is the typed code");
    let parsed = SetupLabel::parse(&dev.prov.label.qr_payload()).unwrap();
    assert_eq!(parsed.device.as_ref(), Some(dev.id()));
    assert_eq!(parsed.secret, dev.secret());

    // Only the key file holds private key material.
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let text = fs::read_to_string(&path).unwrap_or_default();
        if path.file_name().unwrap() != "device.key" {
            assert!(!text.contains("PRIVATE KEY"), "{} holds a private key", path.display());
        }
    }
}

#[test]
fn provision_refuses_to_overwrite_an_identity() {
    let pki = Pki::new();
    let dev = Device::new(&pki, DeviceKind::EnergyPlug);
    let key_before = fs::read(dev.dir.path().join("device.key")).unwrap();
    let err = hearth_device::provision(
        dev.dir.path(),
        &pki.manufacturer,
        &pki.cloud_ca.cert_pem,
        DeviceKind::Plug,
        "localhost:8444",
        "localhost",
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("refusing to overwrite"), "{err:#}");
    assert_eq!(fs::read(dev.dir.path().join("device.key")).unwrap(), key_before);
}

#[test]
fn provision_rejects_bad_inputs_without_leaving_files() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let attempt = |ca: &str, addr: &str, name: &str| {
        hearth_device::provision(dir.path(), &pki.manufacturer, ca, DeviceKind::Plug, addr, name)
    };
    assert!(attempt(&pki.cloud_ca.cert_pem, "no-port", "localhost").is_err());
    assert!(attempt(&pki.cloud_ca.cert_pem, "localhost:8444", "not a name!").is_err());
    assert!(attempt("not a certificate", "localhost:8444", "localhost").is_err());
    // A manufacturer CA whose key does not match fails at signing; nothing is left behind.
    let wrong = hearth_pki::CertifiedKey {
        cert_pem: pki.manufacturer.cert_pem.clone(),
        key_pem: pki.cloud_ca.key_pem.clone(),
    };
    assert!(hearth_device::provision(dir.path(), &wrong, &pki.cloud_ca.cert_pem, DeviceKind::Plug, "h:1", "localhost")
        .is_err());
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    attempt(&pki.cloud_ca.cert_pem, "localhost:8444", "localhost").unwrap();
}

#[tokio::test]
async fn a_corrupt_state_file_is_an_error_not_a_silent_reset() {
    let pki = Pki::new();
    let dev = Device::new(&pki, DeviceKind::Plug);
    fs::write(dev.dir.path().join("state.json"), b"{\"format\":1,\"relay\":").unwrap();
    let err = hearth_device::spawn(hearth_device::AgentOptions::new(dev.dir.path())).unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains("state.json") && text.contains("corrupt"), "{text}");

    fs::remove_file(dev.dir.path().join("state.json")).unwrap();
    assert!(hearth_device::spawn(hearth_device::AgentOptions::new(dev.dir.path())).is_err());

    let empty = tempfile::tempdir().unwrap();
    let err = hearth_device::spawn(hearth_device::AgentOptions::new(empty.path())).unwrap_err();
    assert!(format!("{err:#}").contains("not a provisioned device"), "{err:#}");
}
