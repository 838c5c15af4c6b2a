//! The records every layer shares: documents, log entries, peer records with the checkpoint
//! rule, the batches that cross between replica and sync, and the glossary of log positions.
//!
//! # Positions in the log
//! Every node numbers the entries of its own change log `1, 2, 3, …`; one such number is a
//! **SEQ**. The names below are all SEQs (or a SEQ with the hash of its change):
//! - **tip**: the last SEQ of a log (`Store::last_seq`); `Hello.tip` and `Changes.tip` carry the
//!   sender's.
//! - **checkpoint** ([`Checkpoint`]): a SEQ with the hash of that entry's change, so that a log
//!   restored from an older copy is told apart from the one that was checkpointed.
//! - **received** ([`PeerRecord::received`]): the checkpoint up to which a peer's log is durably
//!   stored here. Our `Hello.resume` sends it; the peer starts sending after it.
//! - **after / upto** ([`Claim`]): a `Changes` batch covers the sender's log from `after`
//!   (exclusive) to `upto` (inclusive).
//! - **cursor**: the last entry of our log scanned for a peer in this session.
//! - **sent upto**: the checkpoint the peer will hold once every batch sent to it is stored.
//! - **acked** ([`PeerRecord::acked`], durable) / **acked upto** (the session's): the end of
//!   the last batch the peer acknowledged together with every batch before it. A batch that
//!   was answered while an earlier one is still out is **answered**, not acked.
//! - **resume point**: where sending to a peer starts: its received checkpoint when that is
//!   in our log, else 0 (this node was restored from an older copy).

use std::collections::BTreeMap;

use automerge::{Automerge, ChangeHash};
use serde::{Deserialize, Serialize};
use tidesync_proto::{Checkpoint, DocHeader, DocId, NodeId, ObjectId, SignedChange, TypeName};

/// What a node knows about one document besides its Automerge state.
///
/// `origin`, `ty` and `id` are the document's global identity: [`DocId::derive`] of them is its
/// id, and its first change is signed by `origin`. `local_id` is the name it has on this node,
/// which differs from `id` when a prefix applies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocRecord {
    pub origin: NodeId,
    pub ty: TypeName,
    pub id: ObjectId,
    pub local_id: ObjectId,
    /// False once the document carries the deletion tombstone.
    pub live: bool,
}

/// Records the shell must commit atomically before acknowledging a write.
#[derive(Debug)]
pub struct Persist {
    pub doc_id: DocId,
    pub record: DocRecord,
    /// The document after the change, kept in the cache.
    pub doc: Automerge,
    /// Its saved form ([`crate::doc::save_state`]), stored as its current state: saved by the
    /// engine, which may run on another thread than the commit.
    pub state: Vec<u8>,
    pub change: SignedChange,
    pub hash: ChangeHash,
    /// Who signed the change: this node.
    pub author: NodeId,
    /// Unix time of the write, in milliseconds, for the change log.
    pub time_ms: i64,
    /// The files the document refers to after the change ([`crate::doc::file_refs`]).
    pub files: Vec<(crate::files::FileHash, u64)>,
    /// How many fields hold concurrent values after the change ([`crate::concurrent::count`]).
    pub concurrent: u32,
}

/// The local name of a received document whose `(type, name)` another document already has
/// here: the name, `~`, and its whole document id. Neither document is lost or merged into the
/// other. No new object may have `~` in its id ([`ObjectId::check_new`]), so nobody can claim
/// such a name in advance, and two documents never get the same one.
pub fn collision_name(name: &ObjectId, doc: &DocId) -> ObjectId {
    let suffix = collision_suffix(doc);
    let keep = tidesync_proto::ids::MAX_OBJECT_ID_BYTES - suffix.len();
    let mut base = name.as_str().to_string();
    while base.len() > keep {
        base.pop();
    }
    ObjectId::new(format!("{base}{suffix}")).unwrap_or_else(|_| name.clone())
}

/// Whether `local_id` is the collision name [`collision_name`] gives document `doc`, or the
/// one builds before store format 4 gave it (`~` and 8 hex digits of the document id).
pub fn is_collision_name(local_id: &ObjectId, doc: &DocId) -> bool {
    let id = local_id.as_str();
    id.ends_with(&collision_suffix(doc)) || id.ends_with(&format!("~{}", &doc.to_string()[..8]))
}

