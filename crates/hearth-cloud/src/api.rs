//! The HTTPS JSON API (ADR 0002, "HTTPS JSON API (v1)"). This is the only
//! module that knows HTTP routes, status codes and request bodies.
//!
//! Request bodies go through [`JsonBody`]: `application/json` only, at most
//! [`MAX_BODY`] bytes (refused from `Content-Length` before reading, and
//! counted while reading otherwise), read within [`BODY_TIMEOUT`], and
//! decoded into structs that refuse unknown fields.

use std::error::Error as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Json};
use hearth_proto::acl::Role;
use hearth_proto::b64;
use hearth_proto::ids::{ControllerId, DeviceId};
use hearth_proto::keys::PublicKey;
use hearth_proto::link::PairOutcome;
use hearth_proto::pairing::{verify_confirmation, PairRequest};
use hearth_proto::MAX_FRAME_LEN;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::openapi::ErrorBody;

use crate::auth;
use crate::error::ApiError;
use crate::router::RouteError;
use crate::server::ConnGuard;
use crate::store::{unix_now, AccountId, MemberAdded};
use crate::AppState;

#[doc(hidden)]
pub mod fuzzing;

/// Largest accepted request body.
pub const MAX_BODY: usize = 64 * 1024;
/// Time allowed for a request body to arrive once the headers have.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a device has to answer a pairing request.
pub const PAIR_TIMEOUT: Duration = Duration::from_secs(15);
/// Time a device has to answer a command.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest device or controller name, in characters.
pub const MAX_NAME_LEN: usize = 64;

const NO_SUCH_DEVICE: &str = "no such device on this account";
const NO_SETUP_DEVICE: &str = "no device in setup mode with this code is online";

/// The API's routes.
pub fn app(state: AppState) -> axum::Router {
    axum::Router::new()
        .route("/api/v1/health", get(health))
        .route("/api/v1/signup", post(signup))
        .route("/api/v1/login", post(login))
        .route("/api/v1/logout", post(logout))
        .route("/api/v1/controllers", post(register_controller).get(list_controllers))
        .route("/api/v1/controllers/{id}", delete(remove_controller))
        .route("/api/v1/devices", get(list_devices))
        .route("/api/v1/devices/{id}/command", post(command))
        .route("/api/v1/devices/{id}/events", get(events))
        .route("/api/v1/devices/{id}/members", post(add_member))
        .route("/api/v1/devices/{id}/members/{controller}", delete(remove_member))
        .route("/api/v1/pair", post(pair))
        .route("/api/v1/link", get(link))
        .route("/api/v1/password", post(change_password))
        .route("/openapi.json", get(crate::openapi::serve))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        // Extractors other than JsonBody (none today) get the same limit.
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::map_response(common_headers))
        .with_state(state)
}

async fn common_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    // Answers carry session tokens and device state: never cache them.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    resp
}

async fn no_route() -> ApiError {
    ApiError::not_found("no such API route")
}

async fn wrong_method() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "this method is not allowed on this route")
}

/// Answer of `GET /api/v1/health`.
#[derive(Serialize, ToSchema)]
pub(crate) struct Health {
    /// Always `ok` while the process serves requests.
    #[schema(example = "ok")]
    status: &'static str,
}

#[utoipa::path(get, path = "/api/v1/health", tag = "service",
    responses((status = 200, description = "The cloud is serving", body = Health)))]
pub(crate) async fn health() -> Json<Health> {
    Json(Health { status: "ok" })
}

// ---- extractors ----

/// The peer address of the connection a request came on, inserted by the
/// server for every request.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

/// The client's address for rate limiting. IPv6 clients are keyed by their
/// /64, since one host usually controls a whole /64.
pub(crate) struct ClientIp(IpAddr);

impl<S: Send + Sync> FromRequestParts<S> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let ip = parts.extensions.get::<ClientAddr>().map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |a| a.0.ip());
        let ip = match ip {
            IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
            IpAddr::V6(v6) => IpAddr::V4(v6.to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED)),
            v4 => v4,
        };
        Ok(ClientIp(ip))
    }
}

/// An authenticated session.
pub struct Session {
    /// The account.
    pub account: AccountId,
    /// The SHA-256 of the token, to end or re-check the session.
    pub token_hash: [u8; 32],
}

/// Looks up a bearer token.
pub async fn authenticate(state: &AppState, token: &str) -> Result<Session, ApiError> {
    // Real tokens are 43 characters; anything long is not worth hashing.
    if token.len() > 256 {
        return Err(ApiError::unauthorized());
    }
    let token_hash = auth::token_hash(token);
    match state.store.session_account(token_hash, unix_now()).await? {
        Some(account) => Ok(Session { account, token_hash }),
        None => Err(ApiError::unauthorized()),
    }
}

