//! The CLI's way to a node: the running node's HTTP API when one runs on the home, otherwise the
//! home's store opened in-process through the same [`Core`] the node uses.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value as Json};
use tidesync_proto::{ObjectId, TypeName};

use crate::api::guard;
use crate::bundle::{ExportReport, ImportReport};
use crate::config::{Config, Home};
use crate::core::{Core, Feed, History, OpenError, Status, WriteReply};
use crate::report::{ErrorKind, Kind};
use crate::store::{IdPage, StoreError};

/// How long the CLI waits for an answer from a running node, beyond any long-poll wait.
pub const API_TIMEOUT_SECS: u64 = 30;
/// How much longer it waits for a running node to export or import a bundle.
pub const BUNDLE_WAIT_SECS: u64 = 600;
/// Longest a file upload may take, in seconds: files are large, and the node answers once the
/// file is whole and durable.
pub const FILE_WAIT_SECS: u64 = 24 * 3600;

/// Why a CLI request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error(
        "a node is running on {home} but {file} does not say where its API is; wait for it to finish starting, or stop it"
    )]
    NoApiAddress {
        home: std::path::PathBuf,
        file: std::path::PathBuf,
    },
    #[error("the node running on {home} does not answer at {url}: {detail}")]
    Unreachable {
        home: std::path::PathBuf,
        url: String,
        detail: String,
    },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    /// Refused by policy (a read-only type).
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Failed(String),
}

impl ClientError {
    /// The failure a node reported, of kind `kind`.
    pub fn reported(kind: ErrorKind, message: String) -> ClientError {
        match kind {
            ErrorKind::NotFound => ClientError::NotFound(message),
            ErrorKind::Forbidden => ClientError::Forbidden(message),
            ErrorKind::Invalid | ErrorKind::Unprocessable => ClientError::Invalid(message),
            ErrorKind::Unavailable | ErrorKind::Internal => ClientError::Failed(message),
        }
    }

    /// The process exit code for this error (see [`ErrorKind::exit_code`]).
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::NotFound(_) => ErrorKind::NotFound.exit_code(),
            ClientError::Forbidden(_) => ErrorKind::Forbidden.exit_code(),
            _ => ErrorKind::Internal.exit_code(),
        }
    }
}

/// Every failure of the store opened in-process is reported as a running node's would be.
impl<E: Kind> From<E> for ClientError {
    fn from(e: E) -> Self {
        ClientError::reported(e.kind(), e.to_string())
    }
}

/// A running node's HTTP API.
pub struct ApiClient {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
    home: std::path::PathBuf,
}

/// The way to the node of one home.
pub enum Client {
    Api(ApiClient),
    /// The home's store, opened in-process, and its config (loaded once).
    Local(Box<Core>, Box<Config>),
}

impl Client {
    /// Open the home's store, or, when a running node holds it, use that node's API.
    pub fn connect(home: &Home) -> Result<Client, ClientError> {
        let config = Config::load(home).map_err(OpenError::from)?;
        match Core::open(home, &config, false) {
            Ok(core) => Ok(Client::Local(Box::new(core), Box::new(config))),
            Err(OpenError::Store(StoreError::InUse { .. })) => {
                let token = crate::api::token::for_client(home, &config)
                    .map_err(|e| ClientError::Failed(e.to_string()))?;
                let addr = std::fs::read_to_string(home.api_file()).map_err(|_| {
                    ClientError::NoApiAddress {
                        home: home.dir.clone(),
                        file: home.api_file(),
                    }
                })?;
                let http = reqwest::Client::builder().no_proxy().build().map_err(|e| {
                    ClientError::Failed(format!("cannot start an HTTP client: {e}"))
                })?;
                Ok(Client::Api(ApiClient {
                    http,
                    base: format!("http://{}", addr.trim()),
                    token,
                    home: home.dir.clone(),
                }))
            }
            Err(e) => Err(e.into()),
        }
    }

    pub async fn put(
        &mut self,
        ty: &TypeName,
        id: &ObjectId,
        fields: Map<String, Json>,
    ) -> Result<WriteReply, ClientError> {
        match self {
            Client::Local(core, _) => Ok(core.put(ty, id, &fields)?),
            Client::Api(api) => {
                api.send(
                    reqwest::Method::PUT,
                    &object_path(ty, id),
                    Some(&Json::Object(fields)),
                    0,
                )
                .await
            }
        }
    }

