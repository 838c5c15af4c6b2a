//! Renaming an object on this node: the local answer to a name collision (names are local, so
//! a rename writes no change and nothing syncs).

use serde::{Deserialize, Serialize};
use tidesync_proto::{DocId, NodeId, ObjectId, TypeName};

use super::Replica;
use crate::store::{Renamed, StoreError};

/// What a rename did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenameReply {
    #[serde(rename = "type")]
    pub ty: String,
    /// The name it had.
    pub from: String,
    /// The name it has now.
    pub to: String,
    /// The document's global id (unchanged).
    pub doc: String,
    /// Whether the old name was a collision name, so that the collision left the inbox.
    pub was_collision: bool,
}

/// Why a rename was refused.
#[derive(Debug, thiserror::Error)]
pub enum RenameError {
    #[error("no {ty} is named {id} here")]
    NotFound { ty: TypeName, id: ObjectId },
    #[error("cannot rename {ty}/{id} to {to}: {source}")]
    BadName {
        ty: TypeName,
        id: ObjectId,
        to: String,
        source: tidesync_proto::IdError,
    },
    #[error("cannot rename {ty}/{id} to {to}: document {holder} already has that name here")]
    Taken {
        ty: TypeName,
        id: ObjectId,
        to: ObjectId,
        holder: DocId,
    },
    #[error(
        "cannot rename {ty}/{id}: a view of it is published to peer {peer} under a name made \
         from this one, and would be left behind there under the old name"
    )]
    Published {
        ty: TypeName,
        id: ObjectId,
        peer: String,
    },
    #[error("cannot rename {ty}/{id}: {source}")]
    Store {
        ty: TypeName,
        id: ObjectId,
        source: StoreError,
    },
}

impl Replica {
    /// Give the object `ty/id` the local name `to`, which must be a name a new object may have
    /// (no `~`). One durable transaction; a name collision renamed leaves the inbox.
    pub fn rename(
        &mut self,
        ty: &TypeName,
        id: &ObjectId,
        to: &str,
    ) -> Result<RenameReply, RenameError> {
        let bad = |source| RenameError::BadName {
            ty: ty.clone(),
            id: id.clone(),
            to: to.to_string(),
            source,
        };
        let new = ObjectId::new(to).map_err(bad)?;
        new.check_new().map_err(bad)?;
        let peers: Vec<NodeId> = self.policies.ids().copied().collect();
        let outcome =
            self.store
                .rename(ty, id, &new, &peers)
                .map_err(|source| RenameError::Store {
                    ty: ty.clone(),
                    id: id.clone(),
                    source,
                })?;
        match outcome {
            Renamed::Done { doc, was_collision } => {
                tracing::info!(%ty, from = %id, to = %new, %doc, "renamed an object here");
                Ok(RenameReply {
                    ty: ty.to_string(),
                    from: id.to_string(),
                    to: new.to_string(),
                    doc: doc.to_string(),
                    was_collision,
                })
            }
            Renamed::NotFound => Err(RenameError::NotFound {
                ty: ty.clone(),
                id: id.clone(),
            }),
            Renamed::Taken(holder) => Err(RenameError::Taken {
                ty: ty.clone(),
                id: id.clone(),
                to: new,
                holder,
            }),
            Renamed::Published(peer) => Err(RenameError::Published {
                ty: ty.clone(),
                id: id.clone(),
                peer: self
                    .policies
                    .name_of(&peer)
                    .map(str::to_string)
                    .unwrap_or_else(|| peer.to_string()),
            }),
        }
    }
}
