//! `tidesync held`: listing and purging changes held for missing dependencies, by peer or by
//! document, with each sender's tally against its quota.

use serde::{Deserialize, Serialize};
use tidesync_proto::{NodeId, ObjectId, TypeName};

use crate::core::{Core, ReadError};
use crate::store::HeldFilter;

/// Most held changes one listing prints; the tallies count them all.
pub const MAX_HELD_LISTED: usize = 1_000;

/// Which held changes a listing or purge means: a configured peer's (by name), one object's
/// (by type and local id), or all.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HeldQuery {
    pub peer: Option<String>,
    pub ty: Option<String>,
    pub id: Option<String>,
    #[serde(default)]
    pub purge: bool,
}

/// One held change.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeldItem {
    pub ty: String,
    pub id: String,
    pub doc: String,
    pub hash: String,
    /// The peer it came from (its configured name when it has one), or "unknown".
    pub from: String,
    pub since_ms: i64,
}

/// One sender's held changes against its quota.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeldTallyReport {
    pub from: String,
    pub changes: u64,
    pub bytes: u64,
    pub refused_for_room: u64,
}

/// The answer to a [`HeldQuery`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeldReport {
    /// How many were removed, for a purge.
    pub removed: Option<u64>,
    pub held: Vec<HeldItem>,
    pub tallies: Vec<HeldTallyReport>,
}

/// Why a held-change query failed.
#[derive(Debug, thiserror::Error)]
pub enum HeldError {
    #[error("no configured peer is called {0:?}")]
    UnknownPeer(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Read(#[from] ReadError),
}

fn read_err(source: crate::store::StoreError) -> HeldError {
    HeldError::Read(ReadError::Store {
        what: "held changes".to_string(),
        source,
    })
}

/// A peer's configured name, or its id, or "unknown" for a sender never recorded.
fn peer_label(core: &Core, id: Option<NodeId>) -> String {
    match id {
        Some(id) => core
            .replica()
            .policies()
            .name_of(&id)
            .map(str::to_string)
            .unwrap_or_else(|| id.to_string()),
        None => "unknown".to_string(),
    }
}

/// List, and with `purge` remove, the held changes `query` names.
pub fn held(core: &Core, query: &HeldQuery) -> Result<HeldReport, HeldError> {
    let this = core;
    let from = match &query.peer {
        Some(name) => Some(
            this.replica()
                .policies()
                .named(name)
                .ok_or_else(|| HeldError::UnknownPeer(name.clone()))?,
        ),
        None => None,
    };
    let doc = match (&query.ty, &query.id) {
        (Some(ty), Some(id)) => {
            let ty = TypeName::new(ty).map_err(|e| HeldError::Invalid(e.to_string()))?;
            let id = ObjectId::new(id).map_err(|e| HeldError::Invalid(e.to_string()))?;
            let found = this.store().lookup(&ty, &id).map_err(read_err)?;
            Some(found.ok_or(ReadError::NotFound { ty, id })?)
        }
        (None, None) => None,
        _ => return Err(HeldError::Invalid("name both a type and an id".into())),
    };
    let filter = HeldFilter { from, doc };
    let removed = if query.purge {
        Some(this.store().purge_held(filter).map_err(read_err)?)
    } else {
        None
    };
    let rows = this
        .store()
        .held_rows(filter, MAX_HELD_LISTED)
        .map_err(read_err)?;
    let held = rows
        .into_iter()
        .map(|(hash, r)| HeldItem {
            ty: r.header.ty.to_string(),
            id: r.header.id.to_string(),
            doc: r.header.doc.to_string(),
            hash: hex::encode(hash),
            from: peer_label(this, r.from),
            since_ms: r.since_ms,
        })
        .collect();
    let tallies = this
        .store()
        .held_tallies()
        .map_err(read_err)?
        .into_iter()
        .filter(|(f, t)| {
            (t.changes > 0 || t.refused_for_room > 0) && (from.is_none() || *f == from)
        })
        .map(|(f, t)| HeldTallyReport {
            from: peer_label(this, f),
            changes: t.changes,
            bytes: t.bytes,
            refused_for_room: t.refused_for_room,
        })
        .collect();
    Ok(HeldReport {
        removed,
        held,
        tallies,
    })
}
