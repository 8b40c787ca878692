//! Prometheus metrics (text exposition format 0.0.4), hand-rolled on atomics.
//!
//! Served at `GET /metrics` on its own plain-HTTP listener, only when
//! `hearth cloud serve --metrics-listen ADDR` is given (docs/deploy.md):
//! a scrape needs no account, so the numbers (link counts, error rates)
//! stay off the public ports and the operator decides who can reach them.
//! Nothing here carries an id, an address or a payload: only counts.
//!
//! Every metric is a fixed atomic; recording one is a relaxed add, cheap
//! enough for the per-command path.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::router::Router;

/// Upper bounds of the command round-trip histogram, in seconds: the
/// single-node target is 2 ms at p99 (issue 8), the command timeout 10 s.
pub const LATENCY_BUCKETS: [f64; 14] =
    [0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Why a command or push could not be routed, as counted in
/// `hearth_errors_total{kind=...}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The device had no link on any node.
    Offline,
    /// The device did not answer within the command timeout.
    Timeout,
    /// A device or controller queue overflowed; the link was dropped.
    Overflow,
    /// A command too large for a device frame.
    TooLarge,
    /// The device went away before answering.
    WentAway,
    /// NATS could not be reached or answered garbage (cluster mode).
    Cluster,
    /// A push for another node was dropped because the outbound queue to
    /// NATS was full.
    PushDropped,
    /// A device link ended with an error (bad frame, timeout, I/O).
    DeviceLink,
}

const ERROR_KINDS: [(ErrorKind, &str); 8] = [
    (ErrorKind::Offline, "offline"),
    (ErrorKind::Timeout, "timeout"),
    (ErrorKind::Overflow, "overflow"),
    (ErrorKind::TooLarge, "too_large"),
    (ErrorKind::WentAway, "went_away"),
    (ErrorKind::Cluster, "cluster"),
    (ErrorKind::PushDropped, "push_dropped"),
    (ErrorKind::DeviceLink, "device_link"),
];

/// Why a connection was refused before it was served, as counted in
/// `hearth_connections_rejected_total{reason=...}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// The source address already holds its maximum of connections.
    PerAddress,
    /// The TLS handshake failed (wrong CA, no client certificate, garbage).
    Handshake,
    /// The TLS handshake did not finish in time.
    HandshakeTimeout,
}

const REJECTIONS: [(Rejection, &str); 3] = [
    (Rejection::PerAddress, "per_address"),
    (Rejection::Handshake, "handshake"),
    (Rejection::HandshakeTimeout, "handshake_timeout"),
];

/// Where a command went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The device's link is on this node.
    Local,
    /// Sent through NATS to the node holding the link.
    Cluster,
}

/// The counters of one cloud process.
#[derive(Default)]
pub struct Metrics {
    commands_local: AtomicU64,
    commands_cluster: AtomicU64,
    latency_buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_micros: AtomicU64,
    errors: [AtomicU64; ERROR_KINDS.len()],
    rejected: [AtomicU64; REJECTIONS.len()],
    /// Device link handshakes accepted (TLS done, link served).
    device_handshakes: AtomicU64,
    /// Times the device accept loop paused because handshakes came faster
    /// than the accept rate allows (reconnect storms).
    accept_throttled: AtomicU64,
    /// Messages received from NATS (cluster mode).
    cluster_in: AtomicU64,
    /// Messages published to NATS (cluster mode).
    cluster_out: AtomicU64,
}

