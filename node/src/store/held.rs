//! Held changes: verified changes waiting for their dependencies, each with the peer that sent
//! it, and per-sender tallies that the quotas read (`pending_v2`, `held_counts_v1`).

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use tidesync_proto::{DocHeader, DocId, NodeId, SignedChange};

use super::{Ctx, Reader, Store, StoreError};

/// Verified changes held until their dependencies arrive (they are not in the log yet).
/// Key: (DocId, change hash). Value: postcard [`HeldRow`].
pub(super) const HELD: TableDefinition<([u8; 16], [u8; 32]), &[u8]> =
    TableDefinition::new("pending_v2");
/// Format 2's held changes, without their sender: migrated into `pending_v2` at open.
/// Key: (DocId, change hash). Value: postcard `(DocHeader, SignedChange)`.
pub(super) const HELD_V1: TableDefinition<([u8; 16], [u8; 32]), &[u8]> =
    TableDefinition::new("pending_v1");
/// What each sender has held here, for the quotas.
/// Key: sender NodeId ([`UNKNOWN_SENDER`] for rows migrated from `pending_v1`).
/// Value: (held changes, their bytes, changes refused for lack of room, ever).
pub(super) const HELD_COUNTS: TableDefinition<[u8; 32], (u64, u64, u64)> =
    TableDefinition::new("held_counts_v1");

/// A held change's key: (DocId, change hash).
type HeldKey = ([u8; 16], [u8; 32]);

/// The tally key of held changes whose sender was not recorded (held by format 2).
const UNKNOWN_SENDER: [u8; 32] = [0; 32];

/// One held change.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeldRow {
    pub header: DocHeader,
    pub change: SignedChange,
    /// The peer it was received from; `None` for one held before senders were recorded.
    pub from: Option<NodeId>,
    /// When it was first held, Unix milliseconds (0 when not recorded).
    pub since_ms: i64,
}

/// What one sender has held here.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct HeldTally {
    pub changes: u64,
    pub bytes: u64,
    /// Changes refused because the sender's or the document's quota was full.
    pub refused_for_room: u64,
}

impl HeldTally {
    /// A `held_counts_v1` row, or nothing held.
    fn from_row(row: Option<(u64, u64, u64)>) -> HeldTally {
        let (changes, bytes, refused_for_room) = row.unwrap_or_default();
        HeldTally {
            changes,
            bytes,
            refused_for_room,
        }
    }
}

/// Which held changes a listing or a purge means.
#[derive(Debug, Clone, Copy, Default)]
pub struct HeldFilter {
    pub from: Option<NodeId>,
    pub doc: Option<DocId>,
}

impl HeldFilter {
    fn matches(&self, doc: &DocId, row: &HeldRow) -> bool {
        self.doc.is_none_or(|d| d == *doc) && self.from.is_none_or(|f| row.from == Some(f))
    }
}

fn tally_key(from: Option<NodeId>) -> [u8; 32] {
    from.map(|f| f.0).unwrap_or(UNKNOWN_SENDER)
}

/// The held-change tables of one write transaction.
pub(super) struct HeldTables<'tx> {
    held: redb::Table<'tx, ([u8; 16], [u8; 32]), &'static [u8]>,
    counts: redb::Table<'tx, [u8; 32], (u64, u64, u64)>,
}

impl<'tx> HeldTables<'tx> {
    pub(super) fn open(
        store: &Store,
        tx: &'tx redb::WriteTransaction,
        ctx: &'static str,
    ) -> Result<HeldTables<'tx>, StoreError> {
        Ok(HeldTables {
            held: tx.open_table(HELD).ctx(store, ctx)?,
            counts: tx.open_table(HELD_COUNTS).ctx(store, ctx)?,
        })
    }

    fn bump(
        &mut self,
        store: &Store,
        key: [u8; 32],
        f: impl FnOnce(&mut HeldTally),
    ) -> Result<(), StoreError> {
        let ctx = "counting held changes";
        let mut t = HeldTally::from_row(self.counts.get(key).ctx(store, ctx)?.map(|v| v.value()));
        f(&mut t);
        self.counts
            .insert(key, (t.changes, t.bytes, t.refused_for_room))
            .ctx(store, ctx)?;
        Ok(())
    }

    /// Hold `row` (a no-op when that change is held already).
    pub(super) fn hold(
        &mut self,
        store: &Store,
        hash: [u8; 32],
        row: &HeldRow,
    ) -> Result<(), StoreError> {
        let ctx = "holding a change";
        let bytes = postcard::to_stdvec(row).map_err(|x| store.encode_error(x))?;
        let before = self
            .held
            .insert((row.header.doc.0, hash), bytes.as_slice())
            .ctx(store, ctx)?
            .is_some();
        if !before {
            let len = row.change.bytes.len() as u64;
            self.bump(store, tally_key(row.from), |t| {
                t.changes += 1;
                t.bytes += len;
            })?;
        }
        Ok(())
    }

    /// Stop holding a change (released or dropped); true when it was held.
    pub(super) fn unhold(
        &mut self,
        store: &Store,
        doc: &DocId,
        hash: [u8; 32],
    ) -> Result<bool, StoreError> {
        let ctx = "releasing a held change";
        let Some(old) = self.held.remove((doc.0, hash)).ctx(store, ctx)? else {
            return Ok(false);
        };
        let row: HeldRow = store.decode(|| format!("pending_v2[{doc}]"), old.value())?;
        drop(old);
        let len = row.change.bytes.len() as u64;
        self.bump(store, tally_key(row.from), |t| {
            t.changes = t.changes.saturating_sub(1);
            t.bytes = t.bytes.saturating_sub(len);
        })?;
        Ok(true)
    }

    /// Count changes from `from` refused for lack of room.
    pub(super) fn refused_for_room(
        &mut self,
        store: &Store,
        from: &NodeId,
        n: u64,
    ) -> Result<(), StoreError> {
        if n == 0 {
            return Ok(());
        }
        self.bump(store, from.0, |t| t.refused_for_room += n)
    }
}

