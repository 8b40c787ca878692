//! The tokio side of the agent: dial the cloud, move frames between the
//! socket and [`DeviceCore`], and feed it local events (buttons, reset).
//!
//! One task owns the core. It is always in one of three phases — dialling,
//! connected, or waiting to redial — and in each it also listens for local
//! events, so the button and the reset work whether or not the cloud is
//! reachable.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hearth_proto::capability::DeviceKind;
use hearth_proto::ids::{ControllerId, DeviceId};
use hearth_proto::link::{self, CloudFrame, DeviceFrame};
use hearth_proto::message::DeviceState;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, timeout, Instant};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tracing::{error, info, warn, Instrument};

use crate::backoff::Backoff;
use crate::protocol::DeviceCore;
use crate::error::Error;
use crate::store::{DirLock, Identity, StateFile};

/// TCP connect plus TLS handshake must finish within this.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A link on which nothing arrived for this long is dead (the cloud pings every 15 s).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(45);
/// Writing one frame must finish within this, or the link is dropped.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the agent runs the rules and interlock checks.
pub const TICK: Duration = Duration::from_secs(1);

/// How to run an agent.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// The provisioned state directory.
    pub state_dir: PathBuf,
    /// Dial this `host:port` instead of the provisioned cloud address; a
    /// comma-separated list names several cloud nodes, tried in turn
    /// (issue 8: the next one after a failed dial).
    pub cloud_addr_override: Option<String>,
    /// Expect this name on the cloud's certificate instead of the provisioned one.
    pub server_name_override: Option<String>,
}

impl AgentOptions {
    /// Options for a state directory, with the provisioned cloud settings.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        Self { state_dir: state_dir.into(), cloud_addr_override: None, server_name_override: None }
    }
}

/// A view of a running agent, for tests, the demo and `show`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The device id.
    pub device: DeviceId,
    /// The device kind.
    pub kind: DeviceKind,
    /// What it would report now.
    pub state: DeviceState,
    /// Whether it accepts pairing.
    pub setup_mode: bool,
    /// Failed pairing attempts since the last reset.
    pub failed_attempts: u32,
    /// The controllers on its access list.
    pub controllers: Vec<ControllerId>,
    /// Whether a verified link to the cloud is up.
    pub connected: bool,
}

enum Event {
    Reset(oneshot::Sender<()>),
    Button(oneshot::Sender<DeviceState>),
    /// A short, long or double press (button rules, issue 5).
    Press(hearth_rules::model::Press, oneshot::Sender<DeviceState>),
    /// The simulated appliance on an energy plug.
    Load(hearth_rules::energy::LoadProfile, oneshot::Sender<()>),
    /// A walk-past of this strength (1..=10, issue 5).
    WalkPast(u8, oneshot::Sender<()>),
    Snapshot(oneshot::Sender<Snapshot>),
    Shutdown,
    /// From the update client (`update.rs`).
    Update(crate::update::Notice),
    /// A signed command from the LAN endpoint (`lan.rs`).
    Lan(crate::lan::LanCommand),
    /// A frame for the cloud link from the motion sender (`lan.rs`).
    ToCloud(DeviceFrame),
}

impl From<crate::lan::ToCloud> for Event {
    fn from(f: crate::lan::ToCloud) -> Self {
        Event::ToCloud(f.0)
    }
}

impl From<crate::lan::LanCommand> for Event {
    fn from(c: crate::lan::LanCommand) -> Self {
        Event::Lan(c)
    }
}

/// A running agent. Dropping the handle stops the agent too.
#[derive(Debug)]
pub struct AgentHandle {
    device: DeviceId,
    kind: DeviceKind,
    events: mpsc::Sender<Event>,
    task: JoinHandle<()>,
}

fn stopped() -> anyhow::Error {
    anyhow::anyhow!("the device agent has stopped")
}

impl AgentHandle {
    /// The device id.
    pub fn device(&self) -> &DeviceId {
        &self.device
    }

