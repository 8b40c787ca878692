//! The device link (ADR 0002): mutual TLS on its own port, then
//! length-prefixed JSON frames.
//!
//! The device's id and key come from its verified certificate and from
//! nothing it sends. Every read has a deadline: the first frame must be a
//! hello within [`HELLO_TIMEOUT`], a frame body must follow its header
//! within [`BODY_TIMEOUT`], and a link that sends nothing for [`IDLE_LIMIT`]
//! is dropped (the cloud pings every [`PING_EVERY`] so a live device always
//! has something to answer). A malformed frame ends the link, never the
//! process.
//!
//! An idle link is cheap (issue 8): one task with one loop, no reader and
//! writer halves ([`Conn::serve`]; database calls and frame handling are
//! boxed, so their futures take memory only while they run). It is parked
//! on the read of a 4-byte header (a frame body is allocated once its
//! header arrived and freed after decoding), on a queue that holds no
//! buffer while empty ([`crate::router::queue`]), and on one timer for all
//! its deadlines (idle limit, frame body, write, ping, state report). The
//! newest state report reaches the database within [`STATE_PERSIST_EVERY`]
//! even if the device then falls silent, and the router's copy is dropped
//! one such interval later, so device listings then read it from the
//! database. TLS runs on rustls's unbuffered API ([`tls`]), so the link
//! holds no TLS record or plaintext buffer between frames either (a
//! `tokio_rustls` stream kept 4 KiB per link for its whole life). What is
//! left is rustls's connection state (boxed once, not copied into every
//! async layer): key schedules and the peer's certificate.
//! In cluster mode the link also has an entry in the cluster's device
//! directory (`cluster.rs`).

use std::time::Duration;

use hearth_proto::ids::{ControllerId, DeviceId};
use hearth_proto::keys::PublicKey;
use hearth_proto::link::{decode_body, frame_len, CloudFrame, DeviceFrame};
use hearth_proto::message::{verify_result, verify_state, Peek};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::{timeout, Instant};

use crate::router::{DeviceInfo, LinkHandle, QueueReceiver};
use crate::store::{unix_now, AccountId, StoreError};
use crate::AppState;

mod gate;
mod tls;
pub use gate::SetupGate;
pub use tls::{accept, DeviceTls};

/// Time allowed for the first frame.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for a frame body once its header arrived.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the cloud pings a device.
pub const PING_EVERY: Duration = Duration::from_secs(15);
/// A link that sent no frame for this long is dropped.
pub const IDLE_LIMIT: Duration = Duration::from_secs(45);
/// Time allowed for the database work that registers a link, after its
/// hello. A device hears its first ping [`PING_EVERY`] after that and gives
/// up on a silent cloud after 45 s (`hearth_device::agent::IDLE_TIMEOUT`),
/// so a setup slower than this would only hold a link the device is about
/// to drop; ending it here lets the device's backoff spread the retry.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(15);
/// Time allowed to write one frame.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// State reports are written to the database at most this often per
/// device; the newest one is always kept in memory and written at the end.
pub const STATE_PERSIST_EVERY: Duration = Duration::from_secs(1);