fn header_token(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(auth::bearer)
}

impl FromRequestParts<AppState> for Session {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let token = header_token(&parts.headers).ok_or_else(ApiError::unauthorized)?;
        authenticate(state, token).await
    }
}

/// A JSON request body (see the module docs for the rules).
pub struct JsonBody<T>(pub T);

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
}

fn too_large() -> ApiError {
    ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, format!("request body is larger than the {MAX_BODY}-byte limit"))
}

fn hit_length_limit(e: &axum::Error) -> bool {
    let mut source = e.source();
    while let Some(s) = source {
        if s.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = s.source();
    }
    false
}

/// Turns a serde_json error into a sentence for the client.
fn json_error(e: &serde_json::Error) -> ApiError {
    use serde_json::error::Category;
    match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => ApiError::bad_request(format!("malformed JSON: {e}")),
        Category::Data => ApiError::bad_request(format!("invalid request: {e}")),
    }
}

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _: &S) -> Result<Self, Self::Rejection> {
        let (parts, body) = req.into_parts();
        let declared =
            parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        // Refuse before reading a byte, so a huge upload costs us nothing.
        if declared.is_some_and(|len| len > MAX_BODY as u64) {
            return Err(too_large());
        }
        if !is_json(&parts.headers) {
            return Err(ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "only application/json bodies are accepted"));
        }
        let bytes = match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, MAX_BODY)).await {
            Err(_) => {
                return Err(ApiError::new(StatusCode::REQUEST_TIMEOUT, "the request body did not arrive in time"))
            }
            Ok(Err(e)) if hit_length_limit(&e) => return Err(too_large()),
            Ok(Err(_)) => return Err(ApiError::bad_request("could not read the request body")),
            Ok(Ok(b)) => b,
        };
        serde_json::from_slice(&bytes).map(JsonBody).map_err(|e| json_error(&e))
    }
}

fn check_name(raw: &str) -> Result<String, ApiError> {
    let name = raw.trim();
    if name.is_empty() || name.chars().count() > MAX_NAME_LEN || name.chars().any(char::is_control) {
        return Err(ApiError::bad_request(format!(
            "name must be 1 to {MAX_NAME_LEN} characters without control characters"
        )));
    }
    Ok(name.to_owned())
}

// ---- accounts ----

/// Body of `POST /signup` and `POST /login`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Credentials {
    /// Compared after trimming and lowercasing.
    #[schema(max_length = 254, example = "alice@example.com")]
    email: String,
    /// 8 to 1,024 characters.
    #[schema(min_length = 8, max_length = 1024, example = "correct horse battery")]
    password: String,
}

/// Answer of `POST /signup`.
#[derive(Serialize, ToSchema)]
pub(crate) struct SignupAnswer {
    /// The new account's id.
    account: String,
}

/// Answer of `POST /login`.
#[derive(Serialize, ToSchema)]
pub(crate) struct LoginAnswer {
    /// The bearer token (43 characters of base64url); only its SHA-256 is stored.
    token: String,
    /// When the session ends, in Unix seconds.
    expires_at: u64,
}

/// Takes one attempt from the buckets of `ip` and of `who` (an email or an
/// account) for `action`, or answers 429 with the wait.
fn rate_limit(state: &AppState, action: &str, ip: IpAddr, who: &str) -> Result<(), ApiError> {
    let keys = [format!("{action} ip {ip}"), format!("{action} who {who}")];
    state.limiter.check(&keys, Instant::now()).map_err(|wait| {
        // Round up: a client that waits the advertised time must succeed.
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        ApiError::too_many(secs.max(1))
    })
}

async fn run_hash<T: Send + 'static>(state: &AppState, f: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
    // The semaphore lives as long as the state and is never closed.
    let _slot = state.hash_slots.acquire().await.map_err(ApiError::internal)?;
    tokio::task::spawn_blocking(f).await.map_err(ApiError::internal)
}

#[utoipa::path(post, path = "/api/v1/signup", tag = "accounts", request_body = Credentials,
    responses(
        (status = 201, description = "Account created", body = SignupAnswer),
        (status = 409, description = "An account with this email exists", body = ErrorBody),
        (status = 429, description = "Too many attempts from this address or for this email", body = ErrorBody),
    ))]
