//! Sync sessions: the per-peer state machine that streams the change log to peers and stores
//! what they stream back, written against the core so that it runs unchanged under the
//! network shell, in tests and in simulations.
//!
//! A session starts when a connection to a configured peer is up. Each side sends `Hello` with
//! the checkpoint of the other's log it has durably stored. Each side then sends `Changes`
//! batches from its own log after that checkpoint, at most [`SYNC_WINDOW_BATCHES`] (two) in
//! flight at a time; the receiver verifies, applies and commits a batch and its new checkpoint
//! in one transaction, then answers `Ack`. New changes (local or received from anyone) are pushed the moment they are
//! committed. Entries authored by the peer or received from it are not echoed back to it.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use automerge::{Automerge, Change};
use tidesync_proto::{
    AuthorKey, Checkpoint, DocHeader, DocId, Message, NodeId, ObjectId, SignedChange, TypeName,
    VerifiedChange, VerifyError, check_batch,
};

use crate::core::Core;
use crate::engine::{Arrival, Arrived, Engine};
use crate::model::Claim;
use crate::policy::{Policies, Policy};
use crate::store::{Reader, Store, StoreError};

/// Most changes in one `Changes` batch. 2,000 synced 50,000 objects about 10 % faster than
/// 1,000 (fewer commits); frames stay near 1 MB. Bytes are bounded by
/// [`crate::outbound::SYNC_BATCH_BYTES`].
pub const SYNC_BATCH_CHANGES: usize = 2_000;
/// Most log entries scanned for one batch, so that a long run of entries the peer already has
/// costs a bounded amount of work per step.
pub const SYNC_SCAN_ENTRIES: usize = 4 * SYNC_BATCH_CHANGES;
/// Batches sent to one peer and not yet acknowledged: two, so that the receiver applies one
/// while the next is read and sent. Request-response gives each request its own stream, so
/// batches may arrive out of order; the receiver then stores the later one but moves its
/// checkpoint only across no gap (see `Store::commit_received`), and holds changes whose
/// dependencies are in the earlier one.
pub const SYNC_WINDOW_BATCHES: usize = 2;
/// Work lists shorter than this (changes to verify, documents to apply) stay on one thread.
pub const PARALLEL_MIN_ITEMS: usize = 64;

/// Most changes one peer may have held here, waiting for dependencies. An honest peer holds
/// at most its two batches in flight (`SYNC_WINDOW_BATCHES` × `SYNC_BATCH_CHANGES` = 4,000)
/// plus what arrives ahead of a relay's gap; past this, its changes that would be held are
/// refused for room, its checkpoint stays before them, and they arrive again (see
/// [`Session::stalled`]).
pub const MAX_HELD_CHANGES_PER_PEER: u64 = 10_000;
/// Most bytes of held changes per peer: a peer's held changes cost at most this much disk.
pub const MAX_HELD_BYTES_PER_PEER: u64 = 64 * 1024 * 1024;
/// Most changes held for one document, from all peers together: one document's share of two
/// full batches in flight.
pub const MAX_HELD_CHANGES_PER_DOC: usize = 2 * SYNC_BATCH_CHANGES;

/// A request to send to a peer.
pub type Outgoing = (NodeId, Message);

/// Why a sync step failed. Each names the peer.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("peer {peer} sent Hello claiming to be {claimed}")]
    WrongNode { peer: NodeId, claimed: NodeId },
    #[error("peer {peer} sent a {what} as a request")]
    Unexpected { peer: NodeId, what: &'static str },
    #[error("sync with peer {peer}: {source}")]
    Store { peer: NodeId, source: StoreError },
    #[error("publishing the view of document {doc} to peer {peer}: {detail}")]
    View {
        peer: NodeId,
        doc: DocId,
        detail: String,
    },
}

impl SyncError {
    /// Whether the peer broke the protocol. A local failure (the store, a view we publish)
    /// is ours: it never costs the peer its connection.
    pub fn blames_peer(&self) -> bool {
        match self {
            SyncError::WrongNode { .. } | SyncError::Unexpected { .. } => true,
            SyncError::Store { .. } | SyncError::View { .. } => false,
        }
    }
}

/// One connected peer's session.
#[derive(Debug, Clone)]
pub struct Session {
    /// When the session started, Unix milliseconds.
    pub since_ms: i64,
    /// The peer's last SEQ, as it last told us.
    pub remote_tip: u64,
    /// Whether the peer's Hello arrived, so that we know where to start sending.
    streaming: bool,
    /// The last entry of our log scanned for this peer.
    cursor: u64,
    /// The checkpoint the peer will hold once every sent batch is stored.
    sent_upto: u64,
    /// Sent batches not yet acknowledged together with every batch before them, oldest
    /// first.
    inflight: VecDeque<Inflight>,
    /// The end of the last batch acknowledged with every batch before it: where sending
    /// resumes when a request fails. A later batch's Ack does not move it past an earlier
    /// batch that is still unanswered (that one may be lost).
    acked: u64,
    /// The highest batch number received from the peer in this session.
    newest_batch_in: u64,
    /// The number of the last batch sent in this session. Never reused, even when sending
    /// restarts, so that a late Ack for an abandoned batch matches nothing.
    last_batch: u64,
    /// Send everything, including what the peer authored or sent us: the peer was restored
    /// from an older copy and asked for it.
    unfiltered: bool,
    /// Whether the peer answered our latest Hello.
    hello_answered: bool,
    /// The number of our latest Hello.
    hello: u64,
    /// Whether we are sending our whole log again after the peer's policy widened; the
    /// stored `resend_all` flag is cleared only once all of it is acknowledged, so a
    /// connection lost midway starts the resend over instead of skipping what it missed.
    resending: bool,
    /// Milliseconds from the session's start until it was first in sync: both Hellos
    /// answered and nothing of ours left unacknowledged.
    pub in_sync_after_ms: Option<i64>,
    /// Some of the peer's changes were refused for lack of room to hold them, so our
    /// checkpoint of its log stays before them. A fresh Hello asks the peer to resend from
    /// there (in log order, in which they apply at once) when room frees up or when the peer
    /// has sent everything it has.
    pub stalled: bool,
    /// Where the peer asked us (Hello, Rewound) to start sending again, while batches were
    /// in flight: the restart waits until they are acknowledged or failed, so that requests
    /// repeated at will cost at most one window of reading each, at the peer's own pace.
    restart_wanted: Option<u64>,
    /// Whether a Hello with a checkpoint we never had already made us send `Rewound` and
    /// start over in this session. A restored node reconnects, so once per session suffices.
    rewound_sent: bool,
    /// Whether the peer answered our `Rewound`; until then a failed request sends it again.
    rewound_answered: bool,
    /// Whether the peer's `Rewound` already made us resend our log to it, unfiltered, in this
    /// session; later ones in the same session are acknowledged and ignored.
    resend_granted: bool,
}

impl Session {
    /// What status needs of this session.
    pub fn summary(&self) -> crate::reads::SessionSummary {
        crate::reads::SessionSummary {
            since_ms: self.since_ms,
            remote_tip: self.remote_tip,
            cursor: self.cursor,
            unacked: self.inflight.iter().map(|b| b.changes).sum(),
            in_sync_after_ms: self.in_sync_after_ms,
        }
    }

    fn new(now_ms: i64) -> Session {
        Session {
            since_ms: now_ms,
            remote_tip: 0,
            streaming: false,
            cursor: 0,
            sent_upto: 0,
            inflight: VecDeque::new(),
            acked: 0,
            last_batch: 0,
            hello: 0,
            newest_batch_in: 0,
            resending: false,
            unfiltered: false,
            hello_answered: false,
            in_sync_after_ms: None,
            stalled: false,
            restart_wanted: None,
            rewound_sent: false,
            rewound_answered: false,
            resend_granted: false,
        }
    }

    /// The peer asked us to send again from `seq`: at once when nothing is in flight,
    /// otherwise once the batches in flight are answered (see [`Session::restart_wanted`]).
    fn restart_on_request(&mut self, seq: u64) {
        let seq = self.restart_wanted.take().map_or(seq, |w| w.min(seq));
        if self.inflight.is_empty() {
            self.restart_from(seq);
        } else {
            self.restart_wanted = Some(seq);
        }
    }

