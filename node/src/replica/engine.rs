//! The sans-IO document engine: decides what a local write or a received change means for a
//! document and the store (authoring and signing changes, applying and holding received ones),
//! and does no I/O. Sessions and the protocol live in `sync`.
//!
//! The engine is handed everything it needs: the document a write targets (loaded by the shell),
//! the current time, and an epoch the shell drew from its random number generator. It answers
//! with a [`Persist`], the exact set of records the shell must commit in one redb transaction
//! before it acknowledges the write. It never touches redb, the network, the clock or the OS RNG,
//! which is what lets `simulations/` run this very code under a seeded world.
//!
//! Later inputs (messages from peers, timer ticks) join [`Engine::local_write`] here, each
//! answering with the records to persist and the messages to send.

use automerge::transaction::CommitOptions;
use std::collections::HashMap;

use automerge::{ActorId, Automerge, Change, ChangeHash, ReadDoc};
use serde_json::{Map, Value as Json};
use tidesync_proto::ids::actor_id;
use tidesync_proto::{DocHeader, DocId, NodeId, ObjectId, SignedChange, TypeName, VerifiedChange};

use crate::doc::{self, FieldsError};
use crate::identity::Identity;
use crate::model::{DocBans, DocRecord, Persist, ReceivedDoc, collision_name};

use super::equivocation::{self, Found};

/// A document the shell loaded for the engine.
#[derive(Debug)]
pub struct Loaded {
    pub doc_id: DocId,
    pub record: DocRecord,
    pub doc: Automerge,
}

/// A local write, as the API or CLI asked for it.
#[derive(Debug, Clone, Copy)]
pub enum WriteOp<'a> {
    /// Set these fields; a null removes a field; other fields are untouched.
    Put(&'a Map<String, Json>),
    /// Mark the object deleted.
    Delete,
    /// Write the concurrent value `pick` of the field at `path` again, superseding the others
    /// (see [`crate::concurrent`]).
    Resolve { path: &'a str, pick: &'a str },
}

impl WriteOp<'_> {
    /// The message recorded in the Automerge change: `create`, `put` or `delete`.
    fn message(&self, new: bool) -> &'static str {
        match (self, new) {
            (WriteOp::Delete, _) => "delete",
            (WriteOp::Put(_), true) => "create",
            (WriteOp::Put(_), false) => "put",
            (WriteOp::Resolve { .. }, _) => "resolve",
        }
    }
}

/// The engine's answer to a local write. Both variants carry a whole document; an outcome is
/// moved once from the engine to the commit, never kept, so neither is boxed.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum WriteOutcome {
    /// Nothing differed; no change was made.
    Unchanged(Loaded),
    /// A signed change was made; persist it, then acknowledge.
    Changed(Persist),
}

/// Why a local write was refused. Each names the object.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("{ty}/{id} does not exist")]
    NotFound { ty: TypeName, id: ObjectId },
    #[error("cannot write {ty}/{id}: {source}")]
    Fields {
        ty: TypeName,
        id: ObjectId,
        source: Box<FieldsError>,
    },
    #[error("cannot resolve {ty}/{id}: {source}")]
    Resolve {
        ty: TypeName,
        id: ObjectId,
        source: Box<crate::concurrent::ResolveError>,
    },
}

/// The engine of one node.
pub struct Engine {
    identity: Identity,
    actor: ActorId,
    epoch: u64,
}

impl Engine {
    /// An engine that signs as `identity` and writes as the actor of `epoch`. The shell draws a
    /// fresh `epoch` from its RNG at every start, so a restored backup never reuses a sequence
    /// number this node already published.
    pub fn new(identity: Identity, epoch: u64) -> Engine {
        let actor = ActorId::from(actor_id(&identity.node_id(), epoch));
        Engine {
            identity,
            actor,
            epoch,
        }
    }

    /// An engine writing under a new actor: after one of this engine's own changes was
    /// refused for an equivocation, its next sequence number could differ from one that
    /// other nodes already hold (see [`super::equivocation::next_epoch`]).
    pub fn renewed(&self) -> Engine {
        Engine::new(
            self.identity.clone(),
            super::equivocation::next_epoch(self.epoch),
        )
    }

    pub fn node_id(&self) -> NodeId {
        self.identity.node_id()
    }

