//! The file endpoints: `POST /v1/files` streams a body into the node's file store,
//! `GET /v1/files/{hash}` streams a stored file (one `Range`, the hash as its ETag; an
//! `on-demand` file is fetched first, the request waiting), and `GET /v1/files` lists what is
//! stored, or with `?state=missing` the want-list.

use std::io::{Read, Seek, SeekFrom};
use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::ApiError;
use super::spool::UPLOAD_IDLE_TIMEOUT_SECS;
use crate::files::{FILE_CHUNK_BYTES, FileHash, MAX_FILE_BYTES};
use crate::node::NodeHandle;
use crate::store::FileError;

/// Where files are uploaded and listed.
pub const FILES_PATH: &str = "/v1/files";
/// The media type of an uploaded file's body.
pub const FILE_MEDIA_TYPE: &str = "application/octet-stream";
/// Upload chunks in flight between the request and the disk writer.
const UPLOAD_CHANNEL_CHUNKS: usize = 8;

/// A stored file, as `POST /v1/files` answers and `GET /v1/files` lists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredFile {
    pub hash: String,
    pub size: u64,
    /// When it was stored here, Unix milliseconds (listing only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub added_ms: Option<i64>,
}

/// Longest a read of an `on-demand` file waits for it to be fetched, in seconds.
pub const ON_DEMAND_WAIT_SECS: u64 = 300;

/// A file on the want-list, as `GET /v1/files?state=missing` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WantedFile {
    pub hash: String,
    pub size: u64,
    /// The peers it is asked of (PeerIds).
    pub sources: Vec<String>,
    /// Fetched only when read.
    pub on_demand: bool,
    /// Segments (1 MiB) verified and durable, of all.
    pub segments_done: u64,
    pub segments: u64,
    pub last_error: Option<String>,
}

impl From<&crate::model::WantRow> for WantedFile {
    fn from(w: &crate::model::WantRow) -> WantedFile {
        WantedFile {
            hash: w.hash.to_string(),
            size: w.size,
            sources: w.sources.iter().map(ToString::to_string).collect(),
            on_demand: w.on_demand,
            segments_done: w.done.iter().map(|b| u64::from(b.count_ones())).sum(),
            segments: tidesync_proto::files::FileAsk::segments(w.size),
            last_error: w.last_error.clone(),
        }
    }
}

/// The query of `GET /v1/files`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// `stored` (the default) or `missing`.
    pub state: Option<String>,
}

fn file_error(e: FileError) -> ApiError {
    let status = match &e {
        FileError::NotFound(_) => StatusCode::NOT_FOUND,
        FileError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        FileError::DiskFull { .. } => StatusCode::INSUFFICIENT_STORAGE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError::new(status, e.to_string())
}

fn join_error(e: tokio::task::JoinError) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("the file writer stopped: {e}"),
    )
}

/// `POST /v1/files`: the body, streamed to a partial file on a blocking thread, hashed as it
/// arrives, then made durable, moved into place and indexed. Nothing is indexed for a body
/// that is cut off, too large or stalls.
pub async fn upload(
    State(node): State<NodeHandle>,
    request: Request,
) -> Result<Response, ApiError> {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_FILE_BYTES) {
        return Err(file_error(FileError::TooLarge));
    }
    let store = node.file_store().clone();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    // `None` tells the writer the upload failed: it removes the partial file and keeps
    // nothing (answers `Ok(None)`).
    let (tx, mut rx) =
        tokio::sync::mpsc::channel::<Option<axum::body::Bytes>>(UPLOAD_CHANNEL_CHUNKS);
    let writer = tokio::task::spawn_blocking(move || {
        let mut partial = store.partial_file()?;
        let written = loop {
            match rx.blocking_recv() {
                None => break Ok(true),
                Some(None) => break Ok(false),
                Some(Some(chunk)) => {
                    if let Err(e) = partial.write(&chunk) {
                        break Err(e);
                    }
                }
            }
        };
        match written {
            Ok(true) => store.keep_file(partial, now).map(Some),
            Ok(false) => {
                let _ = std::fs::remove_file(&partial.path);
                Ok(None)
            }
            Err(e) => {
                let _ = std::fs::remove_file(&partial.path);
                Err(e)
            }
        }
    });
    let mut body = request.into_body().into_data_stream();
    let mut failed = None;
    loop {
        let next =
            tokio::time::timeout(Duration::from_secs(UPLOAD_IDLE_TIMEOUT_SECS), body.next()).await;
        let chunk = match next {
            Err(_) => {
                failed = Some(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("the upload paused for more than {UPLOAD_IDLE_TIMEOUT_SECS} s"),
                ));
                break;
            }
            Ok(None) => break,
            Ok(Some(Ok(chunk))) => chunk,
            Ok(Some(Err(e))) => {
                failed = Some(ApiError::bad_request(format!(
                    "the upload was cut off: {e}"
                )));
                break;
            }
        };
        if tx.send(Some(chunk)).await.is_err() {
            // The writer failed; its error is reported below.
            break;
        }
    }
    if let Some(e) = failed {
        // The writer removes what it wrote; its own answer does not matter any more.
        let _ = tx.send(None).await;
        drop(tx);
        let _ = writer.await;
        return Err(e);
    }
    drop(tx);
    let Some((hash, size)) = writer.await.map_err(join_error)?.map_err(file_error)? else {
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the file writer stopped before the upload ended",
        ));
    };
    node.file_stored();
    let stored = StoredFile {
        hash: hash.to_string(),
        size,
        added_ms: None,
    };
    Ok((StatusCode::CREATED, axum::Json(stored)).into_response())
}

