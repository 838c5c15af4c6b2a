//! Renaming an object here: a new local name for one document, in one transaction (how a name
//! collision is resolved, since names are local).

use super::*;

/// How a rename ended (see [`Store::rename`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Renamed {
    /// The document now has the new name.
    Done { doc: DocId, was_collision: bool },
    /// No object has the old name.
    NotFound,
    /// Another document already has the new name.
    Taken(DocId),
    /// A view of the document was published to this peer under a name made from its local
    /// name: renaming it would leave that view behind at the peer under the old name.
    Published(NodeId),
}

impl Store {
    /// Give the object `ty/old` the local name `new` (checked by the caller to be a name a new
    /// object may have). Nothing else of the document changes: its id, its changes and what
    /// peers call it stay as they are. `published_to` are the peers whose views are checked.
    /// One durable transaction; the collision count drops if `old` was a collision name.
    pub fn rename(
        &self,
        ty: &TypeName,
        old: &ObjectId,
        new: &ObjectId,
        published_to: &[NodeId],
    ) -> Result<Renamed, StoreError> {
        let ctx = "renaming an object";
        let tx = self.db.begin_write().ctx(self, ctx)?;
        let outcome = {
            let mut w = docs::Writer::open(self, &tx, ctx)?;
            let views = tx.open_table(VIEWS).ctx(self, ctx)?;
            w.rename(ty, old, new, |doc| {
                for peer in published_to {
                    if views.get((peer.0, doc.0)).ctx(self, ctx)?.is_some() {
                        return Ok(Some(*peer));
                    }
                }
                Ok(None)
            })?
        };
        if matches!(outcome, Renamed::Done { .. }) {
            tx.commit().ctx(self, ctx)?;
        } else {
            tx.abort().ctx(self, ctx)?;
        }
        Ok(outcome)
    }
}

