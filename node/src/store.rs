//! The redb store: documents, signed changes, the node's change log and the name index.
//!
//! Every table name carries a version; a store whose `format` differs from [`STORE_FORMAT`] is
//! refused rather than misread. Values that are structs are postcard-encoded.
//! One local write commits its document state, its signed change, its log entry and its names in
//! one transaction with immediate durability, so a write acknowledged to its writer survives a
//! crash and a crash never leaves half of one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use automerge::{Automerge, ChangeHash};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use tidesync_proto::{Checkpoint, DocHeader, DocId, NodeId, ObjectId, SignedChange, TypeName};

use crate::engine::{DocRecord, Persist};

/// The value of `meta_v1["format"]` this build reads and writes.
pub const STORE_FORMAT: &str = "tidesync-store-1";

/// Node-wide settings.
/// Key: setting name (`format`). Value: UTF-8 bytes.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta_v1");
/// What is known of each document.
/// Key: DocId (16 bytes). Value: postcard [`DocRecord`].
const DOCS: TableDefinition<[u8; 16], &[u8]> = TableDefinition::new("docs_v1");
/// Each document's current Automerge state.
/// Key: DocId (16 bytes). Value: `Automerge::save()` bytes.
const DOC_STATE: TableDefinition<[u8; 16], &[u8]> = TableDefinition::new("doc_state_v1");
/// Every signed change this node holds.
/// Key: (DocId, Automerge change hash). Value: postcard [`SignedChange`].
const CHANGES: TableDefinition<([u8; 16], [u8; 32]), &[u8]> = TableDefinition::new("changes_v1");
/// The node's change log: every change it stored, local or received, in the order it stored them.
/// Key: SEQ, dense from 1. Value: postcard [`LogEntry`].
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log_v1");
/// The (type, id) index of the names documents have on this node.
/// Key: (type name, local object id). Value: DocId (16 bytes).
const NAMES: TableDefinition<(&str, &str), [u8; 16]> = TableDefinition::new("names_v1");
/// Verified changes held until their dependencies arrive (they are not in the log yet).
/// Key: (DocId, change hash). Value: postcard `(DocHeader, SignedChange)`.
const PENDING: TableDefinition<([u8; 16], [u8; 32]), &[u8]> = TableDefinition::new("pending_v1");
/// Live and deleted objects per type, kept in step with `docs_v1` by every commit.
/// Key: type name. Value: (live, deleted).
const COUNTS: TableDefinition<&str, (u64, u64)> = TableDefinition::new("counts_v1");
/// What this node knows of each peer's sync: checkpoints and counters.
/// Key: peer NodeId (32 bytes). Value: postcard [`PeerRecord`].
const PEERS: TableDefinition<[u8; 32], &[u8]> = TableDefinition::new("peers_v1");

/// One entry of the change log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    pub doc: DocId,
    pub hash: [u8; 32],
    pub author: NodeId,
    /// The peer this node received the change from; `None` for its own writes.
    pub from: Option<NodeId>,
    /// When this node stored the change, Unix milliseconds.
    pub time_ms: i64,
}

/// What a node remembers of its sync with one peer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRecord {
    /// The peer's log is durably stored here up to this checkpoint.
    pub received: Checkpoint,
    /// The peer acknowledged our log up to this SEQ.
    pub acked: u64,
    /// Changes received from the peer and stored (not counting duplicates).
    pub changes_in: u64,
    /// Changes sent to the peer.
    pub changes_out: u64,
    /// Changes from the peer that failed verification or policy.
    pub rejected: u64,
    /// Changes we sent that the peer reported rejecting.
    pub rejected_by_peer: u64,
    /// Duplicates received (changes already held).
    pub duplicates: u64,
    /// Last time a batch was stored or acknowledged, Unix milliseconds.
    pub last_sync_ms: i64,
}

/// A range of the log read for one peer.
#[derive(Debug, Default)]
pub struct OutBatch {
    pub docs: Vec<DocHeader>,
    pub changes: Vec<SignedChange>,
    /// The last log entry scanned (sent or skipped).
    pub upto: Checkpoint,
}

