//! The HTTP/JSON API a running node serves to applications (and to the CLI).
//!
//! ```text
//! PUT    /v1/objects/{type}/{id}           body: JSON object of fields; null removes a field
//! POST   /v1/objects    body: [{"type", "id", "fields"}, ...]: many puts in one transaction
//! GET    /v1/objects/{type}/{id}           the object; 404 if absent or deleted
//! DELETE /v1/objects/{type}/{id}
//! GET    /v1/objects/{type}?after=ID&limit=N        {"ids": [...], "next": ID|null}
//! GET    /v1/objects/{type}/{id}/history
//! POST   /v1/objects/{type}/{id}/resolve  body: {"path": FIELD, "pick": VALUE_ID}
//! GET    /v1/conflicts                               the conflicts inbox
//! GET    /v1/fleet                 every node heard of: its last status record, its age
//! GET    /metrics                                    Prometheus text format
//! GET    /healthz, /readyz      alive; ready (store open, actor answering); no token needed
//! GET    /                                           the status page (see [`page`])
//! GET    /v1/changes?since=SEQ&wait=SECS&limit=N     {"changes": [...], "last": SEQ}
//! GET    /v1/status
//! GET    /v1/peers                                    the configured peers and their sync state
//! PUT    /v1/peers/{name}    body: {"id": PEERID, "addrs": [MULTIADDR, ...]}   add or replace
//! DELETE /v1/peers/{name}
//! POST   /v1/peers/{name}/sync-now   send now, whatever its windows and budget say
//! GET    /v1/peers/{name}/plan?all=BOOL   what would cross now: changes, bytes, files, time
//! POST   /v1/files      body: the file's bytes (application/octet-stream)   {"hash", "size"}
//! GET    /v1/files/{hash}                             the file; one Range; ETag = the hash
//! GET    /v1/files                                    [{"hash", "size", "added_ms"}, ...]
//! ```
//! Errors are `{"error": "..."}` with a 4xx or 5xx status. Every request must carry
//! `Authorization: Bearer <token>` (the token is in `HOME/api.token`), a `Host` that names the
//! API and no foreign `Origin`; state-changing ones need `Content-Type: application/json`
//! (bundle uploads: `application/vnd.tidesync.bundle`; file uploads:
//! `application/octet-stream`). See [`guard`].
//!
//! Modules: [`guard`] (the checks before a handler), [`page`] (the status page),
//! [`login`] (its one-time login codes and sessions), [`serve`](mod@serve) (the HTTP server and its
//! limits), [`token`] (the token file), [`spool`] (bundle uploads to a temporary file),
//! [`files`] (file uploads and downloads, streamed), [`stream`] (bodies that blocking code
//! writes: file downloads and bundle exports).

pub mod files;
pub mod guard;
pub mod inbox;
pub mod login;
pub mod page;
pub mod serve;
pub mod spool;
pub mod stream;
pub mod token;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, FromRef, Path, Query, State};
use axum::http::StatusCode;
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Map, Value};
use tidesync_proto::{ObjectId, TypeName};

use crate::bundle::ImportReport;
use crate::core::DEFAULT_PAGE_IDS;
use crate::node::{CallError, NodeHandle};
use crate::report::Kind;

/// Largest request body accepted, in bytes.
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// An error answer: a status and a message for the caller.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl ToString) -> ApiError {
        ApiError {
            status,
            message: message.to_string(),
        }
    }
    fn bad_request(message: impl ToString) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({ "error": self.message })),
        )
            .into_response()
    }
}