pub(crate) async fn signup(
    State(s): State<AppState>,
    ClientIp(ip): ClientIp,
    JsonBody(c): JsonBody<Credentials>,
) -> Result<Response, ApiError> {
    let email = auth::normalize_email(&c.email)?;
    auth::check_new_password(&c.password)?;
    rate_limit(&s, "signup", ip, &email)?;
    let hash = run_hash(&s, move || auth::hash_password(&c.password)).await??;
    match s.store.create_account(email, hash).await? {
        Some(account) => {
            tracing::info!(%account, "account created");
            Ok((StatusCode::CREATED, Json(SignupAnswer { account: account.as_str().to_owned() })).into_response())
        }
        None => Err(ApiError::new(StatusCode::CONFLICT, "an account with this email already exists")),
    }
}

#[utoipa::path(post, path = "/api/v1/login", tag = "accounts", request_body = Credentials,
    responses(
        (status = 200, description = "A new session", body = LoginAnswer),
        (status = 401, description = "Wrong email or password (the same answer for an unknown email)", body = ErrorBody),
        (status = 429, description = "Too many attempts from this address or for this email", body = ErrorBody),
    ))]
pub(crate) async fn login(
    State(s): State<AppState>,
    ClientIp(ip): ClientIp,
    JsonBody(c): JsonBody<Credentials>,
) -> Result<Json<LoginAnswer>, ApiError> {
    let email = auth::normalize_email(&c.email)?;
    rate_limit(&s, "login", ip, &email)?;
    let wrong = || ApiError::new(StatusCode::UNAUTHORIZED, "wrong email or password");
    let found = s.store.account_by_email(email).await?;
    // No account enumeration (issue 7): an unknown email, a password of the
    // wrong length and a wrong password all get the same answer after the
    // same Argon2id work, checked against a dummy hash when there is no
    // account (`auth::dummy_hash`, counted by `auth::dummy_verifications`).
    let (account, phc) = match found {
        Some((account, phc)) if auth::password_len_ok(&c.password) => (Some(account), phc),
        _ => (None, auth::dummy_hash().to_owned()),
    };
    let ok = run_hash(&s, move || auth::verify_password(&phc, &c.password)).await?;
    let account = match account {
        Some(a) if ok => a,
        _ => return Err(wrong()),
    };
    let (token, token_hash) = auth::new_token();
    let expires_at = unix_now().saturating_add(s.session_ttl.as_secs().max(1));
    s.store.create_session(token_hash, account.clone(), expires_at).await?;
    tracing::info!(%account, "logged in");
    Ok(Json(LoginAnswer { token, expires_at }))
}

/// `POST /logout`: ends this session (its token is deleted, so it fails
/// from the next request on, and live links close at their next check).
#[utoipa::path(post, path = "/api/v1/logout", tag = "accounts", security(("bearer" = [])),
    responses((status = 204, description = "The session ended")))]
pub(crate) async fn logout(State(s): State<AppState>, session: Session) -> Result<StatusCode, ApiError> {
    s.store.delete_session(session.token_hash).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Body of `POST /password`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PasswordChange {
    /// The current password: a stolen session token alone cannot take the account over.
    #[schema(min_length = 8, max_length = 1024)]
    old_password: String,
    /// 8 to 1,024 characters.
    #[schema(min_length = 8, max_length = 1024)]
    new_password: String,
}

/// `POST /password`: changes the account's password and ends every session
/// of the account, this one included (issue 7, "logout and password change
/// revoke them"). Attempts are rate-limited per account and per address
/// like logins, so a stolen token cannot be used to guess the password.
#[utoipa::path(post, path = "/api/v1/password", tag = "accounts", security(("bearer" = [])), request_body = PasswordChange,
    responses(
        (status = 204, description = "Password changed; every session of the account ended, log in again"),
        (status = 403, description = "The current password is wrong", body = ErrorBody),
        (status = 429, description = "Too many attempts for this account or from this address", body = ErrorBody),
    ))]
pub(crate) async fn change_password(
    State(s): State<AppState>,
    ClientIp(ip): ClientIp,
    session: Session,
    JsonBody(body): JsonBody<PasswordChange>,
) -> Result<StatusCode, ApiError> {
    auth::check_new_password(&body.new_password)?;
    rate_limit(&s, "password", ip, session.account.as_str())?;
    let Some(phc) = s.store.password_hash_of(session.account.clone()).await? else {
        // The session outlived its account; nothing to change.
        return Err(ApiError::unauthorized());
    };
    let old = body.old_password;
    let ok = auth::password_len_ok(&old) && run_hash(&s, move || auth::verify_password(&phc, &old)).await?;
    if !ok {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "the current password is wrong"));
    }
    let new = body.new_password;
    let hash = run_hash(&s, move || auth::hash_password(&new)).await??;
    let ended = s.store.change_password(session.account.clone(), hash).await?;
    tracing::info!(account = %session.account, sessions_ended = ended, "password changed");
    Ok(StatusCode::NO_CONTENT)
}

