//! Cluster mode: routing between cloud nodes over NATS (ADR 0008).
//!
//! Every node keeps only its own links in its [`Router`]; accounts,
//! sessions, pairings, members and event history are in the shared
//! PostgreSQL database, so any node can serve any request and a killed node
//! loses nothing but its open links (the devices redial another node).
//!
//! Subjects (under a configurable prefix, `hearth` by default):
//!
//! | subject | subscribed by | carries |
//! |---|---|---|
//! | `P.dev.<device>` | the node holding the device's link | [`DeviceMsg`]: commands and pairing requests (request/reply), info, refresh, link claims |
//! | `P.acct.<account>.push` | every node with a controller link of the account | a [`ControllerPush`](hearth_proto::link::ControllerPush) as JSON text |
//! | `P.setup.<lookup>` | every node (one wildcard subscription) | "which device announced this setup code?"; only the holder answers |
//!
//! Delivery is at most once: NATS core does not store or redeliver. A
//! command whose answer is lost is reported as a timeout; the controller
//! may send it again, and the device's replay counter (DESIGN.md §3)
//! refuses a copy it already executed, so no state change happens twice.
//!
//! Every message is bounded ([`MAX_MESSAGE`]) and every request has a
//! deadline. When NATS is unreachable, commands for devices on other nodes
//! fail with 503 while links on this node keep working; `async-nats`
//! reconnects by itself and restores the subscriptions.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::client::RequestErrorKind;
use futures_util::StreamExt;
use hearth_proto::b64;
use hearth_proto::ids::{ControllerId, DeviceId};
use hearth_proto::keys::PublicKey;
use hearth_proto::link::{CloudFrame, PairOutcome};
use hearth_proto::pairing::PairRequest;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::api::{COMMAND_TIMEOUT, PAIR_TIMEOUT};
use crate::metrics::{ErrorKind, Metrics, Route};
use crate::router::{PushSink, RouteError, Router};
use crate::store::{AccountId, Store};
use crate::Shared;

/// Largest message a node sends or accepts on NATS: a device frame's worth
/// of envelope plus the message's own small fields. Larger ones are dropped
/// unread.
pub const MAX_MESSAGE: usize = hearth_proto::MAX_FRAME_LEN + 1024;
/// How much longer than the device's own deadline a requesting node waits
/// for the holding node's answer, so the holder's "timeout" arrives first.
pub const REMOTE_MARGIN: Duration = Duration::from_secs(1);
/// Time allowed for a quick question to another node (presence, a
/// controller-link command being queued).
pub const QUICK_TIMEOUT: Duration = Duration::from_secs(2);
/// Time allowed for another node to say it holds a device in setup mode
/// with a given code. Every node listens and only the holder answers, so
/// "nobody has it" costs this long (typed setup codes only; QR pairing
/// names the device).
pub const SETUP_LOOKUP_TIMEOUT: Duration = Duration::from_secs(1);
/// Time allowed to connect to NATS at startup.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Pushes waiting to be published; beyond this they are dropped (and
/// counted) rather than buffered.
pub const PUSH_QUEUE: usize = 4096;
/// Presence questions in flight at once for one device listing.
const PRESENCE_PARALLEL: usize = 32;

/// A node's name in the cluster: 1-64 characters of `[A-Za-z0-9_-]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeId(String);

/// A subject prefix: dot-separated tokens of `[A-Za-z0-9_-]`, at most 64
/// characters, so several clusters (or tests) can share one NATS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectPrefix(String);

/// A [`NodeId`] or [`SubjectPrefix`] that is not valid.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NameError(String);

