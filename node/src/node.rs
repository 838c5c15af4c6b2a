//! The running node: an actor that owns the core (a cloneable handle, an `Action` enum with
//! oneshot replies, a private loop), and the `run` lifecycle that starts and stops it.

use crate::bundle::{BundleError, ExportReport, ImportReport};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::swarm::SwarmEvent;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::{PeerId, Swarm, request_response};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde_json::{Map, Value as Json};
use tidesync_proto::{NodeId, ObjectId, TypeName};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::Instrument;

use crate::config::{Config, Home, PeerConfig, write_atomic};
use crate::core::{Core, Feed, History, LocalWriteError, OpenError, ReadError, Status, WriteReply};
use crate::net::{
    Behaviour, BehaviourEvent, DIAL_TICK_MS, Fault, Frame, NetCounters, NetError, backoff_ms,
    build_swarm,
};
use crate::store::IdPage;
use crate::sync::{Outgoing, SyncError};

/// Requests that may wait in the node's queue before callers are made to wait.
pub const ACTION_QUEUE_LEN: usize = 256;
/// Longest a change-feed request may long-poll, in seconds.
pub const MAX_FEED_WAIT_SECS: u64 = 60;

type Reply<T> = oneshot::Sender<T>;

/// What the node can be asked to do.
enum Action {
    Put {
        ty: TypeName,
        id: ObjectId,
        fields: Map<String, Json>,
        reply: Reply<Result<WriteReply, LocalWriteError>>,
    },
    PutMany {
        items: Vec<(TypeName, ObjectId, Map<String, Json>)>,
        reply: Reply<Result<Vec<WriteReply>, LocalWriteError>>,
    },
    Delete {
        ty: TypeName,
        id: ObjectId,
        reply: Reply<Result<WriteReply, LocalWriteError>>,
    },
    Get {
        ty: TypeName,
        id: ObjectId,
        reply: Reply<Result<Map<String, Json>, ReadError>>,
    },
    List {
        ty: TypeName,
        after: Option<String>,
        limit: usize,
        reply: Reply<Result<IdPage, ReadError>>,
    },
    History {
        ty: TypeName,
        id: ObjectId,
        reply: Reply<Result<History, ReadError>>,
    },
    Changes {
        since: u64,
        limit: usize,
        reply: Reply<Result<Feed, ReadError>>,
    },
    Status {
        reply: Reply<Result<Status, ReadError>>,
    },
    Held {
        query: crate::held::HeldQuery,
        reply: Reply<Result<crate::held::HeldReport, crate::held::HeldError>>,
    },
    Conflicts {
        reply: Reply<Result<Vec<crate::core::Conflict>, ReadError>>,
    },
    SetPeer {
        peer: Box<PeerConfig>,
        reply: Reply<Result<(), PeerError>>,
    },
    RemovePeer {
        name: String,
        reply: Reply<Result<(), PeerError>>,
    },
    ExportBundle {
        peer: String,
        all: bool,
        encrypt: bool,
        reply: Reply<Result<(Vec<u8>, ExportReport), BundleError>>,
    },
    ImportBundle {
        bytes: Vec<u8>,
        dry_run: bool,
        reply: Reply<Result<ImportReport, BundleError>>,
    },
}

/// Why a peer could not be added or removed.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Save(crate::config::ConfigError),
}

/// Why a request to the node actor failed. Each names the request.
#[derive(Debug, thiserror::Error)]
pub enum CallError<E> {
    #[error("the node is shutting down")]
    Stopped,
    #[error(transparent)]
    Failed(E),
}

/// A cloneable handle to the running node.
#[derive(Clone)]
pub struct NodeHandle {
    tx: mpsc::Sender<Action>,
    last_seq: watch::Receiver<u64>,
    info: Arc<NodeInfo>,
}

/// Facts about the node that never change while it runs.
#[derive(Debug)]
pub struct NodeInfo {
    pub node: NodeId,
    pub name: String,
}

impl NodeHandle {
    pub fn info(&self) -> &NodeInfo {
        &self.info
    }

