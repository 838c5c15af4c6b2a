//! What goes into one batch for a peer: log changes, views and carried references, all
//! counted at their encoded size against a byte budget below the frame limit.
//!
//! A batch is built in log order. Each log entry forms a group with what it brings along (the
//! view of its object, the objects it references); a group goes in whole or the batch ends
//! before it, so the next batch starts with it. Only a group that cannot fit even alone is
//! split: its log change goes with as much of the rest as fits, and referenced objects left
//! out are recorded as owed and sent on their own once that batch is acknowledged.

use std::collections::{BTreeSet, HashMap, HashSet};

use tidesync_proto::wire::{FRAME_HEADER_BYTES, MAX_FRAME_BYTES};
use tidesync_proto::{Checkpoint, DocHeader, DocId, NodeId, SignedChange};

use super::{Replica, SyncError};
use crate::model::DocRecord;
use crate::model::{LogEntry, OutBatch, change_wire_bytes, header_wire_bytes};
use crate::store::{Reader, StoreError};

/// Most changes in one `Changes` batch. 2,000 synced 50,000 objects about 10 % faster than
/// 1,000 (fewer commits); frames stay near 1 MB. Bytes are bounded by
/// [`SYNC_BATCH_BYTES`].
pub const SYNC_BATCH_CHANGES: usize = 2_000;
/// Most log entries scanned for one batch, so that a long run of entries the peer already has
/// costs a bounded amount of work per step.
pub const SYNC_SCAN_ENTRIES: usize = 4 * SYNC_BATCH_CHANGES;
/// Bytes of a frame kept free below `MAX_FRAME_BYTES`: for the `Changes` message's own fields
/// (version, numbers, checkpoint, list lengths: under 128 bytes) and any growth of them.
pub const FRAME_HEADROOM_BYTES: usize = 64 * 1024;
/// Most encoded bytes of one `Changes` frame (length prefix included).
pub const SYNC_BATCH_BYTES: usize = MAX_FRAME_BYTES - FRAME_HEADROOM_BYTES;
/// The fixed part of a `Changes` frame, counted generously: the 4-byte length, the version,
/// the message tag, four u64 varints, a 32-byte hash and two list lengths.
pub const CHANGES_OVERHEAD_BYTES: usize = 256;
/// Most encoded bytes of the document headers and signed changes of one batch.
pub const SYNC_BATCH_CONTENT_BYTES: usize = SYNC_BATCH_BYTES - CHANGES_OVERHEAD_BYTES;
/// Most encoded bytes of one signed change this node writes (PUT, bulk POST, CLI): three
/// quarters of the batch budget, so a local change always fits in a frame with its header,
/// whatever its type and id. Distinct from proto's limit on any change (`MAX_CHANGE_BYTES`,
/// defined there), which this must stay at or under.
pub const MAX_LOCAL_CHANGE_BYTES: usize = {
    let frame_share = SYNC_BATCH_BYTES / 4 * 3;
    // Never more than any peer accepts (proto's limit on every change it reads).
    if frame_share < tidesync_proto::MAX_CHANGE_BYTES {
        frame_share
    } else {
        tidesync_proto::MAX_CHANGE_BYTES
    }
};
/// How many content bytes (headers and changes, see [`SYNC_BATCH_CONTENT_BYTES`]) a batch
/// may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub bytes: usize,
    /// A hard limit (the day's budget binds): a change that does not fit waits, even the
    /// first of the batch. A soft limit (the pace) lets a larger change go alone.
    pub strict: bool,
}

impl Limit {
    /// A limit the first change may exceed, alone.
    pub const fn soft(bytes: usize) -> Limit {
        Limit {
            bytes,
            strict: false,
        }
    }
}

/// Most documents one batch carries because objects in it reference them (see
/// [`crate::policy::Policy::refs`]); the rest are carried by later batches.
pub const MAX_REFERENCED_DOCS_PER_BATCH: usize = 1_000;

/// The largest encoded document header: two ids, a type name and an object id at their limits.
const MAX_HEADER_BYTES: usize = 16
    + 32
    + 2
    + tidesync_proto::ids::MAX_TYPE_NAME_BYTES
    + 2
    + tidesync_proto::ids::MAX_OBJECT_ID_BYTES;
const _: () = assert!(
    MAX_LOCAL_CHANGE_BYTES + MAX_HEADER_BYTES < SYNC_BATCH_CONTENT_BYTES,
    "a local change must always fit in a batch with its header"
);
const _: () = assert!(SYNC_BATCH_BYTES + FRAME_HEADER_BYTES < MAX_FRAME_BYTES);