/// Body of `POST /controllers`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ControllerBody {
    /// The controller's P-256 signing key: SEC1 uncompressed, base64url without padding.
    #[schema(value_type = String, pattern = "^[A-Za-z0-9_-]{87}$")]
    public_key: PublicKey,
    /// 1 to 64 characters after trimming, no control characters.
    #[schema(min_length = 1, max_length = 64)]
    name: String,
}

/// Answer of `POST /controllers`.
#[derive(Serialize, ToSchema)]
pub(crate) struct ControllerAnswer {
    /// The controller id (hash of the key).
    #[schema(value_type = String)]
    controller: ControllerId,
}

#[utoipa::path(post, path = "/api/v1/controllers", tag = "accounts", security(("bearer" = [])), request_body = ControllerBody,
    responses((status = 201, description = "Registered (or renamed: idempotent)", body = ControllerAnswer)))]
pub(crate) async fn register_controller(
    State(s): State<AppState>,
    session: Session,
    JsonBody(body): JsonBody<ControllerBody>,
) -> Result<Response, ApiError> {
    let name = check_name(&body.name)?;
    let id = body.public_key.controller_id();
    s.store.upsert_controller(session.account, id.to_string(), body.public_key.to_sec1(), name).await?;
    Ok((StatusCode::CREATED, Json(ControllerAnswer { controller: id })).into_response())
}

/// One controller in `GET /controllers`.
#[derive(Serialize, ToSchema)]
pub(crate) struct ControllerInfo {
    /// The controller id (hash of the key).
    #[schema(value_type = String)]
    id: ControllerId,
    /// Its P-256 signing key, SEC1 uncompressed, base64url (to rename it with `POST /controllers`).
    public_key: String,
    /// The name it registered with.
    name: String,
    /// Unix seconds when it was first registered.
    created_at: u64,
}

/// Answer of `GET /controllers`.
#[derive(Serialize, ToSchema)]
pub(crate) struct ControllerList {
    /// Oldest first.
    controllers: Vec<ControllerInfo>,
}

/// `GET /controllers`: the controllers this account registered (the web
/// app's controllers page). The cloud's list, for people: what each may do
/// is on the devices' access lists.
#[utoipa::path(get, path = "/api/v1/controllers", tag = "accounts", security(("bearer" = [])),
    responses((status = 200, description = "This account's controllers", body = ControllerList)))]
pub(crate) async fn list_controllers(State(s): State<AppState>, session: Session) -> Result<Json<ControllerList>, ApiError> {
    let rows = s.store.controllers_of(session.account).await?;
    let controllers = rows
        .into_iter()
        .filter_map(|r| {
            Some(ControllerInfo { id: r.id.parse().ok()?, public_key: b64::encode(&r.public_key), name: r.name, created_at: r.created_at })
        })
        .collect();
    Ok(Json(ControllerList { controllers }))
}

/// `DELETE /controllers/{id}`: forget one of this account's controllers.
/// Its access on devices is unchanged: revoking is the devices' business.
#[utoipa::path(delete, path = "/api/v1/controllers/{id}", tag = "accounts", security(("bearer" = [])),
    params(("id" = String, Path, description = "Controller id (32 lowercase hex digits)")),
    responses(
        (status = 204, description = "The account no longer lists the controller"),
        (status = 404, description = "This account has no controller with this id", body = ErrorBody),
    ))]
pub(crate) async fn remove_controller(
    State(s): State<AppState>,
    session: Session,
    path: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let not_found = || ApiError::not_found("this account has no controller with this id");
    let Ok(Path(raw)) = path else { return Err(not_found()) };
    let id: ControllerId = raw.parse().map_err(|_| not_found())?;
    if s.store.delete_controller(session.account, id.to_string()).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(not_found())
    }
}

// ---- devices ----

/// One device in `GET /devices`.
#[derive(Serialize, ToSchema)]
pub(crate) struct DeviceInfo {
    #[schema(value_type = String)]
    id: DeviceId,
    name: String,
    /// `plug`, `energy_plug`, `motion_sensor`, …
    #[schema(value_type = String)]
    kind: hearth_proto::capability::DeviceKind,
    online: bool,
    /// The device's manufacturer certificate, DER in base64url.
    certificate: String,
    /// The last signed state report, base64url (sealed for the controllers).
    last_state: Option<String>,
    /// Whether the device was shared with this account rather than owned.
    shared: bool,
    /// `owner` or `member`.
    #[schema(example = "owner")]
    role: &'static str,
}