    /// The key this engine signs with.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Apply a local write to `existing` (or to a new document when `None`) at time `now_ms`.
    pub fn local_write(
        &self,
        now_ms: i64,
        ty: &TypeName,
        id: &ObjectId,
        existing: Option<Loaded>,
        op: WriteOp<'_>,
    ) -> Result<WriteOutcome, WriteError> {
        let not_found = || WriteError::NotFound {
            ty: ty.clone(),
            id: id.clone(),
        };
        let (doc_id, mut record, mut doc, new) = match existing {
            Some(l) => (l.doc_id, l.record, l.doc, false),
            None if !matches!(op, WriteOp::Put(_)) => return Err(not_found()),
            None => {
                let node = self.node_id();
                let record = DocRecord {
                    origin: node,
                    ty: ty.clone(),
                    id: id.clone(),
                    local_id: id.clone(),
                    live: true,
                };
                (DocId::derive(&node, ty, id), record, Automerge::new(), true)
            }
        };
        if matches!(op, WriteOp::Delete) && doc::is_deleted(&doc) {
            return Err(not_found());
        }
        doc.set_actor(self.actor.clone());
        let options = CommitOptions::default()
            .with_message(op.message(new))
            .with_time(now_ms.div_euclid(1000));
        let mut tx = doc.transaction();
        let applied = match op {
            WriteOp::Put(fields) if new => doc::put_new_fields(&mut tx, fields),
            WriteOp::Put(fields) => doc::put_fields(&mut tx, fields),
            WriteOp::Delete => doc::delete_object(&mut tx),
            WriteOp::Resolve { path, pick } => {
                if let Err(source) = crate::concurrent::resolve(&mut tx, path, pick) {
                    tx.rollback();
                    return Err(WriteError::Resolve {
                        ty: ty.clone(),
                        id: id.clone(),
                        source: Box::new(source),
                    });
                }
                Ok(())
            }
        };
        if let Err(source) = applied {
            tx.rollback();
            return Err(WriteError::Fields {
                ty: ty.clone(),
                id: id.clone(),
                source: Box::new(source),
            });
        }
        let hash = match tx.commit_with(options) {
            (Some(hash), _) => hash,
            // A new object with no fields still gets a (genesis) change, so that it exists.
            (None, _) if new => doc.empty_commit(
                CommitOptions::default()
                    .with_message(op.message(new))
                    .with_time(now_ms.div_euclid(1000)),
            ),
            (None, _) => {
                return Ok(WriteOutcome::Unchanged(Loaded {
                    doc_id,
                    record,
                    doc,
                }));
            }
        };
        let change = doc
            .get_change_by_hash(&hash)
            .ok_or_else(|| WriteError::Fields {
                ty: ty.clone(),
                id: id.clone(),
                source: Box::new(FieldsError::Automerge(
                    automerge::AutomergeError::InvalidHash(hash),
                )),
            })?;
        record.live = !doc::is_deleted(&doc);
        Ok(WriteOutcome::Changed(Persist {
            doc_id,
            record,
            change: SignedChange::sign(self.identity.signing_key(), doc_id, &change),
            hash,
            author: self.node_id(),
            // A new document holds exactly its fields: their references are read from the JSON.
            files: match op {
                WriteOp::Put(fields) if new => doc::file_refs_in(fields),
                _ => doc::file_refs(&doc),
            },
            // A new document holds one change by one actor: no field can hold concurrent
            // values yet, so it is not walked.
            concurrent: if new {
                0
            } else {
                crate::concurrent::count(&doc)
            },
            state: doc::save_state(&doc),
            doc,
            time_ms: now_ms,
        }))
    }
}

/// One document's share of a received batch, with what the shell loaded for it.
#[derive(Debug)]
pub struct Arrival {
    pub header: DocHeader,
    /// The peer (or bundle exporter) whose batch this is.
    pub from: NodeId,
    /// The document as this node has it, if it has it.
    pub existing: Option<(DocRecord, Automerge)>,
    /// Changes of this document held from earlier batches for missing dependencies, each with
    /// the peer it came from (`None` for one held before senders were recorded).
    pub held: Vec<(SignedChange, Option<NodeId>)>,
    /// Verified, not yet stored changes from this batch, in the order they arrived.
    pub incoming: Vec<(SignedChange, VerifiedChange)>,
    /// The local name the document gets here if it is new: its id, or the id under the
    /// sending peer's prefix.
    pub name: ObjectId,
    /// The name `(header.ty, name)` already belongs to another document here.
    pub name_taken: bool,
    /// Apply the changes one at a time (slow, but it names the change Automerge refuses);
    /// the shell asks for it after a batch apply failed (see [`Poisoned`]).
    pub one_by_one: bool,
    /// What equivocations already make this document refuse.
    pub bans: DocBans,
}

