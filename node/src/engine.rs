//! The sans-IO sync engine: decides what each input means for the store, and does no I/O.
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
use automerge::{ActorId, Automerge, ChangeHash, ReadDoc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};
use tidesync_proto::ids::actor_id;
use tidesync_proto::{DocId, NodeId, ObjectId, SignedChange, TypeName};

use crate::doc::{self, FieldsError};
use crate::identity::Identity;

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
}

impl WriteOp<'_> {
    /// The message recorded in the Automerge change: `create`, `put` or `delete`.
    fn message(&self, new: bool) -> &'static str {
        match (self, new) {
            (WriteOp::Delete, _) => "delete",
            (WriteOp::Put(_), true) => "create",
            (WriteOp::Put(_), false) => "put",
        }
    }
}

/// Records the shell must commit atomically before acknowledging a write.
#[derive(Debug)]
pub struct Persist {
    pub doc_id: DocId,
    pub record: DocRecord,
    /// The document after the change, to store as its current state.
    pub doc: Automerge,
    pub change: SignedChange,
    pub hash: ChangeHash,
    /// Who signed the change: this node.
    pub author: NodeId,
    /// Unix time of the write, in milliseconds, for the change log.
    pub time_ms: i64,
}

/// The engine's answer to a local write.
#[derive(Debug)]
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
        source: FieldsError,
    },
}

/// The engine of one node.
pub struct Engine {
    identity: Identity,
    actor: ActorId,
}

impl Engine {
    /// An engine that signs as `identity` and writes as the actor of `epoch`. The shell draws a
    /// fresh `epoch` from its RNG at every start, so a restored backup never reuses a sequence
    /// number this node already published.
    pub fn new(identity: Identity, epoch: u64) -> Engine {
        let actor = ActorId::from(actor_id(&identity.node_id(), epoch));
        Engine { identity, actor }
    }

    pub fn node_id(&self) -> NodeId {
        self.identity.node_id()
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
            None if matches!(op, WriteOp::Delete) => return Err(not_found()),
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
            WriteOp::Put(fields) => doc::put_fields(&mut tx, fields),
            WriteOp::Delete => doc::delete_object(&mut tx),
        };
        if let Err(source) = applied {
            tx.rollback();
            return Err(WriteError::Fields {
                ty: ty.clone(),
                id: id.clone(),
                source,
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
                source: FieldsError::Automerge(automerge::AutomergeError::InvalidHash(hash)),
            })?;
        record.live = !doc::is_deleted(&doc);
        Ok(WriteOutcome::Changed(Persist {
            doc_id,
            record,
            change: SignedChange::sign(self.identity.signing_key(), doc_id, &change),
            hash,
            author: self.node_id(),
            doc,
            time_ms: now_ms,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn engine(secret: u8, epoch: u64) -> Engine {
        Engine::new(Identity::from_secret([secret; 32]), epoch)
    }

    fn names() -> (TypeName, ObjectId) {
        (
            TypeName::new("Sample").unwrap(),
            ObjectId::new("S-001").unwrap(),
        )
    }

    fn changed(o: WriteOutcome) -> Persist {
        match o {
            WriteOutcome::Changed(p) => p,
            WriteOutcome::Unchanged(_) => panic!("expected a change"),
        }
    }

    #[test]
    fn a_local_write_is_a_verifiable_change_by_this_node() {
        let e = engine(1, 7);
        let (t, i) = names();
        let fields = json!({"status": "received"});
        let p = changed(
            e.local_write(
                1_700_000_000_123,
                &t,
                &i,
                None,
                WriteOp::Put(fields.as_object().unwrap()),
            )
            .unwrap(),
        );
        let v = p.change.verify().unwrap();
        assert_eq!(v.author, e.node_id());
        assert_eq!(v.hash, p.hash);
        assert_eq!(p.doc_id, DocId::derive(&e.node_id(), &t, &i));
        assert_eq!(p.record.origin, e.node_id());
        assert_eq!(v.change.timestamp(), 1_700_000_000);
        assert_eq!(v.change.message(), Some("create"));
    }

    #[test]
    fn two_nodes_creating_the_same_name_make_different_documents() {
        let (t, i) = names();
        let f = json!({"a": 1});
        let a = changed(
            engine(1, 1)
                .local_write(0, &t, &i, None, WriteOp::Put(f.as_object().unwrap()))
                .unwrap(),
        );
        let b = changed(
            engine(2, 1)
                .local_write(0, &t, &i, None, WriteOp::Put(f.as_object().unwrap()))
                .unwrap(),
        );
        assert_ne!(a.doc_id, b.doc_id);
    }

    #[test]
    fn restarting_uses_a_new_actor_so_sequence_numbers_are_never_reused() {
        let (t, i) = names();
        let f = json!({"a": 1});
        let first = changed(
            engine(1, 1)
                .local_write(0, &t, &i, None, WriteOp::Put(f.as_object().unwrap()))
                .unwrap(),
        );
        let loaded = Loaded {
            doc_id: first.doc_id,
            record: first.record.clone(),
            doc: first.doc,
        };
        let g = json!({"a": 2});
        let second = changed(
            engine(1, 2)
                .local_write(
                    0,
                    &t,
                    &i,
                    Some(loaded),
                    WriteOp::Put(g.as_object().unwrap()),
                )
                .unwrap(),
        );
        let (c1, c2) = (
            first.change.verify().unwrap().change,
            second.change.verify().unwrap().change,
        );
        assert_ne!(c1.actor_id(), c2.actor_id());
        assert_eq!(
            second.change.verify().unwrap().author,
            first.change.verify().unwrap().author
        );
    }

    #[test]
    fn identical_puts_are_unchanged_and_deleting_twice_is_not_found() {
        let e = engine(1, 1);
        let (t, i) = names();
        let f = json!({"a": 1});
        let p = changed(
            e.local_write(0, &t, &i, None, WriteOp::Put(f.as_object().unwrap()))
                .unwrap(),
        );
        let loaded = Loaded {
            doc_id: p.doc_id,
            record: p.record,
            doc: p.doc,
        };
        let loaded = match e
            .local_write(
                0,
                &t,
                &i,
                Some(loaded),
                WriteOp::Put(f.as_object().unwrap()),
            )
            .unwrap()
        {
            WriteOutcome::Unchanged(l) => l,
            WriteOutcome::Changed(_) => panic!("identical put made a change"),
        };
        let d = changed(
            e.local_write(0, &t, &i, Some(loaded), WriteOp::Delete)
                .unwrap(),
        );
        assert!(!d.record.live);
        let loaded = Loaded {
            doc_id: d.doc_id,
            record: d.record,
            doc: d.doc,
        };
        assert!(matches!(
            e.local_write(0, &t, &i, Some(loaded), WriteOp::Delete),
            Err(WriteError::NotFound { .. })
        ));
        assert!(matches!(
            e.local_write(0, &t, &i, None, WriteOp::Delete),
            Err(WriteError::NotFound { .. })
        ));
    }

    #[test]
    fn an_empty_put_creates_an_empty_object() {
        let e = engine(1, 1);
        let (t, i) = names();
        let p = changed(
            e.local_write(0, &t, &i, None, WriteOp::Put(&Map::new()))
                .unwrap(),
        );
        assert!(p.record.live);
        assert!(p.change.verify().is_ok());
    }
}
