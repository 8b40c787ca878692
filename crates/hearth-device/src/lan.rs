//! LAN control without the internet (issue 5, ADR 0009).
//!
//! The device accepts the very same signed commands it gets from the cloud
//! on a local TLS 1.3 endpoint. There is no other local API: every frame a
//! LAN peer sends is a [`CloudFrame::Command`] envelope that the agent hands
//! to [`crate::DeviceCore`], which runs [`hearth_proto::acl::AccessList::decide`]
//! and the persisted replay counters exactly as for a command from the
//! cloud, and answers with the same signed (and sealed) result.
//!
//! * Server identity: the device's own manufacturer-issued certificate
//!   (CN = device id, key = the device key). A controller checks it against
//!   the key it learned at pairing and/or the manufacturer CA
//!   ([`DevicePin`]); the device asks for no client certificate, because
//!   authorization is the signature on each command (ADR 0001).
//! * Bounds: at most [`MAX_CONNECTIONS`] connections at once and
//!   [`MAX_CONNECTIONS_PER_ADDRESS`] from one source address (more are
//!   closed before the handshake), the TLS handshake within
//!   [`HANDSHAKE_TIMEOUT`], nothing received for [`IDLE_TIMEOUT`] closes
//!   the connection, and so does reaching [`MAX_LIFETIME`] whatever it
//!   carries (so pings cannot hold a slot for ever), frames at most 64 KiB
//!   (`link::frame_len`, checked on the header before the body is read), at
//!   most [`MAX_FRAMES_PER_CONNECTION`] frames (commands and pings) per
//!   connection.
//! * Pairing is not offered on the LAN (it stays a cloud-mediated step,
//!   ADR 0003); a `pair` frame closes the connection.
//!
//! The same module holds the client side, used by the CLI (`hearth --via
//! lan`) and by a motion sensor sending to its target ([`MotionSender`]).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hearth_proto::e2e::{self, EncSecretKey};
use hearth_proto::ids::{ControllerId, DeviceId};
use hearth_proto::keys::PublicKey;
use hearth_proto::link::{self, CloudFrame, DeviceFrame};
use hearth_proto::message::{self, Command, CommandPayload, Outcome, ResultPayload};
use hearth_proto::PROTOCOL_VERSION;
use p256::ecdsa::SigningKey;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::{timeout, Instant};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tracing::{info, warn, Instrument};

/// The conventional LAN port of a Hearth device (`--lan-listen 0.0.0.0:8445`).
pub const DEFAULT_PORT: u16 = 8445;
/// The ALPN protocol id of the LAN endpoint.
pub const ALPN: &[u8] = b"hearth-lan/1";
/// At most this many LAN connections at once; more are closed unanswered.
pub const MAX_CONNECTIONS: usize = 4;
/// TCP accept to finished TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection on which nothing arrives for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Reading the rest of a frame, or writing one, must finish within this.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames (commands and pings alike) served on one connection before it
/// is closed.
pub const MAX_FRAMES_PER_CONNECTION: u32 = 256;
/// At most this many LAN connections from one source address at once, so
/// one host cannot take all [`MAX_CONNECTIONS`] slots.
pub const MAX_CONNECTIONS_PER_ADDRESS: usize = 2;
/// A LAN connection is closed this long after it was accepted, whatever it
/// carries: a controller dials again for its next command.
pub const MAX_LIFETIME: Duration = Duration::from_secs(60);

/// The bounds [`serve_with`] enforces; [`Limits::default`] is the
/// constants above (tests shorten them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections at once ([`MAX_CONNECTIONS`]).
    pub connections: usize,
    /// Connections at once from one source address ([`MAX_CONNECTIONS_PER_ADDRESS`]).
    pub per_address: usize,
    /// Lifetime of one connection ([`MAX_LIFETIME`]).
    pub lifetime: Duration,
    /// Frames on one connection ([`MAX_FRAMES_PER_CONNECTION`]).
    pub frames: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connections: MAX_CONNECTIONS,
            per_address: MAX_CONNECTIONS_PER_ADDRESS,
            lifetime: MAX_LIFETIME,
            frames: MAX_FRAMES_PER_CONNECTION,
        }
    }
}

