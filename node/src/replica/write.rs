//! Local writes: put, delete, many puts in one transaction and group commits of concurrent
//! writers, each run through the engine, checked against the policies and the frame limit,
//! and committed before the reply.

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
    /// All are written or none.
    fn write_many(
        &mut self,
        ops: &[(&TypeName, &ObjectId, WriteOp<'_>)],
    ) -> Result<Vec<WriteReply>, LocalWriteError> {
        let mut seen = std::collections::HashSet::new();
        for (ty, id, _) in ops {
            if !seen.insert((*ty, *id)) {
                return Err(LocalWriteError::Refused(WriteError::Fields {
                    ty: (*ty).clone(),
                    id: (*id).clone(),
                    source: Box::new(crate::doc::FieldsError::Duplicate),
                }));
            }
        }
        let outcomes = self
            .prepare_all(ops)
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        let Some((ty, id, _)) = ops.first() else {
            return Ok(Vec::new());
        };
        let named = ops.iter().map(|(t, i, _)| (*t, *i));
        self.commit_outcomes(named, outcomes)
            .map_err(|source| LocalWriteError::Store {
                ty: (*ty).clone(),
                id: (*id).clone(),
                source,
            })
    }

    /// Group commit: concurrent writers' puts and deletes, each checked and run through the
    /// engine on its own (one refused leaves the others), and every change committed in one
    /// durable transaction; a name written twice is committed in a second transaction after
    /// the first, so that its second write builds on the first. One answer per write, in
    /// order; none before the commit that holds it.
    pub fn write_group(
        &mut self,
        ops: &[(TypeName, ObjectId, GroupOp)],
    ) -> Vec<Result<WriteReply, LocalWriteError>> {
        let mut answers: Vec<Option<Result<WriteReply, LocalWriteError>>> =
            ops.iter().map(|_| None).collect();
        let mut left: Vec<usize> = (0..ops.len()).collect();
        while !left.is_empty() {
            let mut seen = std::collections::HashSet::new();
            let (round, later): (Vec<usize>, Vec<usize>) = left
                .into_iter()
                .partition(|&i| seen.insert((&ops[i].0, &ops[i].1)));
            left = later;
            let round_ops: Vec<_> = round
                .iter()
                .map(|&i| (&ops[i].0, &ops[i].1, ops[i].2.as_op()))
                .collect();
            let mut prepared = Vec::with_capacity(round.len());
            for (i, result) in round.iter().zip(self.prepare_all(&round_ops)) {
                match result {
                    Ok(outcome) => prepared.push((*i, outcome)),
                    Err(e) => answers[*i] = Some(Err(e)),
                }
            }
            let (done, outcomes): (Vec<usize>, Vec<Prepared>) = prepared.into_iter().unzip();
            let named = done.iter().map(|&i| (&ops[i].0, &ops[i].1));
            match self.commit_outcomes(named, outcomes) {
                Ok(replies) => {
                    for (i, reply) in done.into_iter().zip(replies) {
                        answers[i] = Some(Ok(reply));
                    }
                }
                Err(source) => {
                    // Each write of the group gets the commit's error.
                    let detail = source.to_string();
                    let mut source = Some(source);
                    for i in done {
                        let source = source.take().unwrap_or_else(|| StoreError::Io {
                            path: self.store.path().into(),
                            context: "committing a group of writes",
                            detail: detail.clone(),
                        });
                        answers[i] = Some(Err(LocalWriteError::Store {
                            ty: ops[i].0.clone(),
                            id: ops[i].1.clone(),
                            source,
                        }));
                    }
                }
            }
        }
        answers
            .into_iter()
            .zip(ops)
            .map(|(a, (ty, id, _))| {
                a.unwrap_or_else(|| {
                    Err(LocalWriteError::Store {
                        ty: ty.clone(),
                        id: id.clone(),
                        source: StoreError::Io {
                            path: self.store.path().into(),
                            context: "committing a group of writes",
                            detail: "no answer".into(),
                        },
                    })
                })
            })
            .collect()
    }

    /// Check each write against the reserved type, the policies, its file references and its
    /// name, load what it builds on, then run the writes through the engine, in parallel
    /// across cores when there are enough of them (nothing is stored yet). One result per
    /// write, in order. The writes go [`ENGINE_CHUNK_WRITES`] at a time, so that a bulk write
    /// never holds more decoded documents than one chunk's.
    fn prepare_all(
        &mut self,
        ops: &[(&TypeName, &ObjectId, WriteOp<'_>)],
    ) -> Vec<Result<Prepared, LocalWriteError>> {
        let now = (self.clock)();
        // Only the last writes' documents would stay in the cache: the others are let go as
        // soon as they are saved (their saved state and answer are kept).
        let cached_from = ops.len().saturating_sub(self.cache.cap().get());
        let mut out = Vec::with_capacity(ops.len());
        for (c, chunk) in ops.chunks(ENGINE_CHUNK_WRITES).enumerate() {
            let first = c * ENGINE_CHUNK_WRITES;
            let mut results: Vec<Option<Result<Prepared, LocalWriteError>>> =
                chunk.iter().map(|_| None).collect();
            let mut jobs = Vec::with_capacity(chunk.len());
            // One read transaction for the chunk's lookups (opening one per lookup was about
            // 5 % of a bulk post's CPU); if it cannot start, each write opens its own and
            // reports why that failed.
            let store = self.store.clone();
            let reader = store.reader().ok();
            for (k, (ty, id, op)) in chunk.iter().enumerate() {
                match self.load_for_write(reader.as_ref(), ty, id, op) {
                    Ok(existing) => jobs.push((k, existing)),
                    Err(e) => results[k] = Some(Err(e)),
                }
            }
            let engine = &self.engine;
            let run = |(k, existing): (usize, Option<Loaded>)| {
                let (ty, id, op) = &chunk[k];
                let mut prepared = engine_write(engine, now, ty, id, existing, *op);
                if first + k < cached_from
                    && let Ok(p) = &mut prepared
                {
                    p.release_doc();
                }
                (k, prepared)
            };
            // A panicking engine thread (when the chunk is shared among threads) leaves the
            // chunk's writes without a result: each is answered with an error below.
            for (k, result) in super::par::par_map(jobs, run).unwrap_or_default() {
                results[k] = Some(result);
            }
            out.extend(results.into_iter().zip(chunk).map(|(r, (ty, id, _))| {
                r.unwrap_or_else(|| {
                    Err(LocalWriteError::Store {
                        ty: (*ty).clone(),
                        id: (*id).clone(),
                        source: StoreError::Io {
                            path: self.store.path().into(),
                            context: "running writes through the engine",
                            detail: "an engine thread panicked".into(),
                        },
                    })
                })
            }));
        }
        out
    }

    /// Check one write against the reserved type, the policies, its file references and its
    /// name, and load the document it builds on (none for a new object).
    fn load_for_write(
        &mut self,
        reader: Option<&crate::store::Reader<'_>>,
        ty: &TypeName,
        id: &ObjectId,
        op: &WriteOp<'_>,
    ) -> Result<Option<Loaded>, LocalWriteError> {
        let store_err = |source| LocalWriteError::Store {
            ty: ty.clone(),
            id: id.clone(),
            source,
        };
        if ty.as_str() == tidesync_proto::fleet::STATUS_TYPE {
            return Err(LocalWriteError::Reserved { ty: ty.clone() });
        }
        self.policies
            .may_write(ty)
            .map_err(|source| LocalWriteError::ReadOnly {
                ty: ty.clone(),
                id: id.clone(),
                source,
            })?;
        if let WriteOp::Put(fields) = op {
            crate::files::FileRef::all_in(fields).map_err(|source| {
                LocalWriteError::BadFileRef {
                    ty: ty.clone(),
                    id: id.clone(),
                    source,
                }
            })?;
        }
        let found = match reader {
            Some(r) => r.find(ty, id),
            None => self.find(ty, id),
        };
        match found.map_err(store_err)? {
            Some((doc_id, record)) => {
                let doc = self.take_doc(&doc_id, reader).map_err(store_err)?;
                let doc = doc.ok_or_else(|| {
                    store_err(StoreError::Decode {
                        path: self.store.path().into(),
                        what: format!("the state of document {doc_id} in docs_v2"),
                        detail: "document record without state".into(),
                    })
                })?;
                Ok(Some(Loaded {
                    doc_id,
                    record,
                    doc,
                }))
            }
            None => {
                if matches!(op, WriteOp::Put(_)) {
                    id.check_new().map_err(|source| LocalWriteError::BadId {
                        ty: ty.clone(),
                        source,
                    })?;
                }
                Ok(None)
            }
        }
    }

    /// Commit the changes of `outcomes` (one per write of `ops`, named there) in one durable
    /// transaction, then answer each write and keep its document in the cache.
    fn commit_outcomes<'o>(
        &mut self,
        ops: impl Iterator<Item = (&'o TypeName, &'o ObjectId)>,
        outcomes: Vec<Prepared>,
    ) -> Result<Vec<WriteReply>, StoreError> {
        let persists: Vec<&crate::model::Persist> = outcomes
            .iter()
            .filter_map(|o| match &o.outcome {
                WriteOutcome::Changed(p) => Some(p),
                WriteOutcome::Unchanged(_) => None,
            })
            .collect();
        let seqs = if persists.is_empty() {
            Vec::new()
        } else {
            self.store.commit_writes(&persists)?
        };
        if let Some(last) = seqs.iter().max() {
            self.new_tip = Some(*last);
        }
        let mut seqs = seqs.into_iter();
        let mut replies = Vec::with_capacity(outcomes.len());
        for (
            (ty, id),
            Prepared {
                outcome,
                object,
                cache,
            },
        ) in ops.zip(outcomes)
        {
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
                object,
            });
            if cache {
                self.cache.put(doc_id, doc);
            }
        }
        Ok(replies)
    }
}