/// What a log entry brings into the batch besides its own change.
#[derive(Default)]
pub(crate) struct Extra {
    pub docs: Vec<DocHeader>,
    pub changes: Vec<SignedChange>,
    pub bytes: usize,
    /// A view: its object, and how many of its changes the peer holds once it stores this.
    pub view: Option<(DocId, u64)>,
    /// Documents carried by reference.
    pub carried: Vec<DocId>,
    /// Referenced documents that did not fit.
    pub left_out: Vec<DocId>,
    /// Whether something that belongs here was left out for want of room.
    pub trimmed: bool,
}

/// Something to bring along with the log entry at a SEQ.
enum Trigger {
    View(DocId),
    Refs(DocId),
}

impl Replica {
    /// The next stretch of our log after `cursor` that `peer` may have, by our policy for it
    /// (see the module's documentation): entries authored by or received from the peer are
    /// left out unless `unfiltered`, and so are the entries in `ahead` (the peer acknowledged
    /// them ahead of log order, see [`Replica::read_ahead`]); views are brought up to date and
    /// referenced objects carried (recorded in `by_ref`). Export bundles are read this way.
    pub(crate) fn read_for(
        &mut self,
        peer: NodeId,
        cursor: u64,
        unfiltered: bool,
        by_ref: &mut HashSet<DocId>,
        ahead: &BTreeSet<u64>,
    ) -> Result<OutBatch, SyncError> {
        self.read_next(
            peer,
            (cursor, ahead),
            unfiltered,
            by_ref,
            false,
            Limit::soft(SYNC_BATCH_CONTENT_BYTES),
        )
    }

    /// The next changes after `after` of the types our policy for `peer` gives priority to
    /// (see [`crate::policy::Policy::priority`]), to send ahead of log order: in log order
    /// among themselves, leaving out what the peer acknowledged ahead already (`ahead`), what
    /// it authored or sent us (unless `unfiltered`), types sent as views, and objects only
    /// carried by reference. The batch's `upto` is the last entry scanned; it claims nothing.
    pub(crate) fn read_ahead(
        &self,
        peer: NodeId,
        after: u64,
        unfiltered: bool,
        ahead: &BTreeSet<u64>,
        limit: Limit,
    ) -> Result<OutBatch, SyncError> {
        let policy = self.policies.of(&peer);
        let policies = &self.policies;
        let skip_entry = left_out(peer, unfiltered, ahead);
        let skip_doc = |_: u64, _: &DocId, rec: &DocRecord| {
            !policy.priority.contains(&rec.ty)
                || policy.publishes_view(&rec.ty)
                || !policies.may_send(&peer, rec, false)
        };
        let reader = self
            .store
            .reader()
            .map_err(|source| SyncError::Store { peer, source })?;
        scan_log(&reader, after, limit, skip_entry, skip_doc)
            .map_err(|source| SyncError::Store { peer, source })
    }