    async fn call<T, E>(
        &self,
        make: impl FnOnce(Reply<Result<T, E>>) -> Action,
    ) -> Result<T, CallError<E>> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| CallError::Stopped)?;
        rx.await
            .map_err(|_| CallError::Stopped)?
            .map_err(CallError::Failed)
    }

    pub async fn put(
        &self,
        ty: TypeName,
        id: ObjectId,
        fields: Map<String, Json>,
    ) -> Result<WriteReply, CallError<LocalWriteError>> {
        self.call(|reply| Action::Put {
            ty,
            id,
            fields,
            reply,
        })
        .await
    }

    /// Put many objects in one transaction.
    pub async fn put_many(
        &self,
        items: Vec<(TypeName, ObjectId, Map<String, Json>)>,
    ) -> Result<Vec<WriteReply>, CallError<LocalWriteError>> {
        self.call(|reply| Action::PutMany { items, reply }).await
    }

    pub async fn delete(
        &self,
        ty: TypeName,
        id: ObjectId,
    ) -> Result<WriteReply, CallError<LocalWriteError>> {
        self.call(|reply| Action::Delete { ty, id, reply }).await
    }

    pub async fn get(
        &self,
        ty: TypeName,
        id: ObjectId,
    ) -> Result<Map<String, Json>, CallError<ReadError>> {
        self.call(|reply| Action::Get { ty, id, reply }).await
    }

    pub async fn list(
        &self,
        ty: TypeName,
        after: Option<String>,
        limit: usize,
    ) -> Result<IdPage, CallError<ReadError>> {
        self.call(|reply| Action::List {
            ty,
            after,
            limit,
            reply,
        })
        .await
    }

    pub async fn history(
        &self,
        ty: TypeName,
        id: ObjectId,
    ) -> Result<History, CallError<ReadError>> {
        self.call(|reply| Action::History { ty, id, reply }).await
    }

    /// List, or purge, held changes.
    pub async fn held(
        &self,
        query: crate::held::HeldQuery,
    ) -> Result<crate::held::HeldReport, CallError<crate::held::HeldError>> {
        self.call(|reply| Action::Held { query, reply }).await
    }

    pub async fn status(&self) -> Result<Status, CallError<ReadError>> {
        self.call(|reply| Action::Status { reply }).await
    }

    pub async fn conflicts(&self) -> Result<Vec<crate::core::Conflict>, CallError<ReadError>> {
        self.call(|reply| Action::Conflicts { reply }).await
    }

    /// A bundle for the configured peer `peer` (see [`Core::export_bundle`]).
    pub async fn export_bundle(
        &self,
        peer: String,
        all: bool,
        encrypt: bool,
    ) -> Result<(Vec<u8>, ExportReport), CallError<BundleError>> {
        self.call(|reply| Action::ExportBundle {
            peer,
            all,
            encrypt,
            reply,
        })
        .await
    }

    /// Import a bundle (see [`Core::import_bundle`]); what it adds is relayed to the peers.
    pub async fn import_bundle(
        &self,
        bytes: Vec<u8>,
        dry_run: bool,
    ) -> Result<ImportReport, CallError<BundleError>> {
        self.call(|reply| Action::ImportBundle {
            bytes,
            dry_run,
            reply,
        })
        .await
    }

    /// Add or replace a peer; saved to the config file and applied at once.
    pub async fn set_peer(&self, peer: PeerConfig) -> Result<(), CallError<PeerError>> {
        self.call(|reply| Action::SetPeer {
            peer: Box::new(peer),
            reply,
        })
        .await
    }

    /// Remove a peer; saved to the config file and its connection closed at once.
    pub async fn remove_peer(&self, name: String) -> Result<(), CallError<PeerError>> {
        self.call(|reply| Action::RemovePeer { name, reply }).await
    }

    /// The change feed after `since`. When it is empty and `wait` is non-zero, waits up to
    /// `wait` (capped at [`MAX_FEED_WAIT_SECS`]) for a new change before answering.
    pub async fn changes(
        &self,
        since: u64,
        limit: usize,
        wait: Duration,
    ) -> Result<Feed, CallError<ReadError>> {
        let mut last_seq = self.last_seq.clone();
        let wait = wait.min(Duration::from_secs(MAX_FEED_WAIT_SECS));
        if *last_seq.borrow_and_update() <= since && !wait.is_zero() {
            let _ = tokio::time::timeout(wait, last_seq.wait_for(|s| *s > since)).await;
        }
        self.call(|reply| Action::Changes {
            since,
            limit,
            reply,
        })
        .await
    }
}

/// A configured peer, as the running node tracks it.
struct PeerLink {
    config: PeerConfig,
    peer_id: PeerId,
    connected: bool,
    /// Redials since the last successful connection.
    attempt: u32,
    next_dial: Instant,
}

