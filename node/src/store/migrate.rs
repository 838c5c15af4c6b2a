//! Opening an older store: the migrations from each earlier format to this build's, each in
//! one transaction (the format is set in the same transaction, or nothing changes).

use super::*;

impl Store {
    /// Bring a format-2 store made before `by_ref_v1`, `views_v1` and the collision count
    /// existed up to date, once: the tables are created and the count is taken by a scan. A
    /// store that has the count has all three (`init_tables` writes them together).
    pub(super) fn upgrade_within_format(&self) -> Result<(), StoreError> {
        let ctx = "adding the tables added within format 2";
        let current = {
            let tx = self.db.begin_read().ctx(self, ctx)?;
            let counts = tx.open_table(COUNTS).ctx(self, ctx)?;
            counts.get(COLLISIONS_KEY).ctx(self, ctx)?.is_some()
        };
        if current {
            return Ok(());
        }
        let n = self.scan_collisions()?.len() as u64;
        let tx = self.db.begin_write().ctx(self, ctx)?;
        tx.open_table(COUNTS)
            .ctx(self, ctx)?
            .insert(COLLISIONS_KEY, (n, 0))
            .ctx(self, ctx)?;
        tx.open_table(BY_REF).ctx(self, ctx)?;
        tx.open_table(VIEWS).ctx(self, ctx)?;
        tx.commit().ctx(self, ctx)
    }

    /// Format 2 → 3: held changes record their sender. One transaction: the held rows move
    /// from `pending_v1` to `pending_v2` and the format is set, or nothing changes.
    pub(super) fn migrate_2_to_3(&self) -> Result<(), StoreError> {
        let ctx = "migrating the store from format 2 to 3";
        let tx = self.db.begin_write().ctx(self, ctx)?;
        self.migrate_held_v1(&tx)?;
        tx.open_table(META)
            .ctx(self, ctx)?
            .insert("format", STORE_FORMAT_3.as_bytes())
            .ctx(self, ctx)?;
        tx.commit().ctx(self, ctx)?;
        tracing::info!(path = %self.path.display(), "store migrated from {STORE_FORMAT_2} to {STORE_FORMAT_3}");
        Ok(())
    }

    /// Format 3 → 4: the tables of applied policies and revoked keys. One transaction.
    pub(super) fn migrate_3_to_4(&self) -> Result<(), StoreError> {
        let ctx = "migrating the store from format 3 to 4";
        let tx = self.db.begin_write().ctx(self, ctx)?;
        tx.open_table(applied::APPLIED).ctx(self, ctx)?;
        tx.open_table(applied::REVOKED).ctx(self, ctx)?;
        tx.open_table(META)
            .ctx(self, ctx)?
            .insert("format", STORE_FORMAT_4.as_bytes())
            .ctx(self, ctx)?;
        tx.commit().ctx(self, ctx)?;
        tracing::info!(path = %self.path.display(), "store migrated from {STORE_FORMAT_3} to {STORE_FORMAT_4}");
        Ok(())
    }

    /// Format 4 → 5: the tables of equivocations and the changes they refuse, and the file
    /// index (`files_v1`, empty); and views,
    /// which now have their own id for each peer (`DocId::derive_view`), are dropped with
    /// their acknowledgements, to be written again under their new ids (a peer that holds an
    /// old one keeps it under its collision name). One transaction.
    /// Format 5 → 6: the file references of every document are indexed (`file_refs_v1`,
    /// `doc_files_v1`), the file feed starts (`file_feed_v1`, numbering files stored from
    /// now on) and the want-list starts empty (`wants_v1`, `want_tally_v1`): files
    /// referenced before are wanted once an object referring to them arrives again. One
    /// transaction.
    pub(super) fn migrate_5_to_6(&self) -> Result<(), StoreError> {
        let ctx = "migrating the store from format 5 to 6";
        let tx = self.db.begin_write().ctx(self, ctx)?;
        let n = self.index_all_file_refs(&tx)?;
        tx.open_table(wants::WANTS).ctx(self, ctx)?;
        tx.open_table(wants::WANT_TALLY).ctx(self, ctx)?;
        tx.open_table(files::FILE_FEED).ctx(self, ctx)?;
        tx.open_table(META)
            .ctx(self, ctx)?
            .insert("format", STORE_FORMAT_6.as_bytes())
            .ctx(self, ctx)?;
        tx.commit().ctx(self, ctx)?;
        tracing::info!(path = %self.path.display(), documents_with_files = n, "store migrated from {STORE_FORMAT_5} to {STORE_FORMAT_6}");
        Ok(())
    }