    pub async fn delete(
        &mut self,
        ty: &TypeName,
        id: &ObjectId,
    ) -> Result<WriteReply, ClientError> {
        match self {
            Client::Local(core, _) => Ok(core.delete(ty, id)?),
            Client::Api(api) => {
                api.send(reqwest::Method::DELETE, &object_path(ty, id), None, 0)
                    .await
            }
        }
    }

    /// Resolve a field with concurrent values by picking one (see [`crate::concurrent`]).
    pub async fn resolve(
        &mut self,
        ty: &TypeName,
        id: &ObjectId,
        path: &str,
        pick: &str,
    ) -> Result<WriteReply, ClientError> {
        match self {
            Client::Local(core, _) => Ok(core.resolve(ty, id, path, pick)?),
            Client::Api(api) => {
                let body = serde_json::json!({ "path": path, "pick": pick });
                api.send(
                    reqwest::Method::POST,
                    &format!("{}/resolve", object_path(ty, id)),
                    Some(&body),
                    0,
                )
                .await
            }
        }
    }

    /// Give `ty/id` the local name `to` (how a name collision is resolved; nothing syncs).
    pub async fn rename(
        &mut self,
        ty: &TypeName,
        id: &ObjectId,
        to: &str,
    ) -> Result<crate::core::RenameReply, ClientError> {
        match self {
            Client::Local(core, _) => Ok(core.rename(ty, id, to)?),
            Client::Api(api) => {
                let body = serde_json::json!({ "to": to });
                api.send(
                    reqwest::Method::POST,
                    &format!("{}/rename", object_path(ty, id)),
                    Some(&body),
                    0,
                )
                .await
            }
        }
    }

    pub async fn get(
        &mut self,
        ty: &TypeName,
        id: &ObjectId,
    ) -> Result<Map<String, Json>, ClientError> {
        match self {
            Client::Local(core, _) => Ok(core.get(ty, id)?),
            Client::Api(api) => {
                api.send(reqwest::Method::GET, &object_path(ty, id), None, 0)
                    .await
            }
        }
    }

    pub async fn list(
        &mut self,
        ty: &TypeName,
        after: Option<&str>,
        limit: usize,
    ) -> Result<IdPage, ClientError> {
        match self {
            Client::Local(core, _) => Ok(core.list(ty, after, limit)?),
            Client::Api(api) => {
                let mut path = format!("/v1/objects/{}?limit={limit}", ty);
                if let Some(after) = after {
                    path.push_str(&format!("&after={}", encode(after)));
                }
                api.send(reqwest::Method::GET, &path, None, 0).await
            }
        }
    }

    pub async fn history(&mut self, ty: &TypeName, id: &ObjectId) -> Result<History, ClientError> {
        match self {
            Client::Local(core, _) => Ok(core.history(ty, id)?),
            Client::Api(api) => {
                api.send(
                    reqwest::Method::GET,
                    &format!("{}/history", object_path(ty, id)),
                    None,
                    0,
                )
                .await
            }
        }
    }

    /// The change feed after `since`; `wait_secs` long-polls when a node is running.
    pub async fn changes(
        &mut self,
        since: u64,
        limit: usize,
        wait_secs: u64,
    ) -> Result<Feed, ClientError> {
        match self {
            Client::Local(core, _) => Ok(core.changes(since, limit)?),
            Client::Api(api) => {
                let path = format!("/v1/changes?since={since}&limit={limit}&wait={wait_secs}");
                api.send(reqwest::Method::GET, &path, None, wait_secs).await
            }
        }
    }

    /// Add or replace a peer: in the running node (which saves its config), or in the config.
    pub async fn set_peer(
        &mut self,
        home: &Home,
        peer: crate::config::PeerConfig,
    ) -> Result<(), ClientError> {
        match self {
            Client::Local(core, config) => {
                core.set_peer(home, config, peer)?;
                Ok(())
            }
            Client::Api(api) => {
                let body = serde_json::to_value(crate::api::PeerBody {
                    id: peer.id,
                    addrs: peer.addrs,
                    policy: peer.policy,
                })
                .map_err(|e| ClientError::Invalid(e.to_string()))?;
                api.send_empty(
                    reqwest::Method::PUT,
                    &format!("/v1/peers/{}", encode(&peer.name)),
                    Some(&body),
                )
                .await
            }
        }
    }

