//! Connection limits and slowloris deadlines (src/server.rs; issue 7
//! "Resource limits"): one address cannot take every slot, silent or slow
//! clients lose theirs at the handshake or header deadline, and other
//! addresses are served throughout.
//!
//! The deadline tests run on paused time: the clock jumps whenever every
//! task waits, so ten-second deadlines cost nothing and the elapsed time
//! is exact.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hearth_cloud::{ServeOptions, HANDSHAKE_TIMEOUT, HEADER_TIMEOUT, MAX_CONNECTIONS_PER_ADDRESS};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use crate::support::{read_response, Cloud, TestDevice};

/// Another loopback address: Linux routes all of 127.0.0.0/8 to `lo`, so a
/// second client address needs no network.
const OTHER: &str = "127.0.0.2";

async fn tcp_from(source: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source.parse::<IpAddr>().unwrap(), 0)).unwrap();
    socket.connect(to).await.unwrap()
}

/// A full HTTPS health check from `source`: proof that address is served.
async fn health_from(cloud: &Cloud, source: &str) -> u16 {
    let config = hearth_pki::client_config(&cloud.cloud_ca.cert_pem, None).unwrap();
    let tcp = tcp_from(source, cloud.api).await;
    let mut tls = TlsConnector::from(Arc::new(config))
        .connect(hearth_pki::server_name("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake");
    tls.write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
    read_response(&mut tls).await.status
}

/// Waits until the server closes `s` (EOF or reset) and returns when.
async fn closed_at<S: AsyncRead + Unpin>(s: &mut S) -> Instant {
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return Instant::now(),
            Ok(_) => {}
        }
    }
}

/// A refused connection is closed at once, before any TLS byte.
async fn assert_refused(mut s: TcpStream) {
    let start = Instant::now();
    closed_at(&mut s).await;
    assert!(start.elapsed() < HANDSHAKE_TIMEOUT / 2, "closed only after {:?}: not refused", start.elapsed());
}

