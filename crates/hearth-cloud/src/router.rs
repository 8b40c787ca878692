//! In-process message routing: which device link and which controller links
//! are on this node, and who is waiting for which answer.
//!
//! Everything here is memory only and forgotten on restart; devices redial
//! and controllers reconnect. It knows nothing about HTTP or TLS: device
//! links take encoded frames, controller links take JSON text.
//!
//! In cluster mode (`cluster.rs`, ADR 0008) this table still holds only the
//! links of this node; a [`PushSink`] then carries every push a device
//! causes to NATS, and pushes arriving from NATS reach the local controller
//! links through [`Router::push_local`].
//!
//! Queues are bounded. A peer that does not keep up is disconnected rather
//! than buffered for, so one slow phone cannot grow the cloud's memory.
//!
//! Idle links are cheap (issue 8): a link's queue ([`queue`]) holds no
//! buffer while it is empty (tokio's `mpsc` reserved about 1.3 KiB per
//! channel up front), and the router keeps a device's state report only
//! until its link wrote it to the database ([`Router::forget_state`]);
//! readers fall back to the database, which then has the same report.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use hearth_proto::ids::{ControllerId, DeviceId};
use hearth_proto::keys::PublicKey;
use hearth_proto::link::{encode_frame, CloudFrame, ControllerPush, PairOutcome};
#[cfg(test)]
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{oneshot, Notify};

use crate::store::AccountId;

/// Frames queued per device link before it counts as stuck.
pub const DEVICE_QUEUE: usize = 64;
/// Messages queued per controller link before it counts as stuck.
pub const CONTROLLER_QUEUE: usize = 64;

/// Why a frame could not be handed to a device link.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// No link for this device on this node.
    #[error("device is offline")]
    Offline,
    /// The frame would exceed the link's frame limit.
    #[error("the message is too large for a device frame")]
    TooLarge,
    /// The device was not reading its queue; its link is being dropped.
    #[error("the device is not keeping up; its link was dropped")]
    Overflow,
    /// A command with this controller and counter is already waiting.
    #[error("a command with this counter is already waiting for an answer")]
    Conflict,
    /// The device did not answer in time.
    #[error("the device did not answer")]
    Timeout,
    /// The device's link ended before it answered.
    #[error("the device went offline before answering")]
    WentAway,
    /// Routing between cloud nodes failed (NATS unreachable or an answer
    /// that makes no sense); cluster mode only.
    #[error("routing between cloud nodes is unavailable")]
    Unavailable,
}

/// Where device-caused pushes go instead of this node's controller links
/// (cluster mode: to NATS, from where every node with a link of the
/// account delivers them, this one included). Must not block: it is
/// called with the routing table locked.
pub trait PushSink: Send + Sync {
    /// Hands a push for `account`'s controllers to the cluster.
    fn push(&self, account: &AccountId, text: Arc<str>);
}

/// What the router knows about an online device.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    /// Its owner, if paired.
    pub owner: Option<AccountId>,
    /// The setup lookup it announced, while in setup mode.
    pub setup_lookup: Option<String>,
    /// Other accounts the owner shared it with (routing only; the device
    /// decides what their controllers may do).
    pub members: Vec<AccountId>,
}

impl DeviceInfo {
    /// Every account whose controllers get this device's pushes.
    fn audience(&self) -> Vec<AccountId> {
        let mut out: Vec<AccountId> = self.owner.iter().cloned().collect();
        out.extend(self.members.iter().filter(|m| self.owner.as_ref() != Some(*m)).cloned());
        out
    }
}

struct DeviceEntry {
    link: u64,
    tx: QueueSender<Vec<u8>>,
    close: Arc<Notify>,
    info: DeviceInfo,
    /// The newest state report of this link while the database may not
    /// have it yet; `None` once the link wrote it ([`Router::forget_state`]).
    last_state: Option<Vec<u8>>,
}

struct ControllerEntry {
    tx: QueueSender<Arc<str>>,
    close: Arc<Notify>,
}

type CommandKey = (DeviceId, ControllerId, u64);

#[derive(Default)]
struct Inner {
    devices: HashMap<DeviceId, DeviceEntry>,
    setup_index: HashMap<String, DeviceId>,
    controllers: HashMap<AccountId, HashMap<u64, ControllerEntry>>,
    commands: HashMap<CommandKey, oneshot::Sender<Vec<u8>>>,
    pairings: HashMap<u64, (DeviceId, oneshot::Sender<(PairOutcome, PublicKey)>)>,
}

