//! The node core: engine, store and a bounded document cache behind the operations the API and
//! the CLI offer. The running node's actor owns one; the CLI opens one when no node is running,
//! so both paths run the same code and give the same answers.

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::time::{SystemTime, UNIX_EPOCH};

use automerge::Automerge;
use lru::LruCache;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};
use tidesync_proto::{DocId, NodeId, ObjectId, TypeName};

use crate::config::{Config, Home};
use crate::doc;
use crate::engine::{DocRecord, Engine, Loaded, WriteError, WriteOp, WriteOutcome};
use crate::identity::{Identity, KeyError};
use crate::store::{IdPage, Store, StoreError, TypeCount};

/// Most ids returned by one page of a listing.
pub const MAX_PAGE_IDS: usize = 10_000;
/// Ids per page of a listing when the caller does not say.
pub const DEFAULT_PAGE_IDS: usize = 1_000;
/// Most entries returned by one page of the change feed.
pub const MAX_FEED_ENTRIES: usize = 10_000;

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

/// One change in an object's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub hash: String,
    /// The node that signed the change (its PeerId).
    pub author: String,
    pub actor: String,
    pub seq: u64,
    /// Unix seconds recorded by the author.
    pub time: i64,
    pub message: Option<String>,
    pub deps: Vec<String>,
    /// Whether the stored signature verifies for this change, document and author.
    pub verified: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
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

/// An object's history, oldest change first (causal order).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct History {
    #[serde(rename = "type")]
    pub ty: String,
    pub id: String,
    pub doc: String,
    /// The node that created the object.
    pub origin: String,
    pub deleted: bool,
    pub changes: Vec<HistoryEntry>,
}

/// One entry of the change feed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeedEntry {
    pub seq: u64,
    #[serde(rename = "type")]
    pub ty: String,
    pub id: String,
    pub doc: String,
    pub hash: String,
    pub author: String,
    pub time_ms: i64,
}

/// A page of the change feed. Resume with `since = last`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Feed {
    pub changes: Vec<FeedEntry>,
    pub last: u64,
}

/// What `status` reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub node: String,
    pub name: String,
    /// True when answered by a running node, false when read from a stopped node's store.
    pub running: bool,
    pub objects: BTreeMap<String, TypeCount>,
    pub last_seq: u64,
    pub store_bytes: u64,
    /// Received changes held until their dependencies arrive.
    pub held_changes: u64,
    /// Objects stored under a collision name because another object had their type and id
    /// here (listed by `tidesync conflicts`).
    #[serde(default)]
    pub collisions: u64,
    /// Addresses the node listens on for peers (running node only).
    #[serde(default)]
    pub listen: Vec<String>,
    /// Connections refused because the peer is not configured (running node, since start).
    #[serde(default)]
    pub refused_connections: u64,
    /// Sync frames and bytes sent and received (running node, since start).
    #[serde(default)]
    pub net: crate::net::NetTotals,
    #[serde(default)]
    pub peers: Vec<PeerStatus>,
}

/// The sync state of one configured peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub name: String,
    pub id: String,
    pub addrs: Vec<String>,
    pub connected: bool,
    /// Since when the peer is connected, Unix milliseconds.
    pub connected_since_ms: Option<i64>,
    /// Last time a batch from or to the peer was stored or acknowledged, Unix milliseconds.
    pub last_sync_ms: Option<i64>,
    /// How long the current session took to come in sync (both Hellos answered, nothing of
    /// ours unacknowledged), in milliseconds; none while it has not.
    #[serde(default)]
    pub in_sync_after_ms: Option<i64>,
    /// At most this many of our log entries have yet to reach the peer.
    pub pending_out: u64,
    /// At most this many of the peer's log entries have yet to reach us.
    pub pending_in: u64,
    /// Changes received from the peer and stored.
    pub changes_in: u64,
    /// Changes sent to the peer and acknowledged.
    pub changes_out: u64,
    /// Changes from the peer that failed verification or policy.
    pub rejected: u64,
    /// Changes we sent that the peer rejected.
    pub rejected_by_peer: u64,
    /// Changes the peer sent that we already had.
    pub duplicates: u64,
    /// Changes from the peer refused by policy, per type.
    #[serde(default)]
    pub rejected_types: std::collections::BTreeMap<String, u64>,
    /// Stored changes never sent to the peer because no frame can carry them (received from
    /// a node with other limits); each is logged once.
    #[serde(default)]
    pub oversized_skipped: u64,
    /// Changes from the peer held here for missing dependencies, against its quota.
    #[serde(default)]
    pub held: u64,
    /// Changes from the peer refused because its (or their document's) quota of held changes
    /// was full; they arrive again (see `tidesync held`).
    #[serde(default)]
    pub held_refused_for_room: u64,
    /// What may pass to and from the peer.
    #[serde(default)]
    pub policy: crate::policy::Policy,
}

