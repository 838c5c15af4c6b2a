//! The node actor's file work: segments served and decoded off the actor, finished
//! downloads moved into place, progress saved, the files' status published, and bundles
//! written and their files stored off the actor.

use std::sync::Arc;

use tidesync_proto::NodeId;
use tidesync_proto::files::{FileAnswer, FileAsk};

use super::{
    BundleSink, FileDone, Live, MAX_FILE_SERVES, NodeActor, Reply, WANTS_RECONCILE_TICKS, now,
};
use crate::bundle::{BundleError, ExportReport, ImportReport};
use crate::files::FileHash;
use crate::netloop::NetCommand;
use crate::store::SegmentError;
use crate::sync::fetch::Outcome;

impl NodeActor {
    /// A peer asks for a segment: served off the actor if our policy lets the peer have the
    /// file, answered `Unknown` (as for a file we lack) if not.
    pub(super) fn on_file_asked(
        &mut self,
        peer: NodeId,
        id: crate::netloop::InboundId,
        ask: FileAsk,
    ) {
        let may = self.is_configured(&peer)
            && match self.core.may_serve_file(peer, &ask) {
                Ok(may) => may,
                Err(e) => {
                    tracing::error!(%peer, error = %e, "could not check whether a file may be served");
                    false
                }
            };
        if !may {
            self.out.push(NetCommand::AnswerFile {
                id,
                answer: FileAnswer::Unknown,
            });
            return;
        }
        let granted = match (self.serving < MAX_FILE_SERVES)
            .then(|| self.core.grant_segment(peer, &ask))
            .flatten()
        {
            Some(granted) => granted,
            None => {
                self.out.push(NetCommand::AnswerFile {
                    id,
                    answer: FileAnswer::Busy,
                });
                return;
            }
        };
        self.serving += 1;
        let store = self.core.store().clone();
        let net = self.net.clone();
        let results = self.file_results_tx.clone();
        tokio::task::spawn_blocking(move || {
            let (answer, bytes) = match store.encode_segment(&ask) {
                Ok(Some(segment)) => {
                    let n = segment.len() as u64;
                    (FileAnswer::Segment(segment), n)
                }
                Ok(None) => (FileAnswer::Unknown, 0),
                Err(e) => {
                    tracing::error!(file = %FileHash(ask.hash), error = %e, "could not serve a file segment");
                    (FileAnswer::Unknown, 0)
                }
            };
            let _ = net.blocking_send(NetCommand::AnswerFile { id, answer });
            let _ = results.blocking_send(FileDone::Served {
                peer,
                bytes,
                granted,
            });
        });
    }

