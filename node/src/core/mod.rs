//! The core: the façade that the daemon, the offline CLI and the simulation drive. It owns
//! the replica (all document state) and the sync sessions, and keeps an outbox of what to
//! send after every step: each call leaves its messages there, and every caller just drains
//! it with [`Core::take_outbox`]. A local write or an imported bundle is pushed to every
//! connected peer here, once it is committed, so no caller has to remember to.

mod files;
mod fleet;
mod peers;

#[cfg(test)]
mod bundle_tests;
#[cfg(test)]
mod link_tests;
#[cfg(test)]
mod outbound_tests;
#[cfg(test)]
mod priority_tests;
#[cfg(test)]
pub(crate) mod sync_tests;

use automerge::Automerge;
use serde_json::{Map, Value as Json};
use tidesync_proto::{DocId, Message, NodeId, ObjectId, TypeName};

use crate::bundle::{BundleBody, BundleError, ExportReport, ImportReport, Opened};
use crate::config::{Config, Home, PeerConfig};
use crate::identity::Identity;
use crate::model::DocRecord;
pub use crate::reads::{
    Conflict, DEFAULT_PAGE_IDS, Feed, FeedEntry, History, HistoryEntry, MAX_FEED_ENTRIES,
    MAX_PAGE_IDS, PeerStatus, ReadError, Reads, Status,
};
pub use crate::replica::plan::{Plan, PlanError};
pub use crate::replica::receive::Checked;
pub use crate::replica::{
    AuditedChange, Clock, DocAudit, GroupOp, LocalWriteError, OpenError, RenameError, RenameReply,
    Replica, WriteReply, system_now_ms,
};
use crate::store::{IdPage, Store, StoreError};
use crate::sync::{Outgoing, Session, Sessions, SyncError};
pub use files::persist_file_progress;
pub use peers::PeerError;

/// What a step of the core leaves for its caller to do.
#[derive(Debug, Default, PartialEq)]
pub struct Outbox {
    /// Requests to send, in order.
    pub sends: Vec<Outgoing>,
    /// The tip of our log, when a commit moved it since the outbox was last taken.
    pub tip: Option<u64>,
}

/// The node core: replica, sessions and outbox.
pub struct Core {
    replica: Replica,
    sessions: Sessions,
    outbox: Vec<Outgoing>,
    /// The downloads of the want-list (see [`crate::sync::fetch`]).
    fetcher: crate::sync::fetch::Fetcher,
    /// Other nodes' status records to relay (see [`fleet::Relayable`]).
    relayable: fleet::Relayable,
}

impl Core {
    /// A core over `replica`, with no session yet.
    pub fn from_replica(replica: Replica) -> Core {
        Core {
            replica,
            sessions: Sessions::default(),
            outbox: Vec::new(),
            fetcher: Default::default(),
            relayable: Default::default(),
        }
    }

    /// Open a node's home (see [`Replica::open`]).
    pub fn open(home: &Home, config: &Config, running: bool) -> Result<Core, OpenError> {
        Ok(Core::from_replica(Replica::open(home, config, running)?))
    }

    /// A core over an open store (see [`Replica::new`]).
    pub fn new(
        name: String,
        identity: Identity,
        store: Store,
        cache_docs: usize,
        running: bool,
    ) -> Core {
        Core::from_replica(Replica::new(name, identity, store, cache_docs, running))
    }

    /// A core with the epoch and clock given, as simulations need (see [`Replica::with_clock`]).
    pub fn with_clock(
        name: String,
        identity: Identity,
        store: Store,
        cache_docs: usize,
        running: bool,
        epoch: u64,
        clock: Clock,
    ) -> Core {
        Core::from_replica(Replica::with_clock(
            name, identity, store, cache_docs, running, epoch, clock,
        ))
    }

    /// A core over a new in-memory store, with the key `[secret; 32]` (tests).
    #[cfg(test)]
    pub(crate) fn in_memory(secret: u8, name: &str) -> Core {
        Core::from_replica(Replica::in_memory(secret, name))
    }

    /// Switch on a process fault (see [`Replica::inject_process_fault`]).
    pub fn inject_process_fault(&mut self, fault: crate::fault::Fault) {
        self.replica.inject_process_fault(fault);
    }

    /// Switch on a deliberate bug (see [`Replica::inject_fault`]).
    pub fn inject_fault(&mut self, fault: crate::fault::EngineFault) {
        self.replica.inject_fault(fault);
    }

    /// The replica, for reads.
    pub fn replica(&self) -> &Replica {
        &self.replica
    }

    /// Give up the core, returning its store (as a crash-and-restart in a simulation does).
    pub fn into_store(self) -> Store {
        self.replica.into_store()
    }

