//! Accounts, sessions and hostile request bodies.

use std::time::Duration;

use serde_json::json;
use tokio::io::AsyncWriteExt;

use crate::support::{read_response, Cloud, T};

#[tokio::test]
async fn signup_login_logout() {
    let cloud = Cloud::start().await;
    let (status, body) = cloud.signup("  Alice@Example.com ", "correct horse battery").await;
    assert_eq!(status, 201, "{body}");
    assert!(body["account"].is_string());

    let (status, body) = cloud.signup("alice@example.com", "another password").await;
    assert_eq!(status, 409, "emails are normalized, so this is a duplicate: {body}");

    let (status, body) = cloud.login("ALICE@example.com", "correct horse battery").await;
    assert_eq!(status, 200, "{body}");
    let token = body["token"].as_str().unwrap().to_owned();
    assert!(body["expires_at"].as_u64().unwrap() > crate::support::now());
    assert!(cloud.devices(&token).await.is_empty());

    let (status, body) = cloud.login("alice@example.com", "wrong password!").await;
    assert_eq!((status, body["error"].as_str()), (401, Some("wrong email or password")));
    // An unknown account gets exactly the same answer.
    let (status, body2) = cloud.login("nobody@example.com", "wrong password!").await;
    assert_eq!((status, &body2), (401, &body));

    let (status, _) = cloud.call("POST", "/api/v1/logout", Some(&token), None).await;
    assert_eq!(status, 204);
    let (status, body) = cloud.call("GET", "/api/v1/devices", Some(&token), None).await;
    assert_eq!(status, 401, "a logged-out token is dead: {body}");
}

#[tokio::test]
async fn bad_signups_are_refused_with_reasons() {
    let cloud = Cloud::start().await;
    for (email, password, needle) in [
        ("not-an-email", "long enough pw", "email"),
        ("a@example.com", "short", "password must be 8 to 1024"),
        ("a@example.com", &"x".repeat(1025), "password must be 8 to 1024"),
        (&format!("{}@example.com", "a".repeat(250)), "long enough pw", "email must be"),
    ] {
        let (status, body) = cloud.signup(email, password).await;
        assert_eq!(status, 400, "{body}");
        assert!(body["error"].as_str().unwrap().contains(needle), "{body}");
    }
}

#[tokio::test]
async fn login_is_rate_limited_per_email_and_ip() {
    let cloud = Cloud::start().await;
    let (status, _) = cloud.signup("victim@example.com", "correct horse battery").await;
    assert_eq!(status, 201);
    // The signup took one token from this IP's signup bucket only; login
    // has its own buckets: 10 attempts, then 429.
    for i in 0..hearth_cloud::RATE_LIMIT_BURST {
        let (status, body) = cloud.login("victim@example.com", &format!("guess number {i}")).await;
        assert_eq!(status, 401, "attempt {i}: {body}");
    }
    let r = cloud
        .request(
            "POST",
            "/api/v1/login",
            None,
            Some("application/json"),
            json!({"email": "victim@example.com", "password": "correct horse battery"}).to_string().as_bytes(),
        )
        .await;
    assert_eq!(r.status, 429, "even the right password waits: {:?}", r.json());
    let retry: u64 = r.header("retry-after").expect("Retry-After header").parse().unwrap();
    assert!((1..=6).contains(&retry), "{retry}");
    assert!(r.error().contains("too many attempts"), "{}", r.error());
    cloud.health_ok().await;
}

#[tokio::test]
async fn sessions_expire() {
    let cloud = Cloud::start_with_ttl(Duration::from_secs(1)).await;
    let token = cloud.account("brief@example.com").await;
    assert!(cloud.devices(&token).await.is_empty());
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (status, body) = cloud.call("GET", "/api/v1/devices", Some(&token), None).await;
    assert_eq!(status, 401, "{body}");
    assert!(body["error"].as_str().unwrap().contains("log in again"));
}

#[tokio::test]
async fn missing_or_garbage_tokens_get_401() {
    let cloud = Cloud::start().await;
    for token in [None, Some("nonsense"), Some(&"A".repeat(43)[..]), Some(&"A".repeat(5000)[..])] {
        let r = cloud.request("GET", "/api/v1/devices", token, None, b"").await;
        assert_eq!(r.status, 401);
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        assert!(r.error().contains("session token"));
    }
}

