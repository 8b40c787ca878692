//! A fake cloud and the PKI around it: just enough of the device port to
//! drive a real agent over real mutual TLS on 127.0.0.1.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hearth_device::{AgentHandle, AgentOptions, Provisioned};
use hearth_pki::{CertifiedKey, Validity};
use hearth_proto::capability::DeviceKind;
use hearth_proto::ids::{ControllerId, DeviceId};
use hearth_proto::keys::{self, PublicKey};
use hearth_proto::link::{self, CloudFrame, DeviceFrame, PairOutcome};
use hearth_proto::e2e;
use hearth_proto::message::{self, Command, CommandPayload, DeviceState, ResultPayload, StatePayload};
use hearth_proto::pairing::{PairError, PendingPairing, SetupSecret};
use p256::ecdsa::SigningKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

pub const WAIT: Duration = Duration::from_secs(15);

/// A deployment's certificates.
pub struct Pki {
    pub manufacturer: CertifiedKey,
    pub cloud_ca: CertifiedKey,
    pub server: CertifiedKey,
}

impl Pki {
    pub fn new() -> Self {
        let manufacturer = hearth_pki::generate_ca("Test manufacturer CA", Validity::days(30)).unwrap();
        let cloud_ca = hearth_pki::generate_ca("Test cloud CA", Validity::days(30)).unwrap();
        let server = hearth_pki::issue_server_cert(&cloud_ca, &names(&["localhost", "127.0.0.1"]), Validity::days(30)).unwrap();
        Self { manufacturer, cloud_ca, server }
    }
}

pub fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// A provisioned device directory.
pub struct Device {
    pub dir: tempfile::TempDir,
    pub prov: Provisioned,
}

impl Device {
    pub fn new(pki: &Pki, kind: DeviceKind) -> Self {
        let dir = tempfile::tempdir().unwrap();
        // The real address is only known once the fake cloud listens; tests override it.
        let prov =
            hearth_device::provision(dir.path(), &pki.manufacturer, &pki.cloud_ca.cert_pem, kind, "localhost:1", "localhost")
                .unwrap();
        Self { dir, prov }
    }

    pub fn id(&self) -> &DeviceId {
        &self.prov.device
    }

    pub fn secret(&self) -> SetupSecret {
        self.prov.label.secret.clone()
    }

    /// The device's public key, from the certificate the factory issued.
    pub fn public_key(&self) -> PublicKey {
        let pem = std::fs::read_to_string(self.dir.path().join("device.pem")).unwrap();
        let certs = hearth_pki::certs_from_pem(&pem).unwrap();
        hearth_pki::device_identity(&certs[0]).unwrap().1
    }

    pub fn spawn(&self, cloud: SocketAddr) -> AgentHandle {
        hearth_device::spawn(options(self.dir.path(), cloud)).unwrap()
    }
}

pub fn options(dir: &Path, cloud: SocketAddr) -> AgentOptions {
    AgentOptions { state_dir: dir.to_path_buf(), cloud_addr_override: Some(cloud.to_string()), server_name_override: None }
}

/// A TLS listener speaking the device port's framing.
pub struct FakeCloud {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    pub addr: SocketAddr,
}

impl FakeCloud {
    /// A server presenting `server` and requiring a device certificate from `manufacturer_ca_pem`.
    pub async fn start(server: &CertifiedKey, manufacturer_ca_pem: &str) -> Self {
        let config = hearth_pki::server_config(server, Some(manufacturer_ca_pem), &[]).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        Self { listener, acceptor: TlsAcceptor::from(Arc::new(config)), addr }
    }

    pub async fn genuine(pki: &Pki) -> Self {
        Self::start(&pki.server, &pki.manufacturer.cert_pem).await
    }

    pub async fn accept_tcp(&self) -> TcpStream {
        tokio::time::timeout(WAIT, self.listener.accept()).await.expect("the device never dialled").unwrap().0
    }

    /// The next device connection, after a successful handshake.
    pub async fn accept(&self) -> Link {
        let tcp = self.accept_tcp().await;
        let stream = self.acceptor.accept(tcp).await.expect("handshake with the device failed");
        let cert = stream.get_ref().1.peer_certificates().unwrap()[0].clone();
        let (device, _) = hearth_pki::device_identity(&cert).unwrap();
        Link { stream, device, buf: Vec::new(), recorded: Vec::new(), sizes: Vec::new(), arrivals: Vec::new() }
    }

    /// Runs the TLS handshake on the next connection and reports its outcome.
    pub async fn try_handshake(&self) -> Result<TlsStream<TcpStream>, std::io::Error> {
        let tcp = self.accept_tcp().await;
        tokio::time::timeout(WAIT, self.acceptor.accept(tcp)).await.expect("handshake hung")
    }
}

/// One device link, cloud side.
pub struct Link {
    pub stream: TlsStream<TcpStream>,
    pub device: DeviceId,
    buf: Vec<u8>,
    /// Every frame the device sent, as the (malicious) cloud recorded it.
    pub recorded: Vec<DeviceFrame>,
    /// The length on the wire (length prefix and body) of each frame in
    /// `recorded`, as the cloud measured it.
    pub sizes: Vec<usize>,
    /// When each frame in `recorded` arrived, on tokio's clock (so a test
    /// on a paused clock gets exact, repeatable times).
    pub arrivals: Vec<tokio::time::Instant>,
}

