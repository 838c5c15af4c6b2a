//! The node actor's part of the fleet view: it makes, signs and sends its status record when
//! the status changed, at most once per `fleet.status-interval-secs`, and sends the last one
//! to each peer as it connects.

use tidesync_proto::NodeId;
use tidesync_proto::fleet::{SignedStatus, StatusRecord};

use super::{NodeActor, now};

/// What the actor last published.
#[derive(Debug, Default)]
pub(super) struct Published {
    record: Option<StatusRecord>,
    signed: Option<SignedStatus>,
    at_ms: i64,
}

impl NodeActor {
    /// Publish the status record if it changed and the interval has passed.
    pub(super) fn on_fleet_tick(&mut self) {
        let now = now();
        let interval_ms = self
            .config
            .fleet
            .status_interval_secs
            .saturating_mul(1000)
            .min(i64::MAX as u64) as i64;
        if self.published.signed.is_some() && now - self.published.at_ms < interval_ms {
            return;
        }
        let mut status = match self.core.status(&self.config.peers) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "could not read our status for our peers");
                return;
            }
        };
        status.files = self.core.files_status();
        let record = self.core.status_record(&status, now);
        let unchanged = self.published.record.as_ref().is_some_and(|last| {
            StatusRecord {
                made_ms: last.made_ms,
                ..record.clone()
            } == *last
        });
        if unchanged {
            return;
        }
        let Some(signed) = self.core.sign_status(&record) else {
            return;
        };
        self.core.send_status(&signed, None);
        self.published = Published {
            record: Some(record),
            signed: Some(signed),
            at_ms: now,
        };
    }

    /// A peer connected: it gets our last record at once, and the others' it relays.
    pub(super) fn send_status_to(&mut self, peer: NodeId) {
        if let Some(signed) = self.published.signed.clone() {
            self.core.send_status(&signed, Some(peer));
        }
        self.core.send_relayed_to(peer);
    }
}