/// The routing table of this node.
#[derive(Default)]
pub struct Router {
    inner: Mutex<Inner>,
    next_id: AtomicU64,
    sink: std::sync::OnceLock<Arc<dyn PushSink>>,
}

/// A link's end of the router: its queue and its "you are replaced or too
/// slow, hang up" signal.
#[derive(Debug)]
pub struct LinkHandle<T> {
    /// Identifies this link among links for the same device or account.
    pub link: u64,
    /// Outbound messages.
    pub rx: QueueReceiver<T>,
    /// Notified when the link must close.
    pub close: Arc<Notify>,
}

/// A pending answer; the registration is withdrawn when this is dropped,
/// whether the answer came, the wait timed out or the caller went away.
pub struct Waiter<T> {
    router: Arc<Router>,
    key: WaitKey,
    rx: oneshot::Receiver<T>,
}

enum WaitKey {
    Command(CommandKey),
    Pairing(u64),
}

impl<T> Waiter<T> {
    /// Waits for the answer; `None` if the device went away first.
    pub async fn recv(&mut self) -> Option<T> {
        (&mut self.rx).await.ok()
    }
}

impl<T> Drop for Waiter<T> {
    fn drop(&mut self) {
        let mut inner = self.router.lock();
        match &self.key {
            WaitKey::Command(k) => {
                inner.commands.remove(k);
            }
            WaitKey::Pairing(req) => {
                inner.pairings.remove(req);
            }
        }
    }
}

impl Router {
    /// An empty routing table.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// An empty routing table whose device-caused pushes go to `sink`.
    pub fn with_sink(sink: Arc<dyn PushSink>) -> Arc<Self> {
        let r = Self::default();
        // A fresh OnceLock is empty, so this set cannot fail.
        let _ = r.sink.set(sink);
        Arc::new(r)
    }

    /// Pushes a device event to an account's controllers: through the sink
    /// in cluster mode, else straight to this node's links.
    fn push_event(&self, inner: &mut Inner, account: &AccountId, msg: &ControllerPush) {
        match self.sink.get() {
            Some(sink) => {
                if let Some(text) = encode_push(msg) {
                    sink.push(account, text);
                }
            }
            None => push_locked(inner, account, msg),
        }
    }

    /// Delivers an already encoded push to this node's links of `account`
    /// (cluster mode: a push that came from NATS).
    pub fn push_local(&self, account: &AccountId, text: Arc<str>) {
        push_text_locked(&mut self.lock(), account, text);
    }

    /// Drops a device's link because the device has a newer link on another
    /// node (cluster mode). Like a replacement on this node, it announces
    /// nothing: the newer link already said the device is online.
    pub fn supersede(&self, id: &DeviceId, link: u64) -> bool {
        let mut inner = self.lock();
        if inner.devices.get(id).map(|d| d.link) != Some(link) {
            return false;
        }
        let Some(entry) = inner.devices.remove(id) else { return false };
        entry.close.notify_one();
        if let Some(lookup) = &entry.info.setup_lookup {
            inner.setup_index.remove(lookup);
        }
        inner.commands.retain(|(device, _, _), _| device != id);
        inner.pairings.retain(|_, (device, _)| device != id);
        true
    }

    /// The current link number of a device on this node.
    pub fn device_link(&self, id: &DeviceId) -> Option<u64> {
        self.lock().devices.get(id).map(|d| d.link)
    }

    /// Replaces what the router knows about a device's accounts, after
    /// another node recorded a pairing or a share in the shared database
    /// (cluster mode). A new owner is told the device is online.
    pub fn refresh_accounts(&self, id: &DeviceId, owner: Option<AccountId>, members: Vec<AccountId>) {
        let mut inner = self.lock();
        let Some(entry) = inner.devices.get_mut(id) else { return };
        let new_owner = owner.is_some() && entry.info.owner != owner;
        entry.info.owner = owner.clone();
        entry.info.members = members;
        if let (true, Some(owner)) = (new_owner, owner) {
            self.push_event(&mut inner, &owner, &ControllerPush::Presence { device: id.clone(), online: true });
        }
    }

