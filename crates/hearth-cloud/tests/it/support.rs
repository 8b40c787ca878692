//! A cloud on 127.0.0.1 with a throwaway PKI, a raw HTTP/1.1-over-TLS
//! client, and a simulated device.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hearth_cloud::{CloudConfig, Listeners, ServeOptions};
use hearth_pki::{CertifiedKey, Validity};
use hearth_proto::capability::DeviceKind;
use hearth_proto::ids::DeviceId;
use hearth_proto::keys::PublicKey;
use hearth_proto::link::{decode_body, encode_frame, frame_len, CloudFrame, DeviceFrame, PairOutcome};
use hearth_proto::message::{self, DeviceState, Outcome, ResultPayload, StatePayload};
use hearth_proto::pairing::{PairingGate, SetupSecret};
use hearth_proto::PROTOCOL_VERSION;
use p256::ecdsa::SigningKey;
use p256::pkcs8::{EncodePrivateKey, LineEnding};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

pub const T: Duration = Duration::from_secs(10);

pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// A running cloud.
pub struct Cloud {
    pub api: SocketAddr,
    pub devices: SocketAddr,
    pub cloud_ca: CertifiedKey,
    pub manufacturer: CertifiedKey,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    _dir: tempfile::TempDir,
    _schema: Option<crate::pg::PgSchema>,
}

impl Cloud {
    pub async fn start() -> Self {
        Self::start_with_ttl(Duration::from_secs(3600)).await
    }

    pub async fn start_with_ttl(session_ttl: Duration) -> Self {
        Self::start_on(crate::pg::default_cloud_schema().await, session_ttl).await
    }

    /// A cloud on PostgreSQL in `schema`, or on SQLite in a temporary directory.
    pub async fn start_on(schema: Option<crate::pg::PgSchema>, session_ttl: Duration) -> Self {
        Self::start_with(schema, session_ttl, ServeOptions::default()).await
    }

    /// A cloud with `options` on the test database.
    pub async fn start_with_options(options: ServeOptions) -> Self {
        Self::start_with(crate::pg::default_cloud_schema().await, Duration::from_secs(3600), options).await
    }

    async fn start_with(schema: Option<crate::pg::PgSchema>, session_ttl: Duration, options: ServeOptions) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let manufacturer = hearth_pki::generate_ca("test manufacturer", Validity::days(1)).unwrap();
        let cloud_ca = hearth_pki::generate_ca("test cloud", Validity::days(1)).unwrap();
        let server =
            hearth_pki::issue_server_cert(&cloud_ca, &["localhost".into(), "127.0.0.1".into()], Validity::days(1))
                .unwrap();
        let api = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let devices = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (api_addr, dev_addr) = (api.local_addr().unwrap(), devices.local_addr().unwrap());
        let config = CloudConfig {
            database: match &schema {
                Some(schema) => schema.database_url(),
                None => hearth_cloud::DatabaseUrl::Sqlite(dir.path().join("cloud.db")),
            },
            server,
            manufacturer_ca_pem: manufacturer.cert_pem.clone(),
            session_ttl,
            tuf: None,
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(hearth_cloud::serve_with(config, Listeners { api, devices }, options, async {
            let _ = stopped.await;
        }));
        let cloud =
            Self { api: api_addr, devices: dev_addr, cloud_ca, manufacturer, stop: Some(stop), task: Some(task), _dir: dir, _schema: schema };
        // Serving starts once the database is open. Waiting here keeps that
        // real I/O (a PostgreSQL connection and its migrations) out of tests
        // that pause tokio's clock right after starting the cloud.
        cloud.health_ok().await;
        cloud
    }

    /// What `serve` fails with for `database` (which must be unusable).
    pub async fn serve_error(database: hearth_cloud::DatabaseUrl) -> String {
        let pki = hearth_pki::generate_ca("test cloud", Validity::days(1)).unwrap();
        let server = hearth_pki::issue_server_cert(&pki, &["localhost".into()], Validity::days(1)).unwrap();
        let config = CloudConfig { database, server, manufacturer_ca_pem: pki.cert_pem.clone(), session_ttl: T, tuf: None };
        let api = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let devices = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let served = tokio::time::timeout(T, hearth_cloud::serve(config, Listeners { api, devices }, std::future::pending()));
        format!("{:#}", served.await.expect("serve gave up in time").expect_err("serve must fail"))
    }

