//! Security headers on every HTTP answer of the cloud (issue 7, "Web"),
//! applied as the outermost layer of each listener's router in `serve`, so
//! API answers, errors, fallbacks, the OpenAPI document, the firmware
//! repository and the web app all get them.
//!
//! * `Content-Security-Policy` [`CSP`]: scripts, styles and connections only
//!   from this origin, no inline script or style, never framed. A route that
//!   sets its own policy (the web app's adds `manifest-src`, `base-uri`,
//!   `form-action`) keeps it; every other answer gets this one.
//! * `X-Content-Type-Options: nosniff`: a JSON answer is never run as script.
//! * `Referrer-Policy: no-referrer`: tokens in a `?token=` URL never leak.
//! * `X-Frame-Options: DENY` for browsers older than `frame-ancestors`.
//! * `Strict-Transport-Security` ([`HSTS`], RFC 6797 §6.1) on HTTPS only:
//!   a browser ignores it over plain HTTP (§8.1), and the plain listener is
//!   loopback-only, where sending it would pin `localhost` to HTTPS.

use axum::http::{header, HeaderValue};
use axum::response::Response;

/// The policy every answer carries unless its route sets a stricter one.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                       img-src 'self' data:; frame-ancestors 'none'";
/// One year, the usual preload minimum; no `includeSubDomains`, since the
/// cloud's name may share a parent domain with sites it does not run.
pub const HSTS: &str = "max-age=31536000";

/// Wraps `router` so that every answer gets the headers; `https` says
/// whether the listener speaks TLS (then HSTS is sent).
pub fn secure(router: axum::Router, https: bool) -> axum::Router {
    router.layer(axum::middleware::map_response(move |resp: Response| async move { set(resp, https) }))
}

fn set(mut resp: Response, https: bool) -> Response {
    let h = resp.headers_mut();
    h.entry(header::CONTENT_SECURITY_POLICY).or_insert(HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if https {
        h.insert(header::STRICT_TRANSPORT_SECURITY, HeaderValue::from_static(HSTS));
    } else {
        h.remove(header::STRICT_TRANSPORT_SECURITY);
    }
    resp
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use axum::routing::get;
    use tower::ServiceExt;

    use super::*;

    fn router() -> axum::Router {
        axum::Router::new()
            .route("/plain", get(|| async { "x" }))
            .route(
                "/own-policy",
                get(|| async { ([(header::CONTENT_SECURITY_POLICY, "default-src 'none'; frame-ancestors 'none'")], "y") }),
            )
            .route("/fails", get(|| async { StatusCode::INTERNAL_SERVER_ERROR }))
    }

    async fn get_headers(https: bool, path: &str) -> axum::http::HeaderMap {
        let r = secure(router(), https).oneshot(Request::get(path).body(Body::empty()).unwrap()).await.unwrap();
        r.headers().clone()
    }

    #[tokio::test]
    async fn every_answer_gets_the_headers_including_errors_and_unknown_routes() {
        for path in ["/plain", "/fails", "/no-such-route"] {
            let h = get_headers(true, path).await;
            assert_eq!(h[header::CONTENT_SECURITY_POLICY], CSP, "{path}");
            assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff", "{path}");
            assert_eq!(h[header::REFERRER_POLICY], "no-referrer", "{path}");
            assert_eq!(h[header::X_FRAME_OPTIONS], "DENY", "{path}");
            assert_eq!(h[header::STRICT_TRANSPORT_SECURITY], HSTS, "{path}");
        }
    }

    #[tokio::test]
    async fn a_routes_own_policy_is_kept_and_plain_http_gets_no_hsts() {
        let h = get_headers(true, "/own-policy").await;
        assert_eq!(h[header::CONTENT_SECURITY_POLICY], "default-src 'none'; frame-ancestors 'none'");
        let h = get_headers(false, "/plain").await;
        assert!(h.get(header::STRICT_TRANSPORT_SECURITY).is_none());
        assert_eq!(h[header::CONTENT_SECURITY_POLICY], CSP);
    }

    #[test]
    fn the_policy_allows_no_inline_code_and_no_framing() {
        assert!(!CSP.contains("unsafe"), "{CSP}");
        assert!(CSP.contains("frame-ancestors 'none'"));
        assert!(CSP.contains("script-src 'self'"));
    }
}
