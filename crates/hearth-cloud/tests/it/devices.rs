//! Device links, pairing, commands and the controller WebSocket.

use futures_util::{SinkExt, StreamExt};
use hearth_proto::b64;
use hearth_proto::ids::DeviceId;
use hearth_proto::keys::PublicKey;
use hearth_proto::link::{ControllerFrame, ControllerPush, DeviceFrame};
use hearth_proto::message::{self, Command, CommandPayload};
use hearth_proto::pairing::{PendingPairing, SetupSecret};
use hearth_proto::PROTOCOL_VERSION;
use p256::ecdsa::SigningKey;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::support::{eventually, now, run_plug, Cloud, Seen, TestDevice, T};

type Ws = WebSocketStream<TlsStream<TcpStream>>;

async fn open_link(cloud: &Cloud, token: &str, via_query: bool) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    let s = cloud.tls(cloud.api, None).await.unwrap();
    let url = if via_query {
        format!("wss://localhost/api/v1/link?token={token}")
    } else {
        "wss://localhost/api/v1/link".into()
    };
    let mut req = url.into_client_request().unwrap();
    if !via_query {
        req.headers_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    tokio_tungstenite::client_async(req, s).await.map(|(ws, _)| ws)
}

/// The next push, skipping pings.
async fn next_push(ws: &mut Ws) -> ControllerPush {
    loop {
        match tokio::time::timeout(T, ws.next()).await.expect("a push in time").expect("link open").unwrap() {
            Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn command(ctl: &SigningKey, device: &DeviceId, counter: u64) -> Vec<u8> {
    let payload = CommandPayload {
        v: PROTOCOL_VERSION,
        device: device.clone(),
        controller: PublicKey::from(ctl).controller_id(),
        counter,
        issued_at: now(),
        command: Command::Toggle,
    };
    message::sign_command(ctl, &payload).unwrap()
}

/// Pairs `dev` (already connected and announcing `secret`) to the account.
async fn pair(
    cloud: &Cloud,
    token: &str,
    ctl: &SigningKey,
    secret: &SetupSecret,
    name: &str,
) -> (u16, Value, PendingPairing) {
    let pending = PendingPairing::start(secret.clone(), ctl);
    let body = json!({"code_lookup": secret.lookup(), "name": name, "request": pending.request()});
    // The hello may still be in flight: retry while the cloud has not seen it.
    let (status, answer) = eventually(|| async {
        let (status, answer) = cloud.call("POST", "/api/v1/pair", Some(token), Some(body.clone())).await;
        (status != 404).then_some((status, answer))
    })
    .await;
    (status, answer, pending)
}

#[tokio::test]
async fn pair_command_push_and_presence_end_to_end() {
    let cloud = Cloud::start().await;
    let alice = cloud.account("alice@example.com").await;
    let ctl = hearth_proto::keys::generate();
    let dev = TestDevice::new(&cloud.manufacturer);
    let secret = SetupSecret::random();

    let mut conn = dev.connect(&cloud).await.unwrap();
    conn.hello(Some(secret.lookup())).await;
    let (mut seen, quit, plug) = run_plug(&dev, conn, secret.clone());

    // Pairing: the cloud passes the device's answer through intact.
    let (status, answer, pending) = pair(&cloud, &alice, &ctl, &secret, "desk lamp").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["device"], json!(dev.id));
    let response = serde_json::from_value(answer["response"].clone()).unwrap();
    let paired = pending.finish(&response, Some(&dev.id)).unwrap();
    assert_eq!(paired.device_key, dev.public_key());

    let listed = cloud.devices(&alice).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], json!(dev.id));
    assert_eq!(listed[0]["name"], "desk lamp");
    assert_eq!(listed[0]["kind"], "plug");
    assert_eq!(listed[0]["online"], true);
    assert_eq!(listed[0]["certificate"], b64::encode(dev.cert_der()));
    assert_eq!(listed[0]["last_state"], Value::Null);

    // A controller link sees results and state of this account's devices.
    let mut ws = open_link(&cloud, &alice, false).await.unwrap();

    let env = command(&ctl, &dev.id, 1);
    let (status, answer) = cloud
        .call(
            "POST",
            &format!("/api/v1/devices/{}/command", dev.id),
            Some(&alice),
            Some(json!({"envelope": b64::encode(&env)})),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let result = b64::decode(answer["result"].as_str().unwrap()).unwrap();
    let verified = message::verify_result(&result, &dev.id, &dev.public_key()).unwrap();
    assert_eq!(verified.counter, 1);
    let Seen::Command(got) = seen.recv().await.unwrap();
    assert_eq!(got, env, "the envelope reaches the device byte for byte");

    let mut got_result = false;
    let mut got_state = None;
    while !got_result || got_state.is_none() {
        match next_push(&mut ws).await {
            ControllerPush::Result { device, envelope } => {
                assert_eq!((device, envelope), (dev.id.clone(), result.clone()));
                got_result = true;
            }
            ControllerPush::State { device, envelope } => {
                assert_eq!(device, dev.id);
                message::verify_state(&envelope, &dev.id, &dev.public_key()).unwrap();
                got_state = Some(envelope);
            }
            other => panic!("unexpected push {other:?}"),
        }
    }
    let listed = cloud.devices(&alice).await;
    assert_eq!(listed[0]["last_state"], b64::encode(got_state.as_ref().unwrap()));

    // Commands over the WebSocket; the answer arrives as a push.
    let frame = ControllerFrame::Command { device: dev.id.clone(), envelope: command(&ctl, &dev.id, 2) };
    ws.send(Message::text(serde_json::to_string(&frame).unwrap())).await.unwrap();
    let mut got_result = false;
    while !got_result
        || got_state.as_ref().is_none_or(|s| message::verify_state(s, &dev.id, &dev.public_key()).unwrap().seq < 2)
    {
        match next_push(&mut ws).await {
            ControllerPush::Result { envelope, .. } => {
                assert_eq!(message::verify_result(&envelope, &dev.id, &dev.public_key()).unwrap().counter, 2);
                got_result = true;
            }
            ControllerPush::State { envelope, .. } => got_state = Some(envelope),
            other => panic!("unexpected push {other:?}"),
        }
    }
    // Issue 8: once the device is idle, the cloud keeps its newest report
    // only in the database (it is written within a second even though the
    // device sends nothing more, and the router's copy goes a second
    // later): the listing still shows that report, online.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let listed = cloud.devices(&alice).await;
    assert_eq!(listed[0]["online"], true);
    assert_eq!(listed[0]["last_state"], b64::encode(got_state.as_ref().unwrap()), "an idle device's listing comes from the store");

    // A WebSocket command for a device that is not ours is undeliverable.
    let stranger = DeviceId::random();
    let frame = ControllerFrame::Command { device: stranger.clone(), envelope: command(&ctl, &stranger, 3) };
    ws.send(Message::text(serde_json::to_string(&frame).unwrap())).await.unwrap();
    match next_push(&mut ws).await {
        ControllerPush::Undeliverable { device, message } => {
            assert_eq!(device, stranger);
            assert_eq!(message, "no such device on this account");
        }
        other => panic!("unexpected push {other:?}"),
    }

    // The device goes away: presence is pushed, the list and commands say so.
    quit.send(()).unwrap();
    plug.await.unwrap();
    loop {
        if let ControllerPush::Presence { device, online } = next_push(&mut ws).await {
            assert_eq!((device, online), (dev.id.clone(), false));
            break;
        }
    }
    assert_eq!(cloud.devices(&alice).await[0]["online"], false);
    assert_eq!(
        cloud.devices(&alice).await[0]["last_state"],
        b64::encode(got_state.as_ref().unwrap()),
        "the last state survives the device going offline"
    );
    let (status, answer) = cloud
        .call(
            "POST",
            &format!("/api/v1/devices/{}/command", dev.id),
            Some(&alice),
            Some(json!({"envelope": b64::encode(command(&ctl, &dev.id, 4))})),
        )
        .await;
    assert_eq!((status, answer["error"].as_str()), (503, Some("device is offline")));

    // It comes back: presence again.
    let mut conn = dev.connect(&cloud).await.unwrap();
    conn.hello(None).await;
    loop {
        if let ControllerPush::Presence { device, online } = next_push(&mut ws).await {
            assert_eq!((device, online), (dev.id.clone(), true));
            break;
        }
    }

    // Shutdown closes both links and serve returns.
    cloud.shutdown().await.unwrap();
    assert!(conn.closed_by_cloud().await);
}

#[tokio::test]
async fn another_accounts_device_is_indistinguishable_from_a_missing_one() {
    let cloud = Cloud::start().await;
    let alice = cloud.account("alice@example.com").await;
    let mallory = cloud.account("mallory@example.com").await;
    let ctl = hearth_proto::keys::generate();
    let dev = TestDevice::new(&cloud.manufacturer);
    let secret = SetupSecret::random();
    let mut conn = dev.connect(&cloud).await.unwrap();
    conn.hello(Some(secret.lookup())).await;
    let (mut seen, _quit, _plug) = run_plug(&dev, conn, secret.clone());
    let (status, answer, _) = pair(&cloud, &alice, &ctl, &secret, "plug").await;
    assert_eq!(status, 200, "{answer}");

    let env = b64::encode(command(&ctl, &dev.id, 1));
    let theirs = cloud
        .request(
            "POST",
            &format!("/api/v1/devices/{}/command", dev.id),
            Some(&mallory),
            Some("application/json"),
            json!({"envelope": env}).to_string().as_bytes(),
        )
        .await;
    let missing = cloud
        .request(
            "POST",
            &format!("/api/v1/devices/{}/command", DeviceId::random()),
            Some(&mallory),
            Some("application/json"),
            json!({"envelope": env}).to_string().as_bytes(),
        )
        .await;
    let garbage = cloud
        .request(
            "POST",
            "/api/v1/devices/..%2F..%2Fetc/command",
            Some(&mallory),
            Some("application/json"),
            json!({"envelope": env}).to_string().as_bytes(),
        )
        .await;
    for r in [&theirs, &missing, &garbage] {
        assert_eq!(r.status, 404);
        assert_eq!(r.json(), json!({"error": "no such device on this account"}));
    }
    assert!(cloud.devices(&mallory).await.is_empty());
    assert!(seen.try_recv().is_err(), "nothing reached the device");

    // Mallory's pairing attempt with a guessed code finds nothing.
    let pending = PendingPairing::start(SetupSecret::random(), &ctl);
    let (status, answer) = cloud
        .call(
            "POST",
            "/api/v1/pair",
            Some(&mallory),
            Some(json!({"code_lookup": SetupSecret::random().lookup(), "name": "x", "request": pending.request()})),
        )
        .await;
    assert_eq!((status, answer["error"].as_str()), (404, Some("no device in setup mode with this code is online")));
}

#[tokio::test]
async fn bad_command_envelopes_are_400() {
    let cloud = Cloud::start().await;
    let alice = cloud.account("alice@example.com").await;
    let ctl = hearth_proto::keys::generate();
    let dev = TestDevice::new(&cloud.manufacturer);
    let secret = SetupSecret::random();
    let mut conn = dev.connect(&cloud).await.unwrap();
    conn.hello(Some(secret.lookup())).await;
    let (_seen, _quit, _plug) = run_plug(&dev, conn, secret.clone());
    let (status, _, _) = pair(&cloud, &alice, &ctl, &secret, "plug").await;
    assert_eq!(status, 200);
    let path = format!("/api/v1/devices/{}/command", dev.id);
    let other = DeviceId::random();
    for (envelope, needle) in [
        ("!!!".to_owned(), "base64url"),
        (b64::encode(b"not cose"), "not a signed command"),
        (b64::encode(command(&ctl, &other, 1)), "is for device"),
    ] {
        let (status, answer) = cloud.call("POST", &path, Some(&alice), Some(json!({"envelope": envelope}))).await;
        assert_eq!(status, 400, "{answer}");
        assert!(answer["error"].as_str().unwrap().contains(needle), "{answer}");
    }
}

#[tokio::test]
async fn a_wrong_setup_code_is_409_with_the_devices_reason() {
    let cloud = Cloud::start().await;
    let alice = cloud.account("alice@example.com").await;
    let ctl = hearth_proto::keys::generate();
    let dev = TestDevice::new(&cloud.manufacturer);
    let secret = SetupSecret::random();
    let mut conn = dev.connect(&cloud).await.unwrap();
    conn.hello(Some(secret.lookup())).await;
    let (_seen, _quit, _plug) = run_plug(&dev, conn, secret.clone());

    // The right lookup (so the cloud finds the device) but a MAC made with another secret.
    let pending = PendingPairing::start(SetupSecret::random(), &ctl);
    let body = json!({"code_lookup": secret.lookup(), "name": "plug", "request": pending.request()});
    let (status, answer) = eventually(|| async {
        let (status, answer) = cloud.call("POST", "/api/v1/pair", Some(&alice), Some(body.clone())).await;
        (status != 404).then_some((status, answer))
    })
    .await;
    assert_eq!(status, 409, "{answer}");
    assert_eq!(answer["error"], "wrong setup code, 19 tries left");
    assert_eq!(answer["pair_error"], json!({"error": "wrong_secret", "tries_left": 19}));
    assert!(cloud.devices(&alice).await.is_empty(), "nothing recorded on a refusal");
}

#[tokio::test]
async fn a_device_from_another_ca_is_refused_at_the_handshake() {
    let cloud = Cloud::start().await;
    let rogue_ca = hearth_pki::generate_ca("rogue", hearth_pki::Validity::days(1)).unwrap();
    let rogue = TestDevice::new(&rogue_ca);
    // With TLS 1.3 the client may finish before the server checks its
    // certificate, so the refusal shows on the first read at the latest.
    if let Ok(mut conn) = rogue.connect(&cloud).await {
        let _ = conn
            .send(&DeviceFrame::Hello {
                kind: hearth_proto::capability::DeviceKind::Plug,
                firmware: "x".into(),
                setup_lookup: None,
            })
            .await;
        assert!(conn.closed_by_cloud().await);
    }
    // No certificate at all is refused too.
    if let Ok(mut s) = cloud.tls(cloud.devices, None).await {
        use tokio::io::AsyncReadExt;
        let mut b = [0u8; 1];
        assert!(!matches!(tokio::time::timeout(T, s.read(&mut b)).await, Ok(Ok(1))));
    }
    cloud.health_ok().await;
}

#[tokio::test]
async fn bad_device_frames_close_only_that_link() {
    let cloud = Cloud::start().await;
    let dev = TestDevice::new(&cloud.manufacturer);

    // Not JSON.
    let mut conn = dev.connect(&cloud).await.unwrap();
    {
        use tokio::io::AsyncWriteExt;
        conn.s.write_all(&[0, 0, 0, 5, b'h', b'e', b'l', b'l', b'o']).await.unwrap();
    }
    assert!(conn.closed_by_cloud().await);

    // A header announcing 4 GiB: refused before anything is allocated.
    let mut conn = dev.connect(&cloud).await.unwrap();
    {
        use tokio::io::AsyncWriteExt;
        conn.s.write_all(&[0xff, 0xff, 0xff, 0xff]).await.unwrap();
    }
    assert!(conn.closed_by_cloud().await);

    // A first frame that is not a hello.
    let mut conn = dev.connect(&cloud).await.unwrap();
    conn.send(&DeviceFrame::Pong { n: 1 }).await.unwrap();
    assert!(conn.closed_by_cloud().await);

    // The cloud is fine and a well-behaved device still gets in.
    cloud.health_ok().await;
    let mut conn = dev.connect(&cloud).await.unwrap();
    conn.hello(None).await;
    conn.send(&DeviceFrame::Pong { n: 1 }).await.unwrap();
}

#[tokio::test]
async fn a_second_link_for_the_same_device_replaces_the_first() {
    let cloud = Cloud::start().await;
    let alice = cloud.account("alice@example.com").await;
    let ctl = hearth_proto::keys::generate();
    let dev = TestDevice::new(&cloud.manufacturer);
    let secret = SetupSecret::random();
    let mut first = dev.connect(&cloud).await.unwrap();
    first.hello(Some(secret.lookup())).await;
    // Pair over a plug that is driven by the first link.
    let (_seen, _quit, plug) = run_plug(&dev, first, secret.clone());
    let (status, _, _) = pair(&cloud, &alice, &ctl, &secret, "plug").await;
    assert_eq!(status, 200);

    let second = dev.connect(&cloud).await.unwrap();
    let mut second = second;
    second.hello(None).await;
    // The first link is closed by the cloud, so its plug task ends.
    tokio::time::timeout(T, plug).await.expect("first link closed").unwrap();
    // Commands now go to the second link.
    let (mut seen, _quit2, _plug2) = run_plug(&dev, second, secret);
    let env = command(&ctl, &dev.id, 10);
    let (status, answer) = cloud
        .call(
            "POST",
            &format!("/api/v1/devices/{}/command", dev.id),
            Some(&alice),
            Some(json!({"envelope": b64::encode(&env)})),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert!(matches!(seen.recv().await, Some(Seen::Command(e)) if e == env));
    assert_eq!(cloud.devices(&alice).await[0]["online"], true);
}

#[tokio::test]
async fn a_device_that_never_answers_gives_504() {
    let cloud = Cloud::start().await;
    let alice = cloud.account("alice@example.com").await;
    let ctl = hearth_proto::keys::generate();
    let dev = TestDevice::new(&cloud.manufacturer);
    let secret = SetupSecret::random();
    let mut conn = dev.connect(&cloud).await.unwrap();
    conn.hello(Some(secret.lookup())).await;
    let (_seen, quit, plug) = run_plug(&dev, conn, secret.clone());
    let (status, _, _) = pair(&cloud, &alice, &ctl, &secret, "plug").await;
    assert_eq!(status, 200);
    // Take the link back from the plug simulator and stay silent.
    quit.send(()).unwrap();
    plug.await.unwrap();
    let mut conn = dev.connect(&cloud).await.unwrap();
    conn.hello(None).await;
    eventually(|| async { (cloud.devices(&alice).await[0]["online"] == true).then_some(()) }).await;
    let started = std::time::Instant::now();
    let (status, answer) = cloud
        .call(
            "POST",
            &format!("/api/v1/devices/{}/command", dev.id),
            Some(&alice),
            Some(json!({"envelope": b64::encode(command(&ctl, &dev.id, 1))})),
        )
        .await;
    assert_eq!((status, answer["error"].as_str()), (504, Some("the device did not answer")), "{answer}");
    assert!(started.elapsed() >= std::time::Duration::from_secs(9));
    drop(conn);
}

#[tokio::test]
async fn the_link_needs_a_valid_token_and_accepts_it_in_the_query() {
    let cloud = Cloud::start().await;
    let alice = cloud.account("alice@example.com").await;
    assert!(open_link(&cloud, "not-a-token", false).await.is_err());
    assert!(open_link(&cloud, "not-a-token", true).await.is_err());
    let mut ws = open_link(&cloud, &alice, true).await.unwrap();
    // A malformed frame closes the socket with a reason.
    ws.send(Message::text("{\"type\":\"reboot\"}")).await.unwrap();
    let closed = tokio::time::timeout(T, async {
        while let Some(msg) = ws.next().await {
            if let Ok(Message::Close(Some(frame))) = msg {
                return Some(frame);
            }
        }
        None
    })
    .await
    .unwrap()
    .expect("a close frame");
    assert_eq!(u16::from(closed.code), 1007);
    assert!(closed.reason.contains("malformed frame"));
    // A plain GET without the upgrade is a clear 400.
    let r = cloud.request("GET", "/api/v1/link", Some(&alice), None, b"").await;
    assert_eq!(r.status, 400);
    assert!(r.error().contains("WebSocket"));
}

/// The pushes that arrive within a short quiet period (after the expected
/// ones), to show that nothing more came.
async fn pushes_within(ws: &mut Ws, wait: std::time::Duration) -> Vec<ControllerPush> {
    let mut out = Vec::new();
    while let Ok(Some(Ok(m))) = tokio::time::timeout(wait, ws.next()).await {
        if let Message::Text(t) = m {
            out.push(serde_json::from_str(t.as_str()).unwrap());
        }
    }
    out
}

#[tokio::test]
async fn a_shared_device_is_routed_for_the_member_account_until_removed() {
    let cloud = Cloud::start().await;
    let alice = cloud.account("alice@example.com").await;
    let bob = cloud.account("bob@example.com").await;
    let mallory = cloud.account("mallory@example.com").await;
    let alice_ctl = hearth_proto::keys::generate();
    let bob_ctl = hearth_proto::keys::generate();
    let bob_id = PublicKey::from(&bob_ctl).controller_id();
    let dev = TestDevice::new(&cloud.manufacturer);
    let secret = SetupSecret::random();
    let mut conn = dev.connect(&cloud).await.unwrap();
    conn.hello(Some(secret.lookup())).await;
    let (mut seen, _quit, _plug) = run_plug(&dev, conn, secret.clone());
    let (status, answer, _) = pair(&cloud, &alice, &alice_ctl, &secret, "plug").await;
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = cloud
        .call(
            "POST",
            "/api/v1/controllers",
            Some(&bob),
            Some(json!({"public_key": PublicKey::from(&bob_ctl), "name": "bob's phone"})),
        )
        .await;
    assert_eq!(status, 201, "{answer}");

    let members = format!("/api/v1/devices/{}/members", dev.id);
    let cmd_path = format!("/api/v1/devices/{}/command", dev.id);
    let events_path = format!("/api/v1/devices/{}/events", dev.id);
    let bob_command = |counter| json!({"envelope": b64::encode(command(&bob_ctl, &dev.id, counter))});

    // Before sharing: bob's account cannot route, and only the owner may
    // add members (anyone else gets the usual 404).
    assert_eq!(cloud.call("POST", &cmd_path, Some(&bob), Some(bob_command(1))).await.0, 404);
    for who in [&bob, &mallory] {
        let (status, answer) = cloud.call("POST", &members, Some(who), Some(json!({"controller": bob_id}))).await;
        assert_eq!((status, answer["error"].as_str()), (404, Some("no such device on this account")));
    }
    let unknown = PublicKey::from(&hearth_proto::keys::generate()).controller_id();
    let (status, _) = cloud.call("POST", &members, Some(&alice), Some(json!({"controller": unknown}))).await;
    assert_eq!(status, 404, "a controller no account registered");
    // Alice's own controller is no member: her account owns the device.
    let alice_id = PublicKey::from(&alice_ctl).controller_id();
    cloud
        .call("POST", "/api/v1/controllers", Some(&alice), Some(json!({"public_key": PublicKey::from(&alice_ctl), "name": "a"})))
        .await;
    let (status, answer) = cloud.call("POST", &members, Some(&alice), Some(json!({"controller": alice_id}))).await;
    assert_eq!((status, answer), (200, json!({"routing": "owner"})));
    assert!(cloud.devices(&bob).await.is_empty());
    assert!(seen.try_recv().is_err(), "nothing reached the device");

    // Shared: bob's account lists it, routes commands and gets the pushes.
    let (status, answer) = cloud.call("POST", &members, Some(&alice), Some(json!({"controller": bob_id}))).await;
    assert_eq!((status, answer), (201, json!({"routing": "member"})));
    let listed = cloud.devices(&bob).await;
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0]["id"].clone(), listed[0]["shared"].clone()), (json!(dev.id), json!(true)));
    assert_eq!(listed[0]["role"], "member");
    assert_eq!(cloud.devices(&alice).await[0]["shared"], false);
    assert!(cloud.devices(&mallory).await.is_empty());
    let mut bob_ws = open_link(&cloud, &bob, false).await.unwrap();
    let (status, answer) = cloud.call("POST", &cmd_path, Some(&bob), Some(bob_command(1))).await;
    assert_eq!(status, 200, "{answer}");
    assert!(matches!(seen.recv().await, Some(Seen::Command(_))));
    let (mut got_result, mut got_state) = (false, false);
    while !(got_result && got_state) {
        match next_push(&mut bob_ws).await {
            ControllerPush::Result { device, .. } => got_result = device == dev.id,
            ControllerPush::State { device, .. } => got_state = device == dev.id,
            other => panic!("unexpected push {other:?}"),
        }
    }
    // The history route answers the member (this test plug seals nothing,
    // so the history is empty; the e2e sharing test reads real entries).
    let (status, answer) = cloud.call("GET", &events_path, Some(&bob), None).await;
    assert_eq!((status, answer), (200, json!({"events": []})));
    // Only the owner may remove a member.
    let member_path = format!("{members}/{bob_id}");
    assert_eq!(cloud.call("DELETE", &member_path, Some(&bob), None).await.0, 404);
    assert_eq!(cloud.call("DELETE", &member_path, Some(&mallory), None).await.0, 404);

    // Removed: no listing, no routing, no history, no more pushes.
    assert_eq!(cloud.call("DELETE", &member_path, Some(&alice), None).await.0, 204);
    assert_eq!(cloud.call("DELETE", &member_path, Some(&alice), None).await.0, 404, "already gone");
    assert!(cloud.devices(&bob).await.is_empty());
    let (status, answer) = cloud.call("POST", &cmd_path, Some(&bob), Some(bob_command(2))).await;
    assert_eq!((status, answer["error"].as_str()), (404, Some("no such device on this account")));
    assert_eq!(cloud.call("GET", &events_path, Some(&bob), None).await.0, 404);
    let frame = ControllerFrame::Command { device: dev.id.clone(), envelope: command(&bob_ctl, &dev.id, 3) };
    bob_ws.send(Message::text(serde_json::to_string(&frame).unwrap())).await.unwrap();
    match next_push(&mut bob_ws).await {
        ControllerPush::Undeliverable { device, .. } => assert_eq!(device, dev.id),
        other => panic!("unexpected push {other:?}"),
    }
    assert!(seen.try_recv().is_err(), "bob's commands no longer reach the device");
    let (status, answer) = cloud
        .call("POST", &cmd_path, Some(&alice), Some(json!({"envelope": b64::encode(command(&alice_ctl, &dev.id, 1))})))
        .await;
    assert_eq!(status, 200, "{answer}");
    let late = pushes_within(&mut bob_ws, std::time::Duration::from_millis(300)).await;
    assert!(late.is_empty(), "the removed member still got {late:?}");
}