impl Store {
    /// Move format 2's held changes (`pending_v1`, no sender) into `pending_v2` with an unknown
    /// sender, in `tx`. Their sender is unknown, so once released they are offered to every
    /// peer, which is the direction that never loses a change.
    pub(super) fn migrate_held_v1(&self, tx: &redb::WriteTransaction) -> Result<(), StoreError> {
        let ctx = "migrating held changes to pending_v2";
        let mut tables = HeldTables::open(self, tx, ctx)?;
        let old_rows: Vec<(HeldKey, Vec<u8>)> = match tx.open_table(HELD_V1) {
            Ok(old) => {
                let mut rows = Vec::new();
                for item in old.iter().ctx(self, ctx)? {
                    let (k, v) = item.ctx(self, ctx)?;
                    rows.push((k.value(), v.value().to_vec()));
                }
                rows
            }
            Err(e) => return Err(super::classify(&self.path, ctx, e.into())),
        };
        for ((doc, hash), value) in old_rows {
            let (header, change): (DocHeader, SignedChange) =
                self.decode(|| "a pending_v1 row".to_string(), &value)?;
            let row = HeldRow {
                header,
                change,
                from: None,
                since_ms: 0,
            };
            debug_assert_eq!(row.header.doc.0, doc);
            tables.hold(self, hash, &row)?;
        }
        tx.delete_table(HELD_V1).ctx(self, ctx)?;
        Ok(())
    }

    /// How many changes are held for missing dependencies.
    pub fn pending_count(&self) -> Result<u64, StoreError> {
        let ctx = "counting held changes";
        let tx = self.db.begin_read().ctx(self, ctx)?;
        let held = tx.open_table(HELD).ctx(self, ctx)?;
        held.len().ctx(self, ctx)
    }

    /// Every change held for missing dependencies, with its document's header (audits).
    pub fn held_changes(&self) -> Result<Vec<(DocHeader, SignedChange)>, StoreError> {
        Ok(self
            .held_rows(HeldFilter::default(), usize::MAX)?
            .into_iter()
            .map(|(_, r)| (r.header, r.change))
            .collect())
    }

    /// Up to `limit` held changes that `filter` matches, each with its change hash, in
    /// (document, hash) order.
    pub fn held_rows(
        &self,
        filter: HeldFilter,
        limit: usize,
    ) -> Result<Vec<([u8; 32], HeldRow)>, StoreError> {
        let ctx = "listing held changes";
        let tx = self.db.begin_read().ctx(self, ctx)?;
        let held = tx.open_table(HELD).ctx(self, ctx)?;
        let range = match filter.doc {
            Some(d) => held.range((d.0, [0u8; 32])..=(d.0, [0xffu8; 32])),
            None => held.range::<([u8; 16], [u8; 32])>(..),
        }
        .ctx(self, ctx)?;
        let mut out = Vec::new();
        for item in range {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item.ctx(self, ctx)?;
            let (doc, hash) = k.value();
            let doc = DocId(doc);
            let row: HeldRow = self.decode(|| format!("pending_v2[{doc}]"), v.value())?;
            if filter.matches(&doc, &row) {
                out.push((hash, row));
            }
        }
        Ok(out)
    }

    /// Remove the held changes `filter` matches, in one durable transaction; returns how many.
    pub fn purge_held(&self, filter: HeldFilter) -> Result<u64, StoreError> {
        let ctx = "purging held changes";
        let keys: Vec<(DocId, [u8; 32])> = self
            .held_rows(filter, usize::MAX)?
            .into_iter()
            .map(|(hash, r)| (r.header.doc, hash))
            .collect();
        let tx = self.db.begin_write().ctx(self, ctx)?;
        let mut removed = 0;
        {
            let mut tables = HeldTables::open(self, &tx, ctx)?;
            for (doc, hash) in keys {
                if tables.unhold(self, &doc, hash)? {
                    removed += 1;
                }
            }
        }
        tx.commit().ctx(self, ctx)?;
        Ok(removed)
    }