/// Answer of `GET /devices`.
#[derive(Serialize, ToSchema)]
pub(crate) struct DeviceList {
    devices: Vec<DeviceInfo>,
}

#[utoipa::path(get, path = "/api/v1/devices", tag = "devices", security(("bearer" = [])),
    responses((status = 200, description = "Devices owned by or shared with this account", body = DeviceList)))]
pub(crate) async fn list_devices(State(s): State<AppState>, session: Session) -> Result<Json<DeviceList>, ApiError> {
    let rows = s.store.devices_of(session.account).await?;
    // Where each device's link is: this node, or another one (cluster mode).
    let ids: Vec<DeviceId> = rows.iter().map(|d| d.id.clone()).collect();
    let mut presence = s.device_presence(&ids).await.into_iter();
    let devices = rows
        .into_iter()
        .map(|d| {
            // The link's copy is newer than the database's while the device
            // is online (the database write may still be in flight).
            let (online, link_state) = presence.next().unwrap_or((false, None));
            let last_state = link_state.or(d.last_state);
            DeviceInfo {
                online,
                certificate: b64::encode(&d.certificate),
                last_state: last_state.map(b64::encode),
                role: if d.shared { "member" } else { "owner" },
                shared: d.shared,
                id: d.id,
                name: d.name,
                kind: d.kind,
            }
        })
        .collect();
    Ok(Json(DeviceList { devices }))
}

/// The device `raw` names, if it exists and belongs to `account`. Every
/// other case gets the same 404, so guessing ids reveals nothing.
pub async fn owned_device(state: &AppState, account: &AccountId, raw: &str) -> Result<DeviceId, ApiError> {
    let Ok(id) = raw.parse::<DeviceId>() else { return Err(ApiError::not_found(NO_SUCH_DEVICE)) };
    match state.store.device_owner(id.clone()).await? {
        Some(owner) if &owner == account => Ok(id),
        _ => Err(ApiError::not_found(NO_SUCH_DEVICE)),
    }
}

/// The device `raw` names, if `account` owns it or it was shared with the
/// account (a routing member). Used for what the device itself guards:
/// commands (it checks the signer against its access list) and sealed
/// history (only controllers it encrypts for can read it).
pub async fn reachable_device(state: &AppState, account: &AccountId, raw: &str) -> Result<DeviceId, ApiError> {
    let Ok(id) = raw.parse::<DeviceId>() else { return Err(ApiError::not_found(NO_SUCH_DEVICE)) };
    match state.store.device_access(id.clone(), account.clone()).await? {
        Some(_) => Ok(id),
        None => Err(ApiError::not_found(NO_SUCH_DEVICE)),
    }
}

fn route_error(e: RouteError) -> ApiError {
    match e {
        RouteError::Offline => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "device is offline"),
        RouteError::TooLarge => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the envelope does not fit a {MAX_FRAME_LEN}-byte device frame"),
        ),
        RouteError::Overflow | RouteError::WentAway | RouteError::Unavailable => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
        RouteError::Conflict => ApiError::new(StatusCode::CONFLICT, e.to_string()),
        RouteError::Timeout => ApiError::new(StatusCode::GATEWAY_TIMEOUT, e.to_string()),
    }
}

/// Body of `POST /devices/{id}/command`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CommandBody {
    /// A command signed by a controller (COSE_Sign1), base64url.
    envelope: String,
}

/// Answer of `POST /devices/{id}/command`.
#[derive(Serialize, ToSchema)]
pub(crate) struct CommandAnswer {
    /// The device's signed (and sealed) result, base64url.
    result: String,
}

#[utoipa::path(post, path = "/api/v1/devices/{id}/command", tag = "devices", security(("bearer" = [])),
    params(("id" = String, Path, description = "Device id (24 lowercase hex digits)")),
    request_body = CommandBody,
    responses(
        (status = 200, description = "The device's answer", body = CommandAnswer),
        (status = 202, description = "The device is offline and the command is a revoke signed by a controller registered to this account (key id = its controller, signature checked with the registered key): the cloud holds it (at most 30 days) and sends it before anything else when the device reconnects", body = ErrorBody),
        (status = 404, description = "No such device on this account", body = ErrorBody),
        (status = 409, description = "A command with this counter is already waiting (for an offline device: a different revoke with this controller and counter is held)", body = ErrorBody),
        (status = 503, description = "The device is offline (and the command is not a revoke the cloud may hold), or its queue is full", body = ErrorBody),
        (status = 504, description = "The device did not answer in time", body = ErrorBody),
    ))]
