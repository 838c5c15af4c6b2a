//! Bundle uploads streamed to a temporary file in the home (mode 0600, removed when dropped),
//! never gathered in memory, within [`MAX_API_BUNDLE_BYTES`] and an idle timeout.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::http::{StatusCode, header};
use futures::StreamExt;
use tempfile::NamedTempFile;
use tokio::io::AsyncWriteExt;

use super::{ApiError, MAX_API_BUNDLE_BYTES};

/// The prefix of spooled uploads' file names in the home.
pub const SPOOL_PREFIX: &str = ".upload-";
/// Longest a bundle upload may pause between two pieces of its body, in seconds; then it is
/// answered 408 and its file removed.
pub const UPLOAD_IDLE_TIMEOUT_SECS: u64 = 60;

/// The directory uploads are spooled to (the node's home).
#[derive(Debug, Clone)]
pub struct SpoolDir(pub Arc<PathBuf>);

/// Stream `request`'s body into a new temporary file in `dir`; the file is removed when the
/// returned handle drops, including when this fails half-way.
pub async fn receive(dir: &SpoolDir, request: Request) -> Result<NamedTempFile, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "a bundle uploaded to a running node may be at most {MAX_API_BUNDLE_BYTES} bytes; import larger ones with the node stopped"
            ),
        )
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_API_BUNDLE_BYTES) {
        return Err(too_large());
    }
    let disk = |what: &str, e: std::io::Error| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot {what} a temporary file in {}: {e}", dir.0.display()),
        )
    };
    let tmp = tempfile::Builder::new()
        .prefix(SPOOL_PREFIX)
        .tempfile_in(dir.0.as_path())
        .map_err(|e| disk("create", e))?;
    let mut out = tokio::fs::File::from_std(tmp.reopen().map_err(|e| disk("open", e))?);
    let mut body = request.into_body().into_data_stream();
    let mut total: u64 = 0;
    loop {
        let next = tokio::time::timeout(Duration::from_secs(UPLOAD_IDLE_TIMEOUT_SECS), body.next())
            .await
            .map_err(|_| {
                ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("the upload paused for more than {UPLOAD_IDLE_TIMEOUT_SECS} s"),
                )
            })?;
        let chunk = match next {
            None => break,
            Some(Ok(chunk)) => chunk,
            Some(Err(e)) => {
                return Err(ApiError::bad_request(format!(
                    "the upload was cut off: {e}"
                )));
            }
        };
        total = total.saturating_add(chunk.len() as u64);
        if total > MAX_API_BUNDLE_BYTES {
            return Err(too_large());
        }
        out.write_all(&chunk).await.map_err(|e| disk("write", e))?;
    }
    out.flush().await.map_err(|e| disk("write", e))?;
    Ok(tmp)
}

/// Remove uploads a crashed node left behind in `dir`; returns how many.
pub fn clean(dir: &std::path::Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(SPOOL_PREFIX))
        .filter(|e| std::fs::remove_file(e.path()).is_ok())
        .count()
}
