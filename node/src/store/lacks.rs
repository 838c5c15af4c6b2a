//! What each peer told us it lacks: the files its last bundle to us named as wanted from us,
//! so that our next bundle to it carries them (a ship takes metadata ashore now, files later).

use redb::{ReadableDatabase, TableDefinition};
use tidesync_proto::NodeId;

use super::{Ctx, Store, StoreError};
use crate::files::FileHash;

/// The files each peer lacks and wants from this node, as its last bundle said. Added in
/// format 8. Key: (the peer's NodeId, BLAKE3 hash). Value: the size in bytes.
pub(super) const PEER_LACKS: TableDefinition<([u8; 32], [u8; 32]), u64> =
    TableDefinition::new("peer_lacks_v1");

/// Most files kept of what one peer says it lacks; the rest of a longer list is dropped.
pub const MAX_LACKS_PER_PEER: usize = 100_000;

impl Store {
    /// Replace what `peer` lacks with `lacks` (at most [`MAX_LACKS_PER_PEER`] of them).
    pub fn set_peer_lacks(
        &self,
        peer: &NodeId,
        lacks: &[(FileHash, u64)],
    ) -> Result<(), StoreError> {
        let ctx = "recording the files a peer lacks";
        let tx = self.db.begin_write().ctx(self, ctx)?;
        {
            let mut table = tx.open_table(PEER_LACKS).ctx(self, ctx)?;
            forget_lacks(self, &mut table, peer, ctx)?;
            for (hash, size) in lacks.iter().take(MAX_LACKS_PER_PEER) {
                table.insert((peer.0, hash.0), *size).ctx(self, ctx)?;
            }
        }
        tx.commit().ctx(self, ctx)
    }

    /// The files `peer` last said it lacks, in hash order.
    pub fn peer_lacks(&self, peer: &NodeId) -> Result<Vec<(FileHash, u64)>, StoreError> {
        let ctx = "reading the files a peer lacks";
        let tx = self.db.begin_read().ctx(self, ctx)?;
        let table = tx.open_table(PEER_LACKS).ctx(self, ctx)?;
        let mut out = Vec::new();
        for item in table
            .range((peer.0, [0u8; 32])..=(peer.0, [0xff; 32]))
            .ctx(self, ctx)?
        {
            let (k, v) = item.ctx(self, ctx)?;
            out.push((FileHash(k.value().1), v.value()));
        }
        Ok(out)
    }

    /// Drop what a removed peer lacked, inside the transaction that forgets it.
    pub(super) fn forget_lacks(
        &self,
        tx: &redb::WriteTransaction,
        peer: &NodeId,
    ) -> Result<(), StoreError> {
        let ctx = "forgetting what a removed peer lacked";
        let mut table = tx.open_table(PEER_LACKS).ctx(self, ctx)?;
        forget_lacks(self, &mut table, peer, ctx)
    }
}

fn forget_lacks(
    store: &Store,
    table: &mut redb::Table<([u8; 32], [u8; 32]), u64>,
    peer: &NodeId,
    ctx: &'static str,
) -> Result<(), StoreError> {
    table
        .retain_in((peer.0, [0u8; 32])..=(peer.0, [0xff; 32]), |_, _| false)
        .ctx(store, ctx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peers_lacks_are_replaced_whole_and_forgotten_with_it() {
        let store = Store::in_memory().unwrap();
        let (a, b) = (NodeId([1; 32]), NodeId([2; 32]));
        let (x, y) = (FileHash([7; 32]), FileHash([8; 32]));
        store.set_peer_lacks(&a, &[(x, 10), (y, 20)]).unwrap();
        store.set_peer_lacks(&b, &[(x, 10)]).unwrap();
        assert_eq!(store.peer_lacks(&a).unwrap(), vec![(x, 10), (y, 20)]);
        store.set_peer_lacks(&a, &[(y, 20)]).unwrap();
        assert_eq!(store.peer_lacks(&a).unwrap(), vec![(y, 20)]);
        store.forget_peer(&a).unwrap();
        assert!(store.peer_lacks(&a).unwrap().is_empty());
        assert_eq!(store.peer_lacks(&b).unwrap(), vec![(x, 10)]);
    }
}