    /// The device kind.
    pub fn kind(&self) -> DeviceKind {
        self.kind
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Event) -> anyhow::Result<T> {
        let (tx, rx) = oneshot::channel();
        self.events.send(make(tx)).await.map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())
    }

    /// The simulated physical reset button (held down): clears the access
    /// list and counters and reopens setup mode. Returns once persisted.
    pub async fn press_reset(&self) -> anyhow::Result<()> {
        self.ask(Event::Reset).await
    }

    /// The local on/off button: toggles the relay. Returns the new state
    /// once it is persisted.
    pub async fn press_button(&self) -> anyhow::Result<DeviceState> {
        self.ask(Event::Button).await
    }

    /// A short, long or double press of the local button: the owner's
    /// button rule for it decides (see `DeviceCore::press`). Returns the
    /// state once it is persisted.
    pub async fn press(&self, press: hearth_rules::model::Press) -> anyhow::Result<DeviceState> {
        self.ask(|done| Event::Press(press, done)).await
    }

    /// Plugs a simulated appliance into an energy plug (see
    /// `DeviceCore::set_load_profile`); the noise is seeded by the device id.
    pub async fn set_load_profile(&self, profile: hearth_rules::energy::LoadProfile) -> anyhow::Result<()> {
        self.ask(|done| Event::Load(profile, done)).await
    }

    /// A person walks past the motion sensor (no-op on other kinds).
    pub async fn walk_past(&self) -> anyhow::Result<()> {
        self.walk_past_with(crate::protocol::MAX_WALK_STRENGTH).await
    }

    /// A walk-past of `strength` (1 far ..= 10 close); it registers only
    /// above the owner's sensitivity threshold (`DeviceCore::registers`).
    pub async fn walk_past_with(&self, strength: u8) -> anyhow::Result<()> {
        self.ask(|done| Event::WalkPast(strength, done)).await
    }

    /// The agent's current view of itself.
    pub async fn snapshot(&self) -> anyhow::Result<Snapshot> {
        self.ask(Event::Snapshot).await
    }

    /// Serves the LAN endpoint (issue 5, `lan.rs`) on an already bound
    /// listener: the same signed commands as from the cloud, decided by
    /// the same core. `state_dir` is the directory the agent was started
    /// on (its certificate and key are the endpoint's identity).
    pub fn serve_lan(&self, state_dir: &std::path::Path, listener: std::net::TcpListener) -> anyhow::Result<SocketAddr> {
        let identity = Identity::load(state_dir)?;
        let tls = Arc::new(crate::lan::server_config(&identity.cert_pem, &identity.key_pem)?);
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let span = tracing::error_span!("lan", %addr);
        tokio::spawn(crate::lan::serve(listener, tls, self.events.clone()).instrument(span));
        info!(%addr, "LAN endpoint listening");
        Ok(addr)
    }

    /// Resolves once the agent has stopped by itself (it installed a
    /// firmware update and wants the supervisor to start it).
    pub async fn stopped(&self) {
        self.events.closed().await;
    }

    /// Stops the agent, closing the link cleanly, and waits until it has
    /// released the state directory.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        // A send error means the task is already gone, which is the goal.
        let _ = self.events.send(Event::Shutdown).await;
        self.task.await.map_err(|e| anyhow::anyhow!("the device agent task failed: {e}"))
    }
}

