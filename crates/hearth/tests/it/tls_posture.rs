//! The TLS rogue-server matrix for the controller's and the update
//! client's connections to the cloud (issue 7, "TLS posture"; CVE-2013-6951
//! was WeMo accepting any certificate). The device → cloud link has its own
//! matrix in `hearth-device` `tests/it/rogue.rs`.
//!
//! Every rogue below listens on 127.0.0.1 and is reached as `localhost`,
//! the name on the genuine cloud certificate. The clients are the real
//! ones: the CLI's `client::Cloud` (tokio-rustls) and the device's update
//! client `hearth_device::update::TlsFetcher` (blocking rustls, the TUF
//! fetcher). Each must fail the handshake, so no
//! request (and no bearer token) is ever written; the rogue checks that
//! from its side. A genuine server passes through the same harness.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hearth::client::Cloud;
use hearth_device::update::TlsFetcher;
use hearth_pki::{CertifiedKey, Validity};
use hearth_tuf::client::Fetcher;
use hyper::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

const DAY: Duration = Duration::from_secs(86_400);
const T: Duration = Duration::from_secs(10);
const TOKEN: &str = "a-bearer-token-that-must-never-reach-a-rogue";

fn names(n: &[&str]) -> Vec<String> {
    n.iter().map(|s| (*s).to_owned()).collect()
}

/// The deployment the clients trust: a cloud CA and its server certificate.
struct Pki {
    cloud_ca: CertifiedKey,
}

impl Pki {
    fn new() -> Self {
        Self { cloud_ca: hearth_pki::generate_ca("Hearth cloud CA", Validity::days(30)).unwrap() }
    }

    fn genuine(&self) -> CertifiedKey {
        hearth_pki::issue_server_cert(&self.cloud_ca, &names(&["localhost", "127.0.0.1"]), Validity::days(30)).unwrap()
    }
}

/// What the rogue saw of one connection.
#[derive(Debug)]
enum Seen {
    /// The handshake failed on the server's side (the client aborted it).
    HandshakeFailed(String),
    /// The handshake completed; these application bytes arrived.
    Completed(Vec<u8>),
}

/// A TLS 1.3 server presenting `cert` for one connection.
async fn rogue(cert: &CertifiedKey) -> (SocketAddr, JoinHandle<Seen>) {
    let config = hearth_pki::server_config(cert, None, &[b"http/1.1"]).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        match tokio::time::timeout(T, acceptor.accept(tcp)).await.expect("handshake hung") {
            Err(e) => Seen::HandshakeFailed(e.to_string()),
            Ok(mut tls) => {
                // Read the whole request head (a loaded machine may deliver
                // it late or in pieces), so the answer never races the
                // client's write.
                let mut got = Vec::new();
                let _ = tokio::time::timeout(T, async {
                    let mut buf = [0u8; 4096];
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") && got.len() < 64 * 1024 {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                })
                .await;
                // Answer like the cloud so a genuine client call succeeds.
                let _ = tls
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
                    .await;
                let _ = tls.shutdown().await;
                Seen::Completed(got)
            }
        }
    });
    (addr, task)
}

/// A server that answers the ClientHello with a TLS 1.2 ServerHello (an
/// active downgrade: legacy version 0x0303, no `supported_versions`
/// extension, an ECDHE-ECDSA-AES128-GCM suite), then waits. Returns what
/// the client sent after that (nothing, if it aborted).
async fn downgrader() -> (SocketAddr, JoinHandle<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut hello = vec![0u8; 16 * 1024];
        let n = tokio::time::timeout(T, tcp.read(&mut hello)).await.expect("no ClientHello").unwrap();
        assert!(n > 5 && hello[0] == 0x16, "not a TLS handshake record");
        // ServerHello body: version, random, empty session id, suite, null compression.
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[0x42; 32]);
        body.extend_from_slice(&[0x00, 0xc0, 0x2b, 0x00]);
        let mut hs = vec![0x02, 0x00, 0x00, body.len() as u8];
        hs.extend_from_slice(&body);
        let mut record = vec![0x16, 0x03, 0x03, 0x00, hs.len() as u8];
        record.extend_from_slice(&hs);
        let _ = tcp.write_all(&record).await;
        // Whatever follows is the client's alert (or nothing): never a request.
        let mut after = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), tcp.read_to_end(&mut after)).await;
        after
    });
    (addr, task)
}

