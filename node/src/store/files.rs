//! Files: their bytes content-addressed on disk under `files/` beside the store file, each
//! indexed in `files_v1` once it is whole, verified and durable.
//!
//! # On disk
//! - `files/<first 2 hex digits>/<64 hex digits>`: a stored file, named by its BLAKE3 hash.
//! - `files/partial/<unique name>`: a file being written; moved into place only once its hash
//!   is known and its bytes are durable, so a crash never leaves a file under a wrong name.
//!
//! A file is indexed after it is in place and fsynced (with its directory), so an index entry
//! always names a whole file. A crash in between leaves a whole, unindexed file that the next
//! add of the same bytes adopts.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{Ctx, Store, StoreError};
use crate::files::{FILE_CHUNK_BYTES, FileHash, MAX_FILE_BYTES};

/// The stored files. Added in format 5.
/// Key: BLAKE3 hash (32 bytes). Value: postcard [`FileRow`].
pub(super) const FILES: TableDefinition<[u8; 32], &[u8]> = TableDefinition::new("files_v1");

/// Every file stored here, numbered in the order it was stored (uploaded or downloaded):
/// the file feed beside the change feed. Added in format 6.
/// Key: n (u64, dense from 1). Value: postcard [`FileEvent`].
pub(super) const FILE_FEED: TableDefinition<u64, &[u8]> = TableDefinition::new("file_feed_v1");

/// A file stored here, as the file feed numbers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEvent {
    pub hash: FileHash,
    pub size: u64,
    /// When it was stored, Unix milliseconds.
    pub time_ms: i64,
}

/// The directory of files being written, under the files directory.
pub(super) const PARTIAL_DIR: &str = "partial";

/// What the index keeps of a stored file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRow {
    pub size: u64,
    /// When it was stored here, Unix milliseconds.
    pub added_ms: i64,
}

/// Why a file could not be stored or read. A local disk error, never a peer's fault.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{path}: {context}: {source}")]
    Io {
        path: PathBuf,
        context: &'static str,
        source: std::io::Error,
    },
    #[error(
        "the disk is full writing {path}; the partial file is kept, free some space and try again"
    )]
    DiskFull { path: PathBuf },
    #[error("the file is larger than the limit of {MAX_FILE_BYTES} bytes")]
    TooLarge,
    #[error("an in-memory store keeps no files")]
    InMemory,
    #[error("file {0} is not stored here")]
    NotFound(FileHash),
    #[error(
        "the stored bytes of file {0} no longer hash to its name: the disk rotted them (`tidesync file verify` fetches it again)"
    )]
    Rotted(FileHash),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl FileError {
    pub(crate) fn io(
        path: &Path,
        context: &'static str,
    ) -> impl FnOnce(std::io::Error) -> FileError {
        let path = path.to_path_buf();
        move |source| {
            if source.kind() == std::io::ErrorKind::StorageFull {
                FileError::DiskFull { path }
            } else {
                FileError::Io {
                    path,
                    context,
                    source,
                }
            }
        }
    }
}

/// Why [`Partial::fill_from`] stopped: the source failed, or writing here did.
#[derive(Debug)]
pub enum FillError {
    Read(std::io::Error),
    Write(FileError),
}

/// A file being written: its partial path, and the hash and size of what was written so far.
pub struct Partial {
    pub path: PathBuf,
    file: std::fs::File,
    hasher: blake3::Hasher,
    size: u64,
}

impl Partial {
    /// The open file and its path, to write other than appending (an outboard).
    pub(super) fn into_file(self) -> Result<(std::fs::File, PathBuf), std::io::Error> {
        Ok((self.file, self.path))
    }

    /// Append everything `src` yields, in chunks of [`FILE_CHUNK_BYTES`].
    pub fn fill_from(&mut self, src: &mut dyn Read) -> Result<(), FillError> {
        let mut buf = vec![0u8; FILE_CHUNK_BYTES];
        loop {
            match src.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => self.write(&buf[..n]).map_err(FillError::Write)?,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(FillError::Read(e)),
            }
        }
    }

    /// The hash and size of what was written so far.
    pub fn written(&self) -> (FileHash, u64) {
        (FileHash(*self.hasher.finalize().as_bytes()), self.size)
    }

    /// Append `bytes`, hashing them.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), FileError> {
        self.size = self.size.saturating_add(bytes.len() as u64);
        if self.size > MAX_FILE_BYTES {
            return Err(FileError::TooLarge);
        }
        self.hasher.update(bytes);
        self.file
            .write_all(bytes)
            .map_err(FileError::io(&self.path, "writing a file"))
    }
}

