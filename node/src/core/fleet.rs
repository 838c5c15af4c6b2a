//! The fleet view's core side: taking a peer's signed status record, making and sending our
//! own, relaying others' to peers whose policy says `relay-status`, and noting bundle
//! receipts. Without `relay-status`, records go to direct peers only, never further.

use std::collections::BTreeMap;

use tidesync_proto::fleet::{STATUS_TYPE, SignedStatus, StatusPeer, StatusRecord, bounded_text};
use tidesync_proto::wire::STATUS_ACK;
use tidesync_proto::{Message, NodeId, TypeName};

use super::Core;
use crate::reads::Status;
use crate::store::MAX_FLEET_NODES;

/// The last signed record of each other node this node kept since it started, as it arrived:
/// what it relays to peers with `relay-status` (their signatures travel with them, so a relay
/// cannot alter them). In memory, at most [`MAX_FLEET_NODES`]; after a restart, a node
/// relays the records that arrive from then on (each node sends a fresh one as it connects
/// and whenever its status changes).
#[derive(Debug, Default)]
pub struct Relayable {
    records: BTreeMap<NodeId, SignedStatus>,
}

impl Core {
    /// Whether status records pass to (`send`) or from `peer`: unless its policy skips
    /// [`STATUS_TYPE`], in the policy's direction.
    fn status_flows(&self, peer: &NodeId, send: bool) -> bool {
        let policy = self.replica.policies().of(peer);
        let skipped = TypeName::new(STATUS_TYPE).is_ok_and(|t| policy.skip.contains(&t));
        let direction = match policy.direction {
            crate::policy::Direction::Both => true,
            crate::policy::Direction::Send => send,
            crate::policy::Direction::Receive => !send,
        };
        !skipped && direction && self.replica.policies().name_of(peer).is_some()
    }

    /// A configured peer's status record arrived: keep it if it is the peer's own, signed by
    /// it, newer than the one kept and allowed by policy. Answered with the status Ack.
    pub(super) fn on_status(&mut self, peer: NodeId, status: &SignedStatus) -> Message {
        let refused = |why: &str| {
            if crate::ratelog::REFUSALS.allow(&peer) {
                tracing::warn!(%peer, why, "refused a status record");
            }
            Message::Ack {
                batch: STATUS_ACK,
                upto: 0,
                rejected: 1,
            }
        };
        if !self.status_flows(&peer, false) {
            return refused("policy");
        }
        let record = match status.verify() {
            Ok(r) => r,
            Err(e) => return refused(&e.to_string()),
        };
        if record.node != peer && !self.replica.policies().of(&peer).relay_status {
            return refused(
                "records travel to direct peers only (unless our policy for the sender says relay-status): this one is not the sender's",
            );
        }
        if record.node == self.node_id() {
            return refused("a record of this node, relayed back to it");
        }
        if self.replica.policies().is_revoked(&record.node) {
            return refused("a record of a revoked key");
        }
        let now = self.replica.now_ms();
        let node = record.node;
        let kept = self.store().update_fleet(&node, |row| {
            if row
                .record
                .as_ref()
                .is_some_and(|r| r.made_ms >= record.made_ms)
            {
                return false;
            }
            row.record = Some(record);
            row.heard_ms = now;
            row.via = Some(peer);
            true
        });
        match kept {
            Ok(true) => self.relay(peer, node, status),
            Ok(false) => {}
            Err(e) => tracing::error!(%peer, error = %e, "could not keep a status record"),
        }
        Message::Ack {
            batch: STATUS_ACK,
            upto: 0,
            rejected: 0,
        }
    }

