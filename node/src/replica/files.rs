//! Files and policy: which files an arriving object makes this node want, and whether a peer
//! may be served a file (only if an object it may receive from us refers to it).

use tidesync_proto::NodeId;

use super::Replica;
use crate::files::{FileHash, FileRef};
use crate::model::{MAX_WANT_SOURCES, ReceivedDoc, WantRow};
use crate::policy::{Direction, FilesMode, Policies, Policy};
use crate::store::{StoreError, Wanted};

/// Most documents referring to one file that are checked when a peer asks for it: a file is
/// served if one of them may go to the peer.
pub const MAX_REFERRERS_CHECKED: usize = 256;

/// The files `doc`, just arrived from `from`, makes this node want under its policy for
/// `from`: every file its new state refers to, unless the rule is `never` or the file is over
/// `max-file-bytes`. The sources are the sender and the object's origin when it is a
/// configured peer.
pub(super) fn wants_of(
    policies: &Policies,
    me: NodeId,
    from: NodeId,
    doc: &ReceivedDoc,
    now_ms: i64,
) -> Vec<WantRow> {
    let policy = policies.of(&from);
    let origin = doc.header.origin;
    let mut sources = vec![from];
    if origin != me && origin != from && policies.name_of(&origin).is_some() {
        sources.push(origin);
    }
    sources.truncate(MAX_WANT_SOURCES);
    doc.files
        .iter()
        .filter(|(_, size)| policy.moves_file(*size))
        .map(|(hash, size)| WantRow {
            hash: *hash,
            size: *size,
            claimant: from,
            sources: sources.clone(),
            on_demand: policy.files == FilesMode::OnDemand,
            added_ms: now_ms,
            done: Vec::new(),
            last_error: None,
        })
        .collect()
}

/// Whether the files rule of `after` lets in a file that `before` kept out: `never` lifted,
/// or a larger `max-file-bytes`.
pub fn files_widened(before: &Policy, after: &Policy) -> bool {
    let most = |p: &Policy| match p.files {
        FilesMode::Never => 0,
        _ => p.max_file_bytes.unwrap_or(crate::files::MAX_FILE_BYTES),
    };
    most(after) > most(before)
}

impl Replica {
    /// Whether `peer` may be served file `hash` of `size` bytes: it is stored here, our
    /// policy for the peer lets files of that size go, and an object held here that refers to
    /// it may go to the peer, through a field it may see. Anything else looks to the peer
    /// exactly like a file this node does not have.
    pub fn may_serve_file(
        &self,
        peer: NodeId,
        hash: &FileHash,
        size: u64,
    ) -> Result<bool, StoreError> {
        let policy = self.policies.of(&peer);
        if !policy.moves_file(size) || policy.direction == Direction::Receive {
            return Ok(false);
        }
        if self
            .store
            .file(hash)
            .ok()
            .flatten()
            .is_none_or(|(_, row)| row.size != size)
        {
            return Ok(false);
        }
        let mut carried = None;
        for (doc_id, _) in self.store.docs_referring(hash, MAX_REFERRERS_CHECKED)? {
            let Some(rec) = self.store.record(&doc_id)? else {
                continue;
            };
            if policy.publishes_view(&rec.ty) {
                // Only the published fields reach the peer: the file must be in one of them.
                let Some(doc) = self.store.load_doc(&doc_id)? else {
                    continue;
                };
                let published = policy
                    .view(&rec.ty, &crate::doc::to_json(&doc))
                    .unwrap_or_default();
                if FileRef::all_in(&published)
                    .unwrap_or_default()
                    .iter()
                    .any(|r| r.hash == *hash)
                {
                    return Ok(true);
                }
                continue;
            }
            if self.policies.may_send(&peer, &rec, false) {
                return Ok(true);
            }
            if self.policies.may_send(&peer, &rec, true) {
                if carried.is_none() {
                    carried = Some(self.store.by_ref(&peer)?);
                }
                if carried.as_ref().is_some_and(|c| c.contains(&doc_id)) {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// After `peer`'s files rule widened (see [`files_widened`]): want the files that objects
    /// from it refer to and the new rule lets in, as if those objects had just arrived. An
    /// object counts as from `peer` when it originated there, or at a node that is not a
    /// configured peer (it was relayed, possibly by `peer`). Returns how many were wanted anew.
    pub(super) fn want_files_now_allowed(&mut self, peer: NodeId) -> Result<usize, StoreError> {
        let me = self.node_id();
        let now = self.now_ms();
        let mut rows = Vec::new();
        let (store, policies) = (&self.store, &self.policies);
        store.each_doc_with_files(|doc_id, files| {
            let Some(rec) = store.record(&doc_id)? else {
                return Ok(());
            };
            let origin = rec.origin;
            if origin == me || (origin != peer && policies.name_of(&origin).is_some()) {
                return Ok(());
            }
            let doc = ReceivedDoc {
                files,
                ..ReceivedDoc::nothing(tidesync_proto::DocHeader {
                    doc: doc_id,
                    origin,
                    ty: rec.ty.clone(),
                    id: rec.id.clone(),
                })
            };
            // Files held already come back from `add_wants` as held.
            rows.extend(wants_of(policies, me, peer, &doc, now));
            Ok(())
        })?;
        let outcomes = self.store.add_wants(&rows)?;
        let mut added = 0;
        for (row, outcome) in rows.into_iter().zip(outcomes) {
            if matches!(outcome, Wanted::Added | Wanted::Merged) {
                added += usize::from(outcome == Wanted::Added);
                self.new_wants.push(row);
            }
        }
        Ok(added)
    }

    /// Files newly on the want-list (or wanted from new sources) since the last call.
    pub fn take_new_wants(&mut self) -> Vec<WantRow> {
        std::mem::take(&mut self.new_wants)
    }
}
