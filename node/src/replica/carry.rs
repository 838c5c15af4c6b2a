//! What a batch brings along besides log changes: the views of objects published with
//! `fields` and the objects referenced through `refs`, each sized to the room left.

use std::collections::{HashSet, VecDeque};

use automerge::Automerge;
use tidesync_proto::{DocHeader, DocId, NodeId, SignedChange};

use super::outbound::Extra;
use super::{Replica, SyncError};
use crate::model::DocRecord;
use crate::model::View;
use crate::model::{change_wire_bytes, header_wire_bytes};
use crate::store::{Reader, StoreError};

/// One referenced object, ready to carry: its header and every stored change.
struct Carried {
    header: DocHeader,
    changes: Vec<SignedChange>,
    bytes: usize,
    record: DocRecord,
}

impl Replica {
    /// The documents carried to `peer` because objects sent to it reference them.
    pub(crate) fn carried_to(&self, peer: NodeId) -> Result<HashSet<DocId>, SyncError> {
        if self.policies.of(&peer).refs.is_empty() {
            return Ok(HashSet::new());
        }
        self.store.by_ref(&peer).map_err(super::store_err(peer))
    }

    /// Bring the view of object `doc_id` published to `peer` (see
    /// [`crate::policy::Policy::fields`]) up to date, and return its changes from the
    /// `from`-th on (those the peer has not acknowledged) that fit in `room` bytes; the new
    /// view, if any, is pushed on `updated` to be stored before the batch goes out. A view is
    /// a document of the same type and id, created and signed by this node for this peer
    /// alone (its id is `DocId::derive_view`), holding only the published fields: the peer
    /// never receives the object's own changes, so no other field's value reaches it, now or
    /// in any history.
    pub(crate) fn view_extra(
        &self,
        peer: NodeId,
        doc_id: DocId,
        from: u64,
        room: usize,
        updated: &mut Vec<(DocId, View)>,
    ) -> Result<Option<Extra>, SyncError> {
        let err = |source| SyncError::Store { peer, source };
        let view_err = |detail: String| SyncError::View {
            peer,
            doc: doc_id,
            detail,
        };
        let policy = self.policies.of(&peer);
        let (Some(rec), Some(doc)) = (
            self.store.record(&doc_id).map_err(err)?,
            self.store.load_doc(&doc_id).map_err(err)?,
        ) else {
            return Ok(None);
        };
        let Some(published) = policy.view(&rec.ty, &crate::doc::to_json(&doc)) else {
            return Ok(None);
        };
        // The view is named after the object as it is named here; a collision name's `~`
        // is refused in new ids at the peer, so the view's name does without it.
        let name = crate::model::view_name(&rec.local_id);
        let view_id = DocId::derive_view(&self.node_id(), &peer, &rec.ty, &name);
        let mut view = match updated.iter().find(|(d, _)| *d == doc_id) {
            Some((_, v)) => v.clone(),
            None => self
                .store
                .view(&peer, &doc_id)
                .map_err(err)?
                .unwrap_or_default(),
        };
        // A view not yet written starts as an empty document under the view's own id (the
        // engine would give a new document the object's id).
        let existing = if view.state.is_empty() && crate::doc::is_deleted(&doc) {
            None
        } else {
            let view_doc = if view.state.is_empty() {
                Automerge::new()
            } else {
                Automerge::load(&view.state).map_err(|e| view_err(e.to_string()))?
            };
            Some(crate::replica::engine::Loaded {
                doc_id: view_id,
                record: DocRecord {
                    origin: self.node_id(),
                    ty: rec.ty.clone(),
                    id: name.clone(),
                    local_id: name.clone(),
                    live: !crate::doc::is_deleted(&view_doc),
                },
                doc: view_doc,
            })
        };
        let now = (self.clock)();
        let outcome = match (&existing, crate::doc::is_deleted(&doc)) {
            (None, true) => return Ok(None),
            (Some(v), true) if !v.record.live => None,
            (_, true) => Some(self.engine.local_write(
                now,
                &rec.ty,
                &name,
                existing,
                crate::replica::engine::WriteOp::Delete,
            )),
            (_, false) => {
                // Fields the view has and the object no longer publishes are removed.
                let mut fields = published;
                if let Some(v) = &existing {
                    for k in crate::doc::to_json(&v.doc).keys() {
                        fields.entry(k.clone()).or_insert(serde_json::Value::Null);
                    }
                }
                Some(self.engine.local_write(
                    now,
                    &rec.ty,
                    &name,
                    existing,
                    crate::replica::engine::WriteOp::Put(&fields),
                ))
            }
        };
        match outcome {
            Some(Ok(crate::replica::engine::WriteOutcome::Changed(p))) => {
                view.state = p.state;
                view.changes.push(p.change);
                updated.retain(|(d, _)| *d != doc_id);
                updated.push((doc_id, view.clone()));
            }
            Some(Err(e)) => return Err(view_err(e.to_string())),
            Some(Ok(crate::replica::engine::WriteOutcome::Unchanged(_))) | None => {}
        }
        let from = usize::try_from(from).unwrap_or(usize::MAX);
        if view.changes.len() <= from {
            return Ok(None);
        }
        let header = DocHeader {
            doc: view_id,
            origin: self.node_id(),
            ty: rec.ty.clone(),
            id: name.clone(),
        };
        let mut extra = Extra {
            bytes: header_wire_bytes(&header),
            ..Extra::default()
        };
        let mut held = from;
        for change in view.changes.into_iter().skip(from) {
            let size = change_wire_bytes(&change);
            if extra.bytes.saturating_add(size) > room {
                extra.trimmed = true;
                break;
            }
            extra.bytes += size;
            extra.changes.push(change);
            held += 1;
        }
        if extra.changes.is_empty() {
            // Not even one change fits: the caller ends the batch before this view.
            extra.bytes = 0;
            return Ok(Some(extra));
        }
        extra.docs.push(header);
        extra.view = Some((doc_id, held as u64));
        Ok(Some(extra))
    }