/// One source address's share of the connections; gives it back on drop.
struct AddressSlot {
    open: Arc<std::sync::Mutex<BTreeMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl AddressSlot {
    /// Takes one of `ip`'s `limit` slots, or `None` when it holds them all.
    /// The map only has addresses with an open connection, so it is bounded
    /// by the total connection limit.
    fn take(open: &Arc<std::sync::Mutex<BTreeMap<IpAddr, usize>>>, ip: IpAddr, limit: usize) -> Option<AddressSlot> {
        let mut map = open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.get(&ip).copied().unwrap_or(0) >= limit {
            return None;
        }
        *map.entry(ip).or_insert(0) += 1;
        Some(AddressSlot { open: Arc::clone(open), ip })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut map = self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = map.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// A command that arrived on the LAN, for the agent task that owns the
/// core. `reply` gets the frames to send back (the signed result).
#[derive(Debug)]
pub struct LanCommand {
    /// The signed command envelope, as the controller sent it.
    pub envelope: Vec<u8>,
    /// Where the agent puts the result frames.
    pub reply: oneshot::Sender<Vec<DeviceFrame>>,
}

/// The device's TLS server configuration for the LAN endpoint: TLS 1.3
/// only (hearth-pki), its manufacturer certificate and device key.
pub fn server_config(cert_pem: &str, key_pem: &str) -> anyhow::Result<rustls::ServerConfig> {
    let id = hearth_pki::CertifiedKey { cert_pem: cert_pem.to_owned(), key_pem: key_pem.to_owned() };
    Ok(hearth_pki::server_config(&id, None, &[ALPN])?)
}

/// Serves the LAN endpoint until the agent goes away. `to_agent` is the
/// agent's event channel; each command waits for its signed answer.
pub async fn serve<T: From<LanCommand> + Send + 'static>(listener: TcpListener, tls: Arc<rustls::ServerConfig>, to_agent: mpsc::Sender<T>) {
    serve_with(listener, tls, to_agent, Limits::default()).await;
}

/// [`serve`] with other [`Limits`] (tests).
pub async fn serve_with<T: From<LanCommand> + Send + 'static>(listener: TcpListener, tls: Arc<rustls::ServerConfig>, to_agent: mpsc::Sender<T>, limits: Limits) {
    let acceptor = TlsAcceptor::from(tls);
    let slots = Arc::new(Semaphore::new(limits.connections));
    let per_address = Arc::new(std::sync::Mutex::new(BTreeMap::new()));
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off a little instead of spinning.
                    warn!("LAN accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            },
            () = to_agent.closed() => return,
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            warn!(%peer, "LAN connection refused: {} already open", limits.connections);
            drop(tcp);
            continue;
        };
        let Some(address_slot) = AddressSlot::take(&per_address, peer.ip().to_canonical(), limits.per_address) else {
            warn!(%peer, "LAN connection refused: {} already open from this address", limits.per_address);
            drop(tcp);
            continue;
        };
        let acceptor = acceptor.clone();
        let to_agent = to_agent.clone();
        tokio::spawn(async move {
            let _slots = (slot, address_slot);
            match timeout(limits.lifetime, connection(acceptor, tcp, &to_agent, limits.frames)).await {
                Ok(Ok(n)) => info!(%peer, frames = n, "LAN connection closed"),
                Ok(Err(why)) => warn!(%peer, "LAN connection dropped: {why}"),
                Err(_) => info!(%peer, "LAN connection closed at its lifetime ({:?})", limits.lifetime),
            }
        });
    }
}