/// Why a device link ended.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The client certificate is missing or carries no device identity.
    #[error("no usable device certificate: {0}")]
    Certificate(String),
    /// The device closed the connection.
    #[error("closed by the device")]
    Closed,
    /// Reading or writing failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// A deadline passed.
    #[error("{0}")]
    Timeout(&'static str),
    /// The device sent a frame that is not valid.
    #[error("bad frame: {0}")]
    Frame(#[from] hearth_proto::Error),
    /// The first frame was not a hello.
    #[error("the first frame must be a hello")]
    NoHello,
    /// The database failed.
    #[error("database: {0}")]
    Store(#[from] crate::store::StoreError),
}

/// Reads one frame: header, limit check, then the body under a deadline.
async fn read_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    wait: Duration,
    waiting_for: &'static str,
) -> Result<DeviceFrame, LinkError> {
    let mut header = [0u8; 4];
    match timeout(wait, rd.read_exact(&mut header)).await {
        Err(_) => return Err(LinkError::Timeout(waiting_for)),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(LinkError::Closed),
        Ok(r) => r?,
    };
    // The limit is enforced on the header, before the body is allocated.
    let len = frame_len(header)?;
    let mut body = vec![0u8; len];
    timeout(BODY_TIMEOUT, rd.read_exact(&mut body)).await.map_err(|_| LinkError::Timeout("a frame body"))??;
    Ok(decode_body(&body)?)
}

async fn write_frame<W: AsyncWrite + Unpin>(wr: &mut W, bytes: &[u8]) -> Result<(), LinkError> {
    timeout(WRITE_TIMEOUT, async {
        wr.write_all(bytes).await?;
        wr.flush().await
    })
    .await
    .map_err(|_| LinkError::Timeout("the device to accept a frame"))??;
    Ok(())
}

/// Serves one device link until it ends; the caller logs the outcome.
pub async fn run(state: AppState, mut tls: Box<DeviceTls>) -> Result<(), LinkError> {
    // The certificate's copy is moved into the database call below, not
    // kept for the link's life (rustls keeps its own).
    let (id, key, cert) = {
        let cert = tls
            .peer_certificates()
            .and_then(|chain| chain.first())
            .ok_or_else(|| LinkError::Certificate("no client certificate".into()))?;
        let (id, key) = hearth_pki::device_identity(cert).map_err(|e| LinkError::Certificate(e.to_string()))?;
        (id, key, cert.to_vec())
    };
    tracing::Span::current().record("device", tracing::field::display(&id));

    let (kind, setup_lookup) = match read_frame(&mut tls, HELLO_TIMEOUT, "a hello").await? {
        DeviceFrame::Hello { kind, firmware, setup_lookup } => {
            // Debug formatting escapes control characters a device might put in its text.
            let firmware: String = firmware.chars().take(64).collect();
            tracing::info!(?kind, ?firmware, setup = setup_lookup.is_some(), "device hello");
            (kind, setup_lookup)
        }
        _ => return Err(LinkError::NoHello),
    };
    // Every database call here and in `handle` is boxed: an inline future
    // would make this link's whole state machine as large as the largest
    // of them for as long as the link lives (7 KiB when measured), while
    // boxed ones take memory only while they run (issue 8: idle links must
    // be cheap).
    // Issue 8: registering waits its turn (see `gate`), and the slot is
    // held until the link is registered, just before it is served.
    let setup_slot = match state.link_setups.enter(&id).await {
        Ok(slot) => slot,
        Err(e) => {
            Box::pin(turn_away(&mut tls)).await;
            return Err(e);
        }
    };
    let setup = async {
        let owner = state.store.device_connected(id.clone(), kind, cert, unix_now()).await?;
        // Members only matter for a paired device.
        let members = if owner.is_some() { state.store.members_of(id.clone()).await? } else { Vec::new() };
        Ok::<_, LinkError>((owner, members))
    };
    let (owner, members) =
        Box::pin(timeout(SETUP_TIMEOUT, setup)).await.map_err(|_| LinkError::Timeout("the database to register the link"))??;
    let paired = owner.is_some();
    let handle = state.router.add_device(&id, DeviceInfo { owner, setup_lookup, members });
    let link = handle.link;
    // Cluster mode: record this node as the device's holder in the
    // directory while the link lives, and make an older link of it on
    // another node give way.
    let _cluster_claim = match &state.cluster {
        Some(c) => Some(Box::pin(c.device_up(&id, link)).await),
        None => None,
    };
    if paired {
        // A share recorded between the read above and add_device updated no
        // router entry (there was none yet); read again now that there is.
        // Not `?`: the link is registered now and must reach its removal below.
        match Box::pin(state.store.members_of(id.clone())).await {
            Ok(members) => state.router.set_members(&id, members),
            Err(e) => tracing::warn!(error = %e, "could not re-read the device's members"),
        }
    }

    let mut conn =
        Conn { state: &state, id: &id, key: &key, link, pending_state: None, last_persist: None, held_since: None, revokes: Vec::new() };
    // Revokes first (issue 3): written before `serve` starts draining the
    // commands routed to this link, so the device applies them before any.
    let sent = Box::pin(send_pending_revokes(&state, &id, paired, &mut tls)).await;
    drop(setup_slot);
    let result = match sent {
        Ok(sent) => {
            conn.revokes = sent;
            conn.serve(&mut tls, handle).await
        }
        Err(e) => Err(e),
    };

    // The newest state report reaches the database before the controllers
    // hear "offline", so a listing they make on that news shows it (the
    // router's copy goes with the link).
    Box::pin(conn.flush_state(true)).await;
    state.router.remove_device(&id, link);
    if let Err(e) = Box::pin(state.store.device_seen(id.clone(), unix_now())).await {
        tracing::warn!(error = %e, "could not record last_seen");
    }
    // Best effort: tell the device we are done (TLS close_notify).
    let _ = timeout(Duration::from_secs(1), tls.shutdown()).await;
    result
}

/// The hint a link turned away by the setup gate gets (issue 8: "a retry
/// after hint"): about how long the queue it could not enter takes to
/// drain. The device adds its own jitter.
pub const BUSY_RETRY_AFTER: Duration = gate::SETUP_QUEUE_WAIT;

/// Tells a device the cloud is too busy to register its link and when to
/// redial, then closes the link. Best effort: the device may be gone.
async fn turn_away<S: AsyncRead + AsyncWrite + Unpin>(tls: &mut S) {
    let busy = CloudFrame::Busy { retry_after: BUSY_RETRY_AFTER.as_secs().try_into().unwrap_or(u32::MAX) };
    if let Ok(bytes) = hearth_proto::link::encode_frame(&busy) {
        let _ = write_frame(tls, &bytes).await;
    }
    let _ = timeout(Duration::from_secs(1), tls.shutdown()).await;
}

struct Conn<'a> {
    state: &'a AppState,
    id: &'a DeviceId,
    key: &'a PublicKey,
    link: u64,
    /// A state report not yet written to the database.
    pending_state: Option<Vec<u8>>,
    last_persist: Option<Instant>,
    /// When the router's copy of the newest state report reached the
    /// database; the copy is dropped [`STATE_PERSIST_EVERY`] later.
    held_since: Option<Instant>,
    /// Held revokes sent on this link and not answered yet (issue 3).
    revokes: Vec<(ControllerId, u64)>,
}

