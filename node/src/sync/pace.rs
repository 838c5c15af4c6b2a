//! How much to send one peer at once: the batch size and the window of batches in flight,
//! which shrink when transfers fail and grow back while they succeed, remembered per peer
//! across connections (not across restarts).
//!
//! A link that drops every few hundred KiB used to cut every 8 MiB batch midway, and two such
//! batches interleaved on Yamux, so neither ever completed. Now every failed batch (a request
//! that failed, or a connection that closed with batches in flight) divides the batch size by
//! [`SHRINK_FACTOR`] down to [`MIN_BATCH_BYTES`] and narrows the window to one batch; every
//! [`GROW_AFTER_ACKS`] acknowledged batches double the size back, and the window opens again
//! once the size is whole. A change larger than the current size still goes, alone.

use crate::replica::outbound::SYNC_BATCH_CONTENT_BYTES;

/// Batches in flight at once on a healthy link.
pub const SYNC_WINDOW_BATCHES: usize = 2;
/// Smallest batch the pace shrinks to, in bytes of content (a few ordinary records).
pub const MIN_BATCH_BYTES: usize = 16 * 1024;
/// A failed batch divides the batch size by this.
pub const SHRINK_FACTOR: usize = 4;
/// Acknowledged batches in a row that double the batch size.
pub const GROW_AFTER_ACKS: u32 = 2;

/// The pace of sending to one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pace {
    /// Most content bytes in one batch.
    pub batch_bytes: usize,
    /// Most batches in flight.
    pub window: usize,
    /// Batches acknowledged since the size last changed.
    acks: u32,
}

impl Default for Pace {
    fn default() -> Pace {
        Pace {
            batch_bytes: SYNC_BATCH_CONTENT_BYTES,
            window: SYNC_WINDOW_BATCHES,
            acks: 0,
        }
    }
}

impl Pace {
    /// A batch in flight failed.
    pub fn failed(&mut self) {
        self.batch_bytes = (self.batch_bytes / SHRINK_FACTOR).max(MIN_BATCH_BYTES);
        self.window = 1;
        self.acks = 0;
    }

    /// A batch was acknowledged.
    pub fn acked(&mut self) {
        if *self == Pace::default() {
            return;
        }
        self.acks += 1;
        if self.acks < GROW_AFTER_ACKS {
            return;
        }
        self.acks = 0;
        if self.batch_bytes < SYNC_BATCH_CONTENT_BYTES {
            self.batch_bytes = self
                .batch_bytes
                .saturating_mul(2)
                .min(SYNC_BATCH_CONTENT_BYTES);
        } else {
            self.window = SYNC_WINDOW_BATCHES;
        }
    }

    /// Whether the pace is shrunk below a healthy link's.
    pub fn is_reduced(&self) -> bool {
        *self != Pace::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_shrink_to_the_floor_and_successes_grow_back_to_full() {
        let mut p = Pace::default();
        for _ in 0..20 {
            p.failed();
        }
        assert_eq!((p.batch_bytes, p.window), (MIN_BATCH_BYTES, 1));
        let mut acks = 0;
        while p.is_reduced() {
            p.acked();
            acks += 1;
            assert!(acks < 100, "the pace never recovered");
        }
        assert_eq!(p, Pace::default());
        // From 16 KiB to the whole batch is nine doublings, then the window opens.
        assert_eq!(acks, GROW_AFTER_ACKS as usize * 10);
    }

    #[test]
    fn one_failure_among_successes_does_not_collapse_the_pace() {
        let mut p = Pace::default();
        p.failed();
        let after_one = p.batch_bytes;
        assert_eq!(after_one, SYNC_BATCH_CONTENT_BYTES / SHRINK_FACTOR);
        for _ in 0..GROW_AFTER_ACKS {
            p.acked();
        }
        assert_eq!(p.batch_bytes, after_one * 2);
        assert_eq!(p.window, 1, "the window opens only at the whole size");
    }
}