#[tokio::test]
async fn silent_clients_from_one_address_lose_their_slots_at_the_handshake_deadline() {
    let cloud = Cloud::start().await;
    tokio::time::pause();
    let start = Instant::now();
    // A slowloris flood: every slot of 127.0.0.1 taken by clients that never start TLS.
    let mut silent = Vec::new();
    for _ in 0..MAX_CONNECTIONS_PER_ADDRESS {
        silent.push(tcp_from("127.0.0.1", cloud.api).await);
    }
    // One more from the same address is refused; another address is served meanwhile.
    assert_refused(tcp_from("127.0.0.1", cloud.api).await).await;
    assert_eq!(health_from(&cloud, OTHER).await, 200);
    // Each silent client is cut at the handshake deadline, not later, not earlier.
    for s in &mut silent {
        let waited = closed_at(s).await - start;
        assert!(waited >= HANDSHAKE_TIMEOUT && waited < HANDSHAKE_TIMEOUT + Duration::from_secs(2), "{waited:?}");
    }
    // ... and the address has its slots back.
    assert_eq!(health_from(&cloud, "127.0.0.1").await, 200);
    cloud.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_client_sending_headers_byte_by_byte_is_cut_at_the_header_deadline() {
    let cloud = Cloud::start().await;
    tokio::time::pause();
    let config = hearth_pki::client_config(&cloud.cloud_ca.cert_pem, None).unwrap();
    let tcp = tcp_from("127.0.0.1", cloud.api).await;
    let mut tls =
        TlsConnector::from(Arc::new(config)).connect(hearth_pki::server_name("localhost").unwrap(), tcp).await.unwrap();
    let start = Instant::now();
    // One byte a second of a header that never ends: each byte is progress,
    // so only a deadline on the whole header stops it.
    let drip = async {
        for b in b"GET /api/v1/health HTTP/1.1\r\nX-Slow: ".iter().chain(std::iter::repeat(&b'a')) {
            if tls.write_all(&[*b]).await.is_err() || tls.flush().await.is_err() {
                return Instant::now();
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        unreachable!("the drip is endless")
    };
    let cut = tokio::time::timeout(HEADER_TIMEOUT * 6, drip).await.expect("a slow client was never cut off");
    let waited = cut - start;
    assert!(waited >= HEADER_TIMEOUT && waited < HEADER_TIMEOUT + Duration::from_secs(3), "{waited:?}");
    cloud.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_at_the_header_deadline() {
    let cloud = Cloud::start().await;
    tokio::time::pause();
    let config = hearth_pki::client_config(&cloud.cloud_ca.cert_pem, None).unwrap();
    let tcp = tcp_from("127.0.0.1", cloud.api).await;
    let mut tls =
        TlsConnector::from(Arc::new(config)).connect(hearth_pki::server_name("localhost").unwrap(), tcp).await.unwrap();
    tls.write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    assert_eq!(read_response(&mut tls).await.status, 200);
    // Kept alive, then silent: the slot is not held forever.
    let start = Instant::now();
    let waited = tokio::time::timeout(HEADER_TIMEOUT * 6, closed_at(&mut tls)).await.expect("never closed") - start;
    assert!(waited <= HEADER_TIMEOUT + Duration::from_secs(1), "{waited:?}");
    cloud.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_device_port_limits_addresses_too() {
    let cloud = Cloud::start().await;
    let mut held = Vec::new();
    for _ in 0..MAX_CONNECTIONS_PER_ADDRESS {
        held.push(tcp_from("127.0.0.1", cloud.devices).await);
    }
    assert_refused(tcp_from("127.0.0.1", cloud.devices).await).await;
    // The API port counts separately, and the device port still serves other addresses.
    assert_eq!(health_from(&cloud, "127.0.0.1").await, 200);
    let mut other = tcp_from(OTHER, cloud.devices).await;
    let r = tokio::time::timeout(Duration::from_millis(300), other.read(&mut [0u8; 1])).await;
    assert!(r.is_err(), "a connection from another address was closed: {r:?}");
    // Closing the held connections gives the slots back (no deadline needed).
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut s = tcp_from("127.0.0.1", cloud.devices).await;
        if tokio::time::timeout(Duration::from_millis(200), s.read(&mut [0u8; 1])).await.is_err() {
            break; // held open: accepted into a TLS handshake
        }
        assert!(Instant::now() < deadline, "slots were not given back after the clients closed");
    }
    cloud.shutdown().await.unwrap();
}

/// `--device-accept-rate` (issue 8, for nodes sharing CPUs): at 4 a
/// second, twelve devices dialling at once get their handshakes over about
/// two seconds (a burst of one second's worth, then the rate), where the
/// default rate takes them all at once.
#[tokio::test]
async fn the_device_port_accepts_at_the_configured_rate() {
    let cloud = Cloud::start_with_options(ServeOptions { device_accept_rate: Some(4), ..ServeOptions::default() }).await;
    let devices: Vec<_> = (0..12).map(|_| TestDevice::new(&cloud.manufacturer)).collect();
    let started = Instant::now();
    let linked = futures_util::future::join_all(devices.iter().map(|d| d.connect(&cloud))).await;
    let took = started.elapsed();
    for r in &linked {
        if let Err(e) = r {
            panic!("a device could not link: {e}");
        }
    }
    assert!(took >= Duration::from_millis(1900), "12 handshakes at 4/s after a burst of 4 took only {took:?}");
    assert!(took < Duration::from_secs(6), "took {took:?}");
    cloud.shutdown().await.unwrap();
}

/// `device_link::IDLE_LIMIT` and `PING_EVERY`: the cloud pings every 15 s
/// and drops a device it has heard nothing from for 45 s.
const DEVICE_IDLE: Duration = Duration::from_secs(45);
const DEVICE_PING: Duration = Duration::from_secs(15);
/// `controller_link::IDLE_LIMIT` and `PING_EVERY`: checked at each 20 s ping.
const CONTROLLER_IDLE: Duration = Duration::from_secs(60);
const CONTROLLER_PING: Duration = Duration::from_secs(20);

/// Paused time jumps ahead whenever every task waits; SQLite work runs on
/// the blocking pool, which holds the clock, but a PostgreSQL query is
/// network I/O, during which the clock would jump past the deadlines these
/// tests measure. They test the link timers, not the store, so they run in
/// the SQLite pass only.
fn paused_time_is_unreliable() -> bool {
    let pg = std::env::var("HEARTH_TEST_CLOUD_DB").is_ok_and(|v| v == "postgres");
    if pg {
        eprintln!("skipping: paused-time idle test with HEARTH_TEST_CLOUD_DB=postgres (runs in the SQLite pass)");
    }
    pg
}

#[tokio::test]
async fn a_device_link_that_goes_silent_is_closed_at_the_idle_limit() {
    if paused_time_is_unreliable() {
        return;
    }
    let cloud = Cloud::start().await;
    let dev = crate::support::TestDevice::new(&cloud.manufacturer);
    let mut conn = dev.connect(&cloud).await.unwrap();
    conn.hello(None).await;
    tokio::time::pause();
    let start = Instant::now();
    // Pings arrive and are read, never answered: a device that hung.
    let waited = tokio::time::timeout(DEVICE_IDLE * 4, closed_at(&mut conn.s)).await.expect("never closed") - start;
    assert!(waited >= DEVICE_IDLE && waited <= DEVICE_IDLE + DEVICE_PING + Duration::from_secs(2), "{waited:?}");
    cloud.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_controller_link_that_goes_silent_is_closed_at_the_idle_limit() {
    if paused_time_is_unreliable() {
        return;
    }
    let cloud = Cloud::start().await;
    let token = cloud.account("silent@example.com").await;
    let mut tls = cloud.tls(cloud.api, None).await.unwrap();
    // A raw upgrade, so nothing on this side answers the cloud's pings.
    let head = format!(
        "GET /api/v1/link HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut b = [0u8; 512];
        let n = tls.read(&mut b).await.unwrap();
        assert!(n > 0, "closed during the upgrade");
        got.extend_from_slice(&b[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&got));
    tokio::time::pause();
    let start = Instant::now();
    let waited = tokio::time::timeout(CONTROLLER_IDLE * 4, closed_at(&mut tls)).await.expect("never closed") - start;
    assert!(
        waited >= CONTROLLER_IDLE && waited <= CONTROLLER_IDLE + CONTROLLER_PING + Duration::from_secs(2),
        "{waited:?}"
    );
    cloud.shutdown().await.unwrap();
}
