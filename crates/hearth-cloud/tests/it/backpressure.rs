//! Bounded queues and back-pressure on the controller WebSocket (issue 7,
//! "Resource limits"): a controller that never reads is cut off instead of
//! having the cloud buffer its pushes without bound, a well-behaved
//! controller of the same account is not held up by it, and an oversized
//! WebSocket message closes only the link that sent it.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hearth_proto::capability::DeviceKind;
use hearth_proto::link::{CloudFrame, ControllerPush, DeviceFrame, PairOutcome};
use hearth_proto::message::{self, Cause, DeviceState, StatePayload};
use hearth_proto::pairing::{PairingGate, PendingPairing, SetupSecret};
use hearth_proto::{MAX_FRAME_LEN, PROTOCOL_VERSION};
use serde_json::json;
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::support::{now, Cloud, DeviceConn, TestDevice, T};

type Ws = WebSocketStream<TlsStream<TcpStream>>;

/// A controller link; `rcvbuf` shrinks the client's socket receive buffer,
/// so a client that does not read stops accepting data after a few KiB.
async fn link(cloud: &Cloud, token: &str, rcvbuf: Option<u32>) -> Ws {
    let socket = TcpSocket::new_v4().unwrap();
    if let Some(size) = rcvbuf {
        socket.set_recv_buffer_size(size).unwrap();
    }
    let tcp = socket.connect(cloud.api).await.unwrap();
    let config = hearth_pki::client_config(&cloud.cloud_ca.cert_pem, None).unwrap();
    let tls =
        TlsConnector::from(Arc::new(config)).connect(hearth_pki::server_name("localhost").unwrap(), tcp).await.unwrap();
    let mut req = "wss://localhost/api/v1/link".into_client_request().unwrap();
    req.headers_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    tokio_tungstenite::client_async(req, tls).await.unwrap().0
}

/// Connects `dev`, pairs it to the account of `token`, and hands back its link.
async fn paired_device(cloud: &Cloud, token: &str, dev: &TestDevice) -> DeviceConn {
    let secret = SetupSecret::random();
    let mut conn = dev.connect(cloud).await.unwrap();
    conn.hello(Some(secret.lookup())).await;
    let ctl = hearth_proto::keys::generate();
    let pending = PendingPairing::start(secret.clone(), &ctl);
    let body = json!({"code_lookup": secret.lookup(), "device": dev.id, "name": "flood", "request": pending.request()});
    let cloud_call = cloud.call("POST", "/api/v1/pair", Some(token), Some(body));
    let answer_pairing = async {
        let mut gate = PairingGate::setup();
        loop {
            match conn.recv().await.unwrap() {
                CloudFrame::Pair { req, request } => {
                    gate.attempt(&secret, &request).unwrap();
                    let resp = hearth_proto::pairing::respond(&secret, &dev.id, &dev.key, &request, now()).unwrap();
                    conn.send(&DeviceFrame::PairResult { req, outcome: PairOutcome::Ok(resp) }).await.unwrap();
                    conn.send(&DeviceFrame::Setup { setup_lookup: None }).await.unwrap();
                    return;
                }
                CloudFrame::Ping { n } => conn.send(&DeviceFrame::Pong { n }).await.unwrap(),
                other => panic!("unexpected {other:?}"),
            }
        }
    };
    let ((status, answer), ()) = tokio::join!(cloud_call, answer_pairing);
    assert_eq!(status, 200, "{answer}");
    conn
}

fn state(dev: &TestDevice, seq: u64) -> DeviceFrame {
    let payload = StatePayload {
        v: PROTOCOL_VERSION,
        device: dev.id.clone(),
        kind: DeviceKind::Plug,
        seq,
        at: now(),
        state: DeviceState { relay: Some(seq.is_multiple_of(2)), ..Default::default() },
        // A long (signed) interlock message makes each report about 40 KiB
        // on the controller link, so the socket buffers fill quickly.
        cause: Cause::Interlock { event: "x".repeat(30_000) },
    };
    DeviceFrame::State { envelope: message::sign_state(&dev.key, &payload).unwrap() }
}