/// Starts an agent on the current tokio runtime. Loading the identity and
/// the state happens here, so a missing or corrupt state directory is
/// reported at once.
pub fn spawn(opts: AgentOptions) -> anyhow::Result<AgentHandle> {
    let dir = &opts.state_dir;
    let lock = DirLock::acquire(dir)?;
    let identity = Identity::load(dir)?;
    let store = StateFile::in_dir(dir);
    let state = store.load()?;
    let config = &identity.config;
    let cloud_addr = opts.cloud_addr_override.clone().unwrap_or_else(|| config.cloud_addr.clone());
    let name_text = opts.server_name_override.clone().unwrap_or_else(|| config.server_name.clone());
    let server_name = hearth_pki::server_name(&name_text)?;
    let tls = hearth_pki::client_config(
        &identity.cloud_ca_pem,
        Some(&hearth_pki::CertifiedKey { cert_pem: identity.cert_pem.clone(), key_pem: identity.key_pem.clone() }),
    )
    .map_err(Error::from)?;
    let (device, kind) = (config.device.clone(), config.kind);
    let mut store = store;
    let update_prefs = state.update.clone();
    let sensor_key = identity.key.clone();
    let mut core = DeviceCore::new(device.clone(), kind, identity.key, identity.secret, state);
    // Once, before any command: the power-on policy through the interlock.
    core.boot(&mut store, unix_now())?;
    let (events_tx, events) = mpsc::channel(16);
    // A motion sensor's rules may switch other devices (`lan.rs`): over the
    // LAN, or through this agent's cloud link.
    let motion = kind
        .has(hearth_proto::capability::Capability::Motion)
        .then(|| crate::lan::spawn_motion_sender(device.clone(), sensor_key, events_tx.clone()));
    // Issue 4: the firmware update client, if this device has one.
    let notices = events_tx.clone();
    let updater = crate::update::start(dir, device.clone(), &identity.cloud_ca_pem, update_prefs, move |n| {
        // The agent may be gone (shutting down); then nobody needs the notice.
        let _ = notices.blocking_send(Event::Update(n));
    })?;
    let agent = Agent {
        updater,
        state_dir: dir.clone(),
        retry_after: None,
        core,
        store,
        events,
        dialer: Arc::new(Dialer {
            addrs: cloud_addrs(&cloud_addr),
            next: std::sync::atomic::AtomicUsize::new(0),
            name: server_name,
            connector: TlsConnector::from(Arc::new(tls)),
        }),
        connected: false,
        motion,
        next_tick: Instant::now() + TICK,
        _lock: lock,
    };
    // Context spans are at error level so they stay attached to warnings and
    // errors even when RUST_LOG filters out info.
    let span = tracing::error_span!("device", id = %device, kind = kind.as_str());
    info!(parent: &span, cloud = %cloud_addr, server_name = %name_text, "device agent starting");
    let task = tokio::spawn(agent.run().instrument(span));
    Ok(AgentHandle { device, kind, events: events_tx, task })
}

/// Runs the agent until `shutdown` resolves.
pub async fn run(opts: AgentOptions, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let handle = spawn(opts)?;
    shutdown.await;
    handle.shutdown().await
}

fn unix_now() -> u64 {
    // A clock before 1970 is a broken clock; 0 makes every command stale, which is the safe answer.
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The cloud addresses in a comma-separated list, in order.
pub fn cloud_addrs(list: &str) -> Vec<String> {
    list.split(',').map(str::trim).filter(|a| !a.is_empty()).map(str::to_owned).collect()
}

struct Dialer {
    /// Cloud nodes (or one load balancer); never empty when dialling works.
    addrs: Vec<String>,
    /// Which of `addrs` to dial next: the same one after a success, the
    /// next one after a failure, so a dead node is left for a live one.
    next: std::sync::atomic::AtomicUsize,
    name: ServerName<'static>,
    connector: TlsConnector,
}

impl Dialer {
    /// TCP connect and TLS 1.3 handshake. `connect` resolves only after the
    /// server's certificate chain and name were verified, and the agent
    /// writes nothing before that.
    async fn dial(&self) -> Result<(TlsStream<TcpStream>, SocketAddr), String> {
        use std::sync::atomic::Ordering;
        if self.addrs.is_empty() {
            return Err("no cloud address configured".into());
        }
        let n = self.next.load(Ordering::Relaxed) % self.addrs.len();
        let result = self.dial_one(&self.addrs[n]).await;
        if result.is_err() {
            self.next.store((n + 1) % self.addrs.len(), Ordering::Relaxed);
        }
        result
    }

    async fn dial_one(&self, addr: &str) -> Result<(TlsStream<TcpStream>, SocketAddr), String> {
        let attempt = async {
            let tcp = TcpStream::connect(addr).await.map_err(|e| format!("cannot reach {addr}: {e}"))?;
            let peer = tcp.peer_addr().map_err(|e| e.to_string())?;
            // Frames are small and latency matters more than packet count.
            let _ = tcp.set_nodelay(true);
            let tls = self.connector.connect(self.name.clone(), tcp).await.map_err(|e| describe_tls_error(&e))?;
            Ok((tls, peer))
        };
        match timeout(CONNECT_TIMEOUT, attempt).await {
            Ok(r) => r,
            Err(_) => Err(format!("no TLS connection to {addr} within {CONNECT_TIMEOUT:?}")),
        }
    }
}

fn describe_tls_error(e: &std::io::Error) -> String {
    match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(why)) => {
            format!("the cloud's certificate was rejected ({why:?}); not connecting")
        }
        Some(rustls::Error::AlertReceived(alert)) => format!("the cloud refused the handshake ({alert:?})"),
        Some(other) => format!("TLS handshake failed: {other}"),
        None => format!("TLS handshake failed: {e}"),
    }
}