/// Every failure the node reports maps to one status (see [`crate::report::ErrorKind`]).
impl<E: Kind> From<CallError<E>> for ApiError
where
    CallError<E>: std::fmt::Display,
{
    fn from(e: CallError<E>) -> ApiError {
        let status = StatusCode::from_u16(e.kind().http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        ApiError::new(status, e)
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// Why a home could not be made ready for a starting node.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error(transparent)]
    Token(#[from] token::TokenError),
    #[error("cannot restrict access to {home}: {source}")]
    Restrict {
        home: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Make a home ready for a starting node: take group and other access away from the home,
/// its config and its store (homes made before these modes), remove uploads a crash left
/// behind, and give it a token file (moving an old config's `api.token` there). Returns the
/// token every request must carry.
pub fn prepare_home(
    home: &crate::config::Home,
    config: &mut crate::config::Config,
) -> Result<String, PrepareError> {
    let restricted = home.restrict().map_err(|source| PrepareError::Restrict {
        home: home.dir.clone(),
        source,
    })?;
    for path in restricted {
        tracing::warn!(path = %path.display(), "took group and other access away");
    }
    let cleaned = spool::clean(&home.dir);
    if cleaned > 0 {
        tracing::info!(files = cleaned, "removed unfinished bundle uploads");
    }
    Ok(token::prepare(home, config)?)
}

/// Where `POST` uploads a bundle to import.
pub const BUNDLE_IMPORT_PATH: &str = "/v1/bundles/import";

pub use guard::Guard;
pub use serve::serve;

/// What the handlers share: the node, and the directory bundle uploads are spooled to.
#[derive(Clone)]
struct ApiState {
    node: NodeHandle,
    spool: spool::SpoolDir,
    metrics: crate::metrics::Metrics,
    logins: Arc<login::Logins>,
}

impl FromRef<ApiState> for Arc<login::Logins> {
    fn from_ref(state: &ApiState) -> Arc<login::Logins> {
        Arc::clone(&state.logins)
    }
}

impl FromRef<ApiState> for crate::metrics::Metrics {
    fn from_ref(state: &ApiState) -> crate::metrics::Metrics {
        state.metrics.clone()
    }
}

impl FromRef<ApiState> for NodeHandle {
    fn from_ref(state: &ApiState) -> NodeHandle {
        state.node.clone()
    }
}

impl FromRef<ApiState> for spool::SpoolDir {
    fn from_ref(state: &ApiState) -> spool::SpoolDir {
        state.spool.clone()
    }
}

/// The API's routes over a node handle, behind `guard`; bundle uploads are spooled to
/// temporary files in `spool_dir` (the node's home). `/healthz` and `/readyz` are outside the
/// guard: they need no token and reveal nothing.
pub fn router(
    node: NodeHandle,
    guard: Guard,
    spool_dir: std::path::PathBuf,
    metrics: crate::metrics::Metrics,
) -> Router {
    let health = Router::new()
        .route("/healthz", get(|| async { "alive\n" }))
        .route("/readyz", get(readyz))
        .with_state(node.clone());
    let logins = guard.logins();
    Router::new()
        .route("/", get(page::page))
        .route(page::BODY_PATH, get(page::body))
        .route(page::LOGIN_PATH, get(page::login))
        .route(page::LOGIN_CODES_PATH, axum::routing::post(page::new_code))
        .route("/metrics", get(metrics_text))
        .route(
            "/v1/objects/{type}/{id}",
            get(get_object).put(put_object).delete(delete_object),
        )
        .route("/v1/objects/{type}/{id}/history", get(history))
        .route(
            "/v1/objects/{type}/{id}/resolve",
            axum::routing::post(inbox::resolve),
        )
        .route(
            "/v1/objects/{type}/{id}/rename",
            axum::routing::post(inbox::rename),
        )
        .route("/v1/objects/{type}", get(list))
        .route("/v1/objects", axum::routing::post(put_many))
        .route("/v1/changes", get(changes))
        .route("/v1/status", get(status))
        .route("/v1/conflicts", get(inbox::conflicts))
        .route("/v1/fleet", get(fleet))
        .route("/v1/held", axum::routing::post(held))
        .route("/v1/peers", get(peers))
        .route(
            "/v1/peers/{name}",
            axum::routing::put(set_peer).delete(remove_peer),
        )
        .route("/v1/peers/{name}/sync-now", axum::routing::post(sync_now))
        .route("/v1/peers/{name}/plan", get(plan))
        .route("/v1/bundles/export", axum::routing::post(export_bundle))
        .route(BUNDLE_IMPORT_PATH, axum::routing::post(import_bundle))
        .route(files::FILES_PATH, get(files::list).post(files::upload))
        .route("/v1/files/verify", axum::routing::post(files::verify))
        .route("/v1/files/gc", axum::routing::post(files::gc))
        .route("/v1/files/{hash}", get(files::download))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "no such endpoint; see the README for the API",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(
            Arc::new(guard),
            guard::guard,
        ))
        .with_state(ApiState {
            node,
            spool: spool::SpoolDir(Arc::new(spool_dir)),
            metrics,
            logins,
        })
        .merge(health)
}

/// `GET /readyz`: 200 once the store reads and the node actor answers, 503 otherwise.
async fn readyz(State(node): State<NodeHandle>) -> Response {
    match node.ready().await {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response(),
    }
}

/// `GET /metrics`: the registry in the OpenMetrics text format (see [`crate::metrics`]).
async fn metrics_text(
    State(node): State<NodeHandle>,
    State(metrics): State<crate::metrics::Metrics>,
) -> Result<Response, ApiError> {
    let status = node.status().await?;
    let text = tokio::task::spawn_blocking(move || metrics.encode(status))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e))?
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            crate::metrics::METRICS_MEDIA_TYPE,
        )],
        text,
    )
        .into_response())
}