    /// As [`Replica::read_for`]; when `idle` (no batch to the peer in flight), objects owed to
    /// the peer (see [`crate::store::Store::owed_refs`]) go first, in a batch of their own
    /// that covers no log entry. A batch holds at most `limit` of content (the peer's pace,
    /// see [`crate::sync::pace`], or what is left of its day's budget), or one change alone
    /// when that change is larger and the limit is soft.
    pub(crate) fn read_next(
        &mut self,
        peer: NodeId,
        (cursor, ahead): (u64, &BTreeSet<u64>),
        unfiltered: bool,
        by_ref: &mut HashSet<DocId>,
        idle: bool,
        limit: Limit,
    ) -> Result<OutBatch, SyncError> {
        let err = |source| SyncError::Store { peer, source };
        if idle && !self.policies.of(&peer).refs.is_empty() {
            let owed = self.store.owed_refs(&peer).map_err(err)?;
            if !owed.is_empty() {
                let upto = self.checkpoint_at(peer, cursor)?;
                return self.owed_batch(peer, owed, upto, by_ref);
            }
        }
        let policy = self.policies.of(&peer);
        let policies = &self.policies;
        let skip_entry = left_out(peer, unfiltered, ahead);
        // Objects of types published to this peer as views (`fields`) are noted here, never
        // sent themselves.
        let mut to_view = Vec::new();
        let skip_doc = |seq: u64, doc: &DocId, rec: &DocRecord| {
            if policy.publishes_view(&rec.ty) {
                to_view.push((seq, *doc));
            }
            !policies.may_send(&peer, rec, by_ref.contains(doc))
        };
        let reader = self.store.reader().map_err(err)?;
        let mut batch = scan_log(&reader, cursor, limit, skip_entry, skip_doc).map_err(err)?;
        drop(reader);
        // The scan's checkpoint holds the hash of the last entry scanned, perhaps one this
        // peer may not see: it leaves as the peer's token.
        batch.upto = self.checkpoint_at(peer, batch.upto.seq)?;
        self.report_oversized(peer, &batch.oversized)?;
        let mut triggers: Vec<(u64, Trigger)> = Vec::new();
        let mut seen = HashSet::new();
        for (seq, doc) in to_view {
            if seen.insert(doc) {
                triggers.push((seq, Trigger::View(doc)));
            }
        }
        let refs_out =
            !policy.refs.is_empty() && policy.direction != crate::policy::Direction::Receive;
        if refs_out {
            let referring: HashSet<DocId> = batch
                .docs
                .iter()
                .filter(|h| policy.refs.contains_key(&h.ty))
                .map(|h| h.doc)
                .collect();
            let mut seen = HashSet::new();
            for (change, seq) in batch.changes.iter().zip(&batch.seqs) {
                if referring.contains(&change.doc) && seen.insert(change.doc) {
                    triggers.push((*seq, Trigger::Refs(change.doc)));
                }
            }
        }
        if triggers.is_empty() {
            return Ok(batch);
        }
        triggers.sort_by_key(|(seq, _)| *seq);
        self.assemble(peer, cursor, batch, triggers, by_ref)
    }

    /// The checkpoint of our log at `seq` for `peer` (see [`Replica::checkpoint_for`]).
    fn checkpoint_at(&self, peer: NodeId, seq: u64) -> Result<Checkpoint, SyncError> {
        Ok(self
            .checkpoint_for(&peer, seq)
            .map_err(|source| SyncError::Store { peer, source })?
            .unwrap_or(Checkpoint { seq, hash: [0; 32] }))
    }

    /// Count and log, once per peer and change, stored changes that can never be sent.
    fn report_oversized(
        &self,
        peer: NodeId,
        oversized: &[(u64, LogEntry, usize)],
    ) -> Result<(), SyncError> {
        for (seq, entry, bytes) in oversized {
            let fresh = self
                .store
                .note_oversized(&peer, &entry.doc, &entry.hash, *bytes as u64)
                .map_err(|source| SyncError::Store { peer, source })?;
            if fresh {
                tracing::warn!(%peer, seq, doc = %entry.doc, bytes, limit = SYNC_BATCH_CONTENT_BYTES, "a stored change is too large for any frame to this peer; it is skipped (counted in the peer's status)");
            }
        }
        Ok(())
    }