    /// How many device and controller links this node holds (for `/metrics`).
    pub fn link_counts(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.devices.len(), inner.controllers.values().map(HashMap::len).sum())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every update below leaves the maps consistent before it can
        // panic, so a poisoned lock still guards usable data.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fresh_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    // ---- devices ----

    /// Registers a device link, replacing (and closing) any earlier link of
    /// the same device, and tells the owner's controllers it is online.
    pub fn add_device(&self, id: &DeviceId, info: DeviceInfo) -> LinkHandle<Vec<u8>> {
        let (tx, rx) = queue(DEVICE_QUEUE);
        let close = Arc::new(Notify::new());
        let link = self.fresh_id();
        let audience = info.audience();
        let mut inner = self.lock();
        if let Some(old) = inner.devices.remove(id) {
            // notify_one stores a permit, so the old link sees it even if it
            // is not waiting right now.
            old.close.notify_one();
            if let Some(lookup) = old.info.setup_lookup {
                inner.setup_index.remove(&lookup);
            }
        }
        if let Some(lookup) = &info.setup_lookup {
            inner.setup_index.insert(lookup.clone(), id.clone());
        }
        inner.devices.insert(id.clone(), DeviceEntry { link, tx, close: close.clone(), info, last_state: None });
        for account in audience {
            self.push_event(&mut inner, &account, &ControllerPush::Presence { device: id.clone(), online: true });
        }
        LinkHandle { link, rx, close }
    }

    /// Removes a device link if it is still the current one; pending
    /// answers from it are abandoned and its owner is told it is offline.
    /// Returns whether it was the current link.
    pub fn remove_device(&self, id: &DeviceId, link: u64) -> bool {
        let mut inner = self.lock();
        if inner.devices.get(id).map(|d| d.link) != Some(link) {
            return false;
        }
        let Some(entry) = inner.devices.remove(id) else { return false };
        if let Some(lookup) = &entry.info.setup_lookup {
            inner.setup_index.remove(lookup);
        }
        // Dropping the senders wakes the waiters with "device went away".
        inner.commands.retain(|(device, _, _), _| device != id);
        inner.pairings.retain(|_, (device, _)| device != id);
        for account in entry.info.audience() {
            self.push_event(&mut inner, &account, &ControllerPush::Presence { device: id.clone(), online: false });
        }
        true
    }

    /// Whether a device has a link on this node.
    pub fn is_online(&self, id: &DeviceId) -> bool {
        self.lock().devices.contains_key(id)
    }

    /// The latest state report received on the device's current link, if
    /// the database may not have it yet. `None` means the database's
    /// `last_state` is the newest: every reader falls back to it.
    pub fn last_state(&self, id: &DeviceId) -> Option<Vec<u8>> {
        self.lock().devices.get(id).and_then(|d| d.last_state.clone())
    }

    /// Drops the router's copy of the device's state report once link
    /// `link` has written it to the database (and held it a little longer,
    /// so that a listing which read the database just before that write
    /// still finds it here). Idle devices then cost the router no copy of
    /// their report (issue 8).
    pub fn forget_state(&self, id: &DeviceId, link: u64) {
        if let Some(entry) = self.lock().devices.get_mut(id).filter(|d| d.link == link) {
            entry.last_state = None;
        }
    }

    /// Records a setup-mode change announced by the device.
    pub fn set_setup_lookup(&self, id: &DeviceId, link: u64, lookup: Option<String>) {
        let mut inner = self.lock();
        let Some(entry) = inner.devices.get_mut(id).filter(|d| d.link == link) else { return };
        let old = std::mem::replace(&mut entry.info.setup_lookup, lookup.clone());
        if let Some(old) = old {
            if inner.setup_index.get(&old) == Some(id) {
                inner.setup_index.remove(&old);
            }
        }
        if let Some(new) = lookup {
            inner.setup_index.insert(new, id.clone());
        }
    }

    /// The online device in setup mode that announced this lookup value.
    pub fn find_setup(&self, lookup: &str) -> Option<DeviceId> {
        self.lock().setup_index.get(lookup).cloned()
    }

    /// Records a device's new owner after pairing; whom the previous owner
    /// shared it with no longer gets its pushes.
    pub fn set_owner(&self, id: &DeviceId, owner: AccountId) {
        let mut inner = self.lock();
        if let Some(entry) = inner.devices.get_mut(id) {
            entry.info.owner = Some(owner.clone());
            entry.info.members.clear();
            self.push_event(&mut inner, &owner, &ControllerPush::Presence { device: id.clone(), online: true });
        }
    }