pub(crate) async fn command(
    State(s): State<AppState>,
    session: Session,
    path: Result<Path<String>, PathRejection>,
    JsonBody(body): JsonBody<CommandBody>,
) -> Result<Json<CommandAnswer>, ApiError> {
    let Ok(Path(raw)) = path else { return Err(ApiError::not_found(NO_SUCH_DEVICE)) };
    // The device decides whether the signer may act; the cloud only routes
    // for the accounts the owner shared it with.
    let device = reachable_device(&s, &session.account, &raw).await?;
    let envelope = b64::decode(&body.envelope).map_err(|_| ApiError::bad_request("envelope is not base64url"))?;
    let peek = hearth_proto::message::peek_command(&envelope)
        .map_err(|e| ApiError::bad_request(format!("envelope is not a signed command: {e}")))?;
    if peek.device != device {
        return Err(ApiError::bad_request(format!("the command is for device {}, not {device}", peek.device)));
    }
    // Issue 3: a revoke for an offline device is held and sent first on
    // reconnect, if it verifies with a controller key of the caller's account
    // (`device_link::hold_revoke`; otherwise the usual 503).
    let revoke = hearth_proto::message::peek_is_revoke(&envelope).then(|| envelope.clone());
    // The device's link may be on this node or (cluster mode) another.
    let result = match s.route_command(&device, envelope, peek.controller.clone(), peek.counter).await {
        Err(RouteError::Offline) if revoke.is_some() => {
            return Err(crate::device_link::hold_revoke(&s, &session.account, &device, &peek, revoke.unwrap_or_default()).await)
        }
        other => other.map_err(route_error)?,
    };
    Ok(Json(CommandAnswer { result: b64::encode(result) }))
}

/// Query of `GET /devices/{id}/events`.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct EventsQuery {
    /// Only events with a larger `seq` (what the client already has).
    #[serde(default)]
    after: u64,
}

/// Most events in one answer; a client pages with `after`.
const EVENTS_PAGE: u64 = 200;

/// One stored report in `GET /devices/{id}/events`.
#[derive(Serialize, ToSchema)]
pub(crate) struct Event {
    /// The cloud's sequence number for this device's history.
    seq: u64,
    /// When it arrived, Unix seconds.
    at: u64,
    /// The device's signed, sealed report, base64url.
    envelope: String,
}

/// Answer of `GET /devices/{id}/events`.
#[derive(Serialize, ToSchema)]
pub(crate) struct EventList {
    /// At most 200, oldest first; ask again with `after` = the last `seq`.
    events: Vec<Event>,
}

/// `GET /devices/{id}/events?after=N`: the device's stored sealed reports,
/// oldest first. The cloud cannot read them; controllers decrypt.
#[utoipa::path(get, path = "/api/v1/devices/{id}/events", tag = "devices", security(("bearer" = [])),
    params(("id" = String, Path, description = "Device id (24 lowercase hex digits)"), EventsQuery),
    responses(
        (status = 200, description = "Stored sealed reports", body = EventList),
        (status = 404, description = "No such device on this account", body = ErrorBody),
    ))]
pub(crate) async fn events(
    State(s): State<AppState>,
    session: Session,
    path: Result<Path<String>, PathRejection>,
    query: Result<axum::extract::Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<EventList>, ApiError> {
    let Ok(Path(raw)) = path else { return Err(ApiError::not_found(NO_SUCH_DEVICE)) };
    let device = reachable_device(&s, &session.account, &raw).await?;
    let after = query.map(|q| q.0.after).map_err(|_| ApiError::bad_request("query must be ?after=<number>"))?;
    let rows = s.store.events_of(device, after, EVENTS_PAGE).await?;
    let events = rows.into_iter().map(|e| Event { seq: e.seq, at: e.at, envelope: b64::encode(&e.envelope) }).collect();
    Ok(Json(EventList { events }))
}

/// Body of `POST /devices/{id}/members`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct MemberBody {
    /// The controller the device now lists (32 lowercase hex digits).
    #[schema(value_type = String, pattern = "^[0-9a-f]{32}$")]
    controller: ControllerId,
}

/// Answer of `POST /devices/{id}/members`.
#[derive(Serialize, ToSchema)]
pub(crate) struct MemberAnswer {
    /// `member` (another account now routes to the device) or `owner` (the
    /// controller is the owner's own: nothing changes).
    #[schema(example = "member")]
    routing: &'static str,
}