    /// Add views and carried references to `batch`, group by group in log order, ending the
    /// batch before the first group that does not fit (see the module's documentation).
    fn assemble(
        &self,
        peer: NodeId,
        cursor: u64,
        mut batch: OutBatch,
        triggers: Vec<(u64, Trigger)>,
        by_ref: &mut HashSet<DocId>,
    ) -> Result<OutBatch, SyncError> {
        let err = |source| SyncError::Store { peer, source };
        let reader = self.store.reader().map_err(err)?;
        let acks = if cursor == 0 {
            // From the start (a new peer, a resend after a widening, an export of
            // everything): send views whole.
            Default::default()
        } else {
            self.store.view_acks(&peer).map_err(err)?
        };
        let mut headed: HashSet<DocId> = batch.docs.iter().map(|h| h.doc).collect();
        let mut sizes = Vec::with_capacity(batch.changes.len());
        let mut first = HashSet::new();
        for change in &batch.changes {
            let header = if first.insert(change.doc) {
                batch
                    .docs
                    .iter()
                    .find(|h| h.doc == change.doc)
                    .map(header_wire_bytes)
                    .unwrap_or(0)
            } else {
                0
            };
            sizes.push(change_wire_bytes(change).saturating_add(header));
        }
        let (mut used, mut kept, mut carried_docs) = (0usize, 0usize, 0usize);
        let mut extras: Vec<Extra> = Vec::new();
        let mut views = Vec::new();
        let mut end: Option<u64> = None;
        let mut triggers = triggers.into_iter().peekable();
        let n = batch.changes.len();
        loop {
            let next_log = batch.seqs.get(kept).copied();
            let next_trigger = triggers.peek().map(|(s, _)| *s);
            let seq = match (next_log, next_trigger) {
                (Some(a), Some(b)) => a.min(b),
                (Some(a), None) => a,
                (None, Some(b)) => b,
                (None, None) => break,
            };
            let mut group = 0usize;
            let mut group_log = 0usize;
            while kept + group_log < n && batch.seqs[kept + group_log] == seq {
                group = group.saturating_add(sizes[kept + group_log]);
                group_log += 1;
            }
            let mut group_extras = Vec::new();
            let mut trimmed = false;
            while let Some((_, trigger)) = triggers.next_if(|(s, _)| *s == seq) {
                let room = SYNC_BATCH_CONTENT_BYTES.saturating_sub(used.saturating_add(group));
                let extra = match trigger {
                    Trigger::View(doc) => {
                        let from = acks.get(&doc).copied().unwrap_or(0);
                        self.view_extra(peer, doc, from, room, &mut views)?
                    }
                    Trigger::Refs(doc) => self.carry(
                        peer,
                        &reader,
                        &[doc],
                        &mut headed,
                        room,
                        MAX_REFERENCED_DOCS_PER_BATCH.saturating_sub(carried_docs),
                    )?,
                };
                if let Some(extra) = extra {
                    trimmed |= extra.trimmed;
                    group = group.saturating_add(extra.bytes);
                    group_extras.push(extra);
                }
            }
            if trimmed && used > 0 {
                // The next batch starts with this group, where it has the whole frame.
                end = Some(seq - 1);
                break;
            }
            used += group;
            kept += group_log;
            for extra in &group_extras {
                carried_docs += extra.carried.len();
            }
            extras.extend(group_extras);
            if trimmed {
                // Even alone this group does not fit: it went as far as it could.
                end = Some(seq);
                break;
            }
        }
        drop(reader);
        self.store.put_views(&peer, &views).map_err(err)?;
        if let Some(end) = end {
            batch.changes.truncate(kept);
            batch.seqs.truncate(kept);
            let docs_left: HashSet<DocId> = batch.changes.iter().map(|c| c.doc).collect();
            batch.docs.retain(|h| docs_left.contains(&h.doc));
            batch.upto = self.checkpoint_at(peer, end.max(cursor))?;
        }
        batch.bytes = used;
        let (mut carried, mut owed) = (Vec::new(), Vec::new());
        for extra in extras {
            batch.docs.extend(extra.docs);
            batch.changes.extend(extra.changes);
            batch.views.extend(extra.view);
            carried.extend(extra.carried);
            owed.extend(extra.left_out);
        }
        if !owed.is_empty() {
            tracing::info!(%peer, owed = owed.len(), "referenced objects do not fit in the batch of the object referencing them; they follow once it is acknowledged");
            self.store.owe_refs(&peer, &owed).map_err(err)?;
        }
        if !carried.is_empty() {
            self.store.add_by_ref(&peer, &carried).map_err(err)?;
            by_ref.extend(carried);
        }
        Ok(batch)
    }

    /// A batch of objects owed to `peer` (and what they in turn reference), covering no log
    /// entry (`upto` is where the log part stands). Owed objects that no longer go to the
    /// peer, or can never fit, are settled at once; the others once the batch is
    /// acknowledged (its `owed` list).
    fn owed_batch(
        &self,
        peer: NodeId,
        owed: Vec<DocId>,
        upto: Checkpoint,
        by_ref: &mut HashSet<DocId>,
    ) -> Result<OutBatch, SyncError> {
        let err = |source| SyncError::Store { peer, source };
        let reader = self.store.reader().map_err(err)?;
        let mut headed = HashSet::new();
        let extra = self.carry_owed(peer, &reader, &owed, &mut headed)?;
        drop(reader);
        let mut batch = OutBatch {
            upto,
            ..OutBatch::default()
        };
        let sent: HashSet<DocId> = extra.carried.iter().copied().collect();
        let waiting: HashSet<DocId> = extra.left_out.iter().copied().collect();
        // Owed objects neither sent nor still waiting for room are settled now.
        let gone: Vec<DocId> = owed
            .iter()
            .filter(|d| !sent.contains(d) && !waiting.contains(d))
            .copied()
            .collect();
        self.store.settle_refs(&peer, &gone).map_err(err)?;
        let newly: Vec<DocId> = extra
            .left_out
            .iter()
            .filter(|d| !owed.contains(d))
            .copied()
            .collect();
        self.store.owe_refs(&peer, &newly).map_err(err)?;
        batch.owed = owed.into_iter().filter(|d| sent.contains(d)).collect();
        batch.bytes = extra.bytes;
        batch.docs = extra.docs;
        batch.changes = extra.changes;
        if !extra.carried.is_empty() {
            self.store.add_by_ref(&peer, &extra.carried).map_err(err)?;
            by_ref.extend(extra.carried);
        }
        Ok(batch)
    }
}

