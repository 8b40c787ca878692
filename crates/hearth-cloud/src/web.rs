//! The phone web app (ADR 0007): static files embedded in the binary at
//! build time and served with strict security headers.
//!
//! The app is a full controller in the browser: its keys are made and kept
//! there (WebCrypto, non-extractable), it signs commands and opens sealed
//! reports itself, and it talks to the same JSON API and WebSocket link as
//! the CLI with a bearer token (no cookies, so no CSRF surface). This
//! module only hands out files; it knows nothing of accounts or devices.
//!
//! Served on the HTTPS API port, and on the optional plain-HTTP listener
//! that only binds to loopback (`serve_with_web`), because WebCrypto needs
//! a secure context and a browser treats `http://127.0.0.1` as one while it
//! would not trust the deployment's private CA.

use axum::extract::Path;
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// One embedded file.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

macro_rules! asset {
    ($name:literal, $ct:expr) => {
        Asset { name: $name, content_type: $ct, body: include_bytes!(concat!("../web/app/", $name)) }
    };
}

const JS: &str = "text/javascript; charset=utf-8";

/// Every file under `/app/`, by name. A fixed table: no path from a request
/// ever reaches the file system.
const APP_FILES: &[Asset] = &[
    asset!("app.css", "text/css; charset=utf-8"),
    asset!("icon.svg", "image/svg+xml"),
    asset!("icon-192.png", "image/png"),
    asset!("icon-512.png", "image/png"),
    asset!("main.js", JS),
    asset!("ui.js", JS),
    asset!("api.js", JS),
    asset!("store.js", JS),
    asset!("bytes.js", JS),
    asset!("cbor.js", JS),
    asset!("cose.js", JS),
    asset!("hpke.js", JS),
    asset!("e2e.js", JS),
    asset!("pairing.js", JS),
    asset!("x509.js", JS),
    asset!("controller.js", JS),
];

const INDEX: &[u8] = include_bytes!("../web/index.html");
const MANIFEST: &[u8] = include_bytes!("../web/manifest.webmanifest");
/// The service worker. Served from the root so its scope is the whole app
/// (a worker's default scope is its own directory); it caches the app
/// shell only, never an API response (see the file and ADR 0007).
const SERVICE_WORKER: &[u8] = include_bytes!("../web/sw.js");

/// The Content-Security-Policy of every page and file: scripts and styles
/// only from files of this origin (no inline script or style attribute
/// anywhere in the app), connections only back to this origin (API and
/// WebSocket), never framed.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                       img-src 'self' data:; manifest-src 'self'; base-uri 'none'; form-action 'self'; \
                       frame-ancestors 'none'";

/// The routes of the web app. `https` says whether they are served over
/// TLS (then HSTS is sent); `manufacturer_ca_pem` is handed to the app so
/// it can check the certificate of a device shared with this account (it
/// trusts this file exactly as much as the app code from the same origin).
pub fn routes(https: bool, manufacturer_ca_pem: String) -> axum::Router {
    let ca: std::sync::Arc<str> = manufacturer_ca_pem.into();
    axum::Router::new()
        .route("/", get(|| async { file("text/html; charset=utf-8", INDEX) }))
        .route("/index.html", get(|| async { file("text/html; charset=utf-8", INDEX) }))
        .route("/manifest.webmanifest", get(|| async { file("application/manifest+json", MANIFEST) }))
        // `no-cache` here too: the browser then checks for a new worker on
        // every navigation instead of trusting its HTTP cache for up to 24 h.
        .route("/sw.js", get(|| async { file(JS, SERVICE_WORKER) }))
        .route(
            "/app/manufacturer-ca.pem",
            get(move || {
                let ca = ca.clone();
                async move { ([(header::CONTENT_TYPE, "application/x-pem-file"), (header::CACHE_CONTROL, "no-cache")], ca.to_string()) }
            }),
        )
        .route("/app/{name}", get(app_file))
        .layer(axum::middleware::map_response(move |resp: Response| security_headers(resp, https)))
}

