//! The node actor that owns the core (a cloneable handle, an `Action` enum with oneshot
//! replies, a private loop) beside the network actor, and the reads its handle answers off
//! both. Its file work is in [`files`](mod@files), what it measures in [`observe`], its
//! status record for the fleet view in [`fleet`](mod@fleet); [`handle`] holds `NodeHandle`'s
//! methods; [`check`] verifies a peer's batch before the actor takes it.

mod check;
mod files;
mod fleet;
mod handle;
mod observe;
mod writes;

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
use crate::files::FileHash;
use crate::net::{Behaviour, NetCounters};
use crate::netloop::{NetActor, NetCommand, NetEvent, NetState};
use crate::reads::{Reads, Sessions};
use crate::store::{FileError, IdPage};
use crate::sync::SyncError;
use crate::sync::fetch::Outcome;
use tidesync_proto::files::{FileAnswer, FileAsk};

/// Requests that may wait in the node's queue before callers are made to wait.
pub const ACTION_QUEUE_LEN: usize = 256;
/// Most local puts and deletes waiting in the action queue that the actor commits together,
/// in one durable transaction (group commit).
pub const MAX_GROUP_WRITES: usize = 256;
/// Longest the node actor's runtime waits, once the actor has stopped, for its file work
/// under way (a segment being decoded or served) before it is let go, in seconds.
pub const ACTOR_SHUTDOWN_SECS: u64 = 10;
/// Longest a change-feed request may long-poll, in seconds.
pub const MAX_FEED_WAIT_SECS: u64 = 60;
/// Results of file work done off the actor (segments decoded or served, files moved into
/// place) that may wait for the actor.
pub const FILE_RESULT_QUEUE_LEN: usize = 256;
/// Segments encoded for peers at once; an ask beyond it is answered `Busy`.
pub const MAX_FILE_SERVES: usize = 16;
/// How often downloads are planned again (retries come due) and their progress saved, in
/// milliseconds.
pub const FILE_TICK_MS: u64 = 500;
/// Every this many file ticks the downloads are checked against the stored want-list (a file
/// stored by an upload, or no longer referenced, stops being fetched).
pub const WANTS_RECONCILE_TICKS: u64 = 4;
/// Reads waiting for one on-demand file at once.
pub const MAX_FILE_WAITERS: usize = 64;

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
    /// `tidesync sync --now`: open a peer's gate until it is in sync.
    SyncNow {
        name: String,
        reply: Reply<Result<(), PeerError>>,
    },
    /// Answer at once: the actor's loop is turning (readiness).
    Ping { reply: Reply<Result<(), ReadError>> },
    Resolve {
        ty: TypeName,
        id: ObjectId,
        path: String,
        pick: String,
        reply: Reply<Result<WriteReply, LocalWriteError>>,
    },
    Rename {
        ty: TypeName,
        id: ObjectId,
        to: String,
        reply: Reply<Result<crate::core::RenameReply, crate::core::RenameError>>,
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
    Plan {
        peer: String,
        all: bool,
        reply: Reply<Result<crate::replica::plan::Plan, crate::replica::plan::PlanError>>,
    },
    /// The reply is the report, once the body is gathered; the bundle is then written to
    /// `out` off the actor, and `done` told how that ended.
    ExportBundle {
        peer: String,
        all: bool,
        encrypt: bool,
        files: bool,
        out: BundleSink,
        done: Box<dyn FnOnce(Result<(), BundleError>) + Send>,
        reply: Reply<Result<ExportReport, BundleError>>,
    },
    /// The records are imported on the actor, the files off it; the reply comes at the end.
    ImportBundle {
        src: Box<dyn std::io::Read + Send>,
        dry_run: bool,
        reply: Reply<Result<ImportReport, BundleError>>,
    },
    /// Fetch a wanted file now; the reply comes when it is stored (true), or at once (false)
    /// when it is not wanted.
    FetchFile { hash: FileHash, reply: Reply<bool> },
}

/// Where a bundle exported by a running node is written.
pub type BundleSink = Box<dyn std::io::Write + Send>;