/// Writes the revokes the cloud held for this device while it was offline
/// (issue 3), oldest first, straight onto the link. The caller has not
/// started the writer that drains routed commands yet, so these are the
/// first commands the device reads on this connection. Each stays stored
/// until the device answers it (done or refused), so a link that drops
/// first delivers it again next time; the device's replay counter makes a
/// second delivery harmless.
async fn send_pending_revokes(
    state: &AppState,
    id: &DeviceId,
    paired: bool,
    tls: &mut DeviceTls,
) -> Result<Vec<(ControllerId, u64)>, LinkError> {
    if !paired {
        return Ok(Vec::new());
    }
    let mut sent = Vec::new();
    // A database error ends the link (fail closed): routing commands to a
    // device whose held revokes could not be read would let them overtake.
    for p in state.store.pending_revokes(id.clone(), unix_now()).await? {
        let bytes = hearth_proto::link::encode_frame(&CloudFrame::Command { envelope: p.envelope })?;
        write_frame(tls, &bytes).await?;
        tracing::info!(controller = %p.controller, counter = p.counter, "delivered a revoke held while the device was offline");
        if let Ok(controller) = p.controller.parse() {
            sent.push((controller, p.counter));
        }
    }
    Ok(sent)
}

/// Forgets a held revoke once the device answered it.
async fn revoke_answered(state: &AppState, id: &DeviceId, revokes: &mut Vec<(ControllerId, u64)>, controller: &ControllerId, counter: u64) {
    let Some(i) = revokes.iter().position(|(c, n)| c == controller && *n == counter) else { return };
    revokes.swap_remove(i);
    if let Err(e) = state.store.revoke_delivered(id.clone(), controller.to_string(), counter).await {
        tracing::warn!(error = %e, "could not forget a delivered revoke; it will be sent again (and refused as replayed)");
    }
}