async fn connection<T: From<LanCommand>>(acceptor: TlsAcceptor, tcp: TcpStream, to_agent: &mpsc::Sender<T>, max_frames: u32) -> Result<u32, String> {
    let _ = tcp.set_nodelay(true);
    let mut tls = match timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(format!("TLS handshake failed: {e}")),
        Err(_) => return Err(format!("no TLS handshake within {HANDSHAKE_TIMEOUT:?}")),
    };
    let mut served = 0u32;
    loop {
        let Some(frame) = read_frame::<_, CloudFrame>(&mut tls, IDLE_TIMEOUT).await? else { return Ok(served) };
        // Pings count too: otherwise a host could keep a slot busy with them.
        if served >= max_frames {
            return Err(format!("more than {max_frames} frames on one connection"));
        }
        served += 1;
        let out = match frame {
            CloudFrame::Ping { n } => vec![DeviceFrame::Pong { n }],
            CloudFrame::Pair { .. } => return Err("pairing is not offered on the LAN".into()),
            CloudFrame::Busy { .. } => return Err("a busy hint means nothing on the LAN".into()),
            CloudFrame::Command { envelope } => {
                let (reply, answer) = oneshot::channel();
                to_agent.send(T::from(LanCommand { envelope, reply })).await.map_err(|_| "the agent stopped".to_owned())?;
                match timeout(IO_TIMEOUT, answer).await {
                    Ok(Ok(frames)) => frames,
                    // The core could not save the state: no effect, and no
                    // answer, as on the cloud link.
                    Ok(Err(_)) => return Err("the device could not act on the command".into()),
                    Err(_) => return Err("the agent did not answer in time".into()),
                }
            }
        };
        for f in &out {
            write_frame(&mut tls, f).await?;
        }
    }
}

/// Reads one length-prefixed frame. `Ok(None)` at a clean end of stream
/// before a header. The header is checked against the 64 KiB limit before
/// the body is read.
pub async fn read_frame<S: AsyncRead + Unpin, T: serde::de::DeserializeOwned>(s: &mut S, idle: Duration) -> Result<Option<T>, String> {
    let mut header = [0u8; 4];
    match timeout(idle, s.read_exact(&mut header)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Ok(Err(e)) => return Err(format!("read failed: {e}")),
        Err(_) => return Err(format!("nothing received for {idle:?}")),
    }
    let len = link::frame_len(header).map_err(|e| format!("bad frame header: {e}"))?;
    let mut body = vec![0u8; len];
    match timeout(IO_TIMEOUT, s.read_exact(&mut body)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(format!("read failed: {e}")),
        Err(_) => return Err(format!("a frame took longer than {IO_TIMEOUT:?}")),
    }
    link::decode_body(&body).map(Some).map_err(|e| format!("malformed frame: {e}"))
}

/// Writes one frame within [`IO_TIMEOUT`].
pub async fn write_frame<S: AsyncWrite + Unpin, T: serde::Serialize>(s: &mut S, frame: &T) -> Result<(), String> {
    let bytes = link::encode_frame(frame).map_err(|e| format!("could not encode a frame: {e}"))?;
    let write = async {
        s.write_all(&bytes).await?;
        s.flush().await
    };
    match timeout(IO_TIMEOUT, write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("write failed: {e}")),
        Err(_) => Err(format!("write stalled for {IO_TIMEOUT:?}")),
    }
}

/// What a LAN client expects of the device it dials: the id it paired
/// with, and the device key learned at pairing and/or the manufacturer CA.
/// The handshake fails unless the certificate names exactly that device
/// (subject CN) and carries that key, or chains to that CA at the current
/// time (RFC 8446 section 4.4.2 chain, 4.4.3 CertificateVerify with the
/// certificate's key).
#[derive(Debug, Clone)]
pub struct DevicePin {
    /// The device id the certificate's CN must be.
    pub device: DeviceId,
    /// The key the certificate must carry (known from pairing).
    pub key: Option<PublicKey>,
    /// The manufacturer CA (PEM) the certificate must chain to.
    pub manufacturer_ca_pem: Option<String>,
}

