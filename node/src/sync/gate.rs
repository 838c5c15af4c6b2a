//! The link gate of each peer's sending (see [`crate::link`]): checked before every batch,
//! with the day's meter and the rate's next slot; `sync --now` opens it until the peer is in
//! sync.

use tidesync_proto::{Message, NodeId};

use super::{Outgoing, Sessions, SyncError, store_err};
use crate::link::HeldBack;
use crate::replica::Replica;

impl Sessions {
    /// Why nothing more may go to `peer` now, if so (recorded in its session for status).
    pub fn gate(&mut self, replica: &Replica, peer: NodeId) -> Result<Option<HeldBack>, SyncError> {
        let link = &replica.policy(&peer).link;
        let ignored = replica.faults().ignore_link;
        let held = if link.is_open_always() || self.overrides.contains(&peer) || ignored {
            None
        } else {
            let meter = replica.store().meter(&peer).map_err(store_err(peer))?;
            let next = self.next_send.get(&peer).copied().unwrap_or(i64::MIN);
            link.held_back(meter, next, replica.now_ms())
        };
        if let Some(session) = self.peers.get_mut(&peer) {
            session.held_back = held;
        }
        Ok(held)
    }

    /// Whether `msg`, which nobody waits for (a status record), may go to `peer` now: its
    /// gate is open and the frame fits in what is left of the day's budget.
    pub fn fits(
        &mut self,
        replica: &Replica,
        peer: NodeId,
        msg: &Message,
    ) -> Result<bool, SyncError> {
        if self.gate(replica, peer)?.is_some() {
            return Ok(false);
        }
        Ok(tidesync_proto::wire::frame_bytes(msg) <= self.budget_room(replica, peer)?)
    }

    /// Whether a file segment for `peer` waits. On a shaped link record changes go first:
    /// no segment is served while the peer's session has changes of ours to send or
    /// unacknowledged, and the day's segments, this one of `bytes` included, may spend only
    /// [`crate::link::FILES_BUDGET_PERCENT`] of the day's budget; windows and rate hold them back as they hold batches. An unshaped
    /// link carries both at once. A `sync --now` opens the link's gate, not the order.
    pub fn files_wait(
        &self,
        replica: &Replica,
        peer: NodeId,
        bytes: u64,
    ) -> Result<bool, SyncError> {
        let link = &replica.policy(&peer).link;
        if link.is_open_always() {
            return Ok(false);
        }
        let records_pending = match self.peers.get(&peer) {
            Some(s) => {
                !s.streaming
                    || s.in_flight() > 0
                    || s.cursor < replica.log_tip().map_err(store_err(peer))?
            }
            None => false,
        };
        if records_pending {
            return Ok(true);
        }
        if self.overrides.contains(&peer) {
            return Ok(false);
        }
        let meter = replica.store().meter(&peer).map_err(store_err(peer))?;
        let next = self.next_send.get(&peer).copied().unwrap_or(i64::MIN);
        Ok(link
            .files_held_back(meter, bytes, next, replica.now_ms())
            .is_some())
    }

    /// Frame bytes left of `peer`'s budget today (`usize::MAX` without one, or while
    /// `sync --now` holds the gate open): the next batch must fit in them.
    pub(super) fn budget_room(&self, replica: &Replica, peer: NodeId) -> Result<usize, SyncError> {
        let Some(budget) = replica.policy(&peer).link.budget else {
            return Ok(usize::MAX);
        };
        if self.overrides.contains(&peer) || replica.faults().ignore_link {
            return Ok(usize::MAX);
        }
        let meter = replica.store().meter(&peer).map_err(store_err(peer))?;
        let used = meter
            .on_day(replica.policy(&peer).link.day(replica.now_ms()))
            .bytes;
        Ok(usize::try_from(budget.saturating_sub(used)).unwrap_or(usize::MAX))
    }

    /// The next batch to `peer` needs `needs` frame bytes and only `room` are left today: it
    /// waits, and the peer's status says so.
    pub(super) fn hold_for_budget(
        &mut self,
        replica: &Replica,
        peer: NodeId,
        needs: usize,
        room: usize,
    ) {
        let now = replica.now_ms();
        let held = HeldBack::BudgetShort {
            needs: needs as u64,
            left: room as u64,
            budget: replica.policy(&peer).link.budget.unwrap_or(0),
            resets_ms: replica.policy(&peer).link.next_day_ms(now),
        };
        if let Some(session) = self.peers.get_mut(&peer) {
            session.held_back = Some(held);
        }
    }

    /// `msg` goes to `peer`: count its bytes against the day's budget (durably) and the
    /// rate. Batches are counted as the pump decides them, since the next one's room depends
    /// on it; everything else that leaves the core (Hello, Ack, Rewound, status records)
    /// through [`Sessions::metered_all`].
    pub(super) fn metered(
        &mut self,
        replica: &Replica,
        peer: NodeId,
        msg: &Message,
        frame: Option<usize>,
    ) -> Result<(), SyncError> {
        let link = &replica.policy(&peer).link;
        if link.is_open_always() {
            return Ok(());
        }
        // The frame's size, when the caller already encoded it (compression makes it cost).
        let bytes = frame.unwrap_or_else(|| tidesync_proto::wire::frame_bytes(msg)) as u64;
        let now = replica.now_ms();
        if link.budget.is_some() {
            replica
                .store()
                .meter_sent(&peer, link.day(now), bytes)
                .map_err(store_err(peer))?;
        }
        if link.max_rate.is_some() {
            let from = self.next_send.get(&peer).copied().unwrap_or(now).max(now);
            self.next_send.insert(peer, link.next_send(bytes, from));
        }
        Ok(())
    }

    /// Count what leaves the core for shaped links, batches excepted (the pump counted them).
    /// Control frames are counted but never held: a peer must hear our Hello and get the Ack
    /// of what it sent, or it sends it again.
    pub fn metered_all<'a>(
        &mut self,
        replica: &Replica,
        out: impl IntoIterator<Item = (&'a NodeId, &'a Message)>,
    ) -> Result<(), SyncError> {
        for (peer, msg) in out {
            if !matches!(msg, Message::Changes { .. } | Message::Ahead { .. }) {
                self.metered(replica, *peer, msg, None)?;
            }
        }
        Ok(())
    }

    /// Open `peer`'s gate once, whatever its windows and budget say, until it is in sync.
    pub fn sync_now(
        &mut self,
        replica: &mut Replica,
        peer: NodeId,
    ) -> Result<Vec<Outgoing>, SyncError> {
        self.overrides.insert(peer);
        self.pump(replica, peer)
    }

    /// Pump every connected peer whose link is shaped: a window may have opened, a day begun
    /// or the rate allowed the next batch (the node calls this on its tick).
    pub fn pump_shaped(&mut self, replica: &mut Replica) -> Result<Vec<Outgoing>, SyncError> {
        let shaped: Vec<NodeId> = self
            .peers
            .keys()
            .filter(|p| !replica.policy(p).link.is_open_always())
            .copied()
            .collect();
        let mut out = Vec::new();
        for peer in shaped {
            out.extend(self.pump(replica, peer)?);
        }
        Ok(out)
    }
}