pub(crate) fn names(ty: String, id: String) -> Result<(TypeName, ObjectId), ApiError> {
    Ok((
        TypeName::new(ty).map_err(ApiError::bad_request)?,
        ObjectId::new(id).map_err(ApiError::bad_request)?,
    ))
}

/// Parse a request body as JSON of the shape `T`; a body that is not one is refused (400)
/// with `shape`, how such a body is written, and what went wrong.
pub(crate) fn json_body<T: serde::de::DeserializeOwned>(
    body: &[u8],
    shape: &str,
) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body must be {shape}: {e}")))
}

/// Parse a request body as a JSON object of fields.
pub fn parse_fields(body: &[u8]) -> Result<Map<String, Value>, String> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(format!(
            "the body must be a JSON object of fields, not {}",
            match other {
                Value::Null => "null",
                Value::Bool(_) => "a boolean",
                Value::Number(_) => "a number",
                Value::String(_) => "a string",
                Value::Array(_) => "an array",
                Value::Object(_) => "an object",
            }
        )),
        Err(e) => Err(format!("the body is not valid JSON: {e}")),
    }
}

/// Largest single object body accepted by `PUT`, in bytes (a change must fit one frame).
pub const MAX_OBJECT_BYTES: usize = 4 * 1024 * 1024;

async fn put_object(
    State(node): State<NodeHandle>,
    Path((ty, id)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<crate::core::WriteReply> {
    if body.len() > MAX_OBJECT_BYTES {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("an object may be at most {MAX_OBJECT_BYTES} bytes"),
        ));
    }
    let (ty, id) = names(ty, id)?;
    let fields = parse_fields(&body).map_err(ApiError::bad_request)?;
    Ok(Json(node.put(ty, id, fields).await?))
}

/// Most objects in one `POST /v1/objects`.
pub const MAX_BATCH_OBJECTS: usize = 10_000;

/// One item of `POST /v1/objects`.
#[derive(Debug, Deserialize, serde::Serialize)]
pub struct BatchItem {
    #[serde(rename = "type")]
    pub ty: String,
    pub id: String,
    pub fields: Map<String, Value>,
}

