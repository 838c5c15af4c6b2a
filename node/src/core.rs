//! The node core: engine, store and a bounded document cache behind the operations the API and
//! the CLI offer. The running node's actor owns one; the CLI opens one when no node is running,
//! so both paths run the same code and give the same answers.

use std::num::NonZeroUsize;
use std::time::{SystemTime, UNIX_EPOCH};

use automerge::Automerge;
use lru::LruCache;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};
use tidesync_proto::{DocId, NodeId, ObjectId, TypeName};

use crate::config::{Config, Home};
use crate::doc;
use crate::engine::{Engine, Loaded, WriteError, WriteOp, WriteOutcome};
use crate::identity::{Identity, KeyError};
use crate::model::DocRecord;
pub use crate::reads::{
    Conflict, DEFAULT_PAGE_IDS, Feed, FeedEntry, History, HistoryEntry, MAX_FEED_ENTRIES,
    MAX_PAGE_IDS, PeerStatus, ReadError, Reads, Status,
};
use crate::store::{IdPage, Store, StoreError};

/// The answer to a put or a delete.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WriteReply {
    #[serde(rename = "type")]
    pub ty: String,
    pub id: String,
    /// The document's global id.
    pub doc: String,
    /// False when the write matched what was stored and made no change.
    pub changed: bool,
    /// The change's SEQ in this node's change log, when a change was made.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
    /// The object after a put.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub object: Option<Map<String, Json>>,
}

/// One document as [`Core::audit`] found it.
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

