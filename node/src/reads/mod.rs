//! Reads of what the store last committed (objects, histories, the change feed, collisions,
//! status): a cloneable view that answers off the node actor, so the API keeps answering
//! while the actor verifies, applies or commits.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};
use tidesync_proto::{DocId, NodeId, ObjectId, TypeName};

use crate::doc;
use crate::model::DocRecord;
use crate::store::{IdPage, Store, StoreError, TypeCount};

mod fleet;
mod inbox;
pub use fleet::FleetNode;
pub use inbox::{Conflict, EquivocationReport, HeldWait, MAX_INBOX_ITEMS_PER_KIND, RefusalReport};

/// Most ids returned by one page of a listing.
pub const MAX_PAGE_IDS: usize = 10_000;
/// Ids per page of a listing when the caller does not say.
pub const DEFAULT_PAGE_IDS: usize = 1_000;
/// Most entries returned by one page of the change feed.
pub const MAX_FEED_ENTRIES: usize = 10_000;

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
    /// Files stored here after `files_since`, when the request gave it: a numbering of its
    /// own beside the changes' SEQs (see [`FileFeed`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<FileFeed>,
}

/// The file feed: every file stored on this node (uploaded, or downloaded whole and verified
/// because an object here refers to it), numbered from 1 in the order it was stored. The
/// numbers are not change SEQs: an application follows both cursors, `since` for changes and
/// `files_since` for files (to regenerate a thumbnail once an image has arrived, say).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileFeed {
    pub events: Vec<FileFeedEntry>,
    /// Resume with `files_since = last`.
    pub last: u64,
}

/// One stored file in the file feed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileFeedEntry {
    pub n: u64,
    pub hash: String,
    pub size: u64,
    pub time_ms: i64,
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
    /// Equivocations found here: an author signed two different changes with one actor and
    /// sequence number (listed by `tidesync conflicts`).
    #[serde(default)]
    pub equivocations: u64,
    /// The authors of those equivocations (PeerIds), each once.
    #[serde(default)]
    pub equivocators: Vec<String>,
    /// Changes refused because they are part of an equivocation or depend on one.
    #[serde(default)]
    pub refused_for_equivocation: u64,
    /// Fields holding concurrent values, over all objects (listed by `tidesync conflicts`).
    #[serde(default)]
    pub concurrent_fields: u64,
    /// Changes refused by policy in the refusal log (the newest
    /// [`crate::store::MAX_REFUSALS_KEPT`]; the peers' counters count all).
    #[serde(default)]
    pub refusals_logged: u64,
    /// Addresses the node listens on for peers (running node only).
    #[serde(default)]
    pub listen: Vec<String>,
    /// Incoming connections refused, because the peer is not configured or the connection
    /// limits were reached (running node, since start).
    #[serde(default)]
    pub refused_connections: u64,
    /// Nodes that are not configured found by mDNS (running node, since start): never
    /// dialled, and refused if they dial.
    #[serde(default)]
    pub discovered_strangers: u64,
    /// Configured peers found by mDNS (running node, since start).
    #[serde(default)]
    pub discovered_peers: u64,
    /// Sync frames and bytes sent and received (running node, since start).
    #[serde(default)]
    pub net: crate::model::NetTotals,
    #[serde(default)]
    pub peers: Vec<PeerStatus>,
    /// The want-list and each peer's file transfers (running node, since start).
    #[serde(default)]
    pub files: crate::model::FilesStatus,
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
    /// While connected: the transport, `tcp` or `quic`.
    #[serde(default)]
    pub via: Option<String>,
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
    /// While connected: the pace of sending to the peer, most content bytes per batch and most
    /// batches in flight; smaller than a healthy link's after failed transfers.
    #[serde(default)]
    pub batch_bytes: Option<u64>,
    #[serde(default)]
    pub window: Option<u64>,
    /// Why nothing more goes to the peer now: outside its sync windows, its daily budget
    /// spent, or paced by its rate (running node, while connected).
    #[serde(default)]
    pub held_back: Option<String>,
    /// Bytes sent to the peer today (UTC), against its `budget`; none without one.
    #[serde(default)]
    pub sent_today: Option<u64>,
    /// Bytes of sync frames from and to the peer (running node, since start).
    #[serde(default)]
    pub bytes_in: u64,
    #[serde(default)]
    pub bytes_out: u64,
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

/// Why a read failed. Each names what was read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{ty}/{id} does not exist")]
    NotFound { ty: TypeName, id: ObjectId },
    #[error("cannot read {what}: {source}")]
    Store { what: String, source: StoreError },
}