fn is_token(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl FromStr for NodeId {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if is_token(s) {
            Ok(Self(s.to_owned()))
        } else {
            Err(NameError(format!("invalid node id {s:?}: use 1-64 characters of A-Z a-z 0-9 - _")))
        }
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for SubjectPrefix {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() <= 64 && s.split('.').all(is_token) {
            Ok(Self(s.to_owned()))
        } else {
            Err(NameError(format!("invalid subject prefix {s:?}: dot-separated tokens of A-Z a-z 0-9 - _")))
        }
    }
}

impl Default for SubjectPrefix {
    fn default() -> Self {
        Self("hearth".into())
    }
}

impl fmt::Display for SubjectPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How to join a cluster (`hearth cloud serve --nats-url … --node-id …`).
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// The NATS server(s), e.g. `nats://127.0.0.1:4222`.
    pub nats_url: String,
    /// This node's name, unique in the cluster.
    pub node_id: NodeId,
    /// The subject prefix shared by the cluster's nodes.
    pub subject_prefix: SubjectPrefix,
}

/// A message for the node that holds a device's link, on `P.dev.<device>`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum DeviceMsg {
    /// Deliver a signed command. With `wait`, answer with the device's
    /// result (API request); without, answer once it is queued (controller
    /// link: the result is pushed).
    Command {
        #[serde(with = "hearth_proto::b64::bytes")]
        envelope: Vec<u8>,
        wait: bool,
    },
    /// Deliver a pairing request and answer with the device's outcome.
    Pair { request: PairRequest },
    /// Answer with the latest state report of the link.
    Info {},
    /// The device's owner or members changed in the database: re-read them.
    Refresh {},
    /// A node registered a link of this device at `at_ms`; an older link
    /// elsewhere is stale and is dropped (the newest link wins).
    Claim { node: String, at_ms: u64 },
}

/// The holding node's answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum Reply {
    Result {
        #[serde(with = "hearth_proto::b64::bytes")]
        envelope: Vec<u8>,
    },
    Queued,
    Paired {
        outcome: Box<PairOutcome>,
        key: Box<PublicKey>,
    },
    Info {
        #[serde(default)]
        last_state: Option<String>,
    },
    Failed {
        error: Failure,
    },
}

/// A [`RouteError`] as it crosses NATS.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Failure {
    TooLarge,
    Overflow,
    Conflict,
    Timeout,
    WentAway,
}

impl From<Failure> for RouteError {
    fn from(f: Failure) -> Self {
        match f {
            Failure::TooLarge => RouteError::TooLarge,
            Failure::Overflow => RouteError::Overflow,
            Failure::Conflict => RouteError::Conflict,
            Failure::Timeout => RouteError::Timeout,
            Failure::WentAway => RouteError::WentAway,
        }
    }
}

