//! The cost preview of what would cross to one peer now (`tidesync plan --for PEER`, `export
//! --plan`): changes and bytes (compressed as sent) by the same policy and log scan as a sync,
//! the files those objects refer to, and how long the link's rate, windows and budget make
//! it. Reads only.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};
use tidesync_proto::wire::{Message, frame_bytes};
use tidesync_proto::{DocHeader, DocId, NodeId};

use super::Replica;
use super::outbound::{CHANGES_OVERHEAD_BYTES, Limit, SYNC_BATCH_CONTENT_BYTES, scan_log};
use crate::files::FileHash;
use crate::link::{HeldBack, Link};
use crate::model::DocRecord;
use crate::store::StoreError;

/// Most types a plan lists by name; the rest are added up under [`OTHER_TYPES`].
pub const MAX_PLAN_TYPES: usize = 64;
/// The key under which a plan adds up the types beyond [`MAX_PLAN_TYPES`] (no type name may
/// hold parentheses).
pub const OTHER_TYPES: &str = "(other)";

/// Why a plan could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("no configured peer is called {name:?}")]
    UnknownPeer { name: String },
    #[error("cannot read the store to plan for peer {peer}: {source}")]
    Store { peer: NodeId, source: StoreError },
}

/// One type's share of a plan.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypePlan {
    pub changes: u64,
    pub bytes: u64,
}

/// What would cross to a peer now, and what it costs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub peer: String,
    /// Our log from this SEQ on (the peer's acknowledged SEQ; 0 for everything).
    pub after: u64,
    /// Our log's last SEQ.
    pub tip: u64,
    /// Log changes the policy lets out that the peer did not write or send us.
    pub changes: u64,
    /// Objects those changes belong to.
    pub objects: u64,
    /// Batches they fill at the full batch size.
    pub batches: u64,
    /// Their bytes on the wire: each batch as one frame (changes, document headers and the
    /// batch's own fields), zstd-compressed as the sender sends it.
    pub bytes: u64,
    /// The same batches before compression.
    pub plain_bytes: u64,
    /// Each type's changes and their bytes before compression (with the header of each
    /// object's first change).
    pub types: BTreeMap<String, TypePlan>,
    /// Objects published to the peer as views: they cross as views, not counted above.
    pub views: u64,
    /// Changes too large for any frame: they never cross.
    pub oversized: u64,
    /// Files held here that those objects refer to and the policy lets the peer fetch: the
    /// most it fetches (it may hold some already).
    pub files: u64,
    pub file_bytes: u64,
    /// Files those objects refer to that are not held here (the peer fetches them elsewhere).
    pub files_not_here: u64,
    /// The link's settings, and what they make of it.
    pub link: Link,
    /// Bytes already sent to the peer today (UTC, or the link's zone), against its budget.
    pub sent_today: u64,
    /// Why nothing would go at this moment, if so.
    pub held_back: Option<HeldBack>,
    /// Seconds of sending at the link's max-rate (none without a rate).
    pub send_secs: Option<u64>,
    /// Days (UTC, or the link's zone) it takes under the windows and the budget, today counted (none when the
    /// link carries it all at once).
    pub days: Option<u64>,
}

impl Plan {
    /// Records and files together, in bytes.
    pub fn total_bytes(&self) -> u64 {
        self.bytes.saturating_add(self.file_bytes)
    }

    /// The plan of a bundle that leaves the files out (`export --plan --no-files`).
    pub fn without_files(mut self) -> Plan {
        self.files = 0;
        self.file_bytes = 0;
        self.estimate();
        self
    }

    /// Fill in the time the link's settings make of `total_bytes()`.
    fn estimate(&mut self) {
        let total = self.total_bytes();
        self.send_secs = self.link.max_rate.map(|rate| total.div_ceil(rate.max(1)));
        let mut days: Option<u64> = None;
        if let Some(secs) = self.send_secs
            && !self.link.windows.is_empty()
        {
            let open_secs = self.link.open_minutes_per_day().max(1) * 60;
            days = Some(secs.div_ceil(open_secs).max(1));
        }
        if let Some(budget) = self.link.budget.filter(|b| *b > 0) {
            let room_today = budget.saturating_sub(self.sent_today);
            let by_budget = if total <= room_today {
                1
            } else {
                1 + (total - room_today).div_ceil(budget)
            };
            days = Some(days.unwrap_or(1).max(by_budget));
        }
        self.days = days;
    }
}