    /// Replaces the member accounts of an online device (after a share or a
    /// revoke was recorded in the store).
    pub fn set_members(&self, id: &DeviceId, members: Vec<AccountId>) {
        if let Some(entry) = self.lock().devices.get_mut(id) {
            entry.info.members = members;
        }
    }

    /// Queues a frame for a device. A full queue means the device stopped
    /// reading: its link is closed instead of buffering more.
    pub fn send_to_device(&self, id: &DeviceId, frame: &CloudFrame) -> Result<(), RouteError> {
        let bytes = encode_frame(frame).map_err(|_| RouteError::TooLarge)?;
        let inner = self.lock();
        let entry = inner.devices.get(id).ok_or(RouteError::Offline)?;
        match entry.tx.try_send(bytes) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => {
                entry.close.notify_one();
                Err(RouteError::Overflow)
            }
            Err(TrySendError::Closed(_)) => Err(RouteError::Offline),
        }
    }

    /// Waits for the result of command (`controller`, `counter`) from
    /// `device`; `None` if such a wait is already registered.
    pub fn expect_result(
        self: &Arc<Self>,
        device: &DeviceId,
        controller: ControllerId,
        counter: u64,
    ) -> Option<Waiter<Vec<u8>>> {
        let key = (device.clone(), controller, counter);
        let (tx, rx) = oneshot::channel();
        let mut inner = self.lock();
        if inner.commands.contains_key(&key) {
            return None;
        }
        inner.commands.insert(key.clone(), tx);
        Some(Waiter { router: self.clone(), key: WaitKey::Command(key), rx })
    }

    /// Starts a pairing exchange with `device`: returns the request number
    /// to put in the frame and the waiter for the answer.
    pub fn expect_pairing(self: &Arc<Self>, device: &DeviceId) -> (u64, Waiter<(PairOutcome, PublicKey)>) {
        let req = self.fresh_id();
        let (tx, rx) = oneshot::channel();
        self.lock().pairings.insert(req, (device.clone(), tx));
        (req, Waiter { router: self.clone(), key: WaitKey::Pairing(req), rx })
    }

    /// Hands a pairing answer to its waiter, together with the certified key
    /// of the link it came on. Answers from another device are ignored.
    pub fn complete_pairing(&self, device: &DeviceId, req: u64, outcome: PairOutcome, key: PublicKey) -> bool {
        let mut inner = self.lock();
        match inner.pairings.get(&req) {
            Some((want, _)) if want == device => {}
            _ => return false,
        }
        match inner.pairings.remove(&req) {
            Some((_, tx)) => tx.send((outcome, key)).is_ok(),
            None => false,
        }
    }

    /// Routes a command result: to the request waiting for it (matched on
    /// the verified controller and counter), and to every controller link
    /// of the owner and the members.
    pub fn deliver_result(&self, device: &DeviceId, controller: ControllerId, counter: u64, envelope: Vec<u8>) {
        let mut inner = self.lock();
        if let Some(tx) = inner.commands.remove(&(device.clone(), controller, counter)) {
            // The waiter may have just timed out; then nobody needs it.
            let _ = tx.send(envelope.clone());
        }
        let audience = inner.devices.get(device).map(|d| d.info.audience()).unwrap_or_default();
        for account in audience {
            self.push_event(&mut inner, &account, &ControllerPush::Result { device: device.clone(), envelope: envelope.clone() });
        }
    }

    /// Keeps a device's state report until its link has stored it
    /// ([`Router::forget_state`]) and pushes it to the links of the owner
    /// and the members.
    pub fn deliver_state(&self, device: &DeviceId, link: u64, envelope: Vec<u8>) {
        let mut inner = self.lock();
        let Some(entry) = inner.devices.get_mut(device).filter(|d| d.link == link) else { return };
        entry.last_state = Some(envelope.clone());
        for account in entry.info.audience() {
            self.push_event(&mut inner, &account, &ControllerPush::State { device: device.clone(), envelope: envelope.clone() });
        }
    }

    // ---- controllers ----

    /// Registers a controller link of an account.
    pub fn add_controller(&self, account: &AccountId) -> LinkHandle<Arc<str>> {
        let (tx, rx) = queue(CONTROLLER_QUEUE);
        let close = Arc::new(Notify::new());
        let link = self.fresh_id();
        self.lock()
            .controllers
            .entry(account.clone())
            .or_default()
            .insert(link, ControllerEntry { tx, close: close.clone() });
        LinkHandle { link, rx, close }
    }

    /// Removes a controller link.
    pub fn remove_controller(&self, account: &AccountId, link: u64) {
        let mut inner = self.lock();
        if let Some(links) = inner.controllers.get_mut(account) {
            links.remove(&link);
            if links.is_empty() {
                inner.controllers.remove(account);
            }
        }
    }

    /// Pushes a message to every controller link of an account.
    #[cfg(test)]
    pub fn push(&self, account: &AccountId, msg: &ControllerPush) {
        push_locked(&mut self.lock(), account, msg);
    }

    /// How many controller links an account has on this node.
    #[cfg(test)]
    pub fn controller_links(&self, account: &AccountId) -> usize {
        self.lock().controllers.get(account).map_or(0, HashMap::len)
    }
}

