//! The one error type of the HTTP API.
//!
//! Every failure a handler can meet becomes an [`ApiError`], rendered as
//! `{"error": "<sentence>"}`. Client faults get a 4xx and a sentence that
//! says what to fix; server faults get a generic 500 while the cause goes
//! to the log (never to the client, which could learn internals from it).

use std::borrow::Cow;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use hearth_proto::pairing::PairError;
use serde_json::json;

use crate::store::StoreError;

/// An API failure.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: Cow<'static, str>,
    retry_after: Option<u64>,
    pair_error: Option<PairError>,
}

impl ApiError {
    /// A client-facing error with this status and sentence.
    pub fn new(status: StatusCode, message: impl Into<Cow<'static, str>>) -> Self {
        Self { status, message: message.into(), retry_after: None, pair_error: None }
    }

    /// 400: the request cannot be understood.
    pub fn bad_request(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// 404 with a sentence.
    pub fn not_found(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    /// 401: no valid session. The same answer for missing, unknown, expired
    /// and logged-out tokens.
    pub fn unauthorized() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "missing, invalid or expired session token; log in again")
    }

    /// 429 with the seconds to wait.
    pub fn too_many(retry_after_secs: u64) -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!("too many attempts; try again in {retry_after_secs} seconds"),
        );
        e.retry_after = Some(retry_after_secs);
        e
    }

    /// 409: the device refused to pair, and why.
    pub fn pair_refused(e: PairError) -> Self {
        let mut err = Self::new(StatusCode::CONFLICT, e.to_string());
        err.pair_error = Some(e);
        err
    }

    /// 500: our fault. The cause is logged here and not shown to the client.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(cause = %cause, "internal error");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal server error")
    }

    /// The sentence shown to the client.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        Self::internal(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.message });
        if let Some(pe) = self.pair_error {
            body["pair_error"] = json!(pe);
        }
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}
