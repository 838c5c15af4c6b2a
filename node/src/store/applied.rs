//! The policy each configured peer last had applied here, and the keys revoked by replacing
//! a peer's key: both written with the peer's checkpoint in one durable transaction.

use std::collections::BTreeMap;

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tidesync_proto::NodeId;

use super::{BY_REF, Ctx, PEERS, Store, StoreError};
use crate::model::PeerRecord;

/// The policy last applied to each configured peer, as the replica encoded it (the store
/// does not read it), under the peer's name. Compared with the configuration at every start
/// and every change, so a widening made while the node was stopped is still backfilled.
/// Added in format 4.
/// Key: peer NodeId. Value: the replica's encoding of `(name, policy)`.
pub(super) const APPLIED: TableDefinition<[u8; 32], &[u8]> =
    TableDefinition::new("applied_policies_v1");

/// Keys that were replaced under their name: nothing new signed by them is taken, and they
/// cannot connect or import bundles. Added in format 4.
/// Key: the revoked NodeId. Value: postcard [`Revoked`].
pub(super) const REVOKED: TableDefinition<[u8; 32], &[u8]> =
    TableDefinition::new("revoked_keys_v1");

/// Why a key is revoked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revoked {
    /// The peer name the key had.
    pub name: String,
    /// The key that replaced it under that name.
    pub replaced_by: NodeId,
    /// When, Unix milliseconds.
    pub since_ms: i64,
}

/// One peer's policy change, written whole in one durable transaction by
/// [`Store::apply_policy`].
pub struct PolicyChange<'a> {
    pub peer: NodeId,
    /// The replica's encoding of the peer's name and policy.
    pub applied: &'a [u8],
    /// Send the peer's checkpoint back to the start: the policy widened.
    pub reset: bool,
    /// Keys this change replaces under the peer's name.
    pub revoke: Vec<(NodeId, Revoked)>,
}

impl Store {
    /// Every peer's applied policy, as stored (see `applied_policies_v1`).
    pub fn applied_policies(&self) -> Result<BTreeMap<NodeId, Vec<u8>>, StoreError> {
        let ctx = "reading applied policies";
        let tx = self.db.begin_read().ctx(self, ctx)?;
        let table = tx.open_table(APPLIED).ctx(self, ctx)?;
        let mut out = BTreeMap::new();
        for item in table.iter().ctx(self, ctx)? {
            let (k, v) = item.ctx(self, ctx)?;
            out.insert(NodeId(k.value()), v.value().to_vec());
        }
        Ok(out)
    }

    /// Whether this store holds a record of `peer` (it synced with it once).
    pub fn knows_peer(&self, peer: &NodeId) -> Result<bool, StoreError> {
        let ctx = "reading peer state";
        let tx = self.db.begin_read().ctx(self, ctx)?;
        let peers = tx.open_table(PEERS).ctx(self, ctx)?;
        Ok(peers.get(peer.0).ctx(self, ctx)?.is_some())
    }

    /// The revoked keys (see `revoked_keys_v1`).
    pub fn revoked(&self) -> Result<BTreeMap<NodeId, Revoked>, StoreError> {
        let ctx = "reading revoked keys";
        let tx = self.db.begin_read().ctx(self, ctx)?;
        let table = tx.open_table(REVOKED).ctx(self, ctx)?;
        let mut out = BTreeMap::new();
        for item in table.iter().ctx(self, ctx)? {
            let (k, v) = item.ctx(self, ctx)?;
            let id = NodeId(k.value());
            out.insert(
                id,
                self.decode(|| format!("revoked_keys_v1[{id}]"), v.value())?,
            );
        }
        Ok(out)
    }