    /// Apply a restart the peer asked for once nothing is in flight; whether sending may go
    /// on (no restart still waits).
    fn apply_wanted_restart(&mut self) -> bool {
        match self.restart_wanted {
            Some(seq) if self.inflight.is_empty() => {
                self.restart_wanted = None;
                self.restart_from(seq);
                true
            }
            Some(_) => false,
            None => true,
        }
    }

    /// Start sending again from `seq`, forgetting every batch in flight.
    fn restart_from(&mut self, seq: u64) {
        self.cursor = seq;
        self.sent_upto = seq;
        self.acked = seq;
        self.inflight.clear();
    }

    /// Note the first moment the session is in sync, `now_ms` being the time.
    fn mark_in_sync(&mut self, last: u64, now_ms: i64) {
        if self.in_sync_after_ms.is_none()
            && self.streaming
            && self.hello_answered
            && self.inflight.is_empty()
            && self.cursor >= last
        {
            self.in_sync_after_ms = Some(now_ms - self.since_ms);
        }
    }
}

/// One sent batch awaiting its Ack.
#[derive(Debug, Clone)]
struct Inflight {
    /// The batch's number in its session: its Ack names it.
    batch: u64,
    /// The batch's `upto`: where the peer's checkpoint stands once it and all before it
    /// are stored.
    upto: u64,
    changes: u64,
    acked: bool,
    /// The views it carries, with how many of each view's changes the peer then holds.
    views: Vec<(DocId, u64)>,
    /// The owed referenced objects it carries (see [`crate::store::Store::owed_refs`]).
    owed: Vec<DocId>,
}

/// The sessions of all connected peers, in node id order, so that pushing to every peer
/// happens in the same order on every run (simulations replay a seed exactly).
#[derive(Debug, Default)]
pub struct Sessions {
    pub(crate) peers: BTreeMap<NodeId, Session>,
}

/// What storing one received batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReceiveReport {
    pub applied: u64,
    pub held: u64,
    pub rejected: u64,
    pub duplicates: u64,
    pub last_seq: u64,
    /// Changes that would have been held but found no room (see [`MAX_HELD_CHANGES_PER_PEER`]).
    pub refused_for_room: u64,
}