impl Failure {
    /// The failure to report for a local error; `None` for "not here",
    /// which a holding node never says (it stays silent instead).
    fn of(e: &RouteError) -> Option<Self> {
        match e {
            RouteError::TooLarge => Some(Self::TooLarge),
            RouteError::Overflow => Some(Self::Overflow),
            RouteError::Conflict => Some(Self::Conflict),
            RouteError::Timeout => Some(Self::Timeout),
            RouteError::WentAway => Some(Self::WentAway),
            RouteError::Offline | RouteError::Unavailable => None,
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// This node's membership in the cluster.
pub struct Cluster {
    client: async_nats::Client,
    node: NodeId,
    prefix: SubjectPrefix,
    router: Arc<Router>,
    store: Store,
    metrics: Arc<Metrics>,
    accounts: Mutex<HashMap<AccountId, AccountSub>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

struct AccountSub {
    links: usize,
    task: JoinHandle<()>,
}

/// Publishes device-caused pushes from the router's lock without blocking.
struct NatsSink {
    tx: mpsc::Sender<(AccountId, Arc<str>)>,
    metrics: Arc<Metrics>,
}

impl PushSink for NatsSink {
    fn push(&self, account: &AccountId, text: Arc<str>) {
        if self.tx.try_send((account.clone(), text)).is_err() {
            self.metrics.error(ErrorKind::PushDropped);
        }
    }
}

impl Cluster {
    /// Connects to NATS and returns the node's cluster half together with
    /// the routing table whose pushes go through it. Fails if NATS cannot
    /// be reached within [`CONNECT_TIMEOUT`]: a node that cannot route
    /// should not take links.
    pub async fn start(
        config: &ClusterConfig,
        store: Store,
        metrics: Arc<Metrics>,
        stop: watch::Receiver<bool>,
    ) -> anyhow::Result<Arc<Self>> {
        use anyhow::Context;
        let node = config.node_id.clone();
        let options = async_nats::ConnectOptions::new()
            .name(format!("hearth-cloud {node}"))
            .connection_timeout(CONNECT_TIMEOUT)
            .request_timeout(Some(COMMAND_TIMEOUT + REMOTE_MARGIN))
            .event_callback(move |event| async move {
                match event {
                    async_nats::Event::Connected => tracing::info!("NATS connected"),
                    async_nats::Event::Disconnected => tracing::warn!("NATS disconnected; cross-node routing is down until it reconnects"),
                    other => tracing::info!(event = %other, "NATS event"),
                }
            });
        let client = tokio::time::timeout(CONNECT_TIMEOUT * 2, options.connect(config.nats_url.as_str()))
            .await
            .map_err(|_| anyhow::anyhow!("no answer from NATS at {} within {:?}", config.nats_url, CONNECT_TIMEOUT * 2))?
            .with_context(|| format!("connecting to NATS at {}", config.nats_url))?;
        let (push_tx, push_rx) = mpsc::channel(PUSH_QUEUE);
        let router = Router::with_sink(Arc::new(NatsSink { tx: push_tx, metrics: metrics.clone() }));
        let cluster = Arc::new(Self {
            client,
            node,
            prefix: config.subject_prefix.clone(),
            router,
            store,
            metrics,
            accounts: Mutex::new(HashMap::new()),
            tasks: Mutex::new(Vec::new()),
        });
        let setup = cluster
            .client
            .subscribe(format!("{}.setup.*", cluster.prefix))
            .await
            .context("subscribing to setup-code questions on NATS")?;
        let publisher = tokio::spawn(cluster.clone().publish_pushes(push_rx, stop.clone()));
        let answerer = tokio::spawn(cluster.clone().answer_setup(setup, stop));
        cluster.lock_tasks().extend([publisher, answerer]);
        tracing::info!(node = %cluster.node, prefix = %cluster.prefix, "joined the cluster");
        Ok(cluster)
    }

    /// The routing table of this node.
    pub fn router(&self) -> Arc<Router> {
        self.router.clone()
    }

    /// Whether the NATS connection is up right now.
    pub fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Waits for the background tasks after shutdown and flushes what is
    /// still queued for NATS.
    pub async fn finish(&self) {
        let tasks = std::mem::take(&mut *self.lock_tasks());
        for t in tasks {
            let _ = t.await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.client.flush()).await;
    }

    fn lock_tasks(&self) -> MutexGuard<'_, Vec<JoinHandle<()>>> {
        // Only handles are stored; a panic elsewhere leaves them usable.
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_accounts(&self) -> MutexGuard<'_, HashMap<AccountId, AccountSub>> {
        self.accounts.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn device_subject(&self, id: &DeviceId) -> String {
        format!("{}.dev.{id}", self.prefix)
    }

    fn account_subject(&self, account: &AccountId) -> String {
        format!("{}.acct.{account}.push", self.prefix)
    }

    async fn publish(&self, subject: String, payload: Vec<u8>) {
        if payload.len() > MAX_MESSAGE {
            tracing::warn!(len = payload.len(), "not publishing an oversized cluster message");
            self.metrics.error(ErrorKind::TooLarge);
            return;
        }
        match self.client.publish(subject, payload.into()).await {
            Ok(()) => self.metrics.cluster_out(),
            Err(e) => {
                tracing::debug!(error = %e, "could not publish to NATS");
                self.metrics.error(ErrorKind::Cluster);
            }
        }
    }

    async fn publish_pushes(self: Arc<Self>, mut rx: mpsc::Receiver<(AccountId, Arc<str>)>, mut stop: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                next = rx.recv() => match next {
                    Some((account, text)) => {
                        let subject = self.account_subject(&account);
                        self.publish(subject, text.as_bytes().to_vec()).await;
                    }
                    None => return,
                },
                () = crate::stopped(&mut stop) => return,
            }
        }
    }

    async fn answer_setup(self: Arc<Self>, mut sub: async_nats::Subscriber, mut stop: watch::Receiver<bool>) {
        loop {
            let msg = tokio::select! {
                m = sub.next() => match m { Some(m) => m, None => return },
                () = crate::stopped(&mut stop) => return,
            };
            self.metrics.cluster_in();
            let Some(lookup) = msg.subject.as_str().rsplit('.').next() else { continue };
            let (Some(reply), Some(device)) = (msg.reply, self.router.find_setup(lookup)) else { continue };
            self.publish(reply.to_string(), device.to_string().into_bytes()).await;
        }
    }

    // ---- a device link on this node ----

    /// Starts answering for a device link that was just registered in the
    /// router: subscribes to its subject and claims it, so an older link on
    /// another node is dropped. The subscription ends when the returned
    /// guard is dropped (the link ended).
    pub fn device_up(self: &Arc<Self>, id: &DeviceId, link: u64) -> DeviceSub {
        let this = self.clone();
        let id = id.clone();
        let at_ms = now_ms();
        let task = tokio::spawn(async move {
            let subject = this.device_subject(&id);
            let mut sub = match this.client.subscribe(subject.clone()).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "could not subscribe for a device; it is reachable only from this node");
                    this.metrics.error(ErrorKind::Cluster);
                    return;
                }
            };
            // After subscribing, so this node never misses a later claim.
            let claim = DeviceMsg::Claim { node: this.node.0.clone(), at_ms };
            if let Ok(bytes) = serde_json::to_vec(&claim) {
                this.publish(subject, bytes).await;
            }
            while let Some(msg) = sub.next().await {
                this.metrics.cluster_in();
                if !this.on_device_msg(&id, link, at_ms, msg).await {
                    return;
                }
            }
        });
        DeviceSub { task }
    }

    /// Handles one message for a device whose link `link` is (or was) on
    /// this node. Returns false once the link is gone, ending the
    /// subscription.
    async fn on_device_msg(self: &Arc<Self>, id: &DeviceId, link: u64, at_ms: u64, msg: async_nats::Message) -> bool {
        if self.router.device_link(id) != Some(link) {
            return false;
        }
        if msg.payload.len() > MAX_MESSAGE {
            tracing::warn!(len = msg.payload.len(), "dropping an oversized cluster message");
            return true;
        }
        let parsed: DeviceMsg = match serde_json::from_slice(&msg.payload) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "dropping a malformed cluster message");
                self.metrics.error(ErrorKind::Cluster);
                return true;
            }
        };
        let reply = msg.reply.map(|r| r.to_string());
        match parsed {
            DeviceMsg::Claim { node, at_ms: theirs } => {
                // The newest link wins; equal times are settled by node id
                // so exactly one of two nodes gives way.
                if node != self.node.0 && (theirs, node.as_str()) > (at_ms, self.node.0.as_str()) {
                    tracing::info!(%node, "the device has a newer link on another node; dropping this one");
                    self.router.supersede(id, link);
                    return false;
                }
            }
            DeviceMsg::Info {} => {
                if let Some(reply) = reply {
                    let last_state = self.router.last_state(id).map(b64::encode);
                    self.answer(reply, &Reply::Info { last_state }).await;
                }
            }
            DeviceMsg::Refresh {} => {
                let this = self.clone();
                let id = id.clone();
                tokio::spawn(async move { this.refresh(&id).await });
            }
            DeviceMsg::Command { envelope, wait } => {
                let this = self.clone();
                let id = id.clone();
                // Waiting for the device must not hold up this subscription.
                tokio::spawn(async move {
                    let outcome = if wait {
                        match hearth_proto::message::peek_command(&envelope) {
                            Ok(peek) => local_command(&this.router, &id, envelope, peek.controller, peek.counter)
                                .await
                                .map(|envelope| Reply::Result { envelope }),
                            // The requesting node peeked already; a bad one here is a bug or an attack on NATS.
                            Err(_) => Err(RouteError::TooLarge),
                        }
                    } else {
                        this.router.send_to_device(&id, &CloudFrame::Command { envelope }).map(|()| Reply::Queued)
                    };
                    this.reply_outcome(reply, outcome).await;
                });
            }
            DeviceMsg::Pair { request } => {
                let this = self.clone();
                let id = id.clone();
                tokio::spawn(async move {
                    let outcome =
                        local_pairing(&this.router, &id, request)
                            .await
                            .map(|(outcome, key)| Reply::Paired { outcome: Box::new(outcome), key: Box::new(key) });
                    this.reply_outcome(reply, outcome).await;
                });
            }
        }
        true
    }

    async fn reply_outcome(&self, reply: Option<String>, outcome: Result<Reply, RouteError>) {
        let Some(reply) = reply else { return };
        let answer = match outcome {
            Ok(r) => r,
            Err(e) => match Failure::of(&e) {
                Some(error) => Reply::Failed { error },
                // The link went away meanwhile: say nothing, as a node
                // without the link would.
                None => return,
            },
        };
        self.answer(reply, &answer).await;
    }

    async fn answer(&self, reply: String, answer: &Reply) {
        match serde_json::to_vec(answer) {
            Ok(bytes) => self.publish(reply, bytes).await,
            Err(e) => tracing::error!(error = %e, "could not encode a cluster reply"),
        }
    }

    async fn refresh(&self, id: &DeviceId) {
        let owner = match self.store.device_owner(id.clone()).await {
            Ok(o) => o,
            Err(e) => return tracing::warn!(error = %e, "could not re-read a device's owner"),
        };
        let members = match self.store.members_of(id.clone()).await {
            Ok(m) => m,
            Err(e) => return tracing::warn!(error = %e, "could not re-read a device's members"),
        };
        self.router.refresh_accounts(id, owner, members);
    }

    // ---- asking the node that holds a device ----

    async fn request(&self, id: &DeviceId, msg: &DeviceMsg, wait: Duration) -> Result<Reply, RouteError> {
        let payload = serde_json::to_vec(msg).map_err(|_| RouteError::TooLarge)?;
        if payload.len() > MAX_MESSAGE {
            return Err(RouteError::TooLarge);
        }
        let request = async_nats::Request::new().payload(payload.into()).timeout(Some(wait));
        self.metrics.cluster_out();
        let answer = match self.client.send_request(self.device_subject(id), request).await {
            Ok(m) => m,
            Err(e) => {
                return Err(match e.kind() {
                    // Nobody subscribes to the device: no node holds its link.
                    RequestErrorKind::NoResponders => RouteError::Offline,
                    RequestErrorKind::TimedOut => RouteError::Timeout,
                    RequestErrorKind::MaxPayloadExceeded => RouteError::TooLarge,
                    RequestErrorKind::InvalidSubject | RequestErrorKind::Other => {
                        tracing::warn!(error = %e, "NATS request failed");
                        self.metrics.error(ErrorKind::Cluster);
                        RouteError::Unavailable
                    }
                })
            }
        };
        self.metrics.cluster_in();
        if answer.payload.len() > MAX_MESSAGE {
            self.metrics.error(ErrorKind::Cluster);
            return Err(RouteError::Unavailable);
        }
        match serde_json::from_slice::<Reply>(&answer.payload) {
            Ok(Reply::Failed { error }) => Err(error.into()),
            Ok(r) => Ok(r),
            Err(e) => {
                tracing::warn!(error = %e, "malformed answer from another node");
                self.metrics.error(ErrorKind::Cluster);
                Err(RouteError::Unavailable)
            }
        }
    }

    /// Tells the node holding the device that its accounts changed.
    async fn publish_refresh(&self, id: &DeviceId) {
        if let Ok(bytes) = serde_json::to_vec(&DeviceMsg::Refresh {}) {
            self.publish(self.device_subject(id), bytes).await;
        }
    }

    // ---- controller links on this node ----

    /// Starts receiving pushes for `account` (a controller link of it is
    /// opening on this node); one subscription per account, however many
    /// links it has here. Returns once NATS has the subscription, so the
    /// caller can tell the client its link is up and miss nothing sent
    /// after that. Dropping the guard ends the interest.
    pub async fn account_up(self: &Arc<Self>, account: &AccountId) -> AccountGuard {
        let mut guard = AccountGuard { cluster: self.clone(), account: account.clone(), counted: false };
        if let Some(entry) = self.lock_accounts().get_mut(account) {
            entry.links += 1;
            guard.counted = true;
            return guard;
        }
        // Not under the lock: subscribing waits for NATS.
        let subscribed = tokio::time::timeout(QUICK_TIMEOUT, async {
            let sub = self.client.subscribe(self.account_subject(account)).await.ok()?;
            // The server has the subscription once it answered a ping sent after it.
            self.client.flush().await.ok()?;
            Some(sub)
        })
        .await
        .ok()
        .flatten();
        let Some(mut sub) = subscribed else {
            tracing::warn!("could not subscribe to an account's pushes; this link gets none from other nodes");
            self.metrics.error(ErrorKind::Cluster);
            return guard;
        };
        let mut accounts = self.lock_accounts();
        // Another link of the account may have subscribed meanwhile; then
        // this subscription is dropped (which unsubscribes) and its is used.
        let entry = accounts.entry(account.clone()).or_insert_with(|| {
            let this = self.clone();
            let account = account.clone();
            let task = tokio::spawn(async move {
                while let Some(msg) = sub.next().await {
                    this.metrics.cluster_in();
                    if msg.payload.len() > MAX_MESSAGE {
                        continue;
                    }
                    match std::str::from_utf8(&msg.payload) {
                        Ok(text) => this.router.push_local(&account, text.into()),
                        Err(_) => this.metrics.error(ErrorKind::Cluster),
                    }
                }
            });
            AccountSub { links: 0, task }
        });
        entry.links += 1;
        guard.counted = true;
        guard
    }
}

