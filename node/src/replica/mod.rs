//! The replica: the only writer of document state. Engine, store, document cache, policies
//! and faults behind one owner, offering local writes, reads, applying a received batch
//! (verify, prepare, commit: [`receive`], [`apply`]), reading the log for a peer
//! ([`outbound`], `&mut` because a batch may author a view change) and what batches carry
//! along ([`carry`]). The node actor owns one through the core façade (`Core`); the CLI opens one
//! when no node is running, so both paths run the same code and give the same answers.
//!
//! Modules: [`engine`] (turns writes and arrivals into signed changes and records, no I/O),
//! [`write`](mod@write) (local writes), [`receive`] and [`apply`] (a received batch), [`outbound`] (what
//! goes into a batch for a peer), [`carry`] (views and referenced objects a batch brings),
//! [`peers`] (configured peers' policies applied against the store's, revoked keys),
//! [`equivocation`] (finding two changes signed under one actor and sequence number, and
//! rebuilding a document without them), [`files`](mod@files) (which files an arriving object
//! makes us want, and which a peer may be served), [`par`] (the one split of work among the
//! cores).

pub mod apply;
pub mod carry;
pub mod engine;
pub mod equivocation;
pub mod files;
pub mod outbound;
pub mod par;
pub mod peers;
pub mod plan;
pub mod receive;
pub mod rename;
pub mod write;

pub use rename::{RenameError, RenameReply};
pub use write::{GroupOp, LocalWriteError, WriteReply};

use std::num::NonZeroUsize;
use std::time::{SystemTime, UNIX_EPOCH};

use automerge::Automerge;
use lru::LruCache;
use serde_json::{Map, Value as Json};
use tidesync_proto::{Checkpoint, DocId, NodeId, ObjectId, TypeName};

use crate::config::{Config, Home};
use crate::doc;
use crate::identity::{Identity, KeyError};
use crate::model::{DocRecord, PeerRecord};
pub use crate::reads::{
    Conflict, DEFAULT_PAGE_IDS, Feed, FeedEntry, History, HistoryEntry, MAX_FEED_ENTRIES,
    MAX_PAGE_IDS, PeerStatus, ReadError, Reads, Status,
};
use crate::store::HeldTally;
use crate::store::{Store, StoreError};
use engine::Engine;

/// One document as [`Replica::audit`] found it.
#[derive(Debug, Clone)]
pub struct DocAudit {
    pub doc: DocId,
    pub record: DocRecord,
    /// The document's heads, sorted.
    pub heads: Vec<automerge::ChangeHash>,
    pub json: Map<String, Json>,
    pub deleted: bool,
    pub changes: Vec<AuditedChange>,
}

/// One change of an audited document.
#[derive(Debug, Clone)]
pub struct AuditedChange {
    pub hash: automerge::ChangeHash,
    /// The node whose key is in the change's actor id, if it is one.
    pub author: Option<NodeId>,
    /// Whether the stored signed copy verifies, or why not.
    pub signature: Result<(), String>,
}

/// Why a node's home could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "key file {key} belongs to node {found}, but this home's store was written by {expected}"
    )]
    WrongKey {
        key: std::path::PathBuf,
        found: NodeId,
        expected: NodeId,
    },
}

/// Why a sync step failed. Each names the peer.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("peer {peer} sent Hello claiming to be {claimed}")]
    WrongNode { peer: NodeId, claimed: NodeId },
    #[error("peer {peer} sent a {what} as a request")]
    Unexpected { peer: NodeId, what: &'static str },
    #[error("sync with peer {peer}: {source}")]
    Store { peer: NodeId, source: StoreError },
    #[error("publishing the view of document {doc} to peer {peer}: {detail}")]
    View {
        peer: NodeId,
        doc: DocId,
        detail: String,
    },
}

impl SyncError {
    /// Whether the peer broke the protocol. A local failure (the store, a view we publish)
    /// is ours: it never costs the peer its connection.
    pub fn blames_peer(&self) -> bool {
        match self {
            SyncError::WrongNode { .. } | SyncError::Unexpected { .. } => true,
            SyncError::Store { .. } | SyncError::View { .. } => false,
        }
    }
}

/// A store failure while serving `peer`: ours, never the peer's.
fn store_err(peer: NodeId) -> impl FnOnce(StoreError) -> SyncError {
    move |source| SyncError::Store { peer, source }
}

/// Unix time now, in milliseconds.
pub fn system_now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Where the core reads the time, in Unix milliseconds. The running node reads the system
/// clock; simulations pass their simulated one.
pub type Clock = std::sync::Arc<dyn Fn() -> i64 + Send + Sync>;