/// The name of the view published of the object named `local_id` here: the name itself, with
/// a collision name's mark turned into `-` (a peer refuses `~` in the id of a new object).
pub fn view_name(local_id: &ObjectId) -> ObjectId {
    let name = local_id
        .as_str()
        .replace(tidesync_proto::ids::COLLISION_MARK, "-");
    ObjectId::new(name).unwrap_or_else(|_| local_id.clone())
}

/// `~` and the document id in hex.
fn collision_suffix(doc: &DocId) -> String {
    format!("{}{doc}", tidesync_proto::ids::COLLISION_MARK)
}

/// The view of one object published to one peer.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct View {
    /// The view document's Automerge state.
    #[serde(with = "tidesync_proto::change::serde_bytes_vec")]
    pub state: Vec<u8>,
    /// Every change of the view, signed by this node, in order.
    pub changes: Vec<SignedChange>,
}

/// One entry of the change log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    pub doc: DocId,
    pub hash: [u8; 32],
    pub author: NodeId,
    /// The peer this node received the change from; `None` for its own writes.
    pub from: Option<NodeId>,
    /// When this node stored the change, Unix milliseconds.
    pub time_ms: i64,
}

/// How long one received batch spent in each stage (the metrics' histograms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchTiming {
    /// Verifying on the actor: near zero for a batch whose signatures the daemon verified
    /// before handing it over.
    pub verify: std::time::Duration,
    pub apply: std::time::Duration,
    pub commit: std::time::Duration,
}

/// A change refused by policy, as the refusal log keeps it (`refusals_v1`): which peer sent
/// it, which rule refused it, for which object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusalRow {
    pub peer: NodeId,
    pub doc: DocId,
    pub ty: String,
    /// The object's name at its origin.
    pub id: String,
    /// The rule, in a word (see [`crate::policy::Refusal::rule`]).
    pub rule: String,
    /// The refusal as a sentence.
    pub reason: String,
    /// When it was refused, Unix milliseconds.
    pub time_ms: i64,
}

/// What a node remembers of its sync with one peer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRecord {
    /// The peer's log is durably stored here up to this checkpoint.
    pub received: Checkpoint,
    /// Batches stored beyond `received` with a gap before them, as `(after, upto)`: batches in
    /// flight together may arrive out of order. The checkpoint absorbs each one once the gap
    /// before it is filled. At most [`MAX_AHEAD_BATCHES`] are remembered, and they are
    /// forgotten when a new connection to the peer starts.
    pub ahead: Vec<(u64, Checkpoint)>,
    /// The peer acknowledged our log up to this SEQ.
    pub acked: u64,
    /// Changes received from the peer and stored (not counting duplicates).
    pub changes_in: u64,
    /// Changes sent to the peer.
    pub changes_out: u64,
    /// Changes from the peer that failed verification or policy.
    pub rejected: u64,
    /// Of those, the ones refused by policy, per type: at most [`MAX_REJECTED_TYPES`] keys,
    /// the smallest counts folded into [`OTHER_REJECTED_TYPES`] (see
    /// [`PeerRecord::bound_rejected_types`]).
    pub rejected_types: BTreeMap<String, u64>,
    /// Send the peer our whole log (through its policy) at its next Hello: its policy was
    /// widened.
    pub resend_all: bool,
    /// Changes we sent that the peer reported rejecting.
    pub rejected_by_peer: u64,
    /// Duplicates received (changes already held).
    pub duplicates: u64,
    /// Last time a batch was stored or acknowledged, Unix milliseconds.
    pub last_sync_ms: i64,
}

/// Most keys of [`PeerRecord::rejected_types`], the `(other)` bucket included. A peer may send
/// changes of any number of type names; without a bound one sending 20,000 names grew its
/// record, and every `status`, to 1.26 MB.
pub const MAX_REJECTED_TYPES: usize = 64;

/// The key of [`PeerRecord::rejected_types`] that counts the refusals of every type that did
/// not keep a key of its own. Parentheses are not allowed in type names, so no type can take it.
pub const OTHER_REJECTED_TYPES: &str = "(other)";

/// Out-of-order batches remembered per peer (see [`PeerRecord::ahead`]); a sender keeps only a
/// few batches in flight, so more than this means the peer started over and they are stale.
pub const MAX_AHEAD_BATCHES: usize = 8;

