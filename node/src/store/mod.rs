//! The redb store: documents, signed changes, the node's change log and the name index.
//!
//! Every table name carries a version; a store whose `format` differs from [`STORE_FORMAT`] is
//! refused rather than misread. Values that are structs are postcard-encoded.
//! One local write commits its document state, its signed change, its log entry and its names in
//! one transaction with immediate durability, so a write acknowledged to its writer survives a
//! crash and a crash never leaves half of one.
//!
//! The store owns the bytes and decides nothing: it writes the plain values it is handed and
//! reads them back. This file is the disk format on one screen (every table, its key and
//! value, the format version and the migrations). Modules: `docs` (documents, names, counts
//! and the log: commits and reads), `reader` (one read transaction for many lookups),
//! `peers` (peer records, views, documents sent by reference), `applied` (the policy last
//! applied to each peer, revoked keys, forgetting a removed peer), `held` (changes waiting
//! for dependencies, with each sender's tally), `outbound` (view acknowledgements, oversized
//! changes, references owed), `equivocation` (equivocations with their evidence, and the
//! changes they refuse), `files` (files content-addressed on disk, and their index), `inbox`
//! (the conflicts inbox's index and refusal log), `fleet` (other nodes' status records), `lacks` (the files each peer said it lacks).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use automerge::{Automerge, ChangeHash};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tidesync_proto::{Checkpoint, DocId, NodeId, ObjectId, SignedChange, TypeName};

use crate::model::{DocRecord, LogEntry, PeerRecord, Persist, ReceivedDoc, View};

mod ahead;
pub use ahead::MAX_SENT_AHEAD_PER_PEER;
mod applied;
mod docs;
mod equivocation;
mod files;
pub use files::{FileError, FileEvent, FileRow, FillError, Partial};
mod transfer;
pub use transfer::{SegmentError, Verified};
mod wants;
pub use wants::{MAX_WANTED_BYTES_PER_PEER, MAX_WANTED_FILES_PER_PEER, Wanted};
mod fleet;
mod held;
mod lacks;
pub use lacks::MAX_LACKS_PER_PEER;
mod inbox;
pub use fleet::{FleetRow, MAX_FLEET_NODES};
pub use inbox::{MAX_REFUSALS_KEPT, MAX_REFUSALS_PER_BATCH};
mod migrate;
mod scrub;
pub use scrub::{DEFAULT_GC_GRACE_SECS, GcReport, VerifyReport};
mod peers;
mod reader;
mod rename;
pub use applied::{PolicyChange, Revoked};
use held::{HELD, HELD_COUNTS, HeldTables};
pub use held::{HeldFilter, HeldRow, HeldTally};
pub use reader::Reader;
pub use rename::Renamed;
mod outbound;

/// The value of `meta_v1["format"]` this build reads and writes.
pub const STORE_FORMAT: &str = "tidesync-store-10";

/// The format before held changes recorded their sender (`pending_v1`); opened and migrated.
const STORE_FORMAT_2: &str = "tidesync-store-2";
/// The format before the applied policies and revoked keys (`applied_policies_v1`,
/// `revoked_keys_v1`); opened and migrated. Its peers have no applied policy, so each one's
/// policy counts as widened once at the first start (a resend; duplicates are dropped).
const STORE_FORMAT_3: &str = "tidesync-store-3";
/// The format before equivocations were recorded (`equivocations_v1`, `banned_v1`); opened
/// and migrated by creating the two tables, empty.
const STORE_FORMAT_4: &str = "tidesync-store-4";
/// Format 5: before the file references, the want-list and its quotas (`file_refs_v1`,
/// `doc_files_v1`, `wants_v1`, `want_tally_v1`); migrated at open.
const STORE_FORMAT_5: &str = "tidesync-store-5";
/// Format 6: before the conflicts inbox's tables (`concurrent_v1`, `refusals_v1`) and the
/// fleet table and the meters (`fleet_v1`, `meters_v1`); migrated at open by indexing every document's concurrent values.
const STORE_FORMAT_6: &str = "tidesync-store-6";
/// Format 7: before the files peers lack (`peer_lacks_v1`); migrated at open by creating it.
const STORE_FORMAT_7: &str = "tidesync-store-7";
/// Format 8: before what went to peers ahead of log order (`sent_ahead_v1`); migrated at open
/// by creating it.
const STORE_FORMAT_8: &str = "tidesync-store-8";
/// Format 9: before the index of collision names (`collisions_v1`); migrated at open by one
/// scan of `docs_v2`.
const STORE_FORMAT_9: &str = "tidesync-store-9";

