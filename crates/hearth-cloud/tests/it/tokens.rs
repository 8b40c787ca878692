//! Session tokens and account enumeration (issue 7, "Brute force and
//! abuse"): logout and password change revoke tokens, a stolen token alone
//! cannot change the password, and an unknown email is answered like a
//! wrong password, after the same Argon2id work.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpSocket;
use tokio_rustls::TlsConnector;

use crate::support::{read_response, Cloud, Response};

const PW: &str = "correct horse battery";

async fn change(cloud: &Cloud, token: &str, old: &str, new: &str) -> (u16, Value) {
    cloud.call("POST", "/api/v1/password", Some(token), Some(json!({"old_password": old, "new_password": new}))).await
}

async fn login_token(cloud: &Cloud, email: &str, password: &str) -> String {
    let (status, body) = cloud.login(email, password).await;
    assert_eq!(status, 200, "{body}");
    body["token"].as_str().unwrap().to_owned()
}

async fn devices_status(cloud: &Cloud, token: &str) -> u16 {
    cloud.call("GET", "/api/v1/devices", Some(token), None).await.0
}

#[tokio::test]
async fn logout_revokes_its_own_token_only() {
    let cloud = Cloud::start().await;
    let phone = cloud.account("two@example.com").await;
    let laptop = login_token(&cloud, "two@example.com", PW).await;
    let (status, _) = cloud.call("POST", "/api/v1/logout", Some(&phone), None).await;
    assert_eq!(status, 204);
    assert_eq!(devices_status(&cloud, &phone).await, 401, "the logged-out token is dead");
    assert_eq!(devices_status(&cloud, &laptop).await, 200, "another session of the account lives on");
    // Logging out twice is not a way to probe tokens: the same 401 as a made-up one.
    let (status, body) = cloud.call("POST", "/api/v1/logout", Some(&phone), None).await;
    assert_eq!(status, 401, "{body}");
}

#[tokio::test]
async fn a_password_change_needs_the_old_password_and_ends_every_session() {
    let cloud = Cloud::start().await;
    let a = cloud.account("pw@example.com").await;
    let b = login_token(&cloud, "pw@example.com", PW).await;
    let other = cloud.account("bystander@example.com").await;

    // A stolen token alone cannot take the account over.
    let (status, body) = change(&cloud, &a, "not the password", "a new password").await;
    assert_eq!(status, 403, "{body}");
    assert!(body["error"].as_str().unwrap().contains("current password is wrong"), "{body}");
    let (status, body) = change(&cloud, &a, PW, "short").await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = cloud
        .call("POST", "/api/v1/password", Some(&a), Some(json!({"old_password": PW, "new_password": "a new password", "x": 1})))
        .await;
    assert_eq!(status, 400, "unknown fields are refused: {body}");
    let (status, _) = change(&cloud, "made-up-token", PW, "a new password").await;
    assert_eq!(status, 401);
    // Nothing changed so far.
    assert_eq!(devices_status(&cloud, &a).await, 200);
    assert_eq!(devices_status(&cloud, &b).await, 200);

    let (status, body) = change(&cloud, &a, PW, "a new password").await;
    assert_eq!(status, 204, "{body}");
    // Every session of the account ended, the caller's included ...
    assert_eq!(devices_status(&cloud, &a).await, 401);
    assert_eq!(devices_status(&cloud, &b).await, 401);
    // ... but no other account's.
    assert_eq!(devices_status(&cloud, &other).await, 200);
    let (status, _) = cloud.login("pw@example.com", PW).await;
    assert_eq!(status, 401, "the old password no longer works");
    let c = login_token(&cloud, "pw@example.com", "a new password").await;
    assert_eq!(devices_status(&cloud, &c).await, 200);
}

#[tokio::test]
async fn guessing_the_old_password_with_a_stolen_token_is_rate_limited() {
    let cloud = Cloud::start().await;
    let token = cloud.account("guess@example.com").await;
    for i in 0..hearth_cloud::RATE_LIMIT_BURST {
        let (status, body) = change(&cloud, &token, &format!("guess number {i}"), "a new password").await;
        assert_eq!(status, 403, "attempt {i}: {body}");
    }
    let r = cloud
        .request(
            "POST",
            "/api/v1/password",
            Some(&token),
            Some("application/json"),
            json!({"old_password": PW, "new_password": "a new password"}).to_string().as_bytes(),
        )
        .await;
    assert_eq!(r.status, 429, "{:?}", r.json());
    assert!(r.header("retry-after").is_some());
    // The refused attempts changed nothing.
    assert_eq!(devices_status(&cloud, &token).await, 200);
}