/// The node core.
pub struct Replica {
    name: String,
    engine: Engine,
    store: Store,
    cache: LruCache<DocId, Automerge>,
    clock: Clock,
    running: bool,
    policies: crate::policy::Policies,
    /// Deliberate bugs, for simulations only (see [`crate::fault`]).
    faults: crate::fault::Faults,
    /// The tip of our log after the last commit that appended to it, until taken (see
    /// [`Replica::take_new_tip`]).
    new_tip: Option<u64>,
    /// Files put on the want-list by commits since the core last took them.
    new_wants: Vec<crate::model::WantRow>,
    /// How long the received batches since the last take spent in each stage (the newest
    /// [`MAX_BATCH_TIMINGS`]).
    timings: Vec<crate::model::BatchTiming>,
}

/// Most batch timings kept until taken.
pub const MAX_BATCH_TIMINGS: usize = 64;

impl Replica {
    /// Open a node's home, whose config the caller loaded once: its key and store, with the
    /// config's peers' policies. `running` is reported by `status`.
    pub fn open(home: &Home, config: &Config, running: bool) -> Result<Replica, OpenError> {
        let identity = Identity::load(&home.key())?;
        let store = Store::open(&home.store(), config.store.cache_bytes)?;
        let mut core = Replica::new(
            config.name.clone(),
            identity,
            store,
            config.store.cache_docs,
            running,
        );
        core.reconcile_peers(&config.peers)?;
        Ok(core)
    }

    /// A core over an open store, on the system clock, with an epoch from the OS RNG.
    pub fn new(
        name: String,
        identity: Identity,
        store: Store,
        cache_docs: usize,
        running: bool,
    ) -> Replica {
        let clock: Clock = std::sync::Arc::new(system_now_ms);
        Replica::with_clock(
            name,
            identity,
            store,
            cache_docs,
            running,
            rand::random::<u64>(),
            clock,
        )
    }

    /// A core with the epoch and clock given, as simulations need.
    pub fn with_clock(
        name: String,
        identity: Identity,
        store: Store,
        cache_docs: usize,
        running: bool,
        epoch: u64,
        clock: Clock,
    ) -> Replica {
        let policies = crate::policy::Policies::new(identity.node_id());
        Replica {
            name,
            policies,
            engine: Engine::new(identity, epoch),
            store,
            cache: LruCache::new(NonZeroUsize::new(cache_docs.max(1)).unwrap_or(NonZeroUsize::MIN)),
            clock,
            running,
            faults: crate::fault::Faults::default(),
            new_tip: None,
            new_wants: Vec::new(),
            timings: Vec::new(),
        }
    }

    /// Switch on a process fault from `TIDESYNC_FAULT` (integration tests only: see
    /// [`crate::fault::Fault`]); the frame faults act in the network codec instead.
    pub fn inject_process_fault(&mut self, fault: crate::fault::Fault) {
        self.faults.set_process(fault);
        self.policies.set_faults(self.faults);
    }

    /// Switch on a deliberate bug (simulations only: see [`crate::fault`]).
    pub fn inject_fault(&mut self, fault: crate::fault::EngineFault) {
        tracing::warn!(%fault, "ENGINE FAULT ENABLED: this core misbehaves on purpose");
        self.faults.set(fault);
        self.policies.set_faults(self.faults);
    }

    /// A core over a new in-memory store, with the key `[secret; 32]` (tests).
    #[cfg(test)]
    pub(crate) fn in_memory(secret: u8, name: &str) -> Replica {
        Replica::new(
            name.into(),
            Identity::from_secret([secret; 32]),
            Store::in_memory().expect("an in-memory store"),
            64,
            true,
        )
    }

    /// Give up the core, returning its store (as a crash-and-restart in a simulation does).
    pub fn into_store(self) -> Store {
        self.store
    }

    pub fn node_id(&self) -> NodeId {
        self.engine.node_id()
    }

    /// The store, for reading (audits, simulations and tests).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The node's identity (its signing key).
    pub fn identity(&self) -> &Identity {
        self.engine.identity()
    }

    /// Set a peer's policy (see [`Replica::apply_peer`]). When it lets through more than the
    /// policy the store last applied, what is now allowed is backfilled: our checkpoint of the
    /// peer goes back to the start (so the peer resends, and we keep what we now accept) and
    /// the peer's next Hello gets our whole log again, through the new filter. Duplicates are
    /// dropped on arrival. Returns whether it widened.
    pub fn set_policy(
        &mut self,
        peer: NodeId,
        name: String,
        policy: crate::policy::Policy,
    ) -> Result<bool, StoreError> {
        Ok(self.apply_peer(peer, &name, &policy)?.widened)
    }