/// `POST /devices/{id}/members`: the owner tells the cloud it shared the
/// device with `controller` (after the device confirmed the signed grant),
/// so the account that registered that controller can route to it. This
/// grants nothing on the device: its access list is the only authority.
#[utoipa::path(post, path = "/api/v1/devices/{id}/members", tag = "devices", security(("bearer" = [])),
    params(("id" = String, Path, description = "Device id (24 lowercase hex digits)")),
    request_body = MemberBody,
    responses(
        (status = 201, description = "Shared: the controller's account now routes to the device", body = MemberAnswer),
        (status = 200, description = "The controller is the owner account's own", body = MemberAnswer),
        (status = 404, description = "No such device owned by this account, or no account registered the controller", body = ErrorBody),
        (status = 409, description = "Several accounts registered this controller key", body = ErrorBody),
    ))]
pub(crate) async fn add_member(
    State(s): State<AppState>,
    session: Session,
    path: Result<Path<String>, PathRejection>,
    JsonBody(body): JsonBody<MemberBody>,
) -> Result<Response, ApiError> {
    let Ok(Path(raw)) = path else { return Err(ApiError::not_found(NO_SUCH_DEVICE)) };
    let device = owned_device(&s, &session.account, &raw).await?;
    match s.store.add_member(device.clone(), body.controller.to_string(), unix_now()).await? {
        MemberAdded::Added(account) => {
            s.device_members_set(&device, s.store.members_of(device.clone()).await?).await;
            tracing::info!(%device, member = %account, "device shared with another account");
            Ok((StatusCode::CREATED, Json(MemberAnswer { routing: "member" })).into_response())
        }
        MemberAdded::Owner => Ok((StatusCode::OK, Json(MemberAnswer { routing: "owner" })).into_response()),
        MemberAdded::UnknownController => Err(ApiError::not_found("no account registered this controller")),
        MemberAdded::Ambiguous => Err(ApiError::new(
            StatusCode::CONFLICT,
            "several accounts registered this controller key; the cloud cannot tell whose it is",
        )),
    }
}

/// `DELETE /devices/{id}/members/{controller}`: the owner revoked
/// `controller` on the device; stop routing for its account unless the
/// device is still shared with another of that account's controllers.
#[utoipa::path(delete, path = "/api/v1/devices/{id}/members/{controller}", tag = "devices", security(("bearer" = [])),
    params(
        ("id" = String, Path, description = "Device id (24 lowercase hex digits)"),
        ("controller" = String, Path, description = "Controller id (32 lowercase hex digits)"),
    ),
    responses(
        (status = 204, description = "The controller's account no longer routes to the device"),
        (status = 404, description = "No such device owned by this account, or not shared with this controller", body = ErrorBody),
    ))]
pub(crate) async fn remove_member(
    State(s): State<AppState>,
    session: Session,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let Ok(Path((raw, controller))) = path else { return Err(ApiError::not_found(NO_SUCH_DEVICE)) };
    let device = owned_device(&s, &session.account, &raw).await?;
    let controller: ControllerId =
        controller.parse().map_err(|_| ApiError::bad_request("not a controller id"))?;
    if !s.store.remove_member(device.clone(), controller.to_string()).await? {
        return Err(ApiError::not_found("this device is not shared with this controller"));
    }
    s.device_members_set(&device, s.store.members_of(device.clone()).await?).await;
    tracing::info!(%device, %controller, "device no longer shared with a controller");
    Ok(StatusCode::NO_CONTENT)
}

/// Body of `POST /pair`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PairBody {
    /// The lookup value derived from the setup code.
    code_lookup: String,
    /// The device id from a QR label. When present the request is routed by
    /// id, so a wrong secret still reaches the device and is counted there
    /// (its 20-attempt budget is the only authority); a typed code has only
    /// the lookup value.
    #[serde(default)]
    #[schema(value_type = Option<String>, pattern = "^[0-9a-f]{24}$")]
    device: Option<DeviceId>,
    /// 1 to 64 characters after trimming, no control characters.
    #[schema(min_length = 1, max_length = 64)]
    name: String,
    /// The controller's pairing request (`hearth_proto::pairing::PairRequest`:
    /// `controller_key`, `nonce`, `mac`, all base64url).
    #[schema(value_type = Object)]
    request: PairRequest,
}

/// Answer of `POST /pair`.
#[derive(Serialize, ToSchema)]
pub(crate) struct PairAnswer {
    #[schema(value_type = String)]
    device: DeviceId,
    /// The device's answer (`hearth_proto::pairing::PairResponse`), for the
    /// controller to verify with the setup secret.
    #[schema(value_type = Object)]
    response: hearth_proto::pairing::PairResponse,
}

fn bad_device_answer(why: &str) -> ApiError {
    tracing::warn!(why, "device sent an invalid pairing answer");
    ApiError::new(StatusCode::BAD_GATEWAY, format!("the device's pairing answer is invalid: {why}"))
}

