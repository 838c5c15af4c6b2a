//! What this node remembers of each peer: its record (checkpoint, acknowledgements, counters),
//! the views published to it and the documents it was sent by reference.

use super::*;

impl Store {
    /// The view of object `doc` published to `peer`, if one was written.
    pub fn view(&self, peer: &NodeId, doc: &DocId) -> Result<Option<View>, StoreError> {
        let ctx = "reading a published view";
        let tx = self.db.begin_read().ctx(self, ctx)?;
        let views = tx.open_table(VIEWS).ctx(self, ctx)?;
        let found = views.get((peer.0, doc.0)).ctx(self, ctx)?;
        found
            .map(|v| self.decode(|| format!("views_v1[{peer}, {doc}]"), v.value()))
            .transpose()
    }

    /// Store views published to `peer`, durably: a view change must never be made twice
    /// (once sent, a second, different change with its sequence number would be refused).
    pub fn put_views(&self, peer: &NodeId, views: &[(DocId, View)]) -> Result<(), StoreError> {
        let ctx = "storing published views";
        let tx = self.db.begin_write().ctx(self, ctx)?;
        {
            let mut table = tx.open_table(VIEWS).ctx(self, ctx)?;
            for (doc, view) in views {
                let bytes = postcard::to_stdvec(view).map_err(|x| self.encode_error(x))?;
                table
                    .insert((peer.0, doc.0), bytes.as_slice())
                    .ctx(self, ctx)?;
            }
        }
        tx.commit().ctx(self, ctx)
    }

    /// The documents carried to or from `peer` by reference (see `by_ref_v1`).
    pub fn by_ref(&self, peer: &NodeId) -> Result<HashSet<DocId>, StoreError> {
        let ctx = "reading documents carried by reference";
        let tx = self.db.begin_read().ctx(self, ctx)?;
        let table = tx.open_table(BY_REF).ctx(self, ctx)?;
        let mut out = HashSet::new();
        for item in table
            .range((peer.0, [0; 16])..=(peer.0, [0xff; 16]))
            .ctx(self, ctx)?
        {
            let (k, _) = item.ctx(self, ctx)?;
            out.insert(DocId(k.value().1));
        }
        Ok(out)
    }

    /// Remember that `docs` are carried to `peer` by reference. Not fsynced on its own: if it
    /// is lost, the next send of an object referencing them carries them again.
    pub fn add_by_ref(&self, peer: &NodeId, docs: &[DocId]) -> Result<(), StoreError> {
        let ctx = "recording documents carried by reference";
        let tx = self.begin_lazy_write(ctx)?;
        {
            let mut table = tx.open_table(BY_REF).ctx(self, ctx)?;
            for d in docs {
                table.insert((peer.0, d.0), ()).ctx(self, ctx)?;
            }
        }
        tx.commit().ctx(self, ctx)
    }

    /// What this node remembers of `peer` (defaults for a peer never synced).
    pub fn peer(&self, peer: &NodeId) -> Result<PeerRecord, StoreError> {
        let ctx = "reading peer state";
        let tx = self.db.begin_read().ctx(self, ctx)?;
        let peers = tx.open_table(PEERS).ctx(self, ctx)?;
        let found = peers.get(peer.0).ctx(self, ctx)?;
        let mut record: PeerRecord = found
            .map(|v| self.decode(|| format!("peers_v1[{peer}]"), v.value()))
            .transpose()?
            .unwrap_or_default();
        record.bound_rejected_types();
        Ok(record)
    }

    /// Update what this node remembers of `peer`. Not fsynced on its own: the next durable
    /// commit carries it (it holds counters and acknowledgements, which are safe to redo).
    pub fn update_peer(
        &self,
        peer: &NodeId,
        f: impl FnOnce(&mut PeerRecord),
    ) -> Result<PeerRecord, StoreError> {
        let ctx = "updating peer state";
        let tx = self.begin_lazy_write(ctx)?;
        let record = {
            let mut peers = tx.open_table(PEERS).ctx(self, ctx)?;
            let mut record: PeerRecord = match peers.get(peer.0).ctx(self, ctx)? {
                Some(v) => self.decode(|| format!("peers_v1[{peer}]"), v.value())?,
                None => PeerRecord::default(),
            };
            f(&mut record);
            record.bound_rejected_types();
            let bytes = postcard::to_stdvec(&record).map_err(|x| self.encode_error(x))?;
            peers.insert(peer.0, bytes.as_slice()).ctx(self, ctx)?;
            record
        };
        tx.commit().ctx(self, ctx)?;
        Ok(record)
    }
}
