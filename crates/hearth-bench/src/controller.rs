//! Simulated controllers: each signs commands for its own devices at a
//! fixed rate and checks every answer as the `hearth` CLI does (open the
//! sealed result with its HPKE key, verify the device's signature, match
//! controller and counter). The round trip is measured from the moment a
//! command was *due*, not when it was sent, so a controller that falls
//! behind shows up in the latencies (no coordinated omission).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use hearth_proto::e2e::{self, EncSecretKey};
use hearth_proto::ids::{ControllerId, DeviceId};
use hearth_proto::keys::PublicKey;
use hearth_proto::link::{ControllerFrame, ControllerPush, DeviceFrame};
use hearth_proto::message::{self, Command, CommandPayload, ResultPayload};
use hearth_proto::PROTOCOL_VERSION;
use p256::ecdsa::SigningKey;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::Message;

use crate::device::{cmd_topic, out_topic, read_packet, Target};
use crate::mqtt;
use crate::plan::{ControllerSpec, Plan};

/// Answers later than this count as lost.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// Load results of all controllers together.
#[derive(Debug)]
pub struct Load {
    /// Round trips, microseconds.
    pub hist: Histogram<u64>,
    /// Commands sent.
    pub sent: u64,
    /// Verified answers.
    pub answered: u64,
    /// Commands without a verified answer within [`ANSWER_TIMEOUT`].
    pub lost: u64,
    /// Answers that did not verify, refusals, and undeliverable notices.
    pub errors: u64,
    /// Seconds the sending lasted.
    pub seconds: f64,
    /// Mean time to sign a command, µs (the controller's own cost).
    pub sign_us: f64,
    /// Mean time to open and verify an answer, µs.
    pub check_us: f64,
}

struct Shared {
    hist: Histogram<u64>,
    sign_us: u64,
    check_us: u64,
    answered: u64,
    errors: u64,
    /// Why the first few errors happened (printed once).
    first_errors: Vec<String>,
}

impl Shared {
    fn error(&mut self, why: String) {
        self.errors += 1;
        if self.first_errors.len() < 5 {
            self.first_errors.push(why);
        }
    }
}

/// One controller's identity and devices.
struct Ctl {
    key: SigningKey,
    me: ControllerId,
    enc: EncSecretKey,
    devices: Vec<DeviceId>,
    device_keys: HashMap<DeviceId, PublicKey>,
    spec: ControllerSpec,
}

fn controllers(plan: &Plan) -> anyhow::Result<Vec<Ctl>> {
    let mut out = Vec::new();
    for spec in &plan.controllers {
        let key = spec.key()?;
        let me = PublicKey::from(&key).controller_id();
        let enc = EncSecretKey::for_controller(&key);
        out.push(Ctl { key, me, enc, devices: Vec::new(), device_keys: HashMap::new(), spec: spec.clone() });
    }
    for d in &plan.devices {
        let c = out.get_mut(d.controller).context("device names a missing controller")?;
        c.devices.push(d.id.clone());
        c.device_keys.insert(d.id.clone(), d.public_key()?);
    }
    Ok(out)
}

/// Controller `i`'s source address: its own, in 127.1.0.0/16 (apart from the
/// devices'), so any number of controllers stays under the cloud's
/// per-address connection limit.
fn source_address(i: usize) -> SocketAddr {
    SocketAddr::from(([127, 1, (i / 250) as u8, (i % 250) as u8 + 1], 0))
}