impl Metrics {
    /// Fresh counters.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Counts a command that got an answer (or failed) after `took`.
    pub fn command(&self, route: Route, took: Duration) {
        match route {
            Route::Local => self.commands_local.fetch_add(1, Ordering::Relaxed),
            Route::Cluster => self.commands_cluster.fetch_add(1, Ordering::Relaxed),
        };
        let secs = took.as_secs_f64();
        // Buckets are stored non-cumulatively and summed when rendered, so
        // recording touches one counter.
        if let Some(i) = LATENCY_BUCKETS.iter().position(|b| secs <= *b) {
            self.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_micros.fetch_add(u64::try_from(took.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Counts an error.
    pub fn error(&self, kind: ErrorKind) {
        if let Some(i) = ERROR_KINDS.iter().position(|(k, _)| *k == kind) {
            self.errors[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a refused connection.
    pub fn rejected(&self, why: Rejection) {
        if let Some(i) = REJECTIONS.iter().position(|(k, _)| *k == why) {
            self.rejected[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a finished device handshake.
    pub fn device_handshake(&self) {
        self.device_handshakes.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a pause of the device accept loop.
    pub fn accept_throttled(&self) {
        self.accept_throttled.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a message received from NATS.
    pub fn cluster_in(&self) {
        self.cluster_in.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a message published to NATS.
    pub fn cluster_out(&self) {
        self.cluster_out.fetch_add(1, Ordering::Relaxed);
    }

    /// The text exposition of every metric; link gauges are read from the
    /// routing table at scrape time.
    pub fn render(&self, router: &Router, cluster_connected: Option<bool>) -> String {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (devices, controllers) = router.link_counts();
        let mut out = String::with_capacity(4096);
        // Writing to a String cannot fail.
        let mut line = |s: String| {
            out.push_str(&s);
            out.push('\n');
        };
        line("# HELP hearth_device_links Device links open on this node.".into());
        line("# TYPE hearth_device_links gauge".into());
        line(format!("hearth_device_links {devices}"));
        line("# HELP hearth_controller_links Controller WebSocket links open on this node.".into());
        line("# TYPE hearth_controller_links gauge".into());
        line(format!("hearth_controller_links {controllers}"));
        line("# HELP hearth_device_handshakes_total Device TLS handshakes completed.".into());
        line("# TYPE hearth_device_handshakes_total counter".into());
        line(format!("hearth_device_handshakes_total {}", get(&self.device_handshakes)));
        line("# HELP hearth_commands_routed_total Commands sent to a device, by where its link was.".into());
        line("# TYPE hearth_commands_routed_total counter".into());
        line(format!("hearth_commands_routed_total{{route=\"local\"}} {}", get(&self.commands_local)));
        line(format!("hearth_commands_routed_total{{route=\"cluster\"}} {}", get(&self.commands_cluster)));
        line("# HELP hearth_command_duration_seconds Command round trip as seen by the cloud (API request to signed result).".into());
        line("# TYPE hearth_command_duration_seconds histogram".into());
        let mut cumulative = 0;
        for (bound, count) in LATENCY_BUCKETS.iter().zip(&self.latency_buckets) {
            cumulative += get(count);
            line(format!("hearth_command_duration_seconds_bucket{{le=\"{bound}\"}} {cumulative}"));
        }
        let count = get(&self.latency_count);
        line(format!("hearth_command_duration_seconds_bucket{{le=\"+Inf\"}} {count}"));
        line(format!("hearth_command_duration_seconds_sum {}", get(&self.latency_sum_micros) as f64 / 1e6));
        line(format!("hearth_command_duration_seconds_count {count}"));
        line("# HELP hearth_errors_total Routing errors by kind.".into());
        line("# TYPE hearth_errors_total counter".into());
        for ((_, name), n) in ERROR_KINDS.iter().zip(&self.errors) {
            line(format!("hearth_errors_total{{kind=\"{name}\"}} {}", get(n)));
        }
        line("# HELP hearth_connections_rejected_total Connections refused before being served, by reason.".into());
        line("# TYPE hearth_connections_rejected_total counter".into());
        for ((_, name), n) in REJECTIONS.iter().zip(&self.rejected) {
            line(format!("hearth_connections_rejected_total{{reason=\"{name}\"}} {}", get(n)));
        }
        line("# HELP hearth_device_accept_throttled_total Pauses of the device accept loop by the accept-rate limit.".into());
        line("# TYPE hearth_device_accept_throttled_total counter".into());
        line(format!("hearth_device_accept_throttled_total {}", get(&self.accept_throttled)));
        if let Some(connected) = cluster_connected {
            line("# HELP hearth_cluster_connected Whether this node's NATS connection is up (cluster mode).".into());
            line("# TYPE hearth_cluster_connected gauge".into());
            line(format!("hearth_cluster_connected {}", u8::from(connected)));
            line("# HELP hearth_cluster_messages_total Messages exchanged with NATS.".into());
            line("# TYPE hearth_cluster_messages_total counter".into());
            line(format!("hearth_cluster_messages_total{{direction=\"in\"}} {}", get(&self.cluster_in)));
            line(format!("hearth_cluster_messages_total{{direction=\"out\"}} {}", get(&self.cluster_out)));
        }
        out
    }
}

/// Serves `GET /metrics` over plain HTTP/1.1 until shutdown. Every other
/// path is a 404. Connections are few (a scraper or two), but still bounded.
pub async fn serve(
    listener: TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    mut stop: watch::Receiver<bool>,
) {
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let render = render.clone();
            async move {
                ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], render())
            }
        }),
    );
    let limit = Arc::new(tokio::sync::Semaphore::new(16));
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            () = crate::stopped(&mut stop) => return,
        };
        let tcp = tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = crate::stopped(&mut stop) => return,
        };
        let app = app.clone();
        tokio::spawn(async move {
            let svc = hyper_util::service::TowerToHyperService::new(app);
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(crate::server::HEADER_TIMEOUT);
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(tcp), svc);
            // A scrape takes milliseconds; nothing may hold a slot for long.
            let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative_and_counts_match() {
        let m = Metrics::new();
        let r = Router::new();
        m.command(Route::Local, Duration::from_micros(300));
        m.command(Route::Cluster, Duration::from_millis(3));
        m.command(Route::Cluster, Duration::from_secs(30));
        m.error(ErrorKind::Timeout);
        m.rejected(Rejection::PerAddress);
        let text = m.render(&r, Some(true));
        for want in [
            "hearth_device_links 0",
            "hearth_commands_routed_total{route=\"local\"} 1",
            "hearth_commands_routed_total{route=\"cluster\"} 2",
            "hearth_command_duration_seconds_bucket{le=\"0.0005\"} 1",
            "hearth_command_duration_seconds_bucket{le=\"0.002\"} 1",
            "hearth_command_duration_seconds_bucket{le=\"0.005\"} 2",
            "hearth_command_duration_seconds_bucket{le=\"10\"} 2",
            "hearth_command_duration_seconds_bucket{le=\"+Inf\"} 3",
            "hearth_command_duration_seconds_count 3",
            "hearth_errors_total{kind=\"timeout\"} 1",
            "hearth_errors_total{kind=\"offline\"} 0",
            "hearth_connections_rejected_total{reason=\"per_address\"} 1",
            "hearth_cluster_connected 1",
        ] {
            assert!(text.lines().any(|l| l == want), "missing {want:?} in\n{text}");
        }
        // Every sample line is `name{labels} number`, as Prometheus parses it.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = l.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().is_ok(), "{l}");
        }
        assert!(!m.render(&r, None).contains("hearth_cluster_connected"), "single node shows no cluster gauge");
    }
}
