//! Security headers on every answer of a running cloud (issue 7, "Web";
//! `src/headers.rs`), and the OpenAPI document it serves.

use serde_json::json;

use crate::support::{Cloud, Response};

/// The policy the web app relies on (no inline script or style, never framed).
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self' data:; frame-ancestors 'none'";

fn check(what: &str, r: &Response) {
    let csp = r.header("content-security-policy").unwrap_or_else(|| panic!("{what}: no CSP"));
    assert!(csp.contains("frame-ancestors 'none'") && !csp.contains("unsafe"), "{what}: {csp}");
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"), "{what}");
    assert_eq!(r.header("referrer-policy"), Some("no-referrer"), "{what}");
    assert_eq!(r.header("x-frame-options"), Some("DENY"), "{what}");
    // The API port is HTTPS, so HSTS (RFC 6797).
    assert!(r.header("strict-transport-security").is_some_and(|v| v.starts_with("max-age=")), "{what}");
}

#[tokio::test]
async fn every_answer_carries_the_security_headers() {
    let cloud = Cloud::start().await;
    let token = cloud.account("headers@example.com").await;
    let login = json!({"email": "headers@example.com", "password": "correct horse battery"}).to_string();
    let cases: Vec<(&str, Response)> = vec![
        ("health", cloud.request("GET", "/api/v1/health", None, None, b"").await),
        ("openapi", cloud.request("GET", "/openapi.json", None, None, b"").await),
        ("login", cloud.request("POST", "/api/v1/login", None, Some("application/json"), login.as_bytes()).await),
        ("devices", cloud.request("GET", "/api/v1/devices", Some(&token), None, b"").await),
        ("401", cloud.request("GET", "/api/v1/devices", None, None, b"").await),
        ("404 route", cloud.request("GET", "/api/v1/nope", None, None, b"").await),
        ("404 outside the API", cloud.request("GET", "/nope/at/all", None, None, b"").await),
        ("405", cloud.request("PUT", "/api/v1/health", None, None, b"").await),
        ("415", cloud.request("POST", "/api/v1/login", None, Some("text/plain"), b"x").await),
        ("400", cloud.request("POST", "/api/v1/login", None, Some("application/json"), b"{").await),
        ("413", cloud.raw("POST /api/v1/login HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: 99999999\r\n\r\n", b"").await),
        ("web app", cloud.request("GET", "/", None, None, b"").await),
    ];
    for (what, r) in &cases {
        check(what, r);
    }
    // API answers get exactly the global policy; only the web app's own routes refine it.
    for (what, r) in cases.iter().filter(|(w, _)| *w != "web app") {
        assert_eq!(r.header("content-security-policy"), Some(CSP), "{what}");
    }
    cloud.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_openapi_document_is_served_and_names_every_api_route() {
    let cloud = Cloud::start().await;
    let r = cloud.request("GET", "/openapi.json", None, None, b"").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let doc = r.json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{}", doc["openapi"]);
    let paths = doc["paths"].as_object().unwrap();
    for p in ["/api/v1/signup", "/api/v1/login", "/api/v1/logout", "/api/v1/password", "/api/v1/devices/{id}/command", "/api/v1/link"] {
        assert!(paths.contains_key(p), "{p} missing");
    }
    // Every documented operation is routed: none answers with the fallback.
    for (path, item) in paths {
        for method in item.as_object().unwrap().keys().filter(|m| ["get", "post", "delete"].contains(&m.as_str())) {
            let concrete = path.replace("{id}", "00112233445566778899aabb").replace("{controller}", &"0".repeat(32));
            let r = cloud.request(&method.to_uppercase(), &concrete, None, None, b"").await;
            assert!(r.status != 405 && !(r.status == 404 && r.error() == "no such API route"), "{method} {path}: {}", r.status);
        }
    }
    cloud.shutdown().await.unwrap();
}