/// Why a connected phase ended.
enum LinkEnd {
    /// Shut down on request.
    Stop,
    /// The link closed or failed; redial.
    Closed(String),
}

struct Agent {
    core: DeviceCore,
    store: StateFile,
    events: mpsc::Receiver<Event>,
    dialer: Arc<Dialer>,
    connected: bool,
    /// A motion sensor's sender for rules that switch other devices.
    motion: Option<mpsc::Sender<crate::lan::MotionSeen>>,
    /// When [`DeviceCore::tick`] runs next: once a second, with or without
    /// a cloud, so rules and interlocks never depend on the link.
    next_tick: Instant,
    /// Held for the agent's life so no other agent uses the same directory.
    _lock: DirLock,
    /// The firmware update client (`update.rs`), if configured.
    updater: Option<crate::update::UpdateHandle>,
    /// The state directory (for the trial-boot health report).
    state_dir: PathBuf,
    /// The cloud's last busy hint: redial no sooner than this.
    retry_after: Option<Duration>,
}

impl Agent {
    async fn run(mut self) {
        let mut backoff = Backoff::new();
        loop {
            // Dialling: local events are still served.
            let dialer = Arc::clone(&self.dialer);
            let dial = async move { dialer.dial().await };
            tokio::pin!(dial);
            let dialled = loop {
                let off = self.off_deadline();
                tokio::select! {
                    r = &mut dial => break r,
                    ev = self.events.recv() => if self.local_event(ev).is_none() { return },
                    () = sleep_opt(off) => { self.tick(); }
                }
            };
            match dialled {
                Ok((stream, peer)) => {
                    let up_since = Instant::now();
                    let span = tracing::error_span!("link", %peer);
                    let end = self.serve(stream).instrument(span).await;
                    self.connected = false;
                    match end {
                        LinkEnd::Stop => return,
                        LinkEnd::Closed(why) => warn!("link to the cloud closed: {why}"),
                    }
                    backoff.link_closed(up_since.elapsed());
                }
                Err(why) => warn!("cannot connect to the cloud: {why}"),
            }
            let delay = match self.retry_after.take() {
                Some(hint) => backoff.next_delay_after(hint, &mut rand::thread_rng()),
                None => backoff.next_delay(&mut rand::thread_rng()),
            };
            info!("redialling the cloud in {:.1} s", delay.as_secs_f64());
            let wake = Instant::now() + delay;
            loop {
                let off = self.off_deadline();
                tokio::select! {
                    _ = sleep_until(wake) => break,
                    ev = self.events.recv() => if self.local_event(ev).is_none() { return },
                    () = sleep_opt(off) => { self.tick(); }
                }
            }
        }
    }

    /// When the next one-second tick is due.
    fn off_deadline(&self) -> Option<Instant> {
        Some(self.next_tick)
    }

    /// The one-second tick: grant limits, rules, interlocks; returns the
    /// frames reporting what changed.
    fn tick(&mut self) -> Vec<DeviceFrame> {
        // From now, not from the missed deadline: after a stall the core
        // catches up from its own clock, so there is no burst of ticks.
        self.next_tick = Instant::now() + TICK;
        self.core.tick(&mut self.store, unix_now()).unwrap_or_else(|e| {
            error!("could not save the device state; the relay stays on: {e}");
            Vec::new()
        })
    }

