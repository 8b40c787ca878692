//! Simulated devices, one tokio task per link, run by a worker process.
//!
//! Each device is the real protocol core ([`DeviceCore`]: access list,
//! replay counters, interlock, signed and sealed answers) with an in-memory
//! store instead of a state file, its own key and certificate, and a real
//! mutual-TLS 1.3 link from its own source address. After a link ends it
//! waits as the agent does ([`Backoff`]: capped exponential, full jitter).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use hearth_device::backoff::Backoff;
use hearth_device::store::{PersistentState, StateStore};
use hearth_device::DeviceCore;
use hearth_proto::acl::Role;
use hearth_proto::capability::DeviceKind;
use hearth_proto::e2e::EncSecretKey;
use hearth_proto::ids::DeviceId;
use hearth_proto::keys::PublicKey;
use hearth_proto::link::{decode_body, encode_frame, frame_len, CloudFrame, DeviceFrame};
use hearth_proto::pairing::SetupSecret;
use rustls::pki_types::ServerName;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::{timeout, Instant};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::mqtt;
use crate::plan::{signing_key, Plan};

/// Time allowed for TCP connect plus the TLS handshake plus the first
/// exchange (CONNACK/SUBACK for MQTT).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// A link that hears nothing for this long is considered dead (the cloud
/// pings every 15 s; MQTT devices ping the broker every [`MQTT_KEEP_ALIVE`] / 2).
pub const READ_IDLE: Duration = Duration::from_secs(60);
/// The MQTT keep-alive the devices announce, in seconds.
pub const MQTT_KEEP_ALIVE: u16 = 60;
/// Switches per minute the simulated plugs allow (an owner setting; the
/// default of 6 would refuse some commands at 0.1 commands/s per device).
pub const BENCH_TOGGLES_PER_MIN: u8 = 60;

/// Which server the devices talk to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// The Hearth cloud's device port: length-prefixed JSON frames.
    Hearth,
    /// Mosquitto: MQTT 3.1.1, commands on `hearth/<id>/cmd`, answers on `hearth/<id>/out`.
    Mqtt,
}

/// The topic a device receives commands on.
pub fn cmd_topic(id: &DeviceId) -> String {
    format!("hearth/{id}/cmd")
}

/// The topic a device publishes results and state reports on.
pub fn out_topic(id: &DeviceId) -> String {
    format!("hearth/{id}/out")
}

/// What a worker counts, shared by all its device tasks.
#[derive(Debug, Default)]
pub struct Counters {
    /// Links up now.
    pub up: AtomicUsize,
    /// Completed handshakes (TLS plus the first exchange).
    pub handshakes: AtomicU64,
    /// Connection attempts that failed.
    pub connect_failures: AtomicU64,
    /// Links that were up and then ended.
    pub drops: AtomicU64,
    /// Commands answered.
    pub commands: AtomicU64,
    /// Protocol errors (a core that could not answer, a bad packet).
    pub errors: AtomicU64,
    /// Microseconds spent in the device core answering commands (verify,
    /// decide, sign, seal): the simulator's own cost per command.
    pub core_us: AtomicU64,
}

/// A snapshot of [`Counters`], sent to the orchestrator.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Links up now.
    pub up: usize,
    /// Completed handshakes.
    pub handshakes: u64,
    /// Failed connection attempts.
    pub connect_failures: u64,
    /// Links that ended after being up.
    pub drops: u64,
    /// Commands answered.
    pub commands: u64,
    /// Protocol errors.
    pub errors: u64,
    /// Microseconds in the device core answering commands.
    pub core_us: u64,
}

impl Counters {
    /// The current values.
    pub fn status(&self) -> Status {
        Status {
            up: self.up.load(Ordering::Relaxed),
            handshakes: self.handshakes.load(Ordering::Relaxed),
            connect_failures: self.connect_failures.load(Ordering::Relaxed),
            drops: self.drops.load(Ordering::Relaxed),
            commands: self.commands.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            core_us: self.core_us.load(Ordering::Relaxed),
        }
    }
}

/// Counts a link as up while it lives.
struct UpGuard(Arc<Counters>);

impl UpGuard {
    fn new(c: &Arc<Counters>) -> Self {
        c.up.fetch_add(1, Ordering::Relaxed);
        Self(c.clone())
    }
}