/// Reads pushes until the state report with `seq` arrives; returns how many states came.
async fn read_states_until(ws: &mut Ws, dev: &TestDevice, seq: u64) -> u64 {
    let mut n = 0;
    loop {
        let msg = tokio::time::timeout(T, ws.next()).await.expect("the good link stalled").expect("closed").unwrap();
        if let Message::Text(t) = msg {
            if let ControllerPush::State { envelope, .. } = serde_json::from_str(t.as_str()).unwrap() {
                n += 1;
                if message::verify_state(&envelope, &dev.id, &dev.public_key()).unwrap().seq == seq {
                    return n;
                }
            }
        }
    }
}

#[tokio::test]
async fn a_controller_that_never_reads_is_cut_off_and_does_not_hold_up_the_others() {
    let cloud = Cloud::start().await;
    let token = cloud.account("flood@example.com").await;
    let dev = TestDevice::new(&cloud.manufacturer);
    let mut conn = paired_device(&cloud, &token, &dev).await;
    let mut good = link(&cloud, &token, None).await;
    // Reads nothing from here on, with a 4 KiB receive buffer.
    let stalled = link(&cloud, &token, Some(4096)).await;

    // State reports in batches, each read by the good controller before the
    // next: far more than the stalled link's queue, socket buffers and
    // ten-second send deadline can hold, while the good link keeps up.
    const BATCH: u64 = 32;
    const BATCHES: u64 = 10;
    let mut seq = 0;
    let mut good_got = 0;
    let start = tokio::time::Instant::now();
    for _ in 0..BATCHES {
        for _ in 0..BATCH {
            seq += 1;
            conn.send(&state(&dev, seq)).await.unwrap();
        }
        good_got += read_states_until(&mut good, &dev, seq).await;
    }
    assert_eq!(good_got, BATCH * BATCHES, "the good controller missed reports");
    eprintln!("{seq} reports to two controllers in {:?}", start.elapsed());

    // Now read the stalled link: what the cloud had buffered for it, then
    // its end (a close frame or EOF) — not every report ever sent.
    let mut stalled = stalled;
    let mut stalled_got = 0u64;
    let ended = loop {
        let Ok(next) = tokio::time::timeout(Duration::from_secs(15), stalled.next()).await else {
            break false;
        };
        match next {
            None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break true,
            Some(Ok(Message::Text(_))) => stalled_got += 1,
            Some(Ok(_)) => {}
        }
    };
    eprintln!("the stalled controller got {stalled_got} of {seq} reports; cut off: {ended}");
    assert!(ended, "the stalled link was never cut off");
    assert!(stalled_got < seq, "everything was buffered for a controller that did not read");
    // Still serving, and the good link still gets reports.
    cloud.health_ok().await;
    seq += 1;
    conn.send(&state(&dev, seq)).await.unwrap();
    assert_eq!(read_states_until(&mut good, &dev, seq).await, 1);
    cloud.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_oversized_websocket_message_closes_only_its_link() {
    let cloud = Cloud::start().await;
    let token = cloud.account("big@example.com").await;
    let mut big = link(&cloud, &token, None).await;
    let mut other = link(&cloud, &token, None).await;
    let huge = "x".repeat(MAX_FRAME_LEN + 1);
    // The send may fail half-way once the cloud closes; either way the link ends.
    let _ = big.send(Message::Text(huge.into())).await;
    let ended = tokio::time::timeout(T, async {
        loop {
            match big.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "a message over {MAX_FRAME_LEN} bytes did not end the link");
    // The other link of the account is untouched: a ping is answered.
    other.send(Message::Ping(b"still there".to_vec().into())).await.unwrap();
    let pong = tokio::time::timeout(T, async {
        loop {
            if let Some(Ok(Message::Pong(p))) = other.next().await {
                return p;
            }
        }
    })
    .await
    .expect("the other link is dead");
    assert_eq!(&pong[..], b"still there");
    cloud.shutdown().await.unwrap();
}
