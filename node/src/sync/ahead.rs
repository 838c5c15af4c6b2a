//! Priority types ahead of log order (protocol 7, `Message::Ahead`): the sender's pass over
//! its log for the types its policy gives priority to, the receiver's handling of such a
//! batch (it claims nothing, so the checkpoint stays), and what the sender records once the
//! batch is acknowledged (`sent_ahead_v1`), which log-order batches then leave out.

use tidesync_proto::{DocHeader, Message, NodeId, SignedChange};

use super::{Outgoing, Sessions, SyncError, store_err};
use crate::replica::Replica;
use crate::replica::outbound::Limit;
use crate::replica::receive::Checked;
use crate::store::MAX_SENT_AHEAD_PER_PEER;

/// What the priority pass did (see [`Sessions::next_ahead`]).
pub(super) enum Ahead {
    /// It sent this batch.
    Sent(Outgoing),
    /// Its next change waits for room in the day's budget: nothing else goes before it.
    Held,
    /// Nothing of the priority types is left to send ahead now.
    Nothing,
}

/// Most stretches of [`crate::replica::outbound::SYNC_SCAN_ENTRIES`] log entries one pump
/// scans for priority types before it turns to log order (the next pump goes on from there).
const AHEAD_SCANS_PER_PUMP: usize = 4;

impl Sessions {
    /// The next `Ahead` batch for `peer`: changes of the types our policy gives priority to
    /// that lie past the log-order cursor, sent before it reaches them (see
    /// [`Message::Ahead`]). They count against the window, the pace and the budget like any
    /// batch.
    pub(super) fn next_ahead(
        &mut self,
        replica: &mut Replica,
        peer: NodeId,
        last: u64,
        limit: Limit,
        room: usize,
    ) -> Result<Ahead, SyncError> {
        if replica.policy(&peer).priority.is_empty() {
            return Ok(Ahead::Nothing);
        }
        for _ in 0..AHEAD_SCANS_PER_PUMP {
            let Some(session) = self.peers.get_mut(&peer) else {
                return Ok(Ahead::Nothing);
            };
            session.ahead_cursor = session.ahead_cursor.max(session.cursor);
            let pending: usize = session.ahead_inflight.iter().map(|(_, s)| s.len()).sum();
            if session.ahead_cursor >= last
                || session.sent_ahead.len() + pending >= MAX_SENT_AHEAD_PER_PEER
            {
                return Ok(Ahead::Nothing);
            }
            let batch = replica.read_ahead(
                peer,
                session.ahead_cursor,
                session.unfiltered,
                &session.sent_ahead,
                limit,
            )?;
            if let (Some(needs), true) = (batch.held, batch.changes.is_empty()) {
                self.hold_for_budget(replica, peer, needs, room);
                return Ok(Ahead::Held);
            }
            if batch.changes.is_empty() {
                session.ahead_cursor = batch.upto.seq.max(session.ahead_cursor + 1);
                continue;
            }
            let number = session.last_batch + 1;
            let msg = Message::Ahead {
                batch: number,
                docs: batch.docs,
                changes: batch.changes,
            };
            let frame = if room == usize::MAX {
                0
            } else {
                tidesync_proto::wire::frame_bytes(&msg)
            };
            if frame > room {
                self.hold_for_budget(replica, peer, frame, room);
                return Ok(Ahead::Held);
            }
            let session = self.peers.get_mut(&peer).ok_or(SyncError::Unexpected {
                peer,
                what: "lost session",
            })?;
            session.ahead_cursor = batch.upto.seq;
            session.last_batch = number;
            session.ahead_inflight.push((number, batch.seqs));
            self.metered(replica, peer, &msg, (frame > 0).then_some(frame))?;
            return Ok(Ahead::Sent((peer, msg)));
        }
        Ok(Ahead::Nothing)
    }
}

impl Sessions {
    /// A batch of `peer`'s priority types arrived ahead of its log order: store what our
    /// policy takes and answer. It claims nothing about the peer's log, so our checkpoint of
    /// it stays where it is.
    pub(super) fn on_ahead(
        &mut self,
        replica: &mut Replica,
        peer: NodeId,
        batch: u64,
        docs: Vec<DocHeader>,
        changes: Vec<SignedChange>,
        checked: Option<Checked>,
    ) -> Result<(Message, Vec<Outgoing>), SyncError> {
        // Claims nothing about the sender's log: the checkpoint stays.
        if let Some(s) = self.peers.get_mut(&peer) {
            s.newest_batch_in = s.newest_batch_in.max(batch);
        }
        let report = replica.receive_changes(peer, None, docs, changes, checked)?;
        let mut out = if report.applied > 0 {
            self.pump_all(replica)?
        } else {
            Vec::new()
        };
        out.extend(self.after_held_refusals(replica, peer, &report, false)?);
        // A change refused for lack of room counts as refused here: the sender then
        // sends the whole batch again in log order, where the checkpoint guards it.
        let rejected = report.rejected.saturating_add(report.refused_for_room);
        Ok((
            Message::Ack {
                batch,
                upto: 0,
                rejected: u32::try_from(rejected).unwrap_or(u32::MAX),
            },
            out,
        ))
    }

    /// The `Ahead` batch at `i` of `peer`'s session was answered: what it carried is stored
    /// there, durably, unless some of it was refused; then all of it goes again in log order.
    pub(super) fn on_ahead_acked(
        &mut self,
        replica: &mut Replica,
        peer: NodeId,
        i: usize,
        rejected: u32,
    ) -> Result<Vec<Outgoing>, SyncError> {
        let Some(session) = self.peers.get_mut(&peer) else {
            return Ok(Vec::new());
        };
        let (_, seqs) = session.ahead_inflight.remove(i);
        let acked = session.acked_upto;
        if rejected == 0 {
            replica
                .store()
                .note_sent_ahead(&peer, &seqs, acked)
                .map_err(store_err(peer))?;
            session
                .sent_ahead
                .extend(seqs.iter().copied().filter(|s| *s > acked));
        }
        if let Some(pace) = self.paces.get_mut(&peer) {
            pace.acked();
        }
        let now = replica.now_ms();
        replica
            .update_peer(&peer, |r| {
                r.changes_out += seqs.len() as u64;
                r.rejected_by_peer += u64::from(rejected);
                r.last_sync_ms = now;
            })
            .map_err(store_err(peer))?;
        self.pump(replica, peer)
    }
}
