//! Accept loops for the two ports: TCP, a TLS handshake under a deadline,
//! then HTTP/1.1 (API port) or the device link (device port).
//!
//! Each connection holds a [`ConnGuard`]: a permit from its port's
//! connection limit and a token that [`crate::serve`] waits on at shutdown.
//! A WebSocket keeps its guard after the HTTP connection hands it over, so
//! upgraded links count against the limit and are waited for too.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;
use tracing::Instrument;

use crate::api::ClientAddr;
use crate::AppState;

/// Open connections allowed per port.
pub const MAX_CONNECTIONS: usize = 10_000;
/// Time allowed for a TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for a request's headers to arrive.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Time in-flight HTTP requests get to finish at shutdown.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Held by every connection (and every link upgraded from one).
#[derive(Clone)]
pub struct ConnGuard(#[allow(dead_code)] Arc<(OwnedSemaphorePermit, mpsc::Sender<()>)>);

/// What every accept loop needs.
#[derive(Clone)]
pub struct Acceptor {
    pub tls: TlsAcceptor,
    pub limit: Arc<Semaphore>,
    pub done: mpsc::Sender<()>,
    pub stop: watch::Receiver<bool>,
}

/// Accepts connections until shutdown, handing each to `handle` in its own
/// task with its own tracing span.
async fn accept_loop<F, Fut>(listener: TcpListener, acc: Acceptor, kind: &'static str, handle: F)
where
    F: Fn(tokio_rustls::server::TlsStream<TcpStream>, SocketAddr, ConnGuard) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut stop = acc.stop.clone();
    loop {
        // Waiting for a permit first means a full server stops accepting and
        // lets the kernel backlog absorb the rest, instead of accepting and
        // dropping.
        let permit = tokio::select! {
            p = acc.limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            () = crate::stopped(&mut stop) => return,
        };
        let (tcp, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    tracing::warn!(error = %e, kind, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = crate::stopped(&mut stop) => return,
        };
        let _ = tcp.set_nodelay(true);
        let guard = ConnGuard(Arc::new((permit, acc.done.clone())));
        let span = tracing::info_span!("conn", kind, peer = %addr, device = tracing::field::Empty);
        let tls = acc.tls.clone();
        let handle = handle.clone();
        // The handshake runs in the connection's task so a slow client
        // cannot hold up the accept loop.
        tokio::spawn(
            async move {
                let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        tracing::info!(error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::info!("TLS handshake timed out");
                        return;
                    }
                };
                handle(stream, addr, guard).await;
            }
            .instrument(span),
        );
    }
}

/// Serves the HTTPS API port.
pub async fn serve_api(listener: TcpListener, acc: Acceptor, app: axum::Router) {
    let stop = acc.stop.clone();
    accept_loop(listener, acc, "api", move |stream, addr, guard| {
        let app = app.clone();
        let mut stop = stop.clone();
        async move {
            let guard_ext = guard.clone();
            let svc = app.map_request(move |mut req: hyper::Request<Incoming>| {
                req.extensions_mut().insert(ClientAddr(addr));
                req.extensions_mut().insert(guard_ext.clone());
                req
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT);
            let conn = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc)).with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "HTTP connection ended with an error");
                    }
                }
                () = crate::stopped(&mut stop) => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(DRAIN_TIMEOUT, conn).await;
                }
            }
            drop(guard);
        }
    })
    .await;
}

/// Serves the device port.
pub async fn serve_devices(listener: TcpListener, acc: Acceptor, state: AppState) {
    accept_loop(listener, acc, "device", move |stream, _addr, guard| {
        let state = state.clone();
        async move {
            match crate::device_link::run(state, stream).await {
                Ok(()) => tracing::info!("device link closed"),
                Err(e) => tracing::info!(error = %e, "device link ended"),
            }
            drop(guard);
        }
    })
    .await;
}