/// A device link's subscription; dropping it unsubscribes.
pub struct DeviceSub {
    task: JoinHandle<()>,
}

impl Drop for DeviceSub {
    fn drop(&mut self) {
        // Aborting drops the subscriber, which unsubscribes.
        self.task.abort();
    }
}

/// A controller link's interest in its account's pushes.
pub struct AccountGuard {
    cluster: Arc<Cluster>,
    account: AccountId,
    /// False when subscribing failed: then this link holds no share.
    counted: bool,
}

impl Drop for AccountGuard {
    fn drop(&mut self) {
        if !self.counted {
            return;
        }
        let mut accounts = self.cluster.lock_accounts();
        if let Some(entry) = accounts.get_mut(&self.account) {
            entry.links -= 1;
            if entry.links == 0 {
                if let Some(gone) = accounts.remove(&self.account) {
                    gone.task.abort();
                }
            }
        }
    }
}

// ---- routing on one node ----

/// Sends a command to a device linked to this node and waits for its
/// signed result.
async fn local_command(
    router: &Arc<Router>,
    id: &DeviceId,
    envelope: Vec<u8>,
    controller: ControllerId,
    counter: u64,
) -> Result<Vec<u8>, RouteError> {
    if !router.is_online(id) {
        return Err(RouteError::Offline);
    }
    let mut waiter = router.expect_result(id, controller, counter).ok_or(RouteError::Conflict)?;
    router.send_to_device(id, &CloudFrame::Command { envelope })?;
    match tokio::time::timeout(COMMAND_TIMEOUT, waiter.recv()).await {
        Err(_) => Err(RouteError::Timeout),
        Ok(None) => Err(RouteError::WentAway),
        Ok(Some(result)) => Ok(result),
    }
}

