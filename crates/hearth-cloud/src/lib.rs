//! The Hearth cloud: accounts, the device registry, and routing of signed
//! envelopes between controllers and devices (ADR 0002).
//!
//! One process serves two TLS ports:
//!
//! * the **API port** (default 8443): HTTPS JSON API and the controller
//!   WebSocket link. Routes, all under `/api/v1`:
//!
//!   | method and path | auth | body → answer |
//!   |---|---|---|
//!   | `GET /health` | – | `{"status":"ok"}` |
//!   | `POST /signup` | – | `{email, password}` → 201 `{"account": "<id>"}`; 409 if the email is taken |
//!   | `POST /login` | – | `{email, password}` → `{"token", "expires_at"}` (Unix seconds); 401; 429 + `Retry-After` |
//!   | `POST /logout` | bearer | → 204 |
//!   | `POST /password` | bearer | `{old_password, new_password}` → 204, every session of the account ended; 403 wrong current password; 429 |
//!   | `POST /controllers` | bearer | `{public_key, name}` → 201 `{"controller": "<id>"}` (idempotent; renames) |
//!   | `GET /controllers` | bearer | → `{"controllers": [{id, public_key, name, created_at}]}`: this account's (web app, ADR 0007) |
//!   | `DELETE /controllers/{id}` | bearer | → 204; 404 (the account stops listing it; devices keep their own lists) |
//!   | `GET /devices` | bearer | → `{"devices": [{id, name, kind, online, certificate, last_state, shared, role}]}`: owned and shared-with-this-account devices |
//!   | `POST /pair` | bearer | `{code_lookup, name, request}` → `{device, response}`; 404; 409 `{error, pair_error}`; 502; 504 |
//!   | `POST /devices/{id}/command` | bearer | `{envelope}` → `{"result": "<envelope>"}` (owner or member account; the device decides); 404; 503; 504 |
//!   | `GET /devices/{id}/events?after=N` | bearer | → the device's stored sealed reports (last 1,000, at most 7 days), paged by `seq`; owner or member; 404 |
//!   | `POST /devices/{id}/members` | bearer (owner) | `{controller}` → 201 `{"routing": "member"}` / 200 `{"routing": "owner"}`; 404; 409 |
//!   | `DELETE /devices/{id}/members/{controller}` | bearer (owner) | → 204; 404 |
//!   | `GET /link` | bearer, or `?token=` for browsers | WebSocket: `ControllerPush` down, `ControllerFrame` up |
//!
//!   `GET /openapi.json` (outside `/api/v1`) is this table as an OpenAPI 3.1 document, generated
//!   from the handlers (`openapi.rs`). Every answer carries the security headers of `headers.rs`.
//!
//!   With `tuf` configured, also `GET /tuf/metadata/{file}` and `GET
//!   /tuf/targets/{path}`: the firmware repository as static files (no auth;
//!   devices verify them with TUF, see `tuf_serve.rs`).
//!
//!   Bodies are `application/json` (else 415), at most 64 KiB (else 413),
//!   with unknown fields refused (400). Every error is `{"error": "..."}`.
//! * the **device port** (default 8444): mutual TLS with certificates from
//!   the manufacturer CA, then length-prefixed JSON frames.
//!
//! The cloud routes signed envelopes but cannot forge them; it records a
//! device under an account only on the device's signed pairing
//! confirmation, checked with the key in the device's certificate.
//!
//! State lives in SQLite or PostgreSQL (the `store` module is the only one
//! with SQL); routing is in memory (the `router` module) on one node, and
//! across nodes over NATS in cluster mode (`cluster`, ADR 0008: needs
//! PostgreSQL). With a metrics listener, `GET /metrics` there serves
//! Prometheus text (`metrics`).
#![forbid(unsafe_code)]

mod api;
mod auth;
mod cluster;
mod controller_link;
mod device_link;
mod error;
mod headers;
mod metrics;
mod openapi;
mod ratelimit;
mod router;
mod server;
mod store;
mod tuf_serve;
mod web;