/// One document's share of a received batch, ready to commit.
#[derive(Debug)]
pub struct ReceivedDoc {
    pub doc_id: DocId,
    pub header: DocHeader,
    /// The record to store, when at least one change was applied.
    pub record: Option<DocRecord>,
    /// The new document state, when at least one change was applied.
    pub state: Option<Vec<u8>>,
    /// Applied changes, in the order they were applied: these join the log.
    pub applied: Vec<(SignedChange, ChangeHash, NodeId)>,
    /// Changes to hold until their dependencies arrive.
    pub held: Vec<(SignedChange, ChangeHash)>,
    /// Previously held changes that have now been applied.
    pub released: Vec<ChangeHash>,
}

/// Why the store failed. Each names the store file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "store {path} is in use by another process (is a tidesync node already running on this home?)"
    )]
    InUse { path: PathBuf },
    #[error("store {path} does not exist (run `tidesync init` first)")]
    Missing { path: PathBuf },
    #[error(
        "store {path} is damaged: {detail}. The file was left as it is; restore it from a backup"
    )]
    Corrupted { path: PathBuf, detail: String },
    #[error("store {path} has format {found:?}, this build reads {STORE_FORMAT:?}")]
    Format { path: PathBuf, found: String },
    #[error("store {path}: {context}: {detail}")]
    Io {
        path: PathBuf,
        context: &'static str,
        detail: String,
    },
    #[error("store {path}: record {what} cannot be decoded: {detail}")]
    Decode {
        path: PathBuf,
        what: String,
        detail: String,
    },
}

/// The redb store of one node.
pub struct Store {
    db: Database,
    path: PathBuf,
}

/// A page of object ids.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdPage {
    pub ids: Vec<String>,
    /// Pass as `after` to get the next page; absent on the last page.
    pub next: Option<String>,
}

/// Live and deleted object counts of one type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypeCount {
    pub live: u64,
    pub deleted: u64,
}

impl Store {
    /// Create a new, empty store; refuses an existing file.
    pub fn create(path: &Path) -> Result<Store, StoreError> {
        if path.exists() {
            return Err(StoreError::Io {
                path: path.into(),
                context: "creating the store",
                detail: "a store file already exists".into(),
            });
        }
        let db = Database::create(path).map_err(|e| open_error(path, e))?;
        let store = Store {
            db,
            path: path.into(),
        };
        store.init_tables()?;
        Ok(store)
    }

    /// Open an existing store with a page cache of `cache_bytes`.
    pub fn open(path: &Path, cache_bytes: usize) -> Result<Store, StoreError> {
        if !path.exists() {
            return Err(StoreError::Missing { path: path.into() });
        }
        let db = Database::builder()
            .set_cache_size(cache_bytes)
            .open(path)
            .map_err(|e| open_error(path, e))?;
        let store = Store {
            db,
            path: path.into(),
        };
        store.check_format()?;
        Ok(store)
    }