#[derive(Debug)]
struct PinVerifier {
    pin: DevicePin,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let bad = |why: String| rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(Arc::new(std::io::Error::other(why)))));
        if self.pin.key.is_none() && self.pin.manufacturer_ca_pem.is_none() {
            return Err(bad("neither the paired key nor the manufacturer CA is known".into()));
        }
        // The chain (the manufacturer signs device certificates directly)
        // and validity period, when the CA is known.
        let (id, key) = match &self.pin.manufacturer_ca_pem {
            Some(ca) => hearth_pki::verify_device_cert(ca, end_entity).map_err(|e| bad(format!("not a certificate of our manufacturer: {e}")))?,
            None => hearth_pki::device_identity(end_entity).map_err(|e| bad(format!("not a device certificate: {e}")))?,
        };
        if id != self.pin.device {
            return Err(bad(format!("the certificate is for device {id}, not {}", self.pin.device)));
        }
        if self.pin.key.as_ref().is_some_and(|k| k != &key) {
            return Err(bad(format!("device {id} presented a key other than the one it paired with")));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(&self, _: &[u8], _: &CertificateDer<'_>, _: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The config is TLS 1.3 only; rustls never gets here.
        Err(rustls::Error::General("TLS 1.2 is not offered".into()))
    }

    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS 1.3 client configuration that accepts exactly the pinned device.
pub fn client_config(pin: DevicePin) -> anyhow::Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(PinVerifier { pin, provider: Arc::clone(&provider) });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        // Not a weakened check: the device is verified by `PinVerifier`
        // above (its id and paired key or the manufacturer chain) instead
        // of a host name, which a LAN address does not have.
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// Sends one signed command envelope to a device on the LAN and returns
/// the raw result envelope, still to be verified by the caller.
pub async fn exchange(addr: &str, pin: DevicePin, envelope: Vec<u8>) -> anyhow::Result<(Vec<u8>, SocketAddr)> {
    use anyhow::Context;
    let config = Arc::new(client_config(pin)?);
    let attempt = async {
        let tcp = TcpStream::connect(addr).await.with_context(|| format!("cannot reach {addr} on the LAN"))?;
        let peer = tcp.peer_addr()?;
        let _ = tcp.set_nodelay(true);
        // The name is unused by the pin verifier; the IP form keeps SNI out.
        let name = ServerName::IpAddress(peer.ip().into());
        let tls = TlsConnector::from(config).connect(name, tcp).await.map_err(|e| anyhow::anyhow!("LAN TLS handshake with {addr} failed: {}", describe(&e)))?;
        anyhow::Ok((tls, peer))
    };
    let (mut tls, peer) = timeout(HANDSHAKE_TIMEOUT, attempt).await.map_err(|_| anyhow::anyhow!("no TLS connection to {addr} within {HANDSHAKE_TIMEOUT:?}"))??;
    write_frame(&mut tls, &CloudFrame::Command { envelope }).await.map_err(anyhow::Error::msg)?;
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match read_frame::<_, DeviceFrame>(&mut tls, left).await.map_err(anyhow::Error::msg)? {
            Some(DeviceFrame::Result { envelope }) => {
                let _ = timeout(Duration::from_secs(1), tls.shutdown()).await;
                return Ok((envelope, peer));
            }
            Some(_) => continue,
            None => anyhow::bail!("the device at {addr} closed the connection without answering"),
        }
    }
}

fn describe(e: &std::io::Error) -> String {
    match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(why)) => format!("the device's certificate was rejected ({why:?})"),
        Some(other) => other.to_string(),
        None => e.to_string(),
    }
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)).unwrap_or(0)
}

/// Where a motion sensor sends its commands (from a motion rule's target).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The target device.
    pub device: DeviceId,
    /// Its key (pinned by the owner's CLI from pairing).
    pub key: PublicKey,
    /// Its LAN address, `HOST:PORT`, if it serves the LAN.
    pub addr: Option<String>,
    /// Seconds without motion before switching it off.
    pub off_after_secs: u32,
    /// Whether the cloud link may carry its commands when the LAN fails.
    /// False on a sensor with fixed-cadence reporting (ADR 0011) unless
    /// the owner's rule allows it: those commands leave at motion time.
    pub cloud_path: bool,
}