/// A login sent from `source` (a loopback address), so that the per-address
/// rate limit of one source does not cut a long series short.
async fn login_from(cloud: &Cloud, source: IpAddr, email: &str, password: &str) -> (Response, Duration) {
    let config = hearth_pki::client_config(&cloud.cloud_ca.cert_pem, None).unwrap();
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    let tcp = socket.connect(cloud.api).await.unwrap();
    let mut tls =
        TlsConnector::from(Arc::new(config)).connect(hearth_pki::server_name("localhost").unwrap(), tcp).await.unwrap();
    let body = json!({"email": email, "password": password}).to_string();
    let head = format!(
        "POST /api/v1/login HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    // Only the request and its answer are timed, not the TLS handshake.
    let start = Instant::now();
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.write_all(body.as_bytes()).await.unwrap();
    let r = read_response(&mut tls).await;
    (r, start.elapsed())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// The same answer, byte for byte apart from the date, and a similar time:
/// without the dummy Argon2id check an unknown email would be answered
/// about 20 times faster (no hash at all), which the factor of 3 catches
/// while tolerating a busy CI machine.
#[tokio::test]
async fn unknown_accounts_are_answered_like_wrong_passwords_in_similar_time() {
    let cloud = Cloud::start().await;
    // Timing on a shared CI machine is noisy: up to three measurements, each
    // with its own account, addresses and emails (so no rate limit is hit);
    // one within the bound passes. Without the dummy hash the two cases
    // differ about 35× (21 ms against 0.6 ms), which fails all three.
    let mut medians = Vec::new();
    for attempt in 0..3u8 {
        let email = format!("known{attempt}@example.com");
        let (status, _) = cloud.signup(&email, PW).await;
        assert_eq!(status, 201);
        let (mut known, mut unknown) = (Vec::new(), Vec::new());
        let mut answers = Vec::new();
        // Alternate the two cases so load changes hit both; each round from its
        // own loopback address and email, under the rate limits.
        for round in 0..9u8 {
            let source = IpAddr::from([127, 1 + attempt, 1, round + 1]);
            let (r, t) = login_from(&cloud, source, &email, "wrong password!").await;
            known.push(t);
            answers.push(r);
            let (r, t) = login_from(&cloud, source, &format!("nobody{attempt}-{round}@example.com"), "wrong password!").await;
            unknown.push(t);
            answers.push(r);
        }
        // A password of the wrong length for a real account is answered the same way too.
        let (r, _) = login_from(&cloud, IpAddr::from([127, 1 + attempt, 1, 100]), &email, "short").await;
        answers.push(r);
        let first = &answers[0];
        assert_eq!(first.status, 401);
        for r in &answers {
            assert_eq!((r.status, &r.body), (first.status, &first.body));
            let names = |r: &Response| {
                let mut n: Vec<_> = r.headers.iter().filter(|(k, _)| !k.eq_ignore_ascii_case("date")).cloned().collect();
                n.sort();
                n
            };
            assert_eq!(names(r), names(first));
        }
        let (k, u) = (median(known), median(unknown));
        eprintln!("median login time: wrong password {k:?}, unknown email {u:?}");
        if u * 3 >= k && k * 3 >= u {
            cloud.shutdown().await.unwrap();
            return;
        }
        medians.push((k, u));
    }
    panic!("timing tells accounts apart in all three measurements (wrong password, unknown email): {medians:?}");
}

/// A live controller link is not a way around a password change: the cloud
/// re-checks the session at its next 20 s ping and closes the link.
#[tokio::test]
async fn a_password_change_closes_live_controller_links_at_the_next_check() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;
    // Paused time with PostgreSQL's network I/O jumps past the check (see limits.rs).
    if std::env::var("HEARTH_TEST_CLOUD_DB").is_ok_and(|v| v == "postgres") {
        eprintln!("skipping: paused-time test with HEARTH_TEST_CLOUD_DB=postgres (runs in the SQLite pass)");
        return;
    }
    let cloud = Cloud::start().await;
    let token = cloud.account("live@example.com").await;
    let tls = cloud.tls(cloud.api, None).await.unwrap();
    let mut req = "wss://localhost/api/v1/link".into_client_request().unwrap();
    req.headers_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::client_async(req, tls).await.unwrap();
    let (status, _) = change(&cloud, &token, PW, "a new password").await;
    assert_eq!(status, 204);
    tokio::time::pause();
    let start = tokio::time::Instant::now();
    let reason = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| f.reason.to_string()).unwrap_or_default(),
                None | Some(Err(_)) => return String::new(),
                Some(Ok(_)) => {}
            }
        }
    })
    .await
    .expect("the link outlived the password change");
    assert!(start.elapsed() <= Duration::from_secs(21), "{:?}", start.elapsed());
    assert!(reason.contains("session ended"), "{reason:?}");
    cloud.shutdown().await.unwrap();
}
