//! Accept loops for the two ports: TCP, a TLS handshake under a deadline,
//! then HTTP/1.1 (API port) or the device link (device port).
//!
//! Each connection holds a [`ConnGuard`]: a permit from its port's
//! connection limit and a token that [`crate::serve`] waits on at shutdown.
//! A WebSocket keeps its guard after the HTTP connection hands it over, so
//! upgraded links count against the limit and are waited for too.
//!
//! Resource limits (issue 7 "Resource limits"; docs/security.md,
//! Hardening): [`MAX_CONNECTIONS`] on the API port and [`MAX_DEVICE_LINKS`] on the device port in total, and
//! [`MAX_CONNECTIONS_PER_ADDRESS`] per source address (an IPv6 /64 counts
//! as one address), so one client cannot take every slot; a slowloris
//! client loses its slot after [`HANDSHAKE_TIMEOUT`] (TLS) or
//! [`HEADER_TIMEOUT`] (HTTP headers, also the keep-alive idle limit).
//!
//! Reconnect storms (issue 8, "Connection efficiency"): each port accepts
//! at most [`ACCEPT_RATE`] connections a second (after a burst of
//! [`ACCEPT_BURST`]). Beyond that the accept loop waits, so new connections
//! queue in the kernel's listen backlog (and beyond it, in the clients' SYN
//! retries) instead of all starting handshakes that share the CPU so thinly
//! that every one of them times out. The device port also pauses while
//! many authenticated links wait to register (`device_link::SetupGate`).
//! Devices add their own full-jitter backoff. A rate, not a cap on handshakes in flight: silent clients would
//! hold such slots for the whole handshake deadline at no cost to
//! themselves. The "retry after" hint comes after the handshake, from the
//! gate: a link it turns away gets a busy frame naming when to redial
//! (`device_link::BUSY_RETRY_AFTER`); before the handshake a device can
//! learn nothing it could trust.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
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

/// Open connections allowed on the API port (HTTP requests and controller
/// links).
pub const MAX_CONNECTIONS: usize = 10_000;
/// Open device links allowed on the device port: the issue-8 target of
/// 18,000 idle links per node, with the file-descriptor limit of 20,000 per
/// process in mind (docs/deploy.md: size `ulimit -n` above the sum of both
/// limits, or accepts back off on EMFILE).
pub const MAX_DEVICE_LINKS: usize = 18_000;
/// Open connections allowed per port from one source address. A home
/// behind one NAT address holds one link per device plus a few controller
/// links; this leaves room for a large home and still stops one address
/// from filling [`MAX_CONNECTIONS`].
pub const MAX_CONNECTIONS_PER_ADDRESS: usize = 64;
/// Time allowed for a TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for a request's headers to arrive.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Time in-flight HTTP requests get to finish at shutdown.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// New connections accepted per second and port, unless configured
/// otherwise for the device port ([`crate::ServeOptions::device_accept_rate`]).
/// A P-256 mutual-TLS handshake costs the server about a millisecond of
/// CPU, so this keeps a two-core machine busy without starving the links
/// it already has, and still takes back 18,000 devices within ten seconds.
/// Nodes that share CPUs should divide it between them.
pub const ACCEPT_RATE: u32 = 2_000;
/// The largest accept rate that may be configured.
pub const MAX_ACCEPT_RATE: u32 = 100_000;
/// Connections accepted at once before [`ACCEPT_RATE`] applies.
pub const ACCEPT_BURST: f64 = 256.0;
/// How often a paused accept loop looks again whether it may go on.
const BUSY_RECHECK: Duration = Duration::from_millis(10);

/// A token bucket for accepts, on tokio's clock (paused in tests).
struct Pacer {
    /// Accepts per second.
    rate: f64,
    /// Accepts at once: [`ACCEPT_BURST`], or one second's worth if less.
    burst: f64,
    tokens: f64,
    at: tokio::time::Instant,
}

impl Pacer {
    /// `rate` accepts per second, clamped to 1..=[`MAX_ACCEPT_RATE`].
    fn new(rate: u32) -> Self {
        let rate = f64::from(rate.clamp(1, MAX_ACCEPT_RATE));
        let burst = ACCEPT_BURST.min(rate);
        Self { rate, burst, tokens: burst, at: tokio::time::Instant::now() }
    }