/// The actor's private state and loop: the core, the libp2p swarm and the configured peers.
struct NodeActor {
    core: Core,
    rx: mpsc::Receiver<Action>,
    last_seq: watch::Sender<u64>,
    swarm: Swarm<Behaviour>,
    home: Home,
    config: Config,
    links: HashMap<NodeId, PeerLink>,
    listen: Vec<String>,
    refused: u64,
    rng: StdRng,
    counters: Arc<NetCounters>,
}

impl NodeActor {
    async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_millis(DIAL_TICK_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                action = self.rx.recv() => match action {
                    Some(action) => self.on_action(action),
                    None => break,
                },
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                _ = tick.tick() => self.on_tick(),
                _ = shutdown.wait_for(|stop| *stop) => break,
            }
        }
        tracing::info!("node actor stopped");
    }

    /// Run one request against the core. redb calls block, so they run in place on this
    /// worker while the runtime moves other tasks elsewhere.
    fn on_action(&mut self, action: Action) {
        tokio::task::block_in_place(|| match action {
            Action::Put {
                ty,
                id,
                fields,
                reply,
            } => {
                let r = self.core.put(&ty, &id, &fields);
                self.after_write(&r);
                let _ = reply.send(r);
            }
            Action::PutMany { items, reply } => {
                let r = self.core.put_many(&items);
                let first = r
                    .as_ref()
                    .map(|rs| rs.iter().find(|w| w.seq.is_some()).cloned());
                match first {
                    Ok(Some(w)) => self.after_write(&Ok(w)),
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "batch write refused"),
                }
                let _ = reply.send(r);
            }
            Action::Delete { ty, id, reply } => {
                let r = self.core.delete(&ty, &id);
                self.after_write(&r);
                let _ = reply.send(r);
            }
            Action::Get { ty, id, reply } => {
                let _ = reply.send(self.core.get(&ty, &id));
            }
            Action::List {
                ty,
                after,
                limit,
                reply,
            } => {
                let _ = reply.send(self.core.list(&ty, after.as_deref(), limit));
            }
            Action::History { ty, id, reply } => {
                let _ = reply.send(self.core.history(&ty, &id));
            }
            Action::Changes {
                since,
                limit,
                reply,
            } => {
                let _ = reply.send(self.core.changes(since, limit));
            }
            Action::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Action::Held { query, reply } => {
                let _ = reply.send(crate::held::held(&self.core, &query));
            }
            Action::Conflicts { reply } => {
                let _ = reply.send(tokio::task::block_in_place(|| self.core.conflicts()));
            }
            Action::ExportBundle {
                peer,
                all,
                encrypt,
                reply,
            } => {
                let result = tokio::task::block_in_place(|| {
                    self.core.export_bundle(&peer, all, encrypt, &|_| {})
                });
                let _ = reply.send(result);
            }
            Action::ImportBundle {
                bytes,
                dry_run,
                reply,
            } => {
                let result = tokio::task::block_in_place(|| {
                    self.core.import_bundle(&bytes, dry_run, &|_, _| {})
                });
                if matches!(&result, Ok(r) if !r.dry_run && r.new_changes > 0) {
                    self.publish_seq();
                    let out = self.core.pump_all();
                    self.send_all(out);
                }
                let _ = reply.send(result);
            }
            Action::SetPeer { peer, reply } => {
                let _ = reply.send(self.set_peer(*peer));
            }
            Action::RemovePeer { name, reply } => {
                let _ = reply.send(self.remove_peer(&name));
            }
        });
    }

    fn status(&self) -> Result<Status, ReadError> {
        let mut status = self.core.status(&self.config.peers)?;
        status.listen = self.listen.clone();
        status.refused_connections = self.refused;
        status.net = self.counters.totals();
        Ok(status)
    }

    fn after_write(&mut self, result: &Result<WriteReply, LocalWriteError>) {
        match result {
            Ok(WriteReply { seq: Some(_), .. }) => {
                self.publish_seq();
                let out = self.core.pump_all();
                self.send_all(out);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "local write refused"),
        }
    }

    fn publish_seq(&self) {
        if let Ok(seq) = self.core.last_seq() {
            self.last_seq.send_if_modified(|s| {
                let changed = *s != seq;
                *s = seq;
                changed
            });
        }
    }

    fn send_all(&mut self, out: Result<Vec<Outgoing>, SyncError>) {
        match out {
            Ok(out) => {
                for (peer, msg) in out {
                    if let Some(link) = self.links.get(&peer) {
                        let peer_id = link.peer_id;
                        self.swarm
                            .behaviour_mut()
                            .sync
                            .send_request(&peer_id, Frame::Message(msg));
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "sync step failed"),
        }
    }

    /// Add or replace a configured peer, save the config, and apply it now.
    fn set_peer(&mut self, peer: PeerConfig) -> Result<(), PeerError> {
        let mut config = self.config.clone();
        config.set_peer(peer.clone()).map_err(PeerError::Invalid)?;
        config.save(&self.home).map_err(PeerError::Save)?;
        let id = peer.node_id().map_err(PeerError::Invalid)?;
        // A renamed or re-addressed peer keeps its connection; a replaced id drops the old one.
        let replaced: Vec<NodeId> = self
            .links
            .iter()
            .filter(|(nid, l)| l.config.name == peer.name && **nid != id)
            .map(|(nid, _)| *nid)
            .collect();
        for old in replaced {
            self.drop_link(&old);
        }
        self.config = config;
        let widened = match self
            .core
            .set_policy(id, peer.name.clone(), peer.policy.clone())
        {
            Ok(widened) => widened,
            Err(e) => {
                tracing::error!(peer = %id, error = %e, "could not record the policy change");
                false
            }
        };
        self.add_link(peer, id);
        tracing::info!(peer = %id, widened, "peer configured");
        if widened {
            let out = tokio::task::block_in_place(|| self.core.on_policy_widened(id));
            self.send_all(out);
        }
        Ok(())
    }

    fn remove_peer(&mut self, name: &str) -> Result<(), PeerError> {
        let mut config = self.config.clone();
        let removed = config.remove_peer(name).map_err(PeerError::Invalid)?;
        config.save(&self.home).map_err(PeerError::Save)?;
        self.config = config;
        if let Ok(id) = removed.node_id() {
            self.drop_link(&id);
            self.core.remove_policy(&id);
            tracing::info!(peer = %id, name, "peer removed");
        }
        Ok(())
    }

    fn add_link(&mut self, config: PeerConfig, id: NodeId) {
        let Some(peer_id) = id.to_peer_id() else {
            return;
        };
        self.swarm.behaviour_mut().allow.allow_peer(peer_id);
        let connected = self.swarm.is_connected(&peer_id);
        let link = self.links.entry(id).or_insert(PeerLink {
            config: config.clone(),
            peer_id,
            connected,
            attempt: 0,
            next_dial: Instant::now(),
        });
        link.config = config;
        link.next_dial = Instant::now();
        // Dial now rather than at the next tick.
        self.on_tick();
    }

    fn drop_link(&mut self, id: &NodeId) {
        if let Some(link) = self.links.remove(id) {
            self.swarm.behaviour_mut().allow.disallow_peer(link.peer_id);
            let _ = self.swarm.disconnect_peer_id(link.peer_id);
            self.core.on_disconnected(id);
        }
    }

    /// Dial the configured peers that are down and due.
    fn on_tick(&mut self) {
        let now = Instant::now();
        for link in self.links.values_mut() {
            if link.connected || link.config.addrs.is_empty() || link.next_dial > now {
                continue;
            }
            let delay = backoff_ms(link.attempt, &mut self.rng);
            link.attempt = link.attempt.saturating_add(1);
            link.next_dial = now + Duration::from_millis(delay);
            let opts = DialOpts::peer_id(link.peer_id)
                .addresses(link.config.addrs.clone())
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .build();
            if let Err(e) = self.swarm.dial(opts) {
                tracing::debug!(peer = %link.config.name, error = %e, "dial not started");
            }
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening for peers");
                self.listen.push(address.to_string());
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                num_established,
                ..
            } => {
                let Some(id) =
                    NodeId::from_peer_id(&peer_id).filter(|id| self.links.contains_key(id))
                else {
                    tracing::warn!(%peer_id, "closing a connection from a peer that is not configured");
                    let _ = self.swarm.disconnect_peer_id(peer_id);
                    return;
                };
                if let Some(link) = self.links.get_mut(&id) {
                    link.connected = true;
                    link.attempt = 0;
                }
                if num_established.get() == 1 {
                    tracing::info!(peer = %id, "peer connected");
                    let out = tokio::task::block_in_place(|| self.core.on_connected(id));
                    self.send_all(out);
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                cause,
                ..
            } => {
                if let Some(id) = NodeId::from_peer_id(&peer_id) {
                    self.core.on_disconnected(&id);
                    if let Some(link) = self.links.get_mut(&id) {
                        link.connected = false;
                        tracing::info!(peer = %id, cause = ?cause.map(|c| c.to_string()), "peer disconnected");
                    }
                }
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                ..
            } => {
                if matches!(error, libp2p::swarm::ListenError::Denied { .. }) {
                    self.refused += 1;
                }
                tracing::warn!(from = %send_back_addr, error = %error, "refused an incoming connection");
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(peer = ?peer_id, error = %error, "dial failed");
            }
            SwarmEvent::Behaviour(BehaviourEvent::Sync(event)) => self.on_sync_event(event),
            _ => {}
        }
    }

    /// Log a peer that broke the protocol and drop its connection; the node carries on.
    fn drop_bad_peer(&mut self, peer: PeerId, why: &str, detail: &str) {
        tracing::warn!(%peer, error = %detail, "dropping the connection to a peer that {why}");
        let _ = self.swarm.disconnect_peer_id(peer);
    }

    fn on_sync_event(&mut self, event: request_response::Event<Frame, Frame>) {
        use request_response::{Event, Message as Rr};
        match event {
            Event::Message { peer, message, .. } => {
                let Some(id) = NodeId::from_peer_id(&peer).filter(|id| self.links.contains_key(id))
                else {
                    let _ = self.swarm.disconnect_peer_id(peer);
                    return;
                };
                match message {
                    Rr::Request {
                        request: Frame::Message(request),
                        channel,
                        ..
                    } => match tokio::task::block_in_place(|| self.core.on_request(id, request)) {
                        Ok((response, out)) => {
                            let _ = self
                                .swarm
                                .behaviour_mut()
                                .sync
                                .send_response(channel, Frame::Message(response));
                            self.publish_seq();
                            self.send_all(Ok(out));
                        }
                        Err(e) => self.drop_bad_peer(peer, "broke the protocol", &e.to_string()),
                    },
                    Rr::Response {
                        response: Frame::Message(response),
                        ..
                    } => {
                        let out =
                            tokio::task::block_in_place(|| self.core.on_response(id, response));
                        self.send_all(out);
                    }
                    Rr::Request {
                        request: Frame::Bad(why),
                        ..
                    }
                    | Rr::Response {
                        response: Frame::Bad(why),
                        ..
                    } => {
                        self.drop_bad_peer(peer, "sent a bad frame", &why);
                    }
                }
            }
            Event::OutboundFailure { peer, error, .. } => {
                tracing::warn!(%peer, error = %error, "a request to the peer failed");
                if let Some(id) = NodeId::from_peer_id(&peer) {
                    let out = tokio::task::block_in_place(|| self.core.on_request_failed(id));
                    self.send_all(out);
                }
            }
            Event::InboundFailure { peer, error, .. } => {
                self.drop_bad_peer(peer, "failed a request", &error.to_string());
            }
            Event::ResponseSent { .. } => {}
        }
    }
}

/// Start the node actor over `core` and `swarm`. It stops when `shutdown` turns true or every
/// handle drops.
pub fn spawn(
    core: Core,
    swarm: Swarm<Behaviour>,
    home: Home,
    config: Config,
    counters: Arc<NetCounters>,
    shutdown: watch::Receiver<bool>,
) -> Result<(NodeHandle, tokio::task::JoinHandle<()>), ReadError> {
    let (tx, rx) = mpsc::channel(ACTION_QUEUE_LEN);
    let (last_seq_tx, last_seq) = watch::channel(core.last_seq()?);
    let info = Arc::new(NodeInfo {
        node: core.node_id(),
        name: core.name().to_string(),
    });
    let mut actor = NodeActor {
        core,
        rx,
        last_seq: last_seq_tx,
        swarm,
        home,
        config: config.clone(),
        links: HashMap::new(),
        listen: Vec::new(),
        refused: 0,
        rng: StdRng::from_rng(&mut rand::rng()),
        counters,
    };
    for peer in config.peers {
        if let Ok(id) = peer.node_id() {
            actor.add_link(peer, id);
        }
    }
    let task = tokio::spawn(actor.run(shutdown).in_current_span());
    Ok((NodeHandle { tx, last_seq, info }, task))
}

/// Why a node could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("another tidesync node is already running on {home}{api}")]
    AlreadyRunning {
        home: std::path::PathBuf,
        api: String,
    },
    #[error("cannot read the change log of {home}: {source}")]
    Read {
        home: std::path::PathBuf,
        source: ReadError,
    },
    #[error("cannot listen for the HTTP API on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot write {file}: {source}")]
    ApiFile {
        file: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("the HTTP API failed: {0}")]
    Serve(std::io::Error),
    #[error(
        "the node's actor stopped unexpectedly ({0}); the node exits rather than answer 503 for ever"
    )]
    ActorDied(String),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Token(#[from] crate::api::token::TokenError),
    #[error("cannot restrict access to {home}: {source}")]
    Restrict {
        home: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Run the node on `home` until Ctrl-C or SIGTERM.
pub async fn run(home: &Home) -> Result<(), RunError> {
    let mut config = Config::load(home).map_err(OpenError::from)?;
    let core = match Core::open(home, true) {
        Ok(core) => core,
        Err(OpenError::Store(crate::store::StoreError::InUse { .. })) => {
            let api = std::fs::read_to_string(home.api_file())
                .map(|a| format!(" (its API is at {})", a.trim()))
                .unwrap_or_default();
            return Err(RunError::AlreadyRunning {
                home: home.dir.clone(),
                api,
            });
        }
        Err(e) => return Err(e.into()),
    };
    let span = tracing::info_span!("node", name = %config.name, id = %core.node_id().short());
    async move {
        let token = crate::api::prepare_home(home, &mut config)?;
        let mut core = core;
        let fault = Fault::from_env();
        if fault != Fault::None {
            tracing::warn!(
                ?fault,
                "TEST FAULT ENABLED: this node misbehaves on purpose"
            );
        }
        core.faults.alter_relayed = fault == Fault::AlterRelayed;
        if fault == Fault::IgnorePolicy {
            core.policies.ignore_own();
        }
        let counters = Arc::new(NetCounters::default());
        let mut swarm = build_swarm(core.engine.identity(), fault, Arc::clone(&counters))?;
        for addr in &config.listen {
            swarm
                .listen_on(addr.clone())
                .map_err(|e| NetError::Listen {
                    addr: addr.clone(),
                    detail: e.to_string(),
                })?;
        }
        let (stop_tx, stop_rx) = watch::channel(false);
        let (handle, actor) = spawn(
            core,
            swarm,
            home.clone(),
            config.clone(),
            counters,
            stop_rx.clone(),
        )
        .map_err(|source| RunError::Read {
            home: home.dir.clone(),
            source,
        })?;
        let listener = tokio::net::TcpListener::bind(config.api.listen)
            .await
            .map_err(|source| RunError::Bind {
                addr: config.api.listen,
                source,
            })?;
        let bound = listener.local_addr().map_err(|source| RunError::Bind {
            addr: config.api.listen,
            source,
        })?;
        write_atomic(&home.api_file(), format!("{bound}\n").as_bytes(), 0o600).map_err(
            |source| RunError::ApiFile {
                file: home.api_file(),
                source,
            },
        )?;
        tracing::info!(node = %handle.info().node, api = %bound, "node running");

        let signals = shutdown_signal().map_err(RunError::Signals)?;
        let guard = crate::api::Guard::new(bound, &config.api.hosts, token);
        let app = crate::api::router(handle.clone(), guard, home.dir.clone());
        let served = crate::api::serve(listener, app, stop_rx.clone());
        let served = tokio::spawn(served.in_current_span());
        // The actor is supervised: should it ever stop before we ask it to (a panic that
        // escaped every guard), the process logs why and exits non-zero, rather than keep
        // an API that answers 503 to everything. Its store is released only as the
        // process ends.
        let mut actor = actor;
        let died = tokio::select! {
            _ = signals => None,
            ended = &mut actor => Some(match ended {
                Err(e) if e.is_panic() => {
                    let panic = e.into_panic();
                    panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .map(|m| format!("it panicked: {m}"))
                        .unwrap_or_else(|| "it panicked".to_string())
                }
                Err(e) => format!("it was cancelled: {e}"),
                Ok(()) => "it returned".to_string(),
            }),
        };
        if let Some(why) = &died {
            tracing::error!(reason = %why, "the node's actor stopped; exiting");
        } else {
            tracing::info!("stopping");
        }
        let _ = stop_tx.send(true);
        if let Some(why) = died {
            served.abort();
            let _ = std::fs::remove_file(home.api_file());
            return Err(RunError::ActorDied(why));
        }
        let served = served.await;
        let _ = actor.await;
        let _ = std::fs::remove_file(home.api_file());
        tracing::info!("stopped");
        match served {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(RunError::Serve(e)),
            Err(e) => Err(RunError::Serve(std::io::Error::other(e))),
        }
    }
    .instrument(span)
    .await
}

/// Resolves on Ctrl-C or SIGTERM.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    })
}
