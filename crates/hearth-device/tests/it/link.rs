use hearth_proto::capability::DeviceKind;

use crate::support::{Device, FakeCloud, Pki};

#[tokio::test]
async fn pings_are_answered_and_malformed_frames_are_skipped() {
    let pki = Pki::new();
    let cloud = FakeCloud::genuine(&pki).await;
    let dev = Device::new(&pki, DeviceKind::Plug);
    let agent = dev.spawn(cloud.addr);
    let mut link = cloud.accept().await;
    link.greeting(&dev.public_key()).await;
    link.ping(1).await;

    for body in [&b"{not json"[..], br#"{"type":"reboot"}"#, br#"{"type":"ping","n":1,"x":2}"#, b""] {
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(body);
        link.send_raw(&frame).await;
    }
    link.ping(2).await;
    assert!(agent.snapshot().await.unwrap().connected);
    agent.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_oversized_frame_drops_the_link_and_the_device_redials() {
    let pki = Pki::new();
    let cloud = FakeCloud::genuine(&pki).await;
    let dev = Device::new(&pki, DeviceKind::Plug);
    let agent = dev.spawn(cloud.addr);
    let mut link = cloud.accept().await;
    link.greeting(&dev.public_key()).await;
    link.send_raw(&u32::MAX.to_be_bytes()).await;
    assert!(link.try_recv().await.is_none(), "the device must close the link");

    let mut again = cloud.accept().await;
    again.greeting(&dev.public_key()).await;
    again.ping(3).await;
    agent.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_button_works_without_a_cloud_and_is_reported_when_connected() {
    let pki = Pki::new();
    let dev = Device::new(&pki, DeviceKind::Plug);
    // Nothing listens on this port once the listener is dropped.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let agent = dev.spawn(dead_addr);
    assert_eq!(agent.press_button().await.unwrap().relay, Some(true));
    let snap = agent.snapshot().await.unwrap();
    assert!(!snap.connected);
    assert_eq!(snap.state.relay, Some(true));
    agent.shutdown().await.unwrap();

    // The offline toggle was persisted, and a later button press is reported.
    let cloud = FakeCloud::genuine(&pki).await;
    let agent = dev.spawn(cloud.addr);
    let key = dev.public_key();
    let mut link = cloud.accept().await;
    let (_, report) = link.greeting(&key).await;
    // Unpaired, the device seals its reports for nobody: the cloud sees
    // that a report was made, never the relay state.
    assert!(report.is_none());
    assert_eq!(agent.snapshot().await.unwrap().state.relay, Some(true));
    assert_eq!(agent.press_button().await.unwrap().relay, Some(false));
    let h = link.sealed_state(&key).await;
    assert_eq!(h.content, hearth_proto::e2e::Content::State);
    agent.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_second_agent_on_the_same_directory_is_refused() {
    let pki = Pki::new();
    let dev = Device::new(&pki, DeviceKind::Plug);
    let cloud = FakeCloud::genuine(&pki).await;
    let agent = dev.spawn(cloud.addr);
    let err = hearth_device::spawn(crate::support::options(dev.dir.path(), cloud.addr)).unwrap_err();
    assert!(format!("{err:#}").contains("in use"), "{err:#}");
    agent.shutdown().await.unwrap();
}

/// `hearth demo` runs agents with `tokio::spawn(hearth_device::run(..))`,
/// which needs a `Send + 'static` future.
#[test]
fn run_can_be_spawned_on_a_multithreaded_runtime() {
    fn assert_send_static<T: Send + 'static>(_: &T) {}
    let fut = hearth_device::run(hearth_device::AgentOptions::new("/nonexistent"), async {});
    assert_send_static(&fut);
}

#[tokio::test]
async fn a_busy_cloud_is_redialled_no_sooner_than_it_asked() {
    let pki = Pki::new();
    let cloud = FakeCloud::genuine(&pki).await;
    let dev = Device::new(&pki, DeviceKind::Plug);
    let agent = dev.spawn(cloud.addr);
    let mut link = cloud.accept().await;
    link.greeting(&dev.public_key()).await;
    // Without the hint the first redial comes within 1 s (backoff::BASE).
    link.send(&hearth_proto::link::CloudFrame::Busy { retry_after: 2 }).await;
    let turned_away = std::time::Instant::now();
    drop(link);

    let mut again = cloud.accept().await;
    let waited = turned_away.elapsed();
    assert!(waited >= std::time::Duration::from_secs(2), "redialled after {waited:?}");
    assert!(waited <= std::time::Duration::from_secs(4), "hint plus at most one backoff cap: {waited:?}");
    again.greeting(&dev.public_key()).await;
    agent.shutdown().await.unwrap();
}
