//! The running node: an actor that owns the core (a cloneable handle, an `Action` enum with
//! oneshot replies, a private loop), and the `run` lifecycle that starts and stops it.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value as Json};
use tidesync_proto::{NodeId, ObjectId, TypeName};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::Instrument;

use crate::config::{Config, Home, write_atomic};
use crate::core::{Core, Feed, History, LocalWriteError, OpenError, ReadError, Status, WriteReply};
use crate::store::IdPage;

/// Requests that may wait in the node's queue before callers are made to wait.
pub const ACTION_QUEUE_LEN: usize = 256;
/// Longest a change-feed request may long-poll, in seconds.
pub const MAX_FEED_WAIT_SECS: u64 = 60;

type Reply<T> = oneshot::Sender<T>;

/// What the node can be asked to do.
enum Action {
    Put {
        ty: TypeName,
        id: ObjectId,
        fields: Map<String, Json>,
        reply: Reply<Result<WriteReply, LocalWriteError>>,
    },
    Delete {
        ty: TypeName,
        id: ObjectId,
        reply: Reply<Result<WriteReply, LocalWriteError>>,
    },
    Get {
        ty: TypeName,
        id: ObjectId,
        reply: Reply<Result<Map<String, Json>, ReadError>>,
    },
    List {
        ty: TypeName,
        after: Option<String>,
        limit: usize,
        reply: Reply<Result<IdPage, ReadError>>,
    },
    History {
        ty: TypeName,
        id: ObjectId,
        reply: Reply<Result<History, ReadError>>,
    },
    Changes {
        since: u64,
        limit: usize,
        reply: Reply<Result<Feed, ReadError>>,
    },
    Status {
        reply: Reply<Result<Status, ReadError>>,
    },
}

/// Why a request to the node actor failed. Each names the request.
#[derive(Debug, thiserror::Error)]
pub enum CallError<E> {
    #[error("the node is shutting down")]
    Stopped,
    #[error(transparent)]
    Failed(E),
}

/// A cloneable handle to the running node.
#[derive(Clone)]
pub struct NodeHandle {
    tx: mpsc::Sender<Action>,
    last_seq: watch::Receiver<u64>,
    info: Arc<NodeInfo>,
}

/// Facts about the node that never change while it runs.
#[derive(Debug)]
pub struct NodeInfo {
    pub node: NodeId,
    pub name: String,
}

impl NodeHandle {
    pub fn info(&self) -> &NodeInfo {
        &self.info
    }

    async fn call<T, E>(
        &self,
        make: impl FnOnce(Reply<Result<T, E>>) -> Action,
    ) -> Result<T, CallError<E>> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| CallError::Stopped)?;
        rx.await
            .map_err(|_| CallError::Stopped)?
            .map_err(CallError::Failed)
    }

    pub async fn put(
        &self,
        ty: TypeName,
        id: ObjectId,
        fields: Map<String, Json>,
    ) -> Result<WriteReply, CallError<LocalWriteError>> {
        self.call(|reply| Action::Put {
            ty,
            id,
            fields,
            reply,
        })
        .await
    }

    pub async fn delete(
        &self,
        ty: TypeName,
        id: ObjectId,
    ) -> Result<WriteReply, CallError<LocalWriteError>> {
        self.call(|reply| Action::Delete { ty, id, reply }).await
    }

    pub async fn get(
        &self,
        ty: TypeName,
        id: ObjectId,
    ) -> Result<Map<String, Json>, CallError<ReadError>> {
        self.call(|reply| Action::Get { ty, id, reply }).await
    }

    pub async fn list(
        &self,
        ty: TypeName,
        after: Option<String>,
        limit: usize,
    ) -> Result<IdPage, CallError<ReadError>> {
        self.call(|reply| Action::List {
            ty,
            after,
            limit,
            reply,
        })
        .await
    }

    pub async fn history(
        &self,
        ty: TypeName,
        id: ObjectId,
    ) -> Result<History, CallError<ReadError>> {
        self.call(|reply| Action::History { ty, id, reply }).await
    }

    pub async fn status(&self) -> Result<Status, CallError<ReadError>> {
        self.call(|reply| Action::Status { reply }).await
    }

    /// The change feed after `since`. When it is empty and `wait` is non-zero, waits up to
    /// `wait` (capped at [`MAX_FEED_WAIT_SECS`]) for a new change before answering.
    pub async fn changes(
        &self,
        since: u64,
        limit: usize,
        wait: Duration,
    ) -> Result<Feed, CallError<ReadError>> {
        let mut last_seq = self.last_seq.clone();
        let wait = wait.min(Duration::from_secs(MAX_FEED_WAIT_SECS));
        if *last_seq.borrow_and_update() <= since && !wait.is_zero() {
            let _ = tokio::time::timeout(wait, last_seq.wait_for(|s| *s > since)).await;
        }
        self.call(|reply| Action::Changes {
            since,
            limit,
            reply,
        })
        .await
    }
}

/// The actor's private state and loop.
struct NodeActor {
    core: Core,
    rx: mpsc::Receiver<Action>,
    last_seq: watch::Sender<u64>,
}

