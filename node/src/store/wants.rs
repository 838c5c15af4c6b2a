//! The file references index (which documents refer to which file) and the want-list (files
//! this node fetches), both kept in step with the documents by the commits that write them.

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use tidesync_proto::{DocId, NodeId};

use super::files::FILES;
use super::{Ctx, Store, StoreError};
use crate::files::FileHash;
use crate::model::{MAX_WANT_SOURCES, WantRow};

/// Which documents refer to which file, with the size the reference gives. Added in format 6.
/// Key: (BLAKE3 hash, DocId). Value: size in bytes.
pub(super) const FILE_REFS: TableDefinition<([u8; 32], [u8; 16]), u64> =
    TableDefinition::new("file_refs_v1");
/// The files each document refers to now, so that a commit can drop the references it no
/// longer makes. Added in format 6.
/// Key: DocId. Value: postcard `Vec<(FileHash, u64)>`.
pub(super) const DOC_FILES: TableDefinition<[u8; 16], &[u8]> = TableDefinition::new("doc_files_v1");
/// The want-list: files referenced by objects held here and allowed by the policy for the
/// peer that sent them, not yet stored whole. Added in format 6.
/// Key: BLAKE3 hash. Value: postcard [`WantRow`].
pub(super) const WANTS: TableDefinition<[u8; 32], &[u8]> = TableDefinition::new("wants_v1");
/// What each peer's references claim of the want-list: (files, bytes). Added in format 6.
/// Key: the claimant's NodeId. Value: (files, bytes).
pub(super) const WANT_TALLY: TableDefinition<[u8; 32], (u64, u64)> =
    TableDefinition::new("want_tally_v1");

/// Most files one peer's references may have on the want-list at once.
pub const MAX_WANTED_FILES_PER_PEER: u64 = 100_000;
/// Most bytes one peer's references may have on the want-list at once (2 TiB): a hostile
/// peer cannot make this node want a thousand files of a terabyte.
pub const MAX_WANTED_BYTES_PER_PEER: u64 = 2 << 40;

/// What became of a file an arriving document made this node want.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wanted {
    /// Stored here already.
    Held,
    /// Newly on the want-list.
    Added,
    /// On the want-list already; the sources were merged.
    Merged,
    /// The claimant's quota is full: not wanted.
    OverQuota,
}

/// The index and want-list tables, open in one write transaction.
pub(super) struct FileIndex<'s, 'tx> {
    store: &'s Store,
    ctx: &'static str,
    refs: redb::Table<'tx, ([u8; 32], [u8; 16]), u64>,
    doc_files: redb::Table<'tx, [u8; 16], &'static [u8]>,
    wants: redb::Table<'tx, [u8; 32], &'static [u8]>,
    tally: redb::Table<'tx, [u8; 32], (u64, u64)>,
    files: redb::Table<'tx, [u8; 32], &'static [u8]>,
}

impl<'s, 'tx> FileIndex<'s, 'tx> {
    pub(super) fn open(
        store: &'s Store,
        tx: &'tx redb::WriteTransaction,
        ctx: &'static str,
    ) -> Result<Self, StoreError> {
        Ok(FileIndex {
            store,
            ctx,
            refs: tx.open_table(FILE_REFS).ctx(store, ctx)?,
            doc_files: tx.open_table(DOC_FILES).ctx(store, ctx)?,
            wants: tx.open_table(WANTS).ctx(store, ctx)?,
            tally: tx.open_table(WANT_TALLY).ctx(store, ctx)?,
            files: tx.open_table(FILES).ctx(store, ctx)?,
        })
    }

    /// Record that `doc` now refers to `files`, dropping its old references; a wanted file
    /// that no document refers to any more leaves the want-list.
    pub(super) fn set_doc_files(
        &mut self,
        doc: &DocId,
        files: &[(FileHash, u64)],
    ) -> Result<(), StoreError> {
        let (store, ctx) = (self.store, self.ctx);
        let old: Vec<(FileHash, u64)> = match self.doc_files.get(doc.0).ctx(store, ctx)? {
            Some(v) => store.decode(|| format!("doc_files_v1[{doc}]"), v.value())?,
            None => Vec::new(),
        };
        if old == files {
            return Ok(());
        }
        for (hash, _) in &old {
            if files.iter().any(|(h, _)| h == hash) {
                continue;
            }
            self.refs.remove((hash.0, doc.0)).ctx(store, ctx)?;
            let still = self
                .refs
                .range((hash.0, [0u8; 16])..=(hash.0, [0xff; 16]))
                .ctx(store, ctx)?
                .next()
                .is_some();
            if !still {
                self.unwant(hash)?;
            }
        }
        for (hash, size) in files {
            self.refs.insert((hash.0, doc.0), *size).ctx(store, ctx)?;
        }
        if files.is_empty() {
            self.doc_files.remove(doc.0).ctx(store, ctx)?;
        } else {
            let bytes = postcard::to_stdvec(files).map_err(|x| store.encode_error(x))?;
            self.doc_files
                .insert(doc.0, bytes.as_slice())
                .ctx(store, ctx)?;
        }
        Ok(())
    }