#[utoipa::path(post, path = "/api/v1/pair", tag = "devices", security(("bearer" = [])), request_body = PairBody,
    responses(
        (status = 200, description = "Paired: the device is now this account's", body = PairAnswer),
        (status = 404, description = "No device in setup mode with this code is online", body = ErrorBody),
        (status = 409, description = "The device refused (`pair_error` says why)", body = ErrorBody),
        (status = 502, description = "The device's answer is invalid", body = ErrorBody),
        (status = 503, description = "The device went offline during pairing", body = ErrorBody),
        (status = 504, description = "The device did not answer in time", body = ErrorBody),
    ))]
pub(crate) async fn pair(
    State(s): State<AppState>,
    session: Session,
    JsonBody(body): JsonBody<PairBody>,
) -> Result<Json<PairAnswer>, ApiError> {
    let name = check_name(&body.name)?;
    let found = match &body.device {
        Some(id) if s.device_online(id).await => Some(id.clone()),
        Some(_) => None,
        None => s.find_setup_device(&body.code_lookup).await,
    };
    let Some(device) = found else {
        return Err(ApiError::not_found(NO_SETUP_DEVICE));
    };
    let (outcome, cert_key) = match s.route_pairing(&device, body.request.clone()).await {
        Ok(answer) => answer,
        Err(RouteError::Offline) => return Err(ApiError::not_found(NO_SETUP_DEVICE)),
        Err(RouteError::Timeout) => {
            return Err(ApiError::new(StatusCode::GATEWAY_TIMEOUT, "the device did not answer the pairing request"))
        }
        Err(RouteError::WentAway) => {
            return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the device went offline during pairing"))
        }
        Err(e) => return Err(route_error(e)),
    };
    let resp = match outcome {
        PairOutcome::Ok(resp) => resp,
        PairOutcome::Err(e) => return Err(ApiError::pair_refused(e)),
    };
    // Record ownership only on the device's own signed word, checked with
    // the key from its certificate: the id and key must be the certified
    // ones and the confirmation must name this request's controller.
    if resp.device != device {
        return Err(bad_device_answer("it names another device"));
    }
    if resp.device_key != cert_key {
        return Err(bad_device_answer("its key is not the one in its certificate"));
    }
    let confirmation = verify_confirmation(&resp.confirmation, &device, &cert_key)
        .map_err(|_| bad_device_answer("the confirmation does not verify"))?;
    if confirmation.controller != body.request.controller_key.controller_id() || confirmation.role != Role::Owner {
        return Err(bad_device_answer("the confirmation does not name this controller as owner"));
    }
    s.store.pair_device(device.clone(), session.account.clone(), name, unix_now()).await?;
    s.device_owner_set(&device, session.account.clone()).await;
    tracing::info!(%device, account = %session.account, "device paired");
    Ok(Json(PairAnswer { device, response: resp }))
}

// ---- controller link ----

/// Query of `GET /link`.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct LinkQuery {
    /// The session token, for browsers (whose WebSocket API cannot set headers).
    token: Option<String>,
}

/// `GET /api/v1/link`: the controller WebSocket. The token comes from the
/// `Authorization: Bearer` header or, for browsers (whose WebSocket API
/// cannot set headers), from the `token` query parameter.
#[utoipa::path(get, path = "/api/v1/link", tag = "devices", security(("bearer" = [])), params(LinkQuery),
    responses(
        (status = 101, description = "WebSocket: `ControllerPush` JSON down, `ControllerFrame` JSON up"),
        (status = 400, description = "Not a WebSocket upgrade request", body = ErrorBody),
    ))]
pub(crate) async fn link(
    State(s): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<LinkQuery>, QueryRejection>,
    guard: Option<Extension<ConnGuard>>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let query_token = query.ok().and_then(|Query(q)| q.token);
    let token = header_token(&headers).or(query_token.as_deref()).ok_or_else(ApiError::unauthorized)?;
    let session = authenticate(&s, token).await?;
    let upgrade = upgrade
        .map_err(|_| ApiError::bad_request("this route needs a WebSocket upgrade (GET with `Upgrade: websocket`)"))?;
    let guard = guard.map(|Extension(g)| g);
    // Cluster mode (ADR 0008): subscribe to the account's pushes before the
    // client learns its link is up, so it misses nothing sent after that.
    let account_sub = match &s.cluster {
        Some(c) => Some(c.account_up(&session.account).await),
        None => None,
    };
    Ok(upgrade
        .max_message_size(MAX_FRAME_LEN)
        .max_frame_size(MAX_FRAME_LEN)
        .on_upgrade(move |socket| crate::controller_link::run(s, socket, session, guard, account_sub)))
}