/// A bounded single-consumer queue for one link's outbound messages.
///
/// Unlike tokio's `mpsc` channel, which allocates a block of 32 slots and a
/// cache-padded channel state (about 1.3 KiB) when created, this holds one
/// small shared allocation and a buffer only while messages wait; the
/// buffer is freed when the link drained it (issue 8: 18,000 idle links
/// per node). Senders never wait: a full queue is refused
/// ([`TrySendError::Full`]) and the router closes that link.
pub fn queue<T>(capacity: usize) -> (QueueSender<T>, QueueReceiver<T>) {
    let shared = Arc::new(QueueShared {
        capacity,
        state: Mutex::new(QueueState { items: VecDeque::new(), waker: None, senders: 1, receiver: true }),
    });
    (QueueSender { shared: shared.clone() }, QueueReceiver { shared })
}

struct QueueShared<T> {
    capacity: usize,
    state: Mutex<QueueState<T>>,
}

struct QueueState<T> {
    items: VecDeque<T>,
    /// The receiver waiting for an item.
    waker: Option<Waker>,
    senders: usize,
    receiver: bool,
}

impl<T> QueueShared<T> {
    fn lock(&self) -> MutexGuard<'_, QueueState<T>> {
        // Every update leaves the state consistent before it can panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The router's end of a link's queue.
pub struct QueueSender<T> {
    shared: Arc<QueueShared<T>>,
}

impl<T> QueueSender<T> {
    /// Queues `item`, or gives it back if the queue is full or its link
    /// has gone.
    pub fn try_send(&self, item: T) -> Result<(), TrySendError<T>> {
        let mut st = self.shared.lock();
        if !st.receiver {
            return Err(TrySendError::Closed(item));
        }
        if st.items.len() >= self.shared.capacity {
            return Err(TrySendError::Full(item));
        }
        st.items.push_back(item);
        let waker = st.waker.take();
        drop(st);
        if let Some(w) = waker {
            w.wake();
        }
        Ok(())
    }
}

impl<T> Clone for QueueSender<T> {
    fn clone(&self) -> Self {
        self.shared.lock().senders += 1;
        Self { shared: self.shared.clone() }
    }
}

impl<T> Drop for QueueSender<T> {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.senders -= 1;
        let waker = if st.senders == 0 { st.waker.take() } else { None };
        drop(st);
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// A link's end of its queue.
pub struct QueueReceiver<T> {
    shared: Arc<QueueShared<T>>,
}

impl<T> std::fmt::Debug for QueueReceiver<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueReceiver").field("len", &self.shared.lock().items.len()).finish()
    }
}

impl<T> QueueReceiver<T> {
    /// The next item; `None` once the queue is empty and the router
    /// dropped its end (the link was removed or replaced).
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut st = self.shared.lock();
        if let Some(item) = st.items.pop_front() {
            if st.items.is_empty() {
                // Give the buffer back: an idle link keeps none.
                st.items = VecDeque::new();
            }
            return Poll::Ready(Some(item));
        }
        if st.senders == 0 {
            return Poll::Ready(None);
        }
        if !st.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            st.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// Waits for the next item (cancel-safe: an item is taken only when
    /// returned); `None` once the router dropped its end.
    pub async fn recv(&mut self) -> Option<T> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// The next item if one is waiting.
    #[cfg(test)]
    pub fn try_recv(&mut self) -> Result<T, TryRecvError> {
        let mut st = self.shared.lock();
        match st.items.pop_front() {
            Some(item) => {
                if st.items.is_empty() {
                    st.items = VecDeque::new();
                }
                Ok(item)
            }
            None if st.senders == 0 => Err(TryRecvError::Disconnected),
            None => Err(TryRecvError::Empty),
        }
    }
}

