//! Cluster mode: routing between cloud nodes over NATS (ADR 0008, with
//! the per-node subject and device directory of ADR 0014).
//!
//! Every node keeps only its own links in its [`Router`]; accounts,
//! sessions, pairings, members, event history and the device directory
//! (which node holds each device's link) are in the shared PostgreSQL
//! database, so any node can serve any request and a killed node loses
//! nothing but its open links (the devices redial another node).
//!
//! Subjects (under a configurable prefix, `hearth` by default):
//!
//! | subject | subscribed by | carries |
//! |---|---|---|
//! | `P.node.<node>` | that node (one subscription, whatever its links) | a [`NodeMsg`]: a [`DeviceMsg`] for one of its devices: commands and pairing requests (request/reply), info, refresh, link claims |
//! | `P.acct.<account>.push` | every node with a controller link of the account | a [`ControllerPush`](hearth_proto::link::ControllerPush) as JSON text |
//! | `P.setup.<lookup>` | every node (one wildcard subscription) | "which device announced this setup code?"; only the holder answers |
//!
//! A node that registers a device link records itself in the directory
//! (`device_links`, [`Store::claim_link`]) and removes the entry when that
//! link ends, if the entry is still that link's. A node with a request for
//! a device not linked to it reads the holder from the directory (or from
//! its copy of an answer read less than [`holders::TTL`] ago, ADR 0017)
//! and asks that node. The holder answers every request: with the device's answer,
//! or "offline" if it does not hold the device (any more). A holder that
//! died leaves its entries behind; NATS then answers "no responders" at
//! once, which means offline, as it did when nobody subscribed to a
//! device's own subject. After either "offline" the requester reads the
//! directory once more and asks the new holder if the device moved
//! meanwhile (dropping its copy of the old answer); neither answer means
//! the message reached a device, so this never delivers a command twice.
//!
//! Delivery is at most once: NATS core does not store or redeliver. A
//! command whose answer is lost is reported as a timeout; the controller
//! may send it again, and the device's replay counter (DESIGN.md §3)
//! refuses a copy it already executed, so no state change happens twice.
//!
//! Every message is bounded ([`MAX_MESSAGE`]) and every request has a
//! deadline, the directory look-up included. When NATS is unreachable,
//! commands for devices on other nodes fail with 503 while links on this
//! node keep working; `async-nats` reconnects by itself and restores the
//! subscriptions.

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
use crate::store::{AccountId, LinkClaimed, LinkEntry, Store};
use crate::Shared;

mod holders;

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

/// A message for the node that holds a device's link, on `P.node.<node>`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeMsg {
    /// The device it is about.
    device: DeviceId,
    msg: DeviceMsg,
}

/// What a [`NodeMsg`] asks of the node holding the device.
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
    /// A node registered a link of this device at `at_ms` and replaced this
    /// node's directory entry; an older link here is stale and is dropped
    /// (the newest link wins).
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
    /// The asked node does not hold the device's link (any more); nothing
    /// was delivered.
    Offline,
    /// The asked node could not read the message.
    Unavailable,
}

impl From<Failure> for RouteError {
    fn from(f: Failure) -> Self {
        match f {
            Failure::TooLarge => RouteError::TooLarge,
            Failure::Overflow => RouteError::Overflow,
            Failure::Conflict => RouteError::Conflict,
            Failure::Timeout => RouteError::Timeout,
            Failure::WentAway => RouteError::WentAway,
            Failure::Offline => RouteError::Offline,
            Failure::Unavailable => RouteError::Unavailable,
        }
    }
}