/// File work done off the actor, reported back to it.
enum FileDone {
    Decoded {
        peer: NodeId,
        ask: FileAsk,
        outcome: Outcome,
    },
    Finished {
        hash: FileHash,
        result: Result<(), FileError>,
    },
    Served {
        peer: NodeId,
        bytes: u64,
        /// Bytes already counted against the peer's budget when the segment was granted.
        granted: u64,
    },
    /// Download progress made durable and recorded, or why not.
    ProgressSaved(Result<(), FileError>),
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
    /// Bumped whenever a file is stored (the file feed's long polls wait on it; the value
    /// only grows and is at least the feed's last number).
    files_last: Arc<watch::Sender<u64>>,
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
    files: crate::model::FilesStatus,
    traffic: std::collections::BTreeMap<NodeId, observe::Traffic>,
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
    /// The network actor's events, each peer batch with its signatures verified ahead.
    events: mpsc::Receiver<check::Checking>,
    /// What the current step asks of the network actor, sent when the step ends.
    out: Vec<NetCommand>,
    /// Results of file work done off the actor, and the sender its tasks report through.
    file_results: mpsc::Receiver<FileDone>,
    file_results_tx: mpsc::Sender<FileDone>,
    /// Segments being encoded for peers now.
    serving: usize,
    /// Reads waiting for a file to be stored.
    file_waiters: std::collections::HashMap<FileHash, Vec<Reply<bool>>>,
    file_ticks: u64,
    /// A save of download progress is running off the actor.
    saving_progress: bool,
    /// Shared with the handles: wakes the file feed's long polls.
    files_last: Arc<watch::Sender<u64>>,
    /// Sync bytes per peer since start.
    traffic: std::collections::BTreeMap<NodeId, observe::Traffic>,
    timers: crate::metrics::Timers,
    /// The status record last sent to the peers (the fleet view).
    published: fleet::Published,
}