    /// Takes a token, or says how long until one is there.
    fn take(&mut self) -> Result<(), Duration> {
        let now = tokio::time::Instant::now();
        let refill = now.saturating_duration_since(self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }
}

/// Held by every connection (and every link upgraded from one).
#[derive(Clone)]
pub struct ConnGuard(#[allow(dead_code)] Arc<(OwnedSemaphorePermit, mpsc::Sender<()>, AddressSlot)>);

/// Open connections per source address, for one port.
#[derive(Default)]
struct PerAddress(Mutex<HashMap<IpAddr, usize>>);

impl PerAddress {
    /// Takes a slot for `ip`, or `None` when it already holds the maximum.
    fn take(self: &Arc<Self>, ip: IpAddr) -> Option<AddressSlot> {
        let key = address_key(ip);
        // A poisoned map only means a panic elsewhere mid-update; the counts are still usable.
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(key).or_insert(0);
        if *n >= MAX_CONNECTIONS_PER_ADDRESS {
            return None;
        }
        *n += 1;
        Some(AddressSlot { table: Arc::clone(self), key })
    }
}

/// Clients get IPv6 addresses by the /64, so one client is one /64;
/// IPv4-mapped addresses count as their IPv4 address.
fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

/// One connection's share of its address's limit; given back on drop.
struct AddressSlot {
    table: Arc<PerAddress>,
    key: IpAddr,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut map = self.table.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.key) {
            *n -= 1;
            // Forgetting idle addresses keeps the map as small as the open connections.
            if *n == 0 {
                map.remove(&self.key);
            }
        }
    }
}

/// What every accept loop needs.
#[derive(Clone)]
pub struct Acceptor {
    pub tls: TlsAcceptor,
    pub limit: Arc<Semaphore>,
    pub done: mpsc::Sender<()>,
    pub stop: watch::Receiver<bool>,
    /// Where refusals and handshakes are counted.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// New connections accepted per second (see [`ACCEPT_RATE`]).
    pub accept_rate: u32,
}