/// Sends a pairing request to a device linked to this node and waits for
/// its answer and its certified key.
async fn local_pairing(router: &Arc<Router>, id: &DeviceId, request: PairRequest) -> Result<(PairOutcome, PublicKey), RouteError> {
    let (req, mut waiter) = router.expect_pairing(id);
    router.send_to_device(id, &CloudFrame::Pair { req, request })?;
    match tokio::time::timeout(PAIR_TIMEOUT, waiter.recv()).await {
        Err(_) => Err(RouteError::Timeout),
        Ok(None) => Err(RouteError::WentAway),
        Ok(Some(answer)) => Ok(answer),
    }
}

fn count_error(metrics: &Metrics, e: &RouteError) {
    metrics.error(match e {
        RouteError::Offline => ErrorKind::Offline,
        RouteError::TooLarge => ErrorKind::TooLarge,
        RouteError::Overflow => ErrorKind::Overflow,
        RouteError::Conflict | RouteError::Unavailable => ErrorKind::Cluster,
        RouteError::Timeout => ErrorKind::Timeout,
        RouteError::WentAway => ErrorKind::WentAway,
    });
}

/// What the API and the controller links call: the device's link may be on
/// this node or (cluster mode) on another.
impl Shared {
    /// Whether the device has a link on some node.
    pub(crate) async fn device_online(&self, id: &DeviceId) -> bool {
        if self.router.is_online(id) {
            return true;
        }
        match &self.cluster {
            Some(c) => matches!(c.request(id, &DeviceMsg::Info {}, QUICK_TIMEOUT).await, Ok(Reply::Info { .. })),
            None => false,
        }
    }