    /// Remove a peer: from the running node, or from the config.
    pub async fn remove_peer(&mut self, home: &Home, name: &str) -> Result<(), ClientError> {
        match self {
            Client::Local(core, config) => {
                core.remove_peer(home, config, name)?;
                Ok(())
            }
            Client::Api(api) => {
                api.send_empty(
                    reqwest::Method::DELETE,
                    &format!("/v1/peers/{}", encode(name)),
                    None,
                )
                .await
            }
        }
    }

    /// List, or purge, held changes.
    pub async fn held(
        &mut self,
        query: &crate::held::HeldQuery,
    ) -> Result<crate::held::HeldReport, ClientError> {
        match self {
            Client::Local(core, _) => Ok(crate::held::held(core, query)?),
            Client::Api(api) => {
                let body =
                    serde_json::to_value(query).map_err(|e| ClientError::Failed(e.to_string()))?;
                api.send(reqwest::Method::POST, "/v1/held", Some(&body), 0)
                    .await
            }
        }
    }

    /// Store the file at `path` on the node: durable once this returns.
    pub async fn add_file(
        &mut self,
        path: &std::path::Path,
    ) -> Result<crate::api::files::StoredFile, ClientError> {
        let open = |e: std::io::Error| {
            ClientError::Invalid(format!("cannot read {}: {e}", path.display()))
        };
        match self {
            Client::Local(core, _) => {
                let mut file = std::fs::File::open(path).map_err(open)?;
                let now = core.replica().now_ms();
                let (hash, size) = core.store().add_file(&mut file, now)?;
                Ok(crate::api::files::StoredFile {
                    hash: hash.to_string(),
                    size,
                    added_ms: None,
                })
            }
            Client::Api(api) => {
                let file = tokio::fs::File::open(path).await.map_err(open)?;
                let len = file.metadata().await.map_err(open)?.len();
                let (_, bytes) = api
                    .request(
                        reqwest::Method::POST,
                        crate::api::files::FILES_PATH,
                        Body::File(file, len, crate::api::files::FILE_MEDIA_TYPE),
                        FILE_WAIT_SECS,
                    )
                    .await?;
                serde_json::from_slice(&bytes)
                    .map_err(|e| ClientError::Failed(format!("unexpected answer: {e}")))
            }
        }
    }

    /// Write the stored file `hash` to `out` (through a temporary file beside it, renamed
    /// once whole). Returns its size.
    pub async fn get_file(
        &mut self,
        hash: &crate::files::FileHash,
        out: &std::path::Path,
    ) -> Result<u64, ClientError> {
        let dir = out
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        let write_err =
            |e: std::io::Error| ClientError::Failed(format!("cannot write {}: {e}", out.display()));
        // A device or a pipe named as the output (`--out /dev/null`, `/dev/stdout`) is written
        // into. Only a regular file, or a new path, is replaced atomically: renaming over a
        // device would put a regular file in its place (as root, `/dev/null` itself).
        let special = std::fs::metadata(out).is_ok_and(|m| !m.is_file());
        let tmp = if special {
            None
        } else {
            Some(
                tempfile::Builder::new()
                    .prefix(".tidesync-file-")
                    .tempfile_in(dir)
                    .map_err(write_err)?,
            )
        };
        let sink = match &tmp {
            Some(t) => t.reopen(),
            None => std::fs::OpenOptions::new().write(true).open(out),
        }
        .map_err(write_err)?;
        let size = match self {
            Client::Local(core, _) => {
                let Some((path, row)) = core.store().file(hash)? else {
                    return Err(crate::store::FileError::NotFound(*hash).into());
                };
                let mut from = std::fs::File::open(&path).map_err(|e| {
                    ClientError::Failed(format!("cannot read {}: {e}", path.display()))
                })?;
                let mut to = sink;
                std::io::copy(&mut from, &mut to).map_err(write_err)?;
                if tmp.is_some() {
                    to.sync_all().map_err(write_err)?;
                }
                row.size
            }
            Client::Api(api) => {
                let to = tokio::fs::File::from_std(sink);
                api.download(reqwest::Method::GET, &format!("/v1/files/{hash}"), to)
                    .await?
                    .1
            }
        };
        if let Some(tmp) = tmp {
            tmp.persist(out).map_err(|e| write_err(e.error))?;
        }
        Ok(size)
    }

    /// Every file stored on the node.
    pub async fn files(&mut self) -> Result<Vec<crate::api::files::StoredFile>, ClientError> {
        match self {
            Client::Local(core, _) => Ok(core
                .store()
                .files()
                .map_err(crate::store::FileError::from)?
                .into_iter()
                .map(|(hash, row)| crate::api::files::StoredFile {
                    hash: hash.to_string(),
                    size: row.size,
                    added_ms: Some(row.added_ms),
                })
                .collect()),
            Client::Api(api) => {
                api.send(reqwest::Method::GET, crate::api::files::FILES_PATH, None, 0)
                    .await
            }
        }
    }

