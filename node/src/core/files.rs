//! The core's side of moving files: the fetcher over the want-list, which segments to ask
//! for, what peers may be served, and progress saved to the store. Decoding, encoding and
//! moving files happen in the shell, off the node actor.

use tidesync_proto::NodeId;
use tidesync_proto::files::FileAsk;

use super::Core;
use crate::files::FileHash;
use crate::model::FilesStatus;
use crate::store::{FileError, Store, StoreError};
use crate::sync::fetch::{Outcome, Progress};

impl Core {
    /// Start tracking the stored want-list (at start: downloads carry on where they were).
    pub fn load_wants(&mut self) -> Result<usize, StoreError> {
        let wants = self.replica.store().wants()?;
        let n = wants.len();
        for w in wants {
            self.fetcher.want(w);
        }
        Ok(n)
    }

    /// The segment asks to send now (files newly wanted by the last commits included).
    pub fn file_asks(&mut self, now_ms: i64) -> Vec<(NodeId, FileAsk)> {
        for w in self.replica.take_new_wants() {
            self.fetcher.want(w);
        }
        self.fetcher.plan(now_ms)
    }

    /// What became of a segment asked of `peer`.
    pub fn file_answered(&mut self, peer: NodeId, ask: &FileAsk, outcome: Outcome, now_ms: i64) {
        if let Outcome::Corrupt(why) = &outcome {
            tracing::warn!(%peer, file = %FileHash(ask.hash), segment = ask.segment, error = %why, "a peer sent a file segment that does not verify; asking another peer");
        }
        self.fetcher.answered(peer, ask, outcome, now_ms);
    }

    /// Files whose every segment is in, to move into place (each handed out once).
    pub fn files_complete(&mut self) -> Vec<(FileHash, u64)> {
        self.fetcher.complete()
    }

    /// Moving a complete download into place ended: stored, or failed on our side.
    pub fn file_finished(&mut self, hash: &FileHash, result: Result<(), FileError>, now_ms: i64) {
        match result {
            Ok(()) => {
                tracing::info!(file = %hash, "file stored");
                self.fetcher.forget(hash);
            }
            Err(e) => {
                tracing::error!(file = %hash, error = %e, "could not store a downloaded file; trying again");
                self.fetcher.finish_failed(hash, e.to_string(), now_ms);
            }
        }
    }

    /// Save what downloads achieved: each changed download is synced, then its progress
    /// recorded, so a recorded segment is always on disk. Files no longer wanted (their last
    /// reference went) are dropped with their downloads.
    pub fn save_file_progress(&mut self) -> Result<(), FileError> {
        let progress = self.take_file_progress()?;
        persist_file_progress(self.replica.store(), &progress)
    }

    /// What downloads achieved since the last call, for [`persist_file_progress`]. Files no
    /// longer wanted (their last reference went) are dropped with their downloads here.
    pub fn take_file_progress(&mut self) -> Result<Vec<Progress>, FileError> {
        let progress = self.fetcher.take_progress();
        let store = self.replica.store();
        let mut kept = Vec::with_capacity(progress.len());
        for (hash, done, error) in progress {
            if store.want(&hash)?.is_none() {
                self.fetcher.forget(&hash);
                if store.file(&hash)?.is_none() {
                    store.drop_download(&hash)?;
                }
                continue;
            }
            kept.push((hash, done, error));
        }
        Ok(kept)
    }

    /// Bring the downloads in step with the stored want-list, which others write too (an
    /// upload stores a wanted file, a scrub wants a rotted one again): stop fetching what is
    /// no longer on it, removing its download, and start on what is new.
    pub fn reconcile_wants(&mut self) -> Result<(), FileError> {
        let store = self.replica.store();
        let stored = store.wants()?;
        let wanted: std::collections::HashSet<FileHash> = stored.iter().map(|w| w.hash).collect();
        for (row, _, _, _) in self.fetcher.wanted() {
            if !wanted.contains(&row.hash) {
                self.fetcher.forget(&row.hash);
                store.drop_download(&row.hash)?;
            }
        }
        for row in stored {
            if !self.fetcher.is_wanted(&row.hash) {
                self.fetcher.want(row);
            }
        }
        Ok(())
    }

