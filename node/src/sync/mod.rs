//! Sync sessions: the Hello/Changes/Ack/Rewound state machine of every connected peer. It
//! streams our change log to each peer through the replica and hands what peers send to the
//! replica to verify and store; it never touches the store itself. The protocol is specified
//! once, in `proto/src/wire.rs` and ARCHITECTURE.md ("The sync protocol").
//!
//! A session starts when a connection to a configured peer is up. Each side sends `Hello`
//! with the checkpoint of the other's log it has durably stored, then `Changes` batches of
//! its own log after the peer's checkpoint, at most [`SYNC_WINDOW_BATCHES`] (two) in flight.
//! New changes (local or received from anyone) are pushed the moment they are committed.
//! Entries authored by the peer or received from it are not echoed back to it.
//!
//! Modules: [`session`] (one peer's bookkeeping, unit-tested without a store), [`pace`] (the
//! batch size and window per peer, which shrink on a flaky link), [`fetch`] (which segment of
//! which wanted file to ask of which peer), `pump` (the next batches for a peer) and `gate`
//! (what a shaped link lets through).

mod ahead;
pub mod fetch;
mod gate;
pub mod pace;
mod pump;
pub mod session;

use std::collections::BTreeMap;

use tidesync_proto::{Checkpoint, Message, NodeId};

use crate::replica::receive::Checked;

use crate::model::Claim;
use crate::replica::Replica;
pub use crate::replica::SyncError;
use crate::replica::apply::MAX_HELD_CHANGES_PER_PEER;
use crate::replica::receive::ReceiveReport;
use crate::store::StoreError;
pub use session::Session;

/// Batches sent to one peer and not yet acknowledged: two on a healthy link (see [`pace`]),
/// so that the receiver applies one while the next is read and sent. Request-response gives
/// each request its own stream, so batches may arrive out of order; the receiver then stores
/// the later one but moves its checkpoint only across no gap (see `Store::commit_received`),
/// and holds changes whose dependencies are in the earlier one.
pub use pace::SYNC_WINDOW_BATCHES;

/// A request to send to a peer.
pub type Outgoing = (NodeId, Message);

/// The sessions of all connected peers, in node id order, so that pushing to every peer
/// happens in the same order on every run (simulations replay a seed exactly).
#[derive(Debug, Default)]
pub struct Sessions {
    pub(crate) peers: BTreeMap<NodeId, Session>,
    /// Each peer's pace, kept across its connections.
    paces: BTreeMap<NodeId, pace::Pace>,
    /// When the rate of each rate-limited peer allows its next batch, Unix milliseconds.
    next_send: BTreeMap<NodeId, i64>,
    /// Peers whose gate `sync --now` opened until they are in sync.
    overrides: std::collections::BTreeSet<NodeId>,
}

/// A `Rewound` for `peer`: where we hold its log up to, so that it resends from there.
fn rewound_message(replica: &Replica, peer: NodeId) -> Result<Outgoing, SyncError> {
    let held = replica
        .peer_record(&peer)
        .map_err(store_err(peer))?
        .received;
    Ok((peer, Message::Rewound { resume: held }))
}

/// A store failure while serving `peer`: ours, never the peer's.
fn store_err(peer: NodeId) -> impl FnOnce(StoreError) -> SyncError {
    move |source| SyncError::Store { peer, source }
}

impl Sessions {
    /// The session with `peer`, if connected.
    pub fn session(&self, peer: &NodeId) -> Option<&Session> {
        self.peers.get(peer)
    }

    /// What status needs of each connected peer's session.
    pub fn session_summaries(&self) -> crate::reads::Sessions {
        self.peers
            .iter()
            .map(|(id, s)| {
                let pace = self.pace(id);
                let mut summary = s.summary();
                summary.batch_bytes = pace.batch_bytes as u64;
                summary.window = pace.window as u64;
                (*id, summary)
            })
            .collect()
    }

