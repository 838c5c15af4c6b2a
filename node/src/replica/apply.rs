//! The middle and last stages of receiving a batch: `prepare` hands one document's changes
//! to the engine on a worker thread; `write` commits every document's result in one
//! transaction, in the batch's order.

use std::collections::{HashMap, HashSet};

use automerge::Automerge;
use tidesync_proto::{DocHeader, DocId, NodeId, ObjectId, SignedChange, TypeName, VerifiedChange};

use super::engine::{Arrival, Arrived, Engine};
use super::outbound::SYNC_BATCH_CHANGES;
use crate::model::Claim;
use crate::policy::{Policies, Policy};
use crate::store::{Reader, Store, StoreError};

/// Most changes one peer may have held here, waiting for dependencies. An honest peer holds
/// at most its two batches in flight (`SYNC_WINDOW_BATCHES` × `SYNC_BATCH_CHANGES` = 4,000)
/// plus what arrives ahead of a relay's gap; past this, its changes that would be held are
/// refused for room, its checkpoint stays before them, and they arrive again (see
/// `Session::stalled` in the sync layer, which asks for them again).
pub const MAX_HELD_CHANGES_PER_PEER: u64 = 10_000;
/// Most bytes of held changes per peer: a peer's held changes cost at most this much disk.
pub const MAX_HELD_BYTES_PER_PEER: u64 = 64 * 1024 * 1024;
/// Most changes held for one document, from all peers together: one document's share of two
/// full batches in flight.
pub const MAX_HELD_CHANGES_PER_DOC: usize = 2 * SYNC_BATCH_CHANGES;

/// One document's share of a received batch, before it is applied.
pub(super) struct Work {
    pub(super) doc: DocId,
    pub(super) header: Option<DocHeader>,
    pub(super) cached: Option<Automerge>,
    pub(super) incoming: Vec<(SignedChange, VerifiedChange)>,
}

/// One document's share of a received batch, decided.
pub(super) enum Prepared {
    /// Applied or held, with the changes refused by policy, the objects it references
    /// through our policy's `refs` for the peer, and how many changes found no room to be
    /// held.
    Arrived(Box<Arrived>, Vec<Refused>, Vec<(TypeName, ObjectId)>, u64),
    /// Changes to a document we do not have, sent without its header.
    NoHeader { doc: DocId, changes: u64 },
    /// Every change refused by policy.
    Refused(Vec<Refused>),
}

/// A change refused by our policy for the peer that sent it.
pub(super) struct Refused {
    pub(super) doc: DocId,
    /// The object's name at its origin.
    pub(super) id: ObjectId,
    pub(super) hash: automerge::ChangeHash,
    pub(super) why: crate::policy::Refusal,
}