/// Split `items` into one run per core (up to four), hand each run to `f` on its own thread
/// and join the results in order; on this thread when there are fewer than
/// [`PARALLEL_MIN_ITEMS`]. A panic in a worker is resumed here, never swallowed, so no item's
/// result can go missing.
fn par_chunks<T: Send, R: Send>(items: Vec<T>, f: impl Fn(Vec<T>) -> Vec<R> + Sync) -> Vec<R> {
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 4);
    if items.len() < PARALLEL_MIN_ITEMS || workers == 1 {
        return f(items);
    }
    let chunk = items.len().div_ceil(workers);
    let mut parts: Vec<Vec<T>> = Vec::with_capacity(workers);
    let mut rest = items;
    while rest.len() > chunk {
        let tail = rest.split_off(chunk);
        parts.push(rest);
        rest = tail;
    }
    parts.push(rest);
    let f = &f;
    std::thread::scope(|scope| {
        let handles: Vec<_> = parts
            .into_iter()
            .map(|part| scope.spawn(move || f(part)))
            .collect();
        let mut out = Vec::new();
        for h in handles {
            match h.join() {
                Ok(results) => out.extend(results),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        out
    })
}

/// Map `f` over `items` on every core, keeping their order (see [`par_chunks`]).
fn par_map<T: Send, R: Send>(items: Vec<T>, f: impl Fn(T) -> R + Sync) -> Vec<R> {
    par_chunks(items, |part| part.into_iter().map(&f).collect())
}

/// Verify a batch on every core: each core checks its share of the signatures in one batch
/// equation (see [`check_batch`]), with each author's key decompressed once.
#[cfg_attr(not(feature = "fault-injection"), allow(unused_variables))]
pub(crate) fn verify_batch(
    changes: &[SignedChange],
    faults: &crate::fault::Faults,
) -> Vec<Result<VerifiedChange, VerifyError>> {
    let decoded = par_map(changes.iter().collect(), SignedChange::decode);
    #[cfg(feature = "fault-injection")]
    if faults.accept_unsigned {
        return decoded
            .into_iter()
            .map(|d| d.and_then(|d| d.unchecked_for_fault_injection()))
            .collect();
    }
    let mut keys: HashMap<NodeId, Option<AuthorKey>> = HashMap::new();
    for d in decoded.iter().flatten() {
        keys.entry(d.author)
            .or_insert_with(|| AuthorKey::new(&d.author));
    }
    let keys = &keys;
    par_chunks(decoded, |part| check_batch(part, keys))
}

impl Core {
    fn store_err(peer: NodeId) -> impl FnOnce(StoreError) -> SyncError {
        move |source| SyncError::Store { peer, source }
    }

    /// The session with `peer`, if connected.
    pub fn session(&self, peer: &NodeId) -> Option<&Session> {
        self.sync.peers.get(peer)
    }

    /// What status needs of each connected peer's session.
    pub fn session_summaries(&self) -> crate::reads::Sessions {
        self.sync
            .peers
            .iter()
            .map(|(id, s)| (*id, s.summary()))
            .collect()
    }

    /// A connection to `peer` is up: start a session and say where to resume.
    pub fn on_connected(&mut self, peer: NodeId) -> Result<Vec<Outgoing>, SyncError> {
        let now = (self.clock)();
        self.sync.peers.insert(peer, Session::new(now));
        // Batches that arrived early belong to the last connection's window; what they
        // carried is stored, and the peer resends from our checkpoint anyway.
        self.store
            .update_peer(&peer, |r| r.ahead.clear())
            .map_err(Self::store_err(peer))?;
        self.hello(peer)
    }

    /// A Hello for `peer`: where we hold its log up to, and our tip. Only the answer to the
    /// latest Hello counts as answered (see [`Session::hello_answered`]).
    fn hello(&mut self, peer: NodeId) -> Result<Vec<Outgoing>, SyncError> {
        let record = self.store.peer(&peer).map_err(Self::store_err(peer))?;
        let tip = self.store.last_seq().map_err(Self::store_err(peer))?;
        let Some(session) = self.sync.peers.get_mut(&peer) else {
            return Ok(Vec::new());
        };
        session.last_batch += 1;
        session.hello = session.last_batch;
        session.hello_answered = false;
        Ok(vec![(
            peer,
            Message::Hello {
                number: session.hello,
                node: self.node_id(),
                name: self.name.clone(),
                resume: record.received,
                tip,
            },
        )])
    }

    /// After `peer`'s policy widened (see [`Core::set_policy`]): if a session is up, send our
    /// log from the start through the new policy and ask the peer, with a fresh Hello, to
    /// resend its own from where we now hold it (the start).
    pub fn on_policy_widened(&mut self, peer: NodeId) -> Result<Vec<Outgoing>, SyncError> {
        let Some(session) = self.sync.peers.get_mut(&peer) else {
            return Ok(Vec::new());
        };
        if session.streaming {
            session.restart_from(0);
            session.resending = true;
        }
        // The new Hello must arrive, or the peer never resends: it is sent again if it fails.
        let mut out = self.hello(peer)?;
        out.extend(self.pump(peer)?);
        Ok(out)
    }

    /// Keep the link moving when changes were refused for lack of room to hold them: mark the
    /// sender stalled, and send a fresh Hello to every stalled peer once room is back (below
    /// half its quota) or, for the batch's sender, once it has sent all it has (`at_tip`).
    fn after_held_refusals(
        &mut self,
        from: NodeId,
        report: &ReceiveReport,
        at_tip: bool,
    ) -> Result<Vec<Outgoing>, SyncError> {
        if report.refused_for_room > 0 {
            if let Some(s) = self.sync.peers.get_mut(&from) {
                s.stalled = true;
            }
            return Ok(Vec::new());
        }
        let stalled: Vec<NodeId> = self
            .sync
            .peers
            .iter()
            .filter(|(_, s)| s.stalled)
            .map(|(p, _)| *p)
            .collect();
        let mut out = Vec::new();
        for peer in stalled {
            let tally = self
                .store
                .reader()
                .and_then(|r| r.held_tally(&peer))
                .map_err(Self::store_err(peer))?;
            if (peer == from && at_tip) || tally.changes < MAX_HELD_CHANGES_PER_PEER / 2 {
                if let Some(s) = self.sync.peers.get_mut(&peer) {
                    s.stalled = false;
                }
                tracing::info!(%peer, "asking the peer to resend what found no room to be held");
                out.extend(self.hello(peer)?);
            }
        }
        Ok(out)
    }

    /// The last connection to `peer` is gone.
    pub fn on_disconnected(&mut self, peer: &NodeId) {
        self.sync.peers.remove(peer);
    }

    /// Where to start sending our log to a peer that holds it up to `resume`. A checkpoint
    /// that is not in our log means this node was restored from an older copy: start over.
    fn resume_point(&self, peer: NodeId, resume: Checkpoint) -> Result<(u64, bool), SyncError> {
        if resume.seq == 0 {
            return Ok((0, false));
        }
        match self
            .store
            .checkpoint(resume.seq)
            .map_err(Self::store_err(peer))?
        {
            Some(cp) if cp.hash == resume.hash => Ok((resume.seq, false)),
            _ => Ok((0, true)),
        }
    }

    /// A request from `peer`. Returns the response and requests to send (to any peer).
    pub fn on_request(
        &mut self,
        peer: NodeId,
        msg: Message,
    ) -> Result<(Message, Vec<Outgoing>), SyncError> {
        let now = (self.clock)();
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
                let (mut start, rewound) = self.resume_point(peer, resume)?;
                let resending = self
                    .store
                    .peer(&peer)
                    .map_err(Self::store_err(peer))?
                    .resend_all;
                if resending {
                    tracing::info!(%peer, "the peer's policy was widened: sending it our whole log through the new policy");
                    start = 0;
                }
                let session = self
                    .sync
                    .peers
                    .entry(peer)
                    .or_insert_with(|| Session::new(now));
                session.remote_tip = tip;
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
                    self.store
                        .update_peer(&peer, |r| r.acked = r.acked.max(start))
                        .map_err(Self::store_err(peer))?;
                }
                let mut out = Vec::new();
                if rewound {
                    tracing::warn!(%peer, claimed = resume.seq, "peer holds a checkpoint of our log that we no longer have: this node was restored from an older copy; resending everything and asking for what we lost");
                    let held = self
                        .store
                        .peer(&peer)
                        .map_err(Self::store_err(peer))?
                        .received;
                    out.push((peer, Message::Rewound { resume: held }));
                }
                out.extend(self.pump(peer)?);
                self.note_in_sync(peer)?;
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
                if let Some(s) = self.sync.peers.get_mut(&peer) {
                    s.remote_tip = tip;
                    restart = batch > s.newest_batch_in;
                    s.newest_batch_in = s.newest_batch_in.max(batch);
                }
                let claim = Claim {
                    after,
                    upto,
                    restart,
                };
                let report = self.receive_changes(peer, Some(claim), docs, changes)?;
                let mut out = if report.applied > 0 {
                    self.pump_all()?
                } else {
                    Vec::new()
                };
                out.extend(self.after_held_refusals(peer, &report, upto.seq >= tip)?);
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
                let (start, _) = self.resume_point(peer, resume)?;
                // It may have lost view changes it acknowledged: send views whole again.
                self.store
                    .forget_view_acks(&peer)
                    .map_err(Self::store_err(peer))?;
                if let Some(session) = self.sync.peers.get_mut(&peer) {
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
                    self.pump(peer)?,
                ))
            }
            Message::Ack { .. } => Err(SyncError::Unexpected { peer, what: "Ack" }),
        }
    }

    /// The response to a request we sent to `peer`.
    pub fn on_response(&mut self, peer: NodeId, msg: Message) -> Result<Vec<Outgoing>, SyncError> {
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
        let Some(session) = self.sync.peers.get_mut(&peer) else {
            return Ok(Vec::new());
        };
        if answered == 0 {
            // A Rewound's answer.
            session.rewound_answered = true;
            return Ok(Vec::new());
        }
        if answered == session.hello {
            session.hello_answered = true;
            self.note_in_sync(peer)?;
            return Ok(Vec::new());
        }
        // Batches travel on separate streams, so Acks come in any order: mark this batch,
        // then let go of the batches acknowledged together with all before them.
        let mut sent = 0;
        let (mut views, mut owed) = (Vec::new(), Vec::new());
        if let Some(batch) = session
            .inflight
            .iter_mut()
            .find(|b| b.batch == answered && b.upto == upto && !b.acked)
        {
            batch.acked = true;
            sent = batch.changes;
            views = std::mem::take(&mut batch.views);
            owed = std::mem::take(&mut batch.owed);
        }
        while let Some(batch) = session.inflight.front().filter(|b| b.acked) {
            session.acked = batch.upto;
            session.inflight.pop_front();
        }
        let acked = session.acked;
        let now = (self.clock)();
        self.store
            .update_peer(&peer, |r| {
                r.acked = r.acked.max(acked);
                r.changes_out += sent;
                r.rejected_by_peer += u64::from(rejected);
                r.last_sync_ms = now;
            })
            .map_err(Self::store_err(peer))?;
        self.store
            .ack_views(&peer, &views)
            .map_err(Self::store_err(peer))?;
        self.store
            .settle_refs(&peer, &owed)
            .map_err(Self::store_err(peer))?;
        if rejected > 0 {
            tracing::warn!(%peer, rejected, "peer rejected changes we sent");
        }
        let out = self.pump(peer)?;
        self.note_in_sync(peer)?;
        self.note_resent(peer)?;
        Ok(out)
    }

    /// Once a resend after a widening is wholly acknowledged, clear `resend_all`.
    fn note_resent(&mut self, peer: NodeId) -> Result<(), SyncError> {
        if !self.sync.peers.get(&peer).is_some_and(|s| s.resending) {
            return Ok(());
        }
        let last = self.store.last_seq().map_err(Self::store_err(peer))?;
        let Some(session) = self.sync.peers.get_mut(&peer) else {
            return Ok(());
        };
        if session.inflight.is_empty() && session.cursor >= last {
            session.resending = false;
            self.store
                .update_peer(&peer, |r| r.resend_all = false)
                .map_err(Self::store_err(peer))?;
        }
        Ok(())
    }

    /// Record when the session with `peer` first came in sync (see
    /// [`Session::in_sync_after_ms`]).
    fn note_in_sync(&mut self, peer: NodeId) -> Result<(), SyncError> {
        if self
            .sync
            .peers
            .get(&peer)
            .is_none_or(|s| s.in_sync_after_ms.is_some())
        {
            return Ok(());
        }
        let last = self.store.last_seq().map_err(Self::store_err(peer))?;
        let now = (self.clock)();
        if let Some(session) = self.sync.peers.get_mut(&peer) {
            session.mark_in_sync(last, now);
        }
        Ok(())
    }

    /// A request to `peer` failed (timeout, closed stream): what it carried may not have
    /// arrived, so send again from the end of the batches it acknowledged without a gap.
    /// Our Hello is sent again while it is unanswered: without it the peer never starts
    /// sending us its log on this connection.
    pub fn on_request_failed(&mut self, peer: NodeId) -> Result<Vec<Outgoing>, SyncError> {
        let mut out = Vec::new();
        if let Some(session) = self.sync.peers.get_mut(&peer) {
            let acked = session
                .restart_wanted
                .take()
                .map_or(session.acked, |w| w.min(session.acked));
            session.restart_from(acked);
            let rewound_lost = session.rewound_sent && !session.rewound_answered;
            if !session.hello_answered {
                out = self.hello(peer)?;
            }
            if rewound_lost {
                // Our Rewound may be what failed: without it the peer never resends.
                let held = self
                    .store
                    .peer(&peer)
                    .map_err(Self::store_err(peer))?
                    .received;
                out.push((peer, Message::Rewound { resume: held }));
            }
        }
        out.extend(self.pump(peer)?);
        Ok(out)
    }

    /// After a local write: push it to every connected peer.
    pub fn pump_all(&mut self) -> Result<Vec<Outgoing>, SyncError> {
        let peers: Vec<NodeId> = self.sync.peers.keys().copied().collect();
        let mut out = Vec::new();
        for peer in peers {
            out.extend(self.pump(peer)?);
        }
        Ok(out)
    }

    /// Send `peer` the next batches of our log, up to the window.
    pub fn pump(&mut self, peer: NodeId) -> Result<Vec<Outgoing>, SyncError> {
        let mut out = Vec::new();
        let last = self.store.last_seq().map_err(Self::store_err(peer))?;
        let (me, alter_relayed) = (self.node_id(), self.faults.alter_relayed);
        let mut by_ref = self.carried_to(peer)?;
        if !self
            .sync
            .peers
            .get_mut(&peer)
            .is_none_or(|s| s.apply_wanted_restart())
        {
            return Ok(out);
        }
        // Referenced objects owed to the peer go out when nothing else is in flight: the
        // batch that owes them must be stored there first (see `crate::outbound`).
        let mut owed = !self.policies.of(&peer).refs.is_empty()
            && !self
                .store
                .owed_refs(&peer)
                .map_err(Self::store_err(peer))?
                .is_empty();
        loop {
            let Some(session) = self.sync.peers.get(&peer) else {
                return Ok(out);
            };
            let idle = owed && session.inflight.is_empty();
            if !session.streaming
                || session.inflight.len() >= SYNC_WINDOW_BATCHES
                || (session.cursor >= last && !idle)
            {
                return Ok(out);
            }
            let (cursor, sent_upto, unfiltered) =
                (session.cursor, session.sent_upto, session.unfiltered);
            let mut batch = self.read_next(peer, cursor, unfiltered, &mut by_ref, idle)?;
            if idle {
                // One batch of owed objects per pump; more follow its Ack.
                owed = false;
            }
            let session = self
                .sync
                .peers
                .get_mut(&peer)
                .ok_or(SyncError::Unexpected {
                    peer,
                    what: "lost session",
                })?;
            session.cursor = batch.upto.seq;
            if batch.changes.is_empty()
                && batch.upto.seq.saturating_sub(sent_upto) < SYNC_BATCH_CHANGES as u64
            {
                // Nothing the peer lacks in this stretch: move on without a message. Once a
                // batch's worth of such entries has gone by unannounced, an empty batch tells
                // the peer, so that a reconnect does not rescan them.
                continue;
            }
            session.sent_upto = batch.upto.seq;
            session.last_batch += 1;
            let number = session.last_batch;
            session.inflight.push_back(Inflight {
                batch: number,
                upto: batch.upto.seq,
                changes: batch.changes.len() as u64,
                acked: false,
                views: std::mem::take(&mut batch.views),
                owed: std::mem::take(&mut batch.owed),
            });
            if alter_relayed {
                for change in &mut batch.changes {
                    tamper_if_relayed(change, &me);
                }
            }
            out.push((
                peer,
                Message::Changes {
                    batch: number,
                    after: sent_upto,
                    docs: batch.docs,
                    changes: batch.changes,
                    upto: batch.upto,
                    tip: last,
                },
            ));
        }
    }

    /// The documents carried to `peer` because objects sent to it reference them.
    pub(crate) fn carried_to(&self, peer: NodeId) -> Result<HashSet<DocId>, SyncError> {
        if self.policies.of(&peer).refs.is_empty() {
            return Ok(HashSet::new());
        }
        self.store.by_ref(&peer).map_err(Self::store_err(peer))
    }

    /// Verify, apply and durably store a batch from `peer`.
    ///
    /// Verification runs first, on every core. Then, on every core, each document of the
    /// batch is read from one read transaction and handed, with our policy for the peer, to
    /// the engine. Last, one redb transaction stores the results in the batch's order; the
    /// checkpoint moves in it, after everything it covers.
    pub fn receive_changes(
        &mut self,
        peer: NodeId,
        claim: Option<Claim>,
        headers: Vec<DocHeader>,
        changes: Vec<SignedChange>,
    ) -> Result<ReceiveReport, SyncError> {
        let now = (self.clock)();
        let started = std::time::Instant::now();
        let mut report = ReceiveReport::default();
        let mut headers: HashMap<DocId, DocHeader> = headers
            .into_iter()
            .filter(|h| {
                let ok = DocId::derive(&h.origin, &h.ty, &h.id) == h.doc;
                if !ok {
                    tracing::warn!(%peer, doc = %h.doc, "document header does not match its id; ignoring it");
                }
                ok
            })
            .map(|h| (h.doc, h))
            .collect();
        let verified = verify_batch(&changes, &self.faults);
        let verified_at = started.elapsed();
        // Group the batch by document, in order of first appearance, dropping duplicates
        // within the batch (the workers drop those already stored).
        let mut order: Vec<DocId> = Vec::new();
        let mut groups: HashMap<DocId, Vec<(SignedChange, VerifiedChange)>> = HashMap::new();
        let mut seen = HashSet::new();
        for (signed, result) in changes.into_iter().zip(verified) {
            match result {
                Err(e) => {
                    report.rejected += 1;
                    if crate::ratelog::REFUSALS.allow(&peer) {
                        tracing::warn!(%peer, error = %e, "rejected a change");
                    }
                }
                Ok(v) => {
                    if !seen.insert((v.doc, v.hash)) {
                        report.duplicates += 1;
                        continue;
                    }
                    if !groups.contains_key(&v.doc) {
                        order.push(v.doc);
                    }
                    groups.entry(v.doc).or_default().push((signed, v));
                }
            }
        }
        let work: Vec<Work> = order
            .into_iter()
            .map(|doc| Work {
                header: headers.remove(&doc),
                cached: self.cache.pop(&doc),
                incoming: groups.remove(&doc).unwrap_or_default(),
                doc,
            })
            .collect();
        // Documents whose type we do not take from this peer wait until the others are
        // applied: they are taken if one of those references them (`refs`).
        let policy = self.policies.of(&peer);
        let mut by_ref = if policy.refs.is_empty() {
            HashSet::new()
        } else {
            self.store.by_ref(&peer).map_err(Self::store_err(peer))?
        };
        if !policy.refs.is_empty() {
            // A carried object may come in a later batch than the object referencing it.
            by_ref.extend(crate::carry::named_by_earlier(
                &self.store,
                &self.policies,
                peer,
                work.iter().map(|w| (w.doc, w.header.as_ref())),
            )?);
        }
        let (deferred, work): (Vec<Work>, Vec<Work>) = work.into_iter().partition(|w| {
            !policy.refs.is_empty()
                && w.header
                    .as_ref()
                    .is_some_and(|h| !policy.covers(&h.ty) && !by_ref.contains(&w.doc))
        });
        // Only the last documents fit in the cache; the workers drop the others' state.
        let cache_from = work.len().saturating_sub(self.cache.cap().get());
        let reader = self.store.reader().map_err(Self::store_err(peer))?;
        let engine = &self.engine;
        let policies = &self.policies;
        let mut prepared = par_map(work.into_iter().enumerate().collect(), |(i, w)| {
            prepare(
                engine,
                policies,
                policy,
                peer,
                &reader,
                &by_ref,
                w,
                i >= cache_from,
            )
        });
        // Take deferred documents referenced by what was taken, round by round (a LabelTree a
        // Volume references may reference Users); what is left over is refused below.
        let mut deferred = deferred;
        let mut newly = 0..prepared.len();
        while !deferred.is_empty() {
            let referenced: HashSet<(TypeName, ObjectId)> = prepared[newly.clone()]
                .iter()
                .flat_map(|p| match p {
                    Ok(Prepared::Arrived(_, _, refs, _)) => refs.clone(),
                    _ => Vec::new(),
                })
                .collect();
            let (taken, rest): (Vec<Work>, Vec<Work>) = deferred.into_iter().partition(|w| {
                w.header.as_ref().is_some_and(|h| {
                    let local = policies.local_name(&peer, &h.ty, &h.id);
                    referenced.contains(&(h.ty.clone(), h.id.clone()))
                        || referenced.contains(&(h.ty.clone(), local))
                })
            });
            deferred = rest;
            if taken.is_empty() {
                break;
            }
            by_ref.extend(taken.iter().map(|w| w.doc));
            newly = prepared.len()..prepared.len() + taken.len();
            for w in taken {
                prepared.push(prepare(
                    engine, policies, policy, peer, &reader, &by_ref, w, true,
                ));
            }
        }
        for w in deferred {
            prepared.push(prepare(
                engine, policies, policy, peer, &reader, &by_ref, w, false,
            ));
        }
        let tally = reader.held_tally(&peer).map_err(Self::store_err(peer))?;
        drop(reader);
        crate::carry::remember_references(
            &self.store,
            peer,
            prepared.iter().flat_map(|p| match p {
                Ok(Prepared::Arrived(_, _, refs, _)) => refs.as_slice(),
                _ => &[],
            }),
        )?;
        let applied_at = started.elapsed();
        let written = write(
            &self.store,
            peer,
            claim,
            now,
            (report.rejected, report.duplicates),
            prepared,
            tally,
            &self.faults,
        )
        .map_err(Self::store_err(peer))?;
        report.refused_for_room = written.refused_for_room;
        report.applied = written.applied;
        report.held = written.held;
        report.rejected += written.rejected;
        report.duplicates += written.duplicates;
        report.last_seq = written.last_seq;
        if let (Some(c), false) = (&claim, written.moved) {
            tracing::debug!(%peer, after = c.after, upto = c.upto.seq, "batch arrived ahead of a gap; the checkpoint moves once the gap is filled");
        }
        for (doc_id, doc) in written.docs {
            self.cache.put(doc_id, doc);
        }
        tracing::debug!(
            %peer,
            applied = report.applied,
            held = report.held,
            rejected = report.rejected,
            duplicates = report.duplicates,
            upto = claim.map(|c| c.upto.seq),
            verify_ms = verified_at.as_secs_f64() * 1e3,
            apply_ms = (applied_at - verified_at).as_secs_f64() * 1e3,
            commit_ms = (started.elapsed() - applied_at).as_secs_f64() * 1e3,
            "stored a batch"
        );
        Ok(report)
    }
}

