//! Files between nodes, on disk: the bao outboard beside each stored file, a segment encoded
//! for a peer, a segment decoded and checked into a partial download, and a finished
//! download moved into place and indexed.
//!
//! # On disk
//! - `files/<2 hex>/<hash>.obao4`: the file's outboard, the BLAKE3 tree's parent hashes in
//!   pre-order with 16 KiB chunk groups (64 bytes per 16 KiB). Made from the file's bytes when
//!   it is added, or else the first time a peer asks for it (checked to hash to its name),
//!   or kept from its download.
//! - `files/partial/<hash>.download` and `<hash>.download.obao4`: a download in progress,
//!   written at the offsets of the segments that verified. Which segments are durable is
//!   recorded in the file's `wants_v1` row only after both are synced, so a crash loses at
//!   most the segments since, which are fetched again.

use std::fs::File;
use std::io::{BufReader, Cursor};
use std::path::{Path, PathBuf};

use bao_tree::io::outboard::PreOrderOutboard;
use bao_tree::io::sync::{decode_ranges, encode_ranges_validated};
use bao_tree::{BaoTree, BlockSize, ChunkNum, ChunkRanges};
use redb::ReadableTable;
use tidesync_proto::files::{CHUNK_GROUP_LOG, FileAsk, SEGMENT_BYTES};

use super::files::{FILES, FileError, FileRow};
use super::wants::FileIndex;
use super::{Ctx, Store};
use crate::files::FileHash;

/// The extension of an outboard beside its file.
const OUTBOARD_EXT: &str = "obao4";
/// Chunks (1 KiB) in a segment.
const SEGMENT_CHUNKS: u64 = SEGMENT_BYTES / 1024;

/// Why a segment from a peer was not stored.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    /// The bytes do not verify against the file's hash: the sender's fault.
    #[error("segment {segment} of {hash} does not verify: {detail}")]
    Corrupt {
        hash: FileHash,
        segment: u64,
        detail: String,
    },
    /// Our disk failed: never the sender's fault.
    #[error(transparent)]
    Local(#[from] FileError),
}

/// A segment decoded, checked and written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    /// Bytes of file data it held.
    pub bytes: u64,
}

fn block_size() -> BlockSize {
    BlockSize::from_chunk_log(CHUNK_GROUP_LOG)
}

/// The chunks of segment `segment`.
fn segment_ranges(segment: u64) -> ChunkRanges {
    ChunkRanges::from(ChunkNum(segment * SEGMENT_CHUNKS)..ChunkNum((segment + 1) * SEGMENT_CHUNKS))
}

/// Bytes of file data in segment `segment` of a file of `size` bytes.
pub fn segment_len(size: u64, segment: u64) -> u64 {
    size.saturating_sub(segment * SEGMENT_BYTES)
        .min(SEGMENT_BYTES)
}

fn with_ext(path: &Path, ext: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".");
    name.push(ext);
    PathBuf::from(name)
}

fn sync_dir(dir: &Path) -> Result<(), FileError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(FileError::io(dir, "making a files directory durable"))
}

impl Store {
    /// Where the outboard of stored file `hash` is.
    pub(super) fn outboard_path(&self, hash: &FileHash) -> Result<PathBuf, FileError> {
        Ok(with_ext(&self.file_path(hash)?, OUTBOARD_EXT))
    }

    /// Where a download of `hash` is written: its data and its outboard.
    fn download_paths(&self, hash: &FileHash) -> Result<(PathBuf, PathBuf), FileError> {
        let data = self
            .files_dir()?
            .join(super::files::PARTIAL_DIR)
            .join(format!("{hash}.download"));
        let outboard = with_ext(&data, OUTBOARD_EXT);
        Ok((data, outboard))
    }

