//! The conflicts inbox's routes: listing it, resolving a field's concurrent values and
//! renaming an object out of a name collision.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use serde::Deserialize;

use super::{ApiResult, json_body, names};
use crate::node::NodeHandle;

pub async fn conflicts(State(node): State<NodeHandle>) -> ApiResult<Vec<crate::core::Conflict>> {
    Ok(Json(node.conflicts().await?))
}

/// The body of `POST /v1/objects/{type}/{id}/resolve`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResolveBody {
    path: String,
    pick: String,
}

pub async fn resolve(
    State(node): State<NodeHandle>,
    Path((ty, id)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<crate::core::WriteReply> {
    let (ty, id) = names(ty, id)?;
    let body: ResolveBody = json_body(&body, r#"{"path": FIELD, "pick": VALUE_ID}"#)?;
    Ok(Json(node.resolve(ty, id, body.path, body.pick).await?))
}

/// The body of `POST /v1/objects/{type}/{id}/rename`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RenameBody {
    to: String,
}

/// Give an object a new local name (a name collision's resolution; nothing syncs).
pub async fn rename(
    State(node): State<NodeHandle>,
    Path((ty, id)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<crate::core::RenameReply> {
    let (ty, id) = names(ty, id)?;
    let body: RenameBody = json_body(&body, r#"{"to": NEW_ID}"#)?;
    Ok(Json(node.rename(ty, id, body.to).await?))
}
