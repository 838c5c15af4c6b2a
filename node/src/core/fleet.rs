//! The fleet view's core side: taking a peer's signed status record, making and sending our
//! own, and noting bundle receipts. Records go to direct peers only, never further.

use tidesync_proto::fleet::{STATUS_TYPE, SignedStatus, StatusPeer, StatusRecord, bounded_text};
use tidesync_proto::wire::STATUS_ACK;
use tidesync_proto::{Message, NodeId, TypeName};

use super::Core;
use crate::reads::Status;

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
        if record.node != peer {
            return refused("records travel to direct peers only: this one is not the sender's");
        }
        let now = self.replica.now_ms();
        let kept = self.store().update_fleet(&peer, |row| {
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
        if let Err(e) = kept {
            tracing::error!(%peer, error = %e, "could not keep a status record");
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