/// `GET /v1/files`: every stored file; `?state=missing`: the want-list.
pub async fn list(
    State(node): State<NodeHandle>,
    Query(query): Query<ListQuery>,
) -> Result<Response, ApiError> {
    match query.state.as_deref() {
        None | Some("stored") => Ok(axum::Json(stored(node).await?).into_response()),
        Some("missing") => {
            let store = node.file_store().clone();
            let wants = tokio::task::spawn_blocking(move || store.wants())
                .await
                .map_err(join_error)?
                .map_err(|e| file_error(e.into()))?;
            let wants: Vec<WantedFile> = wants.iter().map(WantedFile::from).collect();
            Ok(axum::Json(wants).into_response())
        }
        Some(other) => Err(ApiError::bad_request(format!(
            "state={other:?}: use stored or missing"
        ))),
    }
}

async fn stored(node: NodeHandle) -> Result<Vec<StoredFile>, ApiError> {
    let store = node.file_store().clone();
    let files = tokio::task::spawn_blocking(move || store.files())
        .await
        .map_err(join_error)?
        .map_err(|e| file_error(e.into()))?;
    Ok(files
        .into_iter()
        .map(|(hash, row)| StoredFile {
            hash: hash.to_string(),
            size: row.size,
            added_ms: Some(row.added_ms),
        })
        .collect())
}

/// A `Range` header that cannot be served (answered 416).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unsatisfiable;

/// The byte range a `Range` header asks of a file of `size` bytes: `None` for the whole
/// file, `Err` for one that cannot be served (416). One range only; `bytes=a-b`, `bytes=a-`
/// and `bytes=-n`.
pub fn range(header: Option<&str>, size: u64) -> Result<Option<(u64, u64)>, Unsatisfiable> {
    let Some(spec) = header else {
        return Ok(None);
    };
    let spec = spec.trim().strip_prefix("bytes=").ok_or(Unsatisfiable)?;
    if spec.contains(',') {
        return Err(Unsatisfiable);
    }
    let (a, b) = spec.split_once('-').ok_or(Unsatisfiable)?;
    let (a, b) = (a.trim(), b.trim());
    let (start, end) = match (a.is_empty(), b.is_empty()) {
        (true, false) => {
            let n: u64 = b.parse().map_err(|_| Unsatisfiable)?;
            if n == 0 {
                return Err(Unsatisfiable);
            }
            (
                size.saturating_sub(n),
                size.checked_sub(1).ok_or(Unsatisfiable)?,
            )
        }
        (false, _) => {
            let start: u64 = a.parse().map_err(|_| Unsatisfiable)?;
            let end = if b.is_empty() {
                size.checked_sub(1).ok_or(Unsatisfiable)?
            } else {
                b.parse::<u64>()
                    .map_err(|_| Unsatisfiable)?
                    .min(size.saturating_sub(1))
            };
            (start, end)
        }
        (true, true) => return Err(Unsatisfiable),
    };
    if start >= size || start > end {
        return Err(Unsatisfiable);
    }
    Ok(Some((start, end)))
}