/// What receiving one document's changes decided.
#[derive(Debug)]
pub struct Arrived {
    pub received: ReceivedDoc,
    /// The document after applying, when anything was applied.
    pub doc: Option<Automerge>,
    /// Changes refused, with the reason.
    pub rejected: Vec<(ChangeHash, String)>,
    /// Changes of the batch this node already held (counted by the shell, which knows).
    pub duplicates: u64,
    /// Automerge panicked applying this change: the document in memory may be damaged, so
    /// nothing of this arrival may be stored. The shell reloads the document from the store
    /// and receives the other changes (`retry`, the batch's own) again without this one.
    pub poisoned: Option<Poisoned>,
    /// Equivocations found (the shell reads each `first` it must from the log).
    pub found: Vec<Found>,
    /// One of this engine's own changes was refused for an equivocation: the shell renews
    /// the engine's actor ([`Engine::renewed`]).
    pub own_refused: bool,
}

/// A change whose application made Automerge panic (`None`: one of a batch applied at once
/// failed, and the batch is to be applied again one change at a time), and the batch's other
/// changes of the same document, to receive again on a freshly loaded document.
#[derive(Debug)]
pub struct Poisoned {
    pub hash: Option<ChangeHash>,
    pub retry: Vec<SignedChange>,
}

impl Arrived {
    /// Nothing of the arrival may be stored: the document in memory may be damaged.
    fn poisoned(
        header: DocHeader,
        rejected: Vec<(ChangeHash, String)>,
        hash: Option<ChangeHash>,
        retry: Vec<SignedChange>,
    ) -> Arrived {
        Arrived {
            received: ReceivedDoc::nothing(header),
            doc: None,
            rejected,
            duplicates: 0,
            poisoned: Some(Poisoned { hash, retry }),
            found: Vec::new(),
            own_refused: false,
        }
    }
}

/// A change waiting to be applied in [`Engine::receive`].
struct Waiting {
    signed: SignedChange,
    change: Change,
    hash: ChangeHash,
    author: NodeId,
    /// The peer it came from; `held` when it was held by an earlier batch.
    from: Option<NodeId>,
    held: bool,
}

