//! The node actor that owns the core (a cloneable handle, an `Action` enum with oneshot
//! replies, a private loop) beside the network actor, and the reads its handle answers off
//! both.

use crate::bundle::{BundleError, ExportReport, ImportReport};
use std::sync::Arc;
use std::time::Duration;

use libp2p::Swarm;
use serde_json::{Map, Value as Json};
use tidesync_proto::{NodeId, ObjectId, TypeName};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::Instrument;

use crate::config::{Config, Home, PeerConfig};
use crate::core::{Core, Feed, History, LocalWriteError, PeerError, ReadError, Status, WriteReply};
use crate::net::{Behaviour, NetCounters};
use crate::netloop::{NetActor, NetCommand, NetEvent, NetState};
use crate::reads::{Reads, Sessions};
use crate::store::IdPage;
use crate::sync::SyncError;

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
    Held {
        query: crate::held::HeldQuery,
        reply: Reply<Result<crate::held::HeldReport, crate::held::HeldError>>,
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

/// Why a request to the node actor failed. Each names the request.
#[derive(Debug, thiserror::Error)]
pub enum CallError<E> {
    #[error("the node is shutting down")]
    Stopped,
    #[error(transparent)]
    Failed(E),
}

/// A cloneable handle to the running node. Writes, peers and bundles go to the node actor;
/// reads are answered from the store's last commit on a blocking thread, so they never wait
/// for a batch the actor is storing.
#[derive(Clone)]
pub struct NodeHandle {
    tx: mpsc::Sender<Action>,
    last_seq: watch::Receiver<u64>,
    info: Arc<NodeInfo>,
    reads: Reads,
    live: watch::Receiver<Arc<Live>>,
    net: watch::Receiver<NetState>,
    counters: Arc<NetCounters>,
}

/// Facts about the node that never change while it runs.
#[derive(Debug)]
pub struct NodeInfo {
    pub node: NodeId,
    pub name: String,
}

/// What the node actor publishes after each step for status: the configured peers and the
/// connected ones' sessions.
#[derive(Debug, Default)]
struct Live {
    peers: Vec<PeerConfig>,
    sessions: Sessions,
}

impl NodeHandle {
    /// The store files are added to and read from: file bytes never pass through the actor.
    pub fn file_store(&self) -> &crate::store::Store {
        self.reads.store()
    }

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

    /// Run a read against the store's last commit, off the node actor.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Reads) -> Result<T, ReadError> + Send + 'static,
    ) -> Result<T, CallError<ReadError>> {
        let reads = self.reads.clone();
        tokio::task::spawn_blocking(move || f(&reads))
            .await
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
        self.read(move |v| v.get(&ty, &id)).await
    }

    pub async fn list(
        &self,
        ty: TypeName,
        after: Option<String>,
        limit: usize,
    ) -> Result<IdPage, CallError<ReadError>> {
        self.read(move |v| v.list(&ty, after.as_deref(), limit))
            .await
    }

    pub async fn history(
        &self,
        ty: TypeName,
        id: ObjectId,
    ) -> Result<History, CallError<ReadError>> {
        self.read(move |v| v.history(&ty, &id)).await
    }

    /// List, or purge, held changes.
    pub async fn held(
        &self,
        query: crate::held::HeldQuery,
    ) -> Result<crate::held::HeldReport, CallError<crate::held::HeldError>> {
        self.call(|reply| Action::Held { query, reply }).await
    }

    /// The node's status: the store's counts as last committed, the sessions as the node
    /// actor last published them, and the network's counters.
    pub async fn status(&self) -> Result<Status, CallError<ReadError>> {
        let live = Arc::clone(&self.live.borrow());
        let mut status = self
            .read(move |v| v.status(&live.peers, &live.sessions))
            .await?;
        let net = self.net.borrow().clone();
        status.listen = net.listen;
        status.refused_connections = net.refused;
        status.net = self.counters.totals();
        Ok(status)
    }

    pub async fn conflicts(&self) -> Result<Vec<crate::core::Conflict>, CallError<ReadError>> {
        self.read(|v| v.conflicts()).await
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
        self.read(move |v| v.changes(since, limit)).await
    }
}