impl Drop for UpGuard {
    fn drop(&mut self) {
        self.0.up.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The device's storage: kept in memory only. A benchmark device never
/// restarts, so nothing needs to survive; the core still "saves" before it
/// answers, exactly as on a real device.
struct MemoryStore;

impl StateStore for MemoryStore {
    fn save(&mut self, _state: &PersistentState) -> Result<(), hearth_device::Error> {
        Ok(())
    }
}

/// One simulated device.
pub struct SimDevice {
    /// Its global index (decides its source address).
    pub index: usize,
    id: DeviceId,
    core: DeviceCore,
    tls: Arc<rustls::ClientConfig>,
    /// The cloud's busy hint from the last link, as the real agent keeps it.
    retry_after: Option<Duration>,
}

/// What every device of a worker shares.
pub struct Env {
    /// Where to connect.
    pub server: SocketAddr,
    /// The server's certificate name.
    pub server_name: ServerName<'static>,
    /// Which protocol.
    pub target: Target,
    /// The counters.
    pub counters: Arc<Counters>,
    /// Limits concurrent first connections (the initial ramp); reconnects
    /// are paced by the backoff alone, as on real devices.
    pub ramp: Arc<Semaphore>,
}

/// Builds the devices `range` of `plan`, each paired (owner = its
/// controller, with the controller's encryption key registered) and out of
/// setup mode, as after `hearth pair`.
pub fn build(plan: &Plan, range: std::ops::Range<usize>) -> anyhow::Result<Vec<SimDevice>> {
    let now = crate::plan::unix_now();
    // Each controller's public and encryption keys, once.
    let mut ctl = Vec::with_capacity(plan.controllers.len());
    for c in &plan.controllers {
        let key = c.key()?;
        ctl.push((PublicKey::from(&key), EncSecretKey::for_controller(&key).public().clone()));
    }
    let roots_pem = &plan.cloud_ca_pem;
    let mut out = Vec::with_capacity(range.len());
    for index in range {
        let spec = plan.devices.get(index).context("device index out of range")?;
        let key = signing_key(&spec.key_pem)?;
        let (owner, enc) = ctl.get(spec.controller).context("controller index out of range")?;
        let mut state = PersistentState::factory();
        state.gate.setup_mode = false;
        state.access.upsert(owner.clone(), Role::Owner, now);
        state.access.set_enc_key(&owner.controller_id(), enc.clone());
        state.rules.set.interlocks.max_toggles_per_min = BENCH_TOGGLES_PER_MIN;
        state.rules.interlock.reconfigure(state.rules.set.interlocks.clone());
        let core = DeviceCore::new(spec.id.clone(), DeviceKind::Plug, key, SetupSecret::random(), state);
        let identity = hearth_pki::CertifiedKey { cert_pem: spec.cert_pem.clone(), key_pem: spec.key_pem.clone() };
        let tls = Arc::new(hearth_pki::client_config(roots_pem, Some(&identity))?);
        out.push(SimDevice { index, id: spec.id.clone(), core, tls, retry_after: None });
    }
    Ok(out)
}

/// How a link attempt ended.
enum Ended {
    /// It never came up.
    ConnectFailed(anyhow::Error),
    /// It was up for this long, then ended.
    After(Duration, anyhow::Error),
}

/// Runs one device forever: connect, serve, back off, reconnect.
pub async fn run(mut dev: SimDevice, env: Arc<Env>) {
    let mut backoff = Backoff::new();
    let mut first = true;
    loop {
        let ended = link(&mut dev, &env, first).await;
        first = false;
        match ended {
            Ended::ConnectFailed(e) => {
                env.counters.connect_failures.fetch_add(1, Ordering::Relaxed);
                tracing_like(&dev, "connect failed", &e);
            }
            Ended::After(up_for, e) => {
                env.counters.drops.fetch_add(1, Ordering::Relaxed);
                backoff.link_closed(up_for);
                tracing_like(&dev, "link ended", &e);
            }
        }
        // The same reconnect timing as `hearth_device::agent`.
        let delay = match dev.retry_after.take() {
            Some(hint) => backoff.next_delay_after(hint, &mut rand::thread_rng()),
            None => backoff.next_delay(&mut rand::thread_rng()),
        };
        tokio::time::sleep(delay).await;
    }
}

fn tracing_like(dev: &SimDevice, what: &str, e: &anyhow::Error) {
    if std::env::var_os("HEARTH_BENCH_VERBOSE").is_some() {
        eprintln!("device {} ({}): {what}: {e:#}", dev.index, dev.id);
    }
}

async fn dial(dev: &SimDevice, env: &Env) -> anyhow::Result<TlsStream<TcpStream>> {
    // Bind before connect: each device has its address among 127.0.0.x, so
    // the links get past both the per-address limit and the ephemeral ports.
    let socket = TcpSocket::new_v4()?;
    socket.bind(Plan::source_address(dev.index)).context("binding the source address")?;
    let tcp = socket.connect(env.server).await.context("TCP connect")?;
    tcp.set_nodelay(true)?;
    let tls = TlsConnector::from(dev.tls.clone()).connect(env.server_name.clone(), tcp).await.context("TLS handshake")?;
    Ok(tls)
}

async fn link(dev: &mut SimDevice, env: &Env, first: bool) -> Ended {
    let setup = async {
        // The ramp permit is held for the connect only, not for the link's life.
        let _permit = if first { env.ramp.clone().acquire_owned().await.ok() } else { None };
        let mut tls = dial(dev, env).await?;
        if env.target == Target::Mqtt {
            let mut dec = mqtt::Decoder::default();
            mqtt_open(&mut tls, &mut dec, &dev.id).await?;
            return Ok::<_, anyhow::Error>((tls, Some(dec)));
        }
        Ok((tls, None))
    };
    let (mut tls, dec) = match timeout(CONNECT_TIMEOUT, setup).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => return Ended::ConnectFailed(e),
        Err(_) => return Ended::ConnectFailed(anyhow::anyhow!("connect timed out")),
    };
    env.counters.handshakes.fetch_add(1, Ordering::Relaxed);
    let up = Instant::now();
    let result = match dec {
        None => serve_hearth(dev, env, &mut tls).await,
        Some(dec) => serve_mqtt(dev, env, &mut tls, dec).await,
    };
    Ended::After(up.elapsed(), result.err().unwrap_or_else(|| anyhow::anyhow!("closed")))
}

async fn write_frame(tls: &mut TlsStream<TcpStream>, frame: &DeviceFrame) -> anyhow::Result<()> {
    tls.write_all(&encode_frame(frame)?).await?;
    Ok(())
}

async fn serve_hearth(dev: &mut SimDevice, env: &Env, tls: &mut TlsStream<TcpStream>) -> anyhow::Result<()> {
    for f in dev.core.connected(&mut MemoryStore, crate::plan::unix_now())? {
        write_frame(tls, &f).await?;
    }
    tls.flush().await?;
    let _up = UpGuard::new(&env.counters);
    loop {
        let mut header = [0u8; 4];
        match timeout(READ_IDLE, tls.read_exact(&mut header)).await {
            Err(_) => bail!("no frame from the cloud for {READ_IDLE:?}"),
            Ok(r) => r.context("reading a frame header")?,
        };
        let mut body = vec![0u8; frame_len(header)?];
        timeout(READ_IDLE, tls.read_exact(&mut body)).await.context("frame body timed out")??;
        let frame: CloudFrame = decode_body(&body)?;
        if let CloudFrame::Busy { retry_after } = frame {
            dev.retry_after = Some(Duration::from_secs(retry_after.into()));
            bail!("the cloud is busy: redial in {retry_after} s at the earliest");
        }
        let is_command = matches!(frame, CloudFrame::Command { .. });
        let t = std::time::Instant::now();
        let answer = dev.core.handle(frame, &mut MemoryStore, crate::plan::unix_now());
        if is_command {
            env.counters.core_us.fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
        }
        match answer {
            Ok(frames) => {
                for f in &frames {
                    write_frame(tls, f).await?;
                }
                tls.flush().await?;
                if is_command {
                    env.counters.commands.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) => {
                env.counters.errors.fetch_add(1, Ordering::Relaxed);
                bail!("the device core failed: {e}");
            }
        }
    }
}

/// Reads until `dec` yields a packet, bounded by `wait`.
pub async fn read_packet<S: tokio::io::AsyncRead + Unpin>(
    io: &mut S,
    dec: &mut mqtt::Decoder,
    wait: Duration,
) -> anyhow::Result<mqtt::Packet> {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(p) = dec.next_packet()? {
            return Ok(p);
        }
        let n = timeout(wait, io.read(&mut buf)).await.context("MQTT read timed out")??;
        if n == 0 {
            bail!("closed by the broker");
        }
        dec.extend(&buf[..n]);
    }
}

/// CONNECT and SUBSCRIBE to the device's command topic, waiting for both acks.
async fn mqtt_open(tls: &mut TlsStream<TcpStream>, dec: &mut mqtt::Decoder, id: &DeviceId) -> anyhow::Result<()> {
    tls.write_all(&mqtt::connect(id.as_str(), MQTT_KEEP_ALIVE)).await?;
    tls.flush().await?;
    match read_packet(tls, dec, CONNECT_TIMEOUT).await? {
        mqtt::Packet::ConnAck { code: 0 } => {}
        other => bail!("CONNECT refused: {other:?}"),
    }
    tls.write_all(&mqtt::subscribe(1, &[cmd_topic(id)])).await?;
    tls.flush().await?;
    match read_packet(tls, dec, CONNECT_TIMEOUT).await? {
        mqtt::Packet::SubAck { id: 1, granted } if granted == [1] => Ok(()),
        other => bail!("SUBSCRIBE refused (ACL?): {other:?}"),
    }
}

async fn serve_mqtt(
    dev: &mut SimDevice,
    env: &Env,
    tls: &mut TlsStream<TcpStream>,
    mut dec: mqtt::Decoder,
) -> anyhow::Result<()> {
    let out = out_topic(&dev.id);
    let mut next_id: u16 = 1;
    let mut publish = |frame: &DeviceFrame, buf: &mut Vec<u8>| -> anyhow::Result<()> {
        let payload = serde_json::to_vec(frame)?;
        buf.extend_from_slice(&mqtt::publish_qos1(&out, next_id, &payload));
        next_id = next_id.checked_add(1).unwrap_or(1);
        Ok(())
    };
    let mut pending = Vec::new();
    // The hello is the Hearth link's own; the state report is what the controllers see.
    for f in dev.core.connected(&mut MemoryStore, crate::plan::unix_now())? {
        if !matches!(f, DeviceFrame::Hello { .. }) {
            publish(&f, &mut pending)?;
        }
    }
    tls.write_all(&pending).await?;
    tls.flush().await?;
    let _up = UpGuard::new(&env.counters);
    let mut ping = tokio::time::interval_at(
        Instant::now() + Duration::from_secs(u64::from(MQTT_KEEP_ALIVE) / 2),
        Duration::from_secs(u64::from(MQTT_KEEP_ALIVE) / 2),
    );
    let mut buf = vec![0u8; 4096];
    let mut last_heard = Instant::now();
    loop {
        // Whole packets already buffered first.
        while let Some(p) = dec.next_packet()? {
            last_heard = Instant::now();
            if let mqtt::Packet::Publish { id, payload, .. } = p {
                let mut outgoing = Vec::new();
                if let Some(id) = id {
                    outgoing.extend_from_slice(&mqtt::puback(id));
                }
                let t = std::time::Instant::now();
                let answer = dev.core.handle(CloudFrame::Command { envelope: payload }, &mut MemoryStore, crate::plan::unix_now());
                env.counters.core_us.fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
                match answer {
                    Ok(frames) => {
                        for f in &frames {
                            publish(f, &mut outgoing)?;
                        }
                        env.counters.commands.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        env.counters.errors.fetch_add(1, Ordering::Relaxed);
                        bail!("the device core failed: {e}");
                    }
                }
                tls.write_all(&outgoing).await?;
                tls.flush().await?;
            }
        }
        dec.shrink();
        tokio::select! {
            n = tls.read(&mut buf) => {
                let n = n?;
                if n == 0 {
                    bail!("closed by the broker");
                }
                dec.extend(&buf[..n]);
            }
            _ = ping.tick() => {
                if last_heard.elapsed() > READ_IDLE + READ_IDLE {
                    bail!("the broker went silent");
                }
                tls.write_all(&mqtt::pingreq()).await?;
                tls.flush().await?;
            }
        }
    }
}