    /// Our status record, made from `status` at `now_ms` (without its time: two records that
    /// differ only in it say the same).
    pub fn status_record(&self, status: &Status, now_ms: i64) -> StatusRecord {
        let peers: Vec<StatusPeer> = status
            .peers
            .iter()
            .take(tidesync_proto::fleet::MAX_STATUS_PEERS)
            .filter_map(|p| {
                Some(StatusPeer {
                    name: bounded_text(&p.name),
                    id: p.id.parse().ok()?,
                    connected: p.connected,
                    last_sync_ms: p.last_sync_ms,
                    lag_out: p.pending_out,
                    lag_in: p.pending_in,
                    held: p.held,
                    refused: p.rejected,
                })
            })
            .collect();
        StatusRecord {
            node: self.node_id(),
            name: bounded_text(&status.name),
            version: bounded_text(env!("CARGO_PKG_VERSION")),
            made_ms: now_ms,
            store_bytes: status.store_bytes,
            objects: status.objects.values().map(|c| c.live).sum(),
            held_changes: status.held_changes,
            refusals: status.refusals_logged,
            files_wanted: status.files.wanted,
            concurrent_fields: status.concurrent_fields,
            peers_total: status.peers.len() as u64,
            peers,
        }
    }

    /// Send `signed` (our record) to `to`, or to every connected peer status flows to.
    pub fn send_status(&mut self, signed: &SignedStatus, to: Option<NodeId>) {
        let peers: Vec<NodeId> = match to {
            Some(p) => vec![p],
            None => self.session_summaries().keys().copied().collect(),
        };
        self.send_status_to(signed, peers);
    }

    /// `node`'s record arrived from `from` and was kept: keep it to relay,
    /// and pass it to every other connected peer with `relay-status` but `node` itself. A
    /// record travels on only while it is newer than what each node holds, so a ring of
    /// relays ends.
    fn relay(&mut self, from: NodeId, node: NodeId, signed: &SignedStatus) {
        let records = &mut self.relayable.records;
        if records.contains_key(&node) || (records.len() as u64) < MAX_FLEET_NODES {
            records.insert(node, signed.clone());
        }
        let to: Vec<NodeId> = self
            .session_summaries()
            .keys()
            .copied()
            .filter(|p| *p != from && *p != node && self.relays_to(p))
            .collect();
        self.send_status_to(signed, to);
    }

    /// A peer connected: if our policy for it says `relay-status`, it gets every other node's
    /// record this node keeps to relay (but its own).
    pub fn send_relayed_to(&mut self, peer: NodeId) {
        if !self.relays_to(&peer) {
            return;
        }
        let records: Vec<SignedStatus> = self
            .relayable
            .records
            .iter()
            .filter(|(node, _)| **node != peer)
            .map(|(_, signed)| signed.clone())
            .collect();
        for signed in records {
            self.send_status_to(&signed, [peer]);
        }
    }

    fn relays_to(&self, peer: &NodeId) -> bool {
        self.replica.policies().of(peer).relay_status
    }

    /// Send `signed` to each of `peers` that status records flow to, within its link's gate
    /// and budget (counted).
    fn send_status_to(&mut self, signed: &SignedStatus, peers: impl IntoIterator<Item = NodeId>) {
        for peer in peers {
            if !self.status_flows(&peer, true) {
                continue;
            }
            let msg = Message::Status {
                status: signed.clone(),
            };
            // A shaped link carries status records only while its gate is open and they fit
            // in the day's budget, and counts them.
            let sent = self
                .sessions
                .fits(&self.replica, peer, &msg)
                .and_then(|fits| {
                    if fits {
                        self.sessions.metered_all(&self.replica, [(&peer, &msg)])?;
                    }
                    Ok(fits)
                });
            match sent {
                Ok(true) => self.outbox.push((peer, msg)),
                Ok(false) => {}
                Err(e) => tracing::error!(%peer, error = %e, "could not meter a status record"),
            }
        }
    }

    /// Sign our status record.
    pub fn sign_status(&self, record: &StatusRecord) -> Option<SignedStatus> {
        SignedStatus::sign(self.identity().signing_key(), record)
            .inspect_err(|e| tracing::error!(error = %e, "could not sign our status record"))
            .ok()
    }

    /// A bundle from `from` (its PeerId) was imported: note when, for the fleet view.
    pub(super) fn note_bundle(&mut self, from: &str) {
        let Ok(node) = from.parse::<NodeId>() else {
            return;
        };
        let now = self.replica.now_ms();
        if let Err(e) = self.store().update_fleet(&node, |row| {
            row.bundle_ms = Some(now);
            true
        }) {
            tracing::error!(error = %e, "could not note a bundle receipt");
        }
    }
}
