//! Tables that keep batches within the frame limit: view changes each peer acknowledged,
//! stored changes too large to ever send, and the objects referenced to us by name.
//!
//! All were added within format 2: a store made before them simply lacks the tables, which
//! reads take as empty and the first write creates.

use std::collections::{BTreeMap, HashSet};

use redb::{ReadableDatabase, ReadableTable, TableDefinition, TableError};
use tidesync_proto::{DocId, NodeId, ObjectId, TypeName};

use super::{Ctx, Store, StoreError};

/// How many of a view's changes (see `views_v1`) the peer acknowledged storing: only the
/// later ones are sent to it.
/// Key: (peer NodeId, the object's DocId). Value: number of view changes acknowledged.
pub(super) const VIEW_ACKS: TableDefinition<([u8; 32], [u8; 16]), u64> =
    TableDefinition::new("view_acks_v1");
/// Stored changes that can never fit in a frame to `peer` (received from a node with other
/// limits): skipped, counted and logged once per peer.
/// Key: (peer NodeId, DocId, change hash). Value: the change's encoded size in bytes.
const OVERSIZED: TableDefinition<OversizedKey, u64> = TableDefinition::new("oversized_v1");
/// (peer NodeId, DocId, change hash).
type OversizedKey = ([u8; 32], [u8; 16], [u8; 32]);
/// The names that objects taken from `peer` reference through our `refs` for it: an object of
/// a type we do not otherwise take from that peer is taken when it carries such a name, in
/// this batch or any later one. Written in the same commit chain as the batch that took the
/// referencing object (see [`Store::add_ref_targets`]).
/// Key: (peer NodeId, type, id as sent). Value: unit.
const REF_TARGETS: TableDefinition<([u8; 32], &str, &str), ()> =
    TableDefinition::new("ref_targets_v1");

/// Objects a batch to `peer` had to leave out although an object in it references them (they
/// did not fit in its frame): sent on their own once that batch is acknowledged.
/// Key: (peer NodeId, DocId). Value: unit.
const REFS_OWED: TableDefinition<([u8; 32], [u8; 16]), ()> = TableDefinition::new("refs_owed_v1");

/// Whether a redb table error only says that the table was never created.
fn missing(e: &TableError) -> bool {
    matches!(e, TableError::TableDoesNotExist(_))
}

impl Store {
    /// How many changes of each view published to `peer` it acknowledged (see
    /// `view_acks_v1`); views never acknowledged are absent.
    pub fn view_acks(&self, peer: &NodeId) -> Result<BTreeMap<DocId, u64>, StoreError> {
        let ctx = "reading acknowledged view changes";
        let tx = self.db.begin_read().ctx(self, ctx)?;
        let table = match tx.open_table(VIEW_ACKS) {
            Err(e) if missing(&e) => return Ok(BTreeMap::new()),
            other => other.ctx(self, ctx)?,
        };
        let mut out = BTreeMap::new();
        for item in table
            .range((peer.0, [0; 16])..=(peer.0, [0xff; 16]))
            .ctx(self, ctx)?
        {
            let (k, v) = item.ctx(self, ctx)?;
            out.insert(DocId(k.value().1), v.value());
        }
        Ok(out)
    }

    /// Record that `peer` stored the first `n` changes of each listed view. Counts only grow.
    /// Not fsynced on its own: losing it only makes us send those view changes again.
    pub fn ack_views(&self, peer: &NodeId, views: &[(DocId, u64)]) -> Result<(), StoreError> {
        if views.is_empty() {
            return Ok(());
        }
        let ctx = "recording acknowledged view changes";
        let tx = self.begin_lazy_write(ctx)?;
        {
            let mut table = tx.open_table(VIEW_ACKS).ctx(self, ctx)?;
            for (doc, n) in views {
                let before = table
                    .get((peer.0, doc.0))
                    .ctx(self, ctx)?
                    .map(|v| v.value())
                    .unwrap_or(0);
                if *n > before {
                    table.insert((peer.0, doc.0), *n).ctx(self, ctx)?;
                }
            }
        }
        tx.commit().ctx(self, ctx)
    }

    /// Clear, inside `tx`, every row these tables keep for `peer` (see [`Store::forget_peer`]).
    pub(super) fn forget_outbound(
        &self,
        tx: &redb::WriteTransaction,
        peer: &NodeId,
    ) -> Result<(), StoreError> {
        let ctx = "forgetting a removed peer";
        tx.open_table(VIEW_ACKS)
            .ctx(self, ctx)?
            .retain_in((peer.0, [0; 16])..=(peer.0, [0xff; 16]), |_, _| false)
            .ctx(self, ctx)?;
        tx.open_table(OVERSIZED)
            .ctx(self, ctx)?
            .retain_in(
                (peer.0, [0; 16], [0; 32])..=(peer.0, [0xff; 16], [0xff; 32]),
                |_, _| false,
            )
            .ctx(self, ctx)?;
        tx.open_table(REFS_OWED)
            .ctx(self, ctx)?
            .retain_in((peer.0, [0; 16])..=(peer.0, [0xff; 16]), |_, _| false)
            .ctx(self, ctx)?;
        let mut targets = tx.open_table(REF_TARGETS).ctx(self, ctx)?;
        let mut keys: Vec<(String, String)> = Vec::new();
        for item in targets.range((peer.0, "", "")..).ctx(self, ctx)? {
            let (k, _) = item.ctx(self, ctx)?;
            let (p, t, i) = k.value();
            if p != peer.0 {
                break;
            }
            keys.push((t.to_string(), i.to_string()));
        }
        for (t, i) in &keys {
            targets
                .remove((peer.0, t.as_str(), i.as_str()))
                .ctx(self, ctx)?;
        }
        Ok(())
    }