    /// Reads of what the store last committed, usable off the node actor.
    pub fn reads(&self) -> Reads {
        Reads::new(
            self.store.clone(),
            self.node_id(),
            self.name.clone(),
            self.running,
        )
    }

    /// The document that the local name `ty/id` points to, with its record.
    pub fn find(
        &self,
        ty: &TypeName,
        id: &ObjectId,
    ) -> Result<Option<(DocId, DocRecord)>, StoreError> {
        self.reads().find(ty, id)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The durable record of `peer` (see [`PeerRecord`]).
    pub fn peer_record(&self, peer: &NodeId) -> Result<PeerRecord, StoreError> {
        self.store.peer(peer)
    }

    /// Change the durable record of `peer` (committed without waiting for the disk: see
    /// [`Store::update_peer`]).
    pub fn update_peer(
        &self,
        peer: &NodeId,
        f: impl FnOnce(&mut PeerRecord),
    ) -> Result<PeerRecord, StoreError> {
        self.store.update_peer(peer, f)
    }

    /// The last SEQ of our log: its tip.
    pub fn log_tip(&self) -> Result<u64, StoreError> {
        self.store.last_seq()
    }

    /// The checkpoint of our log at `seq` as `peer` holds it, if the log has that entry: its
    /// hash is a token for that peer (see [`Identity::checkpoint_token`]), never the
    /// change's own hash. The zero checkpoint at 0.
    pub fn checkpoint_for(
        &self,
        peer: &NodeId,
        seq: u64,
    ) -> Result<Option<Checkpoint>, StoreError> {
        if seq == 0 {
            return Ok(Some(Checkpoint::default()));
        }
        Ok(self.store.checkpoint(seq)?.map(|cp| Checkpoint {
            seq,
            hash: self.identity().checkpoint_token(peer, seq, &cp.hash),
        }))
    }

    /// How many of `peer`'s changes are held here, and their bytes.
    pub fn held_tally(&self, peer: &NodeId) -> Result<HeldTally, StoreError> {
        self.store.reader()?.held_tally(peer)
    }

    /// Forget which view changes `peer` acknowledged: it lost them (restored from a copy).
    pub fn forget_view_acks(&self, peer: &NodeId) -> Result<(), StoreError> {
        self.store.forget_view_acks(peer)
    }

    /// `peer` acknowledged a batch carrying these views, each with the count of its changes.
    pub fn ack_views(&self, peer: &NodeId, views: &[(DocId, u64)]) -> Result<(), StoreError> {
        self.store.ack_views(peer, views)
    }

    /// `peer` acknowledged a batch carrying these owed referenced objects.
    pub fn settle_refs(&self, peer: &NodeId, docs: &[DocId]) -> Result<(), StoreError> {
        self.store.settle_refs(peer, docs)
    }

    /// Referenced objects still owed to `peer` (see [`Store::owed_refs`]).
    pub fn owed_refs(&self, peer: &NodeId) -> Result<Vec<DocId>, StoreError> {
        self.store.owed_refs(peer)
    }

    /// Every peer's policy.
    pub fn policies(&self) -> &crate::policy::Policies {
        &self.policies
    }

    /// Our policy for `peer`.
    pub fn policy(&self, peer: &NodeId) -> &crate::policy::Policy {
        self.policies.of(peer)
    }

    /// The faults switched on (simulations and integration tests only).
    pub fn faults(&self) -> &crate::fault::Faults {
        &self.faults
    }

    /// The tip of our log if a commit appended to it since the last call.
    pub fn take_new_tip(&mut self) -> Option<u64> {
        self.new_tip.take()
    }

    /// How long the batches received since the last call spent verifying, applying and
    /// committing (metrics).
    pub fn take_timings(&mut self) -> Vec<crate::model::BatchTiming> {
        std::mem::take(&mut self.timings)
    }

    /// The engine (tests forge stored changes with it).
    #[cfg(test)]
    pub(crate) fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The faults, to switch one on mid-test.
    #[cfg(test)]
    pub(crate) fn faults_mut(&mut self) -> &mut crate::fault::Faults {
        &mut self.faults
    }

    /// The time now, from the replica's clock, in Unix milliseconds.
    pub fn now_ms(&self) -> i64 {
        (self.clock)()
    }

    /// Load the document for `doc`, from the cache or the store (taking it out of the cache);
    /// through `reader` when the caller has a read transaction open.
    pub(crate) fn take_doc(
        &mut self,
        doc_id: &DocId,
        reader: Option<&crate::store::Reader<'_>>,
    ) -> Result<Option<Automerge>, StoreError> {
        match (self.cache.pop(doc_id), reader) {
            (Some(d), _) => Ok(Some(d)),
            (None, Some(r)) => r.load_doc(doc_id),
            (None, None) => self.store.load_doc(doc_id),
        }
    }

    fn read_err(what: impl std::fmt::Display) -> impl FnOnce(StoreError) -> ReadError {
        let what = what.to_string();
        move |source| ReadError::Store { what, source }
    }

    /// Every document this node holds, with its heads, its JSON and every change checked
    /// against its stored signature: what simulations compare across nodes.
    pub fn audit(&mut self) -> Result<Vec<DocAudit>, ReadError> {
        let what = "the audit of every document";
        let docs = self.store.docs().map_err(Self::read_err(what))?;
        let reads = self.reads();
        let mut out = Vec::with_capacity(docs.len());
        for (doc_id, record) in docs {
            let doc = self.document(&doc_id)?.ok_or_else(|| ReadError::NotFound {
                ty: record.ty.clone(),
                id: record.local_id.clone(),
            })?;
            let mut heads = doc.get_heads();
            heads.sort();
            let mut changes = Vec::new();
            for change in doc.get_changes_meta(&[]) {
                let hash = change.hash;
                let checked = reads
                    .check_stored(&doc_id, &hash)
                    .map_err(Self::read_err(what))?;
                changes.push(AuditedChange {
                    hash,
                    author: NodeId::from_actor(change.actor.to_bytes()),
                    signature: checked.map(|_| ()),
                });
            }
            out.push(DocAudit {
                doc: doc_id,
                deleted: doc::is_deleted(&doc),
                json: doc::to_json(&doc),
                record,
                heads,
                changes,
            });
        }
        Ok(out)
    }

    /// A copy of document `doc_id`, if this node holds it.
    pub fn document(&self, doc_id: &DocId) -> Result<Option<Automerge>, ReadError> {
        if let Some(d) = self.cache.peek(doc_id) {
            return Ok(Some(d.clone()));
        }
        self.store
            .load_doc(doc_id)
            .map_err(Self::read_err(format!("document {doc_id}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A replica on an in-memory store that caches two documents (the other modules' tests
    /// use it too).
    pub(super) fn core() -> Replica {
        Replica::new(
            "t".into(),
            Identity::from_secret([4; 32]),
            Store::in_memory().unwrap(),
            2,
            true,
        )
    }

    fn names(id: &str) -> (TypeName, ObjectId) {
        (TypeName::new("Sample").unwrap(), ObjectId::new(id).unwrap())
    }

    #[test]
    fn put_get_delete_and_revive() {
        let mut c = core();
        let (t, i) = names("S-001");
        let r = c
            .put(
                &t,
                &i,
                json!({"status": "received", "volume_ml": 2.5})
                    .as_object()
                    .unwrap(),
            )
            .unwrap();
        assert!(r.changed);
        assert_eq!(r.seq, Some(1));
        let r = c
            .put(&t, &i, json!({"status": "analysed"}).as_object().unwrap())
            .unwrap();
        assert_eq!(r.seq, Some(2));
        assert_eq!(
            Json::Object(c.reads().get(&t, &i).unwrap()),
            json!({"status": "analysed", "volume_ml": 2.5})
        );
        c.delete(&t, &i).unwrap();
        assert!(matches!(
            c.reads().get(&t, &i),
            Err(ReadError::NotFound { .. })
        ));
        assert!(c.reads().list(&t, None, 10).unwrap().ids.is_empty());
        let h = c.reads().history(&t, &i).unwrap();
        assert!(h.deleted);
        assert_eq!(h.changes.len(), 3);
        assert!(h.changes.iter().all(|e| e.verified));
        c.put(&t, &i, json!({"status": "back"}).as_object().unwrap())
            .unwrap();
        assert_eq!(
            Json::Object(c.reads().get(&t, &i).unwrap()),
            json!({"status": "back"})
        );
    }

    #[test]
    fn reads_work_past_the_cache_bound() {
        let mut c = core();
        for n in 0..10 {
            let (t, i) = names(&format!("S-{n}"));
            c.put(&t, &i, json!({"n": n}).as_object().unwrap()).unwrap();
        }
        for n in 0..10 {
            let (t, i) = names(&format!("S-{n}"));
            assert_eq!(c.reads().get(&t, &i).unwrap()["n"], json!(n));
            c.put(&t, &i, json!({"m": n}).as_object().unwrap()).unwrap();
        }
        assert!(c.cache.len() <= 2);
        let feed = c.reads().changes(15, 100).unwrap();
        assert_eq!(feed.changes.len(), 5);
        assert_eq!(feed.last, 20);
        assert_eq!(feed.changes[0].seq, 16);
    }
}