/// Fuzzing entry points (issue 7); not part of the API.
#[doc(hidden)]
pub use api::fuzzing;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, watch, Semaphore};

/// Direct store access for the load generator (`crates/hearth-bench`), which
/// pre-seeds accounts, sessions and device ownership instead of pairing
/// thousands of simulated devices; not part of the API.
#[doc(hidden)]
pub mod seed {
    pub use crate::auth::token_hash;
    pub use crate::store::{AccountId, Store, StoreError};
}

/// Cluster mode: routing between nodes over NATS (see `cluster.rs`, ADR 0008).
pub use cluster::{ClusterConfig, NodeId, SubjectPrefix};
/// Where the cloud keeps its state (see `store.rs`).
pub use store::{DatabaseUrl, DatabaseUrlError};
/// The firmware update repository the API port serves (see `tuf_serve.rs`).
pub use tuf_serve::{OnlineKeys, TufConfig};
/// The connection limits and deadlines of both ports (see `server.rs`).
pub use server::{
    ACCEPT_RATE, HANDSHAKE_TIMEOUT, HEADER_TIMEOUT, MAX_ACCEPT_RATE, MAX_CONNECTIONS, MAX_CONNECTIONS_PER_ADDRESS, MAX_DEVICE_LINKS,
};

/// Login and signup attempts allowed at once per client IP and per email.
pub const RATE_LIMIT_BURST: u32 = 10;
/// One more attempt is allowed after each interval of this length.
pub const RATE_LIMIT_REFILL: Duration = Duration::from_secs(6);
/// Default lifetime of a login session.
pub const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// How often expired sessions are deleted from the database.
const SESSION_SWEEP_EVERY: Duration = Duration::from_secs(600);
/// How long `serve` waits for open connections to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Everything the cloud needs to run.
#[derive(Debug, Clone)]
pub struct CloudConfig {
    /// The database: a SQLite file (created if missing) for one node, or a
    /// PostgreSQL URL shared by many nodes.
    pub database: DatabaseUrl,
    /// The TLS server certificate and key for both ports
    /// (`PkiDir::cloud_server()`).
    pub server: hearth_pki::CertifiedKey,
    /// The manufacturer CA, PEM; device certificates must chain to it.
    pub manufacturer_ca_pem: String,
    /// How long a login session lasts (e.g. [`DEFAULT_SESSION_TTL`]).
    pub session_ttl: Duration,
    /// The firmware update repository to serve under `/tuf/` (ADR 0004),
    /// with the online keys that renew its timestamp; `None` serves none.
    pub tuf: Option<TufConfig>,
}

/// The bound sockets to serve on. Binding is the caller's job, so it can
/// pick ports (or port 0 in tests) and report them before serving.
#[derive(Debug)]
pub struct Listeners {
    /// The HTTPS API and controller link port.
    pub api: tokio::net::TcpListener,
    /// The device link port.
    pub devices: tokio::net::TcpListener,
}

/// State shared by every handler and link.
pub(crate) struct Shared {
    pub(crate) store: store::Store,
    pub(crate) router: Arc<router::Router>,
    pub(crate) limiter: ratelimit::RateLimiter,
    pub(crate) hash_slots: Semaphore,
    /// Device links registering now, and those waiting to (issue 8).
    pub(crate) link_setups: device_link::SetupGate,
    pub(crate) session_ttl: Duration,
    /// Becomes true when the server shuts down.
    pub(crate) stop: watch::Receiver<bool>,
    /// This node's part of a cluster (ADR 0008); `None` on a single node.
    pub(crate) cluster: Option<Arc<cluster::Cluster>>,
    /// Counters for `/metrics`.
    pub(crate) metrics: Arc<metrics::Metrics>,
}