/// The CLI's client, pointed at `addr` as `localhost`, trusting `ca`.
async fn cli_call(ca: &CertifiedKey, addr: SocketAddr) -> anyhow::Result<serde_json::Value> {
    let cloud = Cloud::new(&format!("https://localhost:{}", addr.port()), &ca.cert_pem, Some(TOKEN.to_owned()))?;
    tokio::time::timeout(T, cloud.call(Method::GET, "/api/v1/devices", None)).await.expect("the CLI hung")
}

/// The device's update client (`hearth_device::update::TlsFetcher`, the
/// TUF fetcher over TLS), fetching from `addr` as `localhost`, trusting `ca`.
async fn update_fetch(ca: &CertifiedKey, addr: SocketAddr) -> Result<Vec<u8>, hearth_tuf::FetchError> {
    let mut fetcher = TlsFetcher::new(&ca.cert_pem).unwrap();
    let url = format!("https://localhost:{}/tuf/metadata/timestamp.json", addr.port());
    tokio::task::spawn_blocking(move || fetcher.fetch(&url, 1 << 20)).await.unwrap()
}

async fn both_clients_refuse(ca: &CertifiedKey, server_cert: &CertifiedKey, case: &str) {
    let (addr, seen) = rogue(server_cert).await;
    let err = cli_call(ca, addr).await.expect_err(case);
    assert!(format!("{err:#}").contains("TLS"), "{case}: the CLI's error should say TLS failed: {err:#}");
    match seen.await.unwrap() {
        Seen::HandshakeFailed(_) => {}
        Seen::Completed(bytes) => panic!("{case}: the CLI completed a handshake with a rogue and sent {bytes:?}"),
    }
    let (addr, seen) = rogue(server_cert).await;
    let err = update_fetch(ca, addr).await.expect_err(case);
    assert!(matches!(err, hearth_tuf::FetchError::Transport(_)), "{case}: {err:?}");
    match seen.await.unwrap() {
        Seen::HandshakeFailed(_) => {}
        Seen::Completed(bytes) => panic!("{case}: the update client completed a handshake and sent {bytes:?}"),
    }
}