impl Store {
    /// The directory of this store's files: `files/` beside the store file.
    pub fn files_dir(&self) -> Result<PathBuf, FileError> {
        match self.path.parent() {
            Some(dir) if self.path != Path::new("<memory>") => Ok(dir.join("files")),
            _ => Err(FileError::InMemory),
        }
    }

    /// Where the file `hash` is (or would be) stored.
    pub fn file_path(&self, hash: &FileHash) -> Result<PathBuf, FileError> {
        let hex = hash.to_string();
        Ok(self.files_dir()?.join(&hex[..2]).join(hex))
    }

    /// A new, empty partial file.
    pub fn partial_file(&self) -> Result<Partial, FileError> {
        let dir = self.files_dir()?.join(PARTIAL_DIR);
        std::fs::create_dir_all(&dir)
            .map_err(FileError::io(&dir, "creating the files directory"))?;
        let mut name = [0u8; 16];
        rand::fill(&mut name);
        let path = dir.join(hex::encode(name));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(FileError::io(&path, "creating a partial file"))?;
        Ok(Partial {
            path,
            file,
            hasher: blake3::Hasher::new(),
            size: 0,
        })
    }

    /// Store everything `src` yields as a file: written to a partial file, hashed, made
    /// durable, moved into place and indexed. Returns its hash and size. On an error the
    /// partial file is removed (the source can be read again).
    pub fn add_file(&self, src: &mut impl Read, now_ms: i64) -> Result<(FileHash, u64), FileError> {
        let mut partial = self.partial_file()?;
        if let Err(e) = partial.fill_from(src) {
            let _ = std::fs::remove_file(&partial.path);
            return Err(match e {
                FillError::Write(e) => e,
                FillError::Read(source) => FileError::Io {
                    path: partial.path.clone(),
                    context: "reading the file to add",
                    source,
                },
            });
        }
        self.keep_file(partial, now_ms)
    }