async fn app_file(Path(name): Path<String>) -> Response {
    match APP_FILES.iter().find(|a| a.name == name) {
        Some(a) => file(a.content_type, a.body),
        None => (StatusCode::NOT_FOUND, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], "no such file").into_response(),
    }
}

fn file(content_type: &'static str, body: &'static [u8]) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            // The files change with the binary; revalidation is cheap on
            // loopback and keeps a stale app from talking to a newer cloud.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// Sets the web app's headers on every response of these routes. The
/// global security-headers layer (if present) sets the same values.
async fn security_headers(mut resp: Response, https: bool) -> Response {
    let h = resp.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(HeaderName::from_static("cross-origin-opener-policy"), HeaderValue::from_static("same-origin"));
    h.insert(
        HeaderName::from_static("permissions-policy"),
        HeaderValue::from_static("camera=(), microphone=(), geolocation=(), payment=()"),
    );
    if https {
        h.insert(header::STRICT_TRANSPORT_SECURITY, HeaderValue::from_static("max-age=31536000"));
    }
    resp
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    async fn get(app: &axum::Router, path: &str) -> Response {
        app.clone().oneshot(Request::get(path).body(Body::empty()).unwrap()).await.unwrap()
    }

    fn header<'a>(r: &'a Response, name: &str) -> &'a str {
        r.headers().get(name).map(|v| v.to_str().unwrap()).unwrap_or("")
    }

    #[tokio::test]
    async fn files_have_their_content_types_and_strict_headers() {
        let app = routes(true, "CA PEM".into());
        let cases = [
            ("/", "text/html; charset=utf-8"),
            ("/manifest.webmanifest", "application/manifest+json"),
            ("/app/main.js", "text/javascript; charset=utf-8"),
            ("/app/hpke.js", "text/javascript; charset=utf-8"),
            ("/app/app.css", "text/css; charset=utf-8"),
            ("/app/icon.svg", "image/svg+xml"),
            ("/app/manufacturer-ca.pem", "application/x-pem-file"),
        ];
        for (path, ct) in cases {
            let r = get(&app, path).await;
            assert_eq!(r.status(), StatusCode::OK, "{path}");
            assert_eq!(header(&r, "content-type"), ct, "{path}");
            assert_eq!(header(&r, "content-security-policy"), CSP, "{path}");
            assert_eq!(header(&r, "x-content-type-options"), "nosniff", "{path}");
            assert_eq!(header(&r, "x-frame-options"), "DENY", "{path}");
            assert_eq!(header(&r, "referrer-policy"), "no-referrer", "{path}");
            assert!(header(&r, "strict-transport-security").starts_with("max-age="), "{path}");
            assert!(r.headers().get("set-cookie").is_none(), "{path}: the app uses no cookies");
        }
        let r = get(&app, "/app/manufacturer-ca.pem").await;
        let body = axum::body::to_bytes(r.into_body(), 1024).await.unwrap();
        assert_eq!(&body[..], b"CA PEM");
    }

    #[tokio::test]
    async fn plain_http_has_no_hsts_and_unknown_files_are_404() {
        let app = routes(false, String::new());
        let r = get(&app, "/").await;
        assert_eq!(header(&r, "strict-transport-security"), "");
        for path in ["/app/nope.js", "/app/..%2fCargo.toml", "/app/../Cargo.toml"] {
            let r = get(&app, path).await;
            assert_ne!(r.status(), StatusCode::OK, "{path}");
        }
    }

    /// The PWA files (ADR 0007): the service worker at the root (so its
    /// scope is the whole app) as JavaScript under the same CSP, never
    /// cached by HTTP so an update is found at once; PNG icons the manifest
    /// lists at the sizes Chromium needs to offer installing.
    #[tokio::test]
    async fn service_worker_and_icons_have_their_headers() {
        let app = routes(false, String::new());
        let r = get(&app, "/sw.js").await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(header(&r, "content-type"), "text/javascript; charset=utf-8");
        assert_eq!(header(&r, "cache-control"), "no-cache");
        assert_eq!(header(&r, "content-security-policy"), CSP);
        assert_eq!(header(&r, "x-content-type-options"), "nosniff");
        assert!(r.headers().get("set-cookie").is_none());
        let body = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
        assert_eq!(&body[..], SERVICE_WORKER);
        for (path, size) in [("/app/icon-192.png", 192u32), ("/app/icon-512.png", 512)] {
            let r = get(&app, path).await;
            assert_eq!(r.status(), StatusCode::OK, "{path}");
            assert_eq!(header(&r, "content-type"), "image/png", "{path}");
            assert_eq!(header(&r, "content-security-policy"), CSP, "{path}");
            let png = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
            // PNG signature, then IHDR with width and height (RFC 2083 §11.2.2).
            assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{path}");
            assert_eq!(&png[12..16], b"IHDR", "{path}");
            let w = u32::from_be_bytes(png[16..20].try_into().unwrap());
            let h = u32::from_be_bytes(png[20..24].try_into().unwrap());
            assert_eq!((w, h), (size, size), "{path}");
        }
        let manifest: serde_json::Value = serde_json::from_slice(MANIFEST).unwrap();
        assert_eq!(manifest["display"], "standalone");
        assert!(manifest["start_url"].as_str().unwrap().starts_with('/'));
        assert!(!manifest["name"].as_str().unwrap().is_empty());
        let sizes: Vec<&str> = manifest["icons"].as_array().unwrap().iter().map(|i| i["sizes"].as_str().unwrap()).collect();
        assert!(sizes.contains(&"192x192") && sizes.contains(&"512x512"), "{sizes:?}");
        for icon in manifest["icons"].as_array().unwrap() {
            let src = icon["src"].as_str().unwrap();
            assert_eq!(get(&app, src).await.status(), StatusCode::OK, "{src}");
        }
    }

    /// The worker's shell list is exactly the files served here (all of
    /// /app/ but the manufacturer CA, plus the page and the manifest):
    /// a file added to the table but not to the list would be missing
    /// offline, and a path that is not a static file (an API route above
    /// all) must never be in it.
    #[test]
    fn the_service_worker_caches_exactly_the_shell() {
        let sw = std::str::from_utf8(SERVICE_WORKER).unwrap();
        let list = &sw[sw.find("const SHELL = [").unwrap()..];
        let list = &list[..list.find("];").unwrap()];
        let mut listed: Vec<&str> = list.split('"').skip(1).step_by(2).collect();
        listed.sort_unstable();
        let mut want: Vec<String> = APP_FILES.iter().map(|a| format!("/app/{}", a.name)).collect();
        want.push("/".into());
        want.push("/manifest.webmanifest".into());
        want.sort_unstable();
        assert_eq!(listed, want);
        assert!(!sw.contains("\"/api"), "the service worker names an API path");
    }

    /// The CSP forbids inline script and style: the app's HTML must have
    /// none, or it would silently break in every browser.
    #[test]
    fn no_inline_script_or_style_in_the_app() {
        let html = std::str::from_utf8(INDEX).unwrap();
        assert!(!html.contains("<style"), "inline <style> in index.html");
        assert!(!html.contains(" style="), "style attribute in index.html");
        let handler = html.split(|c: char| c.is_whitespace()).any(|w| {
            w.strip_prefix("on").is_some_and(|rest| rest.split('=').next().is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_lowercase())) && rest.contains('='))
        });
        assert!(!handler, "inline event handler in index.html");
        for script in html.match_indices("<script") {
            let tag = &html[script.0..html[script.0..].find('>').unwrap() + script.0];
            assert!(tag.contains("src=\"/app/"), "inline script in index.html: {tag}");
        }
        let worker = Asset { name: "sw.js", content_type: JS, body: SERVICE_WORKER };
        for a in APP_FILES.iter().filter(|a| a.name.ends_with(".js")).chain([&worker]) {
            let js = std::str::from_utf8(a.body).unwrap();
            // Setting .style or innerHTML with attributes would need 'unsafe-inline'.
            assert!(!js.contains(".style."), "{} sets inline style", a.name);
            assert!(!js.contains("innerHTML"), "{} uses innerHTML", a.name);
            assert!(!js.contains("eval("), "{} uses eval", a.name);
        }
    }
}
