//! Documents and the log: the commits of local writes and received batches (through one
//! [`Writer`] of the tables they touch) and the reads of documents, names, counts and the log.

use super::*;

impl Store {
    /// Commit several local writes in one durable transaction; their SEQs, in order.
    pub fn commit_writes(&self, writes: &[&Persist]) -> Result<Vec<u64>, StoreError> {
        let ctx = "committing a write";
        let tx = self.db.begin_write().ctx(self, ctx)?;
        let mut seqs = Vec::with_capacity(writes.len());
        {
            let mut w = Writer::open(self, &tx, ctx)?;
            let mut index = super::wants::FileIndex::open(self, &tx, ctx)?;
            let mut inbox = super::inbox::InboxTables::open(self, &tx, ctx)?;
            for p in writes {
                w.put_doc(&p.doc_id, &p.record, &p.state)?;
                index.set_doc_files(&p.doc_id, &p.files)?;
                inbox.set_concurrent(&p.doc_id, p.concurrent)?;
                let entry = LogEntry {
                    doc: p.doc_id,
                    hash: p.hash.0,
                    author: p.author,
                    from: None,
                    time_ms: p.time_ms,
                };
                seqs.push(w.append(entry, &p.change)?);
            }
        }
        tx.commit().ctx(self, ctx)?;
        Ok(seqs)
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
        let doc_nos = tx.open_table(DOC_NOS).ctx(self, ctx)?;
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
            let Some(row) = self.doc_row::<DocHead>(&doc_nos, &docs, &doc, ctx)? else {
                continue;
            };
            if !row.record.live {
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
        self.reader()?.change(doc, hash)
    }

    /// Documents stored under a collision name (`id~<8 hex>`, see
    /// [`crate::model::collision_name`]) because another document had their name here, at
    /// most `limit`, from the `collisions_v1` index (no scan).
    pub fn collisions(&self, limit: usize) -> Result<Vec<(DocId, DocRecord)>, StoreError> {
        let ctx = "listing name collisions";
        let tx = self.db.begin_read().ctx(self, ctx)?;
        let index = tx.open_table(COLLISIONS).ctx(self, ctx)?;
        let doc_nos = tx.open_table(DOC_NOS).ctx(self, ctx)?;
        let docs = tx.open_table(DOCS).ctx(self, ctx)?;
        let mut out = Vec::new();
        for item in index.iter().ctx(self, ctx)?.take(limit) {
            let doc = DocId(item.ctx(self, ctx)?.0.value());
            if let Some(head) = self.doc_row::<DocHead>(&doc_nos, &docs, &doc, ctx)? {
                out.push((doc, head.record));
            }
        }
        Ok(out)
    }

    /// The same documents found by a scan of `docs_v2` (migrations, and the index's tests).
    pub(super) fn scan_collisions(&self) -> Result<Vec<(DocId, DocRecord)>, StoreError> {
        self.docs_where("listing name collisions", |doc, rec| {
            crate::model::is_collision_name(&rec.local_id, doc)
        })
    }

    /// Every document, in arrival order: a scan of `docs_v2` (audits and simulations).
    pub fn docs(&self) -> Result<Vec<(DocId, DocRecord)>, StoreError> {
        self.docs_where("listing documents", |_, _| true)
    }

    /// The documents whose record `keep` accepts, in arrival order; a scan of `docs_v2`.
    pub(super) fn docs_where(
        &self,
        ctx: &'static str,
        keep: impl Fn(&DocId, &DocRecord) -> bool,
    ) -> Result<Vec<(DocId, DocRecord)>, StoreError> {
        let tx = self.db.begin_read().ctx(self, ctx)?;
        let docs = tx.open_table(DOCS).ctx(self, ctx)?;
        let mut out = Vec::new();
        for item in docs.iter().ctx(self, ctx)? {
            let (k, v) = item.ctx(self, ctx)?;
            let no = k.value();
            let row: DocHead = self.decode(|| format!("docs_v2[{no}]"), v.value())?;
            if keep(&row.doc, &row.record) {
                out.push((row.doc, row.record));
            }
        }
        Ok(out)
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
            let row: LogRow = self.decode(|| format!("log_v2[{seq}]"), v.value())?;
            out.push((seq, row.entry));
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
            if live + deleted > 0 && k.value() != COLLISIONS_KEY {
                out.insert(k.value().to_string(), TypeCount { live, deleted });
            }
        }
        Ok(out)
    }