    /// An in-memory store, for simulations and tests.
    pub fn in_memory() -> Result<Store, StoreError> {
        let path = PathBuf::from("<memory>");
        let db = Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .map_err(|e| open_error(&path, e))?;
        let store = Store { db, path };
        store.init_tables()?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn decode<'a, T: Deserialize<'a>>(
        &self,
        what: impl FnOnce() -> String,
        bytes: &'a [u8],
    ) -> Result<T, StoreError> {
        postcard::from_bytes(bytes).map_err(|e| StoreError::Decode {
            path: self.path.clone(),
            what: what(),
            detail: e.to_string(),
        })
    }

    fn init_tables(&self) -> Result<(), StoreError> {
        let ctx = "creating tables";
        let tx = self.db.begin_write().ctx(self, ctx)?;
        {
            let mut meta = tx.open_table(META).ctx(self, ctx)?;
            meta.insert("format", STORE_FORMAT.as_bytes())
                .ctx(self, ctx)?;
            tx.open_table(DOCS).ctx(self, ctx)?;
            tx.open_table(DOC_STATE).ctx(self, ctx)?;
            tx.open_table(CHANGES).ctx(self, ctx)?;
            tx.open_table(LOG).ctx(self, ctx)?;
            tx.open_table(NAMES).ctx(self, ctx)?;
            tx.open_table(PENDING).ctx(self, ctx)?;
            tx.open_table(PEERS).ctx(self, ctx)?;
            tx.open_table(COUNTS).ctx(self, ctx)?;
        }
        tx.commit().ctx(self, ctx)
    }

    fn check_format(&self) -> Result<(), StoreError> {
        let ctx = "reading the format";
        let tx = self.db.begin_read().ctx(self, ctx)?;
        let found = match tx.open_table(META) {
            Ok(meta) => meta
                .get("format")
                .ctx(self, ctx)?
                .map(|v| String::from_utf8_lossy(v.value()).into_owned()),
            Err(redb::TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(classify(&self.path, ctx, e.into())),
        };
        match found {
            Some(f) if f == STORE_FORMAT => Ok(()),
            other => Err(StoreError::Format {
                path: self.path.clone(),
                found: other.unwrap_or_else(|| "none".into()),
            }),
        }
    }

    /// A read transaction for many lookups (a received batch makes thousands).
    pub fn reader(&self) -> Result<Reader<'_>, StoreError> {
        let ctx = "starting a read";
        let tx = self.db.begin_read().ctx(self, ctx)?;
        Ok(Reader {
            store: self,
            names: tx.open_table(NAMES).ctx(self, ctx)?,
            docs: tx.open_table(DOCS).ctx(self, ctx)?,
            states: tx.open_table(DOC_STATE).ctx(self, ctx)?,
            changes: tx.open_table(CHANGES).ctx(self, ctx)?,
            pending: tx.open_table(PENDING).ctx(self, ctx)?,
        })
    }

    /// The document a local name points to.
    pub fn lookup(&self, ty: &TypeName, id: &ObjectId) -> Result<Option<DocId>, StoreError> {
        self.reader()?.lookup(ty, id)
    }

    /// What is known of a document.
    pub fn record(&self, doc: &DocId) -> Result<Option<DocRecord>, StoreError> {
        self.reader()?.record(doc)
    }

    /// A document's current Automerge state.
    pub fn load_doc(&self, doc: &DocId) -> Result<Option<Automerge>, StoreError> {
        self.reader()?.load_doc(doc)
    }

    /// Commit several local writes in one durable transaction; their SEQs, in order.
    pub fn commit_writes(&self, writes: &[&Persist]) -> Result<Vec<u64>, StoreError> {
        let ctx = "committing a write";
        let tx = self.db.begin_write().ctx(self, ctx)?;
        let mut seqs = Vec::with_capacity(writes.len());
        {
            let mut docs = tx.open_table(DOCS).ctx(self, ctx)?;
            let mut states = tx.open_table(DOC_STATE).ctx(self, ctx)?;
            let mut changes = tx.open_table(CHANGES).ctx(self, ctx)?;
            let mut log = tx.open_table(LOG).ctx(self, ctx)?;
            let mut names = tx.open_table(NAMES).ctx(self, ctx)?;
            let mut seq = log
                .last()
                .ctx(self, ctx)?
                .map(|(k, _)| k.value())
                .unwrap_or(0);
            let mut counts = tx.open_table(COUNTS).ctx(self, ctx)?;
            for p in writes {
                self.put_record(&mut docs, &mut counts, &p.doc_id, &p.record)?;
                states
                    .insert(p.doc_id.0, crate::doc::save_state(&p.doc).as_slice())
                    .ctx(self, ctx)?;
                let change = postcard::to_stdvec(&p.change).map_err(|x| self.encode_error(x))?;
                changes
                    .insert((p.doc_id.0, p.hash.0), change.as_slice())
                    .ctx(self, ctx)?;
                seq += 1;
                let entry = LogEntry {
                    doc: p.doc_id,
                    hash: p.hash.0,
                    author: p.author,
                    from: None,
                    time_ms: p.time_ms,
                };
                let entry = postcard::to_stdvec(&entry).map_err(|x| self.encode_error(x))?;
                log.insert(seq, entry.as_slice()).ctx(self, ctx)?;
                names
                    .insert(
                        (p.record.ty.as_str(), p.record.local_id.as_str()),
                        p.doc_id.0,
                    )
                    .ctx(self, ctx)?;
                seqs.push(seq);
            }
        }
        tx.commit().ctx(self, ctx)?;
        Ok(seqs)
    }

    fn encode_error(&self, e: postcard::Error) -> StoreError {
        StoreError::Io {
            path: self.path.clone(),
            context: "encoding a record",
            detail: e.to_string(),
        }
    }

    /// Ids of live objects of `ty` after `after`, at most `limit` of them.
    pub fn list(
        &self,
        ty: &TypeName,
        after: Option<&str>,
        limit: usize,
    ) -> Result<IdPage, StoreError> {
        let ctx = "listing objects";
        let tx = self.db.begin_read().ctx(self, ctx)?;
        let names = tx.open_table(NAMES).ctx(self, ctx)?;
        let docs = tx.open_table(DOCS).ctx(self, ctx)?;
        let start = (ty.as_str(), after.unwrap_or(""));
        let mut ids = Vec::new();
        let mut next = None;
        for item in names.range(start..).ctx(self, ctx)? {
            let (key, value) = item.ctx(self, ctx)?;
            let (t, id) = key.value();
            if t != ty.as_str() {
                break;
            }
            if Some(id) == after {
                continue;
            }
            let doc = DocId(value.value());
            let Some(rec) = docs.get(doc.0).ctx(self, ctx)? else {
                continue;
            };
            let rec: DocRecord = self.decode(|| format!("docs_v1[{doc}]"), rec.value())?;
            if !rec.live {
                continue;
            }
            if ids.len() == limit {
                next = ids.last().cloned();
                break;
            }
            ids.push(id.to_string());
        }
        Ok(IdPage { ids, next })
    }

    /// A stored signed change.
    pub fn change(
        &self,
        doc: &DocId,
        hash: &ChangeHash,
    ) -> Result<Option<SignedChange>, StoreError> {
        let ctx = "reading a change";
        let tx = self.db.begin_read().ctx(self, ctx)?;
        let changes = tx.open_table(CHANGES).ctx(self, ctx)?;
        let found = changes.get((doc.0, hash.0)).ctx(self, ctx)?;
        found
            .map(|v| self.decode(|| format!("changes_v1[{doc}, {hash}]"), v.value()))
            .transpose()
    }

    /// Log entries with SEQ greater than `since`, at most `limit`, in order.
    pub fn log_since(&self, since: u64, limit: usize) -> Result<Vec<(u64, LogEntry)>, StoreError> {
        let ctx = "reading the change log";
        let tx = self.db.begin_read().ctx(self, ctx)?;
        let log = tx.open_table(LOG).ctx(self, ctx)?;
        let mut out = Vec::new();
        for item in log
            .range(since.saturating_add(1)..)
            .ctx(self, ctx)?
            .take(limit)
        {
            let (k, v) = item.ctx(self, ctx)?;
            let seq = k.value();
            out.push((seq, self.decode(|| format!("log_v1[{seq}]"), v.value())?));
        }
        Ok(out)
    }

    /// The highest SEQ in the change log, 0 when empty.
    pub fn last_seq(&self) -> Result<u64, StoreError> {
        let ctx = "reading the change log";
        let tx = self.db.begin_read().ctx(self, ctx)?;
        let log = tx.open_table(LOG).ctx(self, ctx)?;
        Ok(log
            .last()
            .ctx(self, ctx)?
            .map(|(k, _)| k.value())
            .unwrap_or(0))
    }

    /// Live and deleted object counts per type (read from `counts_v1`, not by scanning).
    pub fn counts(&self) -> Result<BTreeMap<String, TypeCount>, StoreError> {
        let ctx = "counting objects";
        let tx = self.db.begin_read().ctx(self, ctx)?;
        let counts = tx.open_table(COUNTS).ctx(self, ctx)?;
        let mut out = BTreeMap::new();
        for item in counts.iter().ctx(self, ctx)? {
            let (k, v) = item.ctx(self, ctx)?;
            let (live, deleted) = v.value();
            if live + deleted > 0 {
                out.insert(k.value().to_string(), TypeCount { live, deleted });
            }
        }
        Ok(out)
    }

    /// Store a document record and keep `counts_v1` in step with it.
    fn put_record(
        &self,
        docs: &mut redb::Table<[u8; 16], &[u8]>,
        counts: &mut redb::Table<&str, (u64, u64)>,
        doc: &DocId,
        record: &DocRecord,
    ) -> Result<(), StoreError> {
        let ctx = "storing a document record";
        let bytes = postcard::to_stdvec(record).map_err(|x| self.encode_error(x))?;
        let old = docs.insert(doc.0, bytes.as_slice()).ctx(self, ctx)?;
        let old: Option<DocRecord> = match old {
            Some(v) => Some(self.decode(|| format!("docs_v1[{doc}]"), v.value())?),
            None => None,
        };
        let mut bump = |ty: &str, live: bool, add: bool| -> Result<(), StoreError> {
            let (mut l, mut d) = counts
                .get(ty)
                .ctx(self, ctx)?
                .map(|v| v.value())
                .unwrap_or((0, 0));
            let slot = if live { &mut l } else { &mut d };
            *slot = if add {
                *slot + 1
            } else {
                slot.saturating_sub(1)
            };
            counts.insert(ty, (l, d)).ctx(self, ctx)?;
            Ok(())
        };
        if let Some(old) = old {
            if old.live == record.live && old.ty == record.ty {
                return Ok(());
            }
            bump(old.ty.as_str(), old.live, false)?;
        }
        bump(record.ty.as_str(), record.live, true)
    }

    /// The log entry at `seq`.
    pub fn log_entry(&self, seq: u64) -> Result<Option<LogEntry>, StoreError> {
        let ctx = "reading the change log";
        let tx = self.db.begin_read().ctx(self, ctx)?;
        let log = tx.open_table(LOG).ctx(self, ctx)?;
        let found = log.get(seq).ctx(self, ctx)?;
        found
            .map(|v| self.decode(|| format!("log_v1[{seq}]"), v.value()))
            .transpose()
    }

    /// The checkpoint naming log position `seq` (the start of the log for 0).
    pub fn checkpoint(&self, seq: u64) -> Result<Option<Checkpoint>, StoreError> {
        if seq == 0 {
            return Ok(Some(Checkpoint::default()));
        }
        Ok(self
            .log_entry(seq)?
            .map(|e| Checkpoint { seq, hash: e.hash }))
    }

    /// How many changes are held for missing dependencies.
    pub fn pending_count(&self) -> Result<u64, StoreError> {
        let ctx = "counting held changes";
        let tx = self.db.begin_read().ctx(self, ctx)?;
        let pending = tx.open_table(PENDING).ctx(self, ctx)?;
        pending.len().ctx(self, ctx)
    }

    /// What this node remembers of `peer` (defaults for a peer never synced).
    pub fn peer(&self, peer: &NodeId) -> Result<PeerRecord, StoreError> {
        let ctx = "reading peer state";
        let tx = self.db.begin_read().ctx(self, ctx)?;
        let peers = tx.open_table(PEERS).ctx(self, ctx)?;
        let found = peers.get(peer.0).ctx(self, ctx)?;
        Ok(found
            .map(|v| self.decode(|| format!("peers_v1[{peer}]"), v.value()))
            .transpose()?
            .unwrap_or_default())
    }

    /// Update what this node remembers of `peer`. Not fsynced on its own: the next durable
    /// commit carries it (it holds counters and acknowledgements, which are safe to redo).
    pub fn update_peer(
        &self,
        peer: &NodeId,
        f: impl FnOnce(&mut PeerRecord),
    ) -> Result<PeerRecord, StoreError> {
        let ctx = "updating peer state";
        let mut tx = self.db.begin_write().ctx(self, ctx)?;
        tx.set_durability(redb::Durability::None)
            .map_err(|e| StoreError::Io {
                path: self.path.clone(),
                context: ctx,
                detail: e.to_string(),
            })?;
        let record = {
            let mut peers = tx.open_table(PEERS).ctx(self, ctx)?;
            let mut record: PeerRecord = match peers.get(peer.0).ctx(self, ctx)? {
                Some(v) => self.decode(|| format!("peers_v1[{peer}]"), v.value())?,
                None => PeerRecord::default(),
            };
            f(&mut record);
            let bytes = postcard::to_stdvec(&record).map_err(|x| self.encode_error(x))?;
            peers.insert(peer.0, bytes.as_slice()).ctx(self, ctx)?;
            record
        };
        tx.commit().ctx(self, ctx)?;
        Ok(record)
    }

    /// Read the log after `after` for sending to a peer: at most `max_changes` changes or
    /// `max_bytes` of change bytes, scanning at most `max_scan` entries. Entries for which
    /// `skip` is true are passed over (but still covered by `upto`).
    pub fn read_batch(
        &self,
        after: u64,
        max_changes: usize,
        max_bytes: usize,
        max_scan: usize,
        skip: impl Fn(&LogEntry) -> bool,
    ) -> Result<OutBatch, StoreError> {
        let ctx = "reading a batch to send";
        let tx = self.db.begin_read().ctx(self, ctx)?;
        let log = tx.open_table(LOG).ctx(self, ctx)?;
        let changes = tx.open_table(CHANGES).ctx(self, ctx)?;
        let docs = tx.open_table(DOCS).ctx(self, ctx)?;
        let mut batch = OutBatch {
            upto: Checkpoint {
                seq: after,
                hash: [0; 32],
            },
            ..OutBatch::default()
        };
        let mut bytes = 0usize;
        let mut seen_docs = std::collections::HashSet::new();
        for item in log
            .range(after.saturating_add(1)..)
            .ctx(self, ctx)?
            .take(max_scan)
        {
            if batch.changes.len() >= max_changes || bytes >= max_bytes {
                break;
            }
            let (k, v) = item.ctx(self, ctx)?;
            let seq = k.value();
            let entry: LogEntry = self.decode(|| format!("log_v1[{seq}]"), v.value())?;
            batch.upto = Checkpoint {
                seq,
                hash: entry.hash,
            };
            if skip(&entry) {
                continue;
            }
            let Some(raw) = changes.get((entry.doc.0, entry.hash)).ctx(self, ctx)? else {
                continue;
            };
            let change: SignedChange =
                self.decode(|| format!("changes_v1[{}]", entry.doc), raw.value())?;
            bytes += change.bytes.len();
            if seen_docs.insert(entry.doc) {
                if let Some(rec) = docs.get(entry.doc.0).ctx(self, ctx)? {
                    let rec: DocRecord =
                        self.decode(|| format!("docs_v1[{}]", entry.doc), rec.value())?;
                    batch.docs.push(DocHeader {
                        doc: entry.doc,
                        origin: rec.origin,
                        ty: rec.ty,
                        id: rec.id,
                    });
                }
            }
            batch.changes.push(change);
        }
        Ok(batch)
    }

    /// Commit a received batch from `from` in one durable transaction: applied changes join
    /// the log, held ones are kept, and the peer's checkpoint moves to `upto` if the batch
    /// leaves no gap: it starts at or before the checkpoint (`after`) and ends at or past it,
    /// or it starts at 0 (the peer starting its log over). Returns the new last SEQ of the log
    /// and whether the checkpoint moved.
    pub fn commit_received(
        &self,
        from: &NodeId,
        docs: &[ReceivedDoc],
        after: u64,
        upto: Checkpoint,
        now_ms: i64,
        counts: (u64, u64, u64),
    ) -> Result<(u64, bool), StoreError> {
        let ctx = "committing a received batch";
        let (applied_or_held, rejected, duplicates) = counts;
        let tx = self.db.begin_write().ctx(self, ctx)?;
        let mut seq;
        let moved;
        {
            let mut records = tx.open_table(DOCS).ctx(self, ctx)?;
            let mut states = tx.open_table(DOC_STATE).ctx(self, ctx)?;
            let mut changes = tx.open_table(CHANGES).ctx(self, ctx)?;
            let mut log = tx.open_table(LOG).ctx(self, ctx)?;
            let mut names = tx.open_table(NAMES).ctx(self, ctx)?;
            let mut pending = tx.open_table(PENDING).ctx(self, ctx)?;
            let mut peers = tx.open_table(PEERS).ctx(self, ctx)?;
            let mut counts = tx.open_table(COUNTS).ctx(self, ctx)?;
            seq = log
                .last()
                .ctx(self, ctx)?
                .map(|(k, _)| k.value())
                .unwrap_or(0);
            for d in docs {
                if let Some(record) = &d.record {
                    self.put_record(&mut records, &mut counts, &d.doc_id, record)?;
                    names
                        .insert((record.ty.as_str(), record.local_id.as_str()), d.doc_id.0)
                        .ctx(self, ctx)?;
                }
                if let Some(state) = &d.state {
                    states.insert(d.doc_id.0, state.as_slice()).ctx(self, ctx)?;
                }
                for (change, hash, author) in &d.applied {
                    let bytes = postcard::to_stdvec(change).map_err(|x| self.encode_error(x))?;
                    changes
                        .insert((d.doc_id.0, hash.0), bytes.as_slice())
                        .ctx(self, ctx)?;
                    seq += 1;
                    let entry = LogEntry {
                        doc: d.doc_id,
                        hash: hash.0,
                        author: *author,
                        from: Some(*from),
                        time_ms: now_ms,
                    };
                    let entry = postcard::to_stdvec(&entry).map_err(|x| self.encode_error(x))?;
                    log.insert(seq, entry.as_slice()).ctx(self, ctx)?;
                }
                for hash in &d.released {
                    pending.remove((d.doc_id.0, hash.0)).ctx(self, ctx)?;
                }
                for (change, hash) in &d.held {
                    let bytes = postcard::to_stdvec(&(&d.header, change))
                        .map_err(|x| self.encode_error(x))?;
                    pending
                        .insert((d.doc_id.0, hash.0), bytes.as_slice())
                        .ctx(self, ctx)?;
                }
            }
            let mut record: PeerRecord = match peers.get(from.0).ctx(self, ctx)? {
                Some(v) => self.decode(|| format!("peers_v1[{from}]"), v.value())?,
                None => PeerRecord::default(),
            };
            moved = after == 0 || (after <= record.received.seq && upto.seq >= record.received.seq);
            if moved {
                record.received = upto;
            }
            record.changes_in += applied_or_held;
            record.rejected += rejected;
            record.duplicates += duplicates;
            record.last_sync_ms = now_ms;
            let bytes = postcard::to_stdvec(&record).map_err(|x| self.encode_error(x))?;
            peers.insert(from.0, bytes.as_slice()).ctx(self, ctx)?;
        }
        tx.commit().ctx(self, ctx)?;
        Ok((seq, moved))
    }

    /// Size of the store file in bytes (0 for an in-memory store).
    pub fn size_bytes(&self) -> u64 {
        std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0)
    }
}