    /// Stops the cloud and returns what `serve` returned.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let _ = self.stop.take().unwrap().send(());
        // A wall-clock deadline: tests that pause tokio's clock would
        // otherwise see it jump past 15 s while serve waits on real I/O
        // (a PostgreSQL query in flight), and fail a healthy shutdown.
        let (expired, deadline) = oneshot::channel::<()>();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(15));
            let _ = expired.send(());
        });
        tokio::select! {
            served = self.task.take().unwrap() => served.unwrap(),
            _ = deadline => panic!("serve did not return"),
        }
    }

    pub async fn tls(
        &self,
        addr: SocketAddr,
        identity: Option<&CertifiedKey>,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let config = hearth_pki::client_config(&self.cloud_ca.cert_pem, identity).unwrap();
        let tcp = TcpStream::connect(addr).await?;
        TlsConnector::from(Arc::new(config)).connect(hearth_pki::server_name("localhost").unwrap(), tcp).await
    }

    /// Sends one raw request and reads the answer.
    pub async fn raw(&self, head: &str, body: &[u8]) -> Response {
        let mut s = self.tls(self.api, None).await.unwrap();
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(body).await.unwrap();
        // Longer than the cloud's own 10 s command deadline.
        tokio::time::timeout(T * 3, read_response(&mut s)).await.expect("no answer in time")
    }

    pub async fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Response {
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
        if let Some(t) = token {
            head += &format!("Authorization: Bearer {t}\r\n");
        }
        if let Some(ct) = content_type {
            head += &format!("Content-Type: {ct}\r\n");
        }
        head += &format!("Content-Length: {}\r\n\r\n", body.len());
        self.raw(&head, body).await
    }

    /// A JSON call: returns the status and the decoded body.
    pub async fn call(&self, method: &str, path: &str, token: Option<&str>, body: Option<Value>) -> (u16, Value) {
        let r = match body {
            Some(v) => self.request(method, path, token, Some("application/json"), v.to_string().as_bytes()).await,
            None => self.request(method, path, token, None, b"").await,
        };
        (r.status, r.json())
    }

    pub async fn signup(&self, email: &str, password: &str) -> (u16, Value) {
        self.call("POST", "/api/v1/signup", None, Some(serde_json::json!({"email": email, "password": password}))).await
    }

    pub async fn login(&self, email: &str, password: &str) -> (u16, Value) {
        self.call("POST", "/api/v1/login", None, Some(serde_json::json!({"email": email, "password": password}))).await
    }

    /// Creates an account and logs in; returns the token.
    pub async fn account(&self, email: &str) -> String {
        let (status, body) = self.signup(email, "correct horse battery").await;
        assert_eq!(status, 201, "{body}");
        let (status, body) = self.login(email, "correct horse battery").await;
        assert_eq!(status, 200, "{body}");
        body["token"].as_str().unwrap().to_owned()
    }

    pub async fn devices(&self, token: &str) -> Vec<Value> {
        let (status, body) = self.call("GET", "/api/v1/devices", Some(token), None).await;
        assert_eq!(status, 200, "{body}");
        body["devices"].as_array().unwrap().clone()
    }

    pub async fn health_ok(&self) {
        let (status, body) = self.call("GET", "/api/v1/health", None, None).await;
        assert_eq!((status, body), (200, serde_json::json!({"status": "ok"})));
    }
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        if self.body.is_empty() {
            return Value::Null;
        }
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    pub fn error(&self) -> String {
        self.json()["error"].as_str().unwrap_or_else(|| panic!("no error field: {:?}", self)).to_owned()
    }
}