/// Node-wide settings.
/// Key: setting name (`format`). Value: UTF-8 bytes.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta_v1");
/// Which row of `docs_v2` holds each document. DocIds are hashes, so this is the only table a
/// new document writes at a random place; its entries are small.
/// Key: DocId (16 bytes). Value: DocNo (u64, dense from 1 in the order documents arrived here).
const DOC_NOS: TableDefinition<[u8; 16], u64> = TableDefinition::new("doc_nos_v1");
/// Each document: what is known of it and its current Automerge state, in one row. Keyed by
/// arrival order, so a batch of new documents appends at the end of the tree.
/// Key: DocNo (u64). Value: postcard [`DocRow`] `{ doc, record, state: Automerge::save() }`.
const DOCS: TableDefinition<u64, &[u8]> = TableDefinition::new("docs_v2");
/// The node's change log: every change it stored, local or received, in the order it stored
/// them, with the signed change itself (so streaming the log to a peer reads it in order).
/// Key: SEQ, dense from 1. Value: postcard [`LogRow`] `{ entry: LogEntry, change: SignedChange }`.
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log_v2");
/// Where each change is in the log.
/// Key: (DocId, Automerge change hash). Value: SEQ.
const CHANGE_SEQS: TableDefinition<([u8; 16], [u8; 32]), u64> =
    TableDefinition::new("change_seqs_v1");
/// The (type, id) index of the names documents have on this node.
/// Key: (type name, local object id). Value: DocId (16 bytes).
const NAMES: TableDefinition<(&str, &str), [u8; 16]> = TableDefinition::new("names_v1");
// Held changes (`pending_v2`, `held_counts_v1`) are defined in `held`.
/// Live and deleted objects per type, kept in step with `docs_v2` by every commit; and, under
/// [`COLLISIONS_KEY`] (never a type name), the documents stored under a collision name.
/// Key: type name, or `~collisions`. Value: (live, deleted), or (collisions, 0).
const COUNTS: TableDefinition<&str, (u64, u64)> = TableDefinition::new("counts_v1");
/// The views of objects published to a peer with `fields` (see
/// [`crate::policy::Policy::fields`]): documents this node writes and signs holding only the
/// published fields, kept apart from the objects themselves. A view has its own id for each
/// peer (`DocId::derive_view` of this node, the peer, the type and the object's name here);
/// format 5 dropped the views of format 4, which had their object's id.
/// Key: (peer NodeId, the object's DocId). Value: postcard [`View`].
const VIEWS: TableDefinition<([u8; 32], [u8; 16]), &[u8]> = TableDefinition::new("views_v1");

/// The `counts_v1` key of the collision count (type names cannot hold `~`).
const COLLISIONS_KEY: &str = "~collisions";
/// The documents stored under a collision name, so that the conflicts inbox lists them
/// without a scan of `docs_v2`; kept in step with the count under [`COLLISIONS_KEY`].
/// Key: DocId (16 bytes). Value: unit.
const COLLISIONS: TableDefinition<[u8; 16], ()> = TableDefinition::new("collisions_v1");
/// What this node knows of each peer's sync: checkpoints and counters.
/// Key: peer NodeId (32 bytes). Value: postcard [`PeerRecord`].
const PEERS: TableDefinition<[u8; 32], &[u8]> = TableDefinition::new("peers_v1");
/// Documents carried to or from a peer only because an object it exchanges references them
/// (`--refs`): their own type is not exchanged with that peer, yet their changes keep flowing.
/// Added within format 2 (see `Store::upgrade_within_format`).
/// Key: (peer NodeId, DocId). Value: unit.
const BY_REF: TableDefinition<([u8; 32], [u8; 16]), ()> = TableDefinition::new("by_ref_v1");