    /// Re-hash every stored file; a rotted one is removed and fetched again.
    pub async fn verify_files(&mut self) -> Result<crate::store::VerifyReport, ClientError> {
        match self {
            Client::Local(core, _) => {
                let peers: Vec<_> = core.replica().policies().ids().copied().collect();
                Ok(core.store().verify_files(
                    &peers,
                    core.node_id(),
                    crate::replica::system_now_ms(),
                )?)
            }
            Client::Api(api) => {
                api.send(reqwest::Method::POST, "/v1/files/verify", None, 0)
                    .await
            }
        }
    }

    /// Remove the stored files nothing refers to (kept if stored less than `grace_secs` ago).
    pub async fn gc_files(
        &mut self,
        grace_secs: Option<u64>,
    ) -> Result<crate::store::GcReport, ClientError> {
        match self {
            Client::Local(core, _) => Ok(core.store().gc_files(
                crate::replica::system_now_ms(),
                crate::api::files::gc_grace_ms(grace_secs),
            )?),
            Client::Api(api) => {
                let path = match grace_secs {
                    Some(s) => format!("/v1/files/gc?grace_secs={s}"),
                    None => "/v1/files/gc".to_string(),
                };
                api.send(reqwest::Method::POST, &path, None, 0).await
            }
        }
    }

    /// The files the node wants (its want-list), and from whom.
    pub async fn missing_files(
        &mut self,
    ) -> Result<Vec<crate::api::files::WantedFile>, ClientError> {
        match self {
            Client::Local(core, _) => Ok(core
                .store()
                .wants()
                .map_err(crate::store::FileError::from)?
                .iter()
                .map(crate::api::files::WantedFile::from)
                .collect()),
            Client::Api(api) => {
                let path = format!("{}?state=missing", crate::api::files::FILES_PATH);
                api.send(reqwest::Method::GET, &path, None, 0).await
            }
        }
    }

    /// A URL of the running node's status page with a one-time login code in it.
    pub async fn login_url(&mut self) -> Result<String, ClientError> {
        match self {
            Client::Local(..) => Err(ClientError::Invalid(
                "the node is not running: start it with `tidesync run`, then open its page".into(),
            )),
            Client::Api(api) => {
                let answer: Json = api
                    .send(
                        reqwest::Method::POST,
                        crate::api::page::LOGIN_CODES_PATH,
                        Some(&serde_json::json!({})),
                        0,
                    )
                    .await?;
                let path = answer["path"].as_str().unwrap_or_default();
                Ok(format!("{}{path}", api.base))
            }
        }
    }

    /// Send to peer `name` now, whatever its windows and budget say (running node only).
    pub async fn sync_now(&mut self, name: &str) -> Result<(), ClientError> {
        match self {
            Client::Local(..) => Err(ClientError::Invalid(
                "the node is not running: `sync --now` needs a running, connected node".into(),
            )),
            Client::Api(api) => {
                api.send_empty(
                    reqwest::Method::POST,
                    &format!("/v1/peers/{}/sync-now", encode(name)),
                    None,
                )
                .await
            }
        }
    }

    /// What would cross to peer `name` now (see [`crate::core::Plan`]).
    pub async fn plan(&mut self, name: &str, all: bool) -> Result<crate::core::Plan, ClientError> {
        match self {
            Client::Local(core, _) => Ok(core.plan(name, all)?),
            Client::Api(api) => {
                let path = format!("/v1/peers/{}/plan?all={all}", encode(name));
                api.send(reqwest::Method::GET, &path, None, 0).await
            }
        }
    }

    /// Every node heard of (see [`crate::reads::FleetNode`]).
    pub async fn fleet(&mut self) -> Result<Vec<crate::reads::FleetNode>, ClientError> {
        match self {
            Client::Local(core, config) => {
                let peers = config.peers.clone();
                Ok(core
                    .reads()
                    .fleet(&|id| peers.iter().find(|p| p.id == *id).map(|p| p.name.clone()))?)
            }
            Client::Api(api) => api.send(reqwest::Method::GET, "/v1/fleet", None, 0).await,
        }
    }

