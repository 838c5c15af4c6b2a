//! Per-peer rate limits for log lines that a peer can provoke at will (refused changes).

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use tidesync_proto::NodeId;

/// Refusal lines logged per peer in one [`REFUSAL_LOG_INTERVAL_SECS`]; further refusals in
/// that interval are only counted (`status` counts every one of them anyway), and the number
/// left out is logged when the next interval starts.
pub const REFUSAL_LOG_LINES_PER_INTERVAL: u32 = 20;
/// The length of one refusal-logging interval, in seconds.
pub const REFUSAL_LOG_INTERVAL_SECS: u64 = 60;
/// Most peers whose logging intervals are remembered; past it the table starts afresh (a
/// peer is a configured peer or a bundle's exporter, so this is never reached in practice).
pub const MAX_RATE_LIMITED_PEERS: usize = 1_024;

/// One peer's current interval.
#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    lines: u32,
    left_out: u64,
}

/// Counts log lines per peer and interval.
#[derive(Debug)]
pub struct LogLimiter {
    what: &'static str,
    per_interval: u32,
    interval: Duration,
    windows: Mutex<HashMap<NodeId, Window>>,
}

/// The limiter of the lines about changes refused from a peer (by policy or verification).
pub static REFUSALS: LazyLock<LogLimiter> = LazyLock::new(|| {
    LogLimiter::new(
        "refused-change",
        REFUSAL_LOG_LINES_PER_INTERVAL,
        Duration::from_secs(REFUSAL_LOG_INTERVAL_SECS),
    )
});

impl LogLimiter {
    pub fn new(what: &'static str, per_interval: u32, interval: Duration) -> LogLimiter {
        LogLimiter {
            what,
            per_interval,
            interval,
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// Whether one more line about `peer` may be logged now.
    pub fn allow(&self, peer: &NodeId) -> bool {
        self.allow_at(peer, Instant::now())
    }

    fn allow_at(&self, peer: &NodeId, now: Instant) -> bool {
        // A poisoned lock only means another thread panicked while counting: keep counting.
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        if windows.len() >= MAX_RATE_LIMITED_PEERS && !windows.contains_key(peer) {
            windows.clear();
        }
        let w = windows.entry(*peer).or_insert(Window {
            start: now,
            lines: 0,
            left_out: 0,
        });
        if now.saturating_duration_since(w.start) >= self.interval {
            if w.left_out > 0 {
                tracing::warn!(%peer, left_out = w.left_out, lines = self.what, "log lines about this peer were left out in the last interval (status counts them all)");
            }
            *w = Window {
                start: now,
                lines: 0,
                left_out: 0,
            };
        }
        if w.lines < self.per_interval {
            w.lines += 1;
            if w.lines == self.per_interval {
                tracing::warn!(%peer, lines = self.what, interval_secs = self.interval.as_secs(), "log limit reached for this peer: further such lines in this interval are only counted");
            }
            true
        } else {
            w.left_out += 1;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_peer_gets_a_few_lines_per_interval() {
        let limiter = LogLimiter::new("test", 3, Duration::from_secs(60));
        let (a, b) = (NodeId([1; 32]), NodeId([2; 32]));
        let t0 = Instant::now();
        let allowed = (0..1000).filter(|_| limiter.allow_at(&a, t0)).count();
        assert_eq!(allowed, 3);
        assert!(limiter.allow_at(&b, t0), "another peer has its own budget");
        assert!(!limiter.allow_at(&a, t0 + Duration::from_secs(59)));
        assert!(
            limiter.allow_at(&a, t0 + Duration::from_secs(60)),
            "a new interval"
        );
    }
}