/// Why a put or delete failed. Each names the object.
#[derive(Debug, thiserror::Error)]
pub enum LocalWriteError {
    #[error(transparent)]
    Refused(#[from] WriteError),
    #[error("cannot write {ty}/{id}: {source}")]
    ReadOnly {
        ty: TypeName,
        id: ObjectId,
        source: crate::policy::ReadOnlyType,
    },
    #[error("cannot write {ty}/{id}: {source}")]
    Store {
        ty: TypeName,
        id: ObjectId,
        source: StoreError,
    },
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
pub struct Core {
    pub(crate) name: String,
    pub(crate) engine: Engine,
    pub(crate) store: Store,
    pub(crate) cache: LruCache<DocId, Automerge>,
    pub(crate) clock: Clock,
    pub(crate) running: bool,
    pub(crate) sync: crate::sync::Sessions,
    pub(crate) policies: crate::policy::Policies,
    /// Deliberate bugs, for simulations only (see [`crate::fault`]).
    pub(crate) faults: crate::fault::Faults,
}

impl Core {
    /// Open a node's home, whose config the caller loaded once: its key and store, with the
    /// config's peers' policies. `running` is reported by `status`.
    pub fn open(home: &Home, config: &Config, running: bool) -> Result<Core, OpenError> {
        let identity = Identity::load(&home.key())?;
        let store = Store::open(&home.store(), config.store.cache_bytes)?;
        let mut core = Core::new(
            config.name.clone(),
            identity,
            store,
            config.store.cache_docs,
            running,
        );
        for peer in &config.peers {
            if let Ok(id) = peer.node_id() {
                core.policies
                    .set(id, peer.name.clone(), peer.policy.clone());
            }
        }
        Ok(core)
    }

    /// A core over an open store, on the system clock, with an epoch from the OS RNG.
    pub fn new(
        name: String,
        identity: Identity,
        store: Store,
        cache_docs: usize,
        running: bool,
    ) -> Core {
        let clock: Clock = std::sync::Arc::new(system_now_ms);
        Core::with_clock(
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
    ) -> Core {
        let policies = crate::policy::Policies::new(identity.node_id());
        Core {
            name,
            policies,
            engine: Engine::new(identity, epoch),
            store,
            cache: LruCache::new(NonZeroUsize::new(cache_docs.max(1)).unwrap_or(NonZeroUsize::MIN)),
            clock,
            running,
            sync: crate::sync::Sessions::default(),
            faults: crate::fault::Faults::default(),
        }
    }

    /// Switch on a process fault from `TIDESYNC_FAULT` (integration tests only: see
    /// [`crate::fault::Fault`]); the frame faults act in the network codec instead.
    pub fn inject_process_fault(&mut self, fault: crate::fault::Fault) {
        self.faults.alter_relayed = fault == crate::fault::Fault::AlterRelayed;
        if fault == crate::fault::Fault::IgnorePolicy {
            self.policies.ignore_own();
        }
    }

    /// Switch on a deliberate bug (simulations only: see [`crate::fault`]).
    pub fn inject_fault(&mut self, fault: crate::fault::EngineFault) {
        tracing::warn!(%fault, "ENGINE FAULT ENABLED: this core misbehaves on purpose");
        if fault == crate::fault::EngineFault::IgnoreSkip {
            self.policies.ignore_skip();
        }
        self.faults.set(fault);
    }

    /// A core over a new in-memory store, with the key `[secret; 32]` (tests).
    #[cfg(test)]
    pub(crate) fn in_memory(secret: u8, name: &str) -> Core {
        Core::new(
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

    /// Set a peer's policy. When it lets through more than before, what is now allowed is
    /// backfilled: our checkpoint of the peer goes back to the start (so the peer resends, and
    /// we keep what we now accept) and the peer's next Hello gets our whole log again, through
    /// the new filter. Duplicates are dropped on arrival. Returns whether it widened.
    pub fn set_policy(
        &mut self,
        peer: NodeId,
        name: String,
        policy: crate::policy::Policy,
    ) -> Result<bool, StoreError> {
        let widened = self.reset_if_widened(&peer, &policy)?;
        self.adopt_policy(peer, name, policy);
        Ok(widened)
    }

    /// The memory half of [`Core::set_policy`]: take `policy` for `peer`, once
    /// [`Core::reset_if_widened`] and whatever else must hold first (the config file) are done.
    pub fn adopt_policy(&mut self, peer: NodeId, name: String, policy: crate::policy::Policy) {
        self.policies.set(peer, name, policy);
    }

    /// The store half of [`Core::set_policy`], done first and on its own: when `policy` would
    /// widen what passes with `peer`, durably send our checkpoint of the peer back to the start.
    /// Alone it costs at most a resend (duplicates are dropped), so a caller that fails after
    /// it (saving the config) leaves nothing inconsistent. Returns whether it widened.
    pub fn reset_if_widened(
        &self,
        peer: &NodeId,
        policy: &crate::policy::Policy,
    ) -> Result<bool, StoreError> {
        let widened = self.policies.would_widen(peer, policy);
        if widened {
            self.store.update_peer_durably(peer, |r| {
                r.received = Default::default();
                r.ahead.clear();
                r.resend_all = true;
            })?;
        }
        Ok(widened)
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

    /// The live object `ty/id` as JSON (see [`Reads::get`]).
    pub fn get(&self, ty: &TypeName, id: &ObjectId) -> Result<Map<String, Json>, ReadError> {
        self.reads().get(ty, id)
    }

    /// Ids of live objects of `ty`, a page at a time (see [`Reads::list`]).
    pub fn list(
        &self,
        ty: &TypeName,
        after: Option<&str>,
        limit: usize,
    ) -> Result<IdPage, ReadError> {
        self.reads().list(ty, after, limit)
    }

    /// Every change of `ty/id`, with each signature checked (see [`Reads::history`]).
    pub fn history(&self, ty: &TypeName, id: &ObjectId) -> Result<History, ReadError> {
        self.reads().history(ty, id)
    }

    /// The change feed after `since`, at most `limit` entries (see [`Reads::changes`]).
    pub fn changes(&self, since: u64, limit: usize) -> Result<Feed, ReadError> {
        self.reads().changes(since, limit)
    }

    /// The last SEQ in the change log.
    pub fn last_seq(&self) -> Result<u64, ReadError> {
        self.reads().last_seq()
    }

    /// Every name collision on this node (see [`Conflict`]).
    pub fn conflicts(&self) -> Result<Vec<Conflict>, ReadError> {
        self.reads().conflicts()
    }

    /// The node's status, with the sync state of each configured peer.
    pub fn status(&self, peers: &[crate::config::PeerConfig]) -> Result<Status, ReadError> {
        self.reads().status(peers, &self.session_summaries())
    }

    /// Forget a removed peer's policy.
    pub fn remove_policy(&mut self, peer: &NodeId) {
        self.policies.remove(peer);
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Load the document for `doc`, from the cache or the store (taking it out of the cache).
    pub(crate) fn take_doc(&mut self, doc_id: &DocId) -> Result<Option<Automerge>, StoreError> {
        match self.cache.pop(doc_id) {
            Some(d) => Ok(Some(d)),
            None => self.store.load_doc(doc_id),
        }
    }

    /// Set fields of `ty/id` (creating it if needed); a null removes a field.
    pub fn put(
        &mut self,
        ty: &TypeName,
        id: &ObjectId,
        fields: &Map<String, Json>,
    ) -> Result<WriteReply, LocalWriteError> {
        self.write(ty, id, WriteOp::Put(fields))
    }

    /// Delete `ty/id`.
    pub fn delete(&mut self, ty: &TypeName, id: &ObjectId) -> Result<WriteReply, LocalWriteError> {
        self.write(ty, id, WriteOp::Delete)
    }

    fn write(
        &mut self,
        ty: &TypeName,
        id: &ObjectId,
        op: WriteOp<'_>,
    ) -> Result<WriteReply, LocalWriteError> {
        let mut replies = self.write_many(&[(ty, id, op)])?;
        replies.pop().ok_or_else(|| LocalWriteError::Store {
            ty: ty.clone(),
            id: id.clone(),
            source: StoreError::Io {
                path: self.store.path().into(),
                context: "committing a write",
                detail: "no reply".into(),
            },
        })
    }

    /// Put many objects in one durable transaction (bulk loads and migrations). Each name may
    /// appear once; all are written or none.
    pub fn put_many(
        &mut self,
        items: &[(TypeName, ObjectId, Map<String, Json>)],
    ) -> Result<Vec<WriteReply>, LocalWriteError> {
        let ops: Vec<_> = items
            .iter()
            .map(|(t, i, f)| (t, i, WriteOp::Put(f)))
            .collect();
        self.write_many(&ops)
    }

    /// Run the engine for each write, commit every change in one transaction, then answer.
    fn write_many(
        &mut self,
        ops: &[(&TypeName, &ObjectId, WriteOp<'_>)],
    ) -> Result<Vec<WriteReply>, LocalWriteError> {
        let mut seen = std::collections::HashSet::new();
        let mut outcomes = Vec::with_capacity(ops.len());
        for (ty, id, op) in ops {
            let store_err = |source| LocalWriteError::Store {
                ty: (*ty).clone(),
                id: (*id).clone(),
                source,
            };
            self.policies
                .may_write(ty)
                .map_err(|source| LocalWriteError::ReadOnly {
                    ty: (*ty).clone(),
                    id: (*id).clone(),
                    source,
                })?;
            if !seen.insert((*ty, *id)) {
                return Err(LocalWriteError::Refused(WriteError::Fields {
                    ty: (*ty).clone(),
                    id: (*id).clone(),
                    source: Box::new(crate::doc::FieldsError::Duplicate),
                }));
            }
            let existing = match self.find(ty, id).map_err(store_err)? {
                Some((doc_id, record)) => {
                    let doc = self.take_doc(&doc_id).map_err(store_err)?.ok_or_else(|| {
                        store_err(StoreError::Decode {
                            path: self.store.path().into(),
                            what: format!("the state of document {doc_id} in docs_v2"),
                            detail: "document record without state".into(),
                        })
                    })?;
                    Some(Loaded {
                        doc_id,
                        record,
                        doc,
                    })
                }
                None => None,
            };
            let outcome = self
                .engine
                .local_write((self.clock)(), ty, id, existing, *op)?;
            if let WriteOutcome::Changed(p) = &outcome {
                // A change no frame can carry would never reach a peer, and would stop the
                // log behind it on older nodes: refuse it before anything is stored.
                let bytes = crate::model::change_wire_bytes(&p.change);
                if bytes > crate::outbound::MAX_LOCAL_CHANGE_BYTES {
                    return Err(LocalWriteError::Refused(WriteError::Fields {
                        ty: (*ty).clone(),
                        id: (*id).clone(),
                        source: Box::new(crate::doc::FieldsError::TooLarge {
                            bytes,
                            limit: crate::outbound::MAX_LOCAL_CHANGE_BYTES,
                        }),
                    }));
                }
            }
            outcomes.push(outcome);
        }
        let persists: Vec<&crate::model::Persist> = outcomes
            .iter()
            .filter_map(|o| match o {
                WriteOutcome::Changed(p) => Some(p),
                WriteOutcome::Unchanged(_) => None,
            })
            .collect();
        let seqs = match (persists.is_empty(), ops.first()) {
            (false, Some((ty, id, _))) => {
                self.store
                    .commit_writes(&persists)
                    .map_err(|source| LocalWriteError::Store {
                        ty: (*ty).clone(),
                        id: (*id).clone(),
                        source,
                    })?
            }
            _ => Vec::new(),
        };
        let mut seqs = seqs.into_iter();
        let mut replies = Vec::with_capacity(outcomes.len());
        for ((ty, id, op), outcome) in ops.iter().zip(outcomes) {
            let is_put = matches!(op, WriteOp::Put(_));
            let (doc_id, doc, seq, hash) = match outcome {
                WriteOutcome::Unchanged(l) => (l.doc_id, l.doc, None, None),
                WriteOutcome::Changed(p) => {
                    let seq = seqs.next();
                    tracing::debug!(%ty, %id, doc = %p.doc_id, ?seq, hash = %p.hash, "stored local change");
                    (p.doc_id, p.doc, seq, Some(p.hash.to_string()))
                }
            };
            replies.push(WriteReply {
                ty: ty.to_string(),
                id: id.to_string(),
                doc: doc_id.to_string(),
                changed: seq.is_some(),
                seq,
                hash,
                object: is_put.then(|| doc::to_json(&doc)),
            });
            self.cache.put(doc_id, doc);
        }
        Ok(replies)
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
            for change in doc.get_changes(&[]) {
                let hash = change.hash();
                let checked = reads
                    .check_stored(&doc_id, &hash)
                    .map_err(Self::read_err(what))?;
                changes.push(AuditedChange {
                    hash,
                    author: NodeId::from_actor(change.actor_id().to_bytes()),
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

    fn core() -> Core {
        Core::new(
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
            Json::Object(c.get(&t, &i).unwrap()),
            json!({"status": "analysed", "volume_ml": 2.5})
        );
        c.delete(&t, &i).unwrap();
        assert!(matches!(c.get(&t, &i), Err(ReadError::NotFound { .. })));
        assert!(c.list(&t, None, 10).unwrap().ids.is_empty());
        let h = c.history(&t, &i).unwrap();
        assert!(h.deleted);
        assert_eq!(h.changes.len(), 3);
        assert!(h.changes.iter().all(|e| e.verified));
        c.put(&t, &i, json!({"status": "back"}).as_object().unwrap())
            .unwrap();
        assert_eq!(
            Json::Object(c.get(&t, &i).unwrap()),
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
            assert_eq!(c.get(&t, &i).unwrap()["n"], json!(n));
            c.put(&t, &i, json!({"m": n}).as_object().unwrap()).unwrap();
        }
        assert!(c.cache.len() <= 2);
        let feed = c.changes(15, 100).unwrap();
        assert_eq!(feed.changes.len(), 5);
        assert_eq!(feed.last, 20);
        assert_eq!(feed.changes[0].seq, 16);
    }
}