    /// The row of `doc` in `docs_v2`, through `doc_nos_v1`: whole ([`DocRow`]) or only its
    /// record ([`DocHead`]).
    pub(super) fn doc_row<T: serde::de::DeserializeOwned>(
        &self,
        doc_nos: &impl ReadableTable<[u8; 16], u64>,
        docs: &impl ReadableTable<u64, &'static [u8]>,
        doc: &DocId,
        ctx: &'static str,
    ) -> Result<Option<T>, StoreError> {
        let Some(no) = doc_nos.get(doc.0).ctx(self, ctx)? else {
            return Ok(None);
        };
        let no = no.value();
        let Some(row) = docs.get(no).ctx(self, ctx)? else {
            return Ok(None);
        };
        self.decode(|| format!("docs_v2[{no}] ({doc})"), row.value())
            .map(Some)
    }

    /// The row at `seq` of `log_v2`.
    pub(super) fn log_row(
        &self,
        log: &impl ReadableTable<u64, &'static [u8]>,
        seq: u64,
        ctx: &'static str,
    ) -> Result<Option<LogRow>, StoreError> {
        let found = log.get(seq).ctx(self, ctx)?;
        found
            .map(|v| self.decode(|| format!("log_v2[{seq}]"), v.value()))
            .transpose()
    }