    /// Handles a local event; frames it produces are returned for the link
    /// (if any). `None` means shut down.
    fn local_event(&mut self, ev: Option<Event>) -> Option<Vec<DeviceFrame>> {
        let now = unix_now();
        let store = &mut self.store;
        let logged = |r: Result<Vec<DeviceFrame>, Error>| {
            r.unwrap_or_else(|e| {
                error!("could not save the device state; the change was not made: {e}");
                Vec::new()
            })
        };
        match ev? {
            Event::Shutdown => None,
            // An update is installed: stop like a shutdown, so the
            // supervisor starts the new image on trial.
            Event::Update(crate::update::Notice::Restart) => None,
            Event::Update(crate::update::Notice::Status(status)) => Some(logged(self.core.set_firmware(status, store, now))),
            Event::Reset(done) => {
                let frames = logged(self.core.reset(store));
                let _ = done.send(());
                Some(frames)
            }
            Event::Button(done) => {
                let frames = logged(self.core.press_button(store, now));
                let _ = done.send(self.core.report());
                Some(frames)
            }
            Event::Load(profile, done) => {
                let id = self.core.device().as_str().as_bytes();
                let seed = id.iter().fold(0u64, |h, b| h.rotate_left(8) ^ u64::from(*b));
                self.core.set_load_profile(profile, seed);
                let _ = done.send(());
                None
            }
            Event::Press(press, done) => {
                let frames = logged(self.core.press(press, store, now));
                let _ = done.send(self.core.report());
                Some(frames)
            }
            Event::WalkPast(strength, done) => {
                let registered = self.core.registers(strength);
                let frames = logged(self.core.walk_past_with(store, now, strength));
                // Below the sensitivity threshold: no motion, so no rule either.
                if let Some(motion) = self.motion.as_ref().filter(|_| registered) {
                    let targets = crate::rules::motion_targets(self.core.rules(), now, self.core.report_every().is_some());
                    // Full queue: the sender is busy with the last motion, which
                    // already keeps the targets on.
                    if !targets.is_empty() && motion.try_send(crate::lan::MotionSeen { targets }).is_err() {
                        warn!("motion rule: sender busy; this motion is dropped");
                    }
                }
                let _ = done.send(());
                Some(frames)
            }
            // Written on the link when it is up; dropped otherwise.
            Event::ToCloud(frame) => Some(vec![frame]),
            Event::Lan(crate::lan::LanCommand { envelope, reply }) => {
                // The same path as a command from the cloud: decide, replay
                // counter, interlock, signed and sealed answer.
                let frames = logged(self.core.handle(hearth_proto::link::CloudFrame::Command { envelope }, store, now));
                for request in self.core.take_update_requests() {
                    if let Some(u) = &self.updater {
                        u.request(request);
                    }
                }
                let (results, reports): (Vec<_>, Vec<_>) = frames.into_iter().partition(|f| matches!(f, DeviceFrame::Result { .. }));
                // An unsaved command has no result; dropping `reply` says so.
                if !results.is_empty() {
                    let _ = reply.send(results);
                }
                // State reports still go to the cloud, when it is reachable.
                Some(reports)
            }
            Event::Snapshot(reply) => {
                let core = &self.core;
                let _ = reply.send(Snapshot {
                    device: core.device().clone(),
                    kind: core.kind(),
                    state: core.report(),
                    setup_mode: core.state().gate.setup_mode,
                    failed_attempts: core.state().gate.failed_attempts,
                    controllers: core.access().entries().iter().map(|e| e.controller.clone()).collect(),
                    connected: self.connected,
                });
                Some(Vec::new())
            }
        }
    }

    async fn serve(&mut self, stream: TlsStream<TcpStream>) -> LinkEnd {
        let mut link = Link { stream, buf: Vec::new() };
        self.connected = true;
        info!("connected to the cloud");
        let hello = match self.core.connected(&mut self.store, unix_now()) {
            Ok(frames) => frames,
            Err(e) => {
                error!("could not save the device state: {e}");
                return LinkEnd::Closed("local storage failed".into());
            }
        };
        if let Err(why) = link.send_all(&hello).await {
            return LinkEnd::Closed(why);
        }
        // ADR 0004 "Trial boot": the cloud is reached and the state saved.
        crate::update::report_healthy(&self.state_dir);
        let mut idle_deadline = Instant::now() + IDLE_TIMEOUT;
        // ADR 0011: scheduled reports, counted from the link's start on a
        // fixed grid (each from the previous deadline, not from when it
        // was written), so their timing depends on nothing that happened.
        let mut next_report: Option<Instant> = None;
        loop {
            enum Step {
                Local(Option<Event>),
                Read(std::io::Result<usize>),
                Idle,
                OffTimer,
                Cadence,
            }
            match self.core.report_every() {
                None => next_report = None,
                Some(secs) if next_report.is_none() => next_report = Some(Instant::now() + Duration::from_secs(secs)),
                Some(_) => {}
            }
            let off = self.off_deadline();
            let step = tokio::select! {
                ev = self.events.recv() => Step::Local(ev),
                r = link.read_more() => Step::Read(r),
                _ = sleep_until(idle_deadline) => Step::Idle,
                () = sleep_opt(off) => Step::OffTimer,
                () = sleep_opt(next_report) => Step::Cadence,
            };
            let out = match step {
                Step::Idle => return LinkEnd::Closed(format!("nothing received for {IDLE_TIMEOUT:?}")),
                Step::OffTimer => self.tick(),
                Step::Cadence => {
                    let due = next_report.unwrap_or_else(Instant::now);
                    next_report = self.core.report_every().map(|secs| due + Duration::from_secs(secs));
                    self.core.cadence_report(&mut self.store, unix_now()).unwrap_or_else(|e| {
                        error!("could not save the device state; the scheduled report waits for the next period: {e}");
                        Vec::new()
                    })
                }
                Step::Local(ev) => match self.local_event(ev) {
                    Some(frames) => frames,
                    None => {
                        link.close().await;
                        return LinkEnd::Stop;
                    }
                },
                Step::Read(Ok(0)) => return LinkEnd::Closed("the cloud closed the connection".into()),
                Step::Read(Err(e)) => return LinkEnd::Closed(format!("read failed: {e}")),
                Step::Read(Ok(_)) => {
                    idle_deadline = Instant::now() + IDLE_TIMEOUT;
                    match self.drain_frames(&mut link) {
                        Ok(frames) => frames,
                        Err(why) => return LinkEnd::Closed(why),
                    }
                }
            };
            if let Err(why) = link.send_all(&out).await {
                return LinkEnd::Closed(why);
            }
        }
    }