    /// A connection to `peer` is up: start a session and say where to resume.
    pub fn on_connected(
        &mut self,
        replica: &mut Replica,
        peer: NodeId,
    ) -> Result<Vec<Outgoing>, SyncError> {
        let now = replica.now_ms();
        self.peers.insert(peer, Session::new(now));
        // Batches that arrived early belong to the last connection's window; what they
        // carried is stored, and the peer resends from our checkpoint anyway.
        replica
            .update_peer(&peer, |r| r.ahead.clear())
            .map_err(store_err(peer))?;
        self.hello(replica, peer)
    }

    /// Record the transport `peer`'s session runs over.
    pub fn set_via(&mut self, peer: NodeId, via: Option<crate::link::Transport>) {
        if let Some(s) = self.peers.get_mut(&peer) {
            s.via = via;
        }
    }

    /// A Hello for `peer`: where we hold its log up to, and our tip. Only the answer to the
    /// latest Hello counts as answered (see [`Session::hello_answered`]).
    fn hello(&mut self, replica: &mut Replica, peer: NodeId) -> Result<Vec<Outgoing>, SyncError> {
        let record = replica.peer_record(&peer).map_err(store_err(peer))?;
        let tip = replica.log_tip().map_err(store_err(peer))?;
        let Some(session) = self.peers.get_mut(&peer) else {
            return Ok(Vec::new());
        };
        session.last_batch += 1;
        session.hello = session.last_batch;
        session.hello_answered = false;
        Ok(vec![(
            peer,
            Message::Hello {
                number: session.hello,
                node: replica.node_id(),
                name: replica.name().to_string(),
                resume: record.received,
                tip,
            },
        )])
    }

    /// After `peer`'s policy widened (see [`Replica::set_policy`]): if a session is up, send our
    /// log from the start through the new policy and ask the peer, with a fresh Hello, to
    /// resend its own from where we now hold it (the start).
    pub fn on_policy_widened(
        &mut self,
        replica: &mut Replica,
        peer: NodeId,
    ) -> Result<Vec<Outgoing>, SyncError> {
        let Some(session) = self.peers.get_mut(&peer) else {
            return Ok(Vec::new());
        };
        if session.streaming {
            // From the start, which covers any restart the peer asked for meanwhile: a
            // restart still waiting for the window would otherwise replace this one.
            session.restart_wanted = None;
            session.restart_from(0);
            session.resending = true;
        }
        // The new Hello must arrive, or the peer never resends: it is sent again if it fails.
        let mut out = self.hello(replica, peer)?;
        out.extend(self.pump(replica, peer)?);
        Ok(out)
    }

    /// Keep the link moving when changes were refused for lack of room to hold them: mark the
    /// sender stalled, and send a fresh Hello to every stalled peer once room is back (below
    /// half its quota) or, for the batch's sender, once it has sent all it has (`at_tip`).
    fn after_held_refusals(
        &mut self,
        replica: &mut Replica,
        from: NodeId,
        report: &ReceiveReport,
        at_tip: bool,
    ) -> Result<Vec<Outgoing>, SyncError> {
        if report.refused_for_room > 0 {
            if let Some(s) = self.peers.get_mut(&from) {
                s.stalled = true;
            }
            return Ok(Vec::new());
        }
        let stalled: Vec<NodeId> = self
            .peers
            .iter()
            .filter(|(_, s)| s.stalled)
            .map(|(p, _)| *p)
            .collect();
        let mut out = Vec::new();
        for peer in stalled {
            let tally = replica.held_tally(&peer).map_err(store_err(peer))?;
            if (peer == from && at_tip) || tally.changes < MAX_HELD_CHANGES_PER_PEER / 2 {
                if let Some(s) = self.peers.get_mut(&peer) {
                    s.stalled = false;
                }
                tracing::info!(%peer, "asking the peer to resend what found no room to be held");
                out.extend(self.hello(replica, peer)?);
            }
        }
        Ok(out)
    }