/// Whether the cloud may hold `envelope`, a claimed revoke for an offline
/// device, on behalf of `account`: its key id must be the controller its
/// payload names, that controller must be registered to `account`
/// (`POST /controllers`), and the COSE_Sign1 signature must verify with the
/// key registered for it (ADR 0001). Otherwise any account that can reach
/// the device could fill its queue with junk the device would refuse under
/// another key id, so never answer, and so never leave the queue.
///
/// This check only decides what the cloud *stores*; it grants nothing. The
/// device alone decides access (DESIGN.md "Cloud": not trusted with
/// control; ADR 0006) and verifies the revoke again against its own access
/// list when it reads it.
async fn revoke_may_be_held(state: &AppState, account: &AccountId, envelope: &[u8], peek: &Peek) -> Result<bool, StoreError> {
    let Ok(unverified) = hearth_proto::envelope::open(envelope) else { return Ok(false) };
    if unverified.key_id() != hex::decode(peek.controller.as_str()).unwrap_or_default().as_slice() {
        return Ok(false);
    }
    let registered = state.store.controllers_of(account.clone()).await?;
    let Some(row) = registered.iter().find(|c| c.id == peek.controller.as_str()) else { return Ok(false) };
    let Ok(key) = PublicKey::from_sec1(&row.public_key) else { return Ok(false) };
    let Ok(payload) = unverified.verify_as(hearth_proto::envelope::Kind::Command, &key) else { return Ok(false) };
    // The verified payload must be the one peeked at (it is: same bytes).
    Ok(hearth_proto::message::decode_command(&payload).is_ok_and(|p| {
        p.controller == peek.controller && p.counter == peek.counter && p.device == peek.device
    }))
}

/// The answer to a claimed revoke for a device that is offline (issue 3):
/// if [`revoke_may_be_held`], the cloud keeps it and sends it before
/// anything else when the device reconnects (202); a different envelope
/// already waiting under the same controller and counter gives 409; a full
/// queue ([`crate::store::PENDING_REVOKES_MAX`]) or a revoke the cloud may
/// not hold gives the same 503 "device is offline" as any other command.
pub async fn hold_revoke(state: &AppState, account: &AccountId, device: &DeviceId, peek: &Peek, envelope: Vec<u8>) -> crate::error::ApiError {
    use axum::http::StatusCode;
    use crate::error::ApiError;
    use crate::store::RevokeQueued;
    match revoke_may_be_held(state, account, &envelope, peek).await {
        Err(e) => return ApiError::from(e),
        Ok(false) => return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "device is offline"),
        Ok(true) => {}
    }
    match state.store.queue_revoke(device.clone(), peek.controller.to_string(), peek.counter, envelope.clone(), unix_now()).await {
        Err(e) => ApiError::from(e),
        Ok(RevokeQueued::Full) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "device is offline and has too many revokes waiting already"),
        Ok(RevokeQueued::Conflict) => {
            ApiError::new(StatusCode::CONFLICT, "a different revoke with this controller and counter is already waiting")
        }
        Ok(RevokeQueued::Held) => {
            // The device may have connected after the caller saw it offline
            // but before the revoke was stored (its link read the queue
            // already): send it now too. A second copy is refused as replayed.
            if state.router.is_online(device) {
                let _ = state.router.send_to_device(device, &CloudFrame::Command { envelope });
            }
            tracing::info!(%device, controller = %peek.controller, "holding a revoke for an offline device");
            ApiError::new(
                StatusCode::ACCEPTED,
                "device is offline: the revoke is held by the cloud and delivered before anything else when the device reconnects",
            )
        }
    }
}

