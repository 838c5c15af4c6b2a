//! One read transaction over the tables that many lookups in a row need.

use super::*;

/// One read transaction over the tables lookups need.
pub struct Reader<'s> {
    pub(super) store: &'s Store,
    pub(super) names: redb::ReadOnlyTable<(&'static str, &'static str), [u8; 16]>,
    pub(super) doc_nos: redb::ReadOnlyTable<[u8; 16], u64>,
    pub(super) docs: redb::ReadOnlyTable<u64, &'static [u8]>,
    pub(super) log: redb::ReadOnlyTable<u64, &'static [u8]>,
    pub(super) change_seqs: redb::ReadOnlyTable<([u8; 16], [u8; 32]), u64>,
    pub(super) held: redb::ReadOnlyTable<([u8; 16], [u8; 32]), &'static [u8]>,
    pub(super) held_counts: redb::ReadOnlyTable<[u8; 32], (u64, u64, u64)>,
    pub(super) equivocations: redb::ReadOnlyTable<([u8; 16], &'static [u8]), &'static [u8]>,
    pub(super) banned: redb::ReadOnlyTable<([u8; 16], [u8; 32]), ()>,
}

impl Reader<'_> {
    /// The log's entries after `after`, in order, each with its change, read as iterated.
    pub fn log_after(
        &self,
        after: u64,
    ) -> Result<
        impl Iterator<Item = Result<(u64, LogEntry, SignedChange), StoreError>> + '_,
        StoreError,
    > {
        let ctx = "reading the change log";
        let range = self
            .log
            .range(after.saturating_add(1)..)
            .ctx(self.store, ctx)?;
        Ok(range.map(move |item| {
            let (k, v) = item.ctx(self.store, ctx)?;
            let seq = k.value();
            let LogRow { entry, change } =
                self.store.decode(|| format!("log_v2[{seq}]"), v.value())?;
            Ok((seq, entry, change))
        }))
    }

    /// The document a local name points to.
    pub fn lookup(&self, ty: &TypeName, id: &ObjectId) -> Result<Option<DocId>, StoreError> {
        let found = self
            .names
            .get((ty.as_str(), id.as_str()))
            .ctx(self.store, "looking up a name")?;
        Ok(found.map(|v| DocId(v.value())))
    }

    /// The document a local name points to, with its record.
    pub fn find(
        &self,
        ty: &TypeName,
        id: &ObjectId,
    ) -> Result<Option<(DocId, DocRecord)>, StoreError> {
        let Some(doc) = self.lookup(ty, id)? else {
            return Ok(None);
        };
        Ok(self.record(&doc)?.map(|r| (doc, r)))
    }

    /// What is known of a document.
    pub fn record(&self, doc: &DocId) -> Result<Option<DocRecord>, StoreError> {
        let head: Option<DocHead> =
            self.store
                .doc_row(&self.doc_nos, &self.docs, doc, "reading a document")?;
        Ok(head.map(|h| h.record))
    }

    /// A document's current Automerge state.
    pub fn load_doc(&self, doc: &DocId) -> Result<Option<Automerge>, StoreError> {
        let row: Option<DocRow> =
            self.store
                .doc_row(&self.doc_nos, &self.docs, doc, "reading a document")?;
        let Some(row) = row else {
            return Ok(None);
        };
        Automerge::load(&row.state)
            .map(Some)
            .map_err(|e| StoreError::Decode {
                path: self.store.path.clone(),
                what: format!("the state of document {doc} in docs_v2"),
                detail: e.to_string(),
            })
    }

    /// The signed change `hash` of `doc`, if it is in the log.
    pub fn change(
        &self,
        doc: &DocId,
        hash: &ChangeHash,
    ) -> Result<Option<SignedChange>, StoreError> {
        let ctx = "reading a change";
        let Some(seq) = self.change_seqs.get((doc.0, hash.0)).ctx(self.store, ctx)? else {
            return Ok(None);
        };
        Ok(self
            .store
            .log_row(&self.log, seq.value(), ctx)?
            .map(|row| row.change))
    }

    /// Whether a change is stored (applied or held).
    pub fn has_change(&self, doc: &DocId, hash: &ChangeHash) -> Result<bool, StoreError> {
        let ctx = "looking up a change";
        if self
            .change_seqs
            .get((doc.0, hash.0))
            .ctx(self.store, ctx)?
            .is_some()
        {
            return Ok(true);
        }
        Ok(self
            .held
            .get((doc.0, hash.0))
            .ctx(self.store, ctx)?
            .is_some())
    }
}

impl Store {
    /// A read transaction for many lookups (a received batch makes thousands).
    pub fn reader(&self) -> Result<Reader<'_>, StoreError> {
        let ctx = "starting a read";
        let tx = self.db.begin_read().ctx(self, ctx)?;
        Ok(Reader {
            store: self,
            names: tx.open_table(NAMES).ctx(self, ctx)?,
            doc_nos: tx.open_table(DOC_NOS).ctx(self, ctx)?,
            docs: tx.open_table(DOCS).ctx(self, ctx)?,
            log: tx.open_table(LOG).ctx(self, ctx)?,
            change_seqs: tx.open_table(CHANGE_SEQS).ctx(self, ctx)?,
            held: tx.open_table(HELD).ctx(self, ctx)?,
            held_counts: tx.open_table(HELD_COUNTS).ctx(self, ctx)?,
            equivocations: tx.open_table(equivocation::EQUIVOCATIONS).ctx(self, ctx)?,
            banned: tx.open_table(equivocation::BANNED).ctx(self, ctx)?,
        })
    }
}