/// A row of `docs_v2`.
#[derive(Debug, Serialize, Deserialize)]
struct DocRow {
    doc: DocId,
    record: DocRecord,
    #[serde(with = "tidesync_proto::change::serde_bytes_vec")]
    state: Vec<u8>,
}

/// The leading fields of a `docs_v2` row: postcard reads them and leaves the state unread, so
/// looking up a record does not copy the document's state.
#[derive(Debug, Deserialize)]
struct DocHead {
    doc: DocId,
    record: DocRecord,
}

/// A row of `docs_v2` as it is written (the same encoding as [`DocRow`]).
#[derive(Serialize)]
struct DocRowRef<'a> {
    doc: &'a DocId,
    record: &'a DocRecord,
    #[serde(with = "tidesync_proto::change::serde_bytes_vec")]
    state: &'a [u8],
}

/// A row of `log_v2`.
#[derive(Debug, Serialize, Deserialize)]
struct LogRow {
    entry: LogEntry,
    change: SignedChange,
}

/// A row of `log_v2` as it is written (the same encoding as [`LogRow`]).
#[derive(Serialize)]
struct LogRowRef<'a> {
    entry: &'a LogEntry,
    change: &'a SignedChange,
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
    #[error(
        "store {path}: the name {name} already belongs to another document than {doc}; nothing was written"
    )]
    NameTaken {
        path: PathBuf,
        name: String,
        doc: DocId,
    },
    #[error("store {path}: record {what} cannot be decoded: {detail}")]
    Decode {
        path: PathBuf,
        what: String,
        detail: String,
    },
}