/// Writes of one bulk post or group loaded and run through the engine at a time: their
/// decoded documents (about 50 KB each for ten fields) are what a write holds at once, about
/// 6 MB, however many objects it posts.
pub const ENGINE_CHUNK_WRITES: usize = 128;

/// Run one write through the engine and refuse a change no frame can carry: a change that
/// would never reach a peer, and would stop the log behind it on older nodes, is refused
/// before anything is stored. Pure: safe on any thread.
fn engine_write(
    engine: &super::engine::Engine,
    now_ms: i64,
    ty: &TypeName,
    id: &ObjectId,
    existing: Option<Loaded>,
    op: WriteOp<'_>,
) -> Result<Prepared, LocalWriteError> {
    let new = existing.is_none();
    let outcome = engine.local_write(now_ms, ty, id, existing, op)?;
    if let WriteOutcome::Changed(p) = &outcome {
        let bytes = crate::model::change_wire_bytes(&p.change);
        if bytes > crate::replica::outbound::MAX_LOCAL_CHANGE_BYTES {
            return Err(LocalWriteError::Refused(WriteError::Fields {
                ty: ty.clone(),
                id: id.clone(),
                source: Box::new(crate::doc::FieldsError::TooLarge {
                    bytes,
                    limit: crate::replica::outbound::MAX_LOCAL_CHANGE_BYTES,
                }),
            }));
        }
    }
    let object = match (op, &outcome) {
        // A new document holds exactly its fields but the nulls (`doc`'s proptests hold this):
        // it is not read back.
        (WriteOp::Put(fields), WriteOutcome::Changed(_)) if new => Some(
            fields
                .iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ),
        (WriteOp::Put(_), WriteOutcome::Changed(p)) => Some(doc::to_json(&p.doc)),
        (WriteOp::Put(_), WriteOutcome::Unchanged(l)) => Some(doc::to_json(&l.doc)),
        (WriteOp::Delete | WriteOp::Resolve { .. }, _) => None,
    };
    Ok(Prepared {
        outcome,
        object,
        cache: true,
    })
}