/// The node actor's private state and loop: the core, the config and the ends of the
/// network actor (which owns the swarm).
struct NodeActor {
    core: Core,
    rx: mpsc::Receiver<Action>,
    last_seq: watch::Sender<u64>,
    live: watch::Sender<Arc<Live>>,
    home: Home,
    /// The node's config: its peers are the one registry of who may sync with us.
    config: Config,
    net: mpsc::Sender<NetCommand>,
    events: mpsc::Receiver<NetEvent>,
    /// What the current step asks of the network actor, sent when the step ends.
    out: Vec<NetCommand>,
}

impl NodeActor {
    async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                action = self.rx.recv() => match action {
                    Some(action) => tokio::task::block_in_place(|| self.on_action(action)),
                    None => break,
                },
                event = self.events.recv() => match event {
                    Some(event) => tokio::task::block_in_place(|| self.on_net_event(event)),
                    None => break,
                },
                _ = shutdown.wait_for(|stop| *stop) => break,
            }
            self.drain_outbox();
            self.publish_live();
            for command in std::mem::take(&mut self.out) {
                if self.net.send(command).await.is_err() {
                    break;
                }
            }
        }
        tracing::info!("node actor stopped");
    }

    /// Run one request against the core. redb calls block, so they run in place on this
    /// worker (the caller wraps this in `block_in_place`) while the runtime moves other tasks
    /// elsewhere.
    fn on_action(&mut self, action: Action) {
        match action {
            Action::Put {
                ty,
                id,
                fields,
                reply,
            } => {
                let r = self.core.put(&ty, &id, &fields);
                log_refused(&r);
                let _ = reply.send(r);
            }
            Action::PutMany { items, reply } => {
                let r = self.core.put_many(&items);
                log_refused(&r);
                let _ = reply.send(r);
            }
            Action::Delete { ty, id, reply } => {
                let r = self.core.delete(&ty, &id);
                log_refused(&r);
                let _ = reply.send(r);
            }
            Action::Held { query, reply } => {
                let _ = reply.send(crate::held::held(&self.core, &query));
            }
            Action::ExportBundle {
                peer,
                all,
                encrypt,
                reply,
            } => {
                let _ = reply.send(self.core.export_bundle(&peer, all, encrypt, &|_| {}));
            }
            Action::ImportBundle {
                bytes,
                dry_run,
                reply,
            } => {
                let result = self.core.import_bundle(&bytes, dry_run, &|_, _| {});
                let _ = reply.send(result);
            }
            Action::SetPeer { peer, reply } => {
                let _ = reply.send(self.set_peer(*peer));
            }
            Action::RemovePeer { name, reply } => {
                let _ = reply.send(self.remove_peer(&name));
            }
        }
    }

    /// Publish what status shows of the sessions, when it changed.
    fn publish_live(&self) {
        let sessions = self.core.session_summaries();
        self.live.send_if_modified(|live| {
            if live.sessions == sessions && live.peers == self.config.peers {
                return false;
            }
            *live = Arc::new(Live {
                peers: self.config.peers.clone(),
                sessions,
            });
            true
        });
    }

    /// Whether `peer` is a configured peer.
    fn is_configured(&self, peer: &NodeId) -> bool {
        self.config.peers.iter().any(|p| p.id == *peer)
    }

    /// Hand the network actor what the core's last step left to send, and publish the new
    /// tip of our log if a commit moved it.
    fn drain_outbox(&mut self) {
        let outbox = self.core.take_outbox();
        if !outbox.sends.is_empty() {
            self.out.push(NetCommand::Send(outbox.sends));
        }
        if let Some(tip) = outbox.tip {
            self.last_seq.send_if_modified(|s| {
                let changed = *s != tip;
                *s = tip;
                changed
            });
        }
    }

    /// Add or replace a configured peer and apply it now (see [`Core::set_peer`]); a peer of
    /// that name under another id loses its link.
    fn set_peer(&mut self, peer: PeerConfig) -> Result<(), PeerError> {
        let id = peer.id;
        let applied = self
            .core
            .set_peer(&self.home, &mut self.config, peer.clone())?;
        for old in &applied.revoked {
            self.drop_link(*old);
        }
        let widened = applied.widened;
        self.out.push(NetCommand::SetLink {
            id,
            config: Box::new(peer),
        });
        tracing::info!(peer = %id, widened, "peer configured");
        Ok(())
    }

    fn remove_peer(&mut self, name: &str) -> Result<(), PeerError> {
        let removed = self.core.remove_peer(&self.home, &mut self.config, name)?;
        self.drop_link(removed.id);
        tracing::info!(peer = %removed.id, name, "peer removed");
        Ok(())
    }

    fn drop_link(&mut self, id: NodeId) {
        self.core.on_disconnected(&id);
        self.out.push(NetCommand::DropLink(id));
    }

    /// Sync traffic and connection changes, in the order the network actor saw them.
    fn on_net_event(&mut self, event: NetEvent) {
        match event {
            NetEvent::Connected(peer) if self.is_configured(&peer) => {
                log_failed_step(self.core.on_connected(peer));
            }
            NetEvent::Connected(_) => {}
            NetEvent::Disconnected(peer) => self.core.on_disconnected(&peer),
            NetEvent::Request { peer, id, msg } => {
                if !self.is_configured(&peer) {
                    self.out.push(NetCommand::Disconnect {
                        peer,
                        id: Some(id),
                        why: "it is no longer configured".into(),
                    });
                    return;
                }
                match self.core.on_request(peer, msg) {
                    Ok(response) => self.out.push(NetCommand::Respond { id, msg: response }),
                    Err(e) if e.blames_peer() => self.out.push(NetCommand::Disconnect {
                        peer,
                        id: Some(id),
                        why: e.to_string(),
                    }),
                    Err(e) => {
                        tracing::error!(%peer, error = %e, "could not take a request from the peer; it is left unanswered, and the peer sends it again");
                        self.out.push(NetCommand::Abandon { id });
                    }
                }
            }
            NetEvent::Response { peer, msg } if self.is_configured(&peer) => {
                log_failed_step(self.core.on_response(peer, msg));
            }
            NetEvent::Response { .. } => {}
            NetEvent::RequestFailed(peer) => {
                log_failed_step(self.core.on_request_failed(peer));
            }
        }
    }
}