/// Two documents that arrived under one name: the one stored under its own name and the one
/// renamed `id~<8 hex>`. Both are kept and reachable.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Conflict {
    #[serde(rename = "type")]
    pub ty: String,
    /// The name both documents have at their origins.
    pub id: String,
    /// The local name the second document got here.
    pub local_id: String,
    pub doc: String,
    pub origin: String,
    /// The document holding the plain name here, and its origin.
    pub holder: Option<String>,
    pub holder_origin: Option<String>,
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

/// Why a read failed. Each names what was read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{ty}/{id} does not exist")]
    NotFound { ty: TypeName, id: ObjectId },
    #[error("cannot read {what}: {source}")]
    Store { what: String, source: StoreError },
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
    /// Open a node's home: config, key and store. `running` is reported by `status`.
    pub fn open(home: &Home, running: bool) -> Result<Core, OpenError> {
        let config = Config::load(home)?;
        let identity = Identity::load(&home.key())?;
        let store = Store::open(&home.store(), config.store.cache_bytes)?;
        let mut core = Core::new(
            config.name,
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
        let widened = self.policies.set(peer, name, policy);
        if widened {
            self.store.update_peer(&peer, |r| {
                r.received = Default::default();
                r.ahead.clear();
                r.resend_all = true;
            })?;
        }
        Ok(widened)
    }

    /// Every name collision on this node (see [`Conflict`]).
    pub fn conflicts(&self) -> Result<Vec<Conflict>, ReadError> {
        let err = |source| ReadError::Store {
            what: "the name collisions".into(),
            source,
        };
        let mut out = Vec::new();
        for (doc, rec) in self.store.collisions().map_err(err)? {
            let holder = self.find(&rec.ty, &rec.id).map_err(err)?;
            out.push(Conflict {
                ty: rec.ty.to_string(),
                id: rec.id.to_string(),
                local_id: rec.local_id.to_string(),
                doc: doc.to_string(),
                origin: rec.origin.to_string(),
                holder: holder.as_ref().map(|(d, _)| d.to_string()),
                holder_origin: holder.map(|(_, r)| r.origin.to_string()),
            });
        }
        Ok(out)
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

    /// The document that the local name `ty/id` points to, with its record.
    pub fn find(
        &self,
        ty: &TypeName,
        id: &ObjectId,
    ) -> Result<Option<(DocId, DocRecord)>, StoreError> {
        let Some(doc_id) = self.store.lookup(ty, id)? else {
            return Ok(None);
        };
        Ok(self.store.record(&doc_id)?.map(|r| (doc_id, r)))
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
                let bytes = crate::outbound::change_wire_bytes(&p.change);
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
        let persists: Vec<&crate::engine::Persist> = outcomes
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

    /// A live object and its document, for reading.
    fn live_doc(
        &mut self,
        ty: &TypeName,
        id: &ObjectId,
    ) -> Result<(DocId, DocRecord, &Automerge), ReadError> {
        let what = format!("{ty}/{id}");
        let not_found = || ReadError::NotFound {
            ty: ty.clone(),
            id: id.clone(),
        };
        let (doc_id, record) = self
            .find(ty, id)
            .map_err(Self::read_err(&what))?
            .ok_or_else(not_found)?;
        if !self.cache.contains(&doc_id) {
            let doc = self
                .store
                .load_doc(&doc_id)
                .map_err(Self::read_err(&what))?
                .ok_or_else(not_found)?;
            self.cache.put(doc_id, doc);
        }
        let doc = self.cache.get(&doc_id).ok_or_else(not_found)?;
        Ok((doc_id, record, doc))
    }

    /// The live object `ty/id` as JSON.
    pub fn get(&mut self, ty: &TypeName, id: &ObjectId) -> Result<Map<String, Json>, ReadError> {
        let (_, record, doc) = self.live_doc(ty, id)?;
        if !record.live {
            return Err(ReadError::NotFound {
                ty: ty.clone(),
                id: id.clone(),
            });
        }
        Ok(doc::to_json(doc))
    }

    /// Ids of live objects of `ty`, a page at a time.
    pub fn list(
        &self,
        ty: &TypeName,
        after: Option<&str>,
        limit: usize,
    ) -> Result<IdPage, ReadError> {
        self.store
            .list(ty, after, limit.clamp(1, MAX_PAGE_IDS))
            .map_err(Self::read_err(format!("the ids of {ty}")))
    }

    /// Every change of `ty/id` (deleted objects too), with each signature checked.
    pub fn history(&mut self, ty: &TypeName, id: &ObjectId) -> Result<History, ReadError> {
        let what = format!("the history of {ty}/{id}");
        let (doc_id, record, doc) = self.live_doc(ty, id)?;
        let deleted = doc::is_deleted(doc);
        let changes: Vec<_> = doc.get_changes(&[]);
        let mut entries = Vec::with_capacity(changes.len());
        for change in changes {
            let hash = change.hash();
            let checked = self
                .check_stored(&doc_id, &hash)
                .map_err(Self::read_err(&what))?;
            entries.push(HistoryEntry {
                hash: hash.to_string(),
                author: NodeId::from_actor(change.actor_id().to_bytes())
                    .map(|n| n.to_string())
                    .unwrap_or_else(|| "unknown".into()),
                actor: change.actor_id().to_hex_string(),
                seq: change.seq(),
                time: change.timestamp(),
                message: change.message().map(str::to_string),
                deps: change.deps().iter().map(|d| d.to_string()).collect(),
                verified: checked.is_ok(),
                error: checked.err(),
            });
        }
        Ok(History {
            ty: ty.to_string(),
            id: id.to_string(),
            doc: doc_id.to_string(),
            origin: record.origin.to_string(),
            deleted,
            changes: entries,
        })
    }

    /// Whether the stored signed copy of change `hash` of `doc_id` verifies: its author, or
    /// why not.
    fn check_stored(
        &self,
        doc_id: &DocId,
        hash: &automerge::ChangeHash,
    ) -> Result<Result<NodeId, String>, StoreError> {
        Ok(match self.store.change(doc_id, hash)? {
            None => Err("no signed copy of this change is stored".to_string()),
            Some(s) => s.verify().map_err(|e| e.to_string()).and_then(|v| {
                if v.hash == *hash {
                    Ok(v.author)
                } else {
                    Err("stored signed change has a different hash".into())
                }
            }),
        })
    }

    /// Every document this node holds, with its heads, its JSON and every change checked
    /// against its stored signature: what simulations compare across nodes.
    pub fn audit(&mut self) -> Result<Vec<DocAudit>, ReadError> {
        let what = "the audit of every document";
        let docs = self.store.docs().map_err(Self::read_err(what))?;
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
                let checked = self
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

    /// The change feed after `since`, at most `limit` entries.
    pub fn changes(&self, since: u64, limit: usize) -> Result<Feed, ReadError> {
        let what = "the change feed";
        let log = self
            .store
            .log_since(since, limit.clamp(1, MAX_FEED_ENTRIES))
            .map_err(Self::read_err(what))?;
        let mut changes = Vec::with_capacity(log.len());
        let reader = self.store.reader().map_err(Self::read_err(what))?;
        let mut names: BTreeMap<DocId, Option<DocRecord>> = BTreeMap::new();
        for (seq, entry) in log {
            let record = match names.entry(entry.doc) {
                std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert(reader.record(&entry.doc).map_err(Self::read_err(what))?)
                }
            };
            let (ty, id) = record
                .as_ref()
                .map(|r| (r.ty.to_string(), r.local_id.to_string()))
                .unwrap_or_default();
            changes.push(FeedEntry {
                seq,
                ty,
                id,
                doc: entry.doc.to_string(),
                hash: hex::encode(entry.hash),
                author: entry.author.to_string(),
                time_ms: entry.time_ms,
            });
        }
        let last = changes.last().map(|c| c.seq).unwrap_or(since);
        Ok(Feed { changes, last })
    }

    /// The last SEQ in the change log.
    pub fn last_seq(&self) -> Result<u64, ReadError> {
        self.store
            .last_seq()
            .map_err(Self::read_err("the change log"))
    }

    /// The node's status, with the sync state of each configured peer.
    pub fn status(&self, peers: &[crate::config::PeerConfig]) -> Result<Status, ReadError> {
        let what = "the node status";
        let last_seq = self.store.last_seq().map_err(Self::read_err(what))?;
        Ok(Status {
            node: self.node_id().to_string(),
            name: self.name.clone(),
            running: self.running,
            objects: self.store.counts().map_err(Self::read_err(what))?,
            last_seq,
            store_bytes: self.store.size_bytes(),
            held_changes: self.store.pending_count().map_err(Self::read_err(what))?,
            collisions: self.store.collision_count().map_err(Self::read_err(what))?,
            listen: Vec::new(),
            refused_connections: 0,
            net: Default::default(),
            peers: peers
                .iter()
                .map(|p| self.peer_status(p, last_seq))
                .collect::<Result<_, _>>()?,
        })
    }

    /// The sync state of one configured peer, given our log's last SEQ.
    pub fn peer_status(
        &self,
        peer: &crate::config::PeerConfig,
        last: u64,
    ) -> Result<PeerStatus, ReadError> {
        let what = format!("the state of peer {}", peer.name);
        let id = peer.node_id().ok();
        let record = match id {
            Some(id) => self.store.peer(&id).map_err(Self::read_err(&what))?,
            None => Default::default(),
        };
        let oversized_skipped = match id {
            Some(id) => self
                .store
                .oversized_count(&id)
                .map_err(Self::read_err(&what))?,
            None => 0,
        };
        let held = match id {
            Some(id) => self
                .store
                .reader()
                .and_then(|r| r.held_tally(&id))
                .map_err(Self::read_err(&what))?,
            None => Default::default(),
        };
        let session = id.and_then(|id| self.session(&id));
        let (pending_out, pending_in) = match session {
            Some(s) => (
                s.pending_out(last),
                s.remote_tip.saturating_sub(record.received.seq),
            ),
            None => (last.saturating_sub(record.acked), 0),
        };
        Ok(PeerStatus {
            name: peer.name.clone(),
            id: peer.id.clone(),
            addrs: peer.addrs.iter().map(|a| a.to_string()).collect(),
            connected: session.is_some(),
            connected_since_ms: session.map(|s| s.since_ms),
            last_sync_ms: (record.last_sync_ms > 0).then_some(record.last_sync_ms),
            in_sync_after_ms: session.and_then(|s| s.in_sync_after_ms),
            pending_out,
            pending_in,
            changes_in: record.changes_in,
            changes_out: record.changes_out,
            rejected: record.rejected,
            rejected_by_peer: record.rejected_by_peer,
            duplicates: record.duplicates,
            rejected_types: record.rejected_types,
            oversized_skipped,
            held: held.changes,
            held_refused_for_room: held.refused_for_room,
            policy: peer.policy.clone(),
        })
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