/// The next command the cloud sends on a raw device link (pings skipped),
/// or `None` if nothing comes within `wait`.
async fn next_command(conn: &mut crate::support::DeviceConn, wait: std::time::Duration) -> Option<Vec<u8>> {
    loop {
        match tokio::time::timeout(wait, conn.recv()).await {
            Err(_) => return None,
            Ok(frame) => match frame.expect("link open") {
                hearth_proto::link::CloudFrame::Command { envelope } => return Some(envelope),
                _ => continue,
            },
        }
    }
}

/// Issue 3: a revoke for an offline device is held (202), written on the
/// device's next link before any command routed to it, sent again on every
/// reconnect until the device answers it, and then forgotten. Other
/// commands for an offline device are not held (503).
#[tokio::test]
async fn a_revoke_for_an_offline_device_is_held_and_goes_first_on_reconnect() {
    let cloud = Cloud::start().await;
    let alice = cloud.account("alice@example.com").await;
    let ctl = hearth_proto::keys::generate();
    let dev = TestDevice::new(&cloud.manufacturer);
    let secret = SetupSecret::random();
    let mut conn = dev.connect(&cloud).await.unwrap();
    conn.hello(Some(secret.lookup())).await;
    let (_seen, quit, plug) = run_plug(&dev, conn, secret.clone());
    assert_eq!(pair(&cloud, &alice, &ctl, &secret, "plug").await.0, 200);
    drop(quit);
    plug.await.unwrap();
    eventually(|| async { (cloud.devices(&alice).await[0]["online"] == false).then_some(()) }).await;
    // Only a revoke signed by a controller registered to the caller's
    // account is held (see the next test).
    let (status, answer) = cloud
        .call("POST", "/api/v1/controllers", Some(&alice), Some(json!({"public_key": PublicKey::from(&ctl), "name": "a"})))
        .await;
    assert_eq!(status, 201, "{answer}");

    let path = format!("/api/v1/devices/{}/command", dev.id);
    let post = |env: Vec<u8>| {
        let (cloud, alice, path) = (&cloud, alice.clone(), path.clone());
        async move { cloud.call("POST", &path, Some(&alice), Some(json!({"envelope": b64::encode(&env)}))).await }
    };
    let revoke = {
        let payload = CommandPayload {
            v: PROTOCOL_VERSION,
            device: dev.id.clone(),
            controller: PublicKey::from(&ctl).controller_id(),
            counter: 20,
            issued_at: now(),
            command: Command::RemoveController { controller: PublicKey::from(&hearth_proto::keys::generate()).controller_id() },
        };
        message::sign_command(&ctl, &payload).unwrap()
    };
    let (status, answer) = post(revoke.clone()).await;
    assert_eq!(status, 202, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("before anything else"), "{answer}");
    assert_eq!(post(command(&ctl, &dev.id, 21)).await.0, 503, "only revokes are held");

    // Reconnect: the revoke is the first command, before one sent as soon as
    // the link is up. Not answered: the link drops.
    let mut conn = dev.connect(&cloud).await.unwrap();
    conn.hello(None).await;
    let toggle = command(&ctl, &dev.id, 22);
    let got_both = std::sync::atomic::AtomicBool::new(false);
    let reader = async {
        let first = next_command(&mut conn, T).await;
        let second = next_command(&mut conn, T).await;
        got_both.store(true, std::sync::atomic::Ordering::SeqCst);
        drop(conn);
        (first, second)
    };
    // Fired until it is routed (503 while the link is still registering).
    let poster = async {
        while !got_both.load(std::sync::atomic::Ordering::SeqCst) {
            if post(toggle.clone()).await.0 != 503 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    let ((first, second), ()) = tokio::join!(reader, poster);
    assert_eq!(first, Some(revoke.clone()), "the held revoke comes first");
    assert_eq!(second, Some(toggle.clone()), "then the routed command");

    // Next reconnect: sent again, since nobody answered it. This time the
    // device answers (signed result for that controller and counter).
    let mut conn = dev.connect(&cloud).await.unwrap();
    conn.hello(None).await;
    assert_eq!(next_command(&mut conn, T).await, Some(revoke.clone()));
    let result = message::sign_result(
        &dev.key,
        &message::ResultPayload {
            v: PROTOCOL_VERSION,
            device: dev.id.clone(),
            controller: PublicKey::from(&ctl).controller_id(),
            counter: 20,
            outcome: message::Outcome::Done,
            state: message::DeviceState::default(),
            at: now(),
            access: None,
        },
    )
    .unwrap();
    conn.send(&DeviceFrame::Result { envelope: result }).await.unwrap();
    // Answered: forgotten (checked through the link, not the database).
    eventually(|| async {
        let mut again = dev.connect(&cloud).await.unwrap();
        again.hello(None).await;
        next_command(&mut again, std::time::Duration::from_millis(300)).await.is_none().then_some(())
    })
    .await;
}

/// A revoke signed `by` for `device`, removing a fresh controller.
fn revoke_by(by: &SigningKey, device: &DeviceId, counter: u64) -> Vec<u8> {
    let payload = CommandPayload {
        v: PROTOCOL_VERSION,
        device: device.clone(),
        controller: PublicKey::from(by).controller_id(),
        counter,
        issued_at: now(),
        command: Command::RemoveController { controller: PublicKey::from(&hearth_proto::keys::generate()).controller_id() },
    };
    message::sign_command(by, &payload).unwrap()
}

/// Security review: the cloud holds a revoke for an offline device only if
/// its key id is the controller it names, that controller is registered to
/// the caller's account, and the signature verifies with the registered key.
/// Anything else gets the plain 503, so a member about to be revoked cannot
/// fill the device's queue with junk the device would never answer, and the
/// owner's real revoke is still held and delivered first.
#[tokio::test]
async fn a_revoke_the_caller_cannot_sign_for_is_not_held() {
    use hearth_proto::envelope::{self, Kind};
    let cloud = Cloud::start().await;
    let alice = cloud.account("alice@example.com").await;
    let bob = cloud.account("bob@example.com").await;
    let (alice_ctl, bob_ctl) = (hearth_proto::keys::generate(), hearth_proto::keys::generate());
    let bob_id = PublicKey::from(&bob_ctl).controller_id();
    let dev = TestDevice::new(&cloud.manufacturer);
    let secret = SetupSecret::random();
    let mut conn = dev.connect(&cloud).await.unwrap();
    conn.hello(Some(secret.lookup())).await;
    let (_seen, quit, plug) = run_plug(&dev, conn, secret.clone());
    assert_eq!(pair(&cloud, &alice, &alice_ctl, &secret, "plug").await.0, 200);
    for (who, ctl) in [(&alice, &alice_ctl), (&bob, &bob_ctl)] {
        let body = json!({"public_key": PublicKey::from(ctl), "name": "phone"});
        assert_eq!(cloud.call("POST", "/api/v1/controllers", Some(who), Some(body)).await.0, 201);
    }
    let members = format!("/api/v1/devices/{}/members", dev.id);
    assert_eq!(cloud.call("POST", &members, Some(&alice), Some(json!({"controller": bob_id}))).await.0, 201);
    drop(quit);
    plug.await.unwrap();
    eventually(|| async { (cloud.devices(&alice).await[0]["online"] == false).then_some(()) }).await;

    let path = format!("/api/v1/devices/{}/command", dev.id);
    let post = |who: &str, env: &[u8]| {
        let (cloud, who, path, body) = (&cloud, who.to_owned(), path.clone(), json!({"envelope": b64::encode(env)}));
        async move { cloud.call("POST", &path, Some(&who), Some(body)).await }
    };
    let bob_payload = |counter| envelope::open(&revoke_by(&bob_ctl, &dev.id, counter)).unwrap().verify(&PublicKey::from(&bob_ctl)).unwrap();
    // More junk than the queue holds, from the member: signed by bob's own
    // registered key but under another key id (the device would refuse it
    // addressed to that id, and nobody would ever delete it) ...
    for counter in 1..=40 {
        let other_kid = hex::decode(PublicKey::from(&hearth_proto::keys::generate()).controller_id().as_str()).unwrap();
        let forged = envelope::sign(&bob_ctl, Kind::Command, &other_kid, bob_payload(counter)).unwrap();
        let (status, answer) = post(&bob, &forged).await;
        assert_eq!((status, answer["error"].as_str()), (503, Some("device is offline")), "key id is not the payload's controller");
    }
    // ... under bob's key id but not signed by bob's key ...
    let unsigned = envelope::sign(&hearth_proto::keys::generate(), Kind::Command, &hex::decode(bob_id.as_str()).unwrap(), bob_payload(41)).unwrap();
    assert_eq!(post(&bob, &unsigned).await.0, 503, "the signature does not verify with bob's registered key");
    // ... signed by a key registered to another account (alice's, replayed
    // by bob's account) ...
    assert_eq!(post(&bob, &revoke_by(&alice_ctl, &dev.id, 1)).await.0, 503, "alice's controller is not on bob's account");
    // ... or by a key no account registered.
    assert_eq!(post(&bob, &revoke_by(&hearth_proto::keys::generate(), &dev.id, 1)).await.0, 503);

    // The owner's real revoke is still held, and is the first thing the
    // device reads when it reconnects: none of the junk was kept.
    let real = revoke_by(&alice_ctl, &dev.id, 7);
    let (status, answer) = post(&alice, &real).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(post(&alice, &real).await.0, 202, "the same revoke again is idempotent");
    let (status, answer) = post(&alice, &revoke_by(&alice_ctl, &dev.id, 7)).await;
    assert_eq!(status, 409, "another envelope under the same counter is not silently dropped: {answer}");
    let mut conn = dev.connect(&cloud).await.unwrap();
    conn.hello(None).await;
    assert_eq!(next_command(&mut conn, T).await, Some(real));
    assert_eq!(next_command(&mut conn, std::time::Duration::from_millis(300)).await, None, "nothing else was held");
}