impl From<&RouteError> for Failure {
    fn from(e: &RouteError) -> Self {
        match e {
            RouteError::TooLarge => Self::TooLarge,
            RouteError::Overflow => Self::Overflow,
            RouteError::Conflict => Self::Conflict,
            RouteError::Timeout => Self::Timeout,
            RouteError::WentAway => Self::WentAway,
            RouteError::Offline => Self::Offline,
            RouteError::Unavailable => Self::Unavailable,
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
    /// The directory entry each device link on this node recorded, to
    /// settle a claim from another node and to remove only its own entry.
    links: Mutex<HashMap<DeviceId, LocalLink>>,
    /// Recent directory answers for requests to other nodes.
    recent_holders: holders::Holders,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

#[derive(Debug, Clone, Copy)]
struct LocalLink {
    /// The router's link number.
    link: u64,
    /// When this node registered it (the directory entry's `at_ms`).
    at_ms: u64,
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
        // Entries left by an earlier run of this node (killed without
        // removing them) name links that no longer exist.
        let stale = store.release_node_links(node.0.clone()).await.context("clearing this node's old device directory entries")?;
        if stale > 0 {
            tracing::info!(stale, "removed device directory entries of this node's previous run");
        }
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
            links: Mutex::new(HashMap::new()),
            recent_holders: holders::Holders::default(),
            tasks: Mutex::new(Vec::new()),
        });
        let inbox = cluster
            .client
            .subscribe(cluster.node_subject(&cluster.node))
            .await
            .context("subscribing to this node's subject on NATS")?;
        let setup = cluster
            .client
            .subscribe(format!("{}.setup.*", cluster.prefix))
            .await
            .context("subscribing to setup-code questions on NATS")?;
        // Links are taken only once NATS has both subscriptions, so no
        // request for a device linked here finds nobody listening.
        cluster.client.flush().await.context("subscribing on NATS")?;
        let publisher = tokio::spawn(cluster.clone().publish_pushes(push_rx, stop.clone()));
        let node_answerer = tokio::spawn(cluster.clone().answer_node(inbox, stop.clone()));
        let setup_answerer = tokio::spawn(cluster.clone().answer_setup(setup, stop));
        cluster.lock_tasks().extend([publisher, node_answerer, setup_answerer]);
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

    /// Waits for the background tasks after shutdown, removes this node's
    /// directory entries (its links are closed) and flushes what is still
    /// queued for NATS.
    pub async fn finish(&self) {
        let tasks = std::mem::take(&mut *self.lock_tasks());
        for t in tasks {
            let _ = t.await;
        }
        let released = tokio::time::timeout(QUICK_TIMEOUT, self.store.release_node_links(self.node.0.clone())).await;
        if !matches!(released, Ok(Ok(_))) {
            tracing::warn!("could not remove this node's device directory entries; they stay until the devices link again");
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

    fn lock_links(&self) -> MutexGuard<'_, HashMap<DeviceId, LocalLink>> {
        // Single inserts and removes: a panic elsewhere leaves it consistent.
        self.links.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn node_subject(&self, node: &NodeId) -> String {
        format!("{}.node.{node}", self.prefix)
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

    // ---- device links on this node ----

    /// Records a device link that was just registered in the router in the
    /// directory, so other nodes route its messages here, and settles
    /// which link wins if the device has another one: an older link on
    /// another node is told to give way, and this link gives way itself if
    /// a newer one is recorded. The entry is removed when the returned
    /// guard is dropped (the link ended), if it is still this link's.
    pub async fn device_up(self: &Arc<Self>, id: &DeviceId, link: u64) -> DeviceClaim {
        self.device_up_at(id, link, now_ms()).await
    }

    async fn device_up_at(self: &Arc<Self>, id: &DeviceId, link: u64, at_ms: u64) -> DeviceClaim {
        // Before the directory says so, so a claim racing with this one is
        // settled against this link's time. Only while this link is still
        // the router's, checked under the same lock: two links of one device
        // registering on this node at once could otherwise leave the map
        // naming the older one while the router holds the newer (security
        // review). A link already replaced records nothing and removes
        // nothing; the newer one does both.
        {
            let mut links = self.lock_links();
            if self.router.device_link(id) != Some(link) {
                return DeviceClaim { cluster: self.clone(), id: id.clone(), link, at_ms, recorded: false };
            }
            links.insert(id.clone(), LocalLink { link, at_ms });
        }
        let guard = DeviceClaim { cluster: self.clone(), id: id.clone(), link, at_ms, recorded: true };
        let claim = LinkEntry { node: self.node.0.clone(), at_ms };
        match self.store.claim_link(id.clone(), claim).await {
            Ok(LinkClaimed::Recorded { replaced: Some(old) }) if old.node != self.node.0 => {
                // The older link elsewhere is stale (a device holds one link
                // at a time): tell its node, which drops it if it still has it.
                match old.node.parse::<NodeId>() {
                    Ok(node) => self.send(&node, id, DeviceMsg::Claim { node: self.node.0.clone(), at_ms }).await,
                    Err(e) => tracing::warn!(error = %e, "the device directory names an invalid node"),
                }
            }
            Ok(LinkClaimed::Recorded { .. }) => {}
            Ok(LinkClaimed::Outdated { newer }) => {
                // A newer link registered first (its node told this one
                // nothing, since it replaced no entry of this link's).
                if newer.node != self.node.0 {
                    tracing::info!(node = %newer.node, "the device has a newer link on another node; dropping this one");
                    self.forget(id, link);
                    self.router.supersede(id, link);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not record the device's link in the directory; it is reachable only from this node");
                self.metrics.error(ErrorKind::Cluster);
            }
        }
        guard
    }

    /// Forgets a link's directory bookkeeping; true if it was this link's.
    fn forget(&self, id: &DeviceId, link: u64) -> bool {
        let mut links = self.lock_links();
        match links.get(id) {
            Some(l) if l.link == link => {
                links.remove(id);
                true
            }
            _ => false,
        }
    }

    async fn answer_node(self: Arc<Self>, mut sub: async_nats::Subscriber, mut stop: watch::Receiver<bool>) {
        loop {
            let msg = tokio::select! {
                m = sub.next() => match m { Some(m) => m, None => return },
                () = crate::stopped(&mut stop) => return,
            };
            self.metrics.cluster_in();
            self.on_node_msg(msg).await;
        }
    }

    /// Handles one message for a device that is (or was) linked to this
    /// node. Every request gets an answer, so no requester waits for its
    /// deadline because of this node; long waits (commands, pairing) run
    /// in their own task so they do not hold up the others.
    async fn on_node_msg(self: &Arc<Self>, msg: async_nats::Message) {
        let reply = msg.reply.map(|r| r.to_string());
        if msg.payload.len() > MAX_MESSAGE {
            tracing::warn!(len = msg.payload.len(), "refusing an oversized cluster message");
            self.metrics.error(ErrorKind::Cluster);
            return self.reply_outcome(reply, Err(RouteError::Unavailable)).await;
        }
        let NodeMsg { device: id, msg: parsed } = match serde_json::from_slice(&msg.payload) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "refusing a malformed cluster message");
                self.metrics.error(ErrorKind::Cluster);
                return self.reply_outcome(reply, Err(RouteError::Unavailable)).await;
            }
        };
        let Some(link) = self.router.device_link(&id) else {
            // Not here (any more): say so, and the requester re-reads the
            // directory. A claim or refresh for it has nothing to change.
            return self.reply_outcome(reply, Err(RouteError::Offline)).await;
        };
        match parsed {
            DeviceMsg::Claim { node, at_ms: theirs } => {
                // Only compared and logged, but still a name from the wire.
                if let Err(e) = node.parse::<NodeId>() {
                    tracing::warn!(error = %e, "dropping a claim with an invalid node id");
                    self.metrics.error(ErrorKind::Cluster);
                    return;
                }
                let ours = self.lock_links().get(&id).filter(|l| l.link == link).map(|l| l.at_ms);
                let theirs = LinkEntry { node, at_ms: theirs };
                // The newest link wins; equal times are settled by node id
                // so exactly one of two nodes gives way.
                if let Some(ours) = ours {
                    let ours = LinkEntry { node: self.node.0.clone(), at_ms: ours };
                    if theirs.node != ours.node && theirs.is_newer_than(&ours) {
                        tracing::info!(node = %theirs.node, "the device has a newer link on another node; dropping this one");
                        self.forget(&id, link);
                        self.router.supersede(&id, link);
                    }
                }
            }
            DeviceMsg::Info {} => {
                let last_state = self.router.last_state(&id).map(b64::encode);
                self.reply_outcome(reply, Ok(Reply::Info { last_state })).await;
            }
            DeviceMsg::Refresh {} => {
                let this = self.clone();
                tokio::spawn(async move { this.refresh(&id).await });
            }
            DeviceMsg::Command { envelope, wait } => {
                let this = self.clone();
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
                tokio::spawn(async move {
                    let outcome =
                        local_pairing(&this.router, &id, request)
                            .await
                            .map(|(outcome, key)| Reply::Paired { outcome: Box::new(outcome), key: Box::new(key) });
                    this.reply_outcome(reply, outcome).await;
                });
            }
        }
    }

    async fn reply_outcome(&self, reply: Option<String>, outcome: Result<Reply, RouteError>) {
        let Some(reply) = reply else { return };
        let answer = match outcome {
            Ok(r) => r,
            Err(e) => Reply::Failed { error: Failure::from(&e) },
        };
        match serde_json::to_vec(&answer) {
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

    /// The nodes the directory names for `ids`, in order (`None`: no link
    /// recorded), with one query. Fails (503) if the database does not
    /// answer by `deadline`.
    async fn holders(&self, ids: Vec<DeviceId>, deadline: Instant) -> Result<Vec<Option<NodeId>>, RouteError> {
        let found = match tokio::time::timeout_at(deadline.into(), self.store.link_holders(ids)).await {
            Ok(Ok(found)) => found,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not read the device directory");
                self.metrics.error(ErrorKind::Cluster);
                return Err(RouteError::Unavailable);
            }
            Err(_) => {
                tracing::warn!("the device directory did not answer in time");
                self.metrics.error(ErrorKind::Cluster);
                return Err(RouteError::Unavailable);
            }
        };
        Ok(found
            .into_iter()
            .map(|node| {
                let node = node?;
                // The directory is written by nodes only; a value that is
                // no subject token is a corrupt row, never a subject.
                node.parse()
                    .map_err(|e: NameError| tracing::warn!(error = %e, "the device directory names an invalid node"))
                    .ok()
            })
            .collect())
    }

    async fn holder(&self, id: &DeviceId, deadline: Instant) -> Result<Option<NodeId>, RouteError> {
        Ok(self.holders(vec![id.clone()], deadline).await?.pop().flatten())
    }

    fn encode(id: &DeviceId, msg: DeviceMsg) -> Result<Vec<u8>, RouteError> {
        let payload = serde_json::to_vec(&NodeMsg { device: id.clone(), msg }).map_err(|_| RouteError::TooLarge)?;
        if payload.len() > MAX_MESSAGE {
            return Err(RouteError::TooLarge);
        }
        Ok(payload)
    }

    /// Asks the node holding the device, within `wait` in all. The holder
    /// comes from this node's recent copy of a directory answer, or else
    /// from the directory; a node that answered is remembered, any failure
    /// drops the copy. If that node says it does not hold the device, or no
    /// node answers on its subject (killed), the directory is read once
    /// more and the new holder asked if the device moved meanwhile: neither
    /// answer means the message reached a device, so it is never delivered
    /// twice.
    async fn request(&self, id: &DeviceId, msg: DeviceMsg, wait: Duration) -> Result<Reply, RouteError> {
        let deadline = Instant::now() + wait;
        let payload = Self::encode(id, msg)?;
        let node = match self.recent_holders.get(id, Instant::now()) {
            Some(node) => node,
            None => self.holder(id, deadline).await?.ok_or(RouteError::Offline)?,
        };
        let outcome = match self.request_node(&node, payload.clone(), deadline).await {
            Err(RouteError::Offline) => {
                self.recent_holders.forget(id, &node);
                match self.holder(id, deadline).await? {
                    Some(moved) if moved != node => self.request_node(&moved, payload, deadline).await.map(|r| (moved, r)),
                    _ => Err(RouteError::Offline),
                }
            }
            other => other.map(|r| (node.clone(), r)),
        };
        match outcome {
            Ok((answered, reply)) => {
                self.recent_holders.put(id, Some(&answered), Instant::now());
                Ok(reply)
            }
            Err(e) => {
                self.recent_holders.forget(id, &node);
                Err(e)
            }
        }
    }

    async fn request_node(&self, node: &NodeId, payload: Vec<u8>, deadline: Instant) -> Result<Reply, RouteError> {
        let wait = deadline.saturating_duration_since(Instant::now());
        if wait.is_zero() {
            return Err(RouteError::Timeout);
        }
        let request = async_nats::Request::new().payload(payload.into()).timeout(Some(wait));
        self.metrics.cluster_out();
        let answer = match self.client.send_request(self.node_subject(node), request).await {
            Ok(m) => m,
            Err(e) => {
                return Err(match e.kind() {
                    // Nobody subscribes to the node's subject: it died
                    // holding the link, which is gone with it.
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

    /// Publishes a message for a device to a node, expecting no answer.
    async fn send(&self, node: &NodeId, id: &DeviceId, msg: DeviceMsg) {
        match Self::encode(id, msg) {
            Ok(bytes) => self.publish(self.node_subject(node), bytes).await,
            Err(_) => self.metrics.error(ErrorKind::TooLarge),
        }
    }

    /// Tells the node holding the device that its accounts changed.
    async fn publish_refresh(&self, id: &DeviceId) {
        if let Ok(Some(node)) = self.holder(id, Instant::now() + QUICK_TIMEOUT).await {
            self.send(&node, id, DeviceMsg::Refresh {}).await;
        }
    }

    /// Whether the device is linked to a node, and that node's newest state
    /// report of it, for each of `ids`: one directory query for all, then
    /// one question to the holding node per device that has one.
    async fn presence(&self, ids: Vec<DeviceId>) -> Vec<(bool, Option<Vec<u8>>)> {
        let deadline = Instant::now() + QUICK_TIMEOUT;
        let holders = match self.holders(ids.clone(), deadline).await {
            Ok(h) => h,
            Err(_) => return vec![(false, None); ids.len()],
        };
        let one = |(id, node): (DeviceId, Option<NodeId>)| async move {
            let Some(node) = node else { return (false, None) };
            let Ok(payload) = Self::encode(&id, DeviceMsg::Info {}) else { return (false, None) };
            match self.request_node(&node, payload, deadline).await {
                Ok(Reply::Info { last_state }) => (true, last_state.and_then(|s| b64::decode(&s).ok())),
                _ => (false, None),
            }
        };
        futures_util::stream::iter(ids.into_iter().zip(holders)).map(one).buffered(PRESENCE_PARALLEL).collect().await
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

/// A device link's directory entry; dropping it (the link ended) removes
/// the entry if it is still this link's.
pub struct DeviceClaim {
    cluster: Arc<Cluster>,
    id: DeviceId,
    link: u64,
    at_ms: u64,
    /// False when a newer link of the device on this node had replaced this
    /// one before it was recorded: then there is nothing of it to remove.
    recorded: bool,
}

impl Drop for DeviceClaim {
    fn drop(&mut self) {
        if !self.recorded {
            return;
        }
        let c = &self.cluster;
        let newer_here = {
            let mut links = c.lock_links();
            match links.get(&self.id) {
                Some(l) if l.link == self.link => {
                    links.remove(&self.id);
                    false
                }
                // A newer link of the device on this node owns the entry
                // now (it replaced this one in the router, then recorded
                // itself), possibly within the same millisecond.
                Some(_) => true,
                // This link gave way to a newer one elsewhere.
                None => false,
            }
        };
        if newer_here {
            return;
        }
        // Removed only if still exactly this link's entry, so a newer link
        // elsewhere keeps its own. A short task, gone once the row is; if
        // the runtime is shutting down, `finish` removes the node's rows.
        let (store, id) = (c.store.clone(), self.id.clone());
        let entry = LinkEntry { node: c.node.0.clone(), at_ms: self.at_ms };
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = store.release_link(id, entry).await {
                    tracing::warn!(error = %e, "could not remove an ended link from the device directory");
                }
            });
        }
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
            Some(c) => matches!(c.request(id, DeviceMsg::Info {}, QUICK_TIMEOUT).await, Ok(Reply::Info { .. })),
            None => false,
        }
    }

    /// For each device: whether it is online, and the newest state report
    /// its link has seen.
    pub(crate) async fn device_presence(&self, ids: &[DeviceId]) -> Vec<(bool, Option<Vec<u8>>)> {
        let mut found: Vec<(bool, Option<Vec<u8>>)> =
            ids.iter().map(|id| if self.router.is_online(id) { (true, self.router.last_state(id)) } else { (false, None) }).collect();
        let Some(c) = &self.cluster else { return found };
        // The others may be on other nodes: one directory query for all.
        let (at, remote): (Vec<usize>, Vec<DeviceId>) =
            ids.iter().enumerate().filter(|(i, _)| !found[*i].0).map(|(i, id)| (i, id.clone())).unzip();
        if remote.is_empty() {
            return found;
        }
        for (i, presence) in at.into_iter().zip(c.presence(remote).await) {
            found[i] = presence;
        }
        found
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
                let outcome = match c.request(id, DeviceMsg::Command { envelope, wait: true }, wait).await {
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
                match c.request(id, DeviceMsg::Command { envelope, wait: false }, QUICK_TIMEOUT).await {
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
                match c.request(id, DeviceMsg::Pair { request }, PAIR_TIMEOUT + REMOTE_MARGIN).await? {
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
    use crate::store::tests::PgSchema;

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
        let r = Reply::Failed { error: Failure::Offline };
        let back: Reply = serde_json::from_slice(&serde_json::to_vec(&r).unwrap()).unwrap();
        assert!(matches!(back, Reply::Failed { error: Failure::Offline }));
        let id = DeviceId::random();
        let bytes = Cluster::encode(&id, DeviceMsg::Info {}).unwrap();
        let back: NodeMsg = serde_json::from_slice(&bytes).unwrap();
        assert!(back.device == id && matches!(back.msg, DeviceMsg::Info {}));
        let extra = format!(r#"{{"device":"{id}","msg":{{"type":"info"}},"x":1}}"#);
        assert!(serde_json::from_str::<NodeMsg>(&extra).is_err());
        assert!(serde_json::from_str::<NodeMsg>(r#"{"device":"../x","msg":{"type":"info"}}"#).is_err());
        let big = DeviceMsg::Command { envelope: vec![0; MAX_MESSAGE], wait: true };
        assert_eq!(Cluster::encode(&id, big).unwrap_err(), RouteError::TooLarge);
    }

    // ---- several nodes on the test PostgreSQL and NATS ----

    /// Nodes `n0`, `n1`, … of one cluster: a schema and a subject prefix of
    /// their own, so tests running at once never see each other.
    struct TestCluster {
        nodes: Vec<Arc<Cluster>>,
        store: Store,
        stop: watch::Sender<bool>,
        _schema: PgSchema,
    }

    impl TestCluster {
        async fn start(test: &str, n: usize) -> Option<Self> {
            let (Ok(base), Ok(nats)) = (std::env::var("HEARTH_TEST_POSTGRES"), std::env::var("HEARTH_TEST_NATS")) else {
                println!("skipping {test}: HEARTH_TEST_POSTGRES or HEARTH_TEST_NATS is unset");
                return None;
            };
            let (schema, url) = PgSchema::create(base).await;
            let store = Store::connect(&url).await.unwrap();
            let prefix: SubjectPrefix = format!("t{}", hex::encode(rand::random::<[u8; 8]>())).parse().unwrap();
            let (stop, stop_rx) = watch::channel(false);
            let mut nodes = Vec::new();
            for i in 0..n {
                let config =
                    ClusterConfig { nats_url: nats.clone(), node_id: format!("n{i}").parse().unwrap(), subject_prefix: prefix.clone() };
                nodes.push(Cluster::start(&config, store.clone(), Metrics::new(), stop_rx.clone()).await.unwrap());
            }
            Some(Self { nodes, store, stop, _schema: schema })
        }

        async fn holder(&self, id: &DeviceId) -> Option<String> {
            self.store.link_holders(vec![id.clone()]).await.unwrap().pop().flatten()
        }
    }

    /// A device link registered in a node's router, as `device_link` does.
    fn link(node: &Cluster, id: &DeviceId) -> crate::router::LinkHandle<Vec<u8>> {
        node.router.add_device(id, crate::router::DeviceInfo { owner: None, setup_lookup: None, members: Vec::new() })
    }

    /// `from` queues a command for `id`, and the device's link `to` gets it.
    async fn command_reaches(from: &Cluster, id: &DeviceId, to: &mut crate::router::LinkHandle<Vec<u8>>, sent: Vec<u8>) {
        let queued = from.request(id, DeviceMsg::Command { envelope: sent.clone(), wait: false }, QUICK_TIMEOUT).await;
        assert!(matches!(queued, Ok(Reply::Queued)), "{queued:?}");
        let frame = tokio::time::timeout(Duration::from_secs(2), to.rx.recv()).await.unwrap().unwrap();
        assert!(matches!(
            hearth_proto::link::decode_frame::<CloudFrame>(&frame).unwrap(),
            Some((CloudFrame::Command { envelope }, _)) if envelope == sent
        ));
    }

    async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !check() {
            assert!(Instant::now() < deadline, "not within 5 s: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_reaches_the_node_the_directory_names_after_the_device_moved() {
        let Some(t) = TestCluster::start("a_request_reaches_the_node_the_directory_names_after_the_device_moved", 3).await
        else {
            return;
        };
        let (a, b, c) = (&t.nodes[0], &t.nodes[1], &t.nodes[2]);
        let id = DeviceId::random();
        // The directory names a node that died holding the device: nobody
        // answers on its subject, which means offline, at once.
        t.store.claim_link(id.clone(), LinkEntry { node: "gone".into(), at_ms: now_ms() - 60_000 }).await.unwrap();
        let asked = Instant::now();
        assert_eq!(c.request(&id, DeviceMsg::Info {}, QUICK_TIMEOUT).await.unwrap_err(), RouteError::Offline);
        assert!(asked.elapsed() < QUICK_TIMEOUT, "offline took {:?}", asked.elapsed());

        // The device links to a: its entry replaces the dead node's.
        let ha = link(a, &id);
        let _ga = a.device_up(&id, ha.link).await;
        assert_eq!(t.holder(&id).await.as_deref(), Some("n0"));
        assert!(matches!(c.request(&id, DeviceMsg::Info {}, QUICK_TIMEOUT).await, Ok(Reply::Info { .. })));

        // It moves to b: a hears the claim and drops its older link, and a
        // command from c reaches the device on b.
        let mut hb = link(b, &id);
        let _gb = b.device_up(&id, hb.link).await;
        eventually("a drops its older link", || a.router.device_link(&id).is_none()).await;
        assert_eq!(t.holder(&id).await.as_deref(), Some("n1"));
        command_reaches(c, &id, &mut hb, vec![7; 100]).await;

        // A node asked about a device it does not hold says so at once
        // rather than leaving the requester to its deadline.
        let asked = Instant::now();
        let payload = Cluster::encode(&id, DeviceMsg::Info {}).unwrap();
        assert_eq!(c.request_node(&a.node, payload, Instant::now() + QUICK_TIMEOUT).await.unwrap_err(), RouteError::Offline);
        assert!(asked.elapsed() < Duration::from_secs(1), "took {:?}", asked.elapsed());

        // A listing asks the directory once and each holder for the rest.
        let absent = DeviceId::random();
        let on_c = DeviceId::random();
        let hc = link(c, &on_c);
        let _gc = c.device_up(&on_c, hc.link).await;
        let presence = a.presence(vec![id.clone(), absent, on_c]).await;
        assert_eq!(presence.iter().map(|p| p.0).collect::<Vec<_>>(), [true, false, true]);
    }

    /// ADR 0017: the holder a node read is asked again without reading the
    /// directory; when it is out of date, the old holder says so and the
    /// directory is read once more.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_recent_holder_is_asked_without_the_directory_and_a_stale_one_costs_one_more_read() {
        let Some(t) =
            TestCluster::start("a_recent_holder_is_asked_without_the_directory_and_a_stale_one_costs_one_more_read", 3).await
        else {
            return;
        };
        let (a, b, c) = (&t.nodes[0], &t.nodes[1], &t.nodes[2]);
        let id = DeviceId::random();
        let ha = link(a, &id);
        let _ga = a.device_up(&id, ha.link).await;
        assert!(matches!(c.request(&id, DeviceMsg::Info {}, QUICK_TIMEOUT).await, Ok(Reply::Info { .. })));
        assert_eq!(c.recent_holders.get(&id, Instant::now()), Some(a.node.clone()));

        // With the directory emptied behind its back, c still reaches the
        // device: it did not read the directory.
        let entry = a.lock_links().get(&id).copied().unwrap();
        assert_eq!(t.store.release_node_links("n0".into()).await.unwrap(), 1);
        assert!(matches!(c.request(&id, DeviceMsg::Info {}, QUICK_TIMEOUT).await, Ok(Reply::Info { .. })));
        // Put the entry back, so b's claim below replaces it and tells a.
        t.store.claim_link(id.clone(), LinkEntry { node: "n0".into(), at_ms: entry.at_ms }).await.unwrap();

        // The device moves to b (a drops its link on b's claim). c's copy
        // still names a, which answers "offline"; c reads the directory
        // once more and the command reaches the device on b, once.
        let mut hb = link(b, &id);
        let _gb = b.device_up(&id, hb.link).await;
        eventually("a drops its older link", || a.router.device_link(&id).is_none()).await;
        assert_eq!(c.recent_holders.get(&id, Instant::now()), Some(a.node.clone()), "the copy is meant to be stale here");
        command_reaches(c, &id, &mut hb, vec![9; 10]).await;
        assert!(hb.rx.try_recv().is_err(), "the command was delivered twice");
        assert_eq!(c.recent_holders.get(&id, Instant::now()), Some(b.node.clone()));

        // The link ends: b says "offline", the directory has no entry, and
        // c keeps no copy.
        b.router.remove_device(&id, hb.link);
        assert_eq!(c.request(&id, DeviceMsg::Info {}, QUICK_TIMEOUT).await.unwrap_err(), RouteError::Offline);
        assert_eq!(c.recent_holders.get(&id, Instant::now()), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stale_claim_does_not_drop_a_newer_link() {
        let Some(t) = TestCluster::start("a_stale_claim_does_not_drop_a_newer_link", 2).await else { return };
        let (a, b) = (&t.nodes[0], &t.nodes[1]);
        let id = DeviceId::random();
        let hb = link(b, &id);
        let _gb = b.device_up(&id, hb.link).await;
        // An older link of the device is recorded on a only now (its node
        // was slow): the directory keeps b's entry and a's link gives way.
        let ha = link(a, &id);
        let _ga = a.device_up_at(&id, ha.link, now_ms() - 5_000).await;
        assert_eq!(a.router.device_link(&id), None, "the older link stays on a");
        assert_eq!(t.holder(&id).await.as_deref(), Some("n1"));
        // An older link's claim reaching b changes nothing there. NATS keeps
        // one publisher's order, so once the request after it is answered,
        // b has handled the claim.
        a.send(&b.node, &id, DeviceMsg::Claim { node: "n0".into(), at_ms: now_ms() - 5_000 }).await;
        assert!(matches!(a.request(&id, DeviceMsg::Info {}, QUICK_TIMEOUT).await, Ok(Reply::Info { .. })));
        assert_eq!(b.router.device_link(&id), Some(hb.link), "a stale claim dropped the newer link");
        // A newer one does.
        a.send(&b.node, &id, DeviceMsg::Claim { node: "n0".into(), at_ms: now_ms() + 1_000 }).await;
        eventually("b drops its link for a newer claim", || b.router.device_link(&id).is_none()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_directory_entry_goes_with_the_link_that_made_it() {
        let Some(t) = TestCluster::start("the_directory_entry_goes_with_the_link_that_made_it", 2).await else { return };
        let (a, b) = (&t.nodes[0], &t.nodes[1]);
        let id = DeviceId::random();
        // Two links of the device on a within one millisecond, the second
        // replacing the first in the router: the first's end leaves the
        // second's entry.
        let at = now_ms();
        let h1 = link(a, &id);
        let g1 = a.device_up_at(&id, h1.link, at).await;
        let h2 = link(a, &id);
        let g2 = a.device_up_at(&id, h2.link, at).await;
        drop(g1);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(t.holder(&id).await.as_deref(), Some("n0"), "an older link's end removed the newer entry");
        // The device moves to b; a's link ends afterwards: b's entry stays.
        let hb = link(b, &id);
        let gb = b.device_up(&id, hb.link).await;
        drop(g2);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(t.holder(&id).await.as_deref(), Some("n1"), "an older link's end on another node removed the entry");
        // b's link ends: the entry goes, and asking is answered at once.
        b.router.remove_device(&id, hb.link);
        drop(gb);
        let deadline = Instant::now() + Duration::from_secs(5);
        while t.holder(&id).await.is_some() {
            assert!(Instant::now() < deadline, "the entry outlived its link");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(a.request(&id, DeviceMsg::Info {}, QUICK_TIMEOUT).await.unwrap_err(), RouteError::Offline);
        // A node that stops removes whatever entries it still has.
        let h = link(a, &id);
        let _g = a.device_up(&id, h.link).await;
        t.stop.send_replace(true);
        tokio::time::timeout(Duration::from_secs(10), a.finish()).await.expect("the node did not stop");
        assert_eq!(t.holder(&id).await, None);
    }

    /// Security review: two links of one device registering on one node at
    /// once, the older one's directory step running last. It must neither
    /// take the node's bookkeeping from the newer link nor remove its entry.
    #[tokio::test]
    async fn a_link_replaced_before_it_was_recorded_records_nothing() {
        let Some(t) = TestCluster::start("a_link_replaced_before_it_was_recorded_records_nothing", 1).await else { return };
        let a = &t.nodes[0];
        let id = DeviceId::random();
        let at = now_ms();
        let h1 = link(a, &id);
        let h2 = link(a, &id);
        let g2 = a.device_up_at(&id, h2.link, at).await;
        let g1 = a.device_up_at(&id, h1.link, at).await;
        assert!(!g1.recorded && g2.recorded);
        assert_eq!(a.lock_links().get(&id).map(|l| l.link), Some(h2.link), "the map names the router's link");
        drop(g1);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(t.holder(&id).await.as_deref(), Some("n0"), "the replaced link's end removed the newer entry");
        drop(g2);
    }
}