    /// Carry to `peer` every object that `roots` reference through our policy's `refs` for
    /// it and that is not sent to the peer on its own account (its type is not exchanged with
    /// it): all of its stored changes, with its header, and in turn what it references. What
    /// does not fit in `room` bytes or `docs_room` documents is listed as left out.
    pub(crate) fn carry(
        &self,
        peer: NodeId,
        reader: &Reader<'_>,
        roots: &[DocId],
        headed: &mut HashSet<DocId>,
        room: usize,
        docs_room: usize,
    ) -> Result<Option<Extra>, SyncError> {
        let mut extra = Extra::default();
        let mut queue: VecDeque<DocId> = roots.iter().copied().collect();
        while let Some(doc_id) = queue.pop_front() {
            for target in self.references_of(peer, reader, &doc_id)? {
                if !headed.insert(target) {
                    // Already in this batch.
                    continue;
                }
                let Some(c) = self.carried(peer, reader, target)? else {
                    continue;
                };
                if extra.bytes.saturating_add(c.bytes) > room || extra.carried.len() >= docs_room {
                    extra.trimmed = true;
                    extra.left_out.push(target);
                    continue;
                }
                self.take(peer, &mut extra, &mut queue, target, c);
            }
        }
        Ok((!extra.carried.is_empty() || extra.trimmed).then_some(extra))
    }

    /// Carry the `owed` objects themselves, and what they reference, in one batch's room.
    /// An owed object that can never fit a batch alone is logged and not listed at all (it is
    /// settled); one that only lacks room now is left out (it stays owed).
    pub(crate) fn carry_owed(
        &self,
        peer: NodeId,
        reader: &Reader<'_>,
        owed: &[DocId],
        headed: &mut HashSet<DocId>,
    ) -> Result<Extra, SyncError> {
        let room = crate::replica::outbound::SYNC_BATCH_CONTENT_BYTES;
        let docs_room = crate::replica::outbound::MAX_REFERENCED_DOCS_PER_BATCH;
        let mut extra = Extra::default();
        let mut queue = VecDeque::new();
        for &target in owed {
            if !headed.insert(target) {
                continue;
            }
            let Some(record) = reader.record(&target).map_err(Self::carry_err(peer))? else {
                continue;
            };
            if !self.policies.may_send(&peer, &record, true)
                || self.policies.may_send(&peer, &record, false)
            {
                continue;
            }
            let Some(c) = self.carried(peer, reader, target)? else {
                continue;
            };
            if c.bytes > room {
                tracing::warn!(%peer, doc = %target, bytes = c.bytes, limit = room, "a referenced object's history is too large for any batch to this peer; it is not carried");
                continue;
            }
            if extra.bytes.saturating_add(c.bytes) > room || extra.carried.len() >= docs_room {
                extra.left_out.push(target);
                continue;
            }
            self.take(peer, &mut extra, &mut queue, target, c);
        }
        let rest: Vec<DocId> = queue.into_iter().collect();
        if !rest.is_empty() {
            let left = room.saturating_sub(extra.bytes);
            let docs_left = docs_room.saturating_sub(extra.carried.len());
            if let Some(more) = self.carry(peer, reader, &rest, headed, left, docs_left)? {
                extra.bytes += more.bytes;
                extra.docs.extend(more.docs);
                extra.changes.extend(more.changes);
                extra.carried.extend(more.carried);
                extra.left_out.extend(more.left_out);
            }
        }
        Ok(extra)
    }

    fn carry_err(peer: NodeId) -> impl Fn(StoreError) -> SyncError {
        move |source| SyncError::Store { peer, source }
    }