async fn put_many(
    State(node): State<NodeHandle>,
    body: Bytes,
) -> ApiResult<Vec<crate::core::WriteReply>> {
    let items: Vec<BatchItem> = json_body(&body, r#"a JSON array of {"type", "id", "fields"}"#)?;
    if items.len() > MAX_BATCH_OBJECTS {
        return Err(ApiError::bad_request(format!(
            "{} objects in one batch; at most {MAX_BATCH_OBJECTS}",
            items.len()
        )));
    }
    let items = items
        .into_iter()
        .map(|i| names(i.ty, i.id).map(|(t, id)| (t, id, i.fields)))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(node.put_many(items).await?))
}

async fn get_object(
    State(node): State<NodeHandle>,
    Path((ty, id)): Path<(String, String)>,
) -> ApiResult<Map<String, Value>> {
    let (ty, id) = names(ty, id)?;
    Ok(Json(node.get(ty, id).await?))
}

async fn delete_object(
    State(node): State<NodeHandle>,
    Path((ty, id)): Path<(String, String)>,
) -> ApiResult<crate::core::WriteReply> {
    let (ty, id) = names(ty, id)?;
    Ok(Json(node.delete(ty, id).await?))
}

async fn history(
    State(node): State<NodeHandle>,
    Path((ty, id)): Path<(String, String)>,
) -> ApiResult<crate::core::History> {
    let (ty, id) = names(ty, id)?;
    Ok(Json(node.history(ty, id).await?))
}

#[derive(Deserialize)]
struct ListQuery {
    after: Option<String>,
    limit: Option<usize>,
}

async fn list(
    State(node): State<NodeHandle>,
    Path(ty): Path<String>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<crate::store::IdPage> {
    let ty = TypeName::new(ty).map_err(ApiError::bad_request)?;
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    Ok(Json(
        node.list(ty, q.after, q.limit.unwrap_or(DEFAULT_PAGE_IDS))
            .await?,
    ))
}

#[derive(Deserialize)]
struct ChangesQuery {
    since: Option<u64>,
    wait: Option<u64>,
    limit: Option<usize>,
    /// Also the file feed after this number (see `reads::FileFeed`).
    files_since: Option<u64>,
}

async fn changes(
    State(node): State<NodeHandle>,
    query: Result<Query<ChangesQuery>, QueryRejection>,
) -> ApiResult<crate::core::Feed> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let wait = Duration::from_secs(q.wait.unwrap_or(0));
    Ok(Json(
        node.changes(
            q.since.unwrap_or(0),
            q.limit.unwrap_or(DEFAULT_PAGE_IDS),
            wait,
            q.files_since,
        )
        .await?,
    ))
}

/// `POST /v1/held` with a JSON [`crate::held::HeldQuery`]: list, or purge, held changes.
async fn held(
    State(node): State<NodeHandle>,
    Json(query): Json<crate::held::HeldQuery>,
) -> ApiResult<crate::held::HeldReport> {
    Ok(Json(node.held(query).await?))
}

async fn status(State(node): State<NodeHandle>) -> ApiResult<crate::core::Status> {
    Ok(Json(node.status().await?))
}

