//! Configured peers as the replica applies them: each policy compared with the one the store
//! last applied (at every start and every change), replaced keys revoked, removed peers
//! forgotten. The store keeps the applied policy with the peer's checkpoint, so a widening
//! made while the node was stopped, or lost to a crash, is still backfilled.

use serde::{Deserialize, Serialize};
use tidesync_proto::NodeId;

use super::Replica;
use super::files::files_widened;
use crate::config::PeerConfig;
use crate::policy::Policy;
use crate::store::{PolicyChange, Revoked, StoreError};

/// A peer's name and policy as `applied_policies_v1` stores them: JSON, as in the config file
/// (a policy's lists are optional there).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Applied {
    name: String,
    policy: Policy,
}

/// What applying a peer's policy did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PeerApplied {
    /// The policy lets through something the applied one did not (or none was known for a
    /// peer this node synced with): the peer's checkpoint went back to the start.
    pub widened: bool,
    /// Keys that had the peer's name and are now revoked.
    pub revoked: Vec<NodeId>,
}

impl Replica {
    /// The store's applied policies, decoded. One that cannot be decoded counts as unknown
    /// (its peer is backfilled once).
    fn applied(&self) -> Result<Vec<(NodeId, Option<Applied>)>, StoreError> {
        Ok(self
            .store
            .applied_policies()?
            .into_iter()
            .map(|(id, bytes)| {
                let decoded = serde_json::from_slice(&bytes);
                if let Err(e) = &decoded {
                    tracing::warn!(peer = %id, error = %e, "the stored policy of this peer cannot be read; it counts as widened");
                }
                (id, decoded.ok())
            })
            .collect())
    }

    /// Apply the configured peer `name` with key `id` and `policy`, in memory and then in the
    /// store, durably and in one transaction: the policy, the reset of the peer's checkpoint if
    /// it widened on the applied one, and the revocation of any other key that had this name
    /// (a replaced key may be compromised: nothing new it signs is taken). Memory takes the
    /// policy even if the store fails, so a narrowing holds at once; the store, still holding
    /// the old policy, has the next start backfill a widening.
    pub fn apply_peer(
        &mut self,
        id: NodeId,
        name: &str,
        policy: &Policy,
    ) -> Result<PeerApplied, StoreError> {
        let applied = self.applied()?;
        let mut revoked: Vec<NodeId> = applied
            .iter()
            .filter(|(other, a)| *other != id && a.as_ref().is_some_and(|a| a.name == name))
            .map(|(other, _)| *other)
            .collect();
        if let Some(other) = self.policies.named(name)
            && other != id
            && !revoked.contains(&other)
        {
            revoked.push(other);
        }
        let old = applied.into_iter().find(|(other, _)| *other == id);
        let widened = match &old {
            Some((_, Some(a))) => !policy.is_within(&a.policy),
            Some((_, None)) => true,
            None => self.store.knows_peer(&id)?,
        };
        for old in &revoked {
            tracing::warn!(peer = %old, %name, replaced_by = %id, "the key of this peer was replaced: the old key is revoked");
            self.policies.remove(old);
            self.policies.revoke(*old);
        }
        self.policies.set(id, name.to_string(), policy.clone());
        let new = Applied {
            name: name.to_string(),
            policy: policy.clone(),
        };
        let unchanged = matches!(&old, Some((_, Some(a))) if *a == new);
        if unchanged && revoked.is_empty() && !self.policies.is_revoked(&id) {
            return Ok(PeerApplied::default());
        }
        self.policies.unrevoke(&id);
        let bytes = serde_json::to_vec(&new).map_err(|e| StoreError::Io {
            path: self.store.path().into(),
            context: "encoding a peer's policy",
            detail: e.to_string(),
        })?;
        let since_ms = self.now_ms();
        self.store.apply_policy(&PolicyChange {
            peer: id,
            applied: &bytes,
            reset: widened,
            revoke: revoked
                .iter()
                .map(|old| {
                    let why = Revoked {
                        name: name.to_string(),
                        replaced_by: id,
                        since_ms,
                    };
                    (*old, why)
                })
                .collect(),
        })?;
        if widened {
            tracing::info!(peer = %id, %name, "the policy of this peer widened: what it now allows is backfilled");
        }
        let files_before = match &old {
            Some((_, Some(a))) => Some(&a.policy),
            _ => None,
        };
        if files_before.is_some_and(|before| files_widened(before, policy)) {
            let n = self.want_files_now_allowed(id)?;
            tracing::info!(peer = %id, %name, files = n, "the files rule of this peer widened: the files its objects refer to are wanted now");
        }
        Ok(PeerApplied { widened, revoked })
    }