impl PeerRecord {
    /// Keep at most [`MAX_REJECTED_TYPES`] keys in `rejected_types`: the types with the most
    /// refusals keep theirs (ties by name), the rest are added to [`OTHER_REJECTED_TYPES`].
    /// The total stays the same. Applied whenever a record is read or written, so records
    /// written before the bound are cut down too.
    pub fn bound_rejected_types(&mut self) {
        if self.rejected_types.len() <= MAX_REJECTED_TYPES {
            return;
        }
        let mut other = self
            .rejected_types
            .remove(OTHER_REJECTED_TYPES)
            .unwrap_or(0);
        let mut by_count: Vec<(String, u64)> = std::mem::take(&mut self.rejected_types)
            .into_iter()
            .collect();
        by_count.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let folded = by_count.split_off((MAX_REJECTED_TYPES - 1).min(by_count.len()));
        for (_, n) in folded {
            other = other.saturating_add(n);
        }
        self.rejected_types = by_count.into_iter().collect();
        self.rejected_types
            .insert(OTHER_REJECTED_TYPES.to_string(), other);
    }

    /// Record that the peer's log from `after` to `upto` is durably stored here; moves the
    /// checkpoint when that leaves no gap, or when `restart` (a batch from the start of the
    /// peer's log, `after` 0, newer than any other of its session: the peer started its log
    /// over, and the checkpoint may move back), absorbing any batches stored ahead of it.
    /// Whether the checkpoint moved.
    pub fn stored(&mut self, after: u64, upto: Checkpoint, restart: bool) -> bool {
        let before = self.received.seq;
        let restart = restart && after == 0;
        if restart || (after <= self.received.seq && upto.seq >= self.received.seq) {
            self.received = upto;
        } else if after > self.received.seq {
            self.ahead.push((after, upto));
            if self.ahead.len() > MAX_AHEAD_BATCHES {
                self.ahead.remove(0);
            }
        }
        while let Some(i) = self
            .ahead
            .iter()
            .position(|(a, u)| *a <= self.received.seq && u.seq >= self.received.seq)
        {
            self.received = self.ahead.remove(i).1;
        }
        let received = self.received.seq;
        self.ahead.retain(|(_, u)| u.seq > received);
        self.received.seq != before || restart
    }
}

/// What a received batch says of the sender's log: it holds the entries from `after` to
/// `upto` (those the receiver may have; see [`PeerRecord::stored`]). A batch without a claim
/// (an export bundle's, but for its last part) leaves the checkpoint where it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    pub after: u64,
    pub upto: Checkpoint,
    /// The batch may start the sender's log over (see [`PeerRecord::stored`]).
    pub restart: bool,
}

/// A range of the log read for one peer.
#[derive(Debug, Default)]
pub struct OutBatch {
    pub docs: Vec<DocHeader>,
    pub changes: Vec<SignedChange>,
    /// The last log entry scanned (sent or skipped).
    pub upto: Checkpoint,
    /// The log SEQ of each of the first changes, those read from the log (views and carried
    /// objects follow them and have none).
    pub seqs: Vec<u64>,
    /// The encoded size of `docs` and `changes` (see [`crate::model::change_wire_bytes`]).
    pub bytes: usize,
    /// Log entries passed over because their change alone can never fit in a batch: SEQ,
    /// entry and encoded size.
    pub oversized: Vec<(u64, LogEntry, usize)>,
    /// The views in the batch and, for each, how many of its changes the peer holds once it
    /// stores the batch.
    pub views: Vec<(DocId, u64)>,
    /// Objects owed to the peer (owed references, the store's `refs_owed_v1`) that this batch carries: settled
    /// once it is acknowledged.
    pub owed: Vec<DocId>,
    /// Under a hard limit, the frame bytes the first change that did not fit needs (the
    /// batch holds none then): it waits for more room.
    pub held: Option<usize>,
}

/// Proof that an author signed two different changes with the same actor and sequence number
/// in one document: an honest node never does (each start draws a fresh epoch, so its actor
/// is new). Both signed changes are kept, and both join the log so that every node the
/// document reaches learns of it. Stored in `equivocations_v1` (postcard).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Equivocation {
    pub doc: DocId,
    /// The node whose key signed both changes.
    pub author: NodeId,
    /// The Automerge actor both changes claim, and their sequence number.
    #[serde(with = "tidesync_proto::change::serde_bytes_vec")]
    pub actor: Vec<u8>,
    pub seq: u64,
    /// The change this node had first, and the one that contradicted it.
    pub first: SignedChange,
    pub second: SignedChange,
    /// When this node found it, Unix milliseconds.
    pub detected_ms: i64,
}