/// `GET /v1/files/{hash}`: the file, streamed from disk; `Range` for part of it; the hash is
/// its ETag, so `If-None-Match` with it answers 304.
pub async fn download(
    State(node): State<NodeHandle>,
    Path(hash): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let hash: FileHash = hash.parse().map_err(ApiError::bad_request)?;
    let lookup = || {
        let store = node.file_store().clone();
        async move {
            tokio::task::spawn_blocking(move || store.file(&hash))
                .await
                .map_err(join_error)?
                .map_err(file_error)
        }
    };
    let mut found = lookup().await?;
    if found.is_none()
        && node
            .fetch_file(hash, Duration::from_secs(ON_DEMAND_WAIT_SECS))
            .await
    {
        // A wanted file, fetched while this request waited.
        found = lookup().await?;
    }
    let Some((path, row)) = found else {
        return Err(file_error(FileError::NotFound(hash)));
    };
    let etag = format!("\"{hash}\"");
    let etag_value = HeaderValue::from_str(&etag).map_err(ApiError::bad_request)?;
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"))
    {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag_value)]).into_response());
    }
    let asked = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let Ok(part) = range(asked, row.size) else {
        let mut r = ApiError::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            format!(
                "cannot serve range {asked:?} of a file of {} bytes",
                row.size
            ),
        )
        .into_response();
        if let Ok(v) = HeaderValue::from_str(&format!("bytes */{}", row.size)) {
            r.headers_mut().insert(header::CONTENT_RANGE, v);
        }
        return Ok(r);
    };
    let (start, end) = part.unwrap_or((0, row.size.saturating_sub(1)));
    let len = if row.size == 0 { 0 } else { end - start + 1 };
    // A blocking reader sends chunks through a bounded channel: memory stays flat.
    let (tx, body) = super::stream::channel();
    tokio::task::spawn_blocking(move || {
        let read = || -> Result<(), std::io::Error> {
            let mut file = std::fs::File::open(&path)?;
            file.seek(SeekFrom::Start(start))?;
            let mut left = len;
            while left > 0 {
                let mut buf = vec![0u8; (left.min(FILE_CHUNK_BYTES as u64)) as usize];
                file.read_exact(&mut buf)?;
                left -= buf.len() as u64;
                if tx.blocking_send(Ok(buf)).is_err() {
                    return Ok(());
                }
            }
            Ok(())
        };
        if let Err(e) = read() {
            let _ = tx.blocking_send(Err(e));
        }
    });
    let mut response = Response::new(body);
    let h = response.headers_mut();
    h.insert(header::ETAG, etag_value);
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(FILE_MEDIA_TYPE),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if part.is_some() {
        *response.status_mut() = StatusCode::PARTIAL_CONTENT;
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{}", row.size)) {
            response.headers_mut().insert(header::CONTENT_RANGE, v);
        }
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::{Unsatisfiable, range};

    #[test]
    fn ranges_are_read_as_rfc_9110_has_them() {
        assert_eq!(range(None, 10), Ok(None));
        assert_eq!(range(Some("bytes=0-3"), 10), Ok(Some((0, 3))));
        assert_eq!(range(Some("bytes=4-"), 10), Ok(Some((4, 9))));
        assert_eq!(range(Some("bytes=-3"), 10), Ok(Some((7, 9))));
        assert_eq!(range(Some("bytes=8-100"), 10), Ok(Some((8, 9))));
        for bad in [
            "bytes=10-",
            "bytes=5-2",
            "bytes=0-1,3-4",
            "items=0-1",
            "bytes=-0",
            "bytes=-",
        ] {
            assert_eq!(range(Some(bad), 10), Err(Unsatisfiable), "{bad}");
        }
        assert_eq!(range(Some("bytes=0-"), 0), Err(Unsatisfiable));
    }
}

/// `POST /v1/files/verify`: re-hash every stored file (see [`crate::store::Store::verify_files`]).
pub async fn verify(
    State(node): State<NodeHandle>,
) -> Result<axum::Json<crate::store::VerifyReport>, ApiError> {
    let store = node.file_store().clone();
    let (peers, me) = (node.peer_ids(), node.info().node);
    let report = tokio::task::spawn_blocking(move || {
        store.verify_files(&peers, me, crate::replica::system_now_ms())
    })
    .await
    .map_err(join_error)?
    .map_err(file_error)?;
    Ok(axum::Json(report))
}

/// The query of `POST /v1/files/gc`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GcQuery {
    /// Keep unreferenced files stored less than this many seconds ago.
    pub grace_secs: Option<u64>,
}

/// `POST /v1/files/gc`: remove the files nothing refers to (see
/// [`crate::store::Store::gc_files`]).
pub async fn gc(
    State(node): State<NodeHandle>,
    Query(query): Query<GcQuery>,
) -> Result<axum::Json<crate::store::GcReport>, ApiError> {
    let store = node.file_store().clone();
    let grace = gc_grace_ms(query.grace_secs);
    let report =
        tokio::task::spawn_blocking(move || store.gc_files(crate::replica::system_now_ms(), grace))
            .await
            .map_err(join_error)?
            .map_err(file_error)?;
    Ok(axum::Json(report))
}

/// The grace period of `file gc`, in milliseconds.
pub fn gc_grace_ms(secs: Option<u64>) -> i64 {
    let secs = secs.unwrap_or(crate::store::DEFAULT_GC_GRACE_SECS);
    i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX)
}