impl Conn<'_> {
    /// The link's one loop (issue 8: one task per link, no reader and
    /// writer halves): frames from the device are read and handled, queued
    /// frames and pings are written, and one timer serves every deadline.
    async fn serve(&mut self, tls: &mut DeviceTls, handle: LinkHandle<Vec<u8>>) -> Result<(), LinkError> {
        let LinkHandle { mut rx, close, .. } = handle;
        let mut stop = self.state.stop.clone();
        let mut io = LinkIo::default();
        let mut last_frame = Instant::now();
        let mut next_ping = last_frame + PING_EVERY;
        let mut pings = 0u64;
        let timer = tokio::time::sleep_until(next_ping);
        tokio::pin!(timer);
        loop {
            // Each deadline of the link; the earliest arms the timer.
            let read_deadline = match io.body_since {
                Some(t) => t + BODY_TIMEOUT,
                None => last_frame + IDLE_LIMIT,
            };
            let write_deadline = io.write_since.map(|t| t + WRITE_TIMEOUT);
            let deadline = [Some(read_deadline), Some(next_ping), write_deadline, self.state_deadline()]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(read_deadline);
            if timer.deadline() != deadline {
                timer.as_mut().reset(deadline);
            }
            let event = tokio::select! {
                r = std::future::poll_fn(|cx| io.poll(tls, &mut rx, cx)) => r?,
                () = &mut timer => Event::Timer,
                () = close.notified() => {
                    tracing::info!("link replaced by a newer one or too slow; closing");
                    return Ok(());
                }
                () = crate::stopped(&mut stop) => return Ok(()),
            };
            match event {
                Event::Frame(frame) => {
                    Box::pin(self.handle(frame)).await;
                    Box::pin(self.flush_state(false)).await;
                    last_frame = Instant::now();
                }
                // The router dropped this link.
                Event::QueueClosed => return Ok(()),
                Event::Timer => {
                    let now = Instant::now();
                    if now >= read_deadline {
                        return Err(LinkError::Timeout(if io.body_since.is_some() { "a frame body" } else { "any frame (idle link)" }));
                    }
                    if write_deadline.is_some_and(|t| now >= t) {
                        return Err(LinkError::Timeout("the device to accept a frame"));
                    }
                    if now >= next_ping {
                        pings += 1;
                        io.ping(hearth_proto::link::encode_frame(&CloudFrame::Ping { n: pings })?);
                        next_ping = now + PING_EVERY;
                    }
                    Box::pin(self.flush_state(false)).await;
                    self.forget_state_if_stored();
                }
            }
        }
    }

    /// When a held state report is due for the database, or the router's
    /// copy of a stored one is due to be dropped.
    fn state_deadline(&self) -> Option<Instant> {
        match (&self.pending_state, self.last_persist, self.held_since) {
            (Some(_), Some(t), _) => Some(t + STATE_PERSIST_EVERY),
            (Some(_), None, _) => Some(Instant::now()),
            (None, _, Some(t)) => Some(t + STATE_PERSIST_EVERY),
            (None, _, None) => None,
        }
    }

    /// Drops the router's copy of the newest state report once the
    /// database has had it for [`STATE_PERSIST_EVERY`]: a device listing
    /// that read the database just before the write still finds the
    /// report in the router meanwhile, and an idle device then costs no
    /// copy (issue 8).
    fn forget_state_if_stored(&mut self) {
        if self.pending_state.is_none() && self.held_since.is_some_and(|t| t.elapsed() >= STATE_PERSIST_EVERY) {
            self.held_since = None;
            self.state.router.forget_state(self.id, self.link);
        }
    }

    async fn handle(&mut self, frame: DeviceFrame) {
        let router = &self.state.router;
        match frame {
            DeviceFrame::Hello { setup_lookup, .. } | DeviceFrame::Setup { setup_lookup } => {
                tracing::info!(setup = setup_lookup.is_some(), "setup mode announced");
                router.set_setup_lookup(self.id, self.link, setup_lookup);
            }
            // Sealed envelopes (ADR 0006) are checked by their outer device
            // signature and routed by their readable header; the cloud cannot
            // read the body. Plain signed results remain for refusals to
            // controllers that cannot decrypt (they carry no state).
            DeviceFrame::Result { envelope } if hearth_proto::e2e::is_sealed(&envelope) => {
                match hearth_proto::e2e::verify_sealed(&envelope, self.id, self.key) {
                    Ok(hearth_proto::e2e::SealedPayload { header: hearth_proto::e2e::SealedHeader { to: Some(to), .. }, .. }) => {
                        revoke_answered(self.state, self.id, &mut self.revokes, &to.controller, to.counter).await;
                        router.deliver_result(self.id, to.controller, to.counter, envelope)
                    }
                    Ok(_) => tracing::warn!("dropping a sealed result without an addressee"),
                    Err(e) => tracing::warn!(error = %e, "dropping a sealed result that does not verify"),
                }
            }
            DeviceFrame::Result { envelope } => match verify_result(&envelope, self.id, self.key) {
                Ok(p) => {
                    revoke_answered(self.state, self.id, &mut self.revokes, &p.controller, p.counter).await;
                    router.deliver_result(self.id, p.controller, p.counter, envelope)
                }
                // Controllers would refuse it too; forwarding it only wastes their time.
                Err(e) => tracing::warn!(error = %e, "dropping a result that does not verify"),
            },
            DeviceFrame::State { envelope } => {
                let ok = if hearth_proto::e2e::is_sealed(&envelope) {
                    hearth_proto::e2e::verify_sealed(&envelope, self.id, self.key).map(|_| ())
                } else {
                    verify_state(&envelope, self.id, self.key).map(|_| ())
                };
                match ok {
                    Ok(()) => {
                        router.deliver_state(self.id, self.link, envelope.clone());
                        // History for controllers that were offline (ADR 0006):
                        // sealed reports only, bounded by the store.
                        if hearth_proto::e2e::is_sealed(&envelope) {
                            if let Err(e) = self.state.store.append_event(self.id.clone(), envelope.clone(), unix_now()).await {
                                tracing::warn!(error = %e, "could not store an event");
                            }
                        }
                        self.pending_state = Some(envelope);
                        // The router holds this newer report until it is stored.
                        self.held_since = None;
                    }
                    Err(e) => tracing::warn!(error = %e, "dropping a state report that does not verify"),
                }
            }
            DeviceFrame::PairResult { req, outcome } => {
                if !router.complete_pairing(self.id, req, outcome, self.key.clone()) {
                    tracing::info!(req, "pairing answer nobody is waiting for");
                }
            }
            DeviceFrame::Pong { .. } => {}
            // ADR 0009: a device commanding another (a motion sensor's
            // rule). Routed only between devices of one owner account; the
            // target's access list decides, as for any command.
            DeviceFrame::Command { to, envelope } => {
                let peek = hearth_proto::message::peek_command(&envelope);
                let owners = (
                    Box::pin(self.state.store.device_owner(self.id.clone())).await,
                    Box::pin(self.state.store.device_owner(to.clone())).await,
                );
                match (peek, owners) {
                    (Ok(p), (Ok(Some(a)), Ok(Some(b)))) if a == b && p.device == to => {
                        if let Err(e) = self.state.route_send(&to, envelope).await {
                            tracing::info!(%to, error = %e, "device-to-device command not delivered");
                        }
                    }
                    _ => tracing::warn!(%to, "dropping a device-to-device command: not a signed command for a device of the same owner"),
                }
            }
        }
    }

    /// Writes the pending state report if the last write is long enough
    /// ago (or `force`), so a chatty device cannot keep the database busy.
    /// A report held back is written when its time comes even if the
    /// device sends nothing more (the link's timer).
    async fn flush_state(&mut self, force: bool) {
        let due = force || self.last_persist.is_none_or(|t| t.elapsed() >= STATE_PERSIST_EVERY);
        if !due {
            return;
        }
        let Some(envelope) = self.pending_state.take() else { return };
        self.last_persist = Some(Instant::now());
        match self.state.store.set_last_state(self.id.clone(), envelope).await {
            Ok(()) => self.held_since = Some(Instant::now()),
            // The router keeps its copy, so listings still show the report.
            Err(e) => tracing::warn!(error = %e, "could not store a state report"),
        }
    }
}