    /// Whether `peer` may be served what it asks (see [`crate::replica::Replica::may_serve_file`]).
    pub fn may_serve_file(&self, peer: NodeId, ask: &FileAsk) -> Result<bool, StoreError> {
        self.replica
            .may_serve_file(peer, &FileHash(ask.hash), ask.size)
    }

    /// `bytes` of a file were served to `peer` (for status), of which `granted` were counted
    /// against its budget when the segment was granted: the rest are counted now.
    pub fn file_served(&mut self, peer: NodeId, bytes: u64, granted: u64) {
        self.fetcher.served(peer, bytes);
        self.meter_file_bytes(peer, bytes.saturating_sub(granted));
    }

    fn meter_file_bytes(&self, peer: NodeId, bytes: u64) {
        let link = &self.replica.policy(&peer).link;
        if bytes > 0
            && link.budget.is_some()
            && let Err(e) = self
                .store()
                .meter_sent(&peer, link.day(self.replica.now_ms()), bytes)
        {
            tracing::error!(%peer, error = %e, "could not count served file bytes against the budget");
        }
    }

    /// Whether a file segment may be served to `peer` now, and if so the bytes counted
    /// against its budget at once (the segment's content size), so that segments granted
    /// together cannot overrun it; `None` while it waits: its windows, budget or rate, or
    /// record changes still to go first (see [`crate::sync::Sessions::files_wait`]). A
    /// segment that then fails to go stays counted.
    pub fn grant_segment(&mut self, peer: NodeId, ask: &FileAsk) -> Option<u64> {
        let start = ask
            .segment
            .saturating_mul(tidesync_proto::files::SEGMENT_BYTES);
        let bytes = ask
            .size
            .saturating_sub(start)
            .min(tidesync_proto::files::SEGMENT_BYTES);
        let waits = self
            .sessions
            .files_wait(&self.replica, peer, bytes)
            .unwrap_or_else(|e| {
                tracing::error!(%peer, error = %e, "could not read the link's meter; holding files back");
                true
            });
        if waits {
            return None;
        }
        self.meter_file_bytes(peer, bytes);
        Some(bytes)
    }

    /// A read waits for `hash`: fetch it now, even under `on-demand`. Whether it is wanted.
    pub fn request_file(&mut self, hash: &FileHash) -> bool {
        for w in self.replica.take_new_wants() {
            self.fetcher.want(w);
        }
        self.fetcher.request(hash)
    }

    /// Whether `hash` is on the want-list being fetched.
    pub fn is_fetching(&self, hash: &FileHash) -> bool {
        self.fetcher.is_wanted(hash)
    }

    /// The want-list and each peer's transfers, for status.
    pub fn files_status(&self) -> FilesStatus {
        let wanted = self.fetcher.wanted();
        FilesStatus {
            wanted: wanted.len() as u64,
            missing_bytes: wanted
                .iter()
                .map(|(row, done, _, _)| {
                    row.size
                        .saturating_sub(done.saturating_mul(tidesync_proto::files::SEGMENT_BYTES))
                })
                .sum(),
            peers: self
                .fetcher
                .peers()
                .into_iter()
                .map(|(id, p)| (id.to_string(), p))
                .collect(),
        }
    }
}

/// Make each download in `progress` durable, then record its progress, so a recorded segment
/// is always on disk. Blocks on the disk: the node runs it off its actor. A download finished
/// or dropped meanwhile is skipped (only existing want-list rows are updated).
pub fn persist_file_progress(store: &Store, progress: &[Progress]) -> Result<(), FileError> {
    if progress.is_empty() {
        return Ok(());
    }
    for (hash, _, _) in progress {
        store.sync_download(hash)?;
    }
    store.save_want_progress(progress)?;
    Ok(())
}