impl Engine {
    /// Apply received changes to one document. A change is applied once every change it
    /// depends on is in the document; until then it is held (durably, by the shell). Only the
    /// document's origin may make a change with no dependencies (the document's creation).
    ///
    /// Release follows dependency order: each waiting change counts its missing dependencies,
    /// and applying a change wakes exactly the changes waiting for its hash, so a chain that
    /// arrived in reverse order is released in time linear in its length.
    pub fn receive(&self, arrival: Arrival) -> Arrived {
        let Arrival {
            header,
            from,
            existing,
            held,
            incoming,
            name,
            name_taken,
            one_by_one,
            mut bans,
        } = arrival;
        let (record, mut doc) = match existing {
            Some((record, doc)) => (Some(record), doc),
            None => (None, Automerge::new()),
        };
        let mut rejected = Vec::new();
        let mut waiting: Vec<Option<Waiting>> = Vec::new();
        for (signed, sender) in held {
            match tidesync_proto::parse_change(signed.bytes.clone()) {
                Ok(change) => {
                    let author =
                        NodeId::from_actor(change.actor_id().to_bytes()).unwrap_or(header.origin);
                    let hash = change.hash();
                    waiting.push(Some(Waiting {
                        signed,
                        change,
                        hash,
                        author,
                        from: sender,
                        held: true,
                    }));
                }
                Err(e) => {
                    tracing::warn!(doc = %header.doc, error = %e, "dropping an undecodable held change")
                }
            }
        }
        for (signed, verified) in incoming {
            if verified.change.deps().is_empty() && verified.author != header.origin {
                rejected.push((
                    verified.hash,
                    format!(
                        "change {} by {} would create document {} whose origin is {}",
                        verified.hash, verified.author, header.doc, header.origin
                    ),
                ));
                continue;
            }
            waiting.push(Some(Waiting {
                signed,
                change: verified.change,
                hash: verified.hash,
                author: verified.author,
                from: Some(from),
                held: false,
            }));
        }
        // Changes the document's equivocations refuse are recorded and never applied or held.
        let mut banned = Vec::new();
        let mut released = Vec::new();
        if !bans.is_empty() {
            refuse_banned(&mut waiting, &mut bans, &mut banned, &mut released);
        }
        let mut found = Vec::new();
        let mut own_refused = false;
        // Index the waiting changes by the dependencies they still lack.
        let mut missing = vec![0usize; waiting.len()];
        let mut waiters: HashMap<ChangeHash, Vec<usize>> = HashMap::new();
        let mut ready = std::collections::VecDeque::new();
        for (i, w) in waiting.iter().enumerate() {
            let Some(w) = w else { continue };
            for dep in w.change.deps() {
                // The metadata lookup reads the change graph only; `get_change_by_hash` would
                // rebuild the whole change from the document's columns (7 % of a delta's CPU).
                if doc.get_change_meta_by_hash(dep).is_none() {
                    missing[i] += 1;
                    waiters.entry(*dep).or_default().push(i);
                }
            }
            if missing[i] == 0 {
                ready.push_back(i);
            }
        }
        let mut applied = Vec::new();
        // Automerge applies a batch of changes in one pass, but each single apply costs time
        // in the document's size: applying a long chain one change at a time is quadratic.
        // So the changes that can be applied are put in dependency order first and applied in
        // one call; only if that fails are they applied one by one, to find the culprit.
        if !one_by_one && ready.len() + waiting.len() > 1 {
            let order = dependency_order(&waiting, &mut missing, &mut waiters, ready);
            ready = std::collections::VecDeque::new();
            let changes: Vec<Change> = order
                .iter()
                .filter_map(|&i| waiting[i].as_ref().map(|w| w.change.clone()))
                .collect();
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                doc.apply_changes(changes)
            }));
            if !matches!(outcome, Ok(Ok(()))) {
                let retry = waiting.into_iter().flatten().filter(|w| !w.held);
                return Arrived::poisoned(
                    header,
                    rejected,
                    None,
                    retry.map(|w| w.signed).collect(),
                );
            }
            for i in order {
                if let Some(w) = waiting[i].take() {
                    if w.held {
                        released.push(w.hash);
                    }
                    applied.push((w.signed, w.hash, w.author, w.from));
                }
            }
        }
        while let Some(i) = ready.pop_front() {
            let Some(w) = waiting[i].take() else { continue };
            let change = w.change.clone();
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                doc.apply_changes([change])
            }));
            match outcome {
                Ok(Ok(())) => {
                    if w.held {
                        released.push(w.hash);
                    }
                    for j in waiters.remove(&w.hash).unwrap_or_default() {
                        missing[j] -= 1;
                        if missing[j] == 0 {
                            ready.push_back(j);
                        }
                    }
                    applied.push((w.signed, w.hash, w.author, w.from));
                }
                Ok(Err(e)) => {
                    let Some(twin) = equivocation::twin_in(&doc, &w.change) else {
                        rejected
                            .push((w.hash, format!("automerge refused change {}: {e}", w.hash)));
                        continue;
                    };
                    let actor = w.change.actor_id().to_bytes().to_vec();
                    let Some((rebuilt, newly)) =
                        equivocation::cut(&doc, &mut bans, actor.clone(), w.change.seq())
                    else {
                        rejected.push((
                            w.hash,
                            format!("change {} equivocates, and the document could not be rebuilt without it", w.hash),
                        ));
                        continue;
                    };
                    own_refused |= newly.iter().any(|h| {
                        doc.get_change_by_hash(h)
                            .is_some_and(|c| c.actor_id() == &self.actor)
                    });
                    tracing::warn!(doc = %header.doc, author = %w.author, seq = w.change.seq(), first = %twin, second = %w.hash, "equivocation: two changes signed with one actor and sequence number; both are refused with what depends on them");
                    doc = rebuilt;
                    banned.extend(newly);
                    bans.banned.insert(w.hash);
                    banned.push(w.hash);
                    found.push(Found {
                        author: w.author,
                        actor,
                        seq: w.change.seq(),
                        first: applied
                            .iter()
                            .find(|(_, h, _, _)| *h == twin)
                            .map(|(s, _, _, _): &(SignedChange, _, _, _)| s.clone())
                            .ok_or(twin),
                        second: w.signed.clone(),
                    });
                    // The second change joins the log, so that it reaches every node the first
                    // one reached.
                    if w.held {
                        released.push(w.hash);
                    }
                    applied.push((w.signed, w.hash, w.author, w.from));
                    refuse_banned(&mut waiting, &mut bans, &mut banned, &mut released);
                }
                Err(_) => {
                    tracing::error!(doc = %header.doc, hash = %w.hash, "Automerge panicked applying a change; the document is reloaded from the store and the change refused");
                    let retry = applied
                        .into_iter()
                        .filter(|(_, _, _, f)| *f == Some(from))
                        .map(|(s, _, _, _)| s)
                        .chain(
                            waiting
                                .into_iter()
                                .flatten()
                                .filter(|w| !w.held)
                                .map(|w| w.signed),
                        )
                        .collect();
                    return Arrived::poisoned(header, rejected, Some(w.hash), retry);
                }
            }
        }
        let newly_held: Vec<(SignedChange, ChangeHash)> = waiting
            .into_iter()
            .flatten()
            .filter(|w| !w.held)
            .map(|w| (w.signed, w.hash))
            .collect();
        let (record, state, doc) = if applied.is_empty() {
            (None, None, None)
        } else {
            let mut record = record.unwrap_or_else(|| DocRecord {
                origin: header.origin,
                ty: header.ty.clone(),
                id: header.id.clone(),
                local_id: if name_taken {
                    collision_name(&name, &header.doc)
                } else {
                    name
                },
                live: true,
            });
            record.live = !doc::is_deleted(&doc) && !doc.get_heads().is_empty();
            let state = doc::save_state(&doc);
            (Some(record), Some(state), Some(doc))
        };
        let files = doc.as_ref().map(doc::file_refs).unwrap_or_default();
        // A document whose history is a line has no concurrent values: the walk is skipped
        // (most documents of an initial sync, and of any node that edits alone).
        let concurrent = match &doc {
            Some(d) if !crate::concurrent::linear(d) => crate::concurrent::count(d),
            _ => 0,
        };
        Arrived {
            received: ReceivedDoc {
                doc_id: header.doc,
                header,
                record,
                state,
                applied,
                held: newly_held,
                released,
                dropped: Vec::new(),
                by_ref: false,
                equivocations: Vec::new(),
                banned,
                supersedes: None,
                files,
                concurrent,
                wants: Vec::new(),
            },
            doc,
            rejected,
            duplicates: 0,
            poisoned: None,
            found,
            own_refused,
        }
    }
}