    /// The conflicts inbox (see [`crate::core::Conflict`]).
    pub async fn conflicts(&mut self) -> Result<Vec<crate::core::Conflict>, ClientError> {
        match self {
            Client::Local(core, _) => Ok(core.conflicts()?),
            Client::Api(api) => {
                api.send(reqwest::Method::GET, "/v1/conflicts", None, 0)
                    .await
            }
        }
    }

    /// Write a bundle for the configured peer `name` to `out`, through a temporary file
    /// beside it renamed once whole, with the files it lacks unless `files` is false; its
    /// report. `progress` is told the changes gathered (stopped node only).
    pub async fn export_bundle(
        &mut self,
        name: &str,
        all: bool,
        encrypt: bool,
        files: bool,
        out: &std::path::Path,
        progress: &dyn Fn(u64),
    ) -> Result<ExportReport, ClientError> {
        let write_err =
            |e: std::io::Error| ClientError::Failed(format!("cannot write {}: {e}", out.display()));
        let dir = out
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        let tmp = tempfile::Builder::new()
            .prefix(".tidesync-bundle-")
            .tempfile_in(dir)
            .map_err(write_err)?;
        let mut report = match self {
            Client::Local(core, _) => {
                let to = std::io::BufWriter::new(tmp.reopen().map_err(write_err)?);
                let (to, report) = core.export_to(name, all, encrypt, files, to, progress)?;
                to.into_inner()
                    .map_err(|e| write_err(e.into_error()))?
                    .sync_all()
                    .map_err(write_err)?;
                report
            }
            Client::Api(api) => {
                let path = format!(
                    "/v1/bundles/export?for={}&all={all}&plain={}&files={files}",
                    encode(name),
                    !encrypt
                );
                let to = tokio::fs::File::from_std(tmp.reopen().map_err(write_err)?);
                let (headers, _) = api.download(reqwest::Method::POST, &path, to).await?;
                headers
                    .get(crate::api::EXPORT_REPORT_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| serde_json::from_str(v).ok())
                    .ok_or_else(|| {
                        ClientError::Failed("the node's export came without its report".into())
                    })?
            }
        };
        report.bytes = tmp.as_file().metadata().map_err(write_err)?.len();
        // A temporary file is created readable by its owner alone (0600), as a bundle should be.
        tmp.persist(out).map_err(|e| write_err(e.error))?;
        Ok(report)
    }

    /// Import the bundle in `file`, read as a stream; `progress` is told the changes stored
    /// and their total (stopped node only).
    pub async fn import_bundle(
        &mut self,
        file: &std::path::Path,
        dry_run: bool,
        progress: &dyn Fn(u64, u64),
    ) -> Result<ImportReport, ClientError> {
        let read_err = |e: std::io::Error| {
            ClientError::Failed(format!("cannot read the bundle {}: {e}", file.display()))
        };
        let src = std::fs::File::open(file).map_err(read_err)?;
        match self {
            Client::Local(core, _) => {
                Ok(core.import_from(std::io::BufReader::new(src), dry_run, progress)?)
            }
            Client::Api(api) => {
                let len = src.metadata().map_err(read_err)?.len();
                let path = format!("/v1/bundles/import?dry_run={dry_run}");
                let (_, answer) = api
                    .request(
                        reqwest::Method::POST,
                        &path,
                        Body::File(
                            tokio::fs::File::from_std(src),
                            len,
                            guard::BUNDLE_MEDIA_TYPE,
                        ),
                        BUNDLE_WAIT_SECS,
                    )
                    .await?;
                serde_json::from_slice(&answer).map_err(|e| {
                    ClientError::Failed(format!("unexpected answer to an import: {e}"))
                })
            }
        }
    }

    pub async fn status(&mut self) -> Result<Status, ClientError> {
        match self {
            Client::Local(core, config) => Ok(core.status(&config.peers)?),
            Client::Api(api) => api.send(reqwest::Method::GET, "/v1/status", None, 0).await,
        }
    }
}

/// A request body.
enum Body {
    None,
    Json(Json),
    /// A file streamed from disk, with its length and media type.
    File(tokio::fs::File, u64, &'static str),
}

fn object_path(ty: &TypeName, id: &ObjectId) -> String {
    format!("/v1/objects/{}/{}", ty, encode(id.as_str()))
}

/// Percent-encode a path segment or query value.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl ApiClient {
    /// A request whose success has no body.
    async fn send_empty(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Json>,
    ) -> Result<(), ClientError> {
        self.send::<Json>(method, path, body, 0).await.map(|_| ())
    }

