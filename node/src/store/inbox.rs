//! The conflicts inbox's own tables: the documents holding fields with concurrent values
//! (kept current by every commit, so listing never scans the documents) and the bounded,
//! durable log of changes refused by policy.

use super::*;
use crate::model::RefusalRow;
use redb::ReadableTableMetadata;

/// Documents with fields holding concurrent values ([`crate::concurrent`]).
/// Key: DocId. Value: how many such fields (never 0: a document without is removed).
pub(super) const CONCURRENT: TableDefinition<[u8; 16], u32> = TableDefinition::new("concurrent_v1");

/// Changes refused by policy, oldest first: at most [`MAX_REFUSALS_KEPT`], the oldest go.
/// Key: a number counting up from 1. Value: postcard [`RefusalRow`].
pub(super) const REFUSALS: TableDefinition<u64, &[u8]> = TableDefinition::new("refusals_v1");

/// Most refusals the log keeps, in entries.
pub const MAX_REFUSALS_KEPT: u64 = 1_000;
/// Most refusals one received batch adds to the log, in entries (the counters count all).
pub const MAX_REFUSALS_PER_BATCH: usize = 100;

/// The inbox tables open in one write transaction.
pub(super) struct InboxTables<'s, 'tx> {
    store: &'s Store,
    ctx: &'static str,
    concurrent: redb::Table<'tx, [u8; 16], u32>,
    refusals: redb::Table<'tx, u64, &'static [u8]>,
}

impl<'s, 'tx> InboxTables<'s, 'tx> {
    pub(super) fn open(
        store: &'s Store,
        tx: &'tx redb::WriteTransaction,
        ctx: &'static str,
    ) -> Result<Self, StoreError> {
        Ok(InboxTables {
            store,
            ctx,
            concurrent: tx.open_table(CONCURRENT).ctx(store, ctx)?,
            refusals: tx.open_table(REFUSALS).ctx(store, ctx)?,
        })
    }

    /// Record that `doc` now has `fields` fields with concurrent values.
    pub(super) fn set_concurrent(&mut self, doc: &DocId, fields: u32) -> Result<(), StoreError> {
        let (store, ctx) = (self.store, self.ctx);
        if fields == 0 {
            self.concurrent.remove(doc.0).ctx(store, ctx)?;
        } else {
            self.concurrent.insert(doc.0, fields).ctx(store, ctx)?;
        }
        Ok(())
    }

    /// Append refusals to the log, dropping the oldest beyond [`MAX_REFUSALS_KEPT`].
    pub(super) fn log_refusals(&mut self, rows: &[RefusalRow]) -> Result<(), StoreError> {
        let (store, ctx) = (self.store, self.ctx);
        if rows.is_empty() {
            return Ok(());
        }
        let first = match self.refusals.last().ctx(store, ctx)? {
            Some((k, _)) => k.value() + 1,
            None => 1,
        };
        for (next, row) in (first..).zip(rows.iter().take(MAX_REFUSALS_PER_BATCH)) {
            let bytes = postcard::to_stdvec(row).map_err(|e| store.encode_error(e))?;
            self.refusals
                .insert(next, bytes.as_slice())
                .ctx(store, ctx)?;
        }
        while self.refusals.len().ctx(store, ctx)? > MAX_REFUSALS_KEPT {
            if self.refusals.pop_first().ctx(store, ctx)?.is_none() {
                break;
            }
        }
        Ok(())
    }
}

impl Store {
    /// The documents with fields holding concurrent values, and how many each.
    pub fn concurrent_docs(&self) -> Result<Vec<(DocId, u32)>, StoreError> {
        let ctx = "listing documents with concurrent values";
        let tx = self.db.begin_read().ctx(self, ctx)?;
        let table = tx.open_table(CONCURRENT).ctx(self, ctx)?;
        let mut out = Vec::new();
        for item in table.iter().ctx(self, ctx)? {
            let (k, v) = item.ctx(self, ctx)?;
            out.push((DocId(k.value()), v.value()));
        }
        Ok(out)
    }