/// One document's share of a received batch, before it is applied.
struct Work {
    doc: DocId,
    header: Option<DocHeader>,
    cached: Option<Automerge>,
    incoming: Vec<(SignedChange, VerifiedChange)>,
}

/// One document's share of a received batch, decided.
enum Prepared {
    /// Applied or held, with the changes refused by policy, the objects it references
    /// through our policy's `refs` for the peer, and how many changes found no room to be
    /// held.
    Arrived(Box<Arrived>, Vec<Refused>, Vec<(TypeName, ObjectId)>, u64),
    /// Changes to a document we do not have, sent without its header.
    NoHeader { doc: DocId, changes: u64 },
    /// Every change refused by policy.
    Refused(Vec<Refused>),
}

/// A change refused by our policy for the peer that sent it.
struct Refused {
    doc: DocId,
    hash: automerge::ChangeHash,
    why: crate::policy::Refusal,
}

/// Read what the store holds of one document and let the engine apply its changes (on a
/// worker thread). Changes already stored are dropped as duplicates.
#[allow(clippy::too_many_arguments)]
fn prepare(
    engine: &Engine,
    policies: &Policies,
    policy: &Policy,
    from: NodeId,
    reader: &Reader<'_>,
    by_ref: &HashSet<DocId>,
    w: Work,
    keep_doc: bool,
) -> Result<Prepared, StoreError> {
    let Work {
        doc: doc_id,
        header,
        cached,
        incoming,
    } = w;
    let record = reader.record(&doc_id)?;
    let header = match (&record, header) {
        (Some(r), _) => DocHeader {
            doc: doc_id,
            origin: r.origin,
            ty: r.ty.clone(),
            id: r.id.clone(),
        },
        (None, Some(h)) => h,
        (None, None) => {
            return Ok(Prepared::NoHeader {
                doc: doc_id,
                changes: incoming.len() as u64,
            });
        }
    };
    let existing = match record {
        Some(r) => {
            let doc = match cached {
                Some(d) => Some(d),
                None => reader.load_doc(&doc_id)?,
            };
            doc.map(|d| (r, d))
        }
        None => None,
    };
    let mut duplicates = 0;
    let mut refused = Vec::new();
    let mut fresh = Vec::with_capacity(incoming.len());
    for (signed, v) in incoming {
        if reader.has_change(&doc_id, &v.hash)? {
            duplicates += 1;
        } else if let Err(why) = policies.may_take(
            &from,
            &header.ty,
            &header.origin,
            &v.author,
            by_ref.contains(&doc_id),
        ) {
            refused.push(Refused {
                doc: doc_id,
                hash: v.hash,
                why,
            });
        } else {
            fresh.push((signed, v));
        }
    }
    if fresh.is_empty() && duplicates == 0 {
        return Ok(Prepared::Refused(refused));
    }
    let name = policies.local_name(&from, &header.ty, &header.id);
    let name_taken = existing.is_none()
        && reader
            .lookup(&header.ty, &name)?
            .is_some_and(|other| other != doc_id);
    // Held changes are checked again against our current policy for the peer that sent them.
    let mut held = Vec::new();
    let mut dropped = Vec::new();
    for (signed, sender) in reader.pending(&doc_id)? {
        let author = tidesync_proto::chunk::ChangeHeader::parse(&signed.bytes)
            .ok()
            .and_then(|h| NodeId::from_actor(&h.actor).map(|a| (h.hash, a)));
        match (sender, author) {
            (Some(sender), Some((hash, author))) => {
                if let Err(why) = policies.may_take(
                    &sender,
                    &header.ty,
                    &header.origin,
                    &author,
                    by_ref.contains(&doc_id),
                ) {
                    tracing::info!(peer = %sender, doc = %doc_id, reason = %why, "dropping a held change our policy for its sender now refuses");
                    dropped.push(automerge::ChangeHash(hash));
                } else {
                    held.push((signed, Some(sender)));
                }
            }
            (sender, _) => held.push((signed, sender)),
        }
    }
    let held_before = held.len() + dropped.len();
    let is_new = existing.is_none();
    let mut arrival = Arrival {
        header,
        from,
        existing,
        held,
        incoming: fresh,
        name,
        name_taken,
        one_by_one: false,
    };
    // Should Automerge panic applying a change, the document in memory is thrown away: load
    // it again from the store and receive the batch's other changes without that one. Each
    // round drops one change, so this ends.
    let mut panicked = Vec::new();
    let mut arrived = loop {
        let header = arrival.header.clone();
        let (name, name_taken) = (arrival.name.clone(), arrival.name_taken);
        let mut arrived = engine.receive(arrival);
        let Some(poisoned) = arrived.poisoned.take() else {
            break arrived;
        };
        // A batch apply that failed is retried one change at a time, which names the change.
        let one_by_one = poisoned.hash.is_none();
        panicked.extend(poisoned.hash);
        let existing = match reader.record(&doc_id)? {
            Some(r) => reader.load_doc(&doc_id)?.map(|d| (r, d)),
            None => None,
        };
        let incoming = poisoned
            .retry
            .into_iter()
            .filter_map(|signed| {
                let change = tidesync_proto::parse_change(signed.bytes.clone()).ok()?;
                let author = NodeId::from_actor(change.actor_id().to_bytes())?;
                let verified = tidesync_proto::VerifiedChange {
                    doc: doc_id,
                    author,
                    hash: change.hash(),
                    change,
                };
                Some((signed, verified))
            })
            .collect();
        arrival = Arrival {
            header,
            from,
            existing,
            held: reader.pending(&doc_id)?,
            incoming,
            name,
            name_taken,
            one_by_one,
        };
    };
    arrived.rejected.extend(panicked.into_iter().map(|h| {
        (
            h,
            format!("Automerge panicked applying change {h}; it is refused"),
        )
    }));
    arrived.received.dropped = dropped;
    let r = &mut arrived.received;
    let mut refused_for_room = 0;
    // A document we do not hold gets held changes only where its header allows its creation
    // from this peer.
    if is_new
        && r.record.is_none()
        && !r.held.is_empty()
        && let Err(why) = policies.may_take(
            &from,
            &r.header.ty,
            &r.header.origin,
            &r.header.origin,
            by_ref.contains(&doc_id),
        )
    {
        for (_, hash) in r.held.drain(..) {
            refused.push(Refused {
                doc: doc_id,
                hash,
                why: why.clone(),
            });
        }
    }
    // The document's quota, over every sender.
    let still_held = held_before - r.released.len() - r.dropped.len();
    let room = MAX_HELD_CHANGES_PER_DOC.saturating_sub(still_held);
    if r.held.len() > room {
        refused_for_room += (r.held.len() - room) as u64;
        tracing::warn!(peer = %from, doc = %doc_id, refused = r.held.len() - room, "no room to hold more changes for this document; they will be asked for again");
        r.held.truncate(room);
    }
    arrived.duplicates = duplicates;
    arrived.received.by_ref =
        by_ref.contains(&doc_id) && !policy.covers(&arrived.received.header.ty);
    let refs = match &arrived.doc {
        Some(doc) if policy.refs.contains_key(&arrived.received.header.ty) => {
            policy.references(&arrived.received.header.ty, &crate::doc::to_json(doc))
        }
        _ => Vec::new(),
    };
    if !keep_doc {
        arrived.doc = None;
    }
    Ok(Prepared::Arrived(
        Box::new(arrived),
        refused,
        refs,
        refused_for_room,
    ))
}