    async fn send<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Json>,
        wait_secs: u64,
    ) -> Result<T, ClientError> {
        let body = body.map(|b| Body::Json(b.clone())).unwrap_or(Body::None);
        let (_, bytes) = self.request(method, path, body, wait_secs).await?;
        let bytes = if bytes.is_empty() {
            &b"null"[..]
        } else {
            &bytes[..]
        };
        serde_json::from_slice(bytes).map_err(|e| ClientError::Unreachable {
            home: self.home.clone(),
            url: format!("{}{path}", self.base),
            detail: format!("unexpected answer: {e}"),
        })
    }

    /// Stream the body of a request for `path` into `out`, flushed and synced; returns the
    /// answer's headers and the body's length.
    async fn download(
        &self,
        method: reqwest::Method,
        path: &str,
        mut out: tokio::fs::File,
    ) -> Result<(reqwest::header::HeaderMap, u64), ClientError> {
        use tokio::io::AsyncWriteExt;
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method.clone(), &url);
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        if method != reqwest::Method::GET {
            req = req.header(reqwest::header::CONTENT_TYPE, guard::JSON_MEDIA_TYPE);
        }
        let unreachable = |detail: String| ClientError::Unreachable {
            home: self.home.clone(),
            url: url.clone(),
            detail,
        };
        let mut resp = req.send().await.map_err(|e| unreachable(e.to_string()))?;
        let status = resp.status();
        let headers = resp.headers().clone();
        if !status.is_success() {
            let bytes = resp.bytes().await.map_err(|e| unreachable(e.to_string()))?;
            return Err(failure(status, &bytes));
        }
        let write_err =
            |e: std::io::Error| ClientError::Failed(format!("cannot write the file: {e}"));
        let mut size = 0u64;
        while let Some(chunk) = resp.chunk().await.map_err(|e| unreachable(e.to_string()))? {
            size += chunk.len() as u64;
            out.write_all(&chunk).await.map_err(write_err)?;
        }
        out.flush().await.map_err(write_err)?;
        match out.sync_all().await {
            // A device or a pipe (`--out /dev/null`) has nothing to make durable.
            Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {}
            other => other.map_err(write_err)?,
        }
        Ok((headers, size))
    }

    /// One request; a successful answer's headers and body, or the node's error.
    async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Body,
        wait_secs: u64,
    ) -> Result<(reqwest::header::HeaderMap, Vec<u8>), ClientError> {
        let url = format!("{}{path}", self.base);
        let mut req = self
            .http
            .request(method.clone(), &url)
            .timeout(Duration::from_secs(API_TIMEOUT_SECS + wait_secs));
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        // State-changing requests name their media type, even without a body: the node
        // refuses any other, so that no HTML form can make them.
        let changes_state = !matches!(method, reqwest::Method::GET | reqwest::Method::HEAD);
        req = match body {
            Body::None if changes_state => {
                req.header(reqwest::header::CONTENT_TYPE, guard::JSON_MEDIA_TYPE)
            }
            Body::None => req,
            Body::Json(body) => req.json(&body),
            Body::File(file, len, media_type) => req
                .header(reqwest::header::CONTENT_TYPE, media_type)
                .header(reqwest::header::CONTENT_LENGTH, len)
                .body(reqwest::Body::from(file)),
        };
        let unreachable = |detail: String| ClientError::Unreachable {
            home: self.home.clone(),
            url: url.clone(),
            detail,
        };
        let resp = req.send().await.map_err(|e| unreachable(e.to_string()))?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.map_err(|e| unreachable(e.to_string()))?;
        if status.is_success() {
            return Ok((headers, bytes.to_vec()));
        }
        Err(failure(status, &bytes))
    }
}

/// The error a node reported with `status` and the body `bytes` (`{"error": ...}`).
fn failure(status: reqwest::StatusCode, bytes: &[u8]) -> ClientError {
    let message = serde_json::from_slice::<Json>(bytes)
        .ok()
        .and_then(|v| v.get("error").and_then(|m| m.as_str()).map(str::to_string))
        .unwrap_or_else(|| format!("HTTP {status}: {}", String::from_utf8_lossy(bytes)));
    ClientError::reported(ErrorKind::from_http_status(status.as_u16()), message)
}

#[cfg(test)]
mod tests {
    #[test]
    fn path_segments_are_percent_encoded() {
        assert_eq!(super::encode("S-001 (a/b)"), "S-001%20%28a%2Fb%29");
    }
}