impl Replica {
    /// What would cross to the configured peer `name` now (everything the policy lets out
    /// with `all`, as `export --all` would): see [`Plan`].
    pub fn plan(&self, name: &str, all: bool) -> Result<Plan, PlanError> {
        let peer = self
            .policies
            .named(name)
            .ok_or_else(|| PlanError::UnknownPeer { name: name.into() })?;
        let err = |source| PlanError::Store { peer, source };
        let record = self.store.peer(&peer).map_err(err)?;
        let tip = self.store.last_seq().map_err(err)?;
        let after = if all || record.resend_all {
            0
        } else {
            record.acked.min(tip)
        };
        let policy = self.policies.of(&peer);
        let by_ref = self.store.by_ref(&peer).map_err(err)?;
        // What the peer acknowledged ahead of log order (its priority types) it holds.
        let ahead = if all {
            Default::default()
        } else {
            self.store.sent_ahead(&peer).map_err(err)?
        };
        let mut plan = Plan {
            peer: name.to_string(),
            after,
            tip,
            link: policy.link.clone(),
            ..Plan::default()
        };
        let mut objects: HashSet<DocId> = HashSet::new();
        let mut views: HashSet<DocId> = HashSet::new();
        let mut cursor = after;
        while cursor < tip {
            let reader = self.store.reader().map_err(err)?;
            let skip_entry = super::outbound::left_out(peer, false, &ahead);
            let skip_doc = |_: u64, doc: &DocId, rec: &DocRecord| {
                if policy.publishes_view(&rec.ty) {
                    views.insert(*doc);
                }
                !self.policies.may_send(&peer, rec, by_ref.contains(doc))
            };
            let batch = scan_log(
                &reader,
                cursor,
                Limit::soft(SYNC_BATCH_CONTENT_BYTES),
                skip_entry,
                skip_doc,
            )
            .map_err(err)?;
            drop(reader);
            if batch.upto.seq <= cursor {
                break;
            }
            let after = cursor;
            cursor = batch.upto.seq;
            plan.oversized += batch.oversized.len() as u64;
            if batch.changes.is_empty() {
                continue;
            }
            plan.batches += 1;
            plan.plain_bytes += (batch.bytes + CHANGES_OVERHEAD_BYTES) as u64;
            plan.changes += batch.changes.len() as u64;
            let headers: HashMap<DocId, &DocHeader> =
                batch.docs.iter().map(|h| (h.doc, h)).collect();
            for change in &batch.changes {
                let Some(h) = headers.get(&change.doc) else {
                    continue;
                };
                let mut bytes = crate::model::change_wire_bytes(change) as u64;
                if !objects.contains(&change.doc) {
                    bytes += crate::model::header_wire_bytes(h) as u64;
                }
                let ty = h.ty.as_str();
                let key = if plan.types.contains_key(ty) || plan.types.len() < MAX_PLAN_TYPES - 1 {
                    ty.to_string()
                } else {
                    OTHER_TYPES.to_string()
                };
                let t = plan.types.entry(key).or_default();
                t.changes += 1;
                t.bytes += bytes;
                objects.insert(change.doc);
            }
            // The frame as the sender would send it, compression included.
            plan.bytes += frame_bytes(&Message::Changes {
                batch: 1,
                after,
                docs: batch.docs,
                changes: batch.changes,
                upto: batch.upto,
                tip,
            }) as u64;
        }
        plan.objects = objects.len() as u64;
        plan.views = views.len() as u64;
        let mut files: HashSet<FileHash> = HashSet::new();
        for doc in &objects {
            for (hash, size) in self.store.doc_files(doc).map_err(err)? {
                if !policy.moves_file(size) || !files.insert(hash) {
                    continue;
                }
                match self.store.file(&hash) {
                    Ok(Some((_, row))) if row.size == size => {
                        plan.files += 1;
                        plan.file_bytes += size;
                    }
                    _ => plan.files_not_here += 1,
                }
            }
        }
        let now = self.now_ms();
        if !policy.link.is_open_always() {
            let meter = self.store.meter(&peer).map_err(err)?;
            plan.sent_today = meter.on_day(policy.link.day(now)).bytes;
            plan.held_back = policy.link.held_back(meter, i64::MIN, now);
        }
        plan.estimate();
        Ok(plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_estimate_counts_the_rate_the_windows_and_the_budget() {
        let mut plan = Plan {
            bytes: 900_000,
            file_bytes: 100_000,
            ..Plan::default()
        };
        plan.estimate();
        assert_eq!((plan.send_secs, plan.days), (None, None), "an open link");
        plan.link.max_rate = Some(1_000);
        plan.estimate();
        assert_eq!(plan.send_secs, Some(1_000));
        assert_eq!(plan.days, None);
        // 1,000 s of sending through 10 minutes a day: two days.
        plan.link.windows = vec![crate::link::Window::try_from("02:00-02:10".to_string()).unwrap()];
        plan.estimate();
        assert_eq!(plan.days, Some(2));
        // A budget of 300 kB a day with 100 kB sent today: 200 kB today, then 300 kB a day.
        plan.link.windows.clear();
        plan.link.budget = Some(300_000);
        plan.sent_today = 100_000;
        plan.estimate();
        assert_eq!(plan.days, Some(1 + 3));
        // A bundle without its files: 900 kB, 200 kB today then 300 kB a day.
        let plan = Plan { files: 4, ..plan }.without_files();
        assert_eq!((plan.files, plan.file_bytes), (0, 0));
        assert_eq!((plan.send_secs, plan.days), (Some(900), Some(1 + 3)));
    }
}
