//! What goes to a peer next: its priority types ahead of log order (see [`super::ahead`]),
//! then batches of our log, cut to the pace and to the room left in the day's budget; and the
//! bookkeeping that follows every pump.

use tidesync_proto::{Message, NodeId};

use super::ahead::Ahead;
use super::session::Inflight;
use super::{Outgoing, Sessions, SyncError, store_err};
use crate::replica::Replica;
use crate::replica::outbound::{CHANGES_OVERHEAD_BYTES, Limit, SYNC_BATCH_CHANGES};

impl Sessions {
    /// After a local write: push it to every connected peer.
    pub fn pump_all(&mut self, replica: &mut Replica) -> Result<Vec<Outgoing>, SyncError> {
        let peers: Vec<NodeId> = self.peers.keys().copied().collect();
        let mut out = Vec::new();
        for peer in peers {
            out.extend(self.pump(replica, peer)?);
        }
        Ok(out)
    }

    /// Send `peer` the next batches of our log, up to the window; then note whether the
    /// session came in sync, and whether a resend after a widening is done. Both follow every
    /// pump, not only an Ack: a pump that a shaped link's gate held back moves over the rest
    /// of the log later, from the tick, when no Ack may follow.
    pub fn pump(
        &mut self,
        replica: &mut Replica,
        peer: NodeId,
    ) -> Result<Vec<Outgoing>, SyncError> {
        let out = self.pump_batches(replica, peer)?;
        self.note_in_sync(replica, peer)?;
        self.note_resent(replica, peer)?;
        Ok(out)
    }

    /// Send `peer` the next batches of our log, up to the window.
    fn pump_batches(
        &mut self,
        replica: &mut Replica,
        peer: NodeId,
    ) -> Result<Vec<Outgoing>, SyncError> {
        let mut out = Vec::new();
        let last = replica.log_tip().map_err(store_err(peer))?;
        let (me, alter_relayed) = (replica.node_id(), replica.faults().alter_relayed);
        let twins = replica.faults().equivocate
            && crate::fault::gets_twins(replica.policies().ids(), &peer);
        let mut by_ref = replica.carried_to(peer)?;
        if !self
            .peers
            .get_mut(&peer)
            .is_none_or(|s| s.apply_wanted_restart())
        {
            return Ok(out);
        }
        // Referenced objects owed to the peer go out when nothing else is in flight: the
        // batch that owes them must be stored there first (see `crate::replica::outbound`).
        let mut owed = !replica.policy(&peer).refs.is_empty()
            && !replica
                .owed_refs(&peer)
                .map_err(store_err(peer))?
                .is_empty();
        loop {
            let Some(session) = self.peers.get(&peer) else {
                return Ok(out);
            };
            let idle = owed && session.in_flight() == 0;
            let pace = self.paces.get(&peer).copied().unwrap_or_default();
            if session.cursor >= last && session.in_flight() == 0 {
                // In sync: a `sync --now` has done its work.
                self.overrides.remove(&peer);
            }
            if !session.streaming
                || session.in_flight() >= pace.window
                || (session.cursor >= last && !idle)
            {
                return Ok(out);
            }
            if self.gate(replica, peer)?.is_some() {
                return Ok(out);
            }
            // Frame bytes left of the day's budget: when they bind, the batch is cut to fit,
            // and a change that does not fit waits for the next day (or `sync --now`).
            let room = self.budget_room(replica, peer)?;
            let limit = if room < pace.batch_bytes.saturating_add(CHANGES_OVERHEAD_BYTES) {
                Limit {
                    bytes: room.saturating_sub(CHANGES_OVERHEAD_BYTES),
                    strict: true,
                }
            } else {
                Limit::soft(pace.batch_bytes)
            };
            match self.next_ahead(replica, peer, last, limit, room)? {
                Ahead::Sent(msg) => {
                    out.push(msg);
                    continue;
                }
                Ahead::Held => return Ok(out),
                Ahead::Nothing => {}
            }
            if self
                .peers
                .get(&peer)
                .is_some_and(|s| !s.ahead_inflight.is_empty())
            {
                // Log order waits for what went ahead: once it is acknowledged, log order
                // leaves it out instead of sending it a second time.
                return Ok(out);
            }
            let Some(session) = self.peers.get(&peer) else {
                return Ok(out);
            };
            let (cursor, sent_upto, unfiltered) =
                (session.cursor, session.sent_upto, session.unfiltered);
            let mut batch = replica.read_next(
                peer,
                (cursor, &session.sent_ahead),
                unfiltered,
                &mut by_ref,
                idle,
                limit,
            )?;
            if idle {
                // One batch of owed objects per pump; more follow its Ack.
                owed = false;
            }
            let session = self.peers.get_mut(&peer).ok_or(SyncError::Unexpected {
                peer,
                what: "lost session",
            })?;
            if let (Some(needs), true) = (batch.held, batch.changes.is_empty()) {
                // What the peer lacks before the waiting change is passed; the change waits.
                session.cursor = batch.upto.seq;
                self.hold_for_budget(replica, peer, needs, room);
                return Ok(out);
            }
            let covers_ahead = session
                .sent_ahead
                .range(sent_upto.saturating_add(1)..=batch.upto.seq)
                .next()
                .is_some();
            if batch.changes.is_empty()
                && batch.upto.seq.saturating_sub(sent_upto) < SYNC_BATCH_CHANGES as u64
                && !covers_ahead
            {
                // Nothing the peer lacks in this stretch: move on without a message. Once a
                // batch's worth of such entries has gone by unannounced, or entries the peer
                // took ahead of log order (so that its checkpoint covers them), an empty
                // batch tells the peer, so that a reconnect does not rescan them.
                session.cursor = batch.upto.seq;
                continue;
            }
            let number = session.last_batch + 1;
            if alter_relayed {
                for change in &mut batch.changes {
                    crate::fault::tamper_if_relayed(change, &me);
                }
            }
            if twins {
                for change in &mut batch.changes {
                    if let Ok(Some(doc)) = replica.store().load_doc(&change.doc)
                        && let Some(t) =
                            crate::fault::twin(&doc, change, replica.identity().signing_key(), &me)
                    {
                        *change = t;
                    }
                }
            }
            let changes = batch.changes.len() as u64;
            let msg = Message::Changes {
                batch: number,
                after: sent_upto,
                docs: batch.docs,
                changes: batch.changes,
                upto: batch.upto,
                tip: last,
            };
            // The exact frame (compressed) is known only by encoding it: only a budget needs it.
            let frame = if room == usize::MAX {
                0
            } else {
                tidesync_proto::wire::frame_bytes(&msg)
            };
            if frame > room {
                // Views and carried objects made the batch larger than what is left today.
                self.hold_for_budget(replica, peer, frame, room);
                return Ok(out);
            }
            let session = self.peers.get_mut(&peer).ok_or(SyncError::Unexpected {
                peer,
                what: "lost session",
            })?;
            session.cursor = batch.upto.seq;
            session.sent_upto = batch.upto.seq;
            session.last_batch = number;
            session.inflight.push_back(Inflight {
                batch: number,
                upto: batch.upto.seq,
                changes,
                answered: false,
                views: batch.views,
                owed: batch.owed,
            });
            self.metered(replica, peer, &msg, (frame > 0).then_some(frame))?;
            out.push((peer, msg));
        }
    }
}