    /// Forget what `peer` acknowledged of our views: it was restored from an older copy.
    pub fn forget_view_acks(&self, peer: &NodeId) -> Result<(), StoreError> {
        let ctx = "forgetting acknowledged view changes";
        let tx = self.db.begin_write().ctx(self, ctx)?;
        {
            let mut table = tx.open_table(VIEW_ACKS).ctx(self, ctx)?;
            table
                .retain_in((peer.0, [0; 16])..=(peer.0, [0xff; 16]), |_, _| false)
                .ctx(self, ctx)?;
        }
        tx.commit().ctx(self, ctx)
    }

    /// Note that the stored change `hash` of `doc`, of `bytes` encoded bytes, can never be sent
    /// to `peer`. Returns whether this is news (so it is logged once). Not fsynced on its own.
    pub fn note_oversized(
        &self,
        peer: &NodeId,
        doc: &DocId,
        hash: &[u8; 32],
        bytes: u64,
    ) -> Result<bool, StoreError> {
        let ctx = "recording a change too large to send";
        let tx = self.begin_lazy_write(ctx)?;
        let fresh = {
            let mut table = tx.open_table(OVERSIZED).ctx(self, ctx)?;
            table
                .insert((peer.0, doc.0, *hash), bytes)
                .ctx(self, ctx)?
                .is_none()
        };
        tx.commit().ctx(self, ctx)?;
        Ok(fresh)
    }

    /// How many stored changes were skipped for `peer` because they can never fit in a frame.
    pub fn oversized_count(&self, peer: &NodeId) -> Result<u64, StoreError> {
        let ctx = "counting changes too large to send";
        let tx = self.db.begin_read().ctx(self, ctx)?;
        let table = match tx.open_table(OVERSIZED) {
            Err(e) if missing(&e) => return Ok(0),
            other => other.ctx(self, ctx)?,
        };
        let mut n = 0;
        for item in table
            .range((peer.0, [0; 16], [0; 32])..=(peer.0, [0xff; 16], [0xff; 32]))
            .ctx(self, ctx)?
        {
            item.ctx(self, ctx)?;
            n += 1;
        }
        Ok(n)
    }

    /// Which of `names` objects taken from `peer` reference (see `ref_targets_v1`).
    pub fn ref_targets<'n>(
        &self,
        peer: &NodeId,
        names: impl Iterator<Item = (&'n TypeName, &'n ObjectId)>,
    ) -> Result<HashSet<(TypeName, ObjectId)>, StoreError> {
        let ctx = "reading names referenced by a peer's objects";
        let tx = self.db.begin_read().ctx(self, ctx)?;
        let table = match tx.open_table(REF_TARGETS) {
            Err(e) if missing(&e) => return Ok(HashSet::new()),
            other => other.ctx(self, ctx)?,
        };
        let mut out = HashSet::new();
        for (ty, id) in names {
            if table
                .get((peer.0, ty.as_str(), id.as_str()))
                .ctx(self, ctx)?
                .is_some()
            {
                out.insert((ty.clone(), id.clone()));
            }
        }
        Ok(out)
    }

    /// Remember names that objects taken from `peer` reference. Called before the batch that
    /// takes those objects is committed, without an fsync of its own: the batch's durable
    /// commit carries it, so a stored referencing object always has its names recorded (a
    /// crash before that commit can only leave names recorded for objects not yet stored,
    /// which the peer sends again).
    pub fn add_ref_targets(
        &self,
        peer: &NodeId,
        names: &[(TypeName, ObjectId)],
    ) -> Result<(), StoreError> {
        if names.is_empty() {
            return Ok(());
        }
        let ctx = "recording names referenced by a peer's objects";
        let tx = self.begin_lazy_write(ctx)?;
        {
            let mut table = tx.open_table(REF_TARGETS).ctx(self, ctx)?;
            for (ty, id) in names {
                table
                    .insert((peer.0, ty.as_str(), id.as_str()), ())
                    .ctx(self, ctx)?;
            }
        }
        tx.commit().ctx(self, ctx)
    }
}