    /// Forget the removed peer `id`: its policy, and durably everything the store keeps of it
    /// (see [`crate::store::Store::forget_peer`]), so adding it again starts from 0.
    pub fn forget_peer(&mut self, id: &NodeId) -> Result<(), StoreError> {
        self.policies.remove(id);
        self.store.forget_peer(id)
    }

    /// Bring the store in line with the configured `peers` at open: each one's policy is
    /// applied (see [`Replica::apply_peer`]) and a peer the store knows but the configuration
    /// no longer lists is forgotten. This catches what changed while the node was stopped:
    /// `peer set`, `peer rm` and edits to the config file alike.
    pub fn reconcile_peers(&mut self, peers: &[PeerConfig]) -> Result<(), StoreError> {
        self.policies.set_revoked(self.store.revoked()?.into_keys());
        for peer in peers {
            self.apply_peer(peer.id, &peer.name, &peer.policy)?;
        }
        for (id, _) in self.applied()? {
            if !peers.iter().any(|p| p.id == id) {
                tracing::info!(peer = %id, "this peer is no longer configured: forgetting it");
                self.forget_peer(&id)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidesync_proto::{Checkpoint, TypeName};

    fn skip(ty: &str) -> Policy {
        Policy {
            skip: vec![TypeName::new(ty).unwrap()],
            ..Policy::default()
        }
    }

    fn peer(name: &str, id: NodeId, policy: Policy) -> PeerConfig {
        PeerConfig {
            name: name.into(),
            id,
            addrs: vec![],
            policy,
        }
    }

    // Regression: policies lived only in the config file and in memory, so a widening made
    // while the node was stopped (`peer set` offline, or an edit of config.toml) was taken
    // as the policy at the next start and never backfilled, and a peer removed and added
    // again kept its old checkpoints.
    #[test]
    fn what_changed_while_stopped_is_caught_at_the_next_start() {
        let mut r = Replica::in_memory(1, "hub");
        let b = NodeId([2; 32]);
        let held = Checkpoint {
            seq: 5,
            hash: [5; 32],
        };
        r.reconcile_peers(&[peer("b", b, skip("Invoice"))]).unwrap();
        r.update_peer(&b, |rec| rec.received = held).unwrap();
        // Widened while stopped (Invoice no longer skipped): the checkpoint resets.
        r.reconcile_peers(&[peer("b", b, Policy::default())])
            .unwrap();
        let record = r.peer_record(&b).unwrap();
        assert_eq!(record.received, Checkpoint::default());
        assert!(record.resend_all);
        r.update_peer(&b, |rec| {
            rec.received = held;
            rec.resend_all = false;
        })
        .unwrap();
        r.reconcile_peers(&[peer("b", b, skip("User"))]).unwrap();
        assert_eq!(r.peer_record(&b).unwrap().received, held, "a narrowing");
        r.reconcile_peers(&[peer("b", b, skip("User"))]).unwrap();
        assert_eq!(r.peer_record(&b).unwrap().received, held, "no change");
        // Removed while stopped, then added again: from 0.
        r.reconcile_peers(&[]).unwrap();
        assert!(!r.store().knows_peer(&b).unwrap());
        r.reconcile_peers(&[peer("b", b, skip("User"))]).unwrap();
        assert_eq!(r.peer_record(&b).unwrap().received, Checkpoint::default());
    }

    // Regression: replacing a peer's key under the same name left the old key trusted.
    #[test]
    fn a_replaced_key_is_revoked_and_configured_again_it_is_not() {
        let mut r = Replica::in_memory(1, "hub");
        let (old, new) = (NodeId([2; 32]), NodeId([3; 32]));
        r.apply_peer(old, "b", &Policy::default()).unwrap();
        let done = r.apply_peer(new, "b", &Policy::default()).unwrap();
        assert_eq!(done.revoked, vec![old]);
        assert!(r.policies().is_revoked(&old));
        assert_eq!(r.policies().named("b"), Some(new));
        assert!(r.store().revoked().unwrap().contains_key(&old));
        // It survives a restart.
        let mut again = Replica::new(
            "hub".into(),
            crate::identity::Identity::from_secret([1; 32]),
            r.store().clone(),
            8,
            true,
        );
        again
            .reconcile_peers(&[peer("b", new, Policy::default())])
            .unwrap();
        assert!(again.policies().is_revoked(&old));
        again.apply_peer(old, "old-b", &Policy::default()).unwrap();
        assert!(!again.policies().is_revoked(&old));
    }
}
