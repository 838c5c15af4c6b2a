//! What the node actor measures for `GET /metrics` and status: each peer's sync bytes, and the
//! time local writes and received batches take.

use std::time::Instant;

use tidesync_proto::NodeId;
use tidesync_proto::wire::{Message, frame_bytes};

use super::NodeActor;
use crate::core::Core;

/// Sync frame bytes from and to one peer, since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl NodeActor {
    /// Count a frame `peer` sent us.
    pub(super) fn count_in(&mut self, peer: &NodeId, msg: &Message) {
        let t = self.traffic.entry(*peer).or_default();
        t.bytes_in = t.bytes_in.saturating_add(frame_bytes(msg) as u64);
    }

    /// Count a frame we send `peer`.
    pub(super) fn count_out(&mut self, peer: &NodeId, msg: &Message) {
        let t = self.traffic.entry(*peer).or_default();
        t.bytes_out = t.bytes_out.saturating_add(frame_bytes(msg) as u64);
    }

    /// Run a local write and observe how long it took.
    pub(super) fn timed<T>(&mut self, write: impl FnOnce(&mut Core) -> T) -> T {
        let started = Instant::now();
        let result = write(&mut self.core);
        self.timers.write.observe(started.elapsed().as_secs_f64());
        result
    }

    /// Observe the stages of the batches received since the last call.
    pub(super) fn observe_batches(&mut self) {
        for t in self.core.take_timings() {
            self.timers.batch_verify.observe(t.verify.as_secs_f64());
            self.timers.batch_apply.observe(t.apply.as_secs_f64());
            self.timers.batch_commit.observe(t.commit.as_secs_f64());
        }
    }
}