/// A motion rule fired on the sensor: switch these targets on (or keep
/// them on) and off after their quiet periods.
#[derive(Debug)]
pub struct MotionSeen {
    /// Armed targets.
    pub targets: Vec<Target>,
}

/// A frame the motion sender wants written on the cloud link (the agent
/// owns the link; dropped while it is down).
#[derive(Debug)]
pub struct ToCloud(pub DeviceFrame);

/// The sensor's side of a motion rule across devices (issue 5): it signs
/// `SetRelay` commands with its own device key, which the owner added to
/// the target's access list as a member (may switch; may not share,
/// revoke or change rules — `AccessList::decide` step 7), and sends them
/// to the target's LAN endpoint. The target verifies them like any
/// controller's. When the target has no LAN address or cannot be reached
/// on the LAN, the same signed envelope goes over the cloud link instead
/// (`DeviceFrame::Command`; the cloud forwards it only between devices of
/// one owner). The same envelope, so a command the LAN did deliver is
/// refused as replayed rather than executed twice; no answer comes back
/// that way.
///
/// Counters: `max(last + 1, unix milliseconds)`, so they grow across
/// restarts without being stored (as long as the clock does not jump back
/// by more than the gap; then the target refuses them as replayed, which
/// is the safe failure).
pub fn spawn_motion_sender<T: From<ToCloud> + Send + 'static>(device: DeviceId, key: SigningKey, to_agent: mpsc::Sender<T>) -> mpsc::Sender<MotionSeen> {
    let (tx, mut rx) = mpsc::channel::<MotionSeen>(8);
    tokio::spawn(async move {
        let me = PublicKey::from(&key).controller_id();
        let enc = EncSecretKey::for_controller(&key);
        let mut counter = 0u64;
        // Targets this sensor switched on, with when to switch them off.
        let mut pending: BTreeMap<DeviceId, (Target, Instant)> = BTreeMap::new();
        loop {
            let next_off = pending.values().map(|(_, at)| *at).min();
            let seen = tokio::select! {
                m = rx.recv() => match m { Some(m) => Some(m), None => return },
                () = async { match next_off { Some(at) => tokio::time::sleep_until(at).await, None => std::future::pending().await } } => None,
            };
            let mut sends: Vec<(Target, bool)> = Vec::new();
            match seen {
                Some(m) => {
                    for t in m.targets {
                        let off_at = Instant::now() + Duration::from_secs(u64::from(t.off_after_secs));
                        let on_already = pending.contains_key(&t.device);
                        pending.insert(t.device.clone(), (t.clone(), off_at));
                        if !on_already {
                            sends.push((t, true));
                        }
                    }
                }
                None => {
                    let now = Instant::now();
                    let due: Vec<DeviceId> = pending.iter().filter(|(_, (_, at))| *at <= now).map(|(d, _)| d.clone()).collect();
                    for d in due {
                        if let Some((t, _)) = pending.remove(&d) {
                            sends.push((t, false));
                        }
                    }
                }
            }
            for (mut t, on) in sends {
                // Every batch registers the key first, so the target seals
                // its answers for us and we can read its state (a member may
                // set its own key). Not once per target: the owner's
                // `hearth rules motion` re-grants the sensor with a
                // placeholder key each time the rule is edited, after which
                // an answer sealed for it could not be read (found by
                // hearth's rules::a_motion_rule_switches_only_inside_its_window_or_after_sunset).
                let mut cmds = vec![Command::RegisterKey { key: enc.public().clone() }];
                if on {
                    // Motion never takes over a light a person switched on:
                    // if it is on already, leave it (and its off) alone.
                    cmds.push(Command::GetState);
                }
                cmds.push(Command::SetRelay { on });
                // After one LAN failure the rest of this batch goes straight to the cloud.
                let mut lan_up = t.addr.is_some();
                // One mDNS look-up per batch when the stored address fails.
                let mut browsed = false;
                for command in cmds {
                    let switch = matches!(command, Command::SetRelay { .. });
                    if !lan_up && !switch {
                        // Key registration and the state check need an answer,
                        // which only the LAN gives.
                        continue;
                    }
                    counter = (counter + 1).max(unix_ms());
                    let kind = match command {
                        Command::RegisterKey { .. } => 0,
                        Command::GetState => 1,
                        _ => 2,
                    };
                    let envelope = match sign(&key, &me, &t.device, counter, command) {
                        Ok(e) => e,
                        Err(e) => {
                            warn!("motion rule: could not sign: {e}");
                            break;
                        }
                    };
                    let answer = match (&t.addr, lan_up) {
                        (Some(addr), true) => send_lan(&me, &enc, &t, addr, counter, envelope.clone()).await,
                        _ => Err(anyhow::anyhow!("no LAN address")),
                    };
                    let answer = match answer {
                        // The stored address may be stale (DHCP): ask the LAN
                        // once; the pin still decides whether it is the target.
                        Err(e) if !browsed => {
                            browsed = true;
                            match discover(&t.device).await {
                                Some(addr) if t.addr.as_ref() != Some(&addr) => {
                                    info!(target = %t.device, %addr, "motion rule: found the target on the LAN by mDNS");
                                    if let Some((p, _)) = pending.get_mut(&t.device) {
                                        p.addr = Some(addr.clone());
                                    }
                                    t.addr = Some(addr.clone());
                                    lan_up = true;
                                    send_lan(&me, &enc, &t, &addr, counter, envelope.clone()).await
                                }
                                _ => Err(e),
                            }
                        }
                        other => other,
                    };
                    match answer {
                        Ok((Outcome::Done, _)) if kind == 0 => {}
                        Ok((Outcome::Done, state)) if kind == 1 => {
                            if state.relay == Some(true) {
                                info!(target = %t.device, "motion rule: the target is already on; left to whoever switched it");
                                pending.remove(&t.device);
                                break;
                            }
                        }
                        Ok((Outcome::Done, _)) => info!(target = %t.device, on, "motion rule: switched the target over the LAN"),
                        Ok((Outcome::Refused { reason }, _)) => warn!(target = %t.device, on, %reason, "motion rule: the target refused"),
                        Ok((other, _)) => warn!(target = %t.device, ?other, "motion rule: unexpected answer"),
                        Err(e) => {
                            if lan_up && t.cloud_path {
                                warn!(target = %t.device, on, "motion rule: the target is not reachable on the LAN ({e:#}); using the cloud link");
                            } else if lan_up {
                                warn!(target = %t.device, on, "motion rule: the target is not reachable on the LAN ({e:#})");
                            }
                            lan_up = false;
                            if switch && !t.cloud_path {
                                // ADR 0011: the cloud would learn when motion happened.
                                warn!(target = %t.device, on, "motion rule: the target is not reachable on the LAN and the rule does not allow the cloud path (it reveals motion timing); not sent");
                            } else if switch {
                                let frame = DeviceFrame::Command { to: t.device.clone(), envelope };
                                if to_agent.send(T::from(ToCloud(frame))).await.is_err() {
                                    return;
                                }
                                info!(target = %t.device, on, "motion rule: sent over the cloud link (no answer comes back that way)");
                            }
                        }
                    }
                }
            }
        }
    }.instrument(tracing::error_span!("motion", sensor = %device)));
    tx
}