/// Optional parts of a cloud node, for [`serve_with`].
#[derive(Debug, Default)]
pub struct ServeOptions {
    /// The web app's plain-HTTP loopback listener (ADR 0007).
    pub web: Option<tokio::net::TcpListener>,
    /// Join a cluster of nodes over NATS (ADR 0008). Needs a PostgreSQL
    /// database: nodes share everything but their links.
    pub cluster: Option<ClusterConfig>,
    /// Serve Prometheus metrics (`GET /metrics`, plain HTTP, no auth) on
    /// this listener; bind it where only the scraper can reach it.
    pub metrics: Option<tokio::net::TcpListener>,
    /// New device connections accepted per second; `None`:
    /// [`ACCEPT_RATE`]. Lower it for nodes that share CPUs.
    pub device_accept_rate: Option<u32>,
}

pub(crate) type AppState = Arc<Shared>;

/// Runs the cloud until `shutdown` resolves, then stops accepting, closes
/// every link (devices redial, controllers reconnect), lets in-flight HTTP
/// requests finish for a few seconds, and returns.
///
/// Fails early if the database cannot be opened or migrated, or the TLS
/// material is unusable.
pub async fn serve(
    config: CloudConfig,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_with_web(config, listeners, None, shutdown).await
}

/// [`serve`], plus the web app and the same API on a plain-HTTP listener
/// bound to a loopback address (ADR 0007). Refuses any other address: plain
/// HTTP is only for a browser on the same machine.
pub async fn serve_with_web(
    config: CloudConfig,
    listeners: Listeners,
    web: Option<tokio::net::TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_with(config, listeners, ServeOptions { web, ..ServeOptions::default() }, shutdown).await
}