    /// The outboard of stored file `hash` of `size` bytes, made from its bytes the first time
    /// (checked to hash to `hash`: a file whose bytes rotted is refused, not served).
    pub(super) fn stored_outboard(
        &self,
        hash: &FileHash,
        size: u64,
    ) -> Result<PreOrderOutboard<File>, FileError> {
        let tree = BaoTree::new(size, block_size());
        let root = blake3::Hash::from_bytes(hash.0);
        let path = self.outboard_path(hash)?;
        // A poisoned lock only means another thread panicked making an outboard: the
        // file-system state is still checked below, so carry on.
        let _making = self
            .outboards
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !path.exists() {
            let data_path = self.file_path(hash)?;
            let data = File::open(&data_path)
                .map_err(FileError::io(&data_path, "opening a stored file"))?;
            let partial = self.partial_file()?;
            let out = partial
                .into_file()
                .map_err(FileError::io(&path, "making an outboard"))?;
            out.0
                .set_len(tree.outboard_size())
                .map_err(FileError::io(&out.1, "making an outboard"))?;
            let mut outboard = PreOrderOutboard {
                root,
                tree,
                data: out.0,
            };
            let made = bao_tree::io::sync::outboard(BufReader::new(data), tree, &mut outboard)
                .map_err(FileError::io(&data_path, "hashing a stored file"))?;
            if made != root {
                let _ = std::fs::remove_file(&out.1);
                return Err(FileError::Rotted(*hash));
            }
            outboard
                .data
                .sync_all()
                .map_err(FileError::io(&out.1, "making an outboard durable"))?;
            std::fs::rename(&out.1, &path).map_err(FileError::io(&path, "storing an outboard"))?;
        }
        let data = File::open(&path).map_err(FileError::io(&path, "opening an outboard"))?;
        Ok(PreOrderOutboard { root, tree, data })
    }

    /// Segment `ask.segment` of stored file `ask.hash`, bao-encoded and checked as it is read;
    /// `None` when the file is not stored here at that size.
    pub fn encode_segment(&self, ask: &FileAsk) -> Result<Option<Vec<u8>>, FileError> {
        let hash = FileHash(ask.hash);
        let Some((path, FileRow { size, .. })) = self.file(&hash)? else {
            return Ok(None);
        };
        if size != ask.size || ask.segment >= FileAsk::segments(size) {
            return Ok(None);
        }
        let outboard = self.stored_outboard(&hash, size)?;
        let data = File::open(&path).map_err(FileError::io(&path, "opening a stored file"))?;
        let mut out = Vec::with_capacity(segment_len(size, ask.segment) as usize + 4096);
        match encode_ranges_validated(&data, &outboard, &segment_ranges(ask.segment), &mut out) {
            Ok(()) => Ok(Some(out)),
            Err(bao_tree::io::EncodeError::Io(e)) => {
                Err(FileError::io(&path, "reading a stored file")(e))
            }
            Err(_) => Err(FileError::Rotted(hash)),
        }
    }

    /// Check segment `segment` of the wanted file `hash` (`size` bytes) in `encoded` against
    /// the hash, chunk group by chunk group, writing what verifies into the file's download.
    pub fn decode_segment(
        &self,
        hash: &FileHash,
        size: u64,
        segment: u64,
        encoded: &[u8],
    ) -> Result<Verified, SegmentError> {
        let corrupt = |detail: String| SegmentError::Corrupt {
            hash: *hash,
            segment,
            detail,
        };
        if segment >= FileAsk::segments(size) {
            return Err(corrupt("no such segment".into()));
        }
        let (data, outboard) = self.open_download(hash, size)?;
        let tree = BaoTree::new(size, block_size());
        let outboard = PreOrderOutboard {
            root: blake3::Hash::from_bytes(hash.0),
            tree,
            data: outboard,
        };
        let mut reader = Cursor::new(encoded);
        match decode_ranges(&mut reader, &segment_ranges(segment), data, outboard) {
            Ok(()) => {}
            Err(bao_tree::io::DecodeError::Io(e))
                if e.kind() != std::io::ErrorKind::UnexpectedEof =>
            {
                let (path, _) = self.download_paths(hash)?;
                return Err(FileError::io(&path, "writing a download")(e).into());
            }
            Err(e) => return Err(corrupt(e.to_string())),
        }
        if reader.position() != encoded.len() as u64 {
            return Err(corrupt(format!(
                "{} bytes after the segment",
                encoded.len() as u64 - reader.position()
            )));
        }
        Ok(Verified {
            bytes: segment_len(size, segment),
        })
    }