impl Store {
    /// The referenced objects still owed to `peer` (see `refs_owed_v1`).
    pub fn owed_refs(&self, peer: &NodeId) -> Result<Vec<DocId>, StoreError> {
        let ctx = "reading referenced objects owed to a peer";
        let tx = self.db.begin_read().ctx(self, ctx)?;
        let table = match tx.open_table(REFS_OWED) {
            Err(e) if missing(&e) => return Ok(Vec::new()),
            other => other.ctx(self, ctx)?,
        };
        let mut out = Vec::new();
        for item in table
            .range((peer.0, [0; 16])..=(peer.0, [0xff; 16]))
            .ctx(self, ctx)?
        {
            let (k, _) = item.ctx(self, ctx)?;
            out.push(DocId(k.value().1));
        }
        Ok(out)
    }

    /// Record, durably, referenced objects owed to `peer`: the batch that leaves them out may
    /// be acknowledged before a crash, and nothing else would send them.
    pub fn owe_refs(&self, peer: &NodeId, docs: &[DocId]) -> Result<(), StoreError> {
        if docs.is_empty() {
            return Ok(());
        }
        let ctx = "recording referenced objects owed to a peer";
        let tx = self.db.begin_write().ctx(self, ctx)?;
        {
            let mut table = tx.open_table(REFS_OWED).ctx(self, ctx)?;
            for d in docs {
                table.insert((peer.0, d.0), ()).ctx(self, ctx)?;
            }
        }
        tx.commit().ctx(self, ctx)
    }

    /// `peer` acknowledged a batch carrying these owed objects (or they can never be sent).
    pub fn settle_refs(&self, peer: &NodeId, docs: &[DocId]) -> Result<(), StoreError> {
        if docs.is_empty() {
            return Ok(());
        }
        let ctx = "settling referenced objects owed to a peer";
        let tx = self.begin_lazy_write(ctx)?;
        {
            let mut table = tx.open_table(REFS_OWED).ctx(self, ctx)?;
            for d in docs {
                table.remove((peer.0, d.0)).ctx(self, ctx)?;
            }
        }
        tx.commit().ctx(self, ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn view_acks_only_grow_and_are_forgotten_per_peer() {
        let store = Store::in_memory().expect("store");
        let (a, b) = (NodeId([1; 32]), NodeId([2; 32]));
        let doc = DocId([7; 16]);
        assert!(store.view_acks(&a).expect("read").is_empty());
        store.ack_views(&a, &[(doc, 3)]).expect("ack");
        store.ack_views(&a, &[(doc, 2)]).expect("ack");
        store.ack_views(&b, &[(doc, 1)]).expect("ack");
        assert_eq!(store.view_acks(&a).expect("read").get(&doc), Some(&3));
        store.forget_view_acks(&a).expect("forget");
        assert!(store.view_acks(&a).expect("read").is_empty());
        assert_eq!(store.view_acks(&b).expect("read").get(&doc), Some(&1));
    }

    #[test]
    fn an_oversized_change_is_news_once_per_peer() {
        let store = Store::in_memory().expect("store");
        let (a, b) = (NodeId([1; 32]), NodeId([2; 32]));
        let doc = DocId([7; 16]);
        assert!(store.note_oversized(&a, &doc, &[9; 32], 10).expect("note"));
        assert!(!store.note_oversized(&a, &doc, &[9; 32], 10).expect("note"));
        assert!(store.note_oversized(&b, &doc, &[9; 32], 10).expect("note"));
        assert_eq!(store.oversized_count(&a).expect("count"), 1);
        assert_eq!(store.oversized_count(&NodeId([3; 32])).expect("count"), 0);
    }

    #[test]
    fn referenced_names_are_kept_per_peer() {
        let store = Store::in_memory().expect("store");
        let (a, b) = (NodeId([1; 32]), NodeId([2; 32]));
        let name = (
            TypeName::new("User").expect("type"),
            ObjectId::new("u-1").expect("id"),
        );
        store
            .add_ref_targets(&a, std::slice::from_ref(&name))
            .expect("add");
        let other = (name.0.clone(), ObjectId::new("u-2").expect("id"));
        let asked = [(&name.0, &name.1), (&other.0, &other.1)];
        let got = store.ref_targets(&a, asked.into_iter()).expect("read");
        assert_eq!(got, HashSet::from([name.clone()]));
        assert!(
            store
                .ref_targets(&b, asked.into_iter())
                .expect("read")
                .is_empty()
        );
    }

    #[test]
    fn owed_references_are_kept_until_settled() {
        let store = Store::in_memory().expect("store");
        let a = NodeId([1; 32]);
        let (d1, d2) = (DocId([1; 16]), DocId([2; 16]));
        assert!(store.owed_refs(&a).expect("read").is_empty());
        store.owe_refs(&a, &[d1, d2]).expect("owe");
        store.settle_refs(&a, &[d1]).expect("settle");
        assert_eq!(store.owed_refs(&a).expect("read"), vec![d2]);
    }
}