/// One read transaction over the tables lookups need.
pub struct Reader<'s> {
    store: &'s Store,
    names: redb::ReadOnlyTable<(&'static str, &'static str), [u8; 16]>,
    docs: redb::ReadOnlyTable<[u8; 16], &'static [u8]>,
    states: redb::ReadOnlyTable<[u8; 16], &'static [u8]>,
    changes: redb::ReadOnlyTable<([u8; 16], [u8; 32]), &'static [u8]>,
    pending: redb::ReadOnlyTable<([u8; 16], [u8; 32]), &'static [u8]>,
}

impl Reader<'_> {
    /// The document a local name points to.
    pub fn lookup(&self, ty: &TypeName, id: &ObjectId) -> Result<Option<DocId>, StoreError> {
        let found = self
            .names
            .get((ty.as_str(), id.as_str()))
            .ctx(self.store, "looking up a name")?;
        Ok(found.map(|v| DocId(v.value())))
    }

    /// What is known of a document.
    pub fn record(&self, doc: &DocId) -> Result<Option<DocRecord>, StoreError> {
        let found = self
            .docs
            .get(doc.0)
            .ctx(self.store, "reading a document record")?;
        found
            .map(|v| self.store.decode(|| format!("docs_v1[{doc}]"), v.value()))
            .transpose()
    }

    /// A document's current Automerge state.
    pub fn load_doc(&self, doc: &DocId) -> Result<Option<Automerge>, StoreError> {
        let Some(bytes) = self
            .states
            .get(doc.0)
            .ctx(self.store, "reading a document")?
        else {
            return Ok(None);
        };
        Automerge::load(bytes.value())
            .map(Some)
            .map_err(|e| StoreError::Decode {
                path: self.store.path.clone(),
                what: format!("doc_state_v1[{doc}]"),
                detail: e.to_string(),
            })
    }

    /// Whether a change is stored (applied or held).
    pub fn has_change(&self, doc: &DocId, hash: &ChangeHash) -> Result<bool, StoreError> {
        let ctx = "looking up a change";
        if self
            .changes
            .get((doc.0, hash.0))
            .ctx(self.store, ctx)?
            .is_some()
        {
            return Ok(true);
        }
        Ok(self
            .pending
            .get((doc.0, hash.0))
            .ctx(self.store, ctx)?
            .is_some())
    }

    /// The changes of `doc` held for missing dependencies.
    pub fn pending(&self, doc: &DocId) -> Result<Vec<SignedChange>, StoreError> {
        let ctx = "reading held changes";
        let mut out = Vec::new();
        for item in self
            .pending
            .range((doc.0, [0u8; 32])..=(doc.0, [0xffu8; 32]))
            .ctx(self.store, ctx)?
        {
            let (_, v) = item.ctx(self.store, ctx)?;
            let (_, change): (DocHeader, SignedChange) = self
                .store
                .decode(|| format!("pending_v1[{doc}]"), v.value())?;
            out.push(change);
        }
        Ok(out)
    }
}