    /// What the steps since the last call left to do: requests to send and the new tip.
    pub fn take_outbox(&mut self) -> Outbox {
        Outbox {
            sends: std::mem::take(&mut self.outbox),
            tip: self.replica.take_new_tip(),
        }
    }

    /// How long the batches received since the last call spent in each stage (metrics).
    pub fn take_timings(&mut self) -> Vec<crate::model::BatchTiming> {
        self.replica.take_timings()
    }

    /// Run one sync step: its messages join the outbox when it succeeds, counted against
    /// the budgets of shaped links; when it fails, nothing it produced does.
    fn step<T>(
        &mut self,
        f: impl FnOnce(&mut Sessions, &mut Replica) -> Result<(T, Vec<Outgoing>), SyncError>,
    ) -> Result<T, SyncError> {
        let (value, out) = f(&mut self.sessions, &mut self.replica)?;
        self.sessions
            .metered_all(&self.replica, out.iter().map(|(p, m)| (p, m)))?;
        self.outbox.extend(out);
        Ok(value)
    }

    /// After a commit through this core: push what it added to every connected peer. A
    /// failure here is ours and is logged; the commit stands and the next step pushes again.
    fn push_committed(&mut self) {
        if let Err(e) = self.pump_all() {
            tracing::error!(error = %e, "could not push a commit to the peers");
        }
    }

    pub fn node_id(&self) -> NodeId {
        self.replica.node_id()
    }

    pub fn name(&self) -> &str {
        self.replica.name()
    }

    /// The store, for reading (audits, simulations and tests).
    pub fn store(&self) -> &Store {
        self.replica.store()
    }

    /// The node's identity (its signing key).
    pub fn identity(&self) -> &Identity {
        self.replica.identity()
    }

    /// Reads of what the store last committed, usable off the node actor.
    pub fn reads(&self) -> Reads {
        self.replica.reads()
    }

    /// Set a peer's policy (see [`Replica::set_policy`]).
    pub fn set_policy(
        &mut self,
        peer: NodeId,
        name: String,
        policy: crate::policy::Policy,
    ) -> Result<bool, StoreError> {
        self.replica.set_policy(peer, name, policy)
    }

    /// The document that the local name `ty/id` points to, with its record.
    pub fn find(
        &self,
        ty: &TypeName,
        id: &ObjectId,
    ) -> Result<Option<(DocId, DocRecord)>, StoreError> {
        self.replica.find(ty, id)
    }

    /// The live object `ty/id` as JSON (see [`Reads::get`]).
    pub fn get(&self, ty: &TypeName, id: &ObjectId) -> Result<Map<String, Json>, ReadError> {
        self.replica.reads().get(ty, id)
    }

    /// Ids of live objects of `ty`, a page at a time (see [`Reads::list`]).
    pub fn list(
        &self,
        ty: &TypeName,
        after: Option<&str>,
        limit: usize,
    ) -> Result<IdPage, ReadError> {
        self.replica.reads().list(ty, after, limit)
    }

    /// Every change of `ty/id`, with each signature checked (see [`Reads::history`]).
    pub fn history(&self, ty: &TypeName, id: &ObjectId) -> Result<History, ReadError> {
        self.replica.reads().history(ty, id)
    }

    /// The change feed after `since`, at most `limit` entries (see [`Reads::changes`]).
    pub fn changes(&self, since: u64, limit: usize) -> Result<Feed, ReadError> {
        self.replica.reads().changes(since, limit)
    }

    /// The last SEQ in the change log.
    pub fn last_seq(&self) -> Result<u64, ReadError> {
        self.replica.reads().last_seq()
    }

    /// Every name collision on this node (see [`Conflict`]).
    pub fn conflicts(&self) -> Result<Vec<Conflict>, ReadError> {
        self.replica.reads().conflicts()
    }

    /// The node's status, with the sync state of each configured peer.
    pub fn status(&self, peers: &[PeerConfig]) -> Result<Status, ReadError> {
        self.reads()
            .status(peers, &self.sessions.session_summaries())
    }

    /// See [`Replica::audit`].
    pub fn audit(&mut self) -> Result<Vec<DocAudit>, ReadError> {
        self.replica.audit()
    }

    /// A copy of document `doc_id`, if this node holds it.
    pub fn document(&self, doc_id: &DocId) -> Result<Option<Automerge>, ReadError> {
        self.replica.document(doc_id)
    }

    /// Set fields of `ty/id` (creating it if needed), then push it to connected peers.
    pub fn put(
        &mut self,
        ty: &TypeName,
        id: &ObjectId,
        fields: &Map<String, Json>,
    ) -> Result<WriteReply, LocalWriteError> {
        let reply = self.replica.put(ty, id, fields)?;
        if reply.changed {
            self.push_committed();
        }
        Ok(reply)
    }

