//! Equivocations found here, with both signed changes as evidence, and the changes they make
//! every node refuse (see [`crate::model::Equivocation`] and [`crate::model::DocBans`]).

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use tidesync_proto::DocId;

use super::{Ctx, Reader, Store, StoreError};
use crate::model::{DocBans, Equivocation};

/// One row per equivocating actor in a document, holding the lowest contested sequence number
/// seen. Added in format 5.
/// Key: (DocId, Automerge actor bytes). Value: postcard [`Equivocation`].
pub(super) const EQUIVOCATIONS: TableDefinition<([u8; 16], &[u8]), &[u8]> =
    TableDefinition::new("equivocations_v1");

/// Changes refused because of an equivocation, so that they are dropped as known when they
/// arrive again. Added in format 5.
/// Key: (DocId, Automerge change hash). Value: unit.
pub(super) const BANNED: TableDefinition<([u8; 16], [u8; 32]), ()> =
    TableDefinition::new("banned_v1");

impl Reader<'_> {
    /// What equivocations make `doc` refuse; empty for almost every document.
    pub fn bans(&self, doc: &DocId) -> Result<DocBans, StoreError> {
        let ctx = "reading equivocations";
        let mut bans = DocBans::default();
        let lo: &[u8] = &[];
        let hi = (doc.0, [0xffu8; 64].as_slice());
        for item in self
            .equivocations
            .range((doc.0, lo)..=hi)
            .ctx(self.store, ctx)?
        {
            let (_, v) = item.ctx(self.store, ctx)?;
            let e: Equivocation = self
                .store
                .decode(|| format!("equivocations_v1 of {doc}"), v.value())?;
            bans.cuts.insert(e.actor, e.seq);
        }
        if bans.cuts.is_empty() {
            return Ok(bans);
        }
        for item in self
            .banned
            .range((doc.0, [0u8; 32])..=(doc.0, [0xffu8; 32]))
            .ctx(self.store, ctx)?
        {
            let (k, _) = item.ctx(self.store, ctx)?;
            bans.banned.insert(automerge::ChangeHash(k.value().1));
        }
        Ok(bans)
    }
}

/// Record equivocations and refused changes in the transaction `tx`: an actor keeps the
/// evidence for its lowest contested sequence number.
pub(super) fn record(
    store: &Store,
    tx: &redb::WriteTransaction,
    doc: &DocId,
    found: &[Equivocation],
    banned: &[automerge::ChangeHash],
    ctx: &'static str,
) -> Result<(), StoreError> {
    if found.is_empty() && banned.is_empty() {
        return Ok(());
    }
    let mut table = tx.open_table(EQUIVOCATIONS).ctx(store, ctx)?;
    for e in found {
        let key = (doc.0, e.actor.as_slice());
        let lower = match table.get(key).ctx(store, ctx)? {
            Some(v) => {
                let old: Equivocation = store.decode(|| "equivocations_v1".into(), v.value())?;
                e.seq < old.seq
            }
            None => true,
        };
        if lower {
            let bytes = postcard::to_stdvec(e).map_err(|x| store.encode_error(x))?;
            table.insert(key, bytes.as_slice()).ctx(store, ctx)?;
        }
    }
    let mut table = tx.open_table(BANNED).ctx(store, ctx)?;
    for hash in banned {
        table.insert((doc.0, hash.0), ()).ctx(store, ctx)?;
    }
    Ok(())
}

impl Store {
    /// Every equivocation found here, document by document.
    pub fn equivocations(&self) -> Result<Vec<Equivocation>, StoreError> {
        let ctx = "reading equivocations";
        let tx = self.db.begin_read().ctx(self, ctx)?;
        let table = tx.open_table(EQUIVOCATIONS).ctx(self, ctx)?;
        let mut out = Vec::new();
        for item in table.iter().ctx(self, ctx)? {
            let (_, v) = item.ctx(self, ctx)?;
            out.push(self.decode(|| "equivocations_v1".into(), v.value())?);
        }
        Ok(out)
    }

    /// How many changes equivocations made this node refuse.
    pub fn banned_count(&self) -> Result<u64, StoreError> {
        use redb::ReadableTableMetadata;
        let ctx = "counting refused changes";
        let tx = self.db.begin_read().ctx(self, ctx)?;
        tx.open_table(BANNED).ctx(self, ctx)?.len().ctx(self, ctx)
    }
}