    /// Gather a bundle's body for `peer` and reply with its report; write the bundle to `out`
    /// off the actor, its files read from the store, and tell `done` how that ended.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn export_bundle(
        &mut self,
        peer: &str,
        all: bool,
        encrypt: bool,
        files: bool,
        out: BundleSink,
        done: Box<dyn FnOnce(Result<(), BundleError>) + Send>,
        reply: Reply<Result<ExportReport, BundleError>>,
    ) {
        let (body, mut report) = match self.core.export_body(peer, all, files, &|_| {}) {
            Ok(x) => x,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        report.encrypted = encrypt;
        let _ = reply.send(Ok(report));
        let store = self.core.store().clone();
        let identity = self.core.identity().clone();
        tokio::task::spawn_blocking(move || {
            let mut copy = crate::bundle::files::copy_from_store(&store, body.to);
            let written = crate::bundle::stream::write(&identity, &body, encrypt, out, &mut copy);
            if let Err(e) = &written {
                tracing::error!(peer = %body.to, error = %e, "could not write a bundle");
            }
            done(written.map(drop));
        });
    }

    /// Import a bundle's records on the actor; store the files it carries that this node now
    /// wants off the actor, each reported as stored, and reply at the end.
    pub(super) fn import_bundle(
        &mut self,
        src: Box<dyn std::io::Read + Send>,
        dry_run: bool,
        reply: Reply<Result<ImportReport, BundleError>>,
    ) {
        let imported = self.core.open_bundle(src).and_then(|opened| {
            let report = self.core.import_body(&opened.body, dry_run, &|_, _| {})?;
            Ok((opened, report))
        });
        let (mut opened, mut report) = match imported {
            Ok(x) if !dry_run => x,
            other => {
                let _ = reply.send(other.map(|(_, report)| report));
                return;
            }
        };
        let store = self.core.store().clone();
        let results = self.file_results_tx.clone();
        tokio::task::spawn_blocking(move || {
            let stored = crate::bundle::files::store_wanted(
                &store,
                &mut opened,
                now(),
                &mut report,
                &mut |file| {
                    let _ = results.blocking_send(FileDone::Finished {
                        hash: file.hash,
                        result: Ok(()),
                    });
                },
            );
            let _ = reply.send(match stored {
                Ok(()) => Ok(report),
                Err(e) => Err(e.after_records(&report)),
            });
        });
    }

    /// What file work done off the actor achieved.
    pub(super) fn on_file_done(&mut self, done: FileDone) {
        match done {
            FileDone::Decoded { peer, ask, outcome } => {
                self.core.file_answered(peer, &ask, outcome, now())
            }
            FileDone::Served {
                peer,
                bytes,
                granted,
            } => {
                self.serving = self.serving.saturating_sub(1);
                self.core.file_served(peer, bytes, granted);
            }
            FileDone::ProgressSaved(result) => {
                self.saving_progress = false;
                if let Err(e) = result {
                    tracing::error!(error = %e, "could not save download progress");
                }
            }
            FileDone::Finished { hash, result } => {
                let stored = result.is_ok();
                self.core.file_finished(&hash, result, now());
                if stored {
                    self.files_last.send_modify(|n| *n += 1);
                    for w in self.file_waiters.remove(&hash).unwrap_or_default() {
                        let _ = w.send(true);
                    }
                }
            }
        }
    }

    /// Ask for the segments due, and move complete downloads into place, off the actor.
    pub(super) fn drive_files(&mut self) {
        let asks = self.core.file_asks(now());
        if !asks.is_empty() {
            self.out.push(NetCommand::AskFiles(asks));
        }
        for (hash, size) in self.core.files_complete() {
            let store = self.core.store().clone();
            let results = self.file_results_tx.clone();
            tokio::task::spawn_blocking(move || {
                let result = store.finish_download(&hash, size, now());
                let _ = results.blocking_send(FileDone::Finished { hash, result });
            });
        }
    }

    /// Save download progress and publish the files' status.
    pub(super) fn on_file_tick(&mut self) {
        self.save_progress();
        self.file_ticks = self.file_ticks.wrapping_add(1);
        if self.file_ticks.is_multiple_of(WANTS_RECONCILE_TICKS)
            && let Err(e) = self.core.reconcile_wants()
        {
            tracing::error!(error = %e, "could not read the want-list");
        }
        self.file_waiters.retain(|hash, waiters| {
            waiters.retain(|w| !w.is_closed());
            !waiters.is_empty() && self.core.is_fetching(hash)
        });
        let files = self.core.files_status();
        self.live.send_if_modified(|live| {
            if live.files == files {
                return false;
            }
            *live = Arc::new(Live {
                peers: live.peers.clone(),
                sessions: live.sessions.clone(),
                files,
                traffic: live.traffic.clone(),
            });
            true
        });
    }

    /// Save download progress off the actor, one save at a time: syncing a download that grows
    /// by a hundred megabytes between ticks takes long enough to stall the asks if it ran here.
    fn save_progress(&mut self) {
        if self.saving_progress {
            return;
        }
        let progress = match self.core.take_file_progress() {
            Ok(progress) if progress.is_empty() => return,
            Ok(progress) => progress,
            Err(e) => {
                tracing::error!(error = %e, "could not save download progress");
                return;
            }
        };
        self.saving_progress = true;
        let store = self.core.store().clone();
        let results = self.file_results_tx.clone();
        tokio::task::spawn_blocking(move || {
            let result = crate::core::persist_file_progress(&store, &progress);
            let _ = results.blocking_send(FileDone::ProgressSaved(result));
        });
    }

    /// Check a segment a peer answered against the file's hash and write it, off the actor.
    pub(super) fn decode_answer(&mut self, peer: NodeId, ask: FileAsk, bytes: Vec<u8>) {
        let store = self.core.store().clone();
        let results = self.file_results_tx.clone();
        tokio::task::spawn_blocking(move || {
            let hash = FileHash(ask.hash);
            let outcome = match store.decode_segment(&hash, ask.size, ask.segment, &bytes) {
                Ok(v) => Outcome::Verified { bytes: v.bytes },
                Err(SegmentError::Corrupt { detail, .. }) => Outcome::Corrupt(detail),
                Err(SegmentError::Local(e)) => Outcome::Local(e.to_string()),
            };
            let _ = results.blocking_send(FileDone::Decoded { peer, ask, outcome });
        });
    }
}
