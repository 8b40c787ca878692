//! The controller WebSocket link (`GET /api/v1/link`, ADR 0002).
//!
//! Down: [`ControllerPush`] JSON text — results, state reports and presence
//! of the account's devices. Up: [`ControllerFrame`] JSON text — commands
//! for those devices. A malformed message closes the socket with a reason;
//! a command that cannot be delivered is answered with `undeliverable`.

use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use hearth_proto::link::{ControllerFrame, ControllerPush};
use tokio::time::{timeout, Instant, MissedTickBehavior};
use tracing::Instrument;

use crate::api::{reachable_device, Session};
use crate::server::ConnGuard;
use crate::store::unix_now;
use crate::AppState;

/// How often the cloud pings a controller link.
pub const PING_EVERY: Duration = Duration::from_secs(20);
/// A link that sent nothing (not even a pong) for this long is closed.
pub const IDLE_LIMIT: Duration = Duration::from_secs(60);
/// Time allowed to hand one message to the socket.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);

// RFC 6455 §7.4.1 close codes.
const GOING_AWAY: u16 = 1001;
const UNSUPPORTED_DATA: u16 = 1003;
const INVALID_PAYLOAD: u16 = 1007;
const POLICY_VIOLATION: u16 = 1008;

async fn send(socket: &mut WebSocket, msg: Message) -> bool {
    matches!(timeout(SEND_TIMEOUT, socket.send(msg)).await, Ok(Ok(())))
}

async fn close(socket: &mut WebSocket, code: u16, reason: &str) {
    // A close reason must fit in a control frame (123 bytes of text).
    let mut reason = reason.to_owned();
    while reason.len() > 120 {
        reason.pop();
    }
    let _ = send(socket, Message::Close(Some(CloseFrame { code, reason: reason.into() }))).await;
}

async fn push_text(socket: &mut WebSocket, msg: &ControllerPush) -> bool {
    match serde_json::to_string(msg) {
        Ok(text) => send(socket, Message::Text(text.into())).await,
        Err(_) => false,
    }
}

/// Serves one controller link until it closes, the server shuts down, or
/// the router drops it for being too slow.
///
/// In cluster mode `account_sub` is the account's push subscription, taken
/// before the upgrade was answered (`Cluster::account_up`); it is held for
/// the link's life.
pub async fn run(
    state: AppState,
    socket: WebSocket,
    session: Session,
    guard: Option<ConnGuard>,
    account_sub: Option<crate::cluster::AccountGuard>,
) {
    let span = tracing::info_span!("controller_link", account = %session.account);
    serve(state, socket, session, (guard, account_sub)).instrument(span).await;
}

async fn serve(
    state: AppState,
    mut socket: WebSocket,
    session: Session,
    _held: (Option<ConnGuard>, Option<crate::cluster::AccountGuard>),
) {
    let account = session.account.clone();
    let mut handle = state.router.add_controller(&account);
    let mut stop = state.stop.clone();
    let mut ping = tokio::time::interval_at(Instant::now() + PING_EVERY, PING_EVERY);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    tracing::info!("controller link up");
    loop {
        if *stop.borrow() {
            close(&mut socket, GOING_AWAY, "the cloud is shutting down").await;
            break;
        }
        tokio::select! {
            _ = stop.changed() => {
                close(&mut socket, GOING_AWAY, "the cloud is shutting down").await;
                break;
            }
            () = handle.close.notified() => {
                close(&mut socket, POLICY_VIOLATION, "too slow: the push queue overflowed").await;
                break;
            }
            out = handle.rx.recv() => match out {
                Some(text) => {
                    if !send(&mut socket, Message::Text(text.as_ref().into())).await {
                        break;
                    }
                }
                None => break,
            },
            incoming = socket.recv() => {
                let msg = match incoming {
                    Some(Ok(msg)) => msg,
                    // Includes messages over the size limit: tungstenite refuses them.
                    Some(Err(e)) => {
                        tracing::info!(error = %e, "controller link read failed");
                        break;
                    }
                    None => break,
                };
                last_heard = Instant::now();
                match msg {
                    Message::Text(text) => match serde_json::from_str::<ControllerFrame>(text.as_str()) {
                        Ok(frame) => {
                            if !handle_frame(&state, &session, &mut socket, frame).await {
                                break;
                            }
                        }
                        Err(e) => {
                            tracing::info!(error = %e, "malformed controller frame");
                            close(&mut socket, INVALID_PAYLOAD, &format!("malformed frame: {e}")).await;
                            break;
                        }
                    },
                    Message::Binary(_) => {
                        close(&mut socket, UNSUPPORTED_DATA, "only JSON text messages are accepted").await;
                        break;
                    }
                    Message::Close(_) => break,
                    // tungstenite answers pings itself; both count as liveness.
                    Message::Ping(_) | Message::Pong(_) => {}
                }
            }
            _ = ping.tick() => {
                if last_heard.elapsed() > IDLE_LIMIT {
                    tracing::info!("controller link idle, closing");
                    break;
                }
                // Logging out (or expiry) ends live links too, not just new requests.
                match state.store.session_account(session.token_hash, unix_now()).await {
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        close(&mut socket, POLICY_VIOLATION, "the session ended; log in again").await;
                        break;
                    }
                    Err(e) => tracing::warn!(error = %e, "could not re-check a link's session"),
                }
                if !send(&mut socket, Message::Ping(Default::default())).await {
                    break;
                }
            }
        }
    }
    state.router.remove_controller(&account, handle.link);
    tracing::info!("controller link down");
}

/// Delivers one command; returns false if the socket failed.
async fn handle_frame(state: &AppState, session: &Session, socket: &mut WebSocket, frame: ControllerFrame) -> bool {
    let ControllerFrame::Command { device, envelope } = frame;
    let undeliverable = |message: String| ControllerPush::Undeliverable { device: device.clone(), message };
    let problem = match reachable_device(state, &session.account, device.as_str()).await {
        Err(e) => Some(e.message().to_owned()),
        Ok(_) => match hearth_proto::message::peek_command(&envelope) {
            Err(e) => Some(format!("envelope is not a signed command: {e}")),
            Ok(peek) if peek.device != device => {
                Some(format!("the command is for device {}, not {device}", peek.device))
            }
            Ok(_) => state.route_send(&device, envelope).await.err().map(|e| e.to_string()),
        },
    };
    match problem {
        Some(message) => push_text(socket, &undeliverable(message)).await,
        None => true,
    }
}