/// What woke a link's loop.
enum Event {
    /// A whole frame from the device.
    Frame(DeviceFrame),
    /// The router dropped the link's queue.
    QueueClosed,
    /// The timer: some deadline of the link passed.
    Timer,
}

/// Both directions of a link's TLS stream, driven by one poll: the frame
/// being read (a 4-byte header, then a body allocated once the header
/// arrived) and the frame being written (a queued frame or a ping).
/// Between frames it holds no buffer.
#[derive(Default)]
struct LinkIo {
    header: [u8; 4],
    header_got: usize,
    body: Vec<u8>,
    body_got: usize,
    /// When the header of the body being read arrived.
    body_since: Option<Instant>,
    /// A ping to write once the frame in flight is out.
    ping: Option<Vec<u8>>,
    out: Vec<u8>,
    out_sent: usize,
    /// When the frame being written was taken; `None` when all is flushed.
    write_since: Option<Instant>,
}

impl LinkIo {
    fn ping(&mut self, bytes: Vec<u8>) {
        // A ping still waiting behind a stuck write is enough.
        self.ping.get_or_insert(bytes);
    }

    /// Writes what it can, then reads until a whole frame is in. Never
    /// waits on one direction while the other could move.
    fn poll<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        tls: &mut S,
        rx: &mut QueueReceiver<Vec<u8>>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Event, LinkError>> {
        if let Poll::Ready(r) = self.poll_write(tls, rx, cx) {
            return Poll::Ready(r);
        }
        self.poll_read(tls, cx)
    }

