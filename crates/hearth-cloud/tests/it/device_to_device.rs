//! ADR 0009: a device's signed command for another device (a motion
//! sensor's rule) is forwarded only between devices of one owner account.

use std::time::Duration;

use hearth_proto::ids::DeviceId;
use hearth_proto::keys::PublicKey;
use hearth_proto::link::DeviceFrame;
use hearth_proto::message::{self, Command, CommandPayload};
use hearth_proto::pairing::{PendingPairing, SetupSecret};
use hearth_proto::PROTOCOL_VERSION;
use serde_json::json;

use crate::support::{eventually, now, run_plug, Cloud, DeviceConn, Seen, TestDevice};

/// Connects a simulated device, pairs it to the account behind `token`,
/// and returns it with its (paired) link.
async fn paired(cloud: &Cloud, token: &str) -> (TestDevice, tokio::sync::mpsc::UnboundedReceiver<Seen>, tokio::sync::oneshot::Sender<()>) {
    let dev = TestDevice::new(&cloud.manufacturer);
    let secret = SetupSecret::random();
    let mut conn = dev.connect(cloud).await.unwrap();
    conn.hello(Some(secret.lookup())).await;
    let (seen, quit, _task) = run_plug(&dev, conn, secret.clone());
    let ctl = hearth_proto::keys::generate();
    let pending = PendingPairing::start(secret.clone(), &ctl);
    let body = json!({"code_lookup": secret.lookup(), "name": "d", "request": pending.request()});
    let status = eventually(|| async {
        let (status, _) = cloud.call("POST", "/api/v1/pair", Some(token), Some(body.clone())).await;
        (status != 404).then_some(status)
    })
    .await;
    assert_eq!(status, 200);
    (dev, seen, quit)
}

/// A second link of a paired device, for sending frames by hand.
async fn relink(cloud: &Cloud, dev: &TestDevice) -> DeviceConn {
    let mut conn = dev.connect(cloud).await.unwrap();
    conn.hello(None).await;
    conn
}

fn toggle_for(signer: &TestDevice, target: &DeviceId, counter: u64) -> Vec<u8> {
    let payload = CommandPayload {
        v: PROTOCOL_VERSION,
        device: target.clone(),
        controller: PublicKey::from(&signer.key).controller_id(),
        counter,
        issued_at: now(),
        command: Command::Toggle,
    };
    message::sign_command(&signer.key, &payload).unwrap()
}

#[tokio::test]
async fn a_device_command_reaches_only_devices_of_the_same_owner() {
    let cloud = Cloud::start().await;
    let alice = cloud.account("alice@example.com").await;
    let mallory = cloud.account("mallory@example.com").await;
    let (plug, mut plug_seen, _q1) = paired(&cloud, &alice).await;
    let (own_sensor, _, q2) = paired(&cloud, &alice).await;
    let (foreign_sensor, _, q3) = paired(&cloud, &mallory).await;
    drop((q2, q3));
    let mut own = relink(&cloud, &own_sensor).await;
    let mut foreign = relink(&cloud, &foreign_sensor).await;

    // Another account's device: dropped. So is one whose envelope names
    // another device than the frame's target.
    let from_mallory = toggle_for(&foreign_sensor, &plug.id, 1);
    foreign.send(&DeviceFrame::Command { to: plug.id.clone(), envelope: from_mallory }).await.unwrap();
    let mismatched = toggle_for(&own_sensor, &own_sensor.id, 1);
    own.send(&DeviceFrame::Command { to: plug.id.clone(), envelope: mismatched }).await.unwrap();
    // The same owner's device: forwarded byte for byte.
    let from_alice = toggle_for(&own_sensor, &plug.id, 2);
    own.send(&DeviceFrame::Command { to: plug.id.clone(), envelope: from_alice.clone() }).await.unwrap();

    let Seen::Command(got) = tokio::time::timeout(Duration::from_secs(10), plug_seen.recv()).await.unwrap().unwrap();
    assert_eq!(got, from_alice, "only the same owner's command is forwarded");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(plug_seen.try_recv().is_err(), "nothing else reached the plug");
}