    /// The download of `hash` (`size` bytes): its data and outboard files, made if new.
    fn open_download(&self, hash: &FileHash, size: u64) -> Result<(File, File), FileError> {
        let (data_path, outboard_path) = self.download_paths(hash)?;
        if let Some(dir) = data_path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(FileError::io(dir, "creating the files directory"))?;
        }
        let open = |path: &Path, len: u64| -> Result<File, FileError> {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(FileError::io(path, "opening a download"))?;
            let now = file
                .metadata()
                .map_err(FileError::io(path, "opening a download"))?
                .len();
            if now != len {
                file.set_len(len)
                    .map_err(FileError::io(path, "sizing a download"))?;
            }
            Ok(file)
        };
        let tree = BaoTree::new(size, block_size());
        Ok((
            open(&data_path, size)?,
            open(&outboard_path, tree.outboard_size())?,
        ))
    }

    /// Make what was written to the download of `hash` durable, before its progress is
    /// recorded.
    pub fn sync_download(&self, hash: &FileHash) -> Result<(), FileError> {
        let (data, outboard) = self.download_paths(hash)?;
        for path in [data, outboard] {
            if let Ok(file) = std::fs::OpenOptions::new().write(true).open(&path) {
                file.sync_data()
                    .map_err(FileError::io(&path, "making a download durable"))?;
            }
        }
        Ok(())
    }

    /// Move the complete download of `hash` (every segment verified) into place with its
    /// outboard, and index it, taking it off the want-list, in one transaction.
    pub fn finish_download(
        &self,
        hash: &FileHash,
        size: u64,
        now_ms: i64,
    ) -> Result<(), FileError> {
        let (data, outboard) = self.open_download(hash, size)?;
        let (data_path, outboard_path) = self.download_paths(hash)?;
        data.sync_all()
            .map_err(FileError::io(&data_path, "making a download durable"))?;
        outboard
            .sync_all()
            .map_err(FileError::io(&outboard_path, "making a download durable"))?;
        drop((data, outboard));
        let target = self.file_path(hash)?;
        if let Some(dir) = target.parent() {
            std::fs::create_dir_all(dir)
                .map_err(FileError::io(dir, "creating a files directory"))?;
        }
        let target_outboard = self.outboard_path(hash)?;
        std::fs::rename(&outboard_path, &target_outboard)
            .map_err(FileError::io(&target_outboard, "storing an outboard"))?;
        std::fs::rename(&data_path, &target).map_err(FileError::io(&target, "storing a file"))?;
        if let Some(dir) = target.parent() {
            sync_dir(dir)?;
        }
        let ctx = "indexing a downloaded file";
        let tx = self.db.begin_write().ctx(self, ctx)?;
        {
            let mut files = tx.open_table(FILES).ctx(self, ctx)?;
            if files.get(hash.0).ctx(self, ctx)?.is_none() {
                let row = FileRow {
                    size,
                    added_ms: now_ms,
                };
                let bytes = postcard::to_stdvec(&row).map_err(|x| self.encode_error(x))?;
                files.insert(hash.0, bytes.as_slice()).ctx(self, ctx)?;
                drop(files);
                self.feed_file(&tx, *hash, size, now_ms, ctx)?;
            } else {
                drop(files);
            }
            FileIndex::open(self, &tx, ctx)?.unwant(hash)?;
        }
        tx.commit().ctx(self, ctx)?;
        Ok(())
    }

    /// Remove the download of `hash`, if any (a file no longer wanted).
    pub fn drop_download(&self, hash: &FileHash) -> Result<(), FileError> {
        let (data, outboard) = self.download_paths(hash)?;
        for path in [data, outboard] {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(FileError::io(&path, "removing a download")(e)),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::WantRow;

    fn bytes(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    #[test]
    fn a_file_crosses_segment_by_segment_and_a_flipped_byte_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let a = Store::create(&dir.path().join("a/store.redb").tap_dir()).unwrap();
        let b = Store::create(&dir.path().join("b/store.redb").tap_dir()).unwrap();
        let data = bytes(2 * SEGMENT_BYTES as usize + 12_345);
        let (hash, size) = a.add_file(&mut data.as_slice(), 1).unwrap();
        let want = WantRow {
            hash,
            size,
            claimant: tidesync_proto::NodeId([1; 32]),
            sources: vec![],
            on_demand: false,
            added_ms: 0,
            done: vec![],
            last_error: None,
        };
        assert_eq!(
            b.add_wants(&[want]).unwrap(),
            vec![crate::store::Wanted::Added]
        );
        let n = FileAsk::segments(size);
        assert_eq!(n, 3);
        for segment in (0..n).rev() {
            let ask = FileAsk {
                hash: hash.0,
                size,
                segment,
            };
            let encoded = a.encode_segment(&ask).unwrap().unwrap();
            let mut bad = encoded.clone();
            let at = bad.len() - 100;
            bad[at] ^= 1;
            assert!(matches!(
                b.decode_segment(&hash, size, segment, &bad),
                Err(SegmentError::Corrupt { .. })
            ));
            let v = b.decode_segment(&hash, size, segment, &encoded).unwrap();
            assert_eq!(v.bytes, segment_len(size, segment));
        }
        b.finish_download(&hash, size, 2).unwrap();
        let (path, row) = b.file(&hash).unwrap().unwrap();
        assert_eq!(row.size, size);
        assert_eq!(std::fs::read(path).unwrap(), data);
        assert!(b.wants().unwrap().is_empty());
        assert!(b.verify_file(&hash).unwrap());
        // What was downloaded is served on in turn, from the outboard kept with it.
        let again = b
            .encode_segment(&FileAsk {
                hash: hash.0,
                size,
                segment: 2,
            })
            .unwrap()
            .unwrap();
        assert_eq!(
            again,
            a.encode_segment(&FileAsk {
                hash: hash.0,
                size,
                segment: 2
            })
            .unwrap()
            .unwrap()
        );
        // A wrong size or an unknown hash is no file.
        assert!(
            a.encode_segment(&FileAsk {
                hash: hash.0,
                size: size + 1,
                segment: 0
            })
            .unwrap()
            .is_none()
        );
        assert!(
            a.encode_segment(&FileAsk {
                hash: [9; 32],
                size,
                segment: 0
            })
            .unwrap()
            .is_none()
        );
    }

    #[test]
    fn a_rotted_file_is_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let a = Store::create(&dir.path().join("store.redb")).unwrap();
        let data = bytes(100_000);
        let (hash, size) = a.add_file(&mut data.as_slice(), 1).unwrap();
        let (path, _) = a.file(&hash).unwrap().unwrap();
        let mut rotted = data.clone();
        rotted[50_000] ^= 0x40;
        std::fs::write(&path, &rotted).unwrap();
        assert!(matches!(
            a.encode_segment(&FileAsk {
                hash: hash.0,
                size,
                segment: 0
            }),
            Err(FileError::Rotted(_))
        ));
    }

    trait TapDir {
        fn tap_dir(self) -> Self;
    }
    impl TapDir for PathBuf {
        fn tap_dir(self) -> Self {
            std::fs::create_dir_all(self.parent().unwrap()).unwrap();
            self
        }
    }
}