    /// How many fields hold concurrent values, over all documents.
    pub fn concurrent_count(&self) -> Result<u64, StoreError> {
        Ok(self
            .concurrent_docs()?
            .iter()
            .map(|(_, n)| u64::from(*n))
            .sum())
    }

    /// How many refusals the log holds.
    pub fn refusal_count(&self) -> Result<u64, StoreError> {
        let ctx = "counting the refusal log";
        let tx = self.db.begin_read().ctx(self, ctx)?;
        tx.open_table(REFUSALS).ctx(self, ctx)?.len().ctx(self, ctx)
    }

    /// The refusal log, newest first, at most `limit` entries.
    pub fn refusals(&self, limit: usize) -> Result<Vec<RefusalRow>, StoreError> {
        let ctx = "reading the refusal log";
        let tx = self.db.begin_read().ctx(self, ctx)?;
        let table = tx.open_table(REFUSALS).ctx(self, ctx)?;
        let mut out = Vec::new();
        for item in table.iter().ctx(self, ctx)?.rev().take(limit) {
            let (k, v) = item.ctx(self, ctx)?;
            let no = k.value();
            out.push(self.decode(|| format!("refusals_v1[{no}]"), v.value())?);
        }
        Ok(out)
    }

    /// Index the concurrent values of every document (format 6 → 7).
    pub(super) fn index_all_concurrent(
        &self,
        tx: &redb::WriteTransaction,
    ) -> Result<u64, StoreError> {
        let ctx = "indexing the fields with concurrent values";
        let docs = tx.open_table(DOCS).ctx(self, ctx)?;
        let mut inbox = InboxTables::open(self, tx, ctx)?;
        let mut n = 0;
        for item in docs.iter().ctx(self, ctx)? {
            let (k, v) = item.ctx(self, ctx)?;
            let no = k.value();
            let row: DocRow = self.decode(|| format!("docs_v2[{no}]"), v.value())?;
            let Ok(doc) = Automerge::load(&row.state) else {
                continue;
            };
            let fields = crate::concurrent::count(&doc);
            if fields > 0 {
                inbox.set_concurrent(&row.doc, fields)?;
                n += 1;
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(n: u64) -> RefusalRow {
        RefusalRow {
            peer: tidesync_proto::NodeId([1; 32]),
            doc: DocId([2; 16]),
            ty: "Sample".into(),
            id: format!("S-{n}"),
            rule: "type-not-exchanged".into(),
            reason: "type Sample is not exchanged with that peer".into(),
            time_ms: n as i64,
        }
    }

    #[test]
    fn the_refusal_log_keeps_the_newest_and_no_more() {
        let store = Store::in_memory().unwrap();
        for batch in 0..12u64 {
            let rows: Vec<_> = (0..150).map(|i| row(batch * 1000 + i)).collect();
            let tx = store.db.begin_write().unwrap();
            InboxTables::open(&store, &tx, "test")
                .unwrap()
                .log_refusals(&rows)
                .unwrap();
            tx.commit().unwrap();
        }
        let all = store.refusals(usize::MAX).unwrap();
        assert_eq!(all.len() as u64, MAX_REFUSALS_KEPT);
        assert_eq!(
            all[0].id,
            format!("S-{}", 11 * 1000 + 99),
            "newest first, 100 per batch"
        );
        assert_eq!(store.refusals(3).unwrap().len(), 3);
    }

    #[test]
    fn a_document_leaves_the_index_when_its_fields_are_resolved() {
        let store = Store::in_memory().unwrap();
        let write = |n| {
            let tx = store.db.begin_write().unwrap();
            InboxTables::open(&store, &tx, "test")
                .unwrap()
                .set_concurrent(&DocId([3; 16]), n)
                .unwrap();
            tx.commit().unwrap();
        };
        write(2);
        assert_eq!(store.concurrent_docs().unwrap(), vec![(DocId([3; 16]), 2)]);
        assert_eq!(store.concurrent_count().unwrap(), 2);
        write(0);
        assert!(store.concurrent_docs().unwrap().is_empty());
    }
}