#[tokio::test]
async fn a_self_signed_certificate_is_refused() {
    let pki = Pki::new();
    let own = rcgen::generate_simple_self_signed(names(&["localhost", "127.0.0.1"])).unwrap();
    let rogue = CertifiedKey { cert_pem: own.cert.pem(), key_pem: own.signing_key.serialize_pem() };
    both_clients_refuse(&pki.cloud_ca, &rogue, "self-signed").await;
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() {
    let pki = Pki::new();
    // Same CA name as the real one: only the key tells them apart.
    let other = hearth_pki::generate_ca("Hearth cloud CA", Validity::days(30)).unwrap();
    let rogue = hearth_pki::issue_server_cert(&other, &names(&["localhost", "127.0.0.1"]), Validity::days(30)).unwrap();
    both_clients_refuse(&pki.cloud_ca, &rogue, "other CA").await;
}

#[tokio::test]
async fn an_expired_certificate_from_the_right_ca_is_refused() {
    let pki = Pki::new();
    let base = Validity::days(1);
    let past = Validity { not_before: base.not_before - 30 * DAY, not_after: base.not_before - DAY };
    let rogue = hearth_pki::issue_server_cert(&pki.cloud_ca, &names(&["localhost", "127.0.0.1"]), past).unwrap();
    both_clients_refuse(&pki.cloud_ca, &rogue, "expired").await;
}

#[tokio::test]
async fn a_not_yet_valid_certificate_from_the_right_ca_is_refused() {
    let pki = Pki::new();
    let base = Validity::days(1);
    let future = Validity { not_before: base.not_before + 2 * DAY, not_after: base.not_before + 30 * DAY };
    let rogue = hearth_pki::issue_server_cert(&pki.cloud_ca, &names(&["localhost", "127.0.0.1"]), future).unwrap();
    both_clients_refuse(&pki.cloud_ca, &rogue, "not yet valid").await;
}

#[tokio::test]
async fn a_certificate_for_another_name_from_the_right_ca_is_refused() {
    let pki = Pki::new();
    let rogue = hearth_pki::issue_server_cert(&pki.cloud_ca, &names(&["evil.example"]), Validity::days(30)).unwrap();
    both_clients_refuse(&pki.cloud_ca, &rogue, "wrong name").await;
}

#[tokio::test]
async fn a_tls_1_2_downgrade_is_refused_before_any_request() {
    let pki = Pki::new();
    let (addr, after) = downgrader().await;
    let err = cli_call(&pki.cloud_ca, addr).await.expect_err("a TLS 1.2 ServerHello was accepted");
    assert!(format!("{err:#}").contains("TLS"), "{err:#}");
    let sent = after.await.unwrap();
    // At most a TLS alert record (content type 21), never application data.
    assert!(sent.is_empty() || sent[0] == 0x15, "the CLI sent {sent:?} after a TLS 1.2 ServerHello");
    assert!(!sent.windows(TOKEN.len()).any(|w| w == TOKEN.as_bytes()));

    let (addr, after) = downgrader().await;
    update_fetch(&pki.cloud_ca, addr).await.expect_err("the update client accepted a TLS 1.2 ServerHello");
    let sent = after.await.unwrap();
    assert!(sent.is_empty() || sent[0] == 0x15, "the update client sent {sent:?}");
}

/// The client offers TLS 1.3 and nothing else (RFC 8446 §4.2.1: the
/// `supported_versions` extension lists exactly 0x0304), so no server can
/// choose an older version: a TLS-1.2-only server has nothing to agree on.
#[tokio::test]
async fn the_client_hello_offers_only_tls_1_3() {
    let pki = Pki::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hello = tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 16 * 1024];
        let n = tokio::time::timeout(T, tcp.read(&mut buf)).await.unwrap().unwrap();
        buf.truncate(n);
        buf
    });
    let _ = tokio::time::timeout(Duration::from_secs(3), cli_call(&pki.cloud_ca, addr)).await;
    let hello = hello.await.unwrap();
    // Extension 0x002b (supported_versions), length 3, list length 2, TLS 1.3.
    assert!(hello.windows(7).any(|w| w == [0x00, 0x2b, 0x00, 0x03, 0x02, 0x03, 0x04]), "ClientHello: {hello:02x?}");
}

#[tokio::test]
async fn the_genuine_cloud_certificate_passes_the_same_harness() {
    let pki = Pki::new();
    let (addr, seen) = rogue(&pki.genuine()).await;
    cli_call(&pki.cloud_ca, addr).await.expect("the genuine server must be accepted");
    match seen.await.unwrap() {
        Seen::Completed(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            assert!(text.starts_with("GET /api/v1/devices") && text.contains(TOKEN), "{text}");
        }
        Seen::HandshakeFailed(e) => panic!("genuine handshake failed: {e}"),
    }
    let (addr, seen) = rogue(&pki.genuine()).await;
    let body = update_fetch(&pki.cloud_ca, addr).await.expect("the genuine server must be accepted");
    assert_eq!(body, b"{}");
    assert!(matches!(seen.await.unwrap(), Seen::Completed(b) if b.starts_with(b"GET /tuf/")));
}
