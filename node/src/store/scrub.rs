//! Keeping the file store honest: re-hashing every stored file (a rotted one is taken out
//! and wanted again where it is still referenced) and removing files nothing refers to.

use serde::{Deserialize, Serialize};
use tidesync_proto::NodeId;

use super::files::FILES;
use super::wants::FileIndex;
use super::{Ctx, Store};
use crate::files::FileHash;
use crate::model::{MAX_WANT_SOURCES, WantRow};
use crate::store::FileError;

/// How long a stored file nothing refers to is kept before `file gc` removes it, in seconds
/// by default: an upload made just before the write that refers to it is not lost.
pub const DEFAULT_GC_GRACE_SECS: u64 = 3_600;

/// What `file verify` found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// Files re-hashed.
    pub checked: u64,
    /// Files whose bytes no longer hash to their name: taken out of the store.
    pub rotted: Vec<String>,
    /// Of those, the ones still referenced, now on the want-list again.
    pub refetching: Vec<String>,
}

/// What `file gc` removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcReport {
    pub removed: Vec<String>,
    pub freed_bytes: u64,
    /// Unreferenced files kept because they were stored within the grace period.
    pub kept_recent: u64,
}

impl Store {
    /// Re-hash every stored file. A rotted one is removed (bytes, outboard, index) and, if an
    /// object still refers to it, wanted again from `sources` (the configured peers), with
    /// `me` paying its quota.
    pub fn verify_files(
        &self,
        sources: &[NodeId],
        me: NodeId,
        now_ms: i64,
    ) -> Result<VerifyReport, FileError> {
        let mut report = VerifyReport::default();
        for (hash, row) in self.files()? {
            report.checked += 1;
            if self.verify_file(&hash)? {
                continue;
            }
            tracing::error!(file = %hash, "a stored file's bytes no longer match its hash; removing it");
            self.remove_file(&hash)?;
            report.rotted.push(hash.to_string());
            if self.is_referenced(&hash)? {
                let mut sources = sources.to_vec();
                sources.truncate(MAX_WANT_SOURCES);
                self.add_wants(&[WantRow {
                    hash,
                    size: row.size,
                    claimant: me,
                    sources,
                    on_demand: false,
                    added_ms: now_ms,
                    done: Vec::new(),
                    last_error: Some("the stored copy rotted".into()),
                }])?;
                report.refetching.push(hash.to_string());
            }
        }
        Ok(report)
    }

    /// Remove every stored file no document refers to now and that was stored more than
    /// `grace_ms` ago. Files only the history of an object refers to (an old version of a
    /// field) are removed too: reading that history shows the reference, not the bytes.
    pub fn gc_files(&self, now_ms: i64, grace_ms: i64) -> Result<GcReport, FileError> {
        let mut report = GcReport::default();
        for (hash, row) in self.files()? {
            if self.is_referenced(&hash)? {
                continue;
            }
            if now_ms.saturating_sub(row.added_ms) < grace_ms {
                report.kept_recent += 1;
                continue;
            }
            self.remove_file(&hash)?;
            report.removed.push(hash.to_string());
            report.freed_bytes += row.size;
        }
        Ok(report)
    }

    /// Take file `hash` out of the index, then remove its bytes and outboard.
    fn remove_file(&self, hash: &FileHash) -> Result<(), FileError> {
        let ctx = "removing a file";
        let tx = self.db.begin_write().ctx(self, ctx)?;
        {
            let mut files = tx.open_table(FILES).ctx(self, ctx)?;
            files.remove(hash.0).ctx(self, ctx)?;
            drop(files);
            // Not wanted either (a rotted file is put back on the list by the caller).
            FileIndex::open(self, &tx, ctx)?.unwant(hash)?;
        }
        tx.commit().ctx(self, ctx)?;
        let path = self.file_path(hash)?;
        for p in [self.outboard_path(hash)?, path] {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(FileError::io(&p, "removing a file")(e)),
            }
        }
        Ok(())
    }

    /// Remove what uploads left in `files/partial/` when the process died mid-upload
    /// (downloads, named `<hash>.download`, are kept: they resume). At start only.
    pub fn clean_partial_uploads(&self) -> Result<u64, FileError> {
        let dir = self.files_dir()?.join(super::files::PARTIAL_DIR);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(0);
        };
        let mut n = 0;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.contains(".download") {
                continue;
            }
            std::fs::remove_file(e.path())
                .map_err(FileError::io(&e.path(), "removing a partial upload"))?;
            n += 1;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rot_is_found_and_refetched_and_gc_keeps_what_is_referenced_or_recent() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::create(&dir.path().join("store.redb")).unwrap();
        let (kept, _) = store.add_file(&mut &b"referenced"[..], 0).unwrap();
        let (old, _) = store.add_file(&mut &b"forgotten"[..], 0).unwrap();
        let (recent, _) = store.add_file(&mut &b"just uploaded"[..], 9_000).unwrap();
        // A document refers to `kept`.
        let tx = store.db.begin_write().unwrap();
        FileIndex::open(&store, &tx, "test")
            .unwrap()
            .set_doc_files(&tidesync_proto::DocId([1; 16]), &[(kept, 10)])
            .unwrap();
        tx.commit().unwrap();
        let gc = store.gc_files(10_000, 5_000).unwrap();
        assert_eq!(gc.removed, vec![old.to_string()]);
        assert_eq!(gc.kept_recent, 1);
        assert!(store.file(&old).unwrap().is_none());
        assert!(store.file(&recent).unwrap().is_some());
        // The referenced file rots: it is removed and wanted again.
        let (path, _) = store.file(&kept).unwrap().unwrap();
        std::fs::write(&path, b"referencex").unwrap();
        let peer = NodeId([7; 32]);
        let report = store.verify_files(&[peer], NodeId([1; 32]), 1).unwrap();
        assert_eq!(report.checked, 2);
        assert_eq!(report.rotted, vec![kept.to_string()]);
        assert_eq!(report.refetching, vec![kept.to_string()]);
        assert!(store.file(&kept).unwrap().is_none());
        assert_eq!(store.wants().unwrap()[0].sources, vec![peer]);
    }

    #[test]
    fn a_stored_file_gone_from_the_disk_counts_as_rotted_and_is_wanted_again() {
        // Regression: `file verify` stopped with "opening a stored file: No such file or
        // directory" when a stored file had been deleted from `files/`, and checked no further.
        let dir = tempfile::tempdir().unwrap();
        let store = Store::create(&dir.path().join("store.redb")).unwrap();
        let (gone, _) = store.add_file(&mut &b"deleted by hand"[..], 0).unwrap();
        let (fine, _) = store.add_file(&mut &b"still here"[..], 0).unwrap();
        let tx = store.db.begin_write().unwrap();
        FileIndex::open(&store, &tx, "test")
            .unwrap()
            .set_doc_files(&tidesync_proto::DocId([1; 16]), &[(gone, 15)])
            .unwrap();
        tx.commit().unwrap();
        std::fs::remove_file(store.file(&gone).unwrap().unwrap().0).unwrap();
        let report = store.verify_files(&[], NodeId([1; 32]), 1).unwrap();
        assert_eq!(report.checked, 2);
        assert_eq!(report.rotted, vec![gone.to_string()]);
        assert_eq!(report.refetching, vec![gone.to_string()]);
        assert!(store.want(&gone).unwrap().is_some());
        assert!(store.file(&fine).unwrap().is_some());
    }
}
