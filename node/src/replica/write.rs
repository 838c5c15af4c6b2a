//! Local writes: put, delete and many puts in one transaction, each run through the engine,
//! checked against the policies and the frame limit, and committed before the reply.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};
use tidesync_proto::{ObjectId, TypeName};

use super::Replica;
use super::engine::{Loaded, WriteError, WriteOp, WriteOutcome};
use crate::doc;
use crate::store::StoreError;

impl Replica {
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

    /// Resolve the field at `path` of `ty/id` by writing its concurrent value `pick` again
    /// (see [`crate::concurrent`]).
    pub fn resolve(
        &mut self,
        ty: &TypeName,
        id: &ObjectId,
        path: &str,
        pick: &str,
    ) -> Result<WriteReply, LocalWriteError> {
        self.write(ty, id, WriteOp::Resolve { path, pick })
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
            if ty.as_str() == tidesync_proto::fleet::STATUS_TYPE {
                return Err(LocalWriteError::Reserved { ty: (*ty).clone() });
            }
            self.policies
                .may_write(ty)
                .map_err(|source| LocalWriteError::ReadOnly {
                    ty: (*ty).clone(),
                    id: (*id).clone(),
                    source,
                })?;
            if let WriteOp::Put(fields) = op {
                crate::files::FileRef::all_in(fields).map_err(|source| {
                    LocalWriteError::BadFileRef {
                        ty: (*ty).clone(),
                        id: (*id).clone(),
                        source,
                    }
                })?;
            }
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
                None => {
                    if matches!(op, WriteOp::Put(_)) {
                        id.check_new().map_err(|source| LocalWriteError::BadId {
                            ty: (*ty).clone(),
                            source,
                        })?;
                    }
                    None
                }
            };
            let outcome = self
                .engine
                .local_write((self.clock)(), ty, id, existing, *op)?;
            if let WriteOutcome::Changed(p) = &outcome {
                // A change no frame can carry would never reach a peer, and would stop the
                // log behind it on older nodes: refuse it before anything is stored.
                let bytes = crate::model::change_wire_bytes(&p.change);
                if bytes > crate::replica::outbound::MAX_LOCAL_CHANGE_BYTES {
                    return Err(LocalWriteError::Refused(WriteError::Fields {
                        ty: (*ty).clone(),
                        id: (*id).clone(),
                        source: Box::new(crate::doc::FieldsError::TooLarge {
                            bytes,
                            limit: crate::replica::outbound::MAX_LOCAL_CHANGE_BYTES,
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
        if let Some(last) = seqs.iter().max() {
            self.new_tip = Some(*last);
        }
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
}

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
    #[error(
        "{ty} is reserved for tidesync's own status records (the fleet view); no object may have it"
    )]
    Reserved { ty: TypeName },
    #[error("cannot create a {ty}: {source}")]
    BadId {
        ty: TypeName,
        source: tidesync_proto::IdError,
    },
    /// A field holds a malformed file reference (see [`crate::files`]).
    #[error("cannot write {ty}/{id}: {source}")]
    BadFileRef {
        ty: TypeName,
        id: ObjectId,
        source: crate::files::FileRefError,
    },
    #[error("cannot write {ty}/{id}: {source}")]
    Store {
        ty: TypeName,
        id: ObjectId,
        source: StoreError,
    },
}