    /// The last connection to `peer` is gone.
    pub fn on_disconnected(&mut self, peer: &NodeId) {
        self.overrides.remove(peer);
        if let Some(session) = self.peers.remove(peer)
            && session.in_flight() > 0
        {
            self.pace_failed(*peer);
        }
    }

    /// The pace of sending to `peer` (see [`pace`]).
    pub fn pace(&self, peer: &NodeId) -> pace::Pace {
        self.paces.get(peer).copied().unwrap_or_default()
    }

    fn pace_failed(&mut self, peer: NodeId) {
        let pace = self.paces.entry(peer).or_default();
        pace.failed();
        tracing::debug!(%peer, batch_bytes = pace.batch_bytes, window = pace.window, "a batch failed; sending smaller batches");
    }

    /// Where to start sending our log to a peer that holds it up to `resume`. A checkpoint
    /// that is not in our log means this node was restored from an older copy: start over.
    fn resume_point(
        &self,
        replica: &Replica,
        peer: NodeId,
        resume: Checkpoint,
    ) -> Result<(u64, bool), SyncError> {
        if resume.seq == 0 {
            return Ok((0, false));
        }
        match replica
            .checkpoint_for(&peer, resume.seq)
            .map_err(store_err(peer))?
        {
            Some(cp) if cp.hash == resume.hash => Ok((resume.seq, false)),
            _ => Ok((0, true)),
        }
    }