    /// Resolve the field at `path` of `ty/id` to its concurrent value `pick` (an ordinary
    /// signed change, see [`crate::concurrent`]), then push it to connected peers.
    pub fn resolve(
        &mut self,
        ty: &TypeName,
        id: &ObjectId,
        path: &str,
        pick: &str,
    ) -> Result<WriteReply, LocalWriteError> {
        let reply = self.replica.resolve(ty, id, path, pick)?;
        if reply.changed {
            self.push_committed();
        }
        Ok(reply)
    }

    /// Group commit of concurrent writers' puts and deletes (see [`Replica::write_group`]),
    /// then one push of what changed to connected peers.
    pub fn write_group(
        &mut self,
        ops: &[(TypeName, ObjectId, GroupOp)],
    ) -> Vec<Result<WriteReply, LocalWriteError>> {
        let answers = self.replica.write_group(ops);
        if answers.iter().any(|a| a.as_ref().is_ok_and(|r| r.changed)) {
            self.push_committed();
        }
        answers
    }

    /// Give `ty/id` the local name `to` (see [`Replica::rename`]): nothing is sent.
    pub fn rename(
        &mut self,
        ty: &TypeName,
        id: &ObjectId,
        to: &str,
    ) -> Result<RenameReply, RenameError> {
        self.replica.rename(ty, id, to)
    }

    /// Delete `ty/id`, then push the deletion to connected peers.
    pub fn delete(&mut self, ty: &TypeName, id: &ObjectId) -> Result<WriteReply, LocalWriteError> {
        let reply = self.replica.delete(ty, id)?;
        if reply.changed {
            self.push_committed();
        }
        Ok(reply)
    }

    /// Put many objects in one transaction (see [`Replica::put_many`]), then push them.
    pub fn put_many(
        &mut self,
        items: &[(TypeName, ObjectId, Map<String, Json>)],
    ) -> Result<Vec<WriteReply>, LocalWriteError> {
        let replies = self.replica.put_many(items)?;
        if replies.iter().any(|r| r.changed) {
            self.push_committed();
        }
        Ok(replies)
    }

    /// What would cross to the configured peer `name` now (see [`crate::replica::plan`]).
    pub fn plan(&self, name: &str, all: bool) -> Result<crate::replica::plan::Plan, PlanError> {
        self.replica.plan(name, all)
    }

    /// The body of a bundle for the configured peer `name` (see
    /// [`crate::bundle::transfer::export_body`]); the shell writes it with its files.
    pub fn export_body(
        &mut self,
        name: &str,
        all: bool,
        with_files: bool,
        progress: &dyn Fn(u64),
    ) -> Result<(BundleBody, ExportReport), BundleError> {
        crate::bundle::transfer::export_body(&mut self.replica, name, all, with_files, progress)
    }

    /// A whole bundle for `name` written to `out`, its files read from the store as they go.
    pub fn export_to<W: std::io::Write>(
        &mut self,
        name: &str,
        all: bool,
        encrypt: bool,
        with_files: bool,
        out: W,
        progress: &dyn Fn(u64),
    ) -> Result<(W, ExportReport), BundleError> {
        let (body, mut report) = self.export_body(name, all, with_files, progress)?;
        let out = crate::bundle::stream::write(
            self.replica.identity(),
            &body,
            encrypt,
            out,
            &mut crate::bundle::files::copy_from_store(self.store(), body.to),
        )?;
        report.encrypted = encrypt;
        Ok((out, report))
    }

    /// A whole bundle for `name` in memory (see [`Core::export_to`]).
    pub fn export_bundle(
        &mut self,
        name: &str,
        all: bool,
        encrypt: bool,
        with_files: bool,
        progress: &dyn Fn(u64),
    ) -> Result<(Vec<u8>, ExportReport), BundleError> {
        let (bytes, mut report) =
            self.export_to(name, all, encrypt, with_files, Vec::new(), progress)?;
        report.bytes = bytes.len() as u64;
        Ok((bytes, report))
    }

