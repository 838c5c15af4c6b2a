//! The files a bundle carries: copied from the store into a bundle being written, each hashed
//! on the way; and stored from a bundle being read when this node wants them, each verified
//! against its hash before it is indexed.

use std::io::{Read, Write};

use tidesync_proto::NodeId;

use super::{BundleError, BundleFile, ImportReport, Opened};
use crate::files::{FILE_CHUNK_BYTES, FileHash};
use crate::store::{FileError, FillError, Store};

/// A copier for [`super::stream::write`] that reads each file from `store`, for `to`. A file
/// whose stored bytes no longer hash to its name fails the export rather than travel.
pub fn copy_from_store(
    store: &Store,
    to: NodeId,
) -> impl FnMut(&BundleFile, &mut dyn Write) -> Result<(), BundleError> + '_ {
    move |file, out| {
        let failed = |source| BundleError::ExportFile {
            to,
            hash: file.hash,
            source: Box::new(source),
        };
        let path = store.file_path(&file.hash).map_err(failed)?;
        let mut src = std::fs::File::open(&path)
            .map_err(FileError::io(&path, "reading a file for a bundle"))
            .map_err(failed)?;
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; FILE_CHUNK_BYTES];
        let mut size = 0u64;
        loop {
            let n = match src.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(failed(FileError::Io {
                        path,
                        context: "reading a file for a bundle",
                        source: e,
                    }));
                }
            };
            size += n as u64;
            if size > file.size {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])
                .map_err(|source| BundleError::Write { to, source })?;
        }
        if size != file.size || FileHash(*hasher.finalize().as_bytes()) != file.hash {
            return Err(failed(FileError::Rotted(file.hash)));
        }
        Ok(())
    }
}

/// Read the files of an opened bundle from `from`, storing each one this node wants (on its
/// want-list, so its references and the policy for their sender let it in) and does not hold:
/// written to a partial file, checked against its hash and size, and only then moved into place
/// and indexed, then handed to `stored`. The others are read past. Counts go to `report`.
pub fn store_wanted(
    store: &Store,
    opened: &mut Opened<'_>,
    now_ms: i64,
    report: &mut ImportReport,
    stored: &mut dyn FnMut(BundleFile),
) -> Result<(), BundleError> {
    let from = opened.body.from;
    opened.each_file(|file, src| {
        let local = |source| BundleError::StoreFile {
            from,
            hash: file.hash,
            source: Box::new(source),
        };
        let held = store
            .file(&file.hash)
            .map_err(local)?
            .is_some_and(|(_, row)| row.size == file.size);
        let wanted = store
            .want(&file.hash)
            .map_err(|e| local(e.into()))?
            .is_some_and(|w| w.size == file.size);
        if held || !wanted {
            return Ok(());
        }
        let mut partial = store.partial_file().map_err(local)?;
        let copied = partial.fill_from(src);
        let (hash, size) = partial.written();
        let bad = match copied {
            Err(FillError::Write(e)) => Some(local(e)),
            Err(FillError::Read(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                Some(BundleError::Truncated { part: "files" })
            }
            Err(FillError::Read(e)) => Some(BundleError::Damaged {
                from,
                detail: format!("reading file {}: {e}", file.hash),
            }),
            Ok(()) if size < file.size => Some(BundleError::Truncated { part: "files" }),
            Ok(()) if hash != file.hash => Some(BundleError::Damaged {
                from,
                detail: format!("the bytes of file {} do not match its hash", file.hash),
            }),
            Ok(()) => None,
        };
        if let Some(e) = bad {
            // Nothing of it is kept: importing the bundle again reads the file again whole.
            let _ = std::fs::remove_file(&partial.path);
            return Err(e);
        }
        store.keep_file(partial, now_ms).map_err(local)?;
        report.files_stored += 1;
        report.file_bytes_stored += file.size;
        stored(*file);
        Ok(())
    })
}