    /// A request from `peer`. Returns the response and requests to send (to any peer).
    /// `checked` holds the signatures of a batch verified ahead (see [`Checked`]).
    pub fn on_request(
        &mut self,
        replica: &mut Replica,
        peer: NodeId,
        msg: Message,
        checked: Option<Checked>,
    ) -> Result<(Message, Vec<Outgoing>), SyncError> {
        let now = replica.now_ms();
        match msg {
            Message::Hello {
                number,
                node,
                name: _,
                resume,
                tip,
            } => {
                if node != peer {
                    return Err(SyncError::WrongNode {
                        peer,
                        claimed: node,
                    });
                }
                let (mut start, rewound) = self.resume_point(replica, peer, resume)?;
                let record = replica.peer_record(&peer).map_err(store_err(peer))?;
                let resending = record.resend_all;
                if start < record.acked {
                    // The peer lost part of what it acknowledged (restored from an older
                    // copy): what went ahead to it may be lost too.
                    replica
                        .store()
                        .clear_sent_ahead(&peer)
                        .map_err(store_err(peer))?;
                }
                let sent_ahead = replica.store().sent_ahead(&peer).map_err(store_err(peer))?;
                if resending {
                    tracing::info!(%peer, "the peer's policy was widened: sending it our whole log through the new policy");
                    start = 0;
                }
                let session = self.peers.entry(peer).or_insert_with(|| Session::new(now));
                session.remote_tip = tip;
                session.sent_ahead = sent_ahead;
                // A checkpoint we never had was answered once in this session already: a
                // repeat cannot make us start over again (a restored node reconnects).
                let repeat = rewound && session.rewound_sent;
                if repeat {
                    tracing::debug!(%peer, claimed = resume.seq, "repeated Hello with a checkpoint we never had; already answered in this session");
                } else {
                    session.streaming = true;
                    session.restart_on_request(start);
                    session.resending = resending;
                }
                let rewound = rewound && !repeat;
                if rewound {
                    session.rewound_sent = true;
                }
                if !rewound && !repeat && start > 0 {
                    // The peer durably holds our log up to `start`: that acknowledges it (an
                    // export for the peer starts there too).
                    replica
                        .update_peer(&peer, |r| r.acked = r.acked.max(start))
                        .map_err(store_err(peer))?;
                }
                let mut out = Vec::new();
                if rewound {
                    tracing::warn!(%peer, claimed = resume.seq, "peer holds a checkpoint of our log that we no longer have: this node was restored from an older copy; resending everything and asking for what we lost");
                    out.push(rewound_message(replica, peer)?);
                }
                out.extend(self.pump(replica, peer)?);
                Ok((
                    Message::Ack {
                        batch: number,
                        upto: 0,
                        rejected: 0,
                    },
                    out,
                ))
            }
            Message::Changes {
                batch,
                after,
                docs,
                changes,
                upto,
                tip,
            } => {
                // A batch from the start of the peer's log moves our checkpoint back only if
                // it is newer than every batch of this session so far: a late copy of an
                // earlier one must not undo what later batches stored.
                let mut restart = true;
                if let Some(s) = self.peers.get_mut(&peer) {
                    s.remote_tip = tip;
                    restart = batch > s.newest_batch_in;
                    s.newest_batch_in = s.newest_batch_in.max(batch);
                }
                let claim = Claim {
                    after,
                    upto,
                    restart,
                };
                let report = replica.receive_changes(peer, Some(claim), docs, changes, checked)?;
                let mut out = if report.applied > 0 {
                    self.pump_all(replica)?
                } else {
                    Vec::new()
                };
                out.extend(self.after_held_refusals(replica, peer, &report, upto.seq >= tip)?);
                let rejected = u32::try_from(report.rejected).unwrap_or(u32::MAX);
                Ok((
                    Message::Ack {
                        batch,
                        upto: upto.seq,
                        rejected,
                    },
                    out,
                ))
            }
            Message::Rewound { resume } => {
                let (start, _) = self.resume_point(replica, peer, resume)?;
                // It may have lost what went ahead to it, and view changes it acknowledged:
                // log order sends the one again, views go whole.
                replica
                    .store()
                    .clear_sent_ahead(&peer)
                    .map_err(store_err(peer))?;
                replica.forget_view_acks(&peer).map_err(store_err(peer))?;
                if let Some(session) = self.peers.get_mut(&peer) {
                    session.sent_ahead.clear();
                    // Once per session: a restored node reconnects, so a repeat in the same
                    // session is acknowledged and changes nothing.
                    if session.resend_granted {
                        tracing::debug!(%peer, "repeated Rewound in this session; ignored");
                    } else {
                        tracing::warn!(%peer, from = start, "peer was restored from an older copy; resending our log to it in full");
                        session.resend_granted = true;
                        session.unfiltered = true;
                        session.restart_on_request(start);
                    }
                }
                Ok((
                    Message::Ack {
                        batch: 0,
                        upto: 0,
                        rejected: 0,
                    },
                    self.pump(replica, peer)?,
                ))
            }
            Message::Ahead {
                batch,
                docs,
                changes,
            } => self.on_ahead(replica, peer, batch, docs, changes, checked),
            Message::Ack { .. } => Err(SyncError::Unexpected { peer, what: "Ack" }),
            // The core takes status records before a session sees a request.
            Message::Status { .. } => Err(SyncError::Unexpected {
                peer,
                what: "Status",
            }),
        }
    }