/// Accepts connections until shutdown, handing each to `handle` in its own
/// task with its own tracing span, after `handshake` (TLS) succeeded on it
/// within [`HANDSHAKE_TIMEOUT`]. While `busy` says so, it accepts nothing
/// (the device port: too many links wait to register, see
/// `device_link::SetupGate`).
async fn accept_loop<S, H, HFut, F, Fut>(
    listener: TcpListener,
    acc: Acceptor,
    kind: &'static str,
    busy: impl Fn() -> bool,
    handshake: H,
    handle: F,
) where
    H: Fn(TlsAcceptor, TcpStream) -> HFut + Clone + Send + 'static,
    HFut: std::future::Future<Output = std::io::Result<Box<S>>> + Send + 'static,
    S: Send + 'static,
    F: Fn(Box<S>, SocketAddr, ConnGuard) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut stop = acc.stop.clone();
    let per_address = Arc::new(PerAddress::default());
    let mut pacer = Pacer::new(acc.accept_rate);
    loop {
        // The accept rate first: in a reconnect storm the accept loop
        // waits here and the backlog absorbs the rest.
        while let Err(wait) = pacer.take() {
            acc.metrics.accept_throttled();
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = crate::stopped(&mut stop) => return,
            }
        }
        while busy() {
            acc.metrics.accept_throttled();
            tokio::select! {
                () = tokio::time::sleep(BUSY_RECHECK) => {}
                () = crate::stopped(&mut stop) => return,
            }
        }
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
        let Some(slot) = per_address.take(addr.ip()) else {
            // Closed before any TLS work: refusing costs one accept and one close.
            tracing::debug!(kind, peer = %addr, "too many connections from this address; refused");
            acc.metrics.rejected(crate::metrics::Rejection::PerAddress);
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let guard = ConnGuard(Arc::new((permit, acc.done.clone(), slot)));
        let span = tracing::info_span!("conn", kind, peer = %addr, device = tracing::field::Empty);
        let tls = acc.tls.clone();
        let handle = handle.clone();
        let handshake = handshake.clone();
        let mut conn_stop = acc.stop.clone();
        let metrics = acc.metrics.clone();
        // The handshake runs in the connection's task so a slow client
        // cannot hold up the accept loop.
        tokio::spawn(
            async move {
                // At shutdown a client still in its handshake has nothing to
                // lose: dropped at once, so it cannot delay the exit by up to
                // HANDSHAKE_TIMEOUT. The handshake and the TLS stream are
                // boxed: every async layer that held a 1.2 KiB stream (or the
                // handshake's state) by value would keep a slot for it in
                // this task for the link's whole life (issue 8: idle links
                // must be cheap).
                let outcome = {
                    let handshake = Box::pin(async move { tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(tls, tcp)).await });
                    tokio::select! {
                        r = handshake => r,
                        () = crate::stopped(&mut conn_stop) => return,
                    }
                };
                let stream = match outcome {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        tracing::info!(error = %e, "TLS handshake failed");
                        metrics.rejected(crate::metrics::Rejection::Handshake);
                        return;
                    }
                    Err(_) => {
                        tracing::info!("TLS handshake timed out");
                        metrics.rejected(crate::metrics::Rejection::HandshakeTimeout);
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
    let handshake = |tls: TlsAcceptor, tcp: TcpStream| async move { tls.accept(tcp).await.map(Box::new) };
    accept_loop(listener, acc, "api", || false, handshake, move |stream, addr, guard| {
        serve_http(stream, addr, guard, app.clone(), stop.clone())
    })
    .await;
}

/// One HTTP/1.1 connection (upgrades allowed) of either listener: each
/// request carries the client's address and the connection's guard; the
/// header deadline applies; at shutdown in-flight requests get
/// [`DRAIN_TIMEOUT`].
async fn serve_http<S>(stream: S, addr: SocketAddr, guard: ConnGuard, app: axum::Router, mut stop: watch::Receiver<bool>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
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

/// Serves the device port. Its TLS runs on rustls's unbuffered API
/// ([`crate::device_link::DeviceTls`]), so an idle link keeps no TLS
/// buffers (issue 8); the API port keeps `tokio_rustls`, which hyper needs.
pub async fn serve_devices(listener: TcpListener, acc: Acceptor, state: AppState) {
    let handshake = |tls: TlsAcceptor, tcp: TcpStream| crate::device_link::accept(tls.config().clone(), tcp);
    let gate_state = state.clone();
    let busy = move || gate_state.link_setups.saturated();
    accept_loop(listener, acc, "device", busy, handshake, move |stream, _addr, guard| {
        let state = state.clone();
        async move {
            state.metrics.device_handshake();
            let metrics = state.metrics.clone();
            match crate::device_link::run(state, stream).await {
                Ok(()) => tracing::info!("device link closed"),
                Err(e) => {
                    // A device hanging up is how most links end, not an error.
                    if !matches!(e, crate::device_link::LinkError::Closed) {
                        metrics.error(crate::metrics::ErrorKind::DeviceLink);
                    }
                    tracing::info!(error = %e, "device link ended");
                }
            }
            drop(guard);
        }
    })
    .await;
}

/// Serves `app` over plain HTTP/1.1 on a loopback listener (the web app's
/// `--web-listen`, ADR 0007): browsers treat `http://127.0.0.1` as a secure
/// context, so WebCrypto works without trusting the deployment's private
/// CA. The same limits and deadlines as the TLS port apply; the caller has
/// checked the address is loopback, and this refuses any peer that is not.
pub async fn serve_loopback_http(listener: TcpListener, limit: Arc<Semaphore>, done: mpsc::Sender<()>, stop: watch::Receiver<bool>, app: axum::Router) {
    let per_address = Arc::new(PerAddress::default());
    let mut accept_stop = stop.clone();
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            () = crate::stopped(&mut accept_stop) => return,
        };
        let (tcp, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, kind = "web", "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = crate::stopped(&mut accept_stop) => return,
        };
        if !addr.ip().is_loopback() {
            tracing::warn!(peer = %addr, "plain-HTTP web listener refused a non-loopback peer");
            continue;
        }
        let Some(slot) = per_address.take(addr.ip()) else { continue };
        let _ = tcp.set_nodelay(true);
        let guard = ConnGuard(Arc::new((permit, done.clone(), slot)));
        let span = tracing::info_span!("conn", kind = "web", peer = %addr);
        tokio::spawn(serve_http(tcp, addr, guard, app.clone(), stop.clone()).instrument(span));
    }
}

#[cfg(test)]
mod pacer_tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn accepts_come_in_a_burst_then_at_the_rate() {
        // The default, and a configured rate below the burst (several
        // nodes sharing CPUs): at most one second's worth at once.
        for (rate, burst) in [(ACCEPT_RATE, ACCEPT_BURST as usize), (200, 200)] {
            let mut p = Pacer::new(rate);
            for _ in 0..burst {
                p.take().unwrap();
            }
            let wait = p.take().unwrap_err();
            assert!(wait <= Duration::from_secs_f64(1.0 / f64::from(rate)) + Duration::from_micros(1), "{rate}/s: {wait:?}");
            tokio::time::advance(wait).await;
            p.take().unwrap();
            // Over one more second, never more than the rate (plus rounding).
            let mut taken = 0;
            for _ in 0..1000 {
                tokio::time::advance(Duration::from_millis(1)).await;
                while p.take().is_ok() {
                    taken += 1;
                }
            }
            let rate = rate as usize;
            assert!((rate - 2..=rate + 1).contains(&taken), "{rate}/s: took {taken}");
        }
    }

    #[test]
    fn a_rate_out_of_range_is_clamped() {
        assert_eq!(Pacer::new(0).rate, 1.0);
        assert_eq!(Pacer::new(u32::MAX).rate, f64::from(MAX_ACCEPT_RATE));
    }
}