async fn dial(i: usize, addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(source_address(i))?;
    let tcp = socket.connect(addr).await?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// Opens and checks an answer; returns its counter.
fn check(ctl: &Ctl, device: &DeviceId, envelope: &[u8]) -> anyhow::Result<u64> {
    let key = ctl.device_keys.get(device).context("an answer from a device this controller does not own")?;
    let r: ResultPayload = if e2e::is_sealed(envelope) {
        e2e::open_result(envelope, device, key, &ctl.me, &ctl.enc).map_err(|e| anyhow::anyhow!("sealed result rejected: {e:?}"))?
    } else {
        message::verify_result(envelope, device, key)?
    };
    if r.controller != ctl.me {
        bail!("an answer for another controller");
    }
    if !matches!(r.outcome, hearth_proto::message::Outcome::Done) {
        bail!("the device refused: {:?}", r.outcome);
    }
    Ok(r.counter)
}

type Pending = Arc<Mutex<HashMap<u64, Instant>>>;
/// Starts a link's reader task once the pending map exists.
type StartReader = Box<dyn FnOnce(Arc<Ctl>, Arc<Mutex<Shared>>, Pending) -> tokio::task::JoinHandle<()> + Send>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn record(shared: &Mutex<Shared>, pending: &Pending, ctl: &Ctl, device: &DeviceId, envelope: &[u8]) {
    let now = Instant::now();
    let checked = check(ctl, device, envelope);
    lock(shared).check_us += now.elapsed().as_micros() as u64;
    match checked {
        Ok(counter) => {
            let due = lock(pending).remove(&counter);
            let mut s = lock(shared);
            match due {
                Some(due) => {
                    let us = now.saturating_duration_since(due).as_micros().max(1) as u64;
                    s.hist.saturating_record(us);
                    s.answered += 1;
                }
                None => s.error(format!("an answer to counter {counter} that is not pending (late or repeated)")),
            }
        }
        Err(e) => lock(shared).error(format!("{e:#}")),
    }
}

/// The command the controllers send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Switch the relay: a result and a state report per command.
    Toggle,
    /// Read the state: a result only.
    GetState,
}

/// Signs the next command; `counter` is strictly increasing per controller.
fn sign(ctl: &Ctl, device: &DeviceId, counter: u64, kind: Kind) -> anyhow::Result<Vec<u8>> {
    let payload = CommandPayload {
        v: PROTOCOL_VERSION,
        device: device.clone(),
        controller: ctl.me.clone(),
        counter,
        issued_at: crate::plan::unix_now(),
        command: match kind {
            Kind::Toggle => Command::Toggle,
            Kind::GetState => Command::GetState,
        },
    };
    Ok(message::sign_command(&ctl.key, &payload)?)
}

/// Where the controllers connect.
#[derive(Debug, Clone, Copy)]
pub struct Server {
    /// Which protocol.
    pub target: Target,
    /// The Hearth API port, or Mosquitto's port.
    pub addr: SocketAddr,
}

/// Runs every controller of `plan` against `server` for `seconds`, at
/// `rate` commands per second in total, and gathers the results.
pub async fn run_load(plan: &Plan, server: Server, kind: Kind, rate: f64, seconds: f64) -> anyhow::Result<Load> {
    let ctls = controllers(plan)?;
    let active = ctls.iter().filter(|c| !c.devices.is_empty()).count().max(1);
    let per_ctl = rate / active as f64;
    let shared = Arc::new(Mutex::new(Shared {
        hist: Histogram::new_with_bounds(1, 60_000_000, 3).context("histogram bounds")?,
        sign_us: 0,
        check_us: 0,
        answered: 0,
        errors: 0,
        first_errors: Vec::new(),
    }));
    let tls = Arc::new(hearth_pki::client_config(&plan.cloud_ca_pem, None)?);
    let server_name = hearth_pki::server_name(&plan.server_name)?;

    // Connect everyone first, so the load starts on warm links.
    let mut links = Vec::new();
    for (i, ctl) in ctls.into_iter().enumerate().filter(|(_, c)| !c.devices.is_empty()) {
        let link = match server.target {
            Target::Hearth => Link::hearth(&ctl, i, server.addr, tls.clone(), server_name.clone()).await?,
            Target::Mqtt => Link::mqtt(&ctl, i, server.addr, &plan.cloud_ca_pem, server_name.clone()).await?,
        };
        links.push((Arc::new(ctl), link));
    }
    let start = Instant::now() + Duration::from_millis(100);
    let end = start + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    // Each controller's schedule is shifted by its share of one period, so
    // the commands of all controllers together come evenly at `rate`. In
    // step (as before), every controller's command fell due at the same
    // instant once per period: bursts of one command per controller, and a
    // round trip that measured the burst's queue (~50-100 ms at any rate).
    let period = Duration::from_secs_f64(1.0 / per_ctl.max(0.001));
    let n = links.len().max(1) as u32;
    for (i, (ctl, link)) in links.into_iter().enumerate() {
        let phase = period.mul_f64(f64::from(i as u32) / f64::from(n));
        tasks.push(tokio::spawn(drive(ctl, link, shared.clone(), kind, per_ctl, start + phase, end)));
    }
    let mut sent = 0;
    let mut lost = 0;
    for t in tasks {
        let (s, l) = t.await.context("a controller task panicked")??;
        sent += s;
        lost += l;
    }
    let s = lock(&shared);
    for e in &s.first_errors {
        eprintln!("hearth-bench: controller error: {e}");
    }
    let per = |us: u64, n: u64| us as f64 / n.max(1) as f64;
    Ok(Load {
        hist: s.hist.clone(),
        sent,
        answered: s.answered,
        lost,
        errors: s.errors,
        seconds,
        sign_us: per(s.sign_us, sent),
        check_us: per(s.check_us, s.answered + s.errors),
    })
}