/// What the writer of a received batch did.
#[derive(Default)]
struct Written {
    applied: u64,
    held: u64,
    rejected: u64,
    duplicates: u64,
    /// Changes refused by policy, per type.
    rejected_types: std::collections::BTreeMap<String, u64>,
    last_seq: u64,
    moved: bool,
    /// Changes that found no room to be held.
    refused_for_room: u64,
    /// Documents to put in the cache.
    docs: Vec<(DocId, Automerge)>,
}

/// Commit the workers' results, in the batch's order, in one transaction. A worker's error
/// aborts the transaction: nothing of the batch is stored and the checkpoint stays where it
/// was. The peer's held-change quota is applied here, in batch order, from `tally` (what it
/// had held before the batch); a batch of which some change found no room does not move the
/// checkpoint, so that change arrives again.
#[allow(clippy::too_many_arguments)]
fn write(
    store: &Store,
    peer: NodeId,
    claim: Option<Claim>,
    now: i64,
    (rejected_before, duplicates_before): (u64, u64),
    prepared: Vec<Result<Prepared, StoreError>>,
    tally: crate::store::HeldTally,
    faults: &crate::fault::Faults,
) -> Result<Written, StoreError> {
    // Room left under the peer's quota, and what each document's share freed.
    let mut held_changes = tally.changes;
    let mut held_bytes = tally.bytes;
    let mut room_refused: u64 = prepared
        .iter()
        .map(|p| match p {
            Ok(Prepared::Arrived(_, _, _, n)) => *n,
            _ => 0,
        })
        .sum();
    // The checkpoint before this batch, which `forget-checkpoint` keeps forever.
    let forgotten = if faults.forget_checkpoint {
        Some(store.peer(&peer)?.received)
    } else {
        None
    };
    let tally = std::cell::RefCell::new(Written::default());
    let refuse = |t: &mut Written, refused: Vec<Refused>| {
        for r in refused {
            if crate::ratelog::REFUSALS.allow(&peer) {
                tracing::warn!(%peer, doc = %r.doc, hash = %r.hash, reason = %r.why, "refused a change by policy");
            }
            t.rejected += 1;
            *t.rejected_types.entry(r.why.ty().to_string()).or_default() += 1;
        }
    };
    let mut items = prepared.into_iter();
    let in_order = std::iter::from_fn(|| {
        for item in items.by_ref() {
            let mut t = tally.borrow_mut();
            match item {
                Err(e) => return Some(Err(e)),
                Ok(Prepared::NoHeader { doc, changes }) => {
                    t.rejected += changes;
                    if crate::ratelog::REFUSALS.allow(&peer) {
                        tracing::warn!(%peer, %doc, "rejected changes to a document sent without its header");
                    }
                }
                Ok(Prepared::Refused(refused)) => refuse(&mut t, refused),
                Ok(Prepared::Arrived(arrived, refused, _, _)) => {
                    refuse(&mut t, refused);
                    let Arrived {
                        mut received,
                        doc,
                        rejected,
                        duplicates,
                        poisoned: _,
                    } = *arrived;
                    if faults.drop_held {
                        received.held.clear();
                    }
                    // Released changes free room only if they were this peer's; counting
                    // them all would only make the quota looser, never lose a change.
                    held_changes = held_changes.saturating_sub(received.released.len() as u64);
                    let mut keep = 0;
                    for (change, _) in &received.held {
                        let len = change.bytes.len() as u64;
                        if held_changes >= MAX_HELD_CHANGES_PER_PEER
                            || held_bytes + len > MAX_HELD_BYTES_PER_PEER
                        {
                            break;
                        }
                        held_changes += 1;
                        held_bytes += len;
                        keep += 1;
                    }
                    if keep < received.held.len() {
                        let n = received.held.len() - keep;
                        tracing::warn!(%peer, doc = %received.doc_id, refused = n, "the peer's quota of held changes is full; they will be asked for again");
                        room_refused += n as u64;
                        received.held.truncate(keep);
                    }
                    for (hash, reason) in &rejected {
                        if crate::ratelog::REFUSALS.allow(&peer) {
                            tracing::warn!(%peer, doc = %received.doc_id, %hash, %reason, "rejected a change");
                        }
                    }
                    t.rejected += rejected.len() as u64;
                    t.applied += received.applied.len() as u64;
                    t.held += received.held.len() as u64;
                    t.duplicates += duplicates;
                    if let Some(r) = &received.record
                        && crate::model::is_collision_name(&r.local_id, &received.doc_id)
                    {
                        tracing::warn!(%peer, doc = %received.doc_id, ty = %r.ty, id = %r.id, local = %r.local_id, "another document already has this name here; stored under its own name");
                    }
                    if let Some(doc) = doc {
                        t.docs.push((received.doc_id, doc));
                    }
                    return Some(Ok(received));
                }
            }
        }
        None
    });
    // The claim is decided after the documents are read, so the iterator is drained first
    // into the documents to commit (they are already in memory; this copies no state).
    let docs: Vec<Result<crate::model::ReceivedDoc, StoreError>> = in_order.collect();
    let claim = if room_refused > 0 { None } else { claim };
    let (last_seq, moved) =
        store.commit_received(&peer, claim, now, room_refused, docs.into_iter(), |r| {
            let t = tally.borrow();
            r.changes_in += t.applied + t.held;
            r.rejected += rejected_before + t.rejected;
            r.duplicates += duplicates_before + t.duplicates;
            for (ty, n) in &t.rejected_types {
                *r.rejected_types.entry(ty.clone()).or_default() += n;
            }
            if let Some(kept) = forgotten {
                r.received = kept;
                r.ahead.clear();
            } else if let (true, Some(c)) = (faults.checkpoint_skips_gaps, claim) {
                r.received = c.upto;
                r.ahead.clear();
            }
        })?;
    let mut written = tally.into_inner();
    written.last_seq = last_seq;
    written.moved = moved;
    written.refused_for_room = room_refused;
    Ok(written)
}