    /// For each device: whether it is online, and the newest state report
    /// its link has seen.
    pub(crate) async fn device_presence(&self, ids: &[DeviceId]) -> Vec<(bool, Option<Vec<u8>>)> {
        let one = |id: DeviceId| async move {
            if self.router.is_online(&id) {
                return (true, self.router.last_state(&id));
            }
            let Some(c) = &self.cluster else { return (false, None) };
            match c.request(&id, &DeviceMsg::Info {}, QUICK_TIMEOUT).await {
                Ok(Reply::Info { last_state }) => (true, last_state.and_then(|s| b64::decode(&s).ok())),
                _ => (false, None),
            }
        };
        futures_util::stream::iter(ids.iter().cloned()).map(one).buffered(PRESENCE_PARALLEL).collect().await
    }

    /// Delivers a command and waits for the device's signed result.
    pub(crate) async fn route_command(
        &self,
        id: &DeviceId,
        envelope: Vec<u8>,
        controller: ControllerId,
        counter: u64,
    ) -> Result<Vec<u8>, RouteError> {
        let started = Instant::now();
        let (route, outcome) = match &self.cluster {
            Some(c) if !self.router.is_online(id) => {
                let wait = COMMAND_TIMEOUT + REMOTE_MARGIN;
                let outcome = match c.request(id, &DeviceMsg::Command { envelope, wait: true }, wait).await {
                    Ok(Reply::Result { envelope }) => Ok(envelope),
                    Ok(_) => Err(RouteError::Unavailable),
                    Err(e) => Err(e),
                };
                (Route::Cluster, outcome)
            }
            _ => (Route::Local, local_command(&self.router, id, envelope, controller, counter).await),
        };
        match &outcome {
            Ok(_) => self.metrics.command(route, started.elapsed()),
            Err(e) => count_error(&self.metrics, e),
        }
        outcome
    }