/// What one document refuses because of equivocations: every change of an equivocating
/// actor from the contested sequence number on (the cut), and every change that depends on
/// a refused one. The same on every node that knows the same equivocations, whatever order
/// the changes arrived in, so the document converges without them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DocBans {
    /// Per equivocating actor, the lowest contested sequence number.
    pub cuts: BTreeMap<Vec<u8>, u64>,
    /// Changes refused so far (the cut's and their dependents).
    pub banned: std::collections::HashSet<ChangeHash>,
}

impl DocBans {
    /// No equivocation touches the document.
    pub fn is_empty(&self) -> bool {
        self.cuts.is_empty() && self.banned.is_empty()
    }

    /// Whether `change` is refused: it is at or past a cut, or it depends on a refused change.
    pub fn refuses(&self, change: &automerge::Change) -> bool {
        if self.banned.contains(&change.hash()) {
            return true;
        }
        if let Some(cut) = self.cuts.get(change.actor_id().to_bytes())
            && change.seq() >= *cut
        {
            return true;
        }
        change.deps().iter().any(|d| self.banned.contains(d))
    }
}

/// One document's share of a received batch, ready to commit.
#[derive(Debug)]
pub struct ReceivedDoc {
    pub doc_id: DocId,
    pub header: DocHeader,
    /// The record to store, when at least one change was applied.
    pub record: Option<DocRecord>,
    /// The new document state, when at least one change was applied.
    pub state: Option<Vec<u8>>,
    /// Applied changes, in the order they were applied: these join the log, each with its
    /// author and the peer it came from (a released change keeps the sender it was held for).
    pub applied: Vec<(SignedChange, ChangeHash, NodeId, Option<NodeId>)>,
    /// Changes to hold until their dependencies arrive (from the batch's sender).
    pub held: Vec<(SignedChange, ChangeHash)>,
    /// Previously held changes that have now been applied.
    pub released: Vec<ChangeHash>,
    /// Previously held changes that our current policy for their sender now refuses.
    pub dropped: Vec<ChangeHash>,
    /// Taken only because an object from the same peer references it (see `by_ref_v1`).
    pub by_ref: bool,
    /// Equivocations found in this batch (see [`Equivocation`]).
    pub equivocations: Vec<Equivocation>,
    /// Changes refused because of an equivocation: recorded so that they are dropped as known
    /// when they arrive again.
    pub banned: Vec<ChangeHash>,
    /// This document is a view written for this node of an object it holds in full: the
    /// object moves to its collision name and the view takes its name.
    pub supersedes: Option<DocId>,
    /// The files the new state refers to ([`crate::doc::file_refs`]; empty without a state).
    pub files: Vec<(crate::files::FileHash, u64)>,
    /// How many fields of the new state hold concurrent values (0 without a state).
    pub concurrent: u32,
    /// Files to want because of this document (decided by the replica from its policy for
    /// the sender; the store adds each one it does not hold, within the claimant's quota).
    pub wants: Vec<WantRow>,
}

impl ReceivedDoc {
    /// A document of which nothing is stored.
    pub fn nothing(header: DocHeader) -> ReceivedDoc {
        ReceivedDoc {
            doc_id: header.doc,
            header,
            record: None,
            state: None,
            applied: Vec::new(),
            held: Vec::new(),
            released: Vec::new(),
            dropped: Vec::new(),
            by_ref: false,
            equivocations: Vec::new(),
            banned: Vec::new(),
            supersedes: None,
            files: Vec::new(),
            concurrent: 0,
            wants: Vec::new(),
        }
    }
}

/// The bytes `value` takes as postcard writes it, counted without writing it; a value
/// postcard cannot encode counts as too large for anything.
fn encoded_size<T: serde::Serialize>(value: &T) -> usize {
    postcard::experimental::serialized_size(value).unwrap_or(usize::MAX)
}

/// The bytes `change` takes in a `Changes` message, as postcard writes it.
pub fn change_wire_bytes(change: &SignedChange) -> usize {
    encoded_size(change)
}

/// The bytes `header` takes in a `Changes` message, as postcard writes it.
pub fn header_wire_bytes(header: &DocHeader) -> usize {
    encoded_size(header)
}