impl NodeActor {
    async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                action = self.rx.recv() => match action {
                    Some(action) => self.on_action(action),
                    None => break,
                },
                _ = shutdown.wait_for(|stop| *stop) => break,
            }
        }
        tracing::info!("node actor stopped");
    }

    /// Run one request against the core. redb calls block, so they run in place on this
    /// worker while the runtime moves other tasks elsewhere.
    fn on_action(&mut self, action: Action) {
        tokio::task::block_in_place(|| match action {
            Action::Put {
                ty,
                id,
                fields,
                reply,
            } => {
                let r = self.core.put(&ty, &id, &fields);
                self.after_write(&r);
                let _ = reply.send(r);
            }
            Action::Delete { ty, id, reply } => {
                let r = self.core.delete(&ty, &id);
                self.after_write(&r);
                let _ = reply.send(r);
            }
            Action::Get { ty, id, reply } => {
                let _ = reply.send(self.core.get(&ty, &id));
            }
            Action::List {
                ty,
                after,
                limit,
                reply,
            } => {
                let _ = reply.send(self.core.list(&ty, after.as_deref(), limit));
            }
            Action::History { ty, id, reply } => {
                let _ = reply.send(self.core.history(&ty, &id));
            }
            Action::Changes {
                since,
                limit,
                reply,
            } => {
                let _ = reply.send(self.core.changes(since, limit));
            }
            Action::Status { reply } => {
                let _ = reply.send(self.core.status());
            }
        });
    }

    fn after_write(&self, result: &Result<WriteReply, LocalWriteError>) {
        match result {
            Ok(WriteReply { seq: Some(seq), .. }) => {
                self.last_seq.send_replace(*seq);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "local write refused"),
        }
    }
}

/// Start the node actor over `core`. It stops when `shutdown` turns true or every handle drops.
pub fn spawn(
    core: Core,
    shutdown: watch::Receiver<bool>,
) -> Result<(NodeHandle, tokio::task::JoinHandle<()>), ReadError> {
    let (tx, rx) = mpsc::channel(ACTION_QUEUE_LEN);
    let (last_seq_tx, last_seq) = watch::channel(core.last_seq()?);
    let info = Arc::new(NodeInfo {
        node: core.node_id(),
        name: core.name().to_string(),
    });
    let actor = NodeActor {
        core,
        rx,
        last_seq: last_seq_tx,
    };
    let task = tokio::spawn(actor.run(shutdown).in_current_span());
    Ok((NodeHandle { tx, last_seq, info }, task))
}

/// Why a node could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("another tidesync node is already running on {home}{api}")]
    AlreadyRunning {
        home: std::path::PathBuf,
        api: String,
    },
    #[error("cannot read the change log of {home}: {source}")]
    Read {
        home: std::path::PathBuf,
        source: ReadError,
    },
    #[error("cannot listen for the HTTP API on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot write {file}: {source}")]
    ApiFile {
        file: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("the HTTP API failed: {0}")]
    Serve(std::io::Error),
}

/// Run the node on `home` until Ctrl-C or SIGTERM.
pub async fn run(home: &Home) -> Result<(), RunError> {
    let config = Config::load(home).map_err(OpenError::from)?;
    let core = match Core::open(home, true) {
        Ok(core) => core,
        Err(OpenError::Store(crate::store::StoreError::InUse { .. })) => {
            let api = std::fs::read_to_string(home.api_file())
                .map(|a| format!(" (its API is at {})", a.trim()))
                .unwrap_or_default();
            return Err(RunError::AlreadyRunning {
                home: home.dir.clone(),
                api,
            });
        }
        Err(e) => return Err(e.into()),
    };
    let span = tracing::info_span!("node", name = %config.name, id = %core.node_id().short());
    async move {
        let (stop_tx, stop_rx) = watch::channel(false);
        let (handle, actor) = spawn(core, stop_rx.clone()).map_err(|source| RunError::Read {
            home: home.dir.clone(),
            source,
        })?;
        let listener = tokio::net::TcpListener::bind(config.api.listen)
            .await
            .map_err(|source| RunError::Bind {
                addr: config.api.listen,
                source,
            })?;
        let bound = listener.local_addr().map_err(|source| RunError::Bind {
            addr: config.api.listen,
            source,
        })?;
        write_atomic(&home.api_file(), format!("{bound}\n").as_bytes(), 0o644).map_err(
            |source| RunError::ApiFile {
                file: home.api_file(),
                source,
            },
        )?;
        tracing::info!(node = %handle.info().node, api = %bound, "node running");

        let signals = shutdown_signal().map_err(RunError::Signals)?;
        let app = crate::api::router(handle.clone(), config.api.token.clone());
        let mut api_stop = stop_rx.clone();
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = api_stop.wait_for(|s| *s).await;
            })
            .into_future();
        let served = tokio::spawn(served.in_current_span());
        signals.await;
        tracing::info!("stopping");
        let _ = stop_tx.send(true);
        let served = served.await;
        let _ = actor.await;
        let _ = std::fs::remove_file(home.api_file());
        tracing::info!("stopped");
        match served {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(RunError::Serve(e)),
            Err(e) => Err(RunError::Serve(std::io::Error::other(e))),
        }
    }
    .instrument(span)
    .await
}

/// Resolves on Ctrl-C or SIGTERM.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    })
}
