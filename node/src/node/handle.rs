//! The node's handle: what callers (the API, the daemon) ask of a running node, as actions
//! with oneshot replies to the actor, or as reads off it.

use super::*;

impl NodeHandle {
    /// The store files are added to and read from: file bytes never pass through the actor.
    pub fn file_store(&self) -> &crate::store::Store {
        self.reads.store()
    }

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

    /// Run a read against the store's last commit, off the node actor.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Reads) -> Result<T, ReadError> + Send + 'static,
    ) -> Result<T, CallError<ReadError>> {
        let reads = self.reads.clone();
        tokio::task::spawn_blocking(move || f(&reads))
            .await
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

    /// Put many objects in one transaction.
    pub async fn put_many(
        &self,
        items: Vec<(TypeName, ObjectId, Map<String, Json>)>,
    ) -> Result<Vec<WriteReply>, CallError<LocalWriteError>> {
        self.call(|reply| Action::PutMany { items, reply }).await
    }

    pub async fn delete(
        &self,
        ty: TypeName,
        id: ObjectId,
    ) -> Result<WriteReply, CallError<LocalWriteError>> {
        self.call(|reply| Action::Delete { ty, id, reply }).await
    }

    /// Every node this one has heard of (see [`crate::reads::FleetNode`]).
    pub async fn fleet(&self) -> Result<Vec<crate::reads::FleetNode>, CallError<ReadError>> {
        let peers = self.live.borrow().peers.clone();
        self.read(move |v| {
            v.fleet(&|id| peers.iter().find(|p| p.id == *id).map(|p| p.name.clone()))
        })
        .await
    }

    /// Send to peer `name` now, whatever its windows and budget say (`tidesync sync --now`).
    pub async fn sync_now(&self, name: String) -> Result<(), CallError<PeerError>> {
        self.call(|reply| Action::SyncNow { name, reply }).await
    }

    /// Whether the node is ready: its actor answers and its store reads.
    pub async fn ready(&self) -> Result<(), CallError<ReadError>> {
        self.call(|reply| Action::Ping { reply }).await?;
        self.read(|v| v.last_seq()).await.map(|_| ())
    }

    /// Resolve a field with concurrent values by picking one (see [`crate::concurrent`]).
    pub async fn resolve(
        &self,
        ty: TypeName,
        id: ObjectId,
        path: String,
        pick: String,
    ) -> Result<WriteReply, CallError<LocalWriteError>> {
        self.call(|reply| Action::Resolve {
            ty,
            id,
            path,
            pick,
            reply,
        })
        .await
    }

    /// Give an object a new local name (how a name collision is resolved).
    pub async fn rename(
        &self,
        ty: TypeName,
        id: ObjectId,
        to: String,
    ) -> Result<crate::core::RenameReply, CallError<crate::core::RenameError>> {
        self.call(|reply| Action::Rename { ty, id, to, reply })
            .await
    }

    pub async fn get(
        &self,
        ty: TypeName,
        id: ObjectId,
    ) -> Result<Map<String, Json>, CallError<ReadError>> {
        self.read(move |v| v.get(&ty, &id)).await
    }

    pub async fn list(
        &self,
        ty: TypeName,
        after: Option<String>,
        limit: usize,
    ) -> Result<IdPage, CallError<ReadError>> {
        self.read(move |v| v.list(&ty, after.as_deref(), limit))
            .await
    }

    pub async fn history(
        &self,
        ty: TypeName,
        id: ObjectId,
    ) -> Result<History, CallError<ReadError>> {
        self.read(move |v| v.history(&ty, &id)).await
    }

    /// List, or purge, held changes.
    pub async fn held(
        &self,
        query: crate::held::HeldQuery,
    ) -> Result<crate::held::HeldReport, CallError<crate::held::HeldError>> {
        self.call(|reply| Action::Held { query, reply }).await
    }

    /// The node's status: the store's counts as last committed, the sessions as the node
    /// actor last published them, and the network's counters.
    pub async fn status(&self) -> Result<Status, CallError<ReadError>> {
        let live = Arc::clone(&self.live.borrow());
        let mut status = self
            .read(move |v| v.status(&live.peers, &live.sessions))
            .await?;
        let net = self.net.borrow().clone();
        status.listen = net.listen;
        status.refused_connections = net.refused;
        status.discovered_strangers = net.discovered_strangers;
        status.discovered_peers = net.discovered_peers;
        status.net = self.counters.totals();
        let live = Arc::clone(&self.live.borrow());
        status.files = live.files.clone();
        for p in &mut status.peers {
            if let Some(t) =
                p.id.parse()
                    .ok()
                    .and_then(|id: NodeId| live.traffic.get(&id))
            {
                p.bytes_in = t.bytes_in;
                p.bytes_out = t.bytes_out;
            }
        }
        Ok(status)
    }

    pub async fn conflicts(&self) -> Result<Vec<crate::core::Conflict>, CallError<ReadError>> {
        self.read(|v| v.conflicts()).await
    }

    /// What would cross to the configured peer `peer` now (see [`Core::plan`]).
    pub async fn plan(
        &self,
        peer: String,
        all: bool,
    ) -> Result<crate::replica::plan::Plan, CallError<crate::replica::plan::PlanError>> {
        self.call(|reply| Action::Plan { peer, all, reply }).await
    }

    /// A bundle for the configured peer `peer` (see [`Core::export_to`]), written to `out` off
    /// the actor: the report once the body is gathered; `done` is told when the bundle is
    /// whole, or why it is not.
    pub async fn export_bundle(
        &self,
        peer: String,
        all: bool,
        encrypt: bool,
        files: bool,
        out: BundleSink,
        done: Box<dyn FnOnce(Result<(), BundleError>) + Send>,
    ) -> Result<ExportReport, CallError<BundleError>> {
        self.call(|reply| Action::ExportBundle {
            peer,
            all,
            encrypt,
            files,
            out,
            done,
            reply,
        })
        .await
    }

    /// Import the bundle `src` reads (see [`Core::import_from`]); what it adds is relayed to
    /// the peers.
    pub async fn import_bundle(
        &self,
        src: Box<dyn std::io::Read + Send>,
        dry_run: bool,
    ) -> Result<ImportReport, CallError<BundleError>> {
        self.call(|reply| Action::ImportBundle {
            src,
            dry_run,
            reply,
        })
        .await
    }

    /// The configured peers' ids, as the node actor last published them.
    pub fn peer_ids(&self) -> Vec<NodeId> {
        self.live.borrow().peers.iter().map(|p| p.id).collect()
    }

    /// Fetch the wanted file `hash` now (an `on-demand` file is fetched only so), waiting up
    /// to `wait` for it to be stored. Whether it is stored when this returns.
    pub async fn fetch_file(&self, hash: FileHash, wait: Duration) -> bool {
        let (reply, rx) = oneshot::channel();
        if self
            .tx
            .send(Action::FetchFile { hash, reply })
            .await
            .is_err()
        {
            return false;
        }
        matches!(tokio::time::timeout(wait, rx).await, Ok(Ok(true)))
    }

    /// Add or replace a peer; saved to the config file and applied at once.
    pub async fn set_peer(&self, peer: PeerConfig) -> Result<(), CallError<PeerError>> {
        self.call(|reply| Action::SetPeer {
            peer: Box::new(peer),
            reply,
        })
        .await
    }

    /// Remove a peer; saved to the config file and its connection closed at once.
    pub async fn remove_peer(&self, name: String) -> Result<(), CallError<PeerError>> {
        self.call(|reply| Action::RemovePeer { name, reply }).await
    }

    /// The change feed after `since`, and with `files_since` the file feed after it. When
    /// both are empty and `wait` is non-zero, waits up to `wait` (capped at
    /// [`MAX_FEED_WAIT_SECS`]) for a new change or stored file before answering.
    pub async fn changes(
        &self,
        since: u64,
        limit: usize,
        wait: Duration,
        files_since: Option<u64>,
    ) -> Result<Feed, CallError<ReadError>> {
        let mut last_seq = self.last_seq.clone();
        let mut files_last = self.files_last.subscribe();
        let wait = wait.min(Duration::from_secs(MAX_FEED_WAIT_SECS));
        let no_files = files_since.is_none_or(|f| *files_last.borrow_and_update() <= f);
        if *last_seq.borrow_and_update() <= since && no_files && !wait.is_zero() {
            let files = async {
                match files_since {
                    Some(f) => {
                        let _ = files_last.wait_for(|n| *n > f).await;
                    }
                    None => std::future::pending().await,
                }
            };
            let _ = tokio::time::timeout(wait, async {
                tokio::select! {
                    _ = last_seq.wait_for(|s| *s > since) => {},
                    _ = files => {},
                }
            })
            .await;
        }
        self.read(move |v| {
            let mut feed = v.changes(since, limit)?;
            if let Some(f) = files_since {
                feed.files = Some(v.file_feed(f, limit)?);
            }
            Ok(feed)
        })
        .await
    }

    /// A file was stored by an upload: wake the feed's long polls.
    pub fn file_stored(&self) {
        self.files_last.send_modify(|n| *n += 1);
    }
}