/// What status needs of a connected peer's session: a copy the node actor publishes after
/// each step, so that status is answered without it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionSummary {
    /// When the session started, Unix milliseconds.
    pub since_ms: i64,
    /// The peer's last SEQ, as it last told us.
    pub remote_tip: u64,
    /// The last entry of our log scanned for the peer.
    pub cursor: u64,
    /// Changes sent and not yet acknowledged.
    pub unacked: u64,
    /// How long the session took to come in sync, if it has.
    pub in_sync_after_ms: Option<i64>,
    /// The pace of sending to the peer: most content bytes per batch, most batches in flight
    /// (see [`crate::sync::pace`]).
    pub batch_bytes: u64,
    pub window: u64,
    /// Why nothing more goes to the peer now (its windows, budget or rate).
    pub held_back: Option<crate::link::HeldBack>,
    /// The transport the connection runs over.
    pub via: Option<crate::link::Transport>,
}

impl SessionSummary {
    /// At most how many of our log entries up to `last` have not been acknowledged yet.
    pub fn pending_out(&self, last: u64) -> u64 {
        last.saturating_sub(self.cursor) + self.unacked
    }
}

/// The connected peers' sessions, by peer.
pub type Sessions = BTreeMap<NodeId, SessionSummary>;

/// A read-only view of one node's store. Each read opens its own read transaction, so it sees
/// the last commit whole and never waits for a write in progress.
#[derive(Clone)]
pub struct Reads {
    store: Store,
    node: NodeId,
    name: String,
    running: bool,
}

impl Reads {
    /// The store these reads come from (files are read and added through it, off the actor).
    pub fn store(&self) -> &Store {
        &self.store
    }
}

pub(crate) fn read_err(what: impl std::fmt::Display) -> impl FnOnce(StoreError) -> ReadError {
    let what = what.to_string();
    move |source| ReadError::Store { what, source }
}

impl Reads {
    /// A view of `store`, the store of node `node` called `name`; `running` is reported by
    /// status.
    pub fn new(store: Store, node: NodeId, name: String, running: bool) -> Reads {
        Reads {
            store,
            node,
            name,
            running,
        }
    }

    /// The document that the local name `ty/id` points to, with its record.
    pub fn find(
        &self,
        ty: &TypeName,
        id: &ObjectId,
    ) -> Result<Option<(DocId, DocRecord)>, StoreError> {
        self.store.reader()?.find(ty, id)
    }

    /// An object's document and record, deleted or not.
    fn doc_of(
        &self,
        ty: &TypeName,
        id: &ObjectId,
    ) -> Result<(DocId, DocRecord, automerge::Automerge), ReadError> {
        let what = format!("{ty}/{id}");
        let not_found = || ReadError::NotFound {
            ty: ty.clone(),
            id: id.clone(),
        };
        let (doc_id, record) = self
            .find(ty, id)
            .map_err(read_err(&what))?
            .ok_or_else(not_found)?;
        let doc = self
            .store
            .load_doc(&doc_id)
            .map_err(read_err(&what))?
            .ok_or_else(not_found)?;
        Ok((doc_id, record, doc))
    }

    /// The live object `ty/id` as JSON.
    pub fn get(&self, ty: &TypeName, id: &ObjectId) -> Result<Map<String, Json>, ReadError> {
        let (_, record, doc) = self.doc_of(ty, id)?;
        if !record.live {
            return Err(ReadError::NotFound {
                ty: ty.clone(),
                id: id.clone(),
            });
        }
        Ok(doc::to_json(&doc))
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
            .map_err(read_err(format!("the ids of {ty}")))
    }