impl NodeActor {
    async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut file_tick = tokio::time::interval(Duration::from_millis(FILE_TICK_MS));
        file_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                done = self.file_results.recv() => match done {
                    Some(done) => self.on_file_done(done),
                    None => break,
                },
                _ = file_tick.tick() => {
                    self.on_file_tick();
                    self.on_fleet_tick();
                    log_failed_step(self.core.pump_shaped());
                }
                action = self.rx.recv() => match action {
                    Some(action) => self.on_action(action),
                    None => break,
                },
                event = self.events.recv() => match event {
                    Some((event, checked)) => self.on_net_event(event, checked),
                    None => break,
                },
                _ = shutdown.wait_for(|stop| *stop) => break,
            }
            self.drain_outbox();
            self.drive_files();
            self.publish_live();
            for command in std::mem::take(&mut self.out) {
                if self.net.send(command).await.is_err() {
                    break;
                }
            }
        }
        tracing::info!("node actor stopped");
    }

    /// Run one request against the core. redb calls block: they block the actor's own thread
    /// (see [`spawn`]), nothing else.
    fn on_action(&mut self, action: Action) {
        match action {
            write @ (Action::Put { .. } | Action::Delete { .. }) => self.on_writes(write),
            Action::PutMany { items, reply } => {
                let r = self.timed(|core| core.put_many(&items));
                log_refused(&r);
                let _ = reply.send(r);
            }
            Action::SyncNow { name, reply } => {
                let _ = reply.send(self.core.sync_now(&self.config, &name));
            }
            Action::Ping { reply } => {
                let _ = reply.send(Ok(()));
            }
            Action::Resolve {
                ty,
                id,
                path,
                pick,
                reply,
            } => {
                let r = self.timed(|core| core.resolve(&ty, &id, &path, &pick));
                log_refused(&r);
                let _ = reply.send(r);
            }
            Action::Rename { ty, id, to, reply } => {
                let _ = reply.send(self.core.rename(&ty, &id, &to));
            }
            Action::Held { query, reply } => {
                let _ = reply.send(crate::held::held(&self.core, &query));
            }
            Action::Plan { peer, all, reply } => {
                let _ = reply.send(self.core.plan(&peer, all));
            }
            Action::ExportBundle {
                peer,
                all,
                encrypt,
                files,
                out,
                done,
                reply,
            } => self.export_bundle(&peer, all, encrypt, files, out, done, reply),
            Action::ImportBundle {
                src,
                dry_run,
                reply,
            } => self.import_bundle(src, dry_run, reply),
            Action::SetPeer { peer, reply } => {
                let _ = reply.send(self.set_peer(*peer));
            }
            Action::RemovePeer { name, reply } => {
                let _ = reply.send(self.remove_peer(&name));
            }
            Action::FetchFile { hash, reply } => {
                let waiting = self.file_waiters.get(&hash).map_or(0, Vec::len);
                if waiting < MAX_FILE_WAITERS && self.core.request_file(&hash) {
                    self.file_waiters.entry(hash).or_default().push(reply);
                } else {
                    let _ = reply.send(false);
                }
            }
        }
    }

    /// Publish what status shows of the sessions, when it changed.
    fn publish_live(&self) {
        let sessions = self.core.session_summaries();
        self.live.send_if_modified(|live| {
            if live.sessions == sessions
                && live.peers == self.config.peers
                && live.traffic == self.traffic
            {
                return false;
            }
            *live = Arc::new(Live {
                peers: self.config.peers.clone(),
                sessions,
                files: live.files.clone(),
                traffic: self.traffic.clone(),
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
        for (peer, msg) in &outbox.sends {
            self.count_out(peer, msg);
        }
        self.observe_batches();
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
    fn on_net_event(&mut self, event: NetEvent, checked: Option<crate::core::Checked>) {
        match event {
            NetEvent::Connected { peer, via } if self.is_configured(&peer) => {
                log_failed_step(self.core.on_connected(peer));
                self.core.connected_via(peer, via);
                self.send_status_to(peer);
            }
            NetEvent::Connected { .. } => {}
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
                self.count_in(&peer, &msg);
                match self.core.on_request(peer, msg, checked) {
                    Ok(response) => {
                        self.count_out(&peer, &response);
                        self.out.push(NetCommand::Respond { id, msg: response })
                    }
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
                self.count_in(&peer, &msg);
                log_failed_step(self.core.on_response(peer, msg));
            }
            NetEvent::Response { .. } => {}
            NetEvent::RequestFailed(peer) => {
                log_failed_step(self.core.on_request_failed(peer));
            }
            NetEvent::FileAsked { peer, id, ask } => self.on_file_asked(peer, id, ask),
            NetEvent::FileAnswered { peer, ask, answer } => match answer {
                FileAnswer::Segment(bytes) => self.decode_answer(peer, ask, bytes),
                FileAnswer::Unknown => self.core.file_answered(peer, &ask, Outcome::Unknown, now()),
                FileAnswer::Busy => self.core.file_answered(peer, &ask, Outcome::Busy, now()),
            },
            NetEvent::FileAskFailed { peer, ask, why } => {
                self.core
                    .file_answered(peer, &ask, Outcome::Failed(why), now())
            }
        }
    }
}

fn now() -> i64 {
    crate::replica::system_now_ms()
}

/// Log a local write the core refused.
pub(super) fn log_refused<T>(result: &Result<T, LocalWriteError>) {
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
    instruments: crate::metrics::Instruments,
    shutdown: watch::Receiver<bool>,
) -> Result<(NodeHandle, tokio::task::JoinHandle<()>), ReadError> {
    let mut core = core;
    match core.load_wants() {
        Ok(0) => {}
        Ok(n) => tracing::info!(files = n, "carrying on with the want-list"),
        Err(e) => {
            tracing::error!(error = %e, "could not read the want-list; files wanted before are fetched once their objects change again")
        }
    }
    match core.store().clean_partial_uploads() {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            files = n,
            "removed uploads a stopped process left unfinished"
        ),
        Err(e) => tracing::warn!(error = %e, "could not clean unfinished uploads"),
    }
    let (tx, rx) = mpsc::channel(ACTION_QUEUE_LEN);
    let (file_results_tx, file_results) = mpsc::channel(FILE_RESULT_QUEUE_LEN);
    let (last_seq_tx, last_seq) = watch::channel(core.last_seq()?);
    let files_last = Arc::new(watch::Sender::new(
        core.store()
            .file_feed(0, 0)
            .map(|(_, last)| last)
            .unwrap_or(0),
    ));
    let (live_tx, live) = watch::channel(Arc::new(Live {
        peers: config.peers.clone(),
        sessions: Sessions::new(),
        files: Default::default(),
        traffic: Default::default(),
    }));
    let info = Arc::new(NodeInfo {
        node: core.node_id(),
        name: core.name().to_string(),
    });
    let peers: Vec<(NodeId, PeerConfig)> = config.peers.iter().map(|p| (p.id, p.clone())).collect();
    let (net_actor, ends) = NetActor::new(swarm, &peers, instruments.libp2p);
    let events = check::spawn(ends.events, *core.replica().faults());
    let handle = NodeHandle {
        tx,
        last_seq,
        files_last: Arc::clone(&files_last),
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
        events,
        out: Vec::new(),
        file_results,
        file_results_tx,
        serving: 0,
        file_waiters: Default::default(),
        file_ticks: 0,
        saving_progress: false,
        files_last,
        traffic: Default::default(),
        timers: instruments.timers,
        published: Default::default(),
    };
    let net_task = tokio::spawn(net_actor.run(shutdown.clone()).in_current_span());
    // The node actor blocks on redb and the engine, so it runs on a thread of its own with a
    // runtime of its own for its timers and channels: it holds no worker of the shared
    // runtime, and no action or event pays for handing a worker's queue to another thread
    // (`block_in_place`). With this and the core count asked once (`replica/par.rs`), one
    // client's PUTs, one at a time, took 1.16 ms at the median instead of 1.47 (issue 17).
    let span = tracing::Span::current();
    let actor_thread = tokio::task::spawn_blocking(move || {
        let _entered = span.enter();
        match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => {
                rt.block_on(actor.run(shutdown));
                rt.shutdown_timeout(Duration::from_secs(ACTOR_SHUTDOWN_SECS));
            }
            Err(e) => {
                tracing::error!(error = %e, "the node actor's runtime could not be started")
            }
        }
    });
    let task = tokio::spawn(
        async move {
            let _ = actor_thread.await;
            let _ = net_task.await;
        }
        .in_current_span(),
    );
    Ok((handle, task))
}