/// Attach the store's path and what it was doing to a redb error.
trait Ctx<T> {
    fn ctx(self, store: &Store, context: &'static str) -> Result<T, StoreError>;
}

impl<T, E: Into<redb::Error>> Ctx<T> for Result<T, E> {
    fn ctx(self, store: &Store, context: &'static str) -> Result<T, StoreError> {
        self.map_err(|e| classify(&store.path, context, e.into()))
    }
}

fn open_error(path: &Path, e: redb::DatabaseError) -> StoreError {
    match e {
        redb::DatabaseError::DatabaseAlreadyOpen => StoreError::InUse { path: path.into() },
        other => classify(path, "opening the store", other.into()),
    }
}

/// Turn a redb error into a [`StoreError`] that says what the user can do about it.
fn classify(path: &Path, context: &'static str, e: redb::Error) -> StoreError {
    match e {
        redb::Error::DatabaseAlreadyOpen => StoreError::InUse { path: path.into() },
        redb::Error::Corrupted(detail) => StoreError::Corrupted {
            path: path.into(),
            detail,
        },
        redb::Error::UpgradeRequired(v) => StoreError::Format {
            path: path.into(),
            found: format!("redb file format {v}"),
        },
        other => StoreError::Io {
            path: path.into(),
            context,
            detail: other.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Engine, WriteOp, WriteOutcome};
    use crate::identity::Identity;
    use serde_json::json;

    fn write(store: &Store, e: &Engine, id: &str, v: serde_json::Value) -> u64 {
        let t = TypeName::new("Sample").unwrap();
        let i = ObjectId::new(id).unwrap();
        let existing = store
            .lookup(&t, &i)
            .unwrap()
            .map(|d| crate::engine::Loaded {
                doc_id: d,
                record: store.record(&d).unwrap().unwrap(),
                doc: store.load_doc(&d).unwrap().unwrap(),
            });
        let op = if v.is_null() {
            WriteOp::Delete
        } else {
            WriteOp::Put(v.as_object().unwrap())
        };
        match e.local_write(0, &t, &i, existing, op).unwrap() {
            WriteOutcome::Changed(p) => store.commit_writes(&[&p]).unwrap()[0],
            WriteOutcome::Unchanged(_) => panic!("no change"),
        }
    }

    #[test]
    fn writes_are_logged_indexed_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let e = Engine::new(Identity::from_secret([1; 32]), 1);
        {
            let store = Store::create(&path).unwrap();
            assert_eq!(write(&store, &e, "S-1", json!({"a": 1})), 1);
            assert_eq!(write(&store, &e, "S-2", json!({"a": 2})), 2);
            assert_eq!(write(&store, &e, "S-1", json!(null)), 3);
        }
        let store = Store::open(&path, 1 << 20).unwrap();
        let t = TypeName::new("Sample").unwrap();
        assert_eq!(store.list(&t, None, 10).unwrap().ids, vec!["S-2"]);
        assert_eq!(store.last_seq().unwrap(), 3);
        let log = store.log_since(1, 10).unwrap();
        assert_eq!(log.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(log[0].1.author, e.node_id());
        let counts = store.counts().unwrap();
        assert_eq!(
            counts["Sample"],
            TypeCount {
                live: 1,
                deleted: 1
            }
        );
        let (_, entry) = &log[1];
        let change = store
            .change(&entry.doc, &ChangeHash(entry.hash))
            .unwrap()
            .unwrap();
        assert!(change.verify().is_ok());
    }

    #[test]
    fn listing_pages_through_every_live_id() {
        let store = Store::in_memory().unwrap();
        let e = Engine::new(Identity::from_secret([1; 32]), 1);
        for i in 0..25 {
            write(&store, &e, &format!("S-{i:03}"), json!({"i": i}));
        }
        let t = TypeName::new("Sample").unwrap();
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let page = store.list(&t, after.as_deref(), 10).unwrap();
            seen.extend(page.ids);
            match page.next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        assert_eq!(seen.len(), 25);
        assert_eq!(seen[24], "S-024");
        assert!(
            store
                .list(&TypeName::new("Other").unwrap(), None, 10)
                .unwrap()
                .ids
                .is_empty()
        );
    }

    #[test]
    fn a_second_open_of_the_same_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let _first = Store::create(&path).unwrap();
        assert!(matches!(
            Store::open(&path, 1 << 20),
            Err(StoreError::InUse { .. })
        ));
    }

    #[test]
    fn garbage_and_truncated_files_are_reported_as_damaged_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        std::fs::write(&path, vec![0x5a; 10_000]).unwrap();
        let before = std::fs::read(&path).unwrap();
        let err = Store::open(&path, 1 << 20)
            .err()
            .expect("garbage must not open");
        assert!(err.to_string().contains("store.redb"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }
}