/// The target's LAN endpoint as its mDNS responder announces it (a one
/// second browse; `HEARTH_MDNS_TO` overrides the group for tests).
async fn discover(device: &DeviceId) -> Option<String> {
    let to = std::env::var("HEARTH_MDNS_TO")
        .ok()
        .and_then(|a| a.parse().ok())
        .unwrap_or(SocketAddr::from((crate::mdns::GROUP, crate::mdns::PORT)));
    let found = tokio::task::spawn_blocking(move || crate::mdns::browse(to, Duration::from_secs(1))).await.ok()?.ok()?;
    found.into_iter().find(|f| &f.device == device).map(|f| f.addr.to_string())
}

fn sign(key: &SigningKey, me: &ControllerId, device: &DeviceId, counter: u64, command: Command) -> anyhow::Result<Vec<u8>> {
    let payload = CommandPayload {
        v: PROTOCOL_VERSION,
        device: device.clone(),
        controller: me.clone(),
        counter,
        issued_at: unix_ms() / 1000,
        command,
    };
    Ok(message::sign_command(key, &payload)?)
}

async fn send_lan(me: &ControllerId, enc: &EncSecretKey, t: &Target, addr: &str, counter: u64, envelope: Vec<u8>) -> anyhow::Result<(Outcome, hearth_proto::message::DeviceState)> {
    let pin = DevicePin { device: t.device.clone(), key: Some(t.key.clone()), manufacturer_ca_pem: None };
    let (answer, _) = exchange(addr, pin, envelope).await?;
    let r: ResultPayload = if e2e::is_sealed(&answer) {
        e2e::open_result(&answer, &t.device, &t.key, me, enc)?
    } else {
        message::verify_result(&answer, &t.device, &t.key)?
    };
    anyhow::ensure!(r.controller == *me && r.counter == counter, "the answer is for another command");
    Ok((r.outcome, r.state))
}