/// Reads one HTTP/1.1 response (Content-Length, chunked, or to EOF).
pub async fn read_response<S: AsyncRead + Unpin>(s: &mut S) -> Response {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk).await.expect("reading the response");
        assert!(n > 0, "connection closed before the response headers: {:?}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (k, v) = l.split_once(':').unwrap();
            (k.trim().to_owned(), v.trim().to_owned())
        })
        .collect();
    let mut body = buf[head_end..].to_vec();
    let get = |name: &str| headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone());
    if let Some(len) = get("content-length") {
        let len: usize = len.parse().unwrap();
        while body.len() < len {
            let n = s.read(&mut chunk).await.expect("reading the body");
            assert!(n > 0, "body cut short");
            body.extend_from_slice(&chunk[..n]);
        }
        body.truncate(len);
    } else if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            if let Some(decoded) = dechunk(&body) {
                body = decoded;
                break;
            }
            let n = s.read(&mut chunk).await.expect("reading the body");
            assert!(n > 0, "chunked body cut short");
            body.extend_from_slice(&chunk[..n]);
        }
    } else if status != 204 && status != 101 {
        while let Ok(n) = s.read(&mut chunk).await {
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    }
    Response { status, headers, body }
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size =
            usize::from_str_radix(std::str::from_utf8(&data[..line_end]).ok()?.split(';').next()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        if data.len() < size + 2 {
            return None;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

// ---- devices ----

/// A device identity signed by some manufacturer CA.
pub struct TestDevice {
    pub id: DeviceId,
    pub key: SigningKey,
    pub identity: CertifiedKey,
}

impl TestDevice {
    pub fn new(manufacturer: &CertifiedKey) -> Self {
        let key = hearth_proto::keys::generate();
        let id = DeviceId::random();
        let csr = hearth_pki::device_csr(&key, &id).unwrap();
        let cert_pem = hearth_pki::sign_device_csr(manufacturer, &csr, &id, Validity::days(1)).unwrap();
        let key_pem = key.to_pkcs8_pem(LineEnding::LF).unwrap().to_string();
        Self { id, key, identity: CertifiedKey { cert_pem, key_pem } }
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey::from(&self.key)
    }

    pub fn cert_der(&self) -> Vec<u8> {
        hearth_pki::certs_from_pem(&self.identity.cert_pem).unwrap()[0].to_vec()
    }

    pub async fn connect(&self, cloud: &Cloud) -> std::io::Result<DeviceConn> {
        Ok(DeviceConn { s: cloud.tls(cloud.devices, Some(&self.identity)).await? })
    }
}

pub struct DeviceConn {
    pub s: TlsStream<TcpStream>,
}

pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, f: &DeviceFrame) -> std::io::Result<()> {
    w.write_all(&encode_frame(f).unwrap()).await?;
    w.flush().await
}

pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<CloudFrame> {
    let mut header = [0u8; 4];
    r.read_exact(&mut header).await?;
    let mut body = vec![0; frame_len(header).unwrap()];
    r.read_exact(&mut body).await?;
    Ok(decode_body(&body).unwrap())
}

impl DeviceConn {
    pub async fn send(&mut self, f: &DeviceFrame) -> std::io::Result<()> {
        write_frame(&mut self.s, f).await
    }

    pub async fn hello(&mut self, setup_lookup: Option<String>) {
        self.send(&DeviceFrame::Hello { kind: DeviceKind::Plug, firmware: "test-1".into(), setup_lookup })
            .await
            .unwrap();
    }

    pub async fn recv(&mut self) -> std::io::Result<CloudFrame> {
        read_frame(&mut self.s).await
    }

    /// Whether the cloud closes this link within `T` (reads fail or end).
    pub async fn closed_by_cloud(&mut self) -> bool {
        let mut b = [0u8; 64];
        loop {
            match tokio::time::timeout(T, self.s.read(&mut b)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
            }
        }
    }
}

/// What the simulated device saw.
#[derive(Debug)]
pub enum Seen {
    Command(Vec<u8>),
}

/// Runs a simulated plug on an open link: pairs with the setup secret,
/// executes every command (reporting a result and a state), answers pings.
/// Stops when the link ends or the returned sender is dropped.
pub fn run_plug(
    dev: &TestDevice,
    mut conn: DeviceConn,
    secret: SetupSecret,
) -> (mpsc::UnboundedReceiver<Seen>, oneshot::Sender<()>, JoinHandle<()>) {
    let (seen_tx, seen_rx) = mpsc::unbounded_channel();
    let (quit_tx, mut quit_rx) = oneshot::channel::<()>();
    let id = dev.id.clone();
    let key = dev.key.clone();
    let task = tokio::spawn(async move {
        let mut gate = PairingGate::setup();
        let mut relay = false;
        let mut seq = 0;
        loop {
            let frame = tokio::select! {
                f = conn.recv() => match f { Ok(f) => f, Err(_) => return },
                _ = &mut quit_rx => return,
            };
            let replies = match frame {
                CloudFrame::Ping { n } => vec![DeviceFrame::Pong { n }],
                // The cloud closes the link right after.
                CloudFrame::Busy { .. } => Vec::new(),
                CloudFrame::Pair { req, request } => {
                    let outcome = match gate.attempt(&secret, &request) {
                        Ok(()) => PairOutcome::Ok(
                            hearth_proto::pairing::respond(&secret, &id, &key, &request, now()).unwrap(),
                        ),
                        Err(e) => PairOutcome::Err(e),
                    };
                    let mut out = vec![DeviceFrame::PairResult { req, outcome }];
                    if !gate.setup_mode {
                        out.push(DeviceFrame::Setup { setup_lookup: None });
                    }
                    out
                }
                CloudFrame::Command { envelope } => {
                    let _ = seen_tx.send(Seen::Command(envelope.clone()));
                    let peek = message::peek_command(&envelope).unwrap();
                    relay = !relay;
                    seq += 1;
                    let state = DeviceState { relay: Some(relay), ..Default::default() };
                    let result = message::sign_result(
                        &key,
                        &ResultPayload {
                            v: PROTOCOL_VERSION,
                            device: id.clone(),
                            controller: peek.controller.clone(),
                            counter: peek.counter,
                            outcome: Outcome::Done,
                            state: state.clone(),
                            at: now(),
                            access: None,
                        },
                    )
                    .unwrap();
                    let report = message::sign_state(
                        &key,
                        &StatePayload {
                            v: PROTOCOL_VERSION,
                            device: id.clone(),
                            kind: DeviceKind::Plug,
                            seq,
                            at: now(),
                            state,
                            cause: message::Cause::Command { controller: peek.controller },
                        },
                    )
                    .unwrap();
                    vec![DeviceFrame::Result { envelope: result }, DeviceFrame::State { envelope: report }]
                }
            };
            for r in replies {
                if conn.send(&r).await.is_err() {
                    return;
                }
            }
        }
    });
    (seen_rx, quit_tx, task)
}

/// Retries `f` until it returns `Some`, for up to `T`.
pub async fn eventually<F, Fut, R>(mut f: F) -> R
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<R>>,
{
    let deadline = tokio::time::Instant::now() + T;
    loop {
        if let Some(r) = f().await {
            return r;
        }
        assert!(tokio::time::Instant::now() < deadline, "condition not reached in time");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