    /// Open a bundle read from `src` (see [`crate::bundle::transfer::open_from`]).
    pub fn open_bundle<'a>(
        &self,
        src: impl std::io::Read + Send + 'a,
    ) -> Result<Opened<'a>, BundleError> {
        crate::bundle::transfer::open_from(&self.replica, src)
    }

    /// Import the records of an opened bundle (see [`crate::bundle::transfer::import_body`]),
    /// then push what they added to connected peers. Its files are for
    /// [`crate::bundle::files::store_wanted`].
    pub fn import_body(
        &mut self,
        body: &BundleBody,
        dry_run: bool,
        progress: &dyn Fn(u64, u64),
    ) -> Result<ImportReport, BundleError> {
        let report =
            crate::bundle::transfer::import_body(&mut self.replica, body, dry_run, progress)?;
        if !report.dry_run {
            self.note_bundle(&report.from);
        }
        if !report.dry_run && report.new_changes > 0 {
            self.push_committed();
        }
        Ok(report)
    }

    /// Import a whole bundle read from `src`: its records, then each file it carries that
    /// this node now wants, verified.
    pub fn import_from(
        &mut self,
        src: impl std::io::Read + Send,
        dry_run: bool,
        progress: &dyn Fn(u64, u64),
    ) -> Result<ImportReport, BundleError> {
        let mut opened = self.open_bundle(src)?;
        let mut report = self.import_body(&opened.body, dry_run, progress)?;
        if !dry_run {
            let now = self.replica.now_ms();
            let stored = crate::bundle::files::store_wanted(
                self.store(),
                &mut opened,
                now,
                &mut report,
                &mut |_| {},
            );
            if let Err(e) = self.reconcile_wants() {
                tracing::error!(error = %e, "could not read the want-list after a bundle's files");
            }
            stored.map_err(|e| e.after_records(&report))?;
        }
        Ok(report)
    }

    /// Import the bundle `bytes` (see [`Core::import_from`]).
    pub fn import_bundle(
        &mut self,
        bytes: &[u8],
        dry_run: bool,
        progress: &dyn Fn(u64, u64),
    ) -> Result<ImportReport, BundleError> {
        self.import_from(bytes, dry_run, progress)
    }

    /// The session with `peer`, if connected.
    pub fn session(&self, peer: &NodeId) -> Option<&Session> {
        self.sessions.session(peer)
    }

    /// What status needs of each connected peer's session.
    pub fn session_summaries(&self) -> crate::reads::Sessions {
        self.sessions.session_summaries()
    }

    /// A connection to `peer` is up (see [`Sessions::on_connected`]).
    pub fn on_connected(&mut self, peer: NodeId) -> Result<(), SyncError> {
        self.fetcher.connected(peer);
        self.step(|s, r| Ok(((), s.on_connected(r, peer)?)))
    }

    /// The transport `peer`'s connection runs over, for status.
    pub fn connected_via(&mut self, peer: NodeId, via: Option<crate::link::Transport>) {
        self.sessions.set_via(peer, via);
    }

    /// The last connection to `peer` is gone.
    pub fn on_disconnected(&mut self, peer: &NodeId) {
        self.fetcher.disconnected(peer);
        self.sessions.on_disconnected(peer);
    }

    /// A request from `peer`: returns the response (see [`Sessions::on_request`]). `checked`
    /// holds the signatures of a batch verified ahead, off the actor (see [`Checked`]).
    pub fn on_request(
        &mut self,
        peer: NodeId,
        msg: Message,
        checked: Option<Checked>,
    ) -> Result<Message, SyncError> {
        let response = match msg {
            Message::Status { status } => self.on_status(peer, &status),
            msg => self.step(|s, r| s.on_request(r, peer, msg, checked))?,
        };
        self.sessions
            .metered_all(&self.replica, [(&peer, &response)])?;
        Ok(response)
    }

    /// The response to a request we sent to `peer` (see [`Sessions::on_response`]).
    pub fn on_response(&mut self, peer: NodeId, msg: Message) -> Result<(), SyncError> {
        if let Message::Ack {
            batch: tidesync_proto::wire::STATUS_ACK,
            rejected,
            ..
        } = msg
        {
            if rejected > 0 {
                tracing::debug!(%peer, "the peer refused our status record");
            }
            return Ok(());
        }
        self.step(|s, r| Ok(((), s.on_response(r, peer, msg)?)))
    }

    /// A request to `peer` failed (see [`Sessions::on_request_failed`]).
    pub fn on_request_failed(&mut self, peer: NodeId) -> Result<(), SyncError> {
        self.step(|s, r| Ok(((), s.on_request_failed(r, peer)?)))
    }

    /// `peer`'s policy widened (see [`Sessions::on_policy_widened`]).
    pub fn on_policy_widened(&mut self, peer: NodeId) -> Result<(), SyncError> {
        self.step(|s, r| Ok(((), s.on_policy_widened(r, peer)?)))
    }

    /// Send every connected peer what it lacks of our log, up to each one's window.
    pub fn pump_all(&mut self) -> Result<(), SyncError> {
        self.step(|s, r| Ok(((), s.pump_all(r)?)))
    }

    /// Pump the peers whose link is shaped (see [`Sessions::pump_shaped`]).
    pub fn pump_shaped(&mut self) -> Result<(), SyncError> {
        self.step(|s, r| Ok(((), s.pump_shaped(r)?)))
    }
}