    /// Make a partial file durable, move it into place under its hash and index it.
    pub fn keep_file(&self, partial: Partial, now_ms: i64) -> Result<(FileHash, u64), FileError> {
        let Partial {
            path,
            file,
            hasher,
            size,
        } = partial;
        file.sync_all()
            .map_err(FileError::io(&path, "making a file durable"))?;
        drop(file);
        let hash = FileHash(*hasher.finalize().as_bytes());
        let target = self.file_path(&hash)?;
        let dir = target
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| target.clone());
        std::fs::create_dir_all(&dir).map_err(FileError::io(&dir, "creating a files directory"))?;
        if target.exists() {
            // The same bytes are stored already (or were, before a crash, not yet indexed).
            std::fs::remove_file(&path).map_err(FileError::io(&path, "removing a partial file"))?;
        } else {
            std::fs::rename(&path, &target).map_err(FileError::io(&target, "storing a file"))?;
        }
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(FileError::io(&dir, "making a files directory durable"))?;
        let ctx = "indexing a file";
        let tx = self.db.begin_write().ctx(self, ctx)?;
        {
            let mut table = tx.open_table(FILES).ctx(self, ctx)?;
            if table.get(hash.0).ctx(self, ctx)?.is_none() {
                let row = FileRow {
                    size,
                    added_ms: now_ms,
                };
                let bytes = postcard::to_stdvec(&row).map_err(|x| self.encode_error(x))?;
                table.insert(hash.0, bytes.as_slice()).ctx(self, ctx)?;
                self.feed_file(&tx, hash, size, now_ms, ctx)?;
            }
        }
        // A file this node wanted is wanted no more.
        super::wants::FileIndex::open(self, &tx, ctx)?.unwant(&hash)?;
        tx.commit().ctx(self, ctx)?;
        // Its outboard now, while its bytes are in the page cache, rather than when the first
        // peer asks (which would then wait for a whole pass over the file). A failure here
        // loses nothing: the first ask makes it.
        if let Err(e) = self.stored_outboard(&hash, size) {
            tracing::warn!(file = %hash, error = %e, "could not make a file's outboard yet");
        }
        Ok((hash, size))
    }

    /// Number a newly stored file in the file feed, inside the transaction that indexes it.
    pub(super) fn feed_file(
        &self,
        tx: &redb::WriteTransaction,
        hash: FileHash,
        size: u64,
        now_ms: i64,
        ctx: &'static str,
    ) -> Result<(), StoreError> {
        let mut feed = tx.open_table(FILE_FEED).ctx(self, ctx)?;
        let n = feed.last().ctx(self, ctx)?.map_or(0, |(k, _)| k.value()) + 1;
        let event = FileEvent {
            hash,
            size,
            time_ms: now_ms,
        };
        let bytes = postcard::to_stdvec(&event).map_err(|x| self.encode_error(x))?;
        feed.insert(n, bytes.as_slice()).ctx(self, ctx)?;
        Ok(())
    }

    /// The file feed after `since`, at most `limit` entries, and its last number.
    pub fn file_feed(
        &self,
        since: u64,
        limit: usize,
    ) -> Result<(Vec<(u64, FileEvent)>, u64), StoreError> {
        let ctx = "reading the file feed";
        let tx = self.db.begin_read().ctx(self, ctx)?;
        let feed = tx.open_table(FILE_FEED).ctx(self, ctx)?;
        let last = feed.last().ctx(self, ctx)?.map_or(0, |(k, _)| k.value());
        let mut out = Vec::new();
        for item in feed
            .range(since.saturating_add(1)..)
            .ctx(self, ctx)?
            .take(limit)
        {
            let (k, v) = item.ctx(self, ctx)?;
            let n = k.value();
            out.push((n, self.decode(|| format!("file_feed_v1[{n}]"), v.value())?));
        }
        Ok((out, last))
    }

    /// The stored file `hash`: its path and what the index keeps of it.
    pub fn file(&self, hash: &FileHash) -> Result<Option<(PathBuf, FileRow)>, FileError> {
        let ctx = "reading the file index";
        let tx = self.db.begin_read().ctx(self, ctx)?;
        let table = tx.open_table(FILES).ctx(self, ctx)?;
        let Some(v) = table.get(hash.0).ctx(self, ctx)? else {
            return Ok(None);
        };
        let row: FileRow = self.decode(|| format!("files_v1[{hash}]"), v.value())?;
        Ok(Some((self.file_path(hash)?, row)))
    }

    /// Every stored file, in hash order.
    pub fn files(&self) -> Result<Vec<(FileHash, FileRow)>, StoreError> {
        let ctx = "reading the file index";
        let tx = self.db.begin_read().ctx(self, ctx)?;
        let table = tx.open_table(FILES).ctx(self, ctx)?;
        let mut out = Vec::new();
        for item in table.iter().ctx(self, ctx)? {
            let (k, v) = item.ctx(self, ctx)?;
            let hash = FileHash(k.value());
            out.push((
                hash,
                self.decode(|| format!("files_v1[{hash}]"), v.value())?,
            ));
        }
        Ok(out)
    }

    /// Hash the stored bytes of `hash` again: whether they are still that file (a disk can
    /// rot what it holds).
    pub fn verify_file(&self, hash: &FileHash) -> Result<bool, FileError> {
        let Some((path, row)) = self.file(hash)? else {
            return Err(FileError::NotFound(*hash));
        };
        let mut file = match std::fs::File::open(&path) {
            Ok(file) => file,
            // Gone from the disk: as lost as rotted bytes.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(FileError::io(&path, "opening a stored file")(e)),
        };
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; FILE_CHUNK_BYTES];
        let mut size = 0u64;
        loop {
            let n = file
                .read(&mut buf)
                .map_err(FileError::io(&path, "reading a stored file"))?;
            if n == 0 {
                break;
            }
            size += n as u64;
            hasher.update(&buf[..n]);
        }
        Ok(size == row.size && hasher.finalize().as_bytes() == &hash.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_stored_under_its_hash_once_and_verified() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::create(&dir.path().join("store.redb")).unwrap();
        let bytes: Vec<u8> = (0..3 * FILE_CHUNK_BYTES + 17).map(|i| i as u8).collect();
        let (hash, size) = store.add_file(&mut bytes.as_slice(), 5).unwrap();
        assert_eq!((hash, size), (FileHash::of(&bytes), bytes.len() as u64));
        let (path, row) = store.file(&hash).unwrap().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
        assert_eq!(row, FileRow { size, added_ms: 5 });
        // The same bytes again: one file, the first time kept.
        store.add_file(&mut bytes.as_slice(), 9).unwrap();
        assert_eq!(store.files().unwrap(), vec![(hash, row)]);
        let partial = store.files_dir().unwrap().join(PARTIAL_DIR);
        assert_eq!(std::fs::read_dir(partial).unwrap().count(), 0);
        assert!(store.verify_file(&hash).unwrap());
        // A rotted byte is found.
        let mut rotted = bytes.clone();
        rotted[1000] ^= 1;
        std::fs::write(&path, &rotted).unwrap();
        assert!(!store.verify_file(&hash).unwrap());
        assert!(matches!(
            store.verify_file(&FileHash::of(b"never stored")),
            Err(FileError::NotFound(_))
        ));
    }

    #[test]
    fn an_in_memory_store_keeps_no_files() {
        let store = Store::in_memory().unwrap();
        assert!(matches!(
            store.add_file(&mut &b"x"[..], 0),
            Err(FileError::InMemory)
        ));
    }
}
