//! Adding, changing and removing a configured peer, all or nothing across the store, the
//! config file and memory: the one code path for the running node and the offline CLI.

use tidesync_proto::NodeId;

use super::Core;
use crate::config::{Config, Home, PeerConfig};

/// Why a peer could not be added or removed.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Unknown(String),
    #[error(transparent)]
    Save(crate::config::ConfigError),
    #[error("cannot record the new policy of peer {peer} in the store: {source}")]
    Store {
        peer: NodeId,
        source: crate::store::StoreError,
    },
}

impl Core {
    /// Add or replace the peer `peer.name` in `config` and apply it, all or nothing: the new
    /// config is checked first; then the store takes the widening's reset (durably); then the
    /// file is saved, and if that fails the store's record of the peer is put back as it was;
    /// only then do `config` and the policies in memory change. A peer of that name under
    /// another id loses its policy here (the caller drops its link). Returns whether the
    /// policy widened; if so, a connected peer is asked to resend (see
    /// [`Core::on_policy_widened`]).
    pub fn set_peer(
        &mut self,
        home: &Home,
        config: &mut Config,
        peer: PeerConfig,
    ) -> Result<bool, PeerError> {
        let id = peer.id;
        let store_err = |source| PeerError::Store { peer: id, source };
        let mut changed = config.clone();
        changed.set_peer(peer.clone()).map_err(PeerError::Invalid)?;
        let before = self.replica.peer_record(&id).map_err(store_err)?;
        let widened = self
            .replica
            .reset_if_widened(&id, &peer.policy)
            .map_err(store_err)?;
        if let Err(e) = changed.save(home) {
            if widened && let Err(undo) = self.replica.restore_peer_record(&id, before) {
                tracing::error!(peer = %id, error = %undo, "could not put the peer's record back after the config file failed to save; the peer resends its log once");
            }
            return Err(PeerError::Save(e));
        }
        for old in config
            .peers
            .iter()
            .filter(|p| p.name == peer.name && p.id != id)
        {
            self.replica.remove_policy(&old.id);
        }
        *config = changed;
        self.replica.adopt_policy(id, peer.name, peer.policy);
        if widened && let Err(e) = self.on_policy_widened(id) {
            tracing::error!(peer = %id, error = %e, "could not ask the peer to resend after its policy widened; it resends on its next connection");
        }
        Ok(widened)
    }

    /// Remove the peer called `name` from `config` (saved first) and forget its policy.
    /// Returns what was removed; the caller drops its link.
    pub fn remove_peer(
        &mut self,
        home: &Home,
        config: &mut Config,
        name: &str,
    ) -> Result<PeerConfig, PeerError> {
        let mut changed = config.clone();
        let removed = changed.remove_peer(name).map_err(PeerError::Unknown)?;
        changed.save(home).map_err(PeerError::Save)?;
        *config = changed;
        self.replica.remove_policy(&removed.id);
        self.sessions.on_disconnected(&removed.id);
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::sample;
    use crate::identity::Identity;
    use crate::policy::Policy;
    use tidesync_proto::{Checkpoint, TypeName};

    fn peer(skip: &[&str]) -> PeerConfig {
        PeerConfig {
            name: "b".into(),
            id: Identity::from_secret([2; 32]).node_id(),
            addrs: vec![],
            policy: Policy {
                skip: skip.iter().map(|t| TypeName::new(*t).unwrap()).collect(),
                ..Policy::default()
            },
        }
    }

    // Regression: `tidesync peer set` on a stopped node saved the wider policy but never reset
    // the store's checkpoint of the peer, so the next start never asked the peer for what the
    // narrow policy had refused; and on a running node a config file that failed to save left
    // the store's reset behind alone. Both paths now share `Core::set_peer`.
    #[test]
    fn a_widening_resets_the_store_and_a_failed_save_puts_it_back() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::new(dir.path());
        let mut core = Core::in_memory(1, "a");
        let mut config = sample();
        let id = peer(&[]).id;
        assert!(
            !core
                .set_peer(&home, &mut config, peer(&["Volume"]))
                .unwrap()
        );
        let held = Checkpoint {
            seq: 7,
            hash: [7; 32],
        };
        core.replica
            .update_peer(&id, |r| r.received = held)
            .unwrap();

        // A save that fails leaves the store, the file and memory as they were.
        let gone = Home::new(dir.path().join("missing"));
        let err = core.set_peer(&gone, &mut config, peer(&[])).unwrap_err();
        assert!(matches!(err, PeerError::Save(_)), "{err}");
        let record = core.replica.peer_record(&id).unwrap();
        assert_eq!(record.received, held);
        assert!(!record.resend_all);
        assert_eq!(config.peers[0].policy.skip.len(), 1);
        assert_eq!(Config::load(&home).unwrap(), config);

        // A save that works resets the checkpoint, keeps the new policy and asks for a resend.
        assert!(core.set_peer(&home, &mut config, peer(&[])).unwrap());
        let record = core.replica.peer_record(&id).unwrap();
        assert_eq!(record.received, Checkpoint::default());
        assert!(record.resend_all);
        assert!(core.replica.policy(&id).skip.is_empty());
        assert_eq!(Config::load(&home).unwrap(), config);

        // Removing it forgets the policy; an unknown name is reported as such.
        core.remove_peer(&home, &mut config, "b").unwrap();
        assert!(config.peers.is_empty());
        assert!(matches!(
            core.remove_peer(&home, &mut config, "b"),
            Err(PeerError::Unknown(_))
        ));
    }
}
