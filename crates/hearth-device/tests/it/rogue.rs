//! CVE-2013-6951 (WeMo accepted any certificate): a device must not talk to
//! a server it cannot authenticate. Each rogue below gets a TCP connection
//! and a ClientHello, never a completed handshake, and so never a byte of
//! application data.

use std::time::Duration;

use hearth_pki::{CertifiedKey, Validity};
use hearth_proto::capability::DeviceKind;

use crate::support::{names, Device, FakeCloud, Pki};

const DAY: Duration = Duration::from_secs(86_400);

/// Points a device at a server presenting `rogue` and checks that two
/// dials in a row fail the handshake and the device never counts as connected.
async fn check_refused(pki: &Pki, rogue: &CertifiedKey) {
    let cloud = FakeCloud::start(rogue, &pki.manufacturer.cert_pem).await;
    let dev = Device::new(pki, DeviceKind::Plug);
    let agent = dev.spawn(cloud.addr);
    for attempt in 0..2 {
        // The server side of the handshake fails: the device aborted it after
        // checking our certificate, before sending its own Finished, so no
        // application data can follow.
        let err = cloud.try_handshake().await.expect_err("a rogue server completed a handshake");
        let _ = (attempt, err);
        assert!(!agent.snapshot().await.unwrap().connected);
    }
    // The device keeps working locally while it refuses the rogue.
    assert_eq!(agent.press_button().await.unwrap().relay, Some(true));
    agent.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_self_signed_certificate_is_refused() {
    let pki = Pki::new();
    let own = rcgen::generate_simple_self_signed(names(&["localhost", "127.0.0.1"])).unwrap();
    let rogue = CertifiedKey { cert_pem: own.cert.pem(), key_pem: own.signing_key.serialize_pem() };
    check_refused(&pki, &rogue).await;
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() {
    let pki = Pki::new();
    let other_ca = hearth_pki::generate_ca("Hearth cloud CA", Validity::days(30)).unwrap();
    let rogue = hearth_pki::issue_server_cert(&other_ca, &names(&["localhost", "127.0.0.1"]), Validity::days(30)).unwrap();
    check_refused(&pki, &rogue).await;
}

#[tokio::test]
async fn an_expired_certificate_from_the_right_ca_is_refused() {
    let pki = Pki::new();
    let base = Validity::days(1);
    let past = Validity { not_before: base.not_before - 30 * DAY, not_after: base.not_before - DAY };
    let rogue = hearth_pki::issue_server_cert(&pki.cloud_ca, &names(&["localhost", "127.0.0.1"]), past).unwrap();
    check_refused(&pki, &rogue).await;
}

#[tokio::test]
async fn a_certificate_for_another_name_from_the_right_ca_is_refused() {
    let pki = Pki::new();
    let rogue = hearth_pki::issue_server_cert(&pki.cloud_ca, &names(&["evil.example"]), Validity::days(30)).unwrap();
    check_refused(&pki, &rogue).await;
}

#[tokio::test]
async fn the_manufacturer_ca_is_not_trusted_for_the_cloud() {
    // A stolen device certificate's CA must not be able to impersonate the cloud.
    let pki = Pki::new();
    let rogue = hearth_pki::issue_server_cert(&pki.manufacturer, &names(&["localhost", "127.0.0.1"]), Validity::days(30)).unwrap();
    check_refused(&pki, &rogue).await;
}

#[tokio::test]
async fn the_genuine_cloud_is_accepted_by_the_same_harness() {
    let pki = Pki::new();
    let cloud = FakeCloud::genuine(&pki).await;
    let dev = Device::new(&pki, DeviceKind::Plug);
    let agent = dev.spawn(cloud.addr);
    cloud.try_handshake().await.expect("the genuine cloud must be accepted");
    agent.shutdown().await.unwrap();
}