async fn sync_now(
    State(node): State<NodeHandle>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    node.sync_now(name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn fleet(State(node): State<NodeHandle>) -> ApiResult<Vec<crate::reads::FleetNode>> {
    Ok(Json(node.fleet().await?))
}

async fn peers(State(node): State<NodeHandle>) -> ApiResult<Vec<crate::core::PeerStatus>> {
    Ok(Json(node.status().await?.peers))
}

/// Largest bundle `POST /v1/bundles/import` takes, in bytes; larger ones are imported with
/// the node stopped (`tidesync import` then opens the store itself).
pub const MAX_API_BUNDLE_BYTES: u64 = 1 << 40;
/// The response header of `POST /v1/bundles/export` that carries the export's report (JSON).
pub const EXPORT_REPORT_HEADER: &str = "x-tidesync-export";

#[derive(Deserialize)]
struct PlanQuery {
    #[serde(default)]
    all: bool,
}

async fn plan(
    State(node): State<NodeHandle>,
    Path(name): Path<String>,
    Query(q): Query<PlanQuery>,
) -> ApiResult<crate::core::Plan> {
    Ok(Json(node.plan(name, q.all).await?))
}

#[derive(Deserialize)]
struct ExportQuery {
    #[serde(rename = "for")]
    peer: String,
    #[serde(default)]
    all: bool,
    #[serde(default)]
    plain: bool,
    /// Leave the files out (`files=false`); they are carried by default.
    #[serde(default = "yes")]
    files: bool,
}

fn yes() -> bool {
    true
}

/// `POST /v1/bundles/export?for=PEER[&all=true][&plain=true][&files=false]`: the bundle,
/// streamed as it is written, with the report in the `x-tidesync-export` header (its `bytes`
/// is 0: the length is known only at the end). A bundle that cannot be finished (a stored file
/// found rotted) cuts the response off.
async fn export_bundle(
    State(node): State<NodeHandle>,
    Query(q): Query<ExportQuery>,
) -> Result<axum::response::Response, ApiError> {
    let (tx, bytes) = stream::channel();
    let out = Box::new(stream::ChunkWriter::new(tx.clone()));
    let done = Box::new(move |result: Result<(), crate::bundle::BundleError>| {
        if let Err(e) = result {
            let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
        }
    });
    let report = node
        .export_bundle(q.peer, q.all, !q.plain, q.files, out, done)
        .await?;
    let report = serde_json::to_string(&report)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    Ok((
        [
            (
                axum::http::header::CONTENT_TYPE,
                "application/octet-stream".to_string(),
            ),
            (
                axum::http::HeaderName::from_static(EXPORT_REPORT_HEADER),
                report,
            ),
        ],
        bytes,
    )
        .into_response())
}

#[derive(Deserialize)]
struct ImportQuery {
    #[serde(default)]
    dry_run: bool,
}

/// `POST /v1/bundles/import[?dry_run=true]` with the bundle as the body
/// (`Content-Type: application/vnd.tidesync.bundle`): the import report. The body is
/// streamed to a temporary file in the home, within [`MAX_API_BUNDLE_BYTES`], and the import
/// reads that file.
async fn import_bundle(
    State(node): State<NodeHandle>,
    State(spool_dir): State<spool::SpoolDir>,
    Query(q): Query<ImportQuery>,
    request: axum::extract::Request,
) -> ApiResult<ImportReport> {
    let file = spool::receive(&spool_dir, request).await?;
    let src = file.reopen().map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!(
                "cannot read the spooled bundle {}: {e}",
                file.path().display()
            ),
        )
    })?;
    let report = node
        .import_bundle(Box::new(std::io::BufReader::new(src)), q.dry_run)
        .await?;
    drop(file);
    Ok(Json(report))
}

/// The body of `PUT /v1/peers/{name}`.
#[derive(Debug, Deserialize, serde::Serialize)]
pub struct PeerBody {
    #[serde(with = "crate::config::node_id_text")]
    pub id: tidesync_proto::NodeId,
    #[serde(default)]
    pub addrs: Vec<libp2p::Multiaddr>,
    #[serde(flatten)]
    pub policy: crate::policy::Policy,
}

async fn set_peer(
    State(node): State<NodeHandle>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let body: PeerBody = json_body(
        &body,
        r#"{"id": PEERID, "addrs": [MULTIADDR, ...], policy fields...}"#,
    )?;
    node.set_peer(crate::config::PeerConfig {
        name,
        id: body.id,
        addrs: body.addrs,
        policy: body.policy,
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn remove_peer(
    State(node): State<NodeHandle>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    node.remove_peer(name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_must_be_json_objects() {
        assert!(parse_fields(br#"{"a": 1}"#).is_ok());
        assert!(parse_fields(b"[1]").unwrap_err().contains("an array"));
        assert!(
            parse_fields(b"{nope")
                .unwrap_err()
                .contains("not valid JSON")
        );
    }
}