/// Read what the store holds of one document and let the engine apply its changes (on a
/// worker thread). Changes already stored are dropped as duplicates.
#[allow(clippy::too_many_arguments)]
pub(super) fn prepare(
    engine: &Engine,
    policies: &Policies,
    policy: &Policy,
    from: NodeId,
    reader: &Reader<'_>,
    by_ref: &HashSet<DocId>,
    w: Work,
    keep_doc: bool,
) -> Result<Prepared, StoreError> {
    let Work {
        doc: doc_id,
        header,
        cached,
        incoming,
    } = w;
    let record = reader.record(&doc_id)?;
    let header = match (&record, header) {
        (Some(r), _) => DocHeader {
            doc: doc_id,
            origin: r.origin,
            ty: r.ty.clone(),
            id: r.id.clone(),
        },
        (None, Some(h)) => h,
        (None, None) => {
            return Ok(Prepared::NoHeader {
                doc: doc_id,
                changes: incoming.len() as u64,
            });
        }
    };
    let existing = match record {
        Some(r) => {
            let doc = match cached {
                Some(d) => Some(d),
                None => reader.load_doc(&doc_id)?,
            };
            doc.map(|d| (r, d))
        }
        None => None,
    };
    let bans = reader.bans(&doc_id)?;
    let mut duplicates = 0;
    let mut refused = Vec::new();
    let mut fresh = Vec::with_capacity(incoming.len());
    for (signed, v) in incoming {
        // A change an equivocation refuses here is known: dropped like one stored.
        if bans.banned.contains(&v.hash) || reader.has_change(&doc_id, &v.hash)? {
            duplicates += 1;
        } else if let Err(why) = policies.may_take(
            &from,
            &header.ty,
            &header.origin,
            &v.author,
            by_ref.contains(&doc_id),
        ) {
            refused.push(Refused {
                doc: doc_id,
                id: header.id.clone(),
                hash: v.hash,
                why,
            });
        } else {
            fresh.push((signed, v));
        }
    }
    if fresh.is_empty() && duplicates == 0 {
        return Ok(Prepared::Refused(refused));
    }
    let local_name = header
        .id
        .check_new()
        .map_err(|e| crate::policy::Refusal::BadId {
            ty: header.ty.clone(),
            detail: e.to_string(),
        })
        .and_then(|()| policies.local_name(&header.origin, &header.ty, &header.id));
    let name = match (local_name, &existing) {
        (Ok(name), _) => name,
        (Err(_), Some((r, _))) => r.local_id.clone(),
        (Err(why), None) => {
            refused.extend(fresh.iter().map(|(_, v)| Refused {
                doc: doc_id,
                id: header.id.clone(),
                hash: v.hash,
                why: why.clone(),
            }));
            return Ok(Prepared::Refused(refused));
        }
    };
    let holder = match existing {
        None => reader.lookup(&header.ty, &name)?,
        Some(_) => None,
    };
    // A view written for us where we hold the object it shows (sent in full before the
    // publisher set `fields`): the view takes the object's name, so that what is read under
    // it has exactly the published fields, and the object moves to its collision name.
    let supersedes = holder.filter(|other| {
        *other == DocId::derive(&header.origin, &header.ty, &header.id)
            && doc_id
                == DocId::derive_view(&header.origin, &engine.node_id(), &header.ty, &header.id)
    });
    let name_taken = holder.is_some_and(|other| other != doc_id) && supersedes.is_none();
    // Held changes are checked again against our current policy for the peer that sent them.
    let mut held = Vec::new();
    let mut dropped = Vec::new();
    for (signed, sender) in reader.pending(&doc_id)? {
        let author = tidesync_proto::chunk::ChangeHeader::parse(&signed.bytes)
            .ok()
            .and_then(|h| NodeId::from_actor(&h.actor).map(|a| (h.hash, a)));
        match (sender, author) {
            (Some(sender), Some((hash, author))) => {
                if let Err(why) = policies.may_take(
                    &sender,
                    &header.ty,
                    &header.origin,
                    &author,
                    by_ref.contains(&doc_id),
                ) {
                    tracing::info!(peer = %sender, doc = %doc_id, reason = %why, "dropping a held change our policy for its sender now refuses");
                    dropped.push(automerge::ChangeHash(hash));
                } else {
                    held.push((signed, Some(sender)));
                }
            }
            (sender, _) => held.push((signed, sender)),
        }
    }
    let held_before = held.len() + dropped.len();
    let is_new = existing.is_none();
    let mut arrival = Arrival {
        header,
        from,
        existing,
        held,
        incoming: fresh,
        name,
        name_taken,
        one_by_one: false,
        bans: bans.clone(),
    };
    // Should Automerge panic applying a change, the document in memory is thrown away: load
    // it again from the store and receive the batch's other changes without that one. Each
    // round drops one change, so this ends.
    let mut panicked = Vec::new();
    let mut arrived = loop {
        let header = arrival.header.clone();
        let (name, name_taken) = (arrival.name.clone(), arrival.name_taken);
        let mut arrived = engine.receive(arrival);
        let Some(poisoned) = arrived.poisoned.take() else {
            break arrived;
        };
        // A batch apply that failed is retried one change at a time, which names the change.
        let one_by_one = poisoned.hash.is_none();
        panicked.extend(poisoned.hash);
        let existing = match reader.record(&doc_id)? {
            Some(r) => reader.load_doc(&doc_id)?.map(|d| (r, d)),
            None => None,
        };
        let incoming = poisoned
            .retry
            .into_iter()
            .filter_map(|signed| {
                let change = tidesync_proto::parse_change(signed.bytes.clone()).ok()?;
                let author = NodeId::from_actor(change.actor_id().to_bytes())?;
                let verified = tidesync_proto::VerifiedChange {
                    doc: doc_id,
                    author,
                    hash: change.hash(),
                    change,
                };
                Some((signed, verified))
            })
            .collect();
        arrival = Arrival {
            header,
            from,
            existing,
            held: reader.pending(&doc_id)?,
            incoming,
            name,
            name_taken,
            one_by_one,
            bans: bans.clone(),
        };
    };
    arrived.rejected.extend(panicked.into_iter().map(|h| {
        (
            h,
            format!("Automerge panicked applying change {h}; it is refused"),
        )
    }));
    arrived.received.dropped = dropped;
    if arrived.received.record.is_some() && supersedes.is_some() {
        tracing::warn!(peer = %from, doc = %doc_id, replaces = ?supersedes, ty = %arrived.received.header.ty, id = %arrived.received.header.id, "the publisher now shares only a view of this object: the view takes its name, and the full object it sent before is kept under its collision name (see `tidesync conflicts`)");
        arrived.received.supersedes = supersedes;
    }
    // The evidence of each equivocation: both signed changes (the first from the log when it
    // arrived before this batch). Found changes are stamped with the time by `write`.
    for f in std::mem::take(&mut arrived.found) {
        let first = match f.first {
            Ok(signed) => Some(signed),
            Err(hash) => reader.change(&doc_id, &hash)?,
        };
        let Some(first) = first else {
            tracing::warn!(doc = %doc_id, author = %f.author, "equivocation found, but the first change is not in the log; only the second is kept");
            continue;
        };
        arrived
            .received
            .equivocations
            .push(crate::model::Equivocation {
                doc: doc_id,
                author: f.author,
                actor: f.actor,
                seq: f.seq,
                first,
                second: f.second,
                detected_ms: 0,
            });
    }
    let r = &mut arrived.received;
    let mut refused_for_room = 0;
    // A document we do not hold gets held changes only where its header allows its creation
    // from this peer.
    if is_new
        && r.record.is_none()
        && !r.held.is_empty()
        && let Err(why) = policies.may_take(
            &from,
            &r.header.ty,
            &r.header.origin,
            &r.header.origin,
            by_ref.contains(&doc_id),
        )
    {
        let id = r.header.id.clone();
        for (_, hash) in r.held.drain(..) {
            refused.push(Refused {
                doc: doc_id,
                id: id.clone(),
                hash,
                why: why.clone(),
            });
        }
    }
    // The document's quota, over every sender.
    let still_held = held_before - r.released.len() - r.dropped.len();
    let room = MAX_HELD_CHANGES_PER_DOC.saturating_sub(still_held);
    if r.held.len() > room {
        refused_for_room += (r.held.len() - room) as u64;
        tracing::warn!(peer = %from, doc = %doc_id, refused = r.held.len() - room, "no room to hold more changes for this document; they will be asked for again");
        r.held.truncate(room);
    }
    arrived.duplicates = duplicates;
    arrived.received.by_ref =
        by_ref.contains(&doc_id) && !policy.covers(&arrived.received.header.ty);
    let refs = match &arrived.doc {
        Some(doc) if policy.refs.contains_key(&arrived.received.header.ty) => {
            policy.references(&arrived.received.header.ty, &crate::doc::to_json(doc))
        }
        _ => Vec::new(),
    };
    if !keep_doc {
        arrived.doc = None;
    }
    Ok(Prepared::Arrived(
        Box::new(arrived),
        refused,
        refs,
        refused_for_room,
    ))
}

