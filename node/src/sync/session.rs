//! One connected peer's session: where sending stands, the batches in flight, and what each
//! side has answered. Pure bookkeeping: no store, no clock but the one handed in.

use std::collections::{BTreeSet, VecDeque};

use tidesync_proto::DocId;

/// One connected peer's session.
#[derive(Debug, Clone)]
pub struct Session {
    /// When the session started, Unix milliseconds.
    pub since_ms: i64,
    /// The peer's last SEQ, as it last told us.
    pub remote_tip: u64,
    /// Whether the peer's Hello arrived, so that we know where to start sending.
    pub(super) streaming: bool,
    /// The last entry of our log scanned for this peer.
    pub(super) cursor: u64,
    /// The checkpoint the peer will hold once every sent batch is stored.
    pub(super) sent_upto: u64,
    /// Sent batches not yet acknowledged together with every batch before them, oldest
    /// first.
    pub(super) inflight: VecDeque<Inflight>,
    /// The end of the last batch acknowledged with every batch before it: where sending
    /// resumes when a request fails. A later batch's Ack does not move it past an earlier
    /// batch that is still unanswered (that one may be lost).
    pub(super) acked_upto: u64,
    /// The highest batch number received from the peer in this session.
    pub(super) newest_batch_in: u64,
    /// Whether a restart the peer asked for (Hello, Rewound) was applied in this session:
    /// later ones may move sending back, never forward past what was sent (see
    /// [`Session::restart_on_request`]).
    pub(super) restarted: bool,
    /// The number of the last batch sent in this session. Never reused, even when sending
    /// restarts, so that a late Ack for an abandoned batch matches nothing.
    pub(super) last_batch: u64,
    /// Send everything, including what the peer authored or sent us: the peer was restored
    /// from an older copy and asked for it.
    pub(super) unfiltered: bool,
    /// Whether the peer answered our latest Hello.
    pub(super) hello_answered: bool,
    /// The number of our latest Hello.
    pub(super) hello: u64,
    /// Whether we are sending our whole log again after the peer's policy widened; the
    /// stored `resend_all` flag is cleared only once all of it is acknowledged, so a
    /// connection lost midway starts the resend over instead of skipping what it missed.
    pub(super) resending: bool,
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
    pub(super) restart_wanted: Option<u64>,
    /// Whether a Hello with a checkpoint we never had already made us send `Rewound` and
    /// start over in this session. A restored node reconnects, so once per session suffices.
    pub(super) rewound_sent: bool,
    /// Whether the peer answered our `Rewound`; until then a failed request sends it again.
    pub(super) rewound_answered: bool,
    /// Whether the peer's `Rewound` already made us resend our log to it, unfiltered, in this
    /// session; later ones in the same session are acknowledged and ignored.
    pub(super) resend_granted: bool,
    /// Why nothing more goes to the peer now, when its link settings say so.
    pub held_back: Option<crate::link::HeldBack>,
    /// The transport the session's connection runs over, once the network said.
    pub via: Option<crate::link::Transport>,
    /// The last entry of our log scanned for the peer's priority types (see
    /// [`tidesync_proto::Message::Ahead`]); never behind `cursor` when sending.
    pub(super) ahead_cursor: u64,
    /// `Ahead` batches in flight: each one's number and the SEQs of the log entries it
    /// carries.
    pub(super) ahead_inflight: Vec<(u64, Vec<u64>)>,
    /// Entries of our log the peer acknowledged storing ahead of its checkpoint (as the
    /// store's `sent_ahead_v1` holds them, loaded when the session starts): batches in log
    /// order leave them out.
    pub(super) sent_ahead: BTreeSet<u64>,
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
            batch_bytes: 0,
            window: 0,
            held_back: self.held_back,
            via: self.via,
        }
    }

    pub(super) fn new(now_ms: i64) -> Session {
        Session {
            since_ms: now_ms,
            remote_tip: 0,
            streaming: false,
            cursor: 0,
            sent_upto: 0,
            inflight: VecDeque::new(),
            acked_upto: 0,
            last_batch: 0,
            hello: 0,
            newest_batch_in: 0,
            restarted: false,
            resending: false,
            unfiltered: false,
            hello_answered: false,
            in_sync_after_ms: None,
            stalled: false,
            restart_wanted: None,
            rewound_sent: false,
            rewound_answered: false,
            held_back: None,
            via: None,
            resend_granted: false,
            ahead_cursor: 0,
            ahead_inflight: Vec::new(),
            sent_ahead: BTreeSet::new(),
        }
    }

    /// The peer asked us to send again from `seq`: at once when nothing is in flight,
    /// otherwise once the batches in flight are answered (see [`Session::restart_wanted`]).
    pub(super) fn restart_on_request(&mut self, seq: u64) {
        let seq = self.restart_wanted.take().map_or(seq, |w| w.min(seq));
        if self.in_flight() == 0 {
            self.restart_requested(seq);
        } else {
            self.restart_wanted = Some(seq);
        }
    }

    /// Apply a restart the peer asked for. The first of a session starts where the peer
    /// stands; a later one never moves sending forward past what was sent: requests are not
    /// delivered in order, and an older Hello that arrives after a newer one (seed 1022)
    /// would skip what the newer one asked for, a stretch never announced, and leave the
    /// peer's checkpoint behind a gap. Going back costs duplicates at most.
    fn restart_requested(&mut self, seq: u64) {
        let seq = if self.restarted {
            seq.min(self.sent_upto)
        } else {
            seq
        };
        self.restarted = true;
        self.restart_from(seq);
    }

    /// Apply a restart the peer asked for once nothing is in flight; whether sending may go
    /// on (no restart still waits).
    pub(super) fn apply_wanted_restart(&mut self) -> bool {
        match self.restart_wanted {
            Some(seq) if self.in_flight() == 0 => {
                self.restart_wanted = None;
                self.restart_requested(seq);
                true
            }
            Some(_) => false,
            None => true,
        }
    }

    /// Start sending again from `seq`, forgetting every batch in flight (the priority pass
    /// scans again from there too: what the peer acknowledged ahead stays left out).
    pub(super) fn restart_from(&mut self, seq: u64) {
        self.cursor = seq;
        self.sent_upto = seq;
        self.acked_upto = seq;
        self.inflight.clear();
        self.ahead_cursor = seq;
        self.ahead_inflight.clear();
    }

    /// Batches in flight, in log order or ahead of it: what the window counts.
    pub(super) fn in_flight(&self) -> usize {
        self.inflight.len() + self.ahead_inflight.len()
    }

    /// Note the first moment the session is in sync, `now_ms` being the time.
    pub(super) fn mark_in_sync(&mut self, last: u64, now_ms: i64) {
        if self.in_sync_after_ms.is_none()
            && self.streaming
            && self.hello_answered
            && self.in_flight() == 0
            && self.cursor >= last
        {
            self.in_sync_after_ms = Some(now_ms - self.since_ms);
        }
    }
}

/// One sent batch awaiting its Ack.
#[derive(Debug, Clone)]
pub(super) struct Inflight {
    /// The batch's number in its session: its Ack names it.
    pub(super) batch: u64,
    /// The batch's `upto`: where the peer's checkpoint stands once it and all before it
    /// are stored.
    pub(super) upto: u64,
    pub(super) changes: u64,
    pub(super) answered: bool,
    /// The views it carries, with how many of each view's changes the peer then holds.
    pub(super) views: Vec<(DocId, u64)>,
    /// The owed referenced objects it carries (see [`crate::store::Store::owed_refs`]).
    pub(super) owed: Vec<DocId>,
}
