//! Adding, changing and removing a configured peer, all or nothing across the store, the
//! config file and memory: the one code path for the running node and the offline CLI.

use tidesync_proto::NodeId;

use super::Core;
use crate::config::{Config, Home, PeerConfig};
pub use crate::replica::peers::PeerApplied;

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
    /// Add or replace the peer `peer.name` in `config` and apply it. The new config is checked
    /// and saved first; then the replica applies the policy in memory and, in one durable
    /// transaction, in the store (see [`crate::replica::Replica::apply_peer`]): a widening
    /// resets the peer's checkpoint, and another key that had this name is revoked (the
    /// caller drops its link). Should the process die between the two, the next start
    /// compares the saved config with the store's applied policy and does the rest. Returns
    /// whether the policy widened (if so, a connected peer is asked to resend: see
    /// [`Core::on_policy_widened`]) and which keys were revoked.
    pub fn set_peer(
        &mut self,
        home: &Home,
        config: &mut Config,
        peer: PeerConfig,
    ) -> Result<PeerApplied, PeerError> {
        let id = peer.id;
        let relay_before = self.replica.policies().of(&id).relay_status;
        let mut changed = config.clone();
        changed.set_peer(peer.clone()).map_err(PeerError::Invalid)?;
        changed.save(home).map_err(PeerError::Save)?;
        *config = changed;
        let applied = self
            .replica
            .apply_peer(id, &peer.name, &peer.policy)
            .map_err(|source| PeerError::Store { peer: id, source })?;
        for old in &applied.revoked {
            self.sessions.on_disconnected(old);
        }
        if applied.widened
            && let Err(e) = self.on_policy_widened(id)
        {
            tracing::error!(peer = %id, error = %e, "could not ask the peer to resend after its policy widened; it resends on its next connection");
        }
        if peer.policy.relay_status && !relay_before && self.sessions.session(&id).is_some() {
            self.send_relayed_to(id);
        }
        Ok(applied)
    }

    /// Send to the configured peer `name` now, whatever its sync windows and its daily budget
    /// say, until it is in sync (`tidesync sync --now`). Fails for an unknown or unconnected
    /// peer.
    pub fn sync_now(&mut self, config: &Config, name: &str) -> Result<(), PeerError> {
        let peer = config
            .peers
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| PeerError::Unknown(format!("no configured peer is called {name:?}")))?
            .id;
        if self.sessions.session(&peer).is_none() {
            return Err(PeerError::Invalid(format!(
                "peer {name} is not connected; `sync --now` sends once it is"
            )));
        }
        tracing::info!(%peer, name, "sending now, whatever the link's windows and budget say");
        self.step(|s, r| Ok(((), s.sync_now(r, peer)?)))
            .map_err(|e| PeerError::Invalid(e.to_string()))
    }

    /// Remove the peer called `name` from `config` (saved first), then forget it: its policy
    /// and, durably, all the store keeps of it, so adding it again starts from 0. Returns
    /// what was removed; the caller drops its link.
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
        self.sessions.on_disconnected(&removed.id);
        self.replica
            .forget_peer(&removed.id)
            .map_err(|source| PeerError::Store {
                peer: removed.id,
                source,
            })?;
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
    // the store's checkpoint of the peer, and on a running node the reset was written
    // without durability after the config file: a `kill -9` kept the wider policy and lost
    // the reset. The config is now saved first and the store's applied policy is compared
    // with it at every start, so whatever is lost in between is redone.
    #[test]
    fn a_widening_resets_the_store_even_when_only_the_config_file_got_it() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::new(dir.path());
        let mut core = Core::in_memory(1, "a");
        let mut config = sample();
        let id = peer(&[]).id;
        assert!(
            !core
                .set_peer(&home, &mut config, peer(&["Volume"]))
                .unwrap()
                .widened
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

        // The wider config is saved, and the process dies before the store hears of it: the
        // next open backfills.
        let mut wider = config.clone();
        wider.set_peer(peer(&[])).unwrap();
        wider.save(&home).unwrap();
        core.replica
            .reconcile_peers(&Config::load(&home).unwrap().peers)
            .unwrap();
        let record = core.replica.peer_record(&id).unwrap();
        assert_eq!(record.received, Checkpoint::default());
        assert!(record.resend_all);
        assert!(core.replica.policy(&id).skip.is_empty());

        // Removing it forgets the peer; an unknown name is reported as such.
        let mut config = wider;
        core.remove_peer(&home, &mut config, "b").unwrap();
        assert!(config.peers.is_empty());
        assert!(!core.replica.store().knows_peer(&id).unwrap());
        assert!(matches!(
            core.remove_peer(&home, &mut config, "b"),
            Err(PeerError::Unknown(_))
        ));
    }
}
