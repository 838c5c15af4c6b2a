//! What went to each peer ahead of log order (its priority types, `Message::Ahead`) and was
//! acknowledged: the log-order batches leave it out, across restarts, until the peer's
//! checkpoint passes it.

use std::collections::BTreeSet;

use super::*;

/// Log entries of ours a peer acknowledged storing ahead of its checkpoint of our log.
/// Key: (peer NodeId, our log SEQ). Value: nothing. Rows at or below the peer's
/// acknowledged SEQ are removed; at most [`MAX_SENT_AHEAD_PER_PEER`] per peer.
pub(super) const SENT_AHEAD: TableDefinition<([u8; 32], u64), ()> =
    TableDefinition::new("sent_ahead_v1");

/// Most log entries one peer may hold ahead of its checkpoint of our log; past it, the rest
/// of its priority types go in log order.
pub const MAX_SENT_AHEAD_PER_PEER: usize = 100_000;

impl Store {
    /// The SEQs of our log `peer` acknowledged storing ahead of its checkpoint.
    pub fn sent_ahead(&self, peer: &NodeId) -> Result<BTreeSet<u64>, StoreError> {
        let ctx = "reading what went ahead to a peer";
        let tx = self.db.begin_read().ctx(self, ctx)?;
        let table = tx.open_table(SENT_AHEAD).ctx(self, ctx)?;
        let mut out = BTreeSet::new();
        for item in table
            .range((peer.0, 0)..=(peer.0, u64::MAX))
            .ctx(self, ctx)?
            .take(MAX_SENT_AHEAD_PER_PEER)
        {
            let (k, _) = item.ctx(self, ctx)?;
            out.insert(k.value().1);
        }
        Ok(out)
    }

    /// Record that `peer` stored `seqs` ahead of its checkpoint, and forget every entry at or
    /// below `acked` (its checkpoint covers them now). One durable transaction: once the
    /// peer's Ack is handled, these entries are never sent to it again.
    pub fn note_sent_ahead(
        &self,
        peer: &NodeId,
        seqs: &[u64],
        acked: u64,
    ) -> Result<(), StoreError> {
        let ctx = "recording what went ahead to a peer";
        let tx = self.db.begin_write().ctx(self, ctx)?;
        {
            let mut table = tx.open_table(SENT_AHEAD).ctx(self, ctx)?;
            table
                .retain_in((peer.0, 0)..=(peer.0, acked), |_, _| false)
                .ctx(self, ctx)?;
            for seq in seqs.iter().filter(|s| **s > acked) {
                table.insert((peer.0, *seq), ()).ctx(self, ctx)?;
            }
        }
        tx.commit().ctx(self, ctx)
    }

    /// Forget everything that went ahead to `peer` (it was restored from an older copy, or
    /// is no longer configured): log order sends it all again.
    pub fn clear_sent_ahead(&self, peer: &NodeId) -> Result<(), StoreError> {
        self.note_sent_ahead(peer, &[], u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_sent_ahead_are_kept_per_peer_until_the_checkpoint_passes_them() {
        let store = Store::in_memory().unwrap();
        let (a, b) = (NodeId([1; 32]), NodeId([2; 32]));
        store.note_sent_ahead(&a, &[5, 9, 12], 3).unwrap();
        store.note_sent_ahead(&b, &[7], 0).unwrap();
        assert_eq!(store.sent_ahead(&a).unwrap(), BTreeSet::from([5, 9, 12]));
        // The checkpoint passed 9: those are covered by it now; 2 is below it, never kept.
        store.note_sent_ahead(&a, &[2, 20], 9).unwrap();
        assert_eq!(store.sent_ahead(&a).unwrap(), BTreeSet::from([12, 20]));
        assert_eq!(store.sent_ahead(&b).unwrap(), BTreeSet::from([7]));
        store.clear_sent_ahead(&a).unwrap();
        assert!(store.sent_ahead(&a).unwrap().is_empty());
        assert_eq!(store.sent_ahead(&b).unwrap(), BTreeSet::from([7]));
    }
}