impl Link {
    pub async fn send(&mut self, frame: &CloudFrame) {
        self.send_raw(&link::encode_frame(frame).unwrap()).await;
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
        self.stream.flush().await.unwrap();
    }

    /// The next frame, or `None` when the device closed the link.
    pub async fn try_recv(&mut self) -> Option<DeviceFrame> {
        self.try_recv_within(WAIT).await
    }

    /// [`Link::try_recv`] waiting at most `wait` for each read.
    /// Cancel-safe: a frame is taken from the buffer only when complete.
    pub async fn try_recv_within(&mut self, wait: Duration) -> Option<DeviceFrame> {
        loop {
            if let Some((frame, used)) = link::decode_frame::<DeviceFrame>(&self.buf).unwrap() {
                self.buf.drain(..used);
                self.recorded.push(frame.clone());
                self.sizes.push(used);
                self.arrivals.push(tokio::time::Instant::now());
                return Some(frame);
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(wait, self.stream.read(&mut chunk)).await.expect("device sent nothing");
            match n {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    pub async fn recv(&mut self) -> DeviceFrame {
        self.try_recv().await.expect("the device closed the link")
    }

    /// Reads the hello and the on-connect state report; the report is
    /// `None` when no controller of this test process can decrypt it (an
    /// unpaired device seals for nobody).
    pub async fn greeting(&mut self, device_key: &PublicKey) -> (Option<String>, Option<StatePayload>) {
        let setup_lookup = match self.recv().await {
            DeviceFrame::Hello { firmware, setup_lookup, .. } => {
                assert_eq!(firmware, env!("CARGO_PKG_VERSION"));
                setup_lookup
            }
            other => panic!("expected hello, got {other:?}"),
        };
        let envelope = match self.recv().await {
            DeviceFrame::State { envelope } => envelope,
            other => panic!("expected a state report, got {other:?}"),
        };
        (setup_lookup, open_state(&envelope, &self.device, device_key))
    }

    /// The next state report, decrypted with the key of a controller of
    /// this test process it was sealed for.
    pub async fn state(&mut self, device_key: &PublicKey) -> StatePayload {
        match self.recv().await {
            DeviceFrame::State { envelope } => open_state(&envelope, &self.device, device_key)
                .expect("a state report sealed for none of this test's controllers"),
            other => panic!("expected a state report, got {other:?}"),
        }
    }

    /// The next state report's readable header (what the cloud sees),
    /// after checking the device's outer signature.
    pub async fn sealed_state(&mut self, device_key: &PublicKey) -> e2e::SealedHeader {
        match self.recv().await {
            DeviceFrame::State { envelope } => e2e::verify_sealed(&envelope, &self.device, device_key).unwrap().header,
            other => panic!("expected a state report, got {other:?}"),
        }
    }

    /// The next result: sealed ones are opened with a known controller's
    /// key; plain ones (refusals to a controller the device cannot encrypt
    /// for) must carry no state.
    pub async fn result(&mut self, device_key: &PublicKey) -> ResultPayload {
        match self.recv().await {
            DeviceFrame::Result { envelope } if e2e::is_sealed(&envelope) => {
                let p = e2e::verify_sealed(&envelope, &self.device, device_key).unwrap();
                let to = p.header.to.expect("sealed results are addressed");
                let reader = reader_among(p.recipients.iter().map(|w| &w.controller)).expect("a result sealed for none of this test's controllers");
                let r = e2e::open_result(&envelope, &self.device, device_key, &reader.0, &reader.1).unwrap();
                assert_eq!((&r.controller, r.counter), (&to.controller, to.counter));
                r
            }
            DeviceFrame::Result { envelope } => {
                let r = message::verify_result(&envelope, &self.device, device_key).unwrap();
                assert_eq!(r.state, DeviceState::default(), "a plain result must not carry state");
                r
            }
            other => panic!("expected a result, got {other:?}"),
        }
    }

    pub async fn command(&mut self, envelope: Vec<u8>, device_key: &PublicKey) -> ResultPayload {
        self.send(&CloudFrame::Command { envelope }).await;
        self.result(device_key).await
    }

    pub async fn pair(&mut self, req: u64, pending: &PendingPairing) -> PairOutcome {
        self.send(&CloudFrame::Pair { req, request: pending.request().clone() }).await;
        match self.recv().await {
            DeviceFrame::PairResult { req: r, outcome } => {
                assert_eq!(r, req);
                outcome
            }
            other => panic!("expected a pair result, got {other:?}"),
        }
    }

    /// Sends a ping and expects its pong next, proving nothing else was queued.
    pub async fn ping(&mut self, n: u64) {
        self.send(&CloudFrame::Ping { n }).await;
        assert_eq!(self.recv().await, DeviceFrame::Pong { n });
    }

    pub async fn expect_setup(&mut self, lookup: Option<String>) {
        assert_eq!(self.recv().await, DeviceFrame::Setup { setup_lookup: lookup });
    }
}

/// Signing keys of every test controller in this process, so the fake
/// cloud's helpers can decrypt what the device sealed for them (the fake
/// cloud itself holds no such key; `adversary.rs` checks that).
static KNOWN: std::sync::Mutex<Vec<SigningKey>> = std::sync::Mutex::new(Vec::new());

fn reader_among<'a>(mut ids: impl Iterator<Item = &'a ControllerId>) -> Option<(ControllerId, e2e::EncSecretKey)> {
    let known = KNOWN.lock().unwrap().clone();
    ids.find_map(|id| {
        known
            .iter()
            .find(|k| &PublicKey::from(*k).controller_id() == id)
            .map(|k| (id.clone(), e2e::EncSecretKey::for_controller(k)))
    })
}

/// Decrypts a sealed state report with a known controller's key; `None`
/// when it was sealed for none of them. A plain report fails the test.
pub fn open_state(envelope: &[u8], device: &DeviceId, device_key: &PublicKey) -> Option<StatePayload> {
    assert!(e2e::is_sealed(envelope), "the device sent a state report in the clear");
    let p = e2e::verify_sealed(envelope, device, device_key).unwrap();
    let (me, sk) = reader_among(p.recipients.iter().map(|w| &w.controller))?;
    Some(e2e::open_state(envelope, device, device_key, &me, &sk).unwrap())
}

/// A controller with its key and counter.
pub struct Controller {
    pub key: SigningKey,
    pub counter: u64,
}

impl Controller {
    pub fn new() -> Self {
        let key = keys::generate();
        KNOWN.lock().unwrap().push(key.clone());
        Self { key, counter: 0 }
    }

    /// This controller's HPKE key (derived as the CLI does).
    pub fn enc(&self) -> e2e::EncSecretKey {
        e2e::EncSecretKey::for_controller(&self.key)
    }

    pub fn id(&self) -> ControllerId {
        PublicKey::from(&self.key).controller_id()
    }

    pub fn sign(&mut self, device: &DeviceId, command: Command) -> Vec<u8> {
        self.counter += 1;
        self.sign_with_counter(device, self.counter, command)
    }

    pub fn sign_with_counter(&self, device: &DeviceId, counter: u64, command: Command) -> Vec<u8> {
        let payload = CommandPayload { v: 1, device: device.clone(), controller: self.id(), counter, issued_at: now(), command };
        message::sign_command(&self.key, &payload).unwrap()
    }

    /// Pairs over `link` with `secret` and checks the device's answer.
    pub async fn pair(&self, link: &mut Link, req: u64, secret: SetupSecret) {
        let pending = PendingPairing::start(secret, &self.key);
        match link.pair(req, &pending).await {
            PairOutcome::Ok(resp) => {
                let paired = pending.finish(&resp, Some(&link.device)).expect("pairing response must verify");
                assert_eq!(&paired.device, &link.device);
            }
            PairOutcome::Err(e) => panic!("pairing failed: {e}"),
        }
        link.expect_setup(None).await;
        // Register the encryption key as `hearth pair` does. Counter 0 is
        // accepted once from a new controller and keeps `sign`'s 1, 2, … valid.
        let reg = self.sign_with_counter(&link.device, 0, Command::RegisterKey { key: self.enc().public().clone() });
        link.send(&CloudFrame::Command { envelope: reg }).await;
        match link.recv().await {
            DeviceFrame::Result { envelope } => {
                assert!(e2e::is_sealed(&envelope), "the key registration's answer is sealed for its sender");
            }
            other => panic!("expected the key registration's result, got {other:?}"),
        }
    }
}

pub fn wrong_secret_attempt(controller: &Controller) -> PendingPairing {
    PendingPairing::start(SetupSecret::random(), &controller.key)
}

pub fn expect_err(outcome: PairOutcome) -> PairError {
    match outcome {
        PairOutcome::Err(e) => e,
        PairOutcome::Ok(_) => panic!("pairing unexpectedly succeeded"),
    }
}

pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// The owner sets the device's reporting cadence (ADR 0011) with a rule
/// set holding only `report_every_secs` (0: a report at every change).
/// The device must be at rule-set version 0.
pub async fn set_report_every(link: &mut Link, owner: &mut Controller, device_key: &PublicKey, secs: u32) {
    set_rules_extra(link, owner, device_key, &format!(r#""report_every_secs":{secs}"#)).await;
}

/// Sets the first rule set (version 0 → 1) with `fields` (JSON members,
/// e.g. `"report_every_secs":0,"no_motion_delay_secs":10`).
pub async fn set_rules_extra(link: &mut Link, owner: &mut Controller, device_key: &PublicKey, fields: &str) {
    let rules = format!(r#"{{"version":0,"timezone":"UTC",{fields}}}"#);
    let device = link.device.clone();
    let r = link.command(owner.sign(&device, Command::SetRules { base_version: 0, rules }), device_key).await;
    assert_eq!(r.outcome, message::Outcome::Done, "the owner sets the reporting cadence");
}