    /// Add one carried object to `extra`, queueing it if it references others in turn.
    fn take(
        &self,
        peer: NodeId,
        extra: &mut Extra,
        queue: &mut VecDeque<DocId>,
        target: DocId,
        c: Carried,
    ) {
        extra.bytes += c.bytes;
        extra.changes.extend(c.changes);
        extra.docs.push(c.header);
        if self.policies.of(&peer).refs.contains_key(&c.record.ty) {
            queue.push_back(target);
        }
        extra.carried.push(target);
    }

    /// The stored objects that `doc_id` references through our `refs` for `peer` and that go
    /// to the peer only when carried (never sent to it, or sent on their own account, are
    /// left out).
    fn references_of(
        &self,
        peer: NodeId,
        reader: &Reader<'_>,
        doc_id: &DocId,
    ) -> Result<Vec<DocId>, SyncError> {
        let err = Self::carry_err(peer);
        let policy = self.policies.of(&peer);
        let (Some(rec), Some(doc)) = (
            reader.record(doc_id).map_err(&err)?,
            reader.load_doc(doc_id).map_err(&err)?,
        ) else {
            return Ok(Vec::new());
        };
        // A view's references are those of its published fields only.
        let fields = crate::doc::to_json(&doc);
        let fields = policy.view(&rec.ty, &fields).unwrap_or(fields);
        let mut out = Vec::new();
        for (ty, id) in policy.references(&rec.ty, &fields) {
            let Some(target) = reader.lookup(&ty, &id).map_err(&err)? else {
                continue;
            };
            let Some(target_rec) = reader.record(&target).map_err(&err)? else {
                continue;
            };
            if self.policies.may_send(&peer, &target_rec, true)
                && !self.policies.may_send(&peer, &target_rec, false)
            {
                out.push(target);
            }
        }
        Ok(out)
    }

    /// One object with all its stored signed changes, sized as they are sent.
    fn carried(
        &self,
        peer: NodeId,
        reader: &Reader<'_>,
        target: DocId,
    ) -> Result<Option<Carried>, SyncError> {
        let err = Self::carry_err(peer);
        let (Some(record), Some(doc)) = (
            reader.record(&target).map_err(&err)?,
            reader.load_doc(&target).map_err(&err)?,
        ) else {
            return Ok(None);
        };
        let header = DocHeader {
            doc: target,
            origin: record.origin,
            ty: record.ty.clone(),
            id: record.id.clone(),
        };
        let mut bytes = header_wire_bytes(&header);
        let mut changes = Vec::new();
        // Only the hashes are needed: the metadata is read from the change graph, where
        // `get_changes` would rebuild every change from the document's columns.
        for change in doc.get_changes_meta(&[]) {
            if let Some(signed) = reader.change(&target, &change.hash).map_err(&err)? {
                bytes = bytes.saturating_add(change_wire_bytes(&signed));
                changes.push(signed);
            }
        }
        Ok(Some(Carried {
            header,
            changes,
            bytes,
            record,
        }))
    }
}

/// Of the documents of a received batch (id and header), those whose name an object taken
/// from `peer` in an earlier batch references through our `refs` (see `ref_targets_v1`) and
/// whose type we do not otherwise take from it: they are taken as carried. This is the rule
/// that lets a carried object arrive in a later batch than the object referencing it; it
/// survives restarts because the names are stored with the referencing object's batch.
pub(crate) fn named_by_earlier<'w>(
    store: &crate::store::Store,
    policies: &crate::policy::Policies,
    peer: NodeId,
    docs: impl Iterator<Item = (DocId, Option<&'w DocHeader>)>,
) -> Result<Vec<DocId>, SyncError> {
    let policy = policies.of(&peer);
    let mut candidates = Vec::new();
    for (doc, header) in docs {
        let Some(h) = header else { continue };
        if policy.covers(&h.ty) {
            continue;
        }
        candidates.push((doc, h.ty.clone(), h.id.clone()));
        if let Ok(local) = policies.local_name(&h.origin, &h.ty, &h.id)
            && local != h.id
        {
            candidates.push((doc, h.ty.clone(), local));
        }
    }
    if candidates.is_empty() {
        return Ok(Vec::new());
    }
    let named = store
        .ref_targets(&peer, candidates.iter().map(|(_, ty, id)| (ty, id)))
        .map_err(|source| SyncError::Store { peer, source })?;
    Ok(candidates
        .into_iter()
        .filter(|(_, ty, id)| named.contains(&(ty.clone(), id.clone())))
        .map(|(doc, _, _)| doc)
        .collect())
}

/// Record the names that objects taken from `peer` in the batch being stored reference,
/// before its commit (see [`crate::store::Store::add_ref_targets`]).
pub(crate) fn remember_references<'r>(
    store: &crate::store::Store,
    peer: NodeId,
    refs: impl Iterator<Item = &'r (tidesync_proto::TypeName, tidesync_proto::ObjectId)>,
) -> Result<(), SyncError> {
    let names: Vec<_> = refs.cloned().collect::<HashSet<_>>().into_iter().collect();
    store
        .add_ref_targets(&peer, &names)
        .map_err(|source| SyncError::Store { peer, source })
}