/// Log a local write the core refused.
fn log_refused<T>(result: &Result<T, LocalWriteError>) {
    if let Err(e) = result {
        tracing::warn!(error = %e, "local write refused");
    }
}

/// Log a sync step that failed on our side; the peer is not blamed and stays connected.
fn log_failed_step(result: Result<(), SyncError>) {
    if let Err(e) = result {
        tracing::error!(error = %e, "sync step failed");
    }
}

/// Start the node actor over `core` and the network actor over `swarm`. Both stop when
/// `shutdown` turns true or every handle drops.
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
    let (live_tx, live) = watch::channel(Arc::new(Live {
        peers: config.peers.clone(),
        sessions: Sessions::new(),
    }));
    let info = Arc::new(NodeInfo {
        node: core.node_id(),
        name: core.name().to_string(),
    });
    let peers: Vec<(NodeId, PeerConfig)> = config.peers.iter().map(|p| (p.id, p.clone())).collect();
    let (net_actor, ends) = NetActor::new(swarm, &peers);
    let handle = NodeHandle {
        tx,
        last_seq,
        info,
        reads: core.reads(),
        live,
        net: ends.state,
        counters,
    };
    let actor = NodeActor {
        core,
        rx,
        last_seq: last_seq_tx,
        live: live_tx,
        home,
        config,
        net: ends.commands,
        events: ends.events,
        out: Vec::new(),
    };
    let net_task = tokio::spawn(net_actor.run(shutdown.clone()).in_current_span());
    let task = tokio::spawn(
        async move {
            actor.run(shutdown).await;
            let _ = net_task.await;
        }
        .in_current_span(),
    );
    Ok((handle, task))
}