/// The LAN sockets, bound before the sandbox is applied (`hearth-device
/// run --lan-listen`): the TLS endpoint and, if the host allows it, the
/// shared mDNS port.
#[derive(Debug)]
pub struct Bound {
    /// The endpoint's TCP listener.
    pub listener: std::net::TcpListener,
    /// The mDNS socket (`None`: discovery off, e.g. no multicast here).
    pub mdns: Option<std::net::UdpSocket>,
}

/// Binds the LAN endpoint on `addr` and the mDNS responder's socket. The
/// device's state directory must be provisioned (checked here so a typo
/// fails before anything listens).
pub fn bind(addr: SocketAddr, state_dir: &std::path::Path) -> anyhow::Result<Bound> {
    use anyhow::Context;
    crate::store::load_config(state_dir)?;
    let listener = std::net::TcpListener::bind(addr).with_context(|| format!("binding the LAN endpoint on {addr}"))?;
    let iface = match addr.ip() {
        std::net::IpAddr::V4(ip) => ip,
        std::net::IpAddr::V6(_) => std::net::Ipv4Addr::UNSPECIFIED,
    };
    let port = std::env::var("HEARTH_MDNS_PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(crate::mdns::PORT);
    let mdns = match crate::mdns::bind_responder(iface, port) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!("mDNS off: cannot join {}:{port} ({e}); controllers need `--lan ADDR`", crate::mdns::GROUP);
            None
        }
    };
    Ok(Bound { listener, mdns })
}

/// The TCP port a device's sandbox must allow connecting to for its LAN
/// peers: a motion sensor's targets (default [`DEFAULT_PORT`]); `None` for
/// other kinds unless given.
pub fn peer_port(state_dir: &std::path::Path, flag: Option<u16>) -> anyhow::Result<Option<u16>> {
    let config = crate::store::load_config(state_dir)?;
    Ok(if config.kind.has(hearth_proto::capability::Capability::Motion) { Some(flag.unwrap_or(DEFAULT_PORT)) } else { flag })
}

/// Starts the mDNS responder for the endpoint at `addr` (a thread of its
/// own: a blocking socket loop, no runtime needed).
pub fn advertise(handle: &crate::AgentHandle, addr: SocketAddr, mdns: Option<std::net::UdpSocket>) {
    let Some(socket) = mdns else { return };
    let service = crate::mdns::Service { device: handle.device().clone(), port: addr.port() };
    let fixed = match addr.ip() {
        std::net::IpAddr::V4(ip) if !ip.is_unspecified() => Some(ip),
        _ => None,
    };
    let spawned = std::thread::Builder::new().name("mdns".into()).spawn(move || crate::mdns::respond(socket, service, fixed));
    match spawned {
        Ok(_) => info!(%addr, "advertising {} over mDNS", crate::mdns::SERVICE),
        Err(e) => warn!("mDNS off: cannot start the responder thread: {e}"),
    }
}