/// [`serve`] with the optional parts: the web listener, cluster mode over
/// NATS (ADR 0008) and the metrics listener.
pub async fn serve_with(
    config: CloudConfig,
    listeners: Listeners,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let ServeOptions { web, cluster: cluster_config, metrics: metrics_listener, device_accept_rate } = options;
    // Cluster mode shares all state through the database; SQLite is a
    // file on one machine, so nodes on it would each see their own.
    if cluster_config.is_some() {
        anyhow::ensure!(
            matches!(config.database, DatabaseUrl::Postgres(_)),
            "cluster mode (--nats-url) needs a PostgreSQL database shared by every node (--database-url postgres://...); \
             SQLite keeps its state on this machine only"
        );
    }
    if let Some(l) = &web {
        let addr = l.local_addr().context("reading the web listener's address")?;
        anyhow::ensure!(addr.ip().is_loopback(), "the plain-HTTP web listener must be on a loopback address, not {addr}");
    }
    let store = store::Store::connect(&config.database)
        .await
        .with_context(|| format!("opening the database {}", config.database))?;
    let api_tls = hearth_pki::server_config(&config.server, None, &[b"http/1.1"])
        .context("building the API port's TLS configuration")?;
    let device_tls = hearth_pki::server_config(&config.server, Some(&config.manufacturer_ca_pem), &[])
        .context("building the device port's TLS configuration (is the manufacturer CA valid?)")?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let metrics = metrics::Metrics::new();
    let cluster = match &cluster_config {
        Some(c) => Some(
            cluster::Cluster::start(c, store.clone(), metrics.clone(), stop_rx.clone())
                .await
                .context("joining the cluster")?,
        ),
        None => None,
    };
    let router = cluster.as_ref().map_or_else(router::Router::new, |c| c.router());
    let state: AppState = Arc::new(Shared {
        cluster: cluster.clone(),
        metrics: metrics.clone(),
        store: store.clone(),
        router: router.clone(),
        limiter: ratelimit::RateLimiter::new(RATE_LIMIT_BURST, RATE_LIMIT_REFILL),
        hash_slots: Semaphore::new(auth::HASH_SLOTS),
        link_setups: device_link::SetupGate::default(),
        session_ttl: config.session_ttl,
        stop: stop_rx.clone(),
    });

    let acceptor = |tls: rustls::ServerConfig, max: usize, accept_rate: u32| server::Acceptor {
        tls: tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
        limit: Arc::new(Semaphore::new(max)),
        done: done_tx.clone(),
        stop: stop_rx.clone(),
        metrics: metrics.clone(),
        accept_rate,
    };
    let metrics_task = metrics_listener.map(|listener| {
        let (router, metrics, cluster) = (router.clone(), metrics.clone(), cluster.clone());
        let render = Arc::new(move || metrics.render(&router, cluster.as_ref().map(|c| c.connected())));
        tokio::spawn(metrics::serve(listener, render, stop_rx.clone()))
    });
    tracing::info!(
        api = ?listeners.api.local_addr().ok(),
        devices = ?listeners.devices.local_addr().ok(),
        "cloud serving"
    );
    let mut app = api::app(state.clone());
    let mut renewal = None;
    if let Some(tuf) = config.tuf.clone() {
        app = app.merge(tuf_serve::routes(tuf.clone()));
        renewal = Some(tokio::spawn(tuf_serve::renewal_task(tuf, stop_rx.clone())));
    }
    // The web app (ADR 0007) on the API port, and with the same API on
    // the loopback plain-HTTP listener if there is one.
    let web_task = web.map(|listener| {
        let plain = app.clone().merge(web::routes(false, config.manufacturer_ca_pem.clone()));
        let limit = Arc::new(Semaphore::new(server::MAX_CONNECTIONS));
        tokio::spawn(server::serve_loopback_http(listener, limit, done_tx.clone(), stop_rx.clone(), headers::secure(plain, false)))
    });
    app = app.merge(web::routes(true, config.manufacturer_ca_pem.clone()));
    // Security headers on every answer of each listener (issue 7, `headers.rs`).
    let api_task = tokio::spawn(server::serve_api(listeners.api, acceptor(api_tls, server::MAX_CONNECTIONS, server::ACCEPT_RATE), headers::secure(app, true)));
    let device_task = tokio::spawn(server::serve_devices(listeners.devices, acceptor(device_tls, server::MAX_DEVICE_LINKS, device_accept_rate.unwrap_or(server::ACCEPT_RATE)), state.clone()));
    let sweeper = tokio::spawn(sweep_sessions(store, stop_rx.clone()));
    drop(done_tx);
    drop(state);

    shutdown.await;
    tracing::info!("shutting down");
    // Every receiver has been handed out above, so sending cannot fail
    // while they live; if they are gone, there is nothing left to stop.
    let _ = stop_tx.send(true);
    for task in [api_task, device_task, sweeper].into_iter().chain(renewal).chain(web_task).chain(metrics_task) {
        if let Err(e) = task.await {
            tracing::error!(error = %e, "a server task failed");
        }
    }
    // Each connection holds a clone of `done_tx`; recv returns None once
    // the last one is dropped.
    if tokio::time::timeout(SHUTDOWN_GRACE, done_rx.recv()).await.is_err() {
        tracing::warn!("some connections did not close in time");
    }
    if let Some(c) = cluster {
        c.finish().await;
    }
    tracing::info!("stopped");
    Ok(())
}

async fn sweep_sessions(store: store::Store, mut stop: watch::Receiver<bool>) {
    let mut every = tokio::time::interval(SESSION_SWEEP_EVERY);
    loop {
        tokio::select! {
            _ = every.tick() => match store.delete_expired_sessions(store::unix_now()).await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(n, "expired sessions deleted"),
                Err(e) => tracing::warn!(error = %e, "could not delete expired sessions"),
            },
            () = crate::stopped(&mut stop) => return,
        }
    }
}

/// Resolves once the server is shutting down (or can no longer learn
/// whether it is, which means the same).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns must not live across an await, so it is
    // dropped here rather than in the caller's select.
    let _ = stop.wait_for(|s| *s).await;
}