/// Each hostile body gets a 4xx with a sentence, and the next request is
/// served normally.
#[tokio::test]
async fn hostile_bodies_get_clear_4xx() {
    let cloud = Cloud::start().await;
    let xxe = br#"<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]><x>&e;</x>"#;
    let cases: Vec<(&str, &[u8], u16, &str)> = vec![
        ("application/json", b"{\"email\": \"a@example.com\", ", 400, "malformed JSON"),
        ("application/json", b"", 400, "malformed JSON"),
        ("application/json", b"[1,2,3]", 400, "invalid request"),
        (
            "application/json",
            br#"{"email":"a@example.com","password":"long enough pw","admin":true}"#,
            400,
            "unknown field `admin`",
        ),
        ("application/json", br#"{"email":"a@example.com"}"#, 400, "missing field `password`"),
        ("application/xml", xxe, 415, "only application/json bodies are accepted"),
        ("text/xml", xxe, 415, "only application/json bodies are accepted"),
        ("application/json", xxe, 400, "malformed JSON"),
        ("application/x-www-form-urlencoded", b"email=a&password=b", 415, "only application/json"),
    ];
    for (ct, body, status, needle) in cases {
        let r = cloud.request("POST", "/api/v1/signup", None, Some(ct), body).await;
        assert_eq!(r.status, status, "{ct} {:?}: {:?}", String::from_utf8_lossy(body), r.json());
        assert!(r.error().contains(needle), "{:?} should contain {needle:?}", r.error());
        assert!(!r.error().contains("root:"), "no file contents ever come back");
        cloud.health_ok().await;
    }
    // No Content-Type at all.
    let r = cloud.request("POST", "/api/v1/signup", None, None, b"{}").await;
    assert_eq!(r.status, 415);
    cloud.health_ok().await;
}

#[tokio::test]
async fn a_10_mib_body_is_refused_without_being_read() {
    let cloud = Cloud::start().await;
    let s = cloud.tls(cloud.api, None).await.unwrap();
    let (mut rd, mut wr) = tokio::io::split(s);
    let len = 10 * 1024 * 1024;
    let head = format!(
        "POST /api/v1/signup HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n"
    );
    let writer = tokio::spawn(async move {
        wr.write_all(head.as_bytes()).await?;
        let chunk = vec![b' '; 64 * 1024];
        for _ in 0..len / chunk.len() {
            wr.write_all(&chunk).await?;
        }
        std::io::Result::Ok(())
    });
    let r = tokio::time::timeout(T, read_response(&mut rd)).await.expect("answer before the upload ends");
    assert_eq!(r.status, 413);
    assert!(r.error().contains("larger than the 65536-byte limit"), "{}", r.error());
    drop(rd);
    writer.abort();
    cloud.health_ok().await;
}

#[tokio::test]
async fn an_oversized_chunked_body_is_cut_off() {
    let cloud = Cloud::start().await;
    let mut body = Vec::new();
    for _ in 0..20 {
        body.extend_from_slice(b"1000\r\n");
        body.extend_from_slice(&[b' '; 0x1000]);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"0\r\n\r\n");
    let head = "POST /api/v1/signup HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
                Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    let r = cloud.raw(head, &body).await;
    assert_eq!(r.status, 413, "{:?}", r.json());
    cloud.health_ok().await;
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_json() {
    let cloud = Cloud::start().await;
    let r = cloud.request("GET", "/api/v1/nope", None, None, b"").await;
    assert_eq!((r.status, r.error().as_str()), (404, "no such API route"));
    let r = cloud.request("GET", "/../../etc/passwd", None, None, b"").await;
    assert_eq!(r.status, 404);
    let r = cloud.request("DELETE", "/api/v1/health", None, None, b"").await;
    assert_eq!(r.status, 405);
    assert!(r.error().contains("not allowed"));
    let r = cloud.request("GET", "/api/v1/health", None, None, b"").await;
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert_eq!(r.header("content-type"), Some("application/json"));
}

#[tokio::test]
async fn controllers_register_idempotently() {
    let cloud = Cloud::start().await;
    let token = cloud.account("ctl@example.com").await;
    let key = hearth_proto::keys::PublicKey::from(&hearth_proto::keys::generate());
    let body = json!({"public_key": key, "name": "laptop"});
    for _ in 0..2 {
        let (status, answer) = cloud.call("POST", "/api/v1/controllers", Some(&token), Some(body.clone())).await;
        assert_eq!(status, 201, "{answer}");
        assert_eq!(answer["controller"], json!(key.controller_id()));
    }
    let (status, answer) =
        cloud.call("POST", "/api/v1/controllers", Some(&token), Some(json!({"public_key": "AAAA", "name": "x"}))).await;
    assert_eq!(status, 400, "{answer}");
    let (status, answer) = cloud
        .call("POST", "/api/v1/controllers", Some(&token), Some(json!({"public_key": key, "name": "x".repeat(65)})))
        .await;
    assert_eq!(status, 400, "{answer}");
    let (status, _) = cloud.call("POST", "/api/v1/controllers", None, Some(body)).await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn serve_returns_after_shutdown() {
    let cloud = Cloud::start().await;
    cloud.health_ok().await;
    let api = cloud.api;
    cloud.shutdown().await.unwrap();
    assert!(tokio::net::TcpStream::connect(api).await.is_err(), "the API port is closed");
}