    /// Put `want` on the want-list unless the file is stored or the claimant's quota is full;
    /// a file wanted already gains the sources.
    pub(super) fn want(&mut self, want: &WantRow) -> Result<Wanted, StoreError> {
        let (store, ctx) = (self.store, self.ctx);
        let key = want.hash.0;
        if self.files.get(key).ctx(store, ctx)?.is_some() {
            return Ok(Wanted::Held);
        }
        let existing: Option<WantRow> = match self.wants.get(key).ctx(store, ctx)? {
            Some(v) => Some(store.decode(|| format!("wants_v1[{}]", want.hash), v.value())?),
            None => None,
        };
        if let Some(mut row) = existing {
            let before = row.clone();
            for s in &want.sources {
                if !row.sources.contains(s) && row.sources.len() < MAX_WANT_SOURCES {
                    row.sources.push(*s);
                }
            }
            row.on_demand &= want.on_demand;
            if row != before {
                self.put(&row)?;
            }
            return Ok(Wanted::Merged);
        }
        let (files, bytes) = self
            .tally
            .get(want.claimant.0)
            .ctx(store, ctx)?
            .map(|v| v.value())
            .unwrap_or((0, 0));
        if files + 1 > MAX_WANTED_FILES_PER_PEER
            || bytes.saturating_add(want.size) > MAX_WANTED_BYTES_PER_PEER
        {
            return Ok(Wanted::OverQuota);
        }
        self.tally
            .insert(want.claimant.0, (files + 1, bytes + want.size))
            .ctx(store, ctx)?;
        self.put(want)?;
        Ok(Wanted::Added)
    }

    fn put(&mut self, row: &WantRow) -> Result<(), StoreError> {
        let bytes = postcard::to_stdvec(row).map_err(|x| self.store.encode_error(x))?;
        self.wants
            .insert(row.hash.0, bytes.as_slice())
            .ctx(self.store, self.ctx)?;
        Ok(())
    }

    /// Take `hash` off the want-list, giving its claimant's quota back.
    pub(super) fn unwant(&mut self, hash: &FileHash) -> Result<(), StoreError> {
        let (store, ctx) = (self.store, self.ctx);
        let row: WantRow = match self.wants.remove(hash.0).ctx(store, ctx)? {
            Some(v) => store.decode(|| format!("wants_v1[{hash}]"), v.value())?,
            None => return Ok(()),
        };
        let (files, bytes) = self
            .tally
            .get(row.claimant.0)
            .ctx(store, ctx)?
            .map(|v| v.value())
            .unwrap_or((0, 0));
        if files <= 1 {
            self.tally.remove(row.claimant.0).ctx(store, ctx)?;
        } else {
            self.tally
                .insert(row.claimant.0, (files - 1, bytes.saturating_sub(row.size)))
                .ctx(store, ctx)?;
        }
        Ok(())
    }
}

impl Store {
    /// The want-list, in hash order.
    pub fn wants(&self) -> Result<Vec<WantRow>, StoreError> {
        let ctx = "reading the want-list";
        let tx = self.db.begin_read().ctx(self, ctx)?;
        let table = tx.open_table(WANTS).ctx(self, ctx)?;
        let mut out = Vec::new();
        for item in table.iter().ctx(self, ctx)? {
            let (k, v) = item.ctx(self, ctx)?;
            let hash = FileHash(k.value());
            out.push(self.decode(|| format!("wants_v1[{hash}]"), v.value())?);
        }
        Ok(out)
    }

    /// The wanted file `hash`, if it is wanted.
    pub fn want(&self, hash: &FileHash) -> Result<Option<WantRow>, StoreError> {
        let ctx = "reading the want-list";
        let tx = self.db.begin_read().ctx(self, ctx)?;
        let table = tx.open_table(WANTS).ctx(self, ctx)?;
        match table.get(hash.0).ctx(self, ctx)? {
            Some(v) => Ok(Some(
                self.decode(|| format!("wants_v1[{hash}]"), v.value())?,
            )),
            None => Ok(None),
        }
    }

    /// Up to `limit` documents that refer to file `hash`, with the size each reference gives.
    pub fn docs_referring(
        &self,
        hash: &FileHash,
        limit: usize,
    ) -> Result<Vec<(DocId, u64)>, StoreError> {
        let ctx = "reading the file references";
        let tx = self.db.begin_read().ctx(self, ctx)?;
        let table = tx.open_table(FILE_REFS).ctx(self, ctx)?;
        let mut out = Vec::new();
        for item in table
            .range((hash.0, [0u8; 16])..=(hash.0, [0xff; 16]))
            .ctx(self, ctx)?
            .take(limit)
        {
            let (k, v) = item.ctx(self, ctx)?;
            out.push((DocId(k.value().1), v.value()));
        }
        Ok(out)
    }