/// Which log entries `peer` is never sent, for [`scan_log`]: those it acknowledged ahead of
/// log order (`ahead`), and, unless `unfiltered`, those it authored or sent us.
pub(super) fn left_out(
    peer: NodeId,
    unfiltered: bool,
    ahead: &BTreeSet<u64>,
) -> impl Fn(u64, &LogEntry) -> bool + '_ {
    move |seq, e| {
        ahead.contains(&seq) || (!unfiltered && (e.author == peer || e.from == Some(peer)))
    }
}

/// Read our log after `after` for a peer: at most [`SYNC_BATCH_CHANGES`] changes, scanning at
/// most [`SYNC_SCAN_ENTRIES`] entries, and stopping before a change whose encoded size (with
/// its document's header, the first time) would take the batch past
/// `limit` (at most [`SYNC_BATCH_CONTENT_BYTES`]; see [`change_wire_bytes`]), unless it is
/// the batch's first. A change that alone exceeds [`SYNC_BATCH_CONTENT_BYTES`] can never be
/// sent: it is listed in `oversized` and passed over, so it blocks nothing.
/// Entries for which `skip_entry` is true, or whose document `skip_doc` refuses (given the
/// entry's SEQ), are passed over (but still covered by `upto`); `skip_entry` is asked first, so
/// it costs no document lookup.
pub(super) fn scan_log(
    reader: &Reader<'_>,
    after: u64,
    limit: Limit,
    skip_entry: impl Fn(u64, &LogEntry) -> bool,
    mut skip_doc: impl FnMut(u64, &DocId, &DocRecord) -> bool,
) -> Result<OutBatch, StoreError> {
    let mut batch = OutBatch {
        upto: Checkpoint {
            seq: after,
            hash: [0; 32],
        },
        ..OutBatch::default()
    };
    let mut records: HashMap<DocId, Option<DocRecord>> = HashMap::new();
    let mut headed = HashSet::new();
    for item in reader.log_after(after)?.take(SYNC_SCAN_ENTRIES) {
        if batch.changes.len() >= SYNC_BATCH_CHANGES {
            break;
        }
        let (seq, entry, change) = item?;
        let here = Checkpoint {
            seq,
            hash: entry.hash,
        };
        if skip_entry(seq, &entry) {
            batch.upto = here;
            continue;
        }
        if let std::collections::hash_map::Entry::Vacant(slot) = records.entry(entry.doc) {
            slot.insert(reader.record(&entry.doc)?);
        }
        let Some(Some(record)) = records.get(&entry.doc) else {
            batch.upto = here;
            continue;
        };
        if skip_doc(seq, &entry.doc, record) {
            batch.upto = here;
            continue;
        }
        let header = DocHeader {
            doc: entry.doc,
            origin: record.origin,
            ty: record.ty.clone(),
            id: record.id.clone(),
        };
        let new_doc = !headed.contains(&entry.doc);
        let change_bytes = change_wire_bytes(&change);
        let alone = change_bytes.saturating_add(header_wire_bytes(&header));
        if alone > SYNC_BATCH_CONTENT_BYTES {
            batch.oversized.push((seq, entry, alone));
            batch.upto = here;
            continue;
        }
        let size = if new_doc { alone } else { change_bytes };
        if batch.bytes + size > limit.bytes.min(SYNC_BATCH_CONTENT_BYTES) {
            if batch.changes.is_empty() && limit.strict {
                // Not even this change fits under a hard limit: it waits.
                batch.held = Some(size.saturating_add(CHANGES_OVERHEAD_BYTES));
                break;
            }
            if !batch.changes.is_empty() {
                // The batch ends before this change; the next one starts with it.
                break;
            }
        }
        batch.bytes += size;
        batch.upto = here;
        if new_doc {
            headed.insert(entry.doc);
            batch.docs.push(header);
        }
        batch.changes.push(change);
        batch.seqs.push(seq);
    }
    Ok(batch)
}