    /// Format 6 → 7: the conflicts inbox's tables; every document's fields with concurrent
    /// values are indexed (`concurrent_v1`); the refusal log (`refusals_v1`) and the fleet
    /// table (`fleet_v1`) and the meters (`meters_v1`) start empty. One transaction.
    pub(super) fn migrate_6_to_7(&self) -> Result<(), StoreError> {
        let ctx = "migrating the store from format 6 to 7";
        let tx = self.db.begin_write().ctx(self, ctx)?;
        let n = self.index_all_concurrent(&tx)?;
        tx.open_table(fleet::FLEET).ctx(self, ctx)?;
        tx.open_table(fleet::METERS).ctx(self, ctx)?;
        tx.open_table(META)
            .ctx(self, ctx)?
            .insert("format", STORE_FORMAT_7.as_bytes())
            .ctx(self, ctx)?;
        tx.commit().ctx(self, ctx)?;
        tracing::info!(path = %self.path.display(), documents_with_concurrent_values = n, "store migrated from {STORE_FORMAT_6} to {STORE_FORMAT_7}");
        Ok(())
    }

    pub(super) fn migrate_7_to_8(&self) -> Result<(), StoreError> {
        let ctx = "migrating the store from format 7 to 8";
        let tx = self.db.begin_write().ctx(self, ctx)?;
        tx.open_table(lacks::PEER_LACKS).ctx(self, ctx)?;
        tx.open_table(META)
            .ctx(self, ctx)?
            .insert("format", STORE_FORMAT_8.as_bytes())
            .ctx(self, ctx)?;
        tx.commit().ctx(self, ctx)?;
        tracing::info!(path = %self.path.display(), "store migrated from {STORE_FORMAT_7} to {STORE_FORMAT_8}");
        Ok(())
    }

    pub(super) fn migrate_8_to_9(&self) -> Result<(), StoreError> {
        let ctx = "migrating the store from format 8 to 9";
        let tx = self.db.begin_write().ctx(self, ctx)?;
        tx.open_table(ahead::SENT_AHEAD).ctx(self, ctx)?;
        tx.open_table(META)
            .ctx(self, ctx)?
            .insert("format", STORE_FORMAT_9.as_bytes())
            .ctx(self, ctx)?;
        tx.commit().ctx(self, ctx)?;
        tracing::info!(path = %self.path.display(), "store migrated from {STORE_FORMAT_8} to {STORE_FORMAT_9}");
        Ok(())
    }

    /// Format 10 indexes the documents under a collision name (`collisions_v1`): one scan of
    /// `docs_v2`, in the transaction that sets the format.
    pub(super) fn migrate_9_to_10(&self) -> Result<(), StoreError> {
        let ctx = "migrating the store from format 9 to 10";
        let found = self.scan_collisions()?;
        let tx = self.db.begin_write().ctx(self, ctx)?;
        {
            let mut index = tx.open_table(COLLISIONS).ctx(self, ctx)?;
            for (doc, _) in &found {
                index.insert(doc.0, ()).ctx(self, ctx)?;
            }
            tx.open_table(META)
                .ctx(self, ctx)?
                .insert("format", STORE_FORMAT.as_bytes())
                .ctx(self, ctx)?;
        }
        tx.commit().ctx(self, ctx)?;
        tracing::info!(path = %self.path.display(), collisions = found.len(), "store migrated from {STORE_FORMAT_9} to {STORE_FORMAT}");
        Ok(())
    }

    pub(super) fn migrate_4_to_5(&self) -> Result<(), StoreError> {
        let ctx = "migrating the store from format 4 to 5";
        let tx = self.db.begin_write().ctx(self, ctx)?;
        tx.delete_table(VIEWS).ctx(self, ctx)?;
        tx.delete_table(outbound::VIEW_ACKS).ctx(self, ctx)?;
        tx.open_table(VIEWS).ctx(self, ctx)?;
        tx.open_table(equivocation::EQUIVOCATIONS).ctx(self, ctx)?;
        tx.open_table(equivocation::BANNED).ctx(self, ctx)?;
        tx.open_table(files::FILES).ctx(self, ctx)?;
        tx.open_table(META)
            .ctx(self, ctx)?
            .insert("format", STORE_FORMAT_5.as_bytes())
            .ctx(self, ctx)?;
        tx.commit().ctx(self, ctx)?;
        tracing::info!(path = %self.path.display(), "store migrated from {STORE_FORMAT_4} to {STORE_FORMAT_5}");
        Ok(())
    }
}