    /// What each sender has held here (the unknown sender of migrated rows as `None`).
    pub fn held_tallies(&self) -> Result<Vec<(Option<NodeId>, HeldTally)>, StoreError> {
        let ctx = "reading held-change tallies";
        let tx = self.db.begin_read().ctx(self, ctx)?;
        let counts = tx.open_table(HELD_COUNTS).ctx(self, ctx)?;
        let mut out = Vec::new();
        for item in counts.iter().ctx(self, ctx)? {
            let (k, v) = item.ctx(self, ctx)?;
            let key = k.value();
            let from = (key != UNKNOWN_SENDER).then_some(NodeId(key));
            out.push((from, HeldTally::from_row(Some(v.value()))));
        }
        Ok(out)
    }
}

impl Reader<'_> {
    /// The changes of `doc` held for missing dependencies, each with its sender.
    pub fn pending(&self, doc: &DocId) -> Result<Vec<(SignedChange, Option<NodeId>)>, StoreError> {
        let ctx = "reading held changes";
        let mut out = Vec::new();
        for item in self
            .held
            .range((doc.0, [0u8; 32])..=(doc.0, [0xffu8; 32]))
            .ctx(self.store, ctx)?
        {
            let (_, v) = item.ctx(self.store, ctx)?;
            let row: HeldRow = self
                .store
                .decode(|| format!("pending_v2[{doc}]"), v.value())?;
            out.push((row.change, row.from));
        }
        Ok(out)
    }

    /// What `from` has held here.
    pub fn held_tally(&self, from: &NodeId) -> Result<HeldTally, StoreError> {
        let ctx = "reading a held-change tally";
        let row = self.held_counts.get(from.0).ctx(self.store, ctx)?;
        Ok(HeldTally::from_row(row.map(|v| v.value())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{META, STORE_FORMAT, STORE_FORMAT_2};
    use redb::ReadableDatabase;
    use tidesync_proto::{ObjectId, TypeName};

    fn row(n: u8) -> (DocHeader, SignedChange) {
        let origin = NodeId([n; 32]);
        let ty = TypeName::new("Sample").unwrap();
        let id = ObjectId::new(format!("S-{n}")).unwrap();
        let doc = DocId::derive(&origin, &ty, &id);
        let header = DocHeader {
            doc,
            origin,
            ty,
            id,
        };
        let change = SignedChange {
            doc,
            bytes: vec![n; 10],
            signature: [n; 64],
        };
        (header, change)
    }

    // A format-2 store's held changes (pending_v1, without their sender) move to pending_v2
    // with an unknown sender when a format-3 build opens it, and the format is raised.
    #[test]
    fn a_format_2_store_is_migrated_with_its_held_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        {
            let store = Store::create(&path).unwrap();
            let tx = store.db.begin_write().unwrap();
            {
                tx.open_table(META)
                    .unwrap()
                    .insert("format", STORE_FORMAT_2.as_bytes())
                    .unwrap();
                tx.delete_table(HELD).unwrap();
                tx.delete_table(HELD_COUNTS).unwrap();
                let mut old = tx.open_table(HELD_V1).unwrap();
                for n in 1..=3 {
                    let (h, c) = row(n);
                    let bytes = postcard::to_stdvec(&(&h, &c)).unwrap();
                    old.insert((h.doc.0, [n; 32]), bytes.as_slice()).unwrap();
                }
            }
            tx.commit().unwrap();
        }
        let store = Store::open(&path, 1 << 20).unwrap();
        assert_eq!(store.pending_count().unwrap(), 3);
        let rows = store.held_rows(HeldFilter::default(), 10).unwrap();
        assert!(rows.iter().all(|(_, r)| r.from.is_none()));
        assert_eq!(
            store.held_tallies().unwrap(),
            vec![(
                None,
                HeldTally {
                    changes: 3,
                    bytes: 30,
                    refused_for_room: 0
                }
            )]
        );
        let tx = store.db.begin_read().unwrap();
        let format = tx.open_table(META).unwrap().get("format").unwrap().unwrap();
        assert_eq!(format.value(), STORE_FORMAT.as_bytes());
        assert!(tx.open_table(HELD_V1).is_err(), "pending_v1 is gone");
        drop(format);
        drop(tx);
        // Purging by document removes exactly that document's rows and their tally.
        let doc = row(2).0.doc;
        let removed = store
            .purge_held(HeldFilter {
                from: None,
                doc: Some(doc),
            })
            .unwrap();
        assert_eq!(removed, 1);
        assert_eq!(store.pending_count().unwrap(), 2);
        assert_eq!(store.held_tallies().unwrap()[0].1.changes, 2);
    }
}