    /// Pending while it waits for the device or for a queued frame.
    fn poll_write<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        tls: &mut S,
        rx: &mut QueueReceiver<Vec<u8>>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Event, LinkError>> {
        loop {
            if self.out_sent < self.out.len() {
                match Pin::new(&mut *tls).poll_write(cx, &self.out[self.out_sent..]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into())),
                    Poll::Ready(Ok(n)) => self.out_sent += n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                    Poll::Pending => return Poll::Pending,
                }
                continue;
            }
            if self.write_since.is_some() {
                match Pin::new(&mut *tls).poll_flush(cx) {
                    Poll::Ready(Ok(())) => {
                        self.out = Vec::new();
                        self.out_sent = 0;
                        self.write_since = None;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                    Poll::Pending => return Poll::Pending,
                }
            }
            let next = match self.ping.take() {
                Some(ping) => ping,
                None => match rx.poll_recv(cx) {
                    Poll::Ready(Some(bytes)) => bytes,
                    Poll::Ready(None) => return Poll::Ready(Ok(Event::QueueClosed)),
                    Poll::Pending => return Poll::Pending,
                },
            };
            self.out = next;
            self.out_sent = 0;
            self.write_since = Some(Instant::now());
        }
    }

    fn poll_read<S: AsyncRead + Unpin>(&mut self, tls: &mut S, cx: &mut Context<'_>) -> Poll<Result<Event, LinkError>> {
        loop {
            let reading_body = self.body_since.is_some();
            let dest = if reading_body { &mut self.body[self.body_got..] } else { &mut self.header[self.header_got..] };
            if !dest.is_empty() {
                let mut buf = ReadBuf::new(dest);
                match Pin::new(&mut *tls).poll_read(cx, &mut buf) {
                    Poll::Ready(Ok(())) => {}
                    // A TCP end without close_notify between frames is a hang-up too.
                    Poll::Ready(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof && !reading_body => {
                        return Poll::Ready(Err(LinkError::Closed))
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                    Poll::Pending => return Poll::Pending,
                }
                let n = buf.filled().len();
                if n == 0 {
                    // End of stream: between frames (or in a header) the
                    // device hung up; inside a body the frame is cut short.
                    return Poll::Ready(Err(if reading_body {
                        std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into()
                    } else {
                        LinkError::Closed
                    }));
                }
                if reading_body {
                    self.body_got += n;
                } else {
                    self.header_got += n;
                }
                continue;
            }
            if !reading_body {
                // The limit is enforced on the header, before the body is allocated.
                let len = frame_len(self.header)?;
                self.body = vec![0u8; len];
                self.body_got = 0;
                self.body_since = Some(Instant::now());
                continue;
            }
            let body = std::mem::take(&mut self.body);
            self.header_got = 0;
            self.body_got = 0;
            self.body_since = None;
            return Poll::Ready(Ok(Event::Frame(decode_body(&body)?)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// Regression (issue 8): a link's task is as large as its state machine
    /// for as long as the link lives. An inline database future made it
    /// 7 KiB, and a TLS stream held by value in each async layer another
    /// 1.2 KiB per layer; boxed, the whole task is under 2 KiB.
    #[test]
    fn an_idle_links_state_machine_stays_small() {
        fn size_of_run<F: std::future::Future>(_: fn(AppState, Box<DeviceTls>) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        let size = size_of_run(run);
        assert!(size <= 2048, "device_link::run's future is {size} bytes; box the large awaits");
    }

    /// The link's one loop reads frames that arrive in pieces and writes
    /// queued frames while a read is pending; the queue's end ends it.
    #[tokio::test]
    async fn one_poll_reads_and_writes_and_holds_no_buffer_between_frames() {
        let (mut device, mut cloud) = tokio::io::duplex(1024);
        let (tx, mut rx) = crate::router::queue::<Vec<u8>>(4);
        let mut io = LinkIo::default();
        async fn next(
            io: &mut LinkIo,
            cloud: &mut tokio::io::DuplexStream,
            rx: &mut QueueReceiver<Vec<u8>>,
        ) -> Result<Result<Event, LinkError>, tokio::time::error::Elapsed> {
            timeout(Duration::from_millis(200), std::future::poll_fn(|cx| io.poll(cloud, rx, cx))).await
        }

        // A queued frame goes out although no frame comes in.
        let ping = hearth_proto::link::encode_frame(&CloudFrame::Ping { n: 1 }).unwrap();
        tx.try_send(ping.clone()).unwrap();
        assert!(next(&mut io, &mut cloud, &mut rx).await.is_err(), "no frame from the device yet");
        let mut got = vec![0u8; ping.len()];
        device.read_exact(&mut got).await.unwrap();
        assert_eq!(got, ping);
        assert!(io.write_since.is_none() && io.out.capacity() == 0, "nothing kept once written");

        // A frame in two pieces is one frame.
        let pong = hearth_proto::link::encode_frame(&DeviceFrame::Pong { n: 1 }).unwrap();
        device.write_all(&pong[..3]).await.unwrap();
        assert!(next(&mut io, &mut cloud, &mut rx).await.is_err(), "half a header is no frame");
        device.write_all(&pong[3..]).await.unwrap();
        match next(&mut io, &mut cloud, &mut rx).await {
            Ok(Ok(Event::Frame(f))) => assert_eq!(f, DeviceFrame::Pong { n: 1 }),
            other => panic!("expected the pong, got {:?}", other.map(|r| r.map(|_| ()))),
        }
        assert!(io.body_since.is_none() && io.body.capacity() == 0, "nothing kept once read");

        // The router dropped the link.
        drop(tx);
        assert!(matches!(next(&mut io, &mut cloud, &mut rx).await, Ok(Ok(Event::QueueClosed))));
    }

    #[tokio::test]
    async fn a_device_turned_away_reads_when_to_redial_then_the_end_of_the_link() {
        let (mut device, mut cloud) = tokio::io::duplex(1024);
        turn_away(&mut cloud).await;
        // Everything up to the close: one busy frame and nothing else.
        let mut bytes = Vec::new();
        device.read_to_end(&mut bytes).await.unwrap();
        let (frame, used) = hearth_proto::link::decode_frame::<CloudFrame>(&bytes).unwrap().unwrap();
        assert_eq!(frame, CloudFrame::Busy { retry_after: 10 });
        assert_eq!(used, bytes.len());
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_times_out() {
        let (mut _device, mut cloud) = tokio::io::duplex(1024);
        let started = Instant::now();
        let err = read_frame(&mut cloud, HELLO_TIMEOUT, "a hello").await.unwrap_err();
        assert!(matches!(err, LinkError::Timeout("a hello")), "{err}");
        assert_eq!(started.elapsed(), HELLO_TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_header_without_its_body_times_out() {
        let (mut device, mut cloud) = tokio::io::duplex(1024);
        device.write_all(&[0, 0, 0, 100, b'{']).await.unwrap();
        let err = read_frame(&mut cloud, IDLE_LIMIT, "any frame").await.unwrap_err();
        assert!(matches!(err, LinkError::Timeout("a frame body")), "{err}");
    }

    #[tokio::test]
    async fn an_oversized_header_is_refused_before_reading_the_body() {
        let (mut device, mut cloud) = tokio::io::duplex(16);
        // Only the header fits the pipe; a reader that tried to read the
        // announced body would block forever instead of failing.
        device.write_all(&(hearth_proto::MAX_FRAME_LEN as u32 + 1).to_be_bytes()).await.unwrap();
        let err = read_frame(&mut cloud, IDLE_LIMIT, "any frame").await.unwrap_err();
        assert!(matches!(err, LinkError::Frame(hearth_proto::Error::TooLarge { .. })), "{err}");
    }

    #[tokio::test]
    async fn frames_decode_and_eof_is_a_clean_close() {
        let (mut device, mut cloud) = tokio::io::duplex(1024);
        let hello = DeviceFrame::Pong { n: 3 };
        device.write_all(&hearth_proto::link::encode_frame(&hello).unwrap()).await.unwrap();
        drop(device);
        assert_eq!(read_frame(&mut cloud, IDLE_LIMIT, "x").await.unwrap(), hello);
        assert!(matches!(read_frame(&mut cloud, IDLE_LIMIT, "x").await, Err(LinkError::Closed)));
    }
}