impl docs::Writer<'_, '_> {
    /// Move the name `ty/old` to `new` (see [`Store::rename`]); `published` says whether a view
    /// of the document was published to a peer.
    fn rename(
        &mut self,
        ty: &TypeName,
        old: &ObjectId,
        new: &ObjectId,
        published: impl Fn(&DocId) -> Result<Option<NodeId>, StoreError>,
    ) -> Result<Renamed, StoreError> {
        let (store, ctx) = (self.store, self.ctx);
        let Some(doc) = self
            .names
            .get((ty.as_str(), old.as_str()))
            .ctx(store, ctx)?
            .map(|v| DocId(v.value()))
        else {
            return Ok(Renamed::NotFound);
        };
        if let Some(other) = self
            .names
            .get((ty.as_str(), new.as_str()))
            .ctx(store, ctx)?
            .map(|v| DocId(v.value()))
        {
            return Ok(if other == doc {
                Renamed::Done {
                    doc,
                    was_collision: false,
                }
            } else {
                Renamed::Taken(other)
            });
        }
        if let Some(peer) = published(&doc)? {
            return Ok(Renamed::Published(peer));
        }
        let Some((no, mut row)) = self.doc_row(&doc)? else {
            return Ok(Renamed::NotFound);
        };
        let was_collision = crate::model::is_collision_name(&row.record.local_id, &doc);
        row.record.local_id = new.clone();
        self.put_row(no, &row)?;
        self.names
            .remove((ty.as_str(), old.as_str()))
            .ctx(store, ctx)?;
        self.names
            .insert((ty.as_str(), new.as_str()), doc.0)
            .ctx(store, ctx)?;
        if was_collision {
            self.collided(&doc, false)?;
        }
        Ok(Renamed::Done { doc, was_collision })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::DocRecord;

    fn put(store: &Store, doc: DocId, origin: NodeId, name: &str) {
        let tx = store.db.begin_write().unwrap();
        {
            let mut w = docs::Writer::open(store, &tx, "test").unwrap();
            let record = DocRecord {
                origin,
                ty: TypeName::new("Sample").unwrap(),
                id: ObjectId::new("S-1").unwrap(),
                local_id: ObjectId::new(name).unwrap(),
                live: true,
            };
            w.put_doc(&doc, &record, &[]).unwrap();
        }
        tx.commit().unwrap();
    }

    /// The documents the `collisions_v1` index lists.
    fn listed(store: &Store) -> Vec<DocId> {
        store
            .collisions(10)
            .unwrap()
            .into_iter()
            .map(|(d, _)| d)
            .collect()
    }

    #[test]
    fn a_collision_renamed_leaves_the_count_and_keeps_its_document() {
        let store = Store::in_memory().unwrap();
        let ty = TypeName::new("Sample").unwrap();
        let (a, b) = (NodeId([1; 32]), NodeId([2; 32]));
        let (doc_a, doc_b) = (DocId([1; 16]), DocId([2; 16]));
        let name = ObjectId::new("S-1").unwrap();
        put(&store, doc_a, a, "S-1");
        put(
            &store,
            doc_b,
            b,
            crate::model::collision_name(&name, &doc_b).as_str(),
        );
        assert_eq!(store.collision_count().unwrap(), 1);
        // The index lists what a scan finds.
        assert_eq!(listed(&store), vec![doc_b]);
        assert_eq!(store.scan_collisions().unwrap().len(), 1);
        let collided = crate::model::collision_name(&name, &doc_b);
        // The name is taken by the other document: refused, nothing changes.
        assert_eq!(
            store.rename(&ty, &collided, &name, &[]).unwrap(),
            Renamed::Taken(doc_a)
        );
        let new = ObjectId::new("S-1-from-b").unwrap();
        // A view of it published to a peer: refused.
        store.put_views(&a, &[(doc_b, View::default())]).unwrap();
        assert_eq!(
            store.rename(&ty, &collided, &new, &[b, a]).unwrap(),
            Renamed::Published(a)
        );
        assert_eq!(
            store.rename(&ty, &collided, &new, &[b]).unwrap(),
            Renamed::Done {
                doc: doc_b,
                was_collision: true
            }
        );
        assert_eq!(store.collision_count().unwrap(), 0);
        assert_eq!(store.lookup(&ty, &new).unwrap(), Some(doc_b));
        assert_eq!(store.lookup(&ty, &collided).unwrap(), None);
        assert_eq!(store.lookup(&ty, &name).unwrap(), Some(doc_a));
        assert_eq!(store.record(&doc_b).unwrap().unwrap().local_id, new);
        assert!(store.collisions(usize::MAX).unwrap().is_empty());
        assert!(store.scan_collisions().unwrap().is_empty());
        // Renaming again to the name it has is a no-op; a missing name is reported.
        assert!(matches!(
            store.rename(&ty, &new, &new, &[]).unwrap(),
            Renamed::Done { doc, .. } if doc == doc_b
        ));
        assert_eq!(
            store.rename(&ty, &collided, &new, &[]).unwrap(),
            Renamed::NotFound
        );
    }

    // A store of format 9 has no `collisions_v1`: opening it indexes the collisions a scan
    // finds, so the conflicts inbox still lists them without scanning.
    #[test]
    fn a_format_9_store_is_migrated_with_its_collisions_indexed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let doc_b = DocId([2; 16]);
        {
            let store = Store::create(&path).unwrap();
            put(&store, DocId([1; 16]), NodeId([1; 32]), "S-1");
            let collided = crate::model::collision_name(&ObjectId::new("S-1").unwrap(), &doc_b);
            put(&store, doc_b, NodeId([2; 32]), collided.as_str());
            // Back to format 9: the index table gone, the format string older.
            let tx = store.db.begin_write().unwrap();
            tx.delete_table(COLLISIONS).unwrap();
            tx.open_table(META)
                .unwrap()
                .insert("format", STORE_FORMAT_9.as_bytes())
                .unwrap();
            tx.commit().unwrap();
        }
        let store = Store::open(&path, 1 << 20).unwrap();
        assert_eq!(store.check_format().unwrap(), STORE_FORMAT);
        assert_eq!(listed(&store), vec![doc_b]);
        assert_eq!(store.collision_count().unwrap(), 1);
    }
}