/// The redb store of one node. Clones share one database: the node actor writes through
/// one, and views off the actor read through others (redb readers see the last commit whole
/// and never wait for a writer).
#[derive(Clone)]
pub struct Store {
    db: std::sync::Arc<Database>,
    path: PathBuf,
    /// Held while a stored file's outboard is made, so that the segment asks that arrive
    /// together for a file hash it once, not once each.
    outboards: std::sync::Arc<std::sync::Mutex<()>>,
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
            db: std::sync::Arc::new(db),
            path: path.into(),
            outboards: Default::default(),
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
            db: std::sync::Arc::new(db),
            path: path.into(),
            outboards: Default::default(),
        };
        let format = store.check_format()?;
        store.upgrade_within_format()?;
        if format == STORE_FORMAT_2 {
            store.migrate_2_to_3()?;
        }
        if format == STORE_FORMAT_2 || format == STORE_FORMAT_3 {
            store.migrate_3_to_4()?;
        }
        let since = |newer: &[&str]| !newer.contains(&format) && format != STORE_FORMAT;
        if since(&[
            STORE_FORMAT_9,
            STORE_FORMAT_8,
            STORE_FORMAT_7,
            STORE_FORMAT_6,
            STORE_FORMAT_5,
        ]) {
            store.migrate_4_to_5()?;
        }
        if since(&[
            STORE_FORMAT_9,
            STORE_FORMAT_8,
            STORE_FORMAT_7,
            STORE_FORMAT_6,
        ]) {
            store.migrate_5_to_6()?;
        }
        if since(&[STORE_FORMAT_9, STORE_FORMAT_8, STORE_FORMAT_7]) {
            store.migrate_6_to_7()?;
        }
        if since(&[STORE_FORMAT_9, STORE_FORMAT_8]) {
            store.migrate_7_to_8()?;
        }
        if since(&[STORE_FORMAT_9]) {
            store.migrate_8_to_9()?;
        }
        if format != STORE_FORMAT {
            store.migrate_9_to_10()?;
        }
        Ok(store)
    }

    /// An in-memory store, for simulations and tests. It keeps no files.
    pub fn in_memory() -> Result<Store, StoreError> {
        Store::memory_at(PathBuf::from("<memory>"))
    }

    /// An in-memory store whose files live on disk under `dir/files`, as if the store file
    /// were `dir/store.redb` (simulations with files).
    pub fn in_memory_beside(dir: &Path) -> Result<Store, StoreError> {
        Store::memory_at(dir.join("store.redb"))
    }

    fn memory_at(path: PathBuf) -> Result<Store, StoreError> {
        let db = Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .map_err(|e| open_error(&path, e))?;
        let store = Store {
            db: std::sync::Arc::new(db),
            path,
            outboards: Default::default(),
        };
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
            tx.open_table(DOC_NOS).ctx(self, ctx)?;
            tx.open_table(DOCS).ctx(self, ctx)?;
            tx.open_table(LOG).ctx(self, ctx)?;
            tx.open_table(CHANGE_SEQS).ctx(self, ctx)?;
            tx.open_table(NAMES).ctx(self, ctx)?;
            tx.open_table(HELD).ctx(self, ctx)?;
            tx.open_table(HELD_COUNTS).ctx(self, ctx)?;
            tx.open_table(PEERS).ctx(self, ctx)?;
            tx.open_table(COUNTS)
                .ctx(self, ctx)?
                .insert(COLLISIONS_KEY, (0, 0))
                .ctx(self, ctx)?;
            tx.open_table(BY_REF).ctx(self, ctx)?;
            tx.open_table(VIEWS).ctx(self, ctx)?;
            tx.open_table(applied::APPLIED).ctx(self, ctx)?;
            tx.open_table(applied::REVOKED).ctx(self, ctx)?;
            tx.open_table(equivocation::EQUIVOCATIONS).ctx(self, ctx)?;
            tx.open_table(equivocation::BANNED).ctx(self, ctx)?;
            tx.open_table(files::FILES).ctx(self, ctx)?;
            tx.open_table(wants::FILE_REFS).ctx(self, ctx)?;
            tx.open_table(wants::DOC_FILES).ctx(self, ctx)?;
            tx.open_table(wants::WANTS).ctx(self, ctx)?;
            tx.open_table(wants::WANT_TALLY).ctx(self, ctx)?;
            tx.open_table(files::FILE_FEED).ctx(self, ctx)?;
            tx.open_table(inbox::CONCURRENT).ctx(self, ctx)?;
            tx.open_table(inbox::REFUSALS).ctx(self, ctx)?;
            tx.open_table(fleet::FLEET).ctx(self, ctx)?;
            tx.open_table(fleet::METERS).ctx(self, ctx)?;
            tx.open_table(lacks::PEER_LACKS).ctx(self, ctx)?;
            tx.open_table(ahead::SENT_AHEAD).ctx(self, ctx)?;
            tx.open_table(COLLISIONS).ctx(self, ctx)?;
        }
        tx.commit().ctx(self, ctx)
    }

    /// A write transaction that is not fsynced on its own: the next durable commit carries
    /// it, and a crash before then loses it (for state that is safe to redo).
    fn begin_lazy_write(&self, ctx: &'static str) -> Result<redb::WriteTransaction, StoreError> {
        let mut tx = self.db.begin_write().ctx(self, ctx)?;
        tx.set_durability(redb::Durability::None)
            .map_err(|e| StoreError::Io {
                path: self.path.clone(),
                context: ctx,
                detail: e.to_string(),
            })?;
        Ok(tx)
    }

    /// The store's format: this build's, or format 2, 3 or 4, which `open` migrates.
    fn check_format(&self) -> Result<&'static str, StoreError> {
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
            Some(f) if f == STORE_FORMAT => Ok(STORE_FORMAT),
            Some(f) if f == STORE_FORMAT_2 => Ok(STORE_FORMAT_2),
            Some(f) if f == STORE_FORMAT_3 => Ok(STORE_FORMAT_3),
            Some(f) if f == STORE_FORMAT_4 => Ok(STORE_FORMAT_4),
            Some(f) if f == STORE_FORMAT_5 => Ok(STORE_FORMAT_5),
            Some(f) if f == STORE_FORMAT_6 => Ok(STORE_FORMAT_6),
            Some(f) if f == STORE_FORMAT_7 => Ok(STORE_FORMAT_7),
            Some(f) if f == STORE_FORMAT_8 => Ok(STORE_FORMAT_8),
            Some(f) if f == STORE_FORMAT_9 => Ok(STORE_FORMAT_9),
            other => Err(StoreError::Format {
                path: self.path.clone(),
                found: other.unwrap_or_else(|| "none".into()),
            }),
        }
    }

    fn encode_error(&self, e: postcard::Error) -> StoreError {
        StoreError::Io {
            path: self.path.clone(),
            context: "encoding a record",
            detail: e.to_string(),
        }
    }

    /// Size of the store file in bytes (0 for an in-memory store).
    pub fn size_bytes(&self) -> u64 {
        std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0)
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
    use crate::identity::Identity;
    use crate::model::{MAX_REJECTED_TYPES, OTHER_REJECTED_TYPES};
    use crate::replica::engine::{Engine, WriteOp, WriteOutcome};
    use serde_json::json;

    // Regression: `rejected_types` had no bound, so a peer that sent changes of 20,000 type
    // names grew its record (and every `status`) to 1.26 MB. Records are cut down when read,
    // including ones written before the bound, and when written; the total is kept.
    #[test]
    fn refusal_counts_keep_a_bounded_number_of_types_and_their_total() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let store = Store::create(&path).unwrap();
        let peer = NodeId([7; 32]);
        let mut old = PeerRecord::default();
        for i in 0..20_000u64 {
            old.rejected_types.insert(format!("T{i:05}"), 1 + i % 3);
        }
        let total: u64 = old.rejected_types.values().sum();
        // A record as an unbounded build wrote it.
        {
            let tx = store.db.begin_write().unwrap();
            let mut peers = tx.open_table(PEERS).unwrap();
            let bytes = postcard::to_stdvec(&old).unwrap();
            peers.insert(peer.0, bytes.as_slice()).unwrap();
            drop(peers);
            tx.commit().unwrap();
        }
        let read = store.peer(&peer).unwrap();
        assert_eq!(read.rejected_types.len(), MAX_REJECTED_TYPES);
        assert_eq!(read.rejected_types.values().sum::<u64>(), total);
        // The biggest counts keep their names.
        assert!(read.rejected_types.contains_key("T00002"));
        assert!(read.rejected_types[OTHER_REJECTED_TYPES] > 0);
        // Writing adds new names and still keeps the bound, counting into `(other)`.
        let written = store
            .update_peer(&peer, |r| {
                for i in 0..500u64 {
                    *r.rejected_types.entry(format!("New{i}")).or_default() += 1;
                }
            })
            .unwrap();
        assert_eq!(written.rejected_types.len(), MAX_REJECTED_TYPES);
        assert_eq!(written.rejected_types.values().sum::<u64>(), total + 500);
        drop(store);
        let store = Store::open(&path, 1 << 20).unwrap();
        assert_eq!(store.peer(&peer).unwrap(), written);
        // A few types are left alone.
        let mut small = PeerRecord::default();
        small.rejected_types.insert("Invoice".into(), 3);
        let before = small.clone();
        small.bound_rejected_types();
        assert_eq!(small, before);
    }

    fn write(store: &Store, e: &Engine, id: &str, v: serde_json::Value) -> u64 {
        let t = TypeName::new("Sample").unwrap();
        let i = ObjectId::new(id).unwrap();
        let existing = store
            .lookup(&t, &i)
            .unwrap()
            .map(|d| crate::replica::engine::Loaded {
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