/// A controller's connection: outgoing messages go through a channel to a
/// writer task; incoming answers are checked by a reader task.
struct Link {
    tx: mpsc::Sender<(DeviceId, Vec<u8>)>,
    start_reader: StartReader,
}

impl Link {
    async fn hearth(
        ctl: &Ctl,
        index: usize,
        addr: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
        name: rustls::pki_types::ServerName<'static>,
    ) -> anyhow::Result<Self> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let tcp = dial(index, addr).await.context("connecting to the API port")?;
        let stream = TlsConnector::from(tls).connect(name, tcp).await.context("TLS to the API port")?;
        let mut req = format!("wss://{addr}/api/v1/link").into_client_request()?;
        req.headers_mut().insert("authorization", format!("Bearer {}", ctl.spec.token).parse()?);
        // Generous: right after a mass link-up (90,000 devices on five
        // nodes) a node's PostgreSQL pool is still busy with the devices'
        // first state reports, and the link waits for its session look-up.
        let (ws, _) = tokio::time::timeout(Duration::from_secs(60), tokio_tungstenite::client_async(req, stream))
            .await
            .context("the link upgrade timed out")?
            .context("opening the controller link")?;
        let (mut sink, mut stream) = ws.split();
        let (tx, mut rx) = mpsc::channel::<(DeviceId, Vec<u8>)>(1024);
        tokio::spawn(async move {
            while let Some((device, envelope)) = rx.recv().await {
                let Ok(text) = serde_json::to_string(&ControllerFrame::Command { device, envelope }) else { continue };
                if sink.send(Message::Text(text.into())).await.is_err() {
                    break;
                }
            }
        });
        let start_reader = Box::new(move |ctl: Arc<Ctl>, shared: Arc<Mutex<Shared>>, pending: Pending| {
            tokio::spawn(async move {
                while let Some(Ok(msg)) = stream.next().await {
                    let Message::Text(text) = msg else { continue };
                    match serde_json::from_str::<ControllerPush>(text.as_str()) {
                        Ok(ControllerPush::Result { device, envelope }) => record(&shared, &pending, &ctl, &device, &envelope),
                        Ok(ControllerPush::Undeliverable { device, message }) => {
                            lock(&shared).error(format!("undeliverable to {device}: {message}"))
                        }
                        Ok(_) => {}
                        Err(e) => lock(&shared).error(format!("bad push: {e}")),
                    }
                }
            })
        });
        Ok(Self { tx, start_reader })
    }

    async fn mqtt(
        ctl: &Ctl,
        index: usize,
        addr: SocketAddr,
        ca_pem: &str,
        name: rustls::pki_types::ServerName<'static>,
    ) -> anyhow::Result<Self> {
        let identity = hearth_pki::CertifiedKey { cert_pem: ctl.spec.mqtt_cert_pem.clone(), key_pem: ctl.spec.mqtt_key_pem.clone() };
        let tls = Arc::new(hearth_pki::client_config(ca_pem, Some(&identity))?);
        let tcp = dial(index, addr).await.context("connecting to Mosquitto")?;
        let mut stream = TlsConnector::from(tls).connect(name, tcp).await.context("TLS to Mosquitto")?;
        let mut dec = mqtt::Decoder::default();
        let wait = Duration::from_secs(10);
        stream.write_all(&mqtt::connect(&ctl.spec.mqtt_cn, 60)).await?;
        stream.flush().await?;
        match read_packet(&mut stream, &mut dec, wait).await? {
            mqtt::Packet::ConnAck { code: 0 } => {}
            other => bail!("Mosquitto refused the controller: {other:?}"),
        }
        // One subscription per owned device, 100 filters per SUBSCRIBE.
        let filters: Vec<String> = ctl.devices.iter().map(out_topic).collect();
        let mut acks = 0;
        for (i, chunk) in filters.chunks(100).enumerate() {
            stream.write_all(&mqtt::subscribe(i as u16 + 1, chunk)).await?;
        }
        stream.flush().await?;
        let batches = filters.chunks(100).count();
        while acks < batches {
            match read_packet(&mut stream, &mut dec, wait).await? {
                mqtt::Packet::SubAck { granted, .. } if granted.iter().all(|g| *g == 1) => acks += 1,
                mqtt::Packet::SubAck { granted, .. } => bail!("Mosquitto refused a subscription (ACL?): {granted:?}"),
                // State reports of devices already subscribed; not measured.
                mqtt::Packet::Publish { id: Some(id), .. } => stream.write_all(&mqtt::puback(id)).await?,
                _ => {}
            }
        }
        let (mut rd, mut wr) = tokio::io::split(stream);
        let (tx, mut rx) = mpsc::channel::<(DeviceId, Vec<u8>)>(1024);
        let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<u16>();
        tokio::spawn(async move {
            let mut next_id: u16 = 1;
            let mut ping = tokio::time::interval(Duration::from_secs(30));
            loop {
                let bytes = tokio::select! {
                    m = rx.recv() => match m {
                        Some((device, envelope)) => {
                            let b = mqtt::publish_qos1(&cmd_topic(&device), next_id, &envelope);
                            next_id = next_id.checked_add(1).unwrap_or(1);
                            b
                        }
                        None => break,
                    },
                    a = ack_rx.recv() => match a {
                        Some(id) => mqtt::puback(id),
                        None => break,
                    },
                    _ = ping.tick() => mqtt::pingreq(),
                };
                if wr.write_all(&bytes).await.is_err() || wr.flush().await.is_err() {
                    break;
                }
            }
        });
        let start_reader = Box::new(move |ctl: Arc<Ctl>, shared: Arc<Mutex<Shared>>, pending: Pending| {
            tokio::spawn(async move {
                loop {
                    let p = match read_packet(&mut rd, &mut dec, Duration::from_secs(3600)).await {
                        Ok(p) => p,
                        Err(_) => break,
                    };
                    let mqtt::Packet::Publish { topic, id, payload } = p else { continue };
                    if let Some(id) = id {
                        let _ = ack_tx.send(id);
                    }
                    let device = topic.strip_prefix("hearth/").and_then(|t| t.strip_suffix("/out")).and_then(|d| d.parse::<DeviceId>().ok());
                    let Some(device) = device else {
                        lock(&shared).error(format!("a message on an unexpected topic {topic}"));
                        continue;
                    };
                    match serde_json::from_slice::<DeviceFrame>(&payload) {
                        Ok(DeviceFrame::Result { envelope }) => record(&shared, &pending, &ctl, &device, &envelope),
                        Ok(_) => {}
                        Err(e) => lock(&shared).error(format!("bad device message: {e}")),
                    }
                }
            })
        });
        Ok(Self { tx, start_reader })
    }
}