    /// Queues a command from a controller link; its result is pushed.
    pub(crate) async fn route_send(&self, id: &DeviceId, envelope: Vec<u8>) -> Result<(), RouteError> {
        let outcome = match &self.cluster {
            Some(c) if !self.router.is_online(id) => {
                match c.request(id, &DeviceMsg::Command { envelope, wait: false }, QUICK_TIMEOUT).await {
                    Ok(Reply::Queued) => Ok(()),
                    Ok(_) => Err(RouteError::Unavailable),
                    Err(e) => Err(e),
                }
            }
            _ => self.router.send_to_device(id, &CloudFrame::Command { envelope }),
        };
        if let Err(e) = &outcome {
            count_error(&self.metrics, e);
        }
        outcome
    }

    /// The online device in setup mode that announced `lookup`.
    pub(crate) async fn find_setup_device(&self, lookup: &str) -> Option<DeviceId> {
        if let Some(id) = self.router.find_setup(lookup) {
            return Some(id);
        }
        let c = self.cluster.as_ref()?;
        // The lookup becomes a subject token: anything else is no code.
        if !is_token(lookup) {
            return None;
        }
        let request = async_nats::Request::new().payload(Vec::new().into()).timeout(Some(SETUP_LOOKUP_TIMEOUT));
        let answer = c.client.send_request(format!("{}.setup.{lookup}", c.prefix), request).await.ok()?;
        std::str::from_utf8(&answer.payload).ok()?.parse().ok()
    }