    /// The response to a request we sent to `peer`.
    pub fn on_response(
        &mut self,
        replica: &mut Replica,
        peer: NodeId,
        msg: Message,
    ) -> Result<Vec<Outgoing>, SyncError> {
        let Message::Ack {
            batch: answered,
            upto,
            rejected,
        } = msg
        else {
            return Err(SyncError::Unexpected {
                peer,
                what: "non-Ack response",
            });
        };
        let Some(session) = self.peers.get_mut(&peer) else {
            return Ok(Vec::new());
        };
        if answered == 0 {
            // A Rewound's answer.
            session.rewound_answered = true;
            return Ok(Vec::new());
        }
        if answered == session.hello {
            session.hello_answered = true;
            self.note_in_sync(replica, peer)?;
            return Ok(Vec::new());
        }
        if let Some(i) = session
            .ahead_inflight
            .iter()
            .position(|(b, _)| *b == answered)
        {
            return self.on_ahead_acked(replica, peer, i, rejected);
        }
        // Batches travel on separate streams, so Acks come in any order: mark this batch,
        // then let go of the batches acknowledged together with all before them.
        let mut sent = 0;
        let (mut views, mut owed) = (Vec::new(), Vec::new());
        if let Some(batch) = session
            .inflight
            .iter_mut()
            .find(|b| b.batch == answered && b.upto == upto && !b.answered)
        {
            batch.answered = true;
            sent = batch.changes;
            if let Some(pace) = self.paces.get_mut(&peer) {
                pace.acked();
            }
            views = std::mem::take(&mut batch.views);
            owed = std::mem::take(&mut batch.owed);
        }
        while let Some(batch) = session.inflight.front().filter(|b| b.answered) {
            session.acked_upto = batch.upto;
            session.inflight.pop_front();
        }
        let acked = session.acked_upto;
        if session.sent_ahead.first().is_some_and(|s| *s <= acked) {
            // The checkpoint covers these now.
            session.sent_ahead = session.sent_ahead.split_off(&(acked + 1));
            replica
                .store()
                .note_sent_ahead(&peer, &[], acked)
                .map_err(store_err(peer))?;
        }
        let now = replica.now_ms();
        replica
            .update_peer(&peer, |r| {
                r.acked = r.acked.max(acked);
                r.changes_out += sent;
                r.rejected_by_peer += u64::from(rejected);
                r.last_sync_ms = now;
            })
            .map_err(store_err(peer))?;
        replica.ack_views(&peer, &views).map_err(store_err(peer))?;
        replica.settle_refs(&peer, &owed).map_err(store_err(peer))?;
        if rejected > 0 {
            tracing::warn!(%peer, rejected, "peer rejected changes we sent");
        }
        self.pump(replica, peer)
    }

    /// Once a resend after a widening is wholly acknowledged, clear `resend_all`.
    fn note_resent(&mut self, replica: &mut Replica, peer: NodeId) -> Result<(), SyncError> {
        if !self.peers.get(&peer).is_some_and(|s| s.resending) {
            return Ok(());
        }
        let last = replica.log_tip().map_err(store_err(peer))?;
        let Some(session) = self.peers.get_mut(&peer) else {
            return Ok(());
        };
        if session.in_flight() == 0 && session.cursor >= last {
            session.resending = false;
            replica
                .update_peer(&peer, |r| r.resend_all = false)
                .map_err(store_err(peer))?;
        }
        Ok(())
    }

    /// Record when the session with `peer` first came in sync (see
    /// [`Session::in_sync_after_ms`]).
    fn note_in_sync(&mut self, replica: &mut Replica, peer: NodeId) -> Result<(), SyncError> {
        if self
            .peers
            .get(&peer)
            .is_none_or(|s| s.in_sync_after_ms.is_some())
        {
            return Ok(());
        }
        let last = replica.log_tip().map_err(store_err(peer))?;
        let now = replica.now_ms();
        if let Some(session) = self.peers.get_mut(&peer) {
            session.mark_in_sync(last, now);
        }
        Ok(())
    }

    /// A request to `peer` failed (timeout, closed stream): what it carried may not have
    /// arrived, so send again from the end of the batches it acknowledged without a gap.
    /// Our Hello is sent again while it is unanswered: without it the peer never starts
    /// sending us its log on this connection.
    pub fn on_request_failed(
        &mut self,
        replica: &mut Replica,
        peer: NodeId,
    ) -> Result<Vec<Outgoing>, SyncError> {
        let mut out = Vec::new();
        if self.peers.get(&peer).is_some_and(|s| s.in_flight() > 0) {
            self.pace_failed(peer);
        }
        if let Some(session) = self.peers.get_mut(&peer) {
            let acked = session
                .restart_wanted
                .take()
                .map_or(session.acked_upto, |w| w.min(session.acked_upto));
            session.restart_from(acked);
            let rewound_lost = session.rewound_sent && !session.rewound_answered;
            if !session.hello_answered {
                out = self.hello(replica, peer)?;
            }
            if rewound_lost {
                // Our Rewound may be what failed: without it the peer never resends.
                out.push(rewound_message(replica, peer)?);
            }
        }
        out.extend(self.pump(replica, peer)?);
        Ok(out)
    }
}