    /// The log entry at `seq`.
    pub fn log_entry(&self, seq: u64) -> Result<Option<LogEntry>, StoreError> {
        let ctx = "reading the change log";
        let tx = self.db.begin_read().ctx(self, ctx)?;
        let log = tx.open_table(LOG).ctx(self, ctx)?;
        Ok(self.log_row(&log, seq, ctx)?.map(|row| row.entry))
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

    /// Commit a received batch from `from` in one durable transaction: the documents' new
    /// states, applied changes appended to the log, held changes kept and released ones let
    /// go, `refused_for_room` added to the peer's tally, and the peer's `record` (whose
    /// checkpoint and counters the caller decided) written, the documents' file references
    /// indexed and their wanted files put on the want-list, their concurrent values indexed
    /// and `refusals` added to the refusal log. Returns the new last SEQ and what became of
    /// each wanted file.
    #[allow(clippy::too_many_arguments)]
    pub fn commit_received(
        &self,
        from: &NodeId,
        now_ms: i64,
        refused_for_room: u64,
        docs: &[ReceivedDoc],
        record: &PeerRecord,
        refusals: &[crate::model::RefusalRow],
    ) -> Result<(u64, Vec<(crate::model::WantRow, super::Wanted)>), StoreError> {
        let ctx = "committing a received batch";
        let tx = self.db.begin_write().ctx(self, ctx)?;
        let seq;
        let mut wanted = Vec::new();
        {
            let mut w = Writer::open(self, &tx, ctx)?;
            let mut held = HeldTables::open(self, &tx, ctx)?;
            let mut peers = tx.open_table(PEERS).ctx(self, ctx)?;
            let mut by_ref = tx.open_table(BY_REF).ctx(self, ctx)?;
            let mut index = super::wants::FileIndex::open(self, &tx, ctx)?;
            let mut inbox = super::inbox::InboxTables::open(self, &tx, ctx)?;
            inbox.log_refusals(refusals)?;
            for d in docs {
                if d.by_ref && d.record.is_some() {
                    by_ref.insert((from.0, d.doc_id.0), ()).ctx(self, ctx)?;
                }
                if let (Some(record), Some(state)) = (&d.record, &d.state) {
                    if let Some(object) = &d.supersedes {
                        w.move_aside(object)?;
                    }
                    w.put_doc(&d.doc_id, record, state)?;
                    index.set_doc_files(&d.doc_id, &d.files)?;
                    inbox.set_concurrent(&d.doc_id, d.concurrent)?;
                }
                for want in &d.wants {
                    wanted.push((want.clone(), index.want(want)?));
                }
                for (change, hash, author, sender) in &d.applied {
                    let entry = LogEntry {
                        doc: d.doc_id,
                        hash: hash.0,
                        author: *author,
                        from: *sender,
                        time_ms: now_ms,
                    };
                    w.append(entry, change)?;
                }
                for hash in d.released.iter().chain(&d.dropped) {
                    held.unhold(self, &d.doc_id, hash.0)?;
                }
                for (change, hash) in &d.held {
                    let row = HeldRow {
                        header: d.header.clone(),
                        change: change.clone(),
                        from: Some(*from),
                        since_ms: now_ms,
                    };
                    held.hold(self, hash.0, &row)?;
                }
            }
            for d in docs {
                super::equivocation::record(
                    self,
                    &tx,
                    &d.doc_id,
                    &d.equivocations,
                    &d.banned,
                    ctx,
                )?;
            }
            held.refused_for_room(self, from, refused_for_room)?;
            seq = w.seq;
            let bytes = postcard::to_stdvec(record).map_err(|x| self.encode_error(x))?;
            peers.insert(from.0, bytes.as_slice()).ctx(self, ctx)?;
        }
        tx.commit().ctx(self, ctx)?;
        Ok((seq, wanted))
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

    /// How many documents are stored under a collision name (see [`Store::collisions`]).
    pub fn collision_count(&self) -> Result<u64, StoreError> {
        let ctx = "counting name collisions";
        let tx = self.db.begin_read().ctx(self, ctx)?;
        let counts = tx.open_table(COUNTS).ctx(self, ctx)?;
        Ok(counts
            .get(COLLISIONS_KEY)
            .ctx(self, ctx)?
            .map(|v| v.value().0)
            .unwrap_or(0))
    }
}

/// The tables a commit writes documents and log entries to, open in one write transaction.
pub(super) struct Writer<'s, 'tx> {
    pub(super) store: &'s Store,
    pub(super) ctx: &'static str,
    pub(super) doc_nos: redb::Table<'tx, [u8; 16], u64>,
    pub(super) docs: redb::Table<'tx, u64, &'static [u8]>,
    log: redb::Table<'tx, u64, &'static [u8]>,
    change_seqs: redb::Table<'tx, ([u8; 16], [u8; 32]), u64>,
    pub(super) names: redb::Table<'tx, (&'static str, &'static str), [u8; 16]>,
    counts: redb::Table<'tx, &'static str, (u64, u64)>,
    collisions: redb::Table<'tx, [u8; 16], ()>,
    /// The last DocNo handed out.
    doc_no: u64,
    /// The last SEQ of the log.
    seq: u64,
}

impl<'s, 'tx> Writer<'s, 'tx> {
    pub(super) fn open(
        store: &'s Store,
        tx: &'tx redb::WriteTransaction,
        ctx: &'static str,
    ) -> Result<Self, StoreError> {
        let docs = tx.open_table(DOCS).ctx(store, ctx)?;
        let log = tx.open_table(LOG).ctx(store, ctx)?;
        let doc_no = docs
            .last()
            .ctx(store, ctx)?
            .map(|(k, _)| k.value())
            .unwrap_or(0);
        let seq = log
            .last()
            .ctx(store, ctx)?
            .map(|(k, _)| k.value())
            .unwrap_or(0);
        Ok(Writer {
            store,
            ctx,
            doc_nos: tx.open_table(DOC_NOS).ctx(store, ctx)?,
            docs,
            log,
            change_seqs: tx.open_table(CHANGE_SEQS).ctx(store, ctx)?,
            names: tx.open_table(NAMES).ctx(store, ctx)?,
            counts: tx.open_table(COUNTS).ctx(store, ctx)?,
            collisions: tx.open_table(COLLISIONS).ctx(store, ctx)?,
            doc_no,
            seq,
        })
    }

    /// Store a document's record, state and local name, keeping `counts_v1` in step.
    pub(super) fn put_doc(
        &mut self,
        doc: &DocId,
        record: &DocRecord,
        state: &[u8],
    ) -> Result<(), StoreError> {
        let (store, ctx) = (self.store, self.ctx);
        let name = (record.ty.as_str(), record.local_id.as_str());
        // Whom the name points to now: read once, for the check below and the write after it.
        let named = self.names.get(name).ctx(store, ctx)?.map(|v| v.value());
        let existing = self.doc_nos.get(doc.0).ctx(store, ctx)?.map(|v| v.value());
        let no = match existing {
            Some(no) => no,
            None => {
                // The replica gave every new document a name of its own (see
                // `replica::apply::write`); one that is taken is a bug, refused whole.
                if named.is_some_and(|other| other != doc.0) {
                    return Err(StoreError::NameTaken {
                        path: store.path.clone(),
                        name: format!("{}/{}", record.ty, record.local_id),
                        doc: *doc,
                    });
                }
                if crate::model::is_collision_name(&record.local_id, doc) {
                    self.collided(doc, true)?;
                }
                self.doc_no += 1;
                self.doc_nos.insert(doc.0, self.doc_no).ctx(store, ctx)?;
                self.doc_no
            }
        };
        let row = DocRowRef { doc, record, state };
        let bytes = postcard::to_stdvec(&row).map_err(|x| store.encode_error(x))?;
        let old: Option<DocHead> = match self.docs.insert(no, bytes.as_slice()).ctx(store, ctx)? {
            Some(v) => Some(store.decode(|| format!("docs_v2[{no}] ({doc})"), v.value())?),
            None => None,
        };
        // An update under an unchanged name leaves the name's entry alone: inserting the same
        // value again would still copy its B-tree leaf into the commit, one more page written
        // at random for every updated document.
        if named != Some(doc.0) {
            self.names.insert(name, doc.0).ctx(store, ctx)?;
        }
        if let Some(old) = &old {
            if old.record.live == record.live && old.record.ty == record.ty {
                return Ok(());
            }
            self.bump(old.record.ty.as_str(), old.record.live, false)?;
        }
        self.bump(record.ty.as_str(), record.live, true)
    }

    /// Move document `doc` to its collision name, freeing its name for the view that replaces
    /// it (see `ReceivedDoc::supersedes`); counted with the collisions.
    pub(super) fn move_aside(&mut self, doc: &DocId) -> Result<(), StoreError> {
        let (store, ctx) = (self.store, self.ctx);
        let Some((no, mut row)) = self.doc_row(doc)? else {
            return Ok(());
        };
        if crate::model::is_collision_name(&row.record.local_id, doc) {
            return Ok(());
        }
        let (ty, old) = (row.record.ty.clone(), row.record.local_id.clone());
        row.record.local_id = crate::model::collision_name(&old, doc);
        self.put_row(no, &row)?;
        let held_name = self
            .names
            .get((ty.as_str(), old.as_str()))
            .ctx(store, ctx)?
            .is_some_and(|v| v.value() == doc.0);
        if held_name {
            self.names
                .remove((ty.as_str(), old.as_str()))
                .ctx(store, ctx)?;
        }
        self.names
            .insert((ty.as_str(), row.record.local_id.as_str()), doc.0)
            .ctx(store, ctx)?;
        self.collided(doc, true)
    }

    /// Document `doc` took a collision name (`add`) or left it: the count (in the first slot
    /// of its `counts_v1` row, as a live object is) and the `collisions_v1` index.
    pub(super) fn collided(&mut self, doc: &DocId, add: bool) -> Result<(), StoreError> {
        let (store, ctx) = (self.store, self.ctx);
        if add {
            self.collisions.insert(doc.0, ()).ctx(store, ctx)?;
        } else {
            self.collisions.remove(doc.0).ctx(store, ctx)?;
        }
        self.bump(COLLISIONS_KEY, true, add)
    }

    /// The `docs_v2` row of `doc` and its DocNo, when it is stored.
    pub(super) fn doc_row(&self, doc: &DocId) -> Result<Option<(u64, DocRow)>, StoreError> {
        let (store, ctx) = (self.store, self.ctx);
        let Some(no) = self.doc_nos.get(doc.0).ctx(store, ctx)?.map(|v| v.value()) else {
            return Ok(None);
        };
        let Some(bytes) = self
            .docs
            .get(no)
            .ctx(store, ctx)?
            .map(|v| v.value().to_vec())
        else {
            return Ok(None);
        };
        let row = store.decode(|| format!("docs_v2[{no}] ({doc})"), &bytes)?;
        Ok(Some((no, row)))
    }

    /// Write back the `docs_v2` row `no`.
    pub(super) fn put_row(&mut self, no: u64, row: &DocRow) -> Result<(), StoreError> {
        let (store, ctx) = (self.store, self.ctx);
        let bytes = postcard::to_stdvec(row).map_err(|x| store.encode_error(x))?;
        self.docs.insert(no, bytes.as_slice()).ctx(store, ctx)?;
        Ok(())
    }

    pub(super) fn bump(&mut self, ty: &str, live: bool, add: bool) -> Result<(), StoreError> {
        let (store, ctx) = (self.store, self.ctx);
        let (mut l, mut d) = self
            .counts
            .get(ty)
            .ctx(store, ctx)?
            .map(|v| v.value())
            .unwrap_or((0, 0));
        let slot = if live { &mut l } else { &mut d };
        *slot = if add {
            *slot + 1
        } else {
            slot.saturating_sub(1)
        };
        self.counts.insert(ty, (l, d)).ctx(store, ctx)?;
        Ok(())
    }

    /// Append a change to the log; its SEQ.
    pub(super) fn append(
        &mut self,
        entry: LogEntry,
        change: &SignedChange,
    ) -> Result<u64, StoreError> {
        let (store, ctx) = (self.store, self.ctx);
        self.seq += 1;
        let row = LogRowRef {
            entry: &entry,
            change,
        };
        let bytes = postcard::to_stdvec(&row).map_err(|x| store.encode_error(x))?;
        self.log
            .insert(self.seq, bytes.as_slice())
            .ctx(store, ctx)?;
        self.change_seqs
            .insert((entry.doc.0, entry.hash), self.seq)
            .ctx(store, ctx)?;
        Ok(self.seq)
    }
}