    /// Sends a pairing request and waits for the device's outcome and the
    /// key from its certificate.
    pub(crate) async fn route_pairing(&self, id: &DeviceId, request: PairRequest) -> Result<(PairOutcome, PublicKey), RouteError> {
        match &self.cluster {
            Some(c) if !self.router.is_online(id) => {
                match c.request(id, &DeviceMsg::Pair { request }, PAIR_TIMEOUT + REMOTE_MARGIN).await? {
                    Reply::Paired { outcome, key } => Ok((*outcome, *key)),
                    _ => Err(RouteError::Unavailable),
                }
            }
            _ => local_pairing(&self.router, id, request).await,
        }
    }

    /// A pairing made `owner` the device's owner (recorded in the store).
    pub(crate) async fn device_owner_set(&self, id: &DeviceId, owner: AccountId) {
        self.router.set_owner(id, owner);
        if let Some(c) = &self.cluster {
            if !self.router.is_online(id) {
                c.publish_refresh(id).await;
            }
        }
    }

    /// The device's member accounts changed (recorded in the store).
    pub(crate) async fn device_members_set(&self, id: &DeviceId, members: Vec<AccountId>) {
        self.router.set_members(id, members);
        if let Some(c) = &self.cluster {
            if !self.router.is_online(id) {
                c.publish_refresh(id).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_subject_tokens_only_when_safe() {
        assert!("node-1".parse::<NodeId>().is_ok());
        for bad in ["", "a.b", "a b", "a*", "a>", &"x".repeat(65)] {
            assert!(bad.parse::<NodeId>().is_err(), "{bad:?}");
        }
        assert!("hearth".parse::<SubjectPrefix>().is_ok());
        assert!("t.abc_1".parse::<SubjectPrefix>().is_ok());
        for bad in ["", "a..b", ".a", "a.", "a.*", "a.>", "a b"] {
            assert!(bad.parse::<SubjectPrefix>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn messages_round_trip_and_refuse_unknown_fields() {
        let m = DeviceMsg::Command { envelope: vec![1, 2, 3], wait: true };
        let text = serde_json::to_string(&m).unwrap();
        assert!(matches!(serde_json::from_str(&text).unwrap(), DeviceMsg::Command { wait: true, .. }));
        assert!(serde_json::from_str::<DeviceMsg>(r#"{"type":"info","x":1}"#).is_err());
        let r = Reply::Failed { error: Failure::Conflict };
        let back: Reply = serde_json::from_slice(&serde_json::to_vec(&r).unwrap()).unwrap();
        assert!(matches!(back, Reply::Failed { error: Failure::Conflict }));
    }
}