    /// Apply one peer's policy change, all or nothing, durably: its applied policy, the reset
    /// of its checkpoint when the policy widened, and the revocation of the keys it replaces
    /// (which lose their applied policy). A key configured again is no longer revoked.
    pub fn apply_policy(&self, change: &PolicyChange<'_>) -> Result<(), StoreError> {
        let ctx = "applying a peer's policy";
        let peer = change.peer;
        let tx = self.db.begin_write().ctx(self, ctx)?;
        {
            let mut applied = tx.open_table(APPLIED).ctx(self, ctx)?;
            applied.insert(peer.0, change.applied).ctx(self, ctx)?;
            let mut revoked = tx.open_table(REVOKED).ctx(self, ctx)?;
            revoked.remove(peer.0).ctx(self, ctx)?;
            for (old, why) in &change.revoke {
                applied.remove(old.0).ctx(self, ctx)?;
                let bytes = postcard::to_stdvec(why).map_err(|x| self.encode_error(x))?;
                revoked.insert(old.0, bytes.as_slice()).ctx(self, ctx)?;
            }
            if change.reset {
                let mut peers = tx.open_table(PEERS).ctx(self, ctx)?;
                let mut record: PeerRecord = match peers.get(peer.0).ctx(self, ctx)? {
                    Some(v) => self.decode(|| format!("peers_v1[{peer}]"), v.value())?,
                    None => PeerRecord::default(),
                };
                record.received = Default::default();
                record.ahead.clear();
                record.resend_all = true;
                let bytes = postcard::to_stdvec(&record).map_err(|x| self.encode_error(x))?;
                peers.insert(peer.0, bytes.as_slice()).ctx(self, ctx)?;
            }
        }
        tx.commit().ctx(self, ctx)
    }

    /// Forget everything this node remembers of `peer`, durably, in one transaction: its
    /// record (checkpoints, acknowledgements, counters), its applied policy, the documents
    /// carried to it by reference and what it acknowledged of our views. A peer removed and
    /// added again starts from 0. Views we wrote for it stay (a view change is never made
    /// twice) and are sent again.
    pub fn forget_peer(&self, peer: &NodeId) -> Result<(), StoreError> {
        let ctx = "forgetting a removed peer";
        let tx = self.db.begin_write().ctx(self, ctx)?;
        {
            tx.open_table(PEERS)
                .ctx(self, ctx)?
                .remove(peer.0)
                .ctx(self, ctx)?;
            tx.open_table(APPLIED)
                .ctx(self, ctx)?
                .remove(peer.0)
                .ctx(self, ctx)?;
            tx.open_table(BY_REF)
                .ctx(self, ctx)?
                .retain_in((peer.0, [0; 16])..=(peer.0, [0xff; 16]), |_, _| false)
                .ctx(self, ctx)?;
            self.forget_outbound(&tx, peer)?;
            self.forget_lacks(&tx, peer)?;
        }
        tx.commit().ctx(self, ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidesync_proto::Checkpoint;

    #[test]
    fn a_policy_change_is_written_whole_and_a_forgotten_peer_starts_from_zero() {
        let store = Store::in_memory().unwrap();
        let (a, old) = (NodeId([1; 32]), NodeId([2; 32]));
        store
            .update_peer(&a, |r| {
                r.received = Checkpoint {
                    seq: 9,
                    hash: [9; 32],
                };
                r.acked = 4;
            })
            .unwrap();
        store
            .apply_policy(&PolicyChange {
                peer: old,
                applied: b"old",
                reset: false,
                revoke: vec![],
            })
            .unwrap();
        let why = Revoked {
            name: "a".into(),
            replaced_by: a,
            since_ms: 5,
        };
        store
            .apply_policy(&PolicyChange {
                peer: a,
                applied: b"wide",
                reset: true,
                revoke: vec![(old, why.clone())],
            })
            .unwrap();
        let record = store.peer(&a).unwrap();
        assert_eq!(record.received, Checkpoint::default());
        assert!(record.resend_all);
        assert_eq!(
            record.acked, 4,
            "only the checkpoint of the peer's log resets"
        );
        assert_eq!(
            store.applied_policies().unwrap(),
            BTreeMap::from([(a, b"wide".to_vec())])
        );
        assert_eq!(store.revoked().unwrap(), BTreeMap::from([(old, why)]));
        // Configured again, the old key is no longer revoked.
        store
            .apply_policy(&PolicyChange {
                peer: old,
                applied: b"back",
                reset: false,
                revoke: vec![],
            })
            .unwrap();
        assert!(store.revoked().unwrap().is_empty());
        store.forget_peer(&a).unwrap();
        assert!(!store.knows_peer(&a).unwrap());
        assert_eq!(store.peer(&a).unwrap(), PeerRecord::default());
        assert!(!store.applied_policies().unwrap().contains_key(&a));
    }
}