/// What the writer of a received batch did.
#[derive(Default)]
pub(super) struct Written {
    pub(super) applied: u64,
    pub(super) held: u64,
    pub(super) rejected: u64,
    pub(super) duplicates: u64,
    /// Changes refused by policy, per type.
    pub(super) rejected_types: std::collections::BTreeMap<String, u64>,
    /// The first of them, for the refusal log.
    pub(super) refusals: Vec<crate::model::RefusalRow>,
    pub(super) last_seq: u64,
    pub(super) moved: bool,
    /// Changes that found no room to be held.
    pub(super) refused_for_room: u64,
    /// Documents to put in the cache.
    pub(super) docs: Vec<(DocId, Automerge)>,
    /// An equivocation refused one of this node's own changes (see `Arrived::own_refused`).
    pub(super) own_refused: bool,
    /// The files the batch's documents made us want, and what became of each.
    pub(super) wanted: Vec<(crate::model::WantRow, crate::store::Wanted)>,
}

/// Commit the workers' results, in the batch's order, in one transaction. A worker's error
/// aborts the transaction: nothing of the batch is stored and the checkpoint stays where it
/// was. The peer's held-change quota is applied here, in batch order, from `tally` (what it
/// had held before the batch); a batch of which some change found no room does not move the
/// checkpoint, so that change arrives again.
#[allow(clippy::too_many_arguments)]
pub(super) fn write(
    store: &Store,
    peer: NodeId,
    claim: Option<Claim>,
    now: i64,
    (rejected_before, duplicates_before): (u64, u64),
    prepared: Vec<Result<Prepared, StoreError>>,
    tally: crate::store::HeldTally,
    faults: &crate::fault::Faults,
    wants: &dyn Fn(&crate::model::ReceivedDoc) -> Vec<crate::model::WantRow>,
) -> Result<Written, StoreError> {
    // Room left under the peer's quota, and what each document's share freed.
    let mut held_changes = tally.changes;
    let mut held_bytes = tally.bytes;
    let mut room_refused: u64 = prepared
        .iter()
        .map(|p| match p {
            Ok(Prepared::Arrived(_, _, _, n)) => *n,
            _ => 0,
        })
        .sum();
    // The peer's record as committed: the replica is the only writer, so it stays current
    // until this batch commits.
    let mut record = store.peer(&peer)?;
    // The checkpoint before this batch, which `forget-checkpoint` keeps forever.
    let forgotten = faults.forget_checkpoint.then_some(record.received);
    let mut t = Written::default();
    let refuse = |t: &mut Written, refused: Vec<Refused>| {
        for r in refused {
            if crate::ratelog::REFUSALS.allow(&peer) {
                tracing::warn!(%peer, doc = %r.doc, hash = %r.hash, reason = %r.why, "refused a change by policy");
            }
            t.rejected += 1;
            *t.rejected_types.entry(r.why.ty().to_string()).or_default() += 1;
            if t.refusals.len() < crate::store::MAX_REFUSALS_PER_BATCH {
                t.refusals.push(crate::model::RefusalRow {
                    peer,
                    doc: r.doc,
                    ty: r.why.ty().to_string(),
                    id: r.id.to_string(),
                    rule: r.why.rule().into(),
                    reason: r.why.to_string(),
                    time_ms: now,
                });
            }
        }
    };
    let mut docs = Vec::with_capacity(prepared.len());
    // Names given to documents of this batch so far: the engine checked each new document's
    // name against the store, but two new documents of one batch may share a name.
    let mut named: HashMap<(TypeName, ObjectId), DocId> = HashMap::new();
    for item in prepared {
        match item {
            // Nothing is written yet: nothing of the batch is stored.
            Err(e) => return Err(e),
            Ok(Prepared::NoHeader { doc, changes }) => {
                t.rejected += changes;
                if crate::ratelog::REFUSALS.allow(&peer) {
                    tracing::warn!(%peer, %doc, "rejected changes to a document sent without its header");
                }
            }
            Ok(Prepared::Refused(refused)) => refuse(&mut t, refused),
            Ok(Prepared::Arrived(arrived, refused, _, _)) => {
                refuse(&mut t, refused);
                let Arrived {
                    mut received,
                    doc,
                    rejected,
                    duplicates,
                    poisoned: _,
                    found: _,
                    own_refused,
                } = *arrived;
                t.own_refused |= own_refused;
                for e in &mut received.equivocations {
                    e.detected_ms = now;
                }
                if faults.drop_held {
                    received.held.clear();
                }
                // Released changes free room only if they were this peer's; counting them
                // all would only make the quota looser, never lose a change.
                held_changes = held_changes.saturating_sub(received.released.len() as u64);
                let mut keep = 0;
                for (change, _) in &received.held {
                    let len = change.bytes.len() as u64;
                    if held_changes >= MAX_HELD_CHANGES_PER_PEER
                        || held_bytes + len > MAX_HELD_BYTES_PER_PEER
                    {
                        break;
                    }
                    held_changes += 1;
                    held_bytes += len;
                    keep += 1;
                }
                if keep < received.held.len() {
                    let n = received.held.len() - keep;
                    tracing::warn!(%peer, doc = %received.doc_id, refused = n, "the peer's quota of held changes is full; they will be asked for again");
                    room_refused += n as u64;
                    received.held.truncate(keep);
                }
                for (hash, reason) in &rejected {
                    if crate::ratelog::REFUSALS.allow(&peer) {
                        tracing::warn!(%peer, doc = %received.doc_id, %hash, %reason, "rejected a change");
                    }
                }
                t.rejected += rejected.len() as u64;
                t.applied += received.applied.len() as u64;
                t.held += received.held.len() as u64;
                t.duplicates += duplicates;
                if let Some(r) = &mut received.record {
                    let key = (r.ty.clone(), r.local_id.clone());
                    match named.get(&key) {
                        Some(other) if *other != received.doc_id => {
                            r.local_id =
                                crate::model::collision_name(&r.local_id, &received.doc_id);
                            named.insert((r.ty.clone(), r.local_id.clone()), received.doc_id);
                        }
                        _ => {
                            named.insert(key, received.doc_id);
                        }
                    }
                }
                if let Some(r) = &received.record
                    && crate::model::is_collision_name(&r.local_id, &received.doc_id)
                {
                    tracing::warn!(%peer, doc = %received.doc_id, ty = %r.ty, id = %r.id, local = %r.local_id, "another document already has this name here; stored under its own name");
                }
                if let Some(doc) = doc {
                    t.docs.push((received.doc_id, doc));
                }
                received.wants = wants(&received);
                docs.push(received);
            }
        }
    }
    // The checkpoint rule and the counters are decided here; the store writes the record.
    let claim = if room_refused > 0 { None } else { claim };
    t.moved = claim.is_some_and(|c| record.stored(c.after, c.upto, c.restart));
    record.changes_in += t.applied + t.held;
    record.rejected += rejected_before + t.rejected;
    record.duplicates += duplicates_before + t.duplicates;
    for (ty, n) in &t.rejected_types {
        *record.rejected_types.entry(ty.clone()).or_default() += n;
    }
    if let Some(kept) = forgotten {
        record.received = kept;
        record.ahead.clear();
    } else if let (true, Some(c)) = (faults.checkpoint_skips_gaps, claim) {
        record.received = c.upto;
        record.ahead.clear();
    }
    record.bound_rejected_types();
    record.last_sync_ms = now;
    (t.last_seq, t.wanted) =
        store.commit_received(&peer, now, room_refused, &docs, &record, &t.refusals)?;
    t.refused_for_room = room_refused;
    Ok(t)
}