impl<T> Drop for QueueReceiver<T> {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.receiver = false;
        // Queued items go with the link.
        st.items = VecDeque::new();
    }
}

fn encode_push(msg: &ControllerPush) -> Option<Arc<str>> {
    match serde_json::to_string(msg) {
        Ok(t) => Some(t.into()),
        Err(e) => {
            // Our own enum of strings and byte arrays always serialises.
            tracing::error!(error = %e, "could not encode a controller push");
            None
        }
    }
}

fn push_locked(inner: &mut Inner, account: &AccountId, msg: &ControllerPush) {
    if !inner.controllers.contains_key(account) {
        return;
    }
    if let Some(text) = encode_push(msg) {
        push_text_locked(inner, account, text);
    }
}

fn push_text_locked(inner: &mut Inner, account: &AccountId, text: Arc<str>) {
    let Some(links) = inner.controllers.get_mut(account) else { return };
    links.retain(|_, link| match link.tx.try_send(text.clone()) {
        Ok(()) => true,
        Err(TrySendError::Full(_)) => {
            tracing::info!("closing a controller link whose push queue is full");
            link.close.notify_one();
            false
        }
        Err(TrySendError::Closed(_)) => false,
    });
    if links.is_empty() {
        inner.controllers.remove(account);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(owner: Option<AccountId>, lookup: Option<&str>) -> DeviceInfo {
        DeviceInfo { owner, setup_lookup: lookup.map(str::to_owned), members: Vec::new() }
    }

    fn account() -> AccountId {
        AccountId::for_tests()
    }

    #[tokio::test]
    async fn a_second_link_replaces_the_first() {
        let r = Router::new();
        let id = DeviceId::random();
        let first = r.add_device(&id, info(None, Some("aa")));
        let second = r.add_device(&id, info(None, Some("bb")));
        // The first link is told to close, and its removal does not unplug the second.
        tokio::time::timeout(std::time::Duration::from_secs(1), first.close.notified()).await.unwrap();
        assert!(!r.remove_device(&id, first.link));
        assert!(r.is_online(&id));
        assert_eq!(r.find_setup("aa"), None);
        assert_eq!(r.find_setup("bb"), Some(id.clone()));
        assert!(r.remove_device(&id, second.link));
        assert!(!r.is_online(&id));
        assert_eq!(r.find_setup("bb"), None);
    }

    #[tokio::test]
    async fn a_full_device_queue_closes_the_link() {
        let r = Router::new();
        let id = DeviceId::random();
        let h = r.add_device(&id, info(None, None));
        for n in 0..DEVICE_QUEUE as u64 {
            r.send_to_device(&id, &CloudFrame::Ping { n }).unwrap();
        }
        assert_eq!(r.send_to_device(&id, &CloudFrame::Ping { n: 99 }), Err(RouteError::Overflow));
        tokio::time::timeout(std::time::Duration::from_secs(1), h.close.notified()).await.unwrap();
        assert_eq!(r.send_to_device(&DeviceId::random(), &CloudFrame::Ping { n: 0 }), Err(RouteError::Offline));
    }

    /// Regression (issue 8): tokio's `mpsc` reserved about 1.3 KiB per
    /// link up front; an idle link's queue holds no buffer.
    #[tokio::test]
    async fn a_link_queue_holds_no_buffer_while_empty_and_ends_with_the_router_side() {
        let (tx, mut rx) = queue::<Vec<u8>>(2);
        assert_eq!(rx.shared.lock().items.capacity(), 0);
        tx.try_send(vec![1]).unwrap();
        let tx2 = tx.clone();
        tx2.try_send(vec![2]).unwrap();
        assert!(matches!(tx.try_send(vec![3]), Err(TrySendError::Full(v)) if v == vec![3]));
        assert_eq!(rx.recv().await, Some(vec![1]));
        assert_eq!(rx.try_recv(), Ok(vec![2]));
        assert_eq!(rx.shared.lock().items.capacity(), 0, "a drained queue gives its buffer back");
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
        // A waiting receiver is woken by an item, then by the last sender's drop.
        let waiting = tokio::spawn(async move {
            let first = rx.recv().await;
            let end = rx.recv().await;
            (first, end)
        });
        tokio::task::yield_now().await;
        tx.try_send(vec![4]).unwrap();
        drop(tx);
        tokio::task::yield_now().await;
        drop(tx2);
        assert_eq!(waiting.await.unwrap(), (Some(vec![4]), None));
        // Sending to a link that is gone says so.
        let (tx, rx) = queue::<Vec<u8>>(2);
        drop(rx);
        assert!(matches!(tx.try_send(vec![5]), Err(TrySendError::Closed(_))));
    }

    #[tokio::test]
    async fn the_router_keeps_a_state_report_until_its_link_stored_it() {
        let r = Router::new();
        let id = DeviceId::random();
        let old = r.add_device(&id, info(None, None));
        r.deliver_state(&id, old.link, vec![1]);
        assert_eq!(r.last_state(&id), Some(vec![1]));
        let new = r.add_device(&id, info(None, None));
        assert_eq!(r.last_state(&id), None, "a new link starts without the old link's copy");
        r.deliver_state(&id, new.link, vec![2]);
        r.forget_state(&id, old.link);
        assert_eq!(r.last_state(&id), Some(vec![2]), "only the link that stored it drops the copy");
        r.forget_state(&id, new.link);
        assert_eq!(r.last_state(&id), None, "readers now take the database's copy");
        assert!(r.is_online(&id));
    }

    #[tokio::test]
    async fn a_slow_controller_is_dropped_not_buffered() {
        let r = Router::new();
        let a = account();
        let h = r.add_controller(&a);
        let msg = ControllerPush::Presence { device: DeviceId::random(), online: true };
        for _ in 0..=CONTROLLER_QUEUE {
            r.push(&a, &msg);
        }
        assert_eq!(r.controller_links(&a), 0);
        tokio::time::timeout(std::time::Duration::from_secs(1), h.close.notified()).await.unwrap();
    }

    #[tokio::test]
    async fn results_reach_the_waiter_and_the_owners_links() {
        let r = Router::new();
        let a = account();
        let id = DeviceId::random();
        let ctl = ControllerId::from_bytes([7; 16]);
        let mut link = r.add_controller(&a);
        let _dev = r.add_device(&id, info(Some(a.clone()), None));
        assert!(link.rx.recv().await.unwrap().contains("presence"));
        let mut w = r.expect_result(&id, ctl.clone(), 5).unwrap();
        assert!(r.expect_result(&id, ctl.clone(), 5).is_none(), "one waiter per command");
        r.deliver_result(&id, ctl.clone(), 4, vec![4]);
        r.deliver_result(&id, ctl.clone(), 5, vec![5]);
        assert_eq!(w.recv().await, Some(vec![5]));
        assert!(link.rx.recv().await.unwrap().contains("result"));
        drop(w);
        assert!(r.expect_result(&id, ctl, 5).is_some(), "a dropped waiter is withdrawn");
    }

    #[tokio::test]
    async fn pairing_answers_only_count_from_the_asked_device() {
        let r = Router::new();
        let id = DeviceId::random();
        let other = DeviceId::random();
        let (req, mut w) = r.expect_pairing(&id);
        let key = PublicKey::from(&hearth_proto::keys::generate());
        let outcome = PairOutcome::Err(hearth_proto::pairing::PairError::Full);
        assert!(!r.complete_pairing(&other, req, outcome.clone(), key.clone()));
        assert!(r.complete_pairing(&id, req, outcome.clone(), key.clone()));
        assert_eq!(w.recv().await, Some((outcome, key)));
    }

    #[tokio::test]
    async fn waiters_learn_when_the_device_goes_away() {
        let r = Router::new();
        let id = DeviceId::random();
        let h = r.add_device(&id, info(None, None));
        let mut w = r.expect_result(&id, ControllerId::from_bytes([1; 16]), 1).unwrap();
        assert!(r.remove_device(&id, h.link));
        assert_eq!(w.recv().await, None);
    }

    #[tokio::test]
    async fn members_get_pushes_until_removed_or_the_device_is_repaired() {
        let r = Router::new();
        let (owner, member, stranger) = (account(), account(), account());
        let id = DeviceId::random();
        let h = r.add_device(&id, DeviceInfo { owner: Some(owner.clone()), setup_lookup: None, members: vec![member.clone()] });
        let mut m = r.add_controller(&member);
        let mut s = r.add_controller(&stranger);
        r.deliver_state(&id, h.link, vec![1]);
        assert!(m.rx.recv().await.unwrap().contains("state"));
        r.deliver_result(&id, ControllerId::from_bytes([1; 16]), 1, vec![2]);
        assert!(m.rx.recv().await.unwrap().contains("result"));
        r.set_members(&id, Vec::new());
        r.deliver_state(&id, h.link, vec![3]);
        assert!(m.rx.try_recv().is_err(), "a removed member gets nothing");
        r.set_members(&id, vec![member.clone()]);
        r.set_owner(&id, stranger.clone());
        assert!(s.rx.recv().await.unwrap().contains("presence"));
        r.deliver_state(&id, h.link, vec![4]);
        assert!(s.rx.recv().await.unwrap().contains("state"));
        assert!(m.rx.try_recv().is_err(), "a new owner starts with no members");
    }

    #[tokio::test]
    async fn a_superseded_link_closes_without_announcing_offline() {
        let r = Router::new();
        let owner = account();
        let id = DeviceId::random();
        let mut ctl = r.add_controller(&owner);
        let h = r.add_device(&id, info(Some(owner.clone()), Some("cc")));
        assert!(ctl.rx.recv().await.unwrap().contains("\"online\":true"));
        let mut w = r.expect_result(&id, ControllerId::from_bytes([2; 16]), 1).unwrap();
        assert!(!r.supersede(&id, h.link + 1), "only the current link can be superseded");
        assert!(r.supersede(&id, h.link));
        tokio::time::timeout(std::time::Duration::from_secs(1), h.close.notified()).await.unwrap();
        assert_eq!(w.recv().await, None, "waiters learn the link is gone");
        assert!(!r.is_online(&id));
        assert_eq!(r.find_setup("cc"), None);
        // The link's own cleanup afterwards changes nothing and says nothing:
        // the device is online elsewhere.
        assert!(!r.remove_device(&id, h.link));
        assert!(ctl.rx.try_recv().is_err(), "no offline presence for a device that moved");
    }

    #[derive(Default)]
    struct Collect(Mutex<Vec<(AccountId, String)>>);

    impl PushSink for Collect {
        fn push(&self, account: &AccountId, text: Arc<str>) {
            self.0.lock().unwrap().push((account.clone(), text.to_string()));
        }
    }

    #[tokio::test]
    async fn with_a_sink_device_pushes_leave_through_it_and_come_back_through_push_local() {
        let sink = Arc::new(Collect::default());
        let r = Router::with_sink(sink.clone());
        let (owner, member, buyer) = (account(), account(), account());
        let id = DeviceId::random();
        let mut ctl = r.add_controller(&owner);
        let h = r.add_device(&id, info(Some(owner.clone()), None));
        r.deliver_state(&id, h.link, vec![9]);
        assert!(ctl.rx.try_recv().is_err(), "cluster mode: nothing goes straight to local links");
        {
            let sent = sink.0.lock().unwrap();
            assert_eq!(sent.len(), 2);
            assert!(sent.iter().all(|(a, _)| a == &owner));
            assert!(sent[0].1.contains("presence") && sent[1].1.contains("state"));
        }
        r.push_local(&owner, "{\"from\":\"nats\"}".into());
        assert_eq!(ctl.rx.recv().await.unwrap().as_ref(), "{\"from\":\"nats\"}");
        // Another node recorded a sale and a share: the new owner is told.
        sink.0.lock().unwrap().clear();
        r.refresh_accounts(&id, Some(buyer.clone()), vec![member.clone()]);
        r.deliver_state(&id, h.link, vec![10]);
        let sent = sink.0.lock().unwrap();
        let to: Vec<&AccountId> = sent.iter().map(|(a, _)| a).collect();
        assert_eq!(to, vec![&buyer, &buyer, &member], "{sent:?}");
    }

}