    /// Every change of `ty/id` (deleted objects too), with each signature checked.
    pub fn history(&self, ty: &TypeName, id: &ObjectId) -> Result<History, ReadError> {
        let what = format!("the history of {ty}/{id}");
        let (doc_id, record, doc) = self.doc_of(ty, id)?;
        let changes: Vec<_> = doc.get_changes(&[]);
        let mut entries = Vec::with_capacity(changes.len());
        for change in changes {
            let hash = change.hash();
            let checked = self.check_stored(&doc_id, &hash).map_err(read_err(&what))?;
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
            deleted: doc::is_deleted(&doc),
            changes: entries,
        })
    }

    /// Whether the stored signed copy of change `hash` of `doc_id` verifies: its author, or
    /// why not.
    pub fn check_stored(
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

    /// The change feed after `since`, at most `limit` entries.
    /// The file feed after `since` (see [`FileFeed`]).
    pub fn file_feed(&self, since: u64, limit: usize) -> Result<FileFeed, ReadError> {
        let (events, last) = self
            .store
            .file_feed(since, limit.clamp(1, MAX_FEED_ENTRIES))
            .map_err(read_err("the file feed"))?;
        Ok(FileFeed {
            events: events
                .into_iter()
                .map(|(n, e)| FileFeedEntry {
                    n,
                    hash: e.hash.to_string(),
                    size: e.size,
                    time_ms: e.time_ms,
                })
                .collect(),
            last,
        })
    }

    pub fn changes(&self, since: u64, limit: usize) -> Result<Feed, ReadError> {
        let what = "the change feed";
        let log = self
            .store
            .log_since(since, limit.clamp(1, MAX_FEED_ENTRIES))
            .map_err(read_err(what))?;
        let mut changes = Vec::with_capacity(log.len());
        let reader = self.store.reader().map_err(read_err(what))?;
        let mut names: BTreeMap<DocId, Option<DocRecord>> = BTreeMap::new();
        for (seq, entry) in log {
            let record = match names.entry(entry.doc) {
                std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert(reader.record(&entry.doc).map_err(read_err(what))?)
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
        Ok(Feed {
            changes,
            last,
            files: None,
        })
    }

    /// The last SEQ in the change log.
    pub fn last_seq(&self) -> Result<u64, ReadError> {
        self.store.last_seq().map_err(read_err("the change log"))
    }

    /// The node's status, with the sync state of each configured peer; `sessions` holds the
    /// connected ones.
    pub fn status(
        &self,
        peers: &[crate::config::PeerConfig],
        sessions: &Sessions,
    ) -> Result<Status, ReadError> {
        let what = "the node status";
        let last_seq = self.store.last_seq().map_err(read_err(what))?;
        let equivocations = self.store.equivocations().map_err(read_err(what))?;
        Ok(Status {
            node: self.node.to_string(),
            name: self.name.clone(),
            running: self.running,
            objects: self.store.counts().map_err(read_err(what))?,
            last_seq,
            store_bytes: self.store.size_bytes(),
            held_changes: self.store.pending_count().map_err(read_err(what))?,
            collisions: self.store.collision_count().map_err(read_err(what))?,
            equivocations: equivocations.len() as u64,
            equivocators: equivocations
                .iter()
                .map(|e| e.author.to_string())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect(),
            refused_for_equivocation: self.store.banned_count().map_err(read_err(what))?,
            concurrent_fields: self.store.concurrent_count().map_err(read_err(what))?,
            refusals_logged: self.store.refusal_count().map_err(read_err(what))?,
            listen: Vec::new(),
            refused_connections: 0,
            discovered_strangers: 0,
            discovered_peers: 0,
            net: Default::default(),
            files: Default::default(),
            peers: peers
                .iter()
                .map(|p| {
                    let session = sessions.get(&p.id);
                    self.peer_status(p, last_seq, session)
                })
                .collect::<Result<_, _>>()?,
        })
    }

    /// The sync state of one configured peer, given our log's last SEQ and its session.
    fn peer_status(
        &self,
        peer: &crate::config::PeerConfig,
        last: u64,
        session: Option<&SessionSummary>,
    ) -> Result<PeerStatus, ReadError> {
        let what = format!("the state of peer {}", peer.name);
        let id = peer.id;
        let record = self.store.peer(&id).map_err(read_err(&what))?;
        let oversized_skipped = self.store.oversized_count(&id).map_err(read_err(&what))?;
        let held = self
            .store
            .reader()
            .and_then(|r| r.held_tally(&id))
            .map_err(read_err(&what))?;
        let (pending_out, pending_in) = match session {
            Some(s) => (
                s.pending_out(last),
                s.remote_tip.saturating_sub(record.received.seq),
            ),
            None => (last.saturating_sub(record.acked), 0),
        };
        Ok(PeerStatus {
            name: peer.name.clone(),
            id: peer.id.to_string(),
            addrs: peer.addrs.iter().map(|a| a.to_string()).collect(),
            connected: session.is_some(),
            connected_since_ms: session.map(|s| s.since_ms),
            via: session.and_then(|s| s.via).map(|t| t.name().to_string()),
            last_sync_ms: (record.last_sync_ms > 0).then_some(record.last_sync_ms),
            in_sync_after_ms: session.and_then(|s| s.in_sync_after_ms),
            batch_bytes: session.map(|s| s.batch_bytes),
            window: session.map(|s| s.window),
            held_back: session.and_then(|s| s.held_back).map(|h| h.to_string()),
            sent_today: match peer.policy.link.budget {
                Some(_) => Some(
                    self.store
                        .meter(&id)
                        .map_err(read_err(&what))?
                        .on_day(peer.policy.link.day(crate::replica::system_now_ms()))
                        .bytes,
                ),
                None => None,
            },
            pending_out,
            pending_in,
            changes_in: record.changes_in,
            changes_out: record.changes_out,
            rejected: record.rejected,
            rejected_by_peer: record.rejected_by_peer,
            duplicates: record.duplicates,
            bytes_in: 0,
            bytes_out: 0,
            rejected_types: record.rejected_types,
            oversized_skipped,
            held: held.changes,
            held_refused_for_room: held.refused_for_room,
            policy: peer.policy.clone(),
        })
    }
}