/// Sends this controller's share of the load, round-robin over its devices,
/// then waits for the last answers. Returns (sent, lost).
async fn drive(
    ctl: Arc<Ctl>,
    link: Link,
    shared: Arc<Mutex<Shared>>,
    kind: Kind,
    rate: f64,
    start: Instant,
    end: Instant,
) -> anyhow::Result<(u64, u64)> {
    let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
    let reader = (link.start_reader)(ctl.clone(), shared.clone(), pending.clone());
    let period = Duration::from_secs_f64(1.0 / rate.max(0.001));
    // Counters start above any the device may have seen (fresh devices start at 0).
    let mut counter = 0u64;
    let mut sent = 0u64;
    let mut due = start;
    while due < end {
        tokio::time::sleep_until(due).await;
        let device = &ctl.devices[(counter as usize) % ctl.devices.len()];
        counter += 1;
        let t = std::time::Instant::now();
        let envelope = sign(&ctl, device, counter, kind)?;
        lock(&shared).sign_us += t.elapsed().as_micros() as u64;
        lock(&pending).insert(counter, due);
        if link.tx.send((device.clone(), envelope)).await.is_err() {
            lock(&shared).error("the controller link closed".into());
            break;
        }
        sent += 1;
        due += period;
    }
    // Wait for the stragglers, but not forever.
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    while !lock(&pending).is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    reader.abort();
    let lost = lock(&pending).len() as u64;
    Ok((sent, lost))
}