/// Take out of `waiting` every change `bans` refuses, and every change depending on one,
/// adding them to the bans and to `banned` (held ones also to `released`, to be let go).
fn refuse_banned(
    waiting: &mut [Option<Waiting>],
    bans: &mut DocBans,
    banned: &mut Vec<ChangeHash>,
    released: &mut Vec<ChangeHash>,
) {
    loop {
        let mut more = false;
        for slot in waiting.iter_mut() {
            if slot.as_ref().is_some_and(|w| bans.refuses(&w.change))
                && let Some(w) = slot.take()
            {
                bans.banned.insert(w.hash);
                banned.push(w.hash);
                if w.held {
                    released.push(w.hash);
                }
                more = true;
            }
        }
        if !more {
            break;
        }
    }
}

/// The waiting changes that can be applied, in an order in which each comes after its
/// dependencies: from `ready` (those missing nothing), each change placed wakes exactly the
/// changes `waiters` lists for its hash. Linear in the changes and their dependencies.
fn dependency_order(
    waiting: &[Option<Waiting>],
    missing: &mut [usize],
    waiters: &mut HashMap<ChangeHash, Vec<usize>>,
    mut ready: std::collections::VecDeque<usize>,
) -> Vec<usize> {
    let mut order = Vec::new();
    while let Some(i) = ready.pop_front() {
        let Some(w) = &waiting[i] else { continue };
        order.push(i);
        for j in waiters.remove(&w.hash).unwrap_or_default() {
            missing[j] -= 1;
            if missing[j] == 0 {
                ready.push_back(j);
            }
        }
    }
    order
}

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;