    /// Decodes and handles every complete frame in the buffer. A frame that
    /// does not parse is logged and skipped (its length is known); a length
    /// over the limit closes the link, since the stream cannot be resynced.
    fn drain_frames(&mut self, link: &mut Link) -> Result<Vec<DeviceFrame>, String> {
        let mut out = Vec::new();
        while let Some(body) = link.next_body()? {
            match link::decode_body::<CloudFrame>(&body) {
                Ok(CloudFrame::Busy { retry_after }) => {
                    info!("the cloud is busy and asks for a redial in {retry_after} s at the earliest");
                    self.retry_after = Some(Duration::from_secs(retry_after.into()));
                }
                Ok(frame) => match self.core.handle(frame, &mut self.store, unix_now()) {
                    Ok(frames) => {
                        out.extend(frames);
                        for request in self.core.take_update_requests() {
                            if let Some(u) = &self.updater {
                                u.request(request);
                            }
                        }
                    }
                    Err(e) => error!("could not save the device state; the frame was not acted on: {e}"),
                },
                Err(e) => warn!("skipped a malformed frame from the cloud: {e}"),
            }
        }
        Ok(out)
    }
}

/// Sleeps until `at`, or forever when there is nothing to wait for.
async fn sleep_opt(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}

struct Link {
    stream: TlsStream<TcpStream>,
    buf: Vec<u8>,
}

impl Link {
    /// Reads whatever bytes are available into the buffer. Cancel-safe
    /// (a plain `read`), so it can sit in a `select!` with local events.
    async fn read_more(&mut self) -> std::io::Result<usize> {
        let mut chunk = [0u8; 8192];
        let n = self.stream.read(&mut chunk).await?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// Takes the next complete frame body out of the buffer, if there is one.
    fn next_body(&mut self) -> Result<Option<Vec<u8>>, String> {
        let Some(&[a, b, c, d]) = self.buf.get(..4) else { return Ok(None) };
        // Checked against the limit before waiting for (or buffering) the body.
        let len = link::frame_len([a, b, c, d]).map_err(|e| format!("the cloud sent a bad frame header: {e}"))?;
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let body = self.buf[4..4 + len].to_vec();
        self.buf.drain(..4 + len);
        Ok(Some(body))
    }

    async fn send_all(&mut self, frames: &[DeviceFrame]) -> Result<(), String> {
        for frame in frames {
            let bytes = link::encode_frame(frame).map_err(|e| format!("could not encode a frame: {e}"))?;
            let write = async {
                self.stream.write_all(&bytes).await?;
                self.stream.flush().await
            };
            match timeout(WRITE_TIMEOUT, write).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(format!("write failed: {e}")),
                Err(_) => return Err(format!("write stalled for {WRITE_TIMEOUT:?}")),
            }
        }
        Ok(())
    }

    /// Sends TLS close_notify, without waiting long for a dead peer.
    async fn close(&mut self) {
        let _ = timeout(Duration::from_secs(2), self.stream.shutdown()).await;
    }
}
