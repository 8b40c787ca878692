//! The OpenAPI 3.1 document of the HTTPS API, served at `GET /openapi.json`
//! (issue 7, "API schema and API fuzzing").
//!
//! The document is generated from the code: every handler in `api.rs`
//! carries a `#[utoipa::path]` annotation naming its request and answer
//! types, and those types are the ones the handler decodes and encodes
//! (derived `ToSchema`), so a field added to a body shows up here. What the
//! annotations cannot see is added by [`CommonErrors`] from the same facts
//! the extractors act on: every route that takes a body can answer 400,
//! 408, 413 and 415 (`api::JsonBody`), every route that needs a session 401
//! (`api::Session`). Two tests keep the router and the document in step:
//! every `.route(...)` in `api.rs` must be in the document and every
//! documented operation must be routed.
//!
//! CI runs schemathesis against a live cloud with this document
//! (`tests/api/`); the bar is no 5xx answer and no answer that breaks it.

use std::sync::OnceLock;

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi, ToSchema};

/// Every error answer: `{"error": "<sentence>"}`, plus `pair_error` when a
/// device refused to pair (see `error.rs`).
#[derive(Serialize, ToSchema)]
pub(crate) struct ErrorBody {
    /// What went wrong and what to fix, for a person.
    error: String,
    /// Only on a 409 from `POST /pair`: the device's reason,
    /// `{"error": "wrong_secret", "tries_left": N}` and the like.
    #[schema(value_type = Option<Object>)]
    pair_error: Option<serde_json::Value>,
}

/// The security scheme name the handlers' annotations refer to.
const BEARER: &str = "bearer";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Hearth cloud API",
        description = "Accounts, the device registry and routing of signed envelopes (ADR 0002). \
                       Bodies are application/json, at most 64 KiB, unknown fields refused.",
        license(name = "MIT OR Apache-2.0"),
    ),
    paths(
        crate::api::health,
        crate::api::signup,
        crate::api::login,
        crate::api::logout,
        crate::api::change_password,
        crate::api::register_controller,
        crate::api::list_controllers,
        crate::api::remove_controller,
        crate::api::list_devices,
        crate::api::command,
        crate::api::events,
        crate::api::add_member,
        crate::api::remove_member,
        crate::api::pair,
        crate::api::link,
        serve,
    ),
    components(schemas(ErrorBody)),
    modifiers(&BearerScheme, &CommonErrors),
)]
struct ApiDoc;

struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(BEARER, SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()));
    }
}

/// Adds the answers the shared extractors give, to every operation that uses them.
struct CommonErrors;

impl Modify for CommonErrors {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let error = |description: &str| -> RefOr<utoipa::openapi::Response> {
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build(),
                )
                .build()
                .into()
        };
        for item in openapi.paths.paths.values_mut() {
            for op in [&mut item.get, &mut item.post, &mut item.delete, &mut item.put, &mut item.patch]
                .into_iter()
                .flatten()
            {
                let responses = &mut op.responses.responses;
                let mut add = |status: &str, description: &str| {
                    responses.entry(status.to_owned()).or_insert_with(|| error(description));
                };
                let has_body = op.request_body.is_some();
                let has_params = op.parameters.as_ref().is_some_and(|p| !p.is_empty());
                if has_body || has_params {
                    add("400", "The request is malformed or breaks a rule the answer names");
                }
                if has_body {
                    add("408", "The body did not arrive within 10 s");
                    add("413", "The body is larger than 64 KiB");
                    add("415", "The body is not application/json");
                }
                if op.security.as_ref().is_some_and(|s| !s.is_empty()) {
                    add("401", "Missing, unknown, expired or ended session token");
                }
            }
        }
    }
}

/// The document, built once.
pub(crate) fn document() -> &'static str {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| {
        // Serialising a tree of strings and maps cannot fail.
        ApiDoc::openapi().to_json().unwrap_or_else(|e| format!(r#"{{"error":"{e}"}}"#))
    })
}

/// `GET /openapi.json`: this API's OpenAPI document.
#[utoipa::path(get, path = "/openapi.json", tag = "service",
    responses((status = 200, description = "This document (OpenAPI 3.1)", body = Object)))]
pub(crate) async fn serve() -> Response {
    let mut resp = document().into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::Value;

    use super::*;

    fn doc() -> Value {
        serde_json::from_str(document()).unwrap()
    }

    fn documented() -> BTreeSet<(String, String)> {
        let doc = doc();
        let mut out = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                if ["get", "post", "put", "patch", "delete"].contains(&method.as_str()) {
                    out.insert((path.clone(), method.clone()));
                }
            }
        }
        out
    }

    /// Every `.route("PATH", get(h).post(h2))` in `api.rs`, as (path, method).
    fn routed() -> BTreeSet<(String, String)> {
        let source = include_str!("api.rs");
        let mut out = BTreeSet::new();
        for (i, _) in source.match_indices(".route(\"") {
            let rest = &source[i + ".route(\"".len()..];
            let path_end = rest.find('"').unwrap();
            let path = rest[..path_end].to_owned();
            // The method router runs to the end of the statement's line.
            let line = &rest[path_end..rest.find('\n').unwrap()];
            for method in ["get", "post", "put", "patch", "delete"] {
                if line.contains(&format!(" {method}(")) || line.contains(&format!(".{method}(")) {
                    out.insert((path.clone(), method.to_owned()));
                }
            }
        }
        // A route written another way (split over lines, a nested router)
        // would escape the scan: make that fail here instead.
        assert_eq!(
            source.matches(".route(").count(),
            source.matches(".route(\"").count(),
            "a .route( call in api.rs does not start with its path literal; extend this scan"
        );
        assert!(source.matches(".nest(").count() + source.matches(".merge(").count() == 0, "api.rs nests or merges routers");
        assert!(out.len() >= 10, "the route scan found too little: {out:?}");
        out
    }

    #[test]
    fn every_route_in_the_router_is_documented_and_nothing_else() {
        let (documented, routed) = (documented(), routed());
        let undocumented: Vec<_> = routed.difference(&documented).collect();
        assert!(undocumented.is_empty(), "routes without a #[utoipa::path] in the document: {undocumented:?}");
        let unrouted: Vec<_> = documented.difference(&routed).collect();
        assert!(unrouted.is_empty(), "documented operations the router does not serve: {unrouted:?}");
    }

    #[test]
    fn bodies_and_sessions_get_their_common_errors() {
        let doc = doc();
        let login = &doc["paths"]["/api/v1/login"]["post"]["responses"];
        for status in ["200", "400", "401", "408", "413", "415", "429"] {
            assert!(login.get(status).is_some(), "login lacks {status}: {login}");
        }
        let devices = &doc["paths"]["/api/v1/devices"]["get"];
        assert!(devices["responses"].get("401").is_some());
        assert_eq!(devices["security"], serde_json::json!([{ "bearer": [] }]));
        assert!(doc["paths"]["/api/v1/health"]["get"].get("security").is_none());
        assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
        // The request schema is the decoder's own type: unknown fields refused.
        let creds = &doc["components"]["schemas"]["Credentials"];
        assert_eq!(creds["required"], serde_json::json!(["email", "password"]), "{creds}");
    }
}