/// A reading of the network shell's counters (`NetCounters` in `net.rs`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetTotals {
    pub frames_in: u64,
    pub frames_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Bytes of the files protocol (`/tidesync/files/1`), each way.
    #[serde(default)]
    pub file_bytes_in: u64,
    #[serde(default)]
    pub file_bytes_out: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A checkpoint at `seq` with a hash made from it.
    fn cp(seq: u64) -> Checkpoint {
        Checkpoint {
            seq,
            hash: [seq as u8; 32],
        }
    }

    // Regression: two batches in flight travel on separate substreams and can arrive out of
    // order; the later one was stored but the checkpoint never caught up past it, so every
    // reconnect resent everything after the first gap (an idle resync moved 5.9 MB).
    #[test]
    fn the_checkpoint_catches_up_over_batches_that_arrived_early() {
        let mut r = PeerRecord::default();
        assert!(
            !r.stored(2000, cp(4000), false),
            "a gap before it: no move yet"
        );
        assert_eq!(r.received.seq, 0);
        assert!(
            r.stored(0, cp(2000), true),
            "the gap filled: both batches count"
        );
        assert_eq!(r.received, cp(4000));
        assert!(r.ahead.is_empty());
        // In order it simply moves; a batch wholly behind the checkpoint changes nothing.
        assert!(r.stored(4000, cp(6000), false));
        assert!(!r.stored(2000, cp(3000), false));
        assert_eq!(r.received, cp(6000));
        // Only so many early batches are remembered.
        for i in 0..(MAX_AHEAD_BATCHES as u64 + 3) {
            r.stored(10_000 + i * 10, cp(10_005 + i * 10), false);
        }
        assert_eq!(r.ahead.len(), MAX_AHEAD_BATCHES);
    }

    // Regression (found by the simulation, seed 1029 of the star sweep): a batch from the
    // start of the log (`after` 0) always reset the checkpoint to its end, so a copy of a
    // session's first batch arriving late moved it back; every later batch then waited
    // "ahead" of a gap that never filled, and each reconnect resent the whole log.
    #[test]
    fn a_late_copy_of_a_first_batch_does_not_move_the_checkpoint_back() {
        let mut r = PeerRecord::default();
        assert!(r.stored(0, cp(2), true));
        assert!(r.stored(2, cp(5), false));
        assert!(!r.stored(0, cp(2), false), "an old copy: no move");
        assert_eq!(r.received, cp(5));
        // A peer that really starts over (a newer batch from 0) moves it back.
        assert!(r.stored(0, cp(3), true));
        assert_eq!(r.received, cp(3));
    }
}

/// A file this node wants: referenced by an object it holds, allowed by its policy for the
/// peer that sent the object, not yet stored whole (`wants_v1`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WantRow {
    pub hash: crate::files::FileHash,
    pub size: u64,
    /// The peer whose object made this node want the file: its quota pays for it.
    pub claimant: NodeId,
    /// Peers that may hold it: those that sent objects referencing it, and their origins
    /// (at most [`MAX_WANT_SOURCES`]).
    pub sources: Vec<NodeId>,
    /// Fetched only when a read asks for it (`--files on-demand`).
    pub on_demand: bool,
    pub added_ms: i64,
    /// Segments verified and durable, one bit each (segment `n` is bit `n % 8` of byte
    /// `n / 8`).
    #[serde(with = "tidesync_proto::change::serde_bytes_vec")]
    pub done: Vec<u8>,
    /// The last failure fetching it, from any peer.
    pub last_error: Option<String>,
}

/// Most peers remembered as sources of one wanted file.
pub const MAX_WANT_SOURCES: usize = 16;

/// What status shows of fetching files from and serving them to one peer, since start.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerFiles {
    /// Files on the want-list this peer is a source of.
    pub wanted: u64,
    /// Segment asks to it in flight now.
    pub transferring: u64,
    /// File bytes verified from it.
    pub bytes_in: u64,
    /// File bytes served to it.
    pub bytes_out: u64,
    /// Segments from it that did not verify.
    pub corrupt_segments: u64,
    pub last_error: Option<String>,
}

/// What status shows of files: the want-list and each peer's transfers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilesStatus {
    /// Files on the want-list.
    pub wanted: u64,
    /// Bytes of those files still missing.
    pub missing_bytes: u64,
    /// Per peer, by PeerId.
    pub peers: BTreeMap<String, PeerFiles>,
}