    /// The files document `doc` refers to now, with the sizes its references give.
    pub fn doc_files(&self, doc: &DocId) -> Result<Vec<(FileHash, u64)>, StoreError> {
        let ctx = "reading a document's files";
        let tx = self.db.begin_read().ctx(self, ctx)?;
        let table = tx.open_table(DOC_FILES).ctx(self, ctx)?;
        match table.get(doc.0).ctx(self, ctx)? {
            Some(v) => self.decode(|| format!("doc_files_v1[{doc}]"), v.value()),
            None => Ok(Vec::new()),
        }
    }

    /// Hand `f` every document that refers to files, with the files it refers to now, one
    /// at a time (nothing gathers them all).
    pub fn each_doc_with_files(
        &self,
        mut f: impl FnMut(DocId, Vec<(FileHash, u64)>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let ctx = "reading the documents' files";
        let tx = self.db.begin_read().ctx(self, ctx)?;
        let table = tx.open_table(DOC_FILES).ctx(self, ctx)?;
        for item in table.iter().ctx(self, ctx)? {
            let (k, v) = item.ctx(self, ctx)?;
            let doc = DocId(k.value());
            f(
                doc,
                self.decode(|| format!("doc_files_v1[{doc}]"), v.value())?,
            )?;
        }
        Ok(())
    }

    /// Whether any document refers to file `hash`.
    pub fn is_referenced(&self, hash: &FileHash) -> Result<bool, StoreError> {
        Ok(!self.docs_referring(hash, 1)?.is_empty())
    }

    /// Record what fetching the wanted files achieved: the segments now durable and the last
    /// error of each. A file no longer wanted is left alone. Durable: the caller synced those
    /// segments' bytes first, so a recorded segment survives `kill -9`.
    pub fn save_want_progress(
        &self,
        progress: &[(FileHash, Vec<u8>, Option<String>)],
    ) -> Result<(), StoreError> {
        let ctx = "saving download progress";
        let tx = self.db.begin_write().ctx(self, ctx)?;
        {
            let mut table = tx.open_table(WANTS).ctx(self, ctx)?;
            for (hash, done, error) in progress {
                let row: Option<WantRow> = match table.get(hash.0).ctx(self, ctx)? {
                    Some(v) => Some(self.decode(|| format!("wants_v1[{hash}]"), v.value())?),
                    None => None,
                };
                if let Some(mut row) = row {
                    row.done.clone_from(done);
                    row.last_error.clone_from(error);
                    let bytes = postcard::to_stdvec(&row).map_err(|x| self.encode_error(x))?;
                    table.insert(hash.0, bytes.as_slice()).ctx(self, ctx)?;
                }
            }
        }
        tx.commit().ctx(self, ctx)
    }

    /// Put files on the want-list outside a document commit (a stored file found rotted, for
    /// example); what became of each.
    pub fn add_wants(&self, wants: &[WantRow]) -> Result<Vec<Wanted>, StoreError> {
        let ctx = "adding to the want-list";
        let tx = self.db.begin_write().ctx(self, ctx)?;
        let mut out = Vec::new();
        {
            let mut index = FileIndex::open(self, &tx, ctx)?;
            for w in wants {
                out.push(index.want(w)?);
            }
        }
        tx.commit().ctx(self, ctx)?;
        Ok(out)
    }

    /// Each peer's claim on the want-list: (files, bytes).
    pub fn want_tally(&self, peer: &NodeId) -> Result<(u64, u64), StoreError> {
        let ctx = "reading the want-list quota";
        let tx = self.db.begin_read().ctx(self, ctx)?;
        let table = tx.open_table(WANT_TALLY).ctx(self, ctx)?;
        Ok(table
            .get(peer.0)
            .ctx(self, ctx)?
            .map(|v| v.value())
            .unwrap_or((0, 0)))
    }

    /// Rebuild the file references of every document (format 5 → 6).
    pub(super) fn index_all_file_refs(
        &self,
        tx: &redb::WriteTransaction,
    ) -> Result<u64, StoreError> {
        let ctx = "indexing the files documents refer to";
        let docs = tx.open_table(super::DOCS).ctx(self, ctx)?;
        let mut index = FileIndex::open(self, tx, ctx)?;
        let mut n = 0;
        for item in docs.iter().ctx(self, ctx)? {
            let (k, v) = item.ctx(self, ctx)?;
            let no = k.value();
            let row: super::DocRow = self.decode(|| format!("docs_v2[{no}]"), v.value())?;
            let Ok(doc) = automerge::Automerge::load(&row.state) else {
                continue;
            };
            let files = crate::doc::file_refs(&doc);
            if !files.is_empty() {
                index.set_doc_files(&row.doc, &files)?;
                n += 1;
            }
        }
        Ok(n)
    }
}