/// Test-only fault: alter a change this node did not author, keeping it decodable, as a
/// dishonest relay would.
fn tamper_if_relayed(change: &mut SignedChange, me: &NodeId) {
    let Ok(decoded) = Change::from_bytes(change.bytes.clone()) else {
        return;
    };
    if NodeId::from_actor(decoded.actor_id().to_bytes()) == Some(*me) {
        return;
    }
    if let Some(last) = change.bytes.last_mut() {
        *last ^= 0x01;
    }
    if let Ok(altered) = Change::from_bytes(change.bytes.clone()) {
        let hash = altered.hash();
        change.bytes[4..8].copy_from_slice(&hash.0[..4]);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::{Value as Json, json};
    use std::collections::VecDeque;
    use tidesync_proto::{ObjectId, TypeName};

    fn core(secret: u8, name: &str) -> Core {
        Core::in_memory(secret, name)
    }

    fn put(c: &mut Core, id: &str, v: Json) {
        let (t, i) = (TypeName::new("Sample").unwrap(), ObjectId::new(id).unwrap());
        c.put(&t, &i, v.as_object().unwrap()).unwrap();
    }

    fn get(c: &mut Core, id: &str) -> Option<Json> {
        let (t, i) = (TypeName::new("Sample").unwrap(), ObjectId::new(id).unwrap());
        c.get(&t, &i).ok().map(Json::Object)
    }

    /// Deliver every request and response until nothing is left; links are (a, b) index pairs.
    fn settle(cores: &mut [Core], mut queue: VecDeque<(usize, Outgoing)>) -> usize {
        let mut delivered = 0;
        while let Some((from, (to_node, msg))) = queue.pop_front() {
            let to = cores.iter().position(|c| c.node_id() == to_node).unwrap();
            if cores[to].session(&cores[from].node_id()).is_none() {
                continue;
            }
            delivered += 1;
            queue.extend(deliver_one(cores, (from, (to_node, msg))));
        }
        delivered
    }

    /// Connect cores `a` and `b`: the Hellos each sends, to deliver.
    pub(crate) fn connect(cores: &mut [Core], a: usize, b: usize) -> VecDeque<(usize, Outgoing)> {
        let (na, nb) = (cores[a].node_id(), cores[b].node_id());
        let mut q = VecDeque::new();
        q.extend(
            cores[a]
                .on_connected(nb)
                .unwrap()
                .into_iter()
                .map(|o| (a, o)),
        );
        q.extend(
            cores[b]
                .on_connected(na)
                .unwrap()
                .into_iter()
                .map(|o| (b, o)),
        );
        q
    }

    /// What core `i` sends after a local write, to deliver.
    pub(crate) fn push(cores: &mut [Core], i: usize) -> VecDeque<(usize, Outgoing)> {
        cores[i]
            .pump_all()
            .unwrap()
            .into_iter()
            .map(|o| (i, o))
            .collect()
    }

    #[test]
    fn two_nodes_converge_both_ways_with_concurrent_edits() {
        let mut cores = vec![core(1, "a"), core(2, "b")];
        put(&mut cores[0], "S-A", json!({"from": "a"}));
        put(&mut cores[1], "S-B", json!({"from": "b"}));
        let q = connect(&mut cores, 0, 1);
        settle(&mut cores, q);
        assert_eq!(get(&mut cores[1], "S-A"), Some(json!({"from": "a"})));
        assert_eq!(get(&mut cores[0], "S-B"), Some(json!({"from": "b"})));
        // Concurrent edits of one object on both sides, pushed at the same time.
        put(&mut cores[0], "S-A", json!({"x": 1, "same": "a"}));
        put(&mut cores[1], "S-A", json!({"y": 2, "same": "b"}));
        let mut q = push(&mut cores, 0);
        q.extend(push(&mut cores, 1));
        settle(&mut cores, q);
        let a = get(&mut cores[0], "S-A").unwrap();
        assert_eq!(Some(a.clone()), get(&mut cores[1], "S-A"));
        assert_eq!((a["x"].clone(), a["y"].clone()), (json!(1), json!(2)));
        // Nothing is echoed back: each side stored each change once.
        let rec = cores[0].store.peer(&cores[1].node_id()).unwrap();
        assert_eq!(rec.duplicates, 0);
    }

    /// What core `i` wants sent, queued for `settle`.
    fn from(i: usize, out: Result<Vec<Outgoing>, SyncError>) -> VecDeque<(usize, Outgoing)> {
        out.unwrap().into_iter().map(|o| (i, o)).collect()
    }

    /// Deliver one request from `from`'s queue entry and its response; returns what both
    /// sides want sent next.
    fn deliver_one(
        cores: &mut [Core],
        (from, (to_node, msg)): (usize, Outgoing),
    ) -> VecDeque<(usize, Outgoing)> {
        let to = cores.iter().position(|c| c.node_id() == to_node).unwrap();
        let from_node = cores[from].node_id();
        let (resp, outs) = cores[to].on_request(from_node, msg).unwrap();
        let mut q: VecDeque<_> = outs.into_iter().map(|o| (to, o)).collect();
        let outs = cores[from].on_response(to_node, resp).unwrap();
        q.extend(outs.into_iter().map(|o| (from, o)));
        q
    }

    // Regression (found by the simulation, seed 1): batches travel on separate streams, so the
    // Ack of a later batch can come first. It used to count as acknowledging every earlier
    // batch too, so when an earlier batch was lost and its request failed, sending resumed
    // after the later one and the lost batch's changes never reached the peer while the
    // connection stayed up.
    #[test]
    fn a_lost_batch_is_resent_even_when_a_later_batch_was_acknowledged() {
        let mut cores = vec![core(1, "a"), core(2, "b")];
        let q = connect(&mut cores, 0, 1);
        settle(&mut cores, q);
        put(&mut cores[0], "S-1", json!({"v": 1}));
        let first = push(&mut cores, 0);
        put(&mut cores[0], "S-2", json!({"v": 2}));
        let second = push(&mut cores, 0);
        assert_eq!((first.len(), second.len()), (1, 1), "two batches in flight");
        // The first batch is lost; the second arrives and is acknowledged.
        let q = deliver_one(&mut cores, second.into_iter().next().unwrap());
        settle(&mut cores, q);
        // The first one's request fails: what it carried is sent again.
        let b = cores[1].node_id();
        let q = from(0, cores[0].on_request_failed(b));
        settle(&mut cores, q);
        assert_eq!(get(&mut cores[1], "S-1"), Some(json!({"v": 1})));
        assert_eq!(get(&mut cores[1], "S-2"), Some(json!({"v": 2})));
    }

    // Regression (found by the simulation, seed 8): a Hello whose request failed was never
    // sent again, so the peer never started streaming its log to us on that connection.
    #[test]
    fn a_lost_hello_is_sent_again() {
        let mut cores = vec![core(1, "a"), core(2, "b")];
        put(&mut cores[1], "S-B", json!({"from": "b"}));
        let (a, b) = (cores[0].node_id(), cores[1].node_id());
        let lost = cores[0].on_connected(b).unwrap();
        assert!(matches!(lost[0].1, Message::Hello { .. }));
        let q = from(1, cores[1].on_connected(a));
        settle(&mut cores, q);
        assert_eq!(get(&mut cores[0], "S-B"), None, "b waits for a's Hello");
        let q = from(0, cores[0].on_request_failed(b));
        settle(&mut cores, q);
        assert_eq!(get(&mut cores[0], "S-B"), Some(json!({"from": "b"})));
    }

    #[test]
    fn a_hub_relays_unaltered_and_a_tampering_hub_is_caught() {
        for tamper in [false, true] {
            let mut cores = vec![core(1, "a"), core(2, "hub"), core(3, "b")];
            cores[1].faults.alter_relayed = tamper;
            let mut q = connect(&mut cores, 0, 1);
            q.extend(connect(&mut cores, 1, 2));
            settle(&mut cores, q);
            put(&mut cores[0], "S-1", json!({"v": 1}));
            let q = push(&mut cores, 0);
            settle(&mut cores, q);
            assert_eq!(get(&mut cores[1], "S-1"), Some(json!({"v": 1})));
            let b = cores[2].store.peer(&cores[1].node_id()).unwrap();
            if tamper {
                assert_eq!(get(&mut cores[2], "S-1"), None);
                assert_eq!(b.rejected, 1);
                assert_eq!(cores[2].store.last_seq().unwrap(), 0);
            } else {
                assert_eq!(get(&mut cores[2], "S-1"), Some(json!({"v": 1})));
                let (t, i) = (
                    TypeName::new("Sample").unwrap(),
                    ObjectId::new("S-1").unwrap(),
                );
                let h = cores[2].history(&t, &i).unwrap();
                assert!(h.changes.iter().all(|c| c.verified));
                assert_eq!(h.changes[0].author, cores[0].node_id().to_string());
            }
        }
    }

    #[test]
    fn after_a_disconnection_only_the_difference_crosses() {
        let mut cores = vec![core(1, "a"), core(2, "b")];
        for i in 0..50 {
            put(&mut cores[0], &format!("S-{i}"), json!({"i": i}));
        }
        let q = connect(&mut cores, 0, 1);
        settle(&mut cores, q);
        let b_id = cores[1].node_id();
        let a_id = cores[0].node_id();
        assert_eq!(cores[1].store.peer(&a_id).unwrap().changes_in, 50);
        cores[0].on_disconnected(&b_id);
        cores[1].on_disconnected(&a_id);
        for i in 0..3 {
            put(
                &mut cores[0],
                &format!("S-{i}"),
                json!({"i": i, "again": true}),
            );
        }
        let q = connect(&mut cores, 0, 1);
        settle(&mut cores, q);
        let rec = cores[1].store.peer(&a_id).unwrap();
        assert_eq!(rec.changes_in, 53);
        assert_eq!(rec.duplicates, 0);
        assert_eq!(
            get(&mut cores[1], "S-2"),
            Some(json!({"i": 2, "again": true}))
        );
        // Idle: nothing differs, nothing but the two Hellos crosses.
        cores[0].on_disconnected(&b_id);
        cores[1].on_disconnected(&a_id);
        let q = connect(&mut cores, 0, 1);
        let in_sync = |c: &Core, p: &NodeId| c.session(p).and_then(|s| s.in_sync_after_ms);
        assert_eq!(in_sync(&cores[0], &b_id), None, "in sync before any Hello");
        assert_eq!(settle(&mut cores, q), 2);
        assert!(in_sync(&cores[0], &b_id).is_some());
        assert!(in_sync(&cores[1], &a_id).is_some());
    }

    #[test]
    fn large_logs_stream_in_bounded_batches() {
        let mut cores = vec![core(1, "a"), core(2, "b")];
        for i in 0..(SYNC_BATCH_CHANGES + 10) {
            put(&mut cores[0], &format!("S-{i}"), json!({"i": i}));
        }
        let mut q = connect(&mut cores, 0, 1);
        let mut max_batch = 0;
        // Watch every batch go by.
        while let Some((from, out)) = q.pop_front() {
            if let Message::Changes { changes, .. } = &out.1 {
                max_batch = max_batch.max(changes.len());
            }
            let to = if from == 0 { 1 } else { 0 };
            let (from_id, to_id) = (cores[from].node_id(), cores[to].node_id());
            let (resp, outs) = cores[to].on_request(from_id, out.1).unwrap();
            q.extend(outs.into_iter().map(|o| (to, o)));
            q.extend(
                cores[from]
                    .on_response(to_id, resp)
                    .unwrap()
                    .into_iter()
                    .map(|o| (from, o)),
            );
        }
        assert_eq!(max_batch, SYNC_BATCH_CHANGES);
        assert_eq!(
            cores[1].store.last_seq().unwrap() as usize,
            SYNC_BATCH_CHANGES + 10
        );
        // Every batch moved B's checkpoint of A, up to A's last SEQ.
        let a = cores[0].node_id();
        assert_eq!(
            cores[1].store.peer(&a).unwrap().received.seq as usize,
            SYNC_BATCH_CHANGES + 10
        );
    }

    #[test]
    fn par_map_keeps_every_result_in_order() {
        // Regression: worker results were joined with `unwrap_or_default`, so a panicking
        // worker would have dropped its share of a batch silently; now the panic is resumed.
        let out = par_map((0..1000u32).collect(), |x| x * 2);
        assert_eq!(out, (0..1000u32).map(|x| x * 2).collect::<Vec<_>>());
        let caught = std::panic::catch_unwind(|| {
            par_map((0..1000u32).collect(), |x| {
                if x == 700 { panic!("boom") } else { x }
            })
        });
        assert!(caught.is_err(), "a worker's panic must not be swallowed");
    }

    // Regression: every Hello with a checkpoint we never had, every Rewound and every Hello
    // from the start restarted the stream from the start and read a fresh window of batches at
    // once, so a peer repeating them made us rescan and resend the start of the log over and
    // over. Now a rewound answer and a resend happen once per session, and a restart waits for
    // the batches in flight.
    #[test]
    fn repeated_hellos_and_rewounds_do_not_rescan_the_log_again_and_again() {
        let mut cores = vec![core(1, "a"), core(2, "b")];
        for i in 0..5 {
            put(&mut cores[0], &format!("S-{i}"), json!({"i": i}));
        }
        let q = connect(&mut cores, 0, 1);
        settle(&mut cores, q);
        let b = cores[1].node_id();
        let count = |out: &[Outgoing]| {
            let changes = out
                .iter()
                .filter(|(_, m)| matches!(m, Message::Changes { .. }))
                .count();
            let rewound = out
                .iter()
                .filter(|(_, m)| matches!(m, Message::Rewound { .. }))
                .count();
            (changes, rewound)
        };
        let hello = |number: u64, resume: Checkpoint| Message::Hello {
            number,
            node: b,
            name: "b".into(),
            resume,
            tip: 0,
        };
        let bogus = Checkpoint {
            seq: 999,
            hash: [9; 32],
        };
        let mut out = Vec::new();
        for n in 0..50 {
            out.extend(cores[0].on_request(b, hello(100 + n, bogus)).unwrap().1);
        }
        assert_eq!(count(&out), (1, 1), "one restart and one Rewound");
        let mut out = Vec::new();
        for _ in 0..50 {
            let rewound = Message::Rewound {
                resume: Checkpoint::default(),
            };
            out.extend(cores[0].on_request(b, rewound).unwrap().1);
        }
        assert_eq!(count(&out), (0, 0), "the batch in flight is not read again");
        let mut out = Vec::new();
        for n in 0..50 {
            let from_start = hello(200 + n, Checkpoint::default());
            out.extend(cores[0].on_request(b, from_start).unwrap().1);
        }
        assert_eq!(count(&out), (0, 0), "restarts wait for the batch in flight");
    }

    // The restart a peer asks for while batches are in flight still happens once they are
    // answered, so a peer whose policy widened gets the whole log.
    #[test]
    fn a_restart_asked_for_during_a_window_follows_it() {
        let mut cores = vec![core(1, "a"), core(2, "b")];
        put(&mut cores[0], "S-1", json!({"v": 1}));
        let q = connect(&mut cores, 0, 1);
        settle(&mut cores, q);
        let (a, b) = (cores[0].node_id(), cores[1].node_id());
        put(&mut cores[0], "S-2", json!({"v": 2}));
        let sent = cores[0].pump(b).unwrap();
        assert!(matches!(sent[..], [(_, Message::Changes { .. })]));
        // b asks for everything again while that batch is in flight: nothing more yet.
        let hello = Message::Hello {
            number: 99,
            node: b,
            name: "b".into(),
            resume: Checkpoint::default(),
            tip: 0,
        };
        let (_, out) = cores[0].on_request(b, hello).unwrap();
        assert!(out.is_empty(), "{out:?}");
        // Once the batch is answered, sending starts over from the start of the log.
        let (ack, _) = cores[1].on_request(a, sent[0].1.clone()).unwrap();
        let out = cores[0].on_response(b, ack).unwrap();
        assert!(
            matches!(out[..], [(_, Message::Changes { after: 0, .. })]),
            "{out:?}"
        );
    }

    #[test]
    fn a_sender_restored_from_an_older_copy_starts_over() {
        let mut cores = vec![core(1, "a"), core(2, "b")];
        put(&mut cores[0], "S-1", json!({"v": 1}));
        let q = connect(&mut cores, 0, 1);
        settle(&mut cores, q);
        let (a_id, b_id) = (cores[0].node_id(), cores[1].node_id());
        cores[0].on_disconnected(&b_id);
        cores[1].on_disconnected(&a_id);
        // "Restore" a from before its write: a fresh store with the same key, and a new write.
        cores[0] = core(1, "a");
        put(&mut cores[0], "S-2", json!({"v": 2}));
        let q = connect(&mut cores, 0, 1);
        settle(&mut cores, q);
        assert_eq!(get(&mut cores[1], "S-2"), Some(json!({"v": 2})));
        // And a gets back what it lost, from b.
        assert_eq!(get(&mut cores[0], "S-1"), Some(json!({"v": 1})));
    }
}