/// A write run through the engine, not yet stored: the outcome, and for a put the object as
/// its writer is answered (made beside the engine work, on the same thread).
struct Prepared {
    outcome: WriteOutcome,
    object: Option<Map<String, Json>>,
    /// Whether its document goes into the cache (it still holds it).
    cache: bool,
}

impl Prepared {
    /// Let the document go (its saved state and the answer are kept): it is not cached.
    fn release_doc(&mut self) {
        let doc = match &mut self.outcome {
            WriteOutcome::Changed(p) => &mut p.doc,
            WriteOutcome::Unchanged(l) => &mut l.doc,
        };
        drop(std::mem::take(doc));
        self.cache = false;
    }
}

/// One write of a group commit (see [`Replica::write_group`]).
#[derive(Debug, Clone)]
pub enum GroupOp {
    Put(Map<String, Json>),
    Delete,
}

impl GroupOp {
    fn as_op(&self) -> WriteOp<'_> {
        match self {
            GroupOp::Put(fields) => WriteOp::Put(fields),
            GroupOp::Delete => WriteOp::Delete,
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn put(id: &str, fields: Json) -> (TypeName, ObjectId, GroupOp) {
        let Json::Object(fields) = fields else {
            panic!("an object")
        };
        (
            TypeName::new("Sample").unwrap(),
            ObjectId::new(id).unwrap(),
            GroupOp::Put(fields),
        )
    }

    #[test]
    fn a_group_commits_each_write_on_its_own_and_a_name_twice_in_order() {
        let mut r = super::super::tests::core();
        let ops = vec![
            put("S-1", json!({"a": 1})),
            put("S-2", json!({"a": 2})),
            // Refused (a collision name cannot be claimed): the others still commit.
            put("S-3~x", json!({"a": 3})),
            // The same name again: it builds on the first write.
            put("S-1", json!({"b": 1})),
            (
                TypeName::new("Sample").unwrap(),
                ObjectId::new("S-2").unwrap(),
                GroupOp::Delete,
            ),
        ];
        let answers = r.write_group(&ops);
        assert!(matches!(answers[2], Err(LocalWriteError::BadId { .. })));
        let seqs: Vec<u64> = [0, 1, 3, 4]
            .iter()
            .map(|&i| answers[i].as_ref().unwrap().seq.unwrap())
            .collect();
        // One transaction for the first round (S-1, S-2), a second for the repeated names.
        assert_eq!(seqs, vec![1, 2, 3, 4]);
        let s1 = answers[3].as_ref().unwrap().object.clone().unwrap();
        assert_eq!(Json::Object(s1), json!({"a": 1, "b": 1}));
        let (ty, s2) = (
            TypeName::new("Sample").unwrap(),
            ObjectId::new("S-2").unwrap(),
        );
        assert!(r.find(&ty, &s2).unwrap().is_some_and(|(_, rec)| !rec.live));
        assert_eq!(r.store.last_seq().unwrap(), 4);
    }

    #[test]
    fn a_bulk_post_longer_than_a_chunk_answers_in_order_and_all_or_none() {
        // A bulk post goes ENGINE_CHUNK_WRITES at a time (before, a POST of 1,000 updates
        // loaded all 1,000 documents first: about 50 MB decoded at once; the memory is
        // measured by `bench`). The chunks must not change the answers, their order, what
        // stays in the cache or all-or-none.
        let mut r = super::super::tests::core();
        let n = 2 * ENGINE_CHUNK_WRITES + 5;
        let items =
            |round: u64, bad: Option<usize>| -> Vec<(TypeName, ObjectId, Map<String, Json>)> {
                (0..n)
                    .map(|k| {
                        let id = if bad == Some(k) {
                            format!("S-{k}~x")
                        } else {
                            format!("S-{k}")
                        };
                        let Json::Object(f) = json!({"k": k, "round": round}) else {
                            unreachable!()
                        };
                        (
                            TypeName::new("Sample").unwrap(),
                            ObjectId::new(&id).unwrap(),
                            f,
                        )
                    })
                    .collect()
            };
        for round in 0..2u64 {
            let replies = r.put_many(&items(round, None)).unwrap();
            assert_eq!(replies.len(), n);
            for (k, reply) in replies.iter().enumerate() {
                assert_eq!(reply.id, format!("S-{k}"));
                assert_eq!(reply.seq, Some(round * n as u64 + k as u64 + 1));
                let object = Json::Object(reply.object.clone().unwrap());
                assert_eq!(object, json!({"k": k, "round": round}));
            }
            // Only the last writes' documents stay decoded, as many as the cache holds.
            assert_eq!(r.cache.len(), 2);
        }
        // A write refused in the last chunk refuses the whole post: nothing is stored.
        let before = r.store.last_seq().unwrap();
        assert!(r.put_many(&items(2, Some(n - 3))).is_err());
        assert_eq!(r.store.last_seq().unwrap(), before);
        let (ty, id) = (
            TypeName::new("Sample").unwrap(),
            ObjectId::new("S-7").unwrap(),
        );
        let (doc_id, _) = r.find(&ty, &id).unwrap().unwrap();
        let doc = r.take_doc(&doc_id, None).unwrap().unwrap();
        assert_eq!(
            Json::Object(doc::to_json(&doc)),
            json!({"k": 7, "round": 1})
        );
    }
}
